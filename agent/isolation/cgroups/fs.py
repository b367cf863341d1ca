"""cgroupfs I/O: one syscall per read or write, OS errors mapped to CgroupError.

Every function here is idempotent where the kernel allows it: making a
directory that exists and removing one that is gone both succeed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Iterable

from agent.isolation.cgroups.errors import CgroupBusy, CgroupError
from agent.isolation.cgroups.parse import parse_pids

Sleep = Callable[[float], None]
Clock = Callable[[], float]


def read(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError("read", path, exc.errno or errno.EIO) from exc
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    except OSError as exc:
        raise CgroupError("read", path, exc.errno or errno.EIO) from exc
    finally:
        os.close(fd)


def read_optional(path: str) -> str | None:
    """The file's text, or None when it does not exist (a kernel without that file)."""
    try:
        return read(path)
    except CgroupError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def write(path: str, value: str) -> None:
    """Write `value` in one write(2): cgroup files take one value per write."""
    data = value.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"write {value!r} to", path, exc.errno or errno.EIO) from exc
    try:
        os.write(fd, data)
    except OSError as exc:
        raise CgroupError(f"write {value!r} to", path, exc.errno or errno.EIO) from exc
    finally:
        os.close(fd)


def exists(path: str) -> bool:
    return os.path.isdir(path)


def mkdir(path: str) -> bool:
    """Make a cgroup; True if this call made it, False if it was there already."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    except OSError as exc:
        raise CgroupError("create", path, exc.errno or errno.EIO) from exc
    return True


def rmdir(path: str) -> bool:
    """Remove an empty cgroup; True if it is gone, False if the kernel says busy."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise CgroupError("remove", path, exc.errno or errno.EIO) from exc
    return True


def children(path: str) -> list[str]:
    """Names of the child cgroups of `path` (none if it does not exist)."""
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CgroupError("list", path, exc.errno or errno.EIO) from exc


def subtree(path: str) -> list[str]:
    """`path` and every cgroup below it, deepest first (empty if `path` is gone)."""
    found: list[str] = []
    for name in children(path):
        found.extend(subtree(os.path.join(path, name)))
    if exists(path):
        found.append(path)
    return found


def procs(path: str) -> list[int]:
    """The processes in one cgroup (not its children); none if it is gone."""
    text = read_optional(os.path.join(path, "cgroup.procs"))
    return parse_pids(text) if text is not None else []


def kill_procs(dirs: Iterable[str]) -> int:
    """SIGKILL every process in `dirs`; returns how many were listed.

    Each pid is pinned with a pidfd, then checked against a second listing, so
    a pid that was recycled by an unrelated process in between is never hit.
    """
    dirs = list(dirs)
    listed = {pid for d in dirs for pid in procs(d)}
    if not listed:
        return 0
    pinned: dict[int, int] = {}
    try:
        for pid in listed:
            with contextlib.suppress(ProcessLookupError):
                pinned[pid] = os.pidfd_open(pid)
        still = {pid for d in dirs for pid in procs(d)}
        for pid, fd in pinned.items():
            if pid in still:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        for fd in pinned.values():
            os.close(fd)
    return len(listed)


def remove_trees(
    tops: list[str],
    *,
    kill_file: bool = False,
    timeout_s: float = 5.0,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> None:
    """Kill everything in the cgroups `tops` (and below) and remove them.

    Gone already is success. With `kill_file` (cgroup v2 `cgroup.kill`) the
    kernel kills the whole subtree atomically; the pid-by-pid SIGKILL loop
    then only mops up. Raises CgroupBusy if processes outlive `timeout_s`.
    """
    deadline = clock() + timeout_s
    if kill_file:
        for top in tops:
            try:
                write(os.path.join(top, "cgroup.kill"), "1")
            except CgroupError as exc:
                if exc.errno != errno.ENOENT:  # gone, or a kernel before 5.14
                    raise
    delay = 0.001
    while True:
        dirs = [d for top in tops for d in subtree(top)]
        if not dirs:
            return
        left = kill_procs(dirs)
        if not left and all(rmdir(d) for d in dirs):
            return
        if clock() >= deadline:
            reason = (
                f"{left} process(es) still in it {timeout_s:g}s after SIGKILL"
                if left
                else f"the kernel still reports it busy after {timeout_s:g}s"
            )
            raise CgroupBusy(dirs[-1], reason)
        sleep(delay)
        delay = min(delay * 2, 0.05)
