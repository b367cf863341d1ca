"""The agent's record of each container, as persisted in the store.

One JSON document per container under `nova/v1/containers/<node>/<id>`; it
is what lets a restarted agent find the containers it started.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from agent.sandbox.spec import ExitStatus, RunSpec

RUNNING = "running"
EXITED = "exited"


@dataclass(slots=True)
class ContainerRecord:
    id: str
    name: str
    node: str
    spec: RunSpec
    state: str = RUNNING
    pid: int = 0
    pid_start_ticks: int = 0  # /proc/<pid>/stat starttime: tells a reused pid apart
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    startup_us: float | None = None
    status: ExitStatus | None = None
    network: dict[str, Any] | None = None  # NetAttachment.to_json() while it has a netns

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["spec"] = self.spec.to_json()
        data["status"] = self.status.to_json() if self.status else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerRecord:
        status = data.get("status")
        return cls(
            id=data["id"],
            name=data["name"],
            node=data["node"],
            spec=RunSpec.from_json(data["spec"]),
            state=data.get("state", RUNNING),
            pid=int(data.get("pid", 0)),
            pid_start_ticks=int(data.get("pid_start_ticks", 0)),
            created_at=float(data.get("created_at", 0.0)),
            finished_at=data.get("finished_at"),
            startup_us=data.get("startup_us"),
            status=ExitStatus.from_json(status) if status else None,
            network=data.get("network"),
        )

    def summary(self) -> dict[str, Any]:
        """What `nova ps` shows and the API returns."""
        return {
            "id": self.id,
            "name": self.name,
            "module": self.spec.module_path,
            "digest": self.spec.digest,
            "state": self.state,
            "pid": self.pid,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "startup_us": self.startup_us,
            "http_port": self.spec.http_port,
            "isolation": self.spec.isolation.value,
            "namespace": self.spec.namespace,
            "labels": dict(self.spec.labels),
            "ip": (self.network or {}).get("ip"),
            "network": self.network,
            "limits": {
                "memory_bytes": self.spec.memory_bytes,
                "cpu_millicores": self.spec.cpu_millicores,
                "pids_max": self.spec.pids_max,
            },
            "status": self.status.to_json() if self.status else None,
            "describe": self.status.describe() if self.status else "running",
        }


def pid_start_ticks(pid: int) -> int:
    """The process's start time in clock ticks since boot, 0 if it is gone.

    A zombie is gone too: it has exited, only its parent has not reaped it yet
    (a daemonless worker whose `nova run` was killed waits for init to reap it).
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            stat = handle.read()
    except OSError:
        return 0
    # The command name (field 2) may contain spaces; fields resume after ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return 0
    return int(fields[19])
