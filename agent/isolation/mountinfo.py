"""Reading /proc/self/mountinfo (proc(5)): shared by the cgroup detection and volumes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True, slots=True)
class MountEntry:
    mount_point: str
    root: str  # the directory of the filesystem this mount shows
    fstype: str
    source: str
    super_options: frozenset[str]


def unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse(text: str) -> list[MountEntry]:
    """Every well-formed line of mountinfo text, in order."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, fs_fields = left.split(), right.split()
        if not sep or len(fields) < 5 or len(fs_fields) < 3:
            continue
        entries.append(
            MountEntry(
                mount_point=unescape(fields[4]),
                root=unescape(fields[3]),
                fstype=fs_fields[0],
                source=unescape(fs_fields[1]),
                super_options=frozenset(fs_fields[2].split(",")),
            )
        )
    return entries


def read() -> list[MountEntry]:
    return parse(MOUNTINFO.read_text())
