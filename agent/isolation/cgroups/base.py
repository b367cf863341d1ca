"""The cgroup interface Nova's isolation uses, and the values it speaks in.

Two backends implement it: `v2.CgroupsV2` (the unified hierarchy, the default
on current distros) and `v1.CgroupsV1` (one hierarchy per controller).
`Cgroups.detect()` picks the one this host's kernel offers.

Layout, identical in every hierarchy the backend uses:

    <mount>/<root_name>/                  Nova's root (default `nova`)
    <mount>/<root_name>/containers/<id>   one cgroup per container (a leaf)

Nova creates, changes and removes only cgroups below (and including)
`<root_name>`'s last path component; it never writes anywhere else.

The calls are blocking file operations (microseconds, except `destroy`, which
waits for killed processes to go): call them from a thread in async code.
"""

from __future__ import annotations

import abc
import os
import re
from dataclasses import dataclass
from typing import ClassVar

from agent.isolation.cgroups import fs
from agent.isolation.cgroups.errors import CgroupBusy
from agent.isolation.cgroups.parse import parse_proc_cgroup

LIMIT_CONTROLLERS = ("cpu", "memory", "pids")
CONTAINERS_DIR = "containers"
DESTROY_TIMEOUT_S = 5.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str, what: str = "container id") -> str:
    """A single safe path component: letters, digits, `_.-`, at most 128 characters."""
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"invalid cgroup {what} {name!r}: use letters, digits and _.- only")
    return name


def check_root_name(root_name: str) -> str:
    """A relative path of safe components, e.g. `nova` or `system.slice/nova.service/c`."""
    for part in root_name.split("/"):
        check_name(part, "root name")
    return root_name


@dataclass(frozen=True, slots=True)
class Limits:
    """A container's resource limits; None means unlimited.

    memory_bytes is a hard limit on RAM with no swap behind it; cpu_millicores
    is a CFS quota in thousandths of a core (500 = half a core, 2000 = two
    cores); pids_max caps processes and threads together.
    """

    memory_bytes: int | None = None
    cpu_millicores: int | None = None
    pids_max: int | None = None

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "cpu_millicores", "pids_max"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")

    def wanted(self) -> list[str]:
        """The controllers these limits need."""
        wanted = []
        if self.cpu_millicores is not None:
            wanted.append("cpu")
        if self.memory_bytes is not None:
            wanted.append("memory")
        if self.pids_max is not None:
            wanted.append("pids")
        return wanted


@dataclass(frozen=True, slots=True)
class Usage:
    """What a container has used. A field is None where its controller is absent.

    memory_peak_bytes comes from the kernel (v1 max_usage_in_bytes, v2
    memory.peak); on v2 kernels before 5.19 it is the highest value Nova saw.
    oom_kills counts processes the kernel's OOM killer killed in the cgroup.
    """

    cpu_seconds: float | None = None
    cpu_throttled_seconds: float | None = None
    memory_bytes: int | None = None
    memory_peak_bytes: int | None = None
    memory_working_set_bytes: int | None = None
    oom_kills: int | None = None
    pids: int | None = None


class Container(abc.ABC):
    """One container's cgroup, in every hierarchy the backend uses.

    A handle: making one does no I/O, and handles for the same id are
    interchangeable. Errors are CgroupError (an OSError) naming the file.
    """

    def __init__(self, container_id: str) -> None:
        self.id = check_name(container_id)

    @property
    @abc.abstractmethod
    def paths(self) -> tuple[str, ...]:
        """The container's directory in each hierarchy."""

    @abc.abstractmethod
    def create(self, limits: Limits | None = None) -> None:
        """Make the cgroup (and Nova's root if needed) and apply `limits`.

        Idempotent: an existing cgroup is kept and re-limited. Raises
        ControllerUnavailable before making anything if a limit needs a
        controller this host does not give Nova.
        """

    @abc.abstractmethod
    def set_limits(self, limits: Limits) -> None:
        """Apply all three limits at once; a None limit is set to unlimited."""

    @abc.abstractmethod
    def read_limits(self) -> Limits:
        """The limits as the kernel reports them (memory rounded to pages)."""

    @abc.abstractmethod
    def attach(self, pid: int) -> None:
        """Move process `pid` with all its threads in; 0 moves the caller.

        Memory the process already used stays charged where it was: attach
        before the work starts (a worker attaches before guest code runs).
        """

    @abc.abstractmethod
    def contains(self, pid: int = 0) -> bool:
        """Whether the kernel reports process `pid` (0: the caller) in this cgroup.

        Reads /proc/PID/cgroup: tens of microseconds, where a move costs
        hundreds. False when unsure; never True for a process outside.
        """

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """The processes in the cgroup, sorted; empty if it does not exist."""

    @abc.abstractmethod
    def usage(self) -> Usage:
        """Read usage back: CPU seconds, memory current/peak, OOM kills, pids."""

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether the cgroup exists (in every hierarchy)."""

    @abc.abstractmethod
    def destroy(self, timeout_s: float = DESTROY_TIMEOUT_S) -> None:
        """SIGKILL everything in the cgroup, wait until it is empty, remove it.

        Idempotent: a cgroup that is gone (ENOENT) is success. Raises
        CgroupBusy if processes are still there after `timeout_s`.
        """


def proc_cgroup(pid: int) -> dict[str, str]:
    """The cgroups of process `pid` (0: the caller), as parse_proc_cgroup gives them."""
    path = f"/proc/{pid or 'self'}/cgroup"
    text = fs.read_optional(path)
    return parse_proc_cgroup(text) if text is not None else {}


class Cgroups(abc.ABC):
    """Nova's subtree in this host's cgroup hierarchies (v2 or v1)."""

    version: ClassVar[int]

    def __init__(self, root_name: str) -> None:
        self.root_name = check_root_name(root_name)

    @classmethod
    def detect(cls, root_name: str = "nova", *, mountinfo: str | None = None) -> Cgroups:
        """The backend this host offers, from /proc/self/mountinfo (or `mountinfo` text).

        v1 if any of cpu, memory, pids is bound to a v1 hierarchy (a controller
        lives on one hierarchy only), else v2. Raises NoCgroupFilesystem.
        """
        from agent.isolation.cgroups.detect import detect

        return detect(root_name, mountinfo=mountinfo)

    @property
    @abc.abstractmethod
    def root_paths(self) -> tuple[str, ...]:
        """Nova's root cgroup in each hierarchy."""

    @abc.abstractmethod
    def available(self) -> frozenset[str]:
        """Which of cpu, memory, pids Nova can limit (v1 adds cpuacct for usage)."""

    @abc.abstractmethod
    def setup(self) -> None:
        """Make Nova's root and `containers/` (v2: and enable the controllers in
        them). Idempotent; `Container.create` calls it when needed."""

    @abc.abstractmethod
    def container(self, container_id: str) -> Container:
        """A handle for the container's cgroup (no I/O)."""

    def create(self, container_id: str, limits: Limits | None = None) -> Container:
        """Make (or re-limit) a container's cgroup; see Container.create."""
        container = self.container(container_id)
        container.create(limits)
        return container

    def list_owned(self) -> list[str]:
        """Ids of the container cgroups under Nova's root, in any hierarchy, sorted.

        After a crash, compare them with the containers the agent knows and
        destroy the rest: Nova's root holds nothing but what Nova made.
        """
        found: set[str] = set()
        for root in self.root_paths:
            found.update(fs.children(os.path.join(root, CONTAINERS_DIR)))
        return sorted(found)

    def teardown(self, timeout_s: float = DESTROY_TIMEOUT_S) -> None:
        """Destroy every owned container and remove Nova's root (uninstall, tests).

        Idempotent. Raises CgroupBusy if something is still inside, for example
        a cgroup made under the root by someone else.
        """
        for container_id in self.list_owned():
            self.container(container_id).destroy(timeout_s)
        for root in self.root_paths:
            for path in (os.path.join(root, CONTAINERS_DIR), root):
                if not fs.rmdir(path):
                    raise CgroupBusy(path, "it still has child cgroups Nova did not make")
        self._forget_setup()

    @abc.abstractmethod
    def _forget_setup(self) -> None:
        """Reset what `setup()` cached (after `teardown` removed the root)."""
