"""The kernel's fscrypt ioctls (linux/fscrypt.h), for v2 policies with raw keys.

No maintained Python binding exists for these, and the structures are small
and stable UAPI (Linux 5.4+), so they are spelled out here with ctypes.
Keys added with `add_key` live in the filesystem's own keyring (one per
superblock), not in a process keyring: every process on the host that can
reach the mount sees the unlocked files while the key is there.

All calls block and take a file descriptor of any file or directory on the
filesystem (`add_key`, `remove_key`, `key_status`) or of the directory itself
(`set_policy`, `get_policy`). Errors are `OSError` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from dataclasses import dataclass

KEY_SIZE = 64  # FSCRYPT_MAX_KEY_SIZE: AES-256-XTS takes a 512-bit key
KEY_IDENTIFIER_SIZE = 16

_POLICY_V2 = 2
_MODE_AES_256_XTS = 1  # file contents
_MODE_AES_256_CTS = 4  # file names
_POLICY_FLAGS_PAD_32 = 0x03  # pad names to 32 bytes: leaks less about their length
_KEY_SPEC_TYPE_IDENTIFIER = 2
_REMOVAL_FLAG_FILES_BUSY = 0x1

STATUS_ABSENT = 1
STATUS_PRESENT = 2
STATUS_INCOMPLETELY_REMOVED = 3


class _PolicyV2(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint8),
        ("contents_encryption_mode", ctypes.c_uint8),
        ("filenames_encryption_mode", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("log2_data_unit_size", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
        ("master_key_identifier", ctypes.c_uint8 * KEY_IDENTIFIER_SIZE),
    ]


class _PolicyExArg(ctypes.Structure):
    _fields_ = [
        ("policy_size", ctypes.c_uint64),
        ("policy", _PolicyV2),
    ]


class _KeySpecifier(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("u", ctypes.c_uint8 * 32),  # descriptor (8) or identifier (16), zero-padded
    ]


class _AddKeyArg(ctypes.Structure):
    _fields_ = [
        ("key_spec", _KeySpecifier),
        ("raw_size", ctypes.c_uint32),
        ("key_id", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 8),
        ("raw", ctypes.c_uint8 * KEY_SIZE),  # a flexible array in C; one fixed size here
    ]


class _RemoveKeyArg(ctypes.Structure):
    _fields_ = [
        ("key_spec", _KeySpecifier),
        ("removal_status_flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 5),
    ]


class _KeyStatusArg(ctypes.Structure):
    _fields_ = [
        ("key_spec", _KeySpecifier),
        ("reserved", ctypes.c_uint32 * 6),
        ("status", ctypes.c_uint32),
        ("status_flags", ctypes.c_uint32),
        ("user_count", ctypes.c_uint32),
        ("out_reserved", ctypes.c_uint32 * 13),
    ]


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("f") << 8) | nr


_READ, _READ_WRITE = 2, 3
# The kernel encodes SET_ENCRYPTION_POLICY with the v1 struct's size (12) for
# every version; it reads the version byte first. The *_EX ioctl encodes 9.
FS_IOC_SET_ENCRYPTION_POLICY = _ioc(_READ, 19, 12)
FS_IOC_GET_ENCRYPTION_POLICY_EX = _ioc(_READ_WRITE, 22, 9)
FS_IOC_ADD_ENCRYPTION_KEY = _ioc(_READ_WRITE, 23, ctypes.sizeof(_AddKeyArg) - KEY_SIZE)
FS_IOC_REMOVE_ENCRYPTION_KEY = _ioc(_READ_WRITE, 24, ctypes.sizeof(_RemoveKeyArg))
FS_IOC_GET_ENCRYPTION_KEY_STATUS = _ioc(_READ_WRITE, 26, ctypes.sizeof(_KeyStatusArg))


@dataclass(frozen=True, slots=True)
class RemoveResult:
    files_busy: bool  # open files kept some unlocked inodes; the key is only partly gone


def _identifier_spec(identifier: bytes) -> _KeySpecifier:
    if len(identifier) != KEY_IDENTIFIER_SIZE:
        raise ValueError(f"a key identifier has {KEY_IDENTIFIER_SIZE} bytes, not {len(identifier)}")
    spec = _KeySpecifier(type=_KEY_SPEC_TYPE_IDENTIFIER)
    ctypes.memmove(spec.u, identifier, KEY_IDENTIFIER_SIZE)
    return spec


def add_key(fd: int, raw_key: bytes) -> bytes:
    """Add a raw key to the filesystem's keyring; returns its identifier.

    The identifier is the kernel's HKDF-SHA512 of the key: the same key gives
    the same identifier on every filesystem. Adding a key already there is
    harmless (the kernel counts it once per user).
    """
    if len(raw_key) != KEY_SIZE:
        raise ValueError(f"an fscrypt key has {KEY_SIZE} bytes, not {len(raw_key)}")
    arg = _AddKeyArg(key_spec=_KeySpecifier(type=_KEY_SPEC_TYPE_IDENTIFIER), raw_size=KEY_SIZE)
    ctypes.memmove(arg.raw, raw_key, KEY_SIZE)
    try:
        fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg)
        return bytes(arg.key_spec.u[:KEY_IDENTIFIER_SIZE])
    finally:
        ctypes.memset(arg.raw, 0, KEY_SIZE)  # do not leave key bytes in this buffer


def remove_key(fd: int, identifier: bytes) -> RemoveResult:
    """Remove a key from the filesystem's keyring.

    The kernel then evicts the unlocked inodes and their cached plaintext;
    files still open keep theirs until closed (`files_busy`). A key that is
    not there raises ENOKEY.
    """
    arg = _RemoveKeyArg(key_spec=_identifier_spec(identifier))
    fcntl.ioctl(fd, FS_IOC_REMOVE_ENCRYPTION_KEY, arg)
    return RemoveResult(files_busy=bool(arg.removal_status_flags & _REMOVAL_FLAG_FILES_BUSY))


def key_status(fd: int, identifier: bytes) -> int:
    """STATUS_ABSENT, STATUS_PRESENT or STATUS_INCOMPLETELY_REMOVED."""
    arg = _KeyStatusArg(key_spec=_identifier_spec(identifier))
    fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_KEY_STATUS, arg)
    return int(arg.status)


def set_policy(dir_fd: int, identifier: bytes) -> None:
    """Encrypt an empty directory (and all it will hold) under the key `identifier`.

    AES-256-XTS for contents, AES-256-CTS for names, names padded to 32
    bytes. The key must be in the filesystem's keyring. A directory that has
    this policy already is fine; one with another policy raises EEXIST, a
    non-empty one ENOTEMPTY.
    """
    policy = _PolicyV2(
        version=_POLICY_V2,
        contents_encryption_mode=_MODE_AES_256_XTS,
        filenames_encryption_mode=_MODE_AES_256_CTS,
        flags=_POLICY_FLAGS_PAD_32,
    )
    ctypes.memmove(policy.master_key_identifier, _identifier_spec(identifier).u, 16)
    fcntl.ioctl(dir_fd, FS_IOC_SET_ENCRYPTION_POLICY, policy)


def get_policy_identifier(fd: int) -> bytes | None:
    """The key identifier of a v2-encrypted file or directory; None if unencrypted."""
    arg = _PolicyExArg(policy_size=ctypes.sizeof(_PolicyV2))
    try:
        fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_POLICY_EX, arg)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise
    if arg.policy.version != _POLICY_V2:
        raise OSError(errno.EINVAL, f"not a v2 fscrypt policy (version {arg.policy.version})")
    return bytes(arg.policy.master_key_identifier)


def open_dir(path: str) -> int:
    """An O_RDONLY|O_DIRECTORY descriptor, for the calls above."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
