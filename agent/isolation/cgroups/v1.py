"""cgroup v1: one hierarchy per controller (or per group of co-mounted controllers).

Nova's tree is made in each hierarchy that holds one of cpu, cpuacct, memory
or pids; a container's processes are attached in all of them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping

from agent.isolation.cgroups import fs
from agent.isolation.cgroups.base import (
    CONTAINERS_DIR,
    DESTROY_TIMEOUT_S,
    Cgroups,
    Container,
    Limits,
    Usage,
    proc_cgroup,
)
from agent.isolation.cgroups.errors import CgroupError, ControllerUnavailable, NoCgroupFilesystem
from agent.isolation.cgroups.parse import (
    cpu_quota,
    millicores_of,
    parse_keyed,
    parse_limit,
    parse_v1_memory_limit,
    working_set,
)

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
UNLIMITED = "-1"


class CgroupsV1(Cgroups):
    """Nova's subtree in the v1 hierarchies given as {controller: mount point}."""

    version = 1

    def __init__(self, mounts: Mapping[str, str], root_name: str = "nova") -> None:
        super().__init__(root_name)
        self.mounts = {c: m for c, m in mounts.items() if c in V1_CONTROLLERS}
        if not self.mounts:
            raise NoCgroupFilesystem(
                "/proc/self/mountinfo", "no v1 hierarchy holds cpu, cpuacct, memory or pids"
            )
        hierarchies = dict.fromkeys(self.mounts[c] for c in V1_CONTROLLERS if c in self.mounts)
        self._roots = tuple(os.path.join(m, self.root_name) for m in hierarchies)
        self._ready = False
        self._memsw: bool | None = None

    @property
    def has_memsw(self) -> bool:
        """Whether the kernel accounts swap (memory.memsw.*), so it can be forbidden."""
        if self._memsw is None:
            memory = self.mounts.get("memory")
            self._memsw = memory is not None and os.path.exists(
                os.path.join(memory, "memory.memsw.limit_in_bytes")
            )
        return self._memsw

    @property
    def root_paths(self) -> tuple[str, ...]:
        return self._roots

    def available(self) -> frozenset[str]:
        return frozenset(self.mounts)

    def setup(self) -> None:
        for root in self._roots:
            parent = os.path.dirname(root)
            if not fs.exists(parent):
                raise CgroupError("make Nova's root in", parent, errno.ENOENT)
            fs.mkdir(root)
            fs.mkdir(os.path.join(root, CONTAINERS_DIR))
        self._ready = True

    def ensure_setup(self) -> None:
        """`setup()` once per instance (and again after `teardown`)."""
        if not self._ready:
            self.setup()

    def _forget_setup(self) -> None:
        self._ready = False

    def container(self, container_id: str) -> ContainerV1:
        return ContainerV1(self, container_id)

    def unavailable(self, controller: str, path: str) -> ControllerUnavailable:
        return ControllerUnavailable(
            controller,
            path,
            f"this host has no cgroup v1 hierarchy with the {controller} controller "
            "(none in /proc/self/mountinfo)",
        )


class ContainerV1(Container):
    def __init__(self, cgroups: CgroupsV1, container_id: str) -> None:
        super().__init__(container_id)
        self._cg = cgroups
        self._paths = tuple(
            os.path.join(root, CONTAINERS_DIR, self.id) for root in cgroups.root_paths
        )

    @property
    def paths(self) -> tuple[str, ...]:
        return self._paths

    def _file(self, controller: str, name: str) -> str | None:
        mount = self._cg.mounts.get(controller)
        if mount is None:
            return None
        return os.path.join(mount, self._cg.root_name, CONTAINERS_DIR, self.id, name)

    def create(self, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        self._check(limits)
        self._cg.ensure_setup()
        made = False
        try:
            for path in self._paths:
                made = fs.mkdir(path) or made
            self.set_limits(limits)
        except CgroupError:
            if made:
                self.destroy()
            raise

    def _check(self, limits: Limits) -> None:
        for controller in limits.wanted():
            if controller not in self._cg.mounts:
                raise self._cg.unavailable(controller, self._paths[0])

    def set_limits(self, limits: Limits) -> None:
        self._check(limits)
        if "memory" in self._cg.mounts:
            self._set_memory(limits.memory_bytes)
        if (quota_file := self._file("cpu", "cpu.cfs_quota_us")) is not None:
            if limits.cpu_millicores is None:
                fs.write(quota_file, UNLIMITED)
            else:
                quota, period = cpu_quota(limits.cpu_millicores)
                fs.write(self._must("cpu", "cpu.cfs_period_us"), str(period))
                fs.write(quota_file, str(quota))
        if (pids_file := self._file("pids", "pids.max")) is not None:
            fs.write(pids_file, "max" if limits.pids_max is None else str(limits.pids_max))

    def _set_memory(self, memory_bytes: int | None) -> None:
        limit = self._must("memory", "memory.limit_in_bytes")
        value = UNLIMITED if memory_bytes is None else str(memory_bytes)
        if not self._cg.has_memsw:
            fs.write(limit, value)
            return
        # memory+swap may never be below memory: lift it, set memory, then pin it.
        memsw = self._must("memory", "memory.memsw.limit_in_bytes")
        fs.write(memsw, UNLIMITED)
        fs.write(limit, value)
        if memory_bytes is not None:
            fs.write(memsw, value)

    def _must(self, controller: str, name: str) -> str:
        path = self._file(controller, name)
        if path is None:
            raise self._cg.unavailable(controller, self._paths[0])
        return path

    def read_limits(self) -> Limits:
        memory = cpu = pids = None
        if (path := self._file("memory", "memory.limit_in_bytes")) is not None:
            memory = parse_v1_memory_limit(fs.read(path))
        if (path := self._file("cpu", "cpu.cfs_quota_us")) is not None:
            period = int(fs.read(self._must("cpu", "cpu.cfs_period_us")))
            cpu = millicores_of(int(fs.read(path)), period)
        if (path := self._file("pids", "pids.max")) is not None:
            pids = parse_limit(fs.read(path))
        return Limits(memory_bytes=memory, cpu_millicores=cpu, pids_max=pids)

    def attach(self, pid: int) -> None:
        value = str(pid)
        for path in self._paths:
            fs.write(os.path.join(path, "cgroup.procs"), value)

    def contains(self, pid: int = 0) -> bool:
        where = proc_cgroup(pid)
        relative = f"/{self._cg.root_name}/{CONTAINERS_DIR}/{self.id}"
        return all(where.get(controller) == relative for controller in self._cg.mounts)

    def pids(self) -> list[int]:
        return sorted({pid for top in self._paths for d in fs.subtree(top) for pid in fs.procs(d)})

    def usage(self) -> Usage:
        cpu = throttled = memory = peak = working = ooms = pids = None
        if (path := self._file("cpuacct", "cpuacct.usage")) is not None:
            cpu = int(fs.read(path)) / 1e9
        if (path := self._file("cpu", "cpu.stat")) is not None:
            ns = parse_keyed(fs.read(path)).get("throttled_time")
            throttled = None if ns is None else ns / 1e9
        if (path := self._file("memory", "memory.usage_in_bytes")) is not None:
            memory = int(fs.read(path))
            peak = int(fs.read(self._must("memory", "memory.max_usage_in_bytes")))
            stat = parse_keyed(fs.read(self._must("memory", "memory.stat")))
            working = working_set(memory, stat, v1=True)
            oom = parse_keyed(fs.read(self._must("memory", "memory.oom_control")))
            ooms = oom.get("oom_kill")  # since Linux 4.13
        if (path := self._file("pids", "pids.current")) is not None:
            pids = int(fs.read(path))
        return Usage(
            cpu_seconds=cpu,
            cpu_throttled_seconds=throttled,
            memory_bytes=memory,
            memory_peak_bytes=peak,
            memory_working_set_bytes=working,
            oom_kills=ooms,
            pids=pids,
        )

    def exists(self) -> bool:
        return all(fs.exists(path) for path in self._paths)

    def destroy(self, timeout_s: float = DESTROY_TIMEOUT_S) -> None:
        fs.remove_trees(list(self._paths), kill_file=False, timeout_s=timeout_s)
