"""The assignment document (`nova/v1/assignments/<node>`) and the pure reconcile plan.

The coordinator's leader writes, for each node, the replicas it must run:

    {"epoch": <leader LockIndex>, "containers": {"<ns>.<deployment>.<replica>": {
        "namespace", "deployment", "replica", "digest", "cpu_millicores",
        "memory_bytes", "labels", "args", "env", "generation"}}}

`plan()` compares that with what the agent runs. The rules: start what is
new; stop what is gone; a replica with the same id, generation and digest is
unchanged and never restarted; one whose generation or digest changed is
replaced (stopped, then started); one that exited is started again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nova.store import keys


class InvalidAssignment(ValueError):
    """The document is not what the coordinator writes: keep the last good one."""


@dataclass(frozen=True, slots=True)
class Desired:
    """One replica the node must run."""

    replica_id: str
    namespace: str
    deployment: str
    replica: int
    digest: str
    generation: int
    cpu_millicores: int | None = None
    memory_bytes: int | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def same_version(self, generation: int, digest: str) -> bool:
        return (self.generation, self.digest) == (generation, digest)


@dataclass(frozen=True, slots=True)
class Assignment:
    epoch: int
    replicas: dict[str, Desired] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Running:
    """What the agent has for a replica: its container and the version it runs."""

    replica_id: str
    container_id: str
    generation: int
    digest: str
    alive: bool


@dataclass(frozen=True, slots=True)
class Plan:
    stop: tuple[Running, ...] = ()  # gone from the assignment, or replaced
    start: tuple[Desired, ...] = ()  # new, replaced, or exited
    forget: tuple[str, ...] = ()  # replica ids neither desired nor running: drop their records

    @property
    def empty(self) -> bool:
        return not (self.stop or self.start or self.forget)


def plan(desired: dict[str, Desired], actual: dict[str, Running]) -> Plan:
    stop: list[Running] = []
    start: list[Desired] = []
    forget: list[str] = []
    for replica_id, have in sorted(actual.items()):
        want = desired.get(replica_id)
        if want is None and have.alive:
            stop.append(have)
        elif want is None:
            forget.append(replica_id)
        elif have.alive and not want.same_version(have.generation, have.digest):
            stop.append(have)
            start.append(want)
        elif not have.alive:
            start.append(want)
    start += [want for rid, want in sorted(desired.items()) if rid not in actual]
    return Plan(stop=tuple(stop), start=tuple(start), forget=tuple(forget))


def parse_assignment(data: Any, *, where: str) -> Assignment:
    """The document at `where`; InvalidAssignment naming the field that is wrong."""
    if data is None:
        return Assignment(epoch=0)
    if not isinstance(data, dict) or not isinstance(data.get("containers", {}), dict):
        raise InvalidAssignment(f"{where}: expected {{'epoch': N, 'containers': {{...}}}}")
    epoch = data.get("epoch", 0)
    if not isinstance(epoch, int):
        raise InvalidAssignment(f"{where}: 'epoch' must be an integer")
    replicas = {
        rid: _desired(rid, spec, where=f"{where} containers[{rid!r}]")
        for rid, spec in data.get("containers", {}).items()
    }
    return Assignment(epoch=epoch, replicas=replicas)


def _desired(replica_id: str, spec: Any, *, where: str) -> Desired:
    if not isinstance(spec, dict):
        raise InvalidAssignment(f"{where}: expected an object")
    try:
        keys.segment(replica_id, what="replica id")
        keys.digest(spec["digest"])
        return Desired(
            replica_id=replica_id,
            namespace=str(spec.get("namespace", "")),
            deployment=str(spec.get("deployment") or replica_id),
            replica=_int(spec.get("replica", 0), "replica"),
            digest=spec["digest"],
            generation=_int(spec.get("generation", 0), "generation"),
            cpu_millicores=_optional_int(spec.get("cpu_millicores"), "cpu_millicores"),
            memory_bytes=_optional_int(spec.get("memory_bytes"), "memory_bytes"),
            args=tuple(_strings(spec.get("args") or [], "args")),
            env=tuple(sorted(_string_map(spec.get("env") or {}, "env").items())),
            labels=tuple(sorted(_string_map(spec.get("labels") or {}, "labels").items())),
        )
    except KeyError as exc:
        raise InvalidAssignment(f"{where}: field {exc} is required") from None
    except (TypeError, ValueError) as exc:
        raise InvalidAssignment(f"{where}: {exc}") from None


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    return value


def _optional_int(value: Any, name: str) -> int | None:
    return None if value in (None, 0) else _int(value, name)


def _strings(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return value


def _string_map(value: Any, name: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{name} must map strings to strings")
    return value
