"""Which cgroup layout this host has, from /proc/self/mountinfo.

A controller is bound to exactly one hierarchy: if cpu, memory or pids sits on
a cgroup v1 hierarchy (a v1-only or "hybrid" host), Nova must use v1 for it;
otherwise the unified cgroup2 hierarchy has it. Parsing and choosing are pure
(tested on fake mountinfo text); `detect` reads the file and builds the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.isolation import mountinfo
from agent.isolation.cgroups.base import LIMIT_CONTROLLERS, Cgroups
from agent.isolation.cgroups.errors import NoCgroupFilesystem
from agent.isolation.cgroups.v1 import V1_CONTROLLERS, CgroupsV1
from agent.isolation.cgroups.v2 import CgroupsV2

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True, slots=True)
class CgroupMount:
    """One cgroup or cgroup2 mount (proc(5) mountinfo)."""

    mount_point: str
    root: str  # the directory of the hierarchy this mount shows
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: frozenset[str]  # super options: v1 controllers show up here


@dataclass(frozen=True, slots=True)
class Layout:
    """Where Nova's controllers are: version 2 with one mount, or version 1 per controller."""

    version: int
    v2_mount: str | None = None
    v1_mounts: dict[str, str] = field(default_factory=dict)  # controller -> mount point


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts in mountinfo text, in order."""
    return [
        CgroupMount(
            mount_point=entry.mount_point,
            root=entry.root,
            fstype=entry.fstype,
            options=entry.super_options,
        )
        for entry in mountinfo.parse(text)
        if entry.fstype in ("cgroup", "cgroup2")
    ]


def choose_layout(mounts: list[CgroupMount]) -> Layout:
    """v1 if any limit controller is on a v1 hierarchy, else v2; the first mount wins."""
    v1: dict[str, str] = {}
    v2_mount: str | None = None
    for mount in mounts:
        if mount.fstype == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in mount.options:
                    v1.setdefault(controller, mount.mount_point)
        elif v2_mount is None:
            v2_mount = mount.mount_point
    if any(c in v1 for c in LIMIT_CONTROLLERS):
        return Layout(version=1, v2_mount=v2_mount, v1_mounts=v1)
    if v2_mount is not None:
        return Layout(version=2, v2_mount=v2_mount)
    raise NoCgroupFilesystem(
        MOUNTINFO, "no cgroup2 mount and no v1 hierarchy with cpu, memory or pids"
    )


def detect(root_name: str = "nova", *, mountinfo: str | None = None) -> Cgroups:
    """The backend for this host (or for the given mountinfo text)."""
    if mountinfo is None:
        with open(MOUNTINFO) as f:
            mountinfo = f.read()
    layout = choose_layout(parse_mountinfo(mountinfo))
    if layout.version == 2:
        assert layout.v2_mount is not None
        return CgroupsV2(layout.v2_mount, root_name)
    return CgroupsV1(layout.v1_mounts, root_name)
