"""The cluster's records as the coordinator reads and writes them (JSON in the store).

Pure conversions, no I/O: node keys -> placement `Node`s, deployment keys ->
`DeploymentSpec` and placement `Request`s, and per-node assignment values
encoded compactly and deterministically, so the placement loop compares
bytes to find the keys that changed. The key space is in `nova.store.keys`
and docs/operations.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.placement import (
    Node,
    Op,
    Placement,
    PlacementInputError,
    ReplicaId,
    Request,
    Resources,
    Selector,
)
from nova.store import KVEntry, encode_json, keys

_EPOCH_SEP = b',"epoch":'


class RecordError(ValueError):
    """A stored record (or a submitted one) that cannot be used; the message names it."""


def _int(obj: Mapping[str, Any], name: str, where: str, *, minimum: int = 0) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RecordError(f"{where}: {name} must be an integer >= {minimum}, not {value!r}")
    return value


def _str_map(obj: Mapping[str, Any], name: str, where: str) -> dict[str, str]:
    value = obj.get(name) or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise RecordError(f"{where}: {name} must map strings to strings")
    return dict(value)


def node_of(entry: KVEntry) -> Node:
    """A node key as placement sees it: healthy iff an agent session holds the key."""
    where = entry.key
    try:
        value = entry.json()
    except ValueError as exc:
        raise RecordError(str(exc)) from None
    if not isinstance(value, dict) or not isinstance(value.get("capacity"), dict):
        raise RecordError(f"{where}: expected an object with a capacity")
    capacity = value["capacity"]
    return Node(
        keys.split(entry.key, keys.NODES)[0],
        Resources(
            _int(capacity, "cpu_millicores", where, minimum=1),
            _int(capacity, "memory_bytes", where, minimum=1),
        ),
        _str_map(value, "labels", where),
        healthy=entry.session is not None,
    )


_SET = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s*\(([^()]*)\)\s*$")


def parse_selector(text: str) -> Selector:
    """A constraint on node labels, as users write it (Kubernetes' selector syntax):

        zone=a   zone!=a   zone in (a,b)   zone notin (a,b)   gpu   !gpu

    RecordError naming the expression when it is none of these.
    """
    if not isinstance(text, str):
        raise RecordError(f"constraint {text!r} must be a string")
    try:
        if match := _SET.match(text):
            key, op, values = match.groups()
            items = [v.strip() for v in values.split(",") if v.strip()]
            return Selector(key, Op.IN if op == "in" else Op.NOT_IN, tuple(items))
        stripped = text.strip()
        if "!=" in stripped:
            key, value = (part.strip() for part in stripped.split("!=", 1))
            return Selector.none_of(key, value)
        if "=" in stripped:
            key, value = (part.strip() for part in stripped.split("=", 1))
            return Selector.equals(key, value.removeprefix("="))
        if stripped.startswith("!"):
            return Selector.absent(stripped[1:].strip())
        if stripped and not any(c in stripped for c in " ()"):
            return Selector.exists(stripped)
    except PlacementInputError as exc:
        raise RecordError(f"constraint {text!r}: {exc}") from None
    raise RecordError(
        f"constraint {text!r} is not one of: LABEL=VALUE, LABEL!=VALUE, LABEL in (A,B), "
        "LABEL notin (A,B), LABEL, !LABEL"
    )


def _constraints(value: Any, where: str) -> tuple[str, ...]:
    """Constraints as a list of expressions, or a mapping (each LABEL: VALUE an equality)."""
    if value is None:
        return ()
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, v in value.items()]
    if not isinstance(value, list):
        raise RecordError(f"{where}: constraints must be a list of expressions or a mapping")
    try:
        selectors = sorted({parse_selector(item) for item in value})
    except RecordError as exc:
        raise RecordError(f"{where}: {exc}") from None
    return tuple(str(s) for s in selectors)


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """`nova/v1/deployments/<ns>/<name>`: what `nova deploy` asked for."""

    namespace: str
    name: str
    image: str
    digest: str
    replicas: int
    cpu_millicores: int
    memory_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    constraints: tuple[str, ...] = ()  # node-label expressions, canonical (see parse_selector)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    spread: str | None = None  # a node label (e.g. "zone") to spread replicas across
    generation: int = 1

    @classmethod
    def from_json(cls, value: Any, where: str = "deployment") -> DeploymentSpec:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected a JSON object")
        try:
            namespace = keys.segment(value.get("namespace", ""), what="namespace")
            name = keys.segment(value.get("name", ""), what="deployment name")
            digest = keys.digest(value.get("digest", ""))
        except ValueError as exc:
            raise RecordError(f"{where}: {exc}") from None
        image = value.get("image", "")
        args = value.get("args") or []
        if not isinstance(image, str):
            raise RecordError(f"{where}: image must be a string")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise RecordError(f"{where}: args must be a list of strings")
        spread = value.get("spread") or None
        if spread is not None:
            try:
                keys.segment(spread, what="spread label")
            except ValueError as exc:
                raise RecordError(f"{where}: {exc}") from None
        return cls(
            namespace=namespace,
            name=name,
            image=image,
            digest=digest,
            replicas=_int(value, "replicas", where),
            cpu_millicores=_int(value, "cpu_millicores", where),
            memory_bytes=_int(value, "memory_bytes", where),
            labels=_str_map(value, "labels", where),
            constraints=_constraints(value.get("constraints"), where),
            args=list(args),
            env=_str_map(value, "env", where),
            spread=spread,
            generation=_int(value, "generation", where, minimum=1) if "generation" in value else 1,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "image": self.image,
            "digest": self.digest,
            "replicas": self.replicas,
            "cpu_millicores": self.cpu_millicores,
            "memory_bytes": self.memory_bytes,
            "labels": self.labels,
            "constraints": list(self.constraints),
            "args": self.args,
            "env": self.env,
            "spread": self.spread,
            "generation": self.generation,
        }

    @property
    def key(self) -> str:
        return keys.deployment(self.namespace, self.name)

    def request(self) -> Request:
        return Request(
            self.namespace,
            self.name,
            self.replicas,
            Resources(self.cpu_millicores, self.memory_bytes),
            tuple(parse_selector(c) for c in self.constraints),
            self.spread,
        )

    def same_spec(self, other: DeploymentSpec) -> bool:
        """Equal but for the generation (a re-deploy of the same spec is no change)."""
        return self.to_json() | {"generation": 0} == other.to_json() | {"generation": 0}


def replica_id(namespace: str, deployment: str, index: int) -> str:
    """The replica's key in an assignment: `<ns>.<deployment>.<index>`."""
    return f"{namespace}.{deployment}.{index}"


class AssignmentEncoder:
    """Assignment values, built from per-deployment fragments (1M replicas: no dict each).

    The value is `{"containers": {<replica id>: {...}}, "epoch": N}`: each
    container object with its keys sorted, the containers in the order given
    (placement's: namespace, deployment, index), so equal placements give
    equal bytes. `body()` is the part before the epoch, which is what decides
    whether a key changed. Namespaces and deployment names are validated path
    segments (letters, digits, '.', '_', '-'), so replica ids need no escaping.
    """

    def __init__(self, specs: Iterable[DeploymentSpec]) -> None:
        self.heads: dict[tuple[str, str], bytes] = {}
        self._prefixes: dict[tuple[str, str], bytes] = {}
        for spec in specs:
            entry = {
                "args": spec.args,
                "cpu_millicores": spec.cpu_millicores,
                "deployment": spec.name,
                "digest": spec.digest,
                "env": spec.env,
                "generation": spec.generation,
                "labels": spec.labels,
                "memory_bytes": spec.memory_bytes,
                "namespace": spec.namespace,
                "replica": 0,  # sorted last: cut off and written per replica
            }
            encoded = encode_json(entry)
            key = (spec.namespace, spec.name)
            self.heads[key] = encoded[: encoded.rindex(b'"replica":')]
            self._prefixes[key] = b'"' + replica_id(spec.namespace, spec.name, 0)[:-1].encode()

    def body(self, replicas: Iterable[ReplicaId]) -> bytes:
        heads, prefixes = self.heads, self._prefixes
        parts = [
            b'%s%d":%s"replica":%d}'
            % (prefixes[(r.namespace, r.name)], r.index, heads[(r.namespace, r.name)], r.index)
            for r in replicas
        ]
        return b'{"containers":{' + b",".join(parts) + b"}"

    @staticmethod
    def value(body: bytes, epoch: int) -> bytes:
        return body + _EPOCH_SEP + str(epoch).encode() + b"}"


def split_assignment(entry: KVEntry) -> tuple[str, bytes, list[Placement]]:
    """A stored assignment: its node, its body (as `AssignmentEncoder.body`) and placements."""
    node = keys.split(entry.key, keys.ASSIGNMENTS)[0]
    try:
        value = entry.json()
        containers = value["containers"]
        placements = [
            Placement(
                ReplicaId(c["namespace"], c["deployment"], int(c["replica"])),
                node,
                Resources(int(c["cpu_millicores"]), int(c["memory_bytes"])),
            )
            for c in containers.values()
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RecordError(f"{entry.key}: not an assignment ({exc})") from None
    body = entry.value.rsplit(_EPOCH_SEP, 1)[0]
    return node, body, placements
