"""Per-container cgroups: memory, CPU and pids limits and usage, on cgroup v2 or v1.

    cgroups = Cgroups.detect(root_name="nova")          # v2 or v1, from mountinfo
    box = cgroups.create(container_id, Limits(memory_bytes=64 << 20,
                                              cpu_millicores=500, pids_max=64))
    box.attach(pid)                                      # or 0: the caller
    box.usage()                                          # Usage(cpu_seconds=..., ...)
    box.destroy()                                        # kill, wait, rmdir; idempotent
    cgroups.list_owned()                                 # ids left after a crash

The interface and its guarantees are in `base`; `v1` and `v2` implement it;
`detect` chooses; `hook` joins a cgroup from a worker process.
"""

from agent.isolation.cgroups.base import Cgroups, Container, Limits, Usage
from agent.isolation.cgroups.errors import (
    CgroupBusy,
    CgroupError,
    ControllerUnavailable,
    NoCgroupFilesystem,
)
from agent.isolation.cgroups.hook import limits_for_run, make_prepare_hook
from agent.isolation.cgroups.parse import cpu_quota, parse_millicores
from agent.isolation.cgroups.v1 import CgroupsV1
from agent.isolation.cgroups.v2 import CgroupsV2

__all__ = [
    "CgroupBusy",
    "CgroupError",
    "Cgroups",
    "CgroupsV1",
    "CgroupsV2",
    "Container",
    "ControllerUnavailable",
    "Limits",
    "NoCgroupFilesystem",
    "Usage",
    "cpu_quota",
    "limits_for_run",
    "make_prepare_hook",
    "parse_millicores",
]
