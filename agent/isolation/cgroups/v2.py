"""cgroup v2: one unified hierarchy; controllers are enabled per subtree.

Nova enables cpu, memory and pids in `cgroup.subtree_control` of its own root
and of `containers/`, never in a cgroup above its root: if the parent does
not pass a controller down, limits that need it fail with
ControllerUnavailable saying where to enable it.
"""

from __future__ import annotations

import errno
import os

from agent.isolation.cgroups import fs
from agent.isolation.cgroups.base import (
    CONTAINERS_DIR,
    DESTROY_TIMEOUT_S,
    LIMIT_CONTROLLERS,
    Cgroups,
    Container,
    Limits,
    Usage,
    proc_cgroup,
)
from agent.isolation.cgroups.errors import CgroupError, ControllerUnavailable
from agent.isolation.cgroups.parse import (
    CPU_PERIOD_US,
    cpu_quota,
    format_cpu_max,
    millicores_of,
    parse_cpu_max,
    parse_keyed,
    parse_limit,
    working_set,
)


class CgroupsV2(Cgroups):
    """Nova's subtree in the cgroup2 hierarchy mounted at `mount`."""

    version = 2

    def __init__(self, mount: str, root_name: str = "nova") -> None:
        super().__init__(root_name)
        self.mount = mount
        self.root = os.path.join(mount, self.root_name)
        self.containers = os.path.join(self.root, CONTAINERS_DIR)
        self._available: frozenset[str] | None = None
        self.has_swap = False
        self.has_oom_group = False
        self.peaks: dict[str, int] = {}  # tracked memory peaks, for kernels without memory.peak

    @property
    def root_paths(self) -> tuple[str, ...]:
        return (self.root,)

    def available(self) -> frozenset[str]:
        if self._available is None:
            self.setup()
        assert self._available is not None
        return self._available

    def setup(self) -> None:
        parent = os.path.dirname(self.root)
        if not fs.exists(parent):
            raise CgroupError("make Nova's root in", parent, errno.ENOENT)
        fs.mkdir(self.root)
        offered = set(fs.read(os.path.join(self.root, "cgroup.controllers")).split())
        enable = [c for c in LIMIT_CONTROLLERS if c in offered]
        _enable(self.root, enable)
        fs.mkdir(self.containers)
        _enable(self.containers, enable)
        self.has_swap = os.path.exists(os.path.join(self.containers, "memory.swap.max"))
        self.has_oom_group = os.path.exists(os.path.join(self.containers, "memory.oom.group"))
        self._available = frozenset(enable)

    def _forget_setup(self) -> None:
        self._available = None

    def container(self, container_id: str) -> ContainerV2:
        return ContainerV2(self, container_id)

    def unavailable(self, controller: str, path: str) -> ControllerUnavailable:
        parent = os.path.dirname(self.root)
        offered = (fs.read_optional(os.path.join(parent, "cgroup.controllers")) or "").split()
        if controller in offered:
            reason = (
                f"{parent} does not pass it down: add it to {parent}/cgroup.subtree_control "
                "(Nova never writes above its root; under systemd, set Delegate=yes)"
            )
        else:
            reason = (
                f"the cgroup2 hierarchy at {self.mount} does not offer it (on a hybrid "
                "host it is bound to a cgroup v1 hierarchy)"
            )
        return ControllerUnavailable(controller, path, reason)


def _enable(path: str, controllers: list[str]) -> None:
    current = set(fs.read(os.path.join(path, "cgroup.subtree_control")).split())
    missing = [c for c in controllers if c not in current]
    if missing:
        fs.write(os.path.join(path, "cgroup.subtree_control"), " ".join(f"+{c}" for c in missing))


class ContainerV2(Container):
    def __init__(self, cgroups: CgroupsV2, container_id: str) -> None:
        super().__init__(container_id)
        self._cg = cgroups
        self.path = os.path.join(cgroups.containers, self.id)

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _check(self, limits: Limits) -> None:
        available = self._cg.available()
        for controller in limits.wanted():
            if controller not in available:
                raise self._cg.unavailable(controller, self.path)

    def create(self, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        self._check(limits)  # sets Nova's root up on first use
        made = fs.mkdir(self.path)
        try:
            if self._cg.has_oom_group:  # an OOM kill takes the whole container
                fs.write(self._file("memory.oom.group"), "1")
            self.set_limits(limits)
        except CgroupError:
            if made:
                self.destroy()
            raise

    def set_limits(self, limits: Limits) -> None:
        self._check(limits)
        available = self._cg.available()
        if "memory" in available:
            memory = limits.memory_bytes
            fs.write(self._file("memory.max"), "max" if memory is None else str(memory))
            if self._cg.has_swap:
                fs.write(self._file("memory.swap.max"), "max" if memory is None else "0")
        if "cpu" in available:
            if limits.cpu_millicores is None:
                fs.write(self._file("cpu.max"), format_cpu_max(None, CPU_PERIOD_US))
            else:
                fs.write(self._file("cpu.max"), format_cpu_max(*cpu_quota(limits.cpu_millicores)))
        if "pids" in available:
            pids = limits.pids_max
            fs.write(self._file("pids.max"), "max" if pids is None else str(pids))

    def read_limits(self) -> Limits:
        available = self._cg.available()
        memory = cpu = pids = None
        if "memory" in available:
            memory = parse_limit(fs.read(self._file("memory.max")))
        if "cpu" in available:
            cpu = millicores_of(*parse_cpu_max(fs.read(self._file("cpu.max"))))
        if "pids" in available:
            pids = parse_limit(fs.read(self._file("pids.max")))
        return Limits(memory_bytes=memory, cpu_millicores=cpu, pids_max=pids)

    def attach(self, pid: int) -> None:
        fs.write(self._file("cgroup.procs"), str(pid))

    def contains(self, pid: int = 0) -> bool:
        return proc_cgroup(pid).get("") == f"/{self._cg.root_name}/{CONTAINERS_DIR}/{self.id}"

    def pids(self) -> list[int]:
        return sorted({pid for path in fs.subtree(self.path) for pid in fs.procs(path)})

    def usage(self) -> Usage:
        available = self._cg.available()
        cpu_stat = parse_keyed(fs.read(self._file("cpu.stat")))  # a core file: always there
        throttled = cpu_stat.get("throttled_usec")
        memory = peak = working = ooms = pids = None
        if "memory" in available:
            memory = int(fs.read(self._file("memory.current")))
            kernel_peak = fs.read_optional(self._file("memory.peak"))  # Linux 5.19+
            if kernel_peak is not None:
                peak = int(kernel_peak)
            else:
                peak = max(self._cg.peaks.get(self.id, 0), memory)
                self._cg.peaks[self.id] = peak
            working = working_set(memory, parse_keyed(fs.read(self._file("memory.stat"))), v1=False)
            ooms = parse_keyed(fs.read(self._file("memory.events"))).get("oom_kill", 0)
        if "pids" in available:
            pids = int(fs.read(self._file("pids.current")))
        return Usage(
            cpu_seconds=cpu_stat["usage_usec"] / 1e6 if "usage_usec" in cpu_stat else None,
            cpu_throttled_seconds=None if throttled is None else throttled / 1e6,
            memory_bytes=memory,
            memory_peak_bytes=peak,
            memory_working_set_bytes=working,
            oom_kills=ooms,
            pids=pids,
        )

    def exists(self) -> bool:
        return fs.exists(self.path)

    def destroy(self, timeout_s: float = DESTROY_TIMEOUT_S) -> None:
        fs.remove_trees([self.path], kill_file=True, timeout_s=timeout_s)
        self._cg.peaks.pop(self.id, None)
