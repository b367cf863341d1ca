"""Typed cgroup errors. Each names the file or directory and the OS's reason.

They are OSErrors (with errno, strerror and filename set), so code that treats
a failed sandbox setup like any other OS failure, such as the worker's start
path, fails closed without knowing about cgroups.
"""

from __future__ import annotations

import errno as errnos
import os


class CgroupError(OSError):
    """A cgroupfs operation failed: `cannot <action> <path>: <reason>`."""

    def __init__(self, action: str, path: str, err: int, reason: str | None = None) -> None:
        super().__init__(err, reason or os.strerror(err), path)
        self.action = action

    @property
    def path(self) -> str:
        return str(self.filename)

    def __str__(self) -> str:
        return f"cannot {self.action} {self.filename}: {self.strerror}"


class NoCgroupFilesystem(CgroupError):
    """No usable cgroup v1 or v2 mount was found."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__("find a cgroup filesystem in", path, errnos.ENODEV, reason)


class ControllerUnavailable(CgroupError):
    """A limit was asked for, but its controller is not available to Nova's subtree."""

    def __init__(self, controller: str, path: str, reason: str) -> None:
        super().__init__(f"use the {controller} controller at", path, errnos.ENODEV, reason)
        self.controller = controller


class CgroupBusy(CgroupError):
    """Processes were still in the cgroup when the deadline passed."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__("remove", path, errnos.EBUSY, reason)
