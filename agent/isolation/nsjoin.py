"""setns(2) for a freshly forked worker (Python 3.11 has no os.setns).

Only ever called in a child between fork() and its first guest code: the
agent's own event-loop process never changes namespace.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def join_netns(fd: int) -> None:
    """Move the calling (single-threaded) process into the network namespace `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")
