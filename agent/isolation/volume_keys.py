"""Per-namespace volume keys, stored wrapped under a node master key.

Layout, under the agent's state directory:

    volumes/master.key        32 random bytes (AES-256), mode 0600: the node master key
    volumes/keys/<ns>.key     the namespace's 64-byte fscrypt key, wrapped:
                              "nova-vk1" || nonce (12) || AES-256-GCM(key) with tag (16)

The wrapping binds each key to its namespace (the namespace name is the
GCM associated data), so a key file copied to another namespace's name does
not unwrap. `KeyWrapper` is the seam where a KMS or Vault integration plugs
in later: `wrap`/`unwrap` would call the KMS instead of using a local master
key, and nothing else changes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.isolation import fscrypt
from nova.errors import NovaError

_MAGIC = b"nova-vk1"
_NONCE_SIZE = 12
_MASTER_KEY_SIZE = 32


class VolumeKeyError(NovaError):
    """A volume key cannot be read, unwrapped or stored."""


class KeyWrapper(Protocol):
    """Encrypts and authenticates key material at rest; `context` is bound to it."""

    def wrap(self, key: bytes, context: bytes) -> bytes: ...

    def unwrap(self, blob: bytes, context: bytes) -> bytes: ...


class LocalMasterKey:
    """AES-256-GCM under a master key kept in a root-only file on this node."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cipher: AESGCM | None = None  # loaded (or made) on first use

    @property
    def _aead(self) -> AESGCM:
        if self._cipher is None:
            self._cipher = AESGCM(self._load_or_create())
        return self._cipher

    def _load_or_create(self) -> bytes:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return self._read()
        try:
            os.write(fd, secrets.token_bytes(_MASTER_KEY_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        return self._read()

    def _read(self) -> bytes:
        stat = self.path.stat()
        if stat.st_mode & 0o077:
            raise VolumeKeyError(
                f"{self.path}: the volume master key is readable by others "
                f"(mode {stat.st_mode & 0o777:o}); expected 0600"
            )
        key = self.path.read_bytes()
        if len(key) != _MASTER_KEY_SIZE:
            raise VolumeKeyError(
                f"{self.path}: a volume master key has {_MASTER_KEY_SIZE} bytes, not {len(key)}"
            )
        return key

    def wrap(self, key: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_SIZE)
        return _MAGIC + nonce + self._aead.encrypt(nonce, key, context)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        if not blob.startswith(_MAGIC):
            raise VolumeKeyError("not a wrapped volume key (unknown format)")
        nonce = blob[len(_MAGIC) : len(_MAGIC) + _NONCE_SIZE]
        try:
            return self._aead.decrypt(nonce, blob[len(_MAGIC) + _NONCE_SIZE :], context)
        except InvalidTag:
            raise VolumeKeyError(
                "the wrapped key does not verify: another master key, another namespace, "
                "or a damaged file"
            ) from None


class NamespaceKeys:
    """The fscrypt key of each namespace: made on first use, read back unwrapped."""

    def __init__(self, keys_dir: Path, wrapper: KeyWrapper) -> None:
        self.keys_dir = keys_dir
        self.wrapper = wrapper

    def path(self, namespace: str) -> Path:
        return self.keys_dir / f"{namespace}.key"

    def get_or_create(self, namespace: str) -> bytes:
        key = self.get(namespace)
        if key is not None:
            return key
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(fscrypt.KEY_SIZE)
        blob = self.wrapper.wrap(key, _context(namespace))
        tmp = self.path(namespace).with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:  # link, not rename: a key another call stored first wins, and is what we use
            os.link(tmp, self.path(namespace))
        except FileExistsError:
            key = None
        finally:
            tmp.unlink()
        _fsync_dir(self.keys_dir)
        return key if key is not None else self._must_get(namespace)

    def get(self, namespace: str) -> bytes | None:
        try:
            blob = self.path(namespace).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return self.wrapper.unwrap(blob, _context(namespace))
        except VolumeKeyError as exc:
            raise VolumeKeyError(f"{self.path(namespace)}: {exc.message}") from None

    def _must_get(self, namespace: str) -> bytes:
        key = self.get(namespace)
        if key is None:
            raise VolumeKeyError(f"{self.path(namespace)}: vanished while being created")
        return key

    def delete(self, namespace: str) -> None:
        """Forget a namespace's key: whatever it encrypted is unreadable for good."""
        with contextlib.suppress(FileNotFoundError):
            self.path(namespace).unlink()
            _fsync_dir(self.keys_dir)

    def namespaces(self) -> list[str]:
        if not self.keys_dir.is_dir():
            return []
        return sorted(p.stem for p in self.keys_dir.glob("*.key"))


def _context(namespace: str) -> bytes:
    return b"nova volume key for namespace " + namespace.encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
