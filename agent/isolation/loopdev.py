"""Loop devices and mounts: what the kernel reports, and util-linux to change it.

Reading is done from /sys and /proc (cheap, no subprocess); attaching,
detaching, mounting and unmounting go through losetup(8), mount(8) and
umount(8), which handle the races of picking a free loop device. All calls
block; errors are `LoopError` with the tool's own message.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.isolation import mountinfo
from nova.errors import NovaError

SYS_BLOCK = Path("/sys/block")
_DELETED = " (deleted)"


class LoopError(NovaError):
    """A loop device or mount could not be changed."""


@dataclass(frozen=True, slots=True)
class Loop:
    device: str  # /dev/loopN
    backing_file: str  # as the kernel reports it, without the " (deleted)" mark
    backing_deleted: bool  # the file was unlinked while attached


@dataclass(frozen=True, slots=True)
class Mount:
    source: str  # e.g. /dev/loop3
    mount_point: str
    fstype: str


def loops() -> list[Loop]:
    """Every attached loop device with its backing file."""
    found: list[Loop] = []
    for entry in sorted(SYS_BLOCK.glob("loop*")):
        try:
            backing = (entry / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:  # not attached (no loop/ dir), or detached while we read
            continue
        deleted = backing.endswith(_DELETED)
        found.append(
            Loop(
                device=f"/dev/{entry.name}",
                backing_file=backing.removesuffix(_DELETED) if deleted else backing,
                backing_deleted=deleted,
            )
        )
    return found


def mounts() -> list[Mount]:
    return [Mount(e.source, e.mount_point, e.fstype) for e in mountinfo.read()]


def _run(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except FileNotFoundError:
        raise LoopError(f"{argv[0]} not found (Debian: util-linux, mount, e2fsprogs)") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LoopError(f"{' '.join(argv)}: {detail[-1] if detail else f'exit {done.returncode}'}")
    return done.stdout


def attach(image: Path) -> str:
    """Attach `image` to a free loop device; returns /dev/loopN."""
    return _run("losetup", "--find", "--show", str(image)).strip()


def detach(device: str) -> None:
    _run("losetup", "--detach", device)


def mount(device: str, mount_point: Path, options: str = "nodev,nosuid,noexec") -> None:
    _run("mount", "-t", "ext4", "-o", options, device, str(mount_point))


def umount(mount_point: Path) -> None:
    _run("umount", str(mount_point))


def mkfs_encrypt(image: Path, label: str) -> None:
    """An ext4 filesystem with the `encrypt` feature, straight into an image file.

    No reserved blocks (a volume is all payload) and lazy inode-table and
    journal init, so a sparse image stays sparse.
    """
    _run(
        "mkfs.ext4", "-q", "-F", "-O", "encrypt", "-m", "0", "-L", label[:16],
        "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(image),
    )  # fmt: skip
