"""What a container run needs (`RunSpec`) and how it ended (`ExitStatus`).

Both travel as JSON: CLI -> agent API -> worker process, and back.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from nova import errors


def _split_mount(text: str, flag: str, example: str) -> tuple[str, str, bool]:
    """`SOURCE[:GUEST][:ro|rw]` -> (source, guest, read_only); GUEST defaults to SOURCE."""
    parts = text.split(":")
    read_only = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        read_only = parts.pop() == "ro"
    if len(parts) == 1:
        parts.append(parts[0])
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise errors.UsageError(f"invalid {flag} {text!r}: expected {example}")
    return parts[0], parts[1], read_only


DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, slots=True)
class DirMount:
    """A host directory preopened for the guest (`--dir HOST:GUEST[:ro]`)."""

    host: str
    guest: str
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> DirMount:
        host, guest, read_only = _split_mount(
            text, "--dir", "HOST[:GUEST][:ro], e.g. ./data:/data:ro"
        )
        return cls(host=host, guest=guest, read_only=read_only)


@dataclass(frozen=True, slots=True)
class VolumeMount:
    """A Nova volume preopened for the guest (`--volume NAME:GUEST[:ro]`).

    `name` is the volume's name in the container's namespace (`NS/NAME` is
    accepted for that same namespace only). `host` is empty as the user asks;
    the agent fills in the volume's directory before the spec reaches a worker.
    """

    name: str
    guest: str
    read_only: bool = False
    host: str = ""

    @classmethod
    def parse(cls, text: str) -> VolumeMount:
        name, guest, read_only = _split_mount(text, "--volume", "NAME:GUEST[:ro], e.g. data:/data")
        if guest == name:
            raise errors.UsageError(
                f"invalid --volume {text!r}: expected NAME:GUEST[:ro], e.g. {name}:/data"
            )
        return cls(name=name, guest=guest, read_only=read_only)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "guest": self.guest,
            "read_only": self.read_only,
            "host": self.host,
        }


class Isolation(enum.StrEnum):
    """Host isolation of a container, beyond the wasm sandbox itself.

    Users ask for `auto` or `none`; the runtime resolves `auto` before the
    spec reaches a worker, so a worker only sees `cgroup` or `none`.
    """

    AUTO = "auto"  # asked: a cgroup of its own when the host allows it (root, cgroups mounted)
    NONE = "none"  # no cgroup limits: only the wasm limits hold (unsafe on a shared host)
    CGROUP = "cgroup"  # resolved: the container's own cgroup (memory, CPU, pids limits)

    @classmethod
    def parse(cls, text: str, *, what: str = "isolation") -> Isolation:
        """What users may ask for: `auto` or `none` (UsageError otherwise)."""
        if text not in (cls.AUTO, cls.NONE):
            raise errors.UsageError(f"invalid {what} {text!r}: expected auto or none")
        return cls(text)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Everything a worker needs to run one container.

    `digest` is the sha256 of the module's bytes; `artifact` is the path of its
    verified compiled artifact in the module cache. `memory_bytes` caps the
    linear memory (wasm); `cpu_millicores` and `pids_max` are cgroup limits,
    enforced only when `isolation` is `cgroup`.
    """

    id: str
    name: str
    digest: str
    artifact: str
    module_path: str = ""
    argv: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    dirs: tuple[DirMount, ...] = ()
    memory_bytes: int | None = None
    timeout_s: float | None = None
    run_dir: str | None = None  # where the worker writes result.json (agent mode)
    http_port: int | None = None  # serve HTTP (WAGI) on this port instead of running once
    http_host: str = "127.0.0.1"
    cpu_millicores: int | None = None  # CFS quota: 500 = half a core
    pids_max: int | None = None  # processes + threads of the worker; None: the default cap
    isolation: Isolation = Isolation.AUTO
    namespace: str = DEFAULT_NAMESPACE  # the Nova namespace (tenant) the container belongs to
    volumes: tuple[VolumeMount, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()  # sorted; network policy selects by them

    def preopens(self) -> list[tuple[str, str, bool]]:
        """(host, guest, read_only) of every directory the guest gets: --dir, then volumes."""
        found = [(d.host, d.guest, d.read_only) for d in self.dirs]
        for volume in self.volumes:
            if (
                not volume.host
            ):  # the agent resolves volumes; a worker cannot (OSError: it fails the run)
                raise OSError(f"volume {volume.name!r} was not resolved to a host directory")
            found.append((volume.host, volume.guest, volume.read_only))
        return found

    def to_json(self) -> dict[str, Any]:
        # Field by field: dataclasses.asdict deep-copies and is slow on the start path.
        return {
            "id": self.id,
            "name": self.name,
            "digest": self.digest,
            "artifact": self.artifact,
            "module_path": self.module_path,
            "argv": list(self.argv),
            "env": [list(pair) for pair in self.env],
            "dirs": [
                {"host": d.host, "guest": d.guest, "read_only": d.read_only} for d in self.dirs
            ],
            "memory_bytes": self.memory_bytes,
            "timeout_s": self.timeout_s,
            "run_dir": self.run_dir,
            "http_port": self.http_port,
            "http_host": self.http_host,
            "cpu_millicores": self.cpu_millicores,
            "pids_max": self.pids_max,
            "isolation": self.isolation.value,
            "namespace": self.namespace,
            "volumes": [v.to_json() for v in self.volumes],
            "labels": dict(self.labels),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        return cls(
            id=data["id"],
            name=data["name"],
            digest=data["digest"],
            artifact=data["artifact"],
            module_path=data.get("module_path", ""),
            argv=tuple(data.get("argv", ())),
            env=tuple((k, v) for k, v in data.get("env", ())),
            dirs=tuple(DirMount(**d) for d in data.get("dirs", ())),
            memory_bytes=data.get("memory_bytes"),
            timeout_s=data.get("timeout_s"),
            run_dir=data.get("run_dir"),
            http_port=data.get("http_port"),
            http_host=data.get("http_host", "127.0.0.1"),
            cpu_millicores=data.get("cpu_millicores"),
            pids_max=data.get("pids_max"),
            isolation=Isolation(data.get("isolation", Isolation.NONE)),
            namespace=data.get("namespace", DEFAULT_NAMESPACE),
            volumes=tuple(VolumeMount(**v) for v in data.get("volumes", ())),
            labels=tuple(sorted(data.get("labels", {}).items())),
        )


class ExitReason(enum.StrEnum):
    EXITED = "Exited"  # returned from _start or called proc_exit
    TRAPPED = "Trapped"  # a wasm trap (unreachable, out-of-bounds, ...)
    TIMEOUT = "Timeout"  # ran past its timeout; stopped by epoch interruption or the watchdog
    STOPPED = "Stopped"  # nova stop
    KILLED = "Killed"  # the worker died from a signal Nova did not send
    OOM_KILLED = "OOMKilled"  # the kernel's OOM killer (cgroup memory limit)
    FAILED = "Failed"  # the sandbox could not start the module


_REASON_EXIT_CODES = {
    ExitReason.TRAPPED: errors.EXIT_TRAP,
    ExitReason.TIMEOUT: errors.EXIT_TIMEOUT,
    ExitReason.STOPPED: errors.EXIT_STOPPED,
    ExitReason.KILLED: errors.EXIT_KILLED,
    ExitReason.OOM_KILLED: errors.EXIT_KILLED,
    ExitReason.FAILED: errors.EXIT_CANNOT_RUN,
}


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a container ended. Timestamps are CLOCK_MONOTONIC nanoseconds."""

    reason: ExitReason
    exit_code: int
    message: str = ""
    entry_ns: int = 0  # just before the module's _start was entered
    end_ns: int = 0
    memory_bytes: int = 0  # final size of the linear memory
    memory_limit_hit: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_reason(cls, reason: ExitReason, message: str = "", **kw: Any) -> ExitStatus:
        return cls(
            reason=reason, exit_code=_REASON_EXIT_CODES.get(reason, 1), message=message, **kw
        )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["reason"] = self.reason.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExitStatus:
        return cls(
            reason=ExitReason(data["reason"]),
            exit_code=int(data["exit_code"]),
            message=data.get("message", ""),
            entry_ns=int(data.get("entry_ns", 0)),
            end_ns=int(data.get("end_ns", 0)),
            memory_bytes=int(data.get("memory_bytes", 0)),
            memory_limit_hit=bool(data.get("memory_limit_hit", False)),
            extra=dict(data.get("extra", {})),
        )

    def describe(self) -> str:
        """One line for users, e.g. 'trapped: wasm trap: unreachable'."""
        if self.reason is ExitReason.EXITED:
            text = f"exited with code {self.exit_code}"
        else:
            text = self.reason.value.lower()
        if self.message:
            text += f": {self.message}"
        if self.memory_limit_hit:
            text += " (the container reached its memory limit)"
        return text
