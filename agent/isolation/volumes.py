"""Encrypted per-namespace volumes: ext4 + fscrypt on a loop-mounted image file.

Layout, under the agent's state directory (see docs/isolation.md,
"Encrypted volumes"):

    volumes/master.key                 node master key (volume_keys.py)
    volumes/keys/<ns>.key              the namespace's fscrypt key, wrapped
    volumes/images/<ns>/<name>.img     sparse image: ext4 with the `encrypt` feature
    volumes/mnt/<ns>/<name>/           where the image is mounted (nodev,nosuid,noexec)
    volumes/mnt/<ns>/<name>/data/      the only directory containers see: encrypted
                                       (fscrypt v2 policy) under the namespace's key

The image files are the truth: a volume exists when its image does. On start
(`recover`), the manager converges every image to "attached, mounted, key
added", and removes the loop devices and mounts that it made and no image
claims any more (a crash in the middle of `create` or `remove`). It knows its
own by path: a loop device whose backing file is under `volumes/images/`, a
mount under `volumes/mnt/`. It never touches any other.

All methods block (subprocesses, ioctls): from asyncio, call them in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.isolation import fscrypt, loopdev
from agent.isolation.volume_keys import KeyWrapper, LocalMasterKey, NamespaceKeys
from nova import errors

log = logging.getLogger("nova.agent.isolation.volumes")

DEFAULT_NAMESPACE = "default"
MIN_SIZE = 16 << 20  # ext4 with a journal needs a few MiB of its own
MAX_SIZE = 16 << 40
DATA_DIR = "data"
_IMAGE_SUFFIX = ".img"
_CREATING_SUFFIX = ".img.creating"

# Namespaces and volume names become path components and appear in `nova volume ls`.
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


class VolumeError(errors.NovaError):
    """A volume operation failed; the message names the volume."""


class VolumeNotFound(VolumeError):
    exit_code = errors.EXIT_NOT_FOUND


class VolumeExists(VolumeError):
    pass


class VolumeBusy(VolumeError):
    pass


class VolumeForbidden(VolumeError):
    """A container asked for another namespace's volume."""


def check_name(text: str, what: str) -> str:
    if not _NAME.fullmatch(text):
        raise errors.UsageError(
            f"invalid {what} {text!r}: use 1-63 lowercase letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return text


@dataclass(frozen=True, slots=True)
class Volume:
    namespace: str
    name: str
    size_bytes: int
    image: Path
    mount_point: Path
    loop_device: str | None = None
    mounted: bool = False
    unlocked: bool = False  # the namespace's key is in the filesystem's keyring
    used_bytes: int | None = None

    @property
    def data_path(self) -> Path:
        """The host directory a container's `--volume NAME:/data` preopens."""
        return self.mount_point / DATA_DIR

    @property
    def state(self) -> str:
        if self.mounted and self.unlocked:
            return "ready"
        return "locked" if self.mounted else "detached"

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "size_bytes": self.size_bytes,
            "used_bytes": self.used_bytes,
            "state": self.state,
            "loop_device": self.loop_device,
            "image": str(self.image),
            "path": str(self.data_path),
        }


@dataclass(slots=True)
class Recovery:
    """What `recover` did: volumes opened, and leftovers of ours it removed."""

    opened: list[str] = field(default_factory=list)
    unmounted: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class VolumeManager:
    def __init__(self, state_dir: Path, wrapper: KeyWrapper | None = None) -> None:
        self.root = (state_dir / "volumes").resolve()
        self.images_dir = self.root / "images"
        self.mnt_dir = self.root / "mnt"
        for path in (self.root, self.images_dir, self.mnt_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keys = NamespaceKeys(
            self.root / "keys", wrapper or LocalMasterKey(self.root / "master.key")
        )
        self._lock = threading.RLock()
        self._identifiers: dict[str, bytes] = {}  # namespace -> fscrypt key identifier

    # -- paths ------------------------------------------------------------

    def image_path(self, namespace: str, name: str) -> Path:
        return self.images_dir / namespace / f"{name}{_IMAGE_SUFFIX}"

    def mount_point(self, namespace: str, name: str) -> Path:
        return self.mnt_dir / namespace / name

    def _is_ours(self, path: str) -> bool:
        return _under(path, self.root)

    # -- public operations --------------------------------------------------

    def create(self, namespace: str, name: str, size_bytes: int) -> Volume:
        check_name(namespace, "namespace")
        check_name(name, "volume name")
        if not MIN_SIZE <= size_bytes <= MAX_SIZE:
            raise errors.UsageError(
                f"invalid size {size_bytes} for volume {namespace}/{name}: expected 16Mi to 16Ti"
            )
        with self._lock:
            image = self.image_path(namespace, name)
            if image.exists():
                raise VolumeExists(f"volume {name!r} already exists in namespace {namespace!r}")
            key = self.keys.get_or_create(namespace)
            image.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            creating = image.with_name(name + _CREATING_SUFFIX)
            # Built aside and renamed into place: an image that exists is a whole filesystem.
            fd = os.open(creating, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size_bytes)  # sparse: blocks are allocated as data lands
            finally:
                os.close(fd)
            try:
                loopdev.mkfs_encrypt(creating, f"nova-{name}")
                os.rename(creating, image)
            except BaseException:
                creating.unlink(missing_ok=True)
                raise
            try:
                self._open(namespace, name, key)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._remove_locked(namespace, name)
                raise
            log.info("created volume %s/%s (%d bytes)", namespace, name, size_bytes)
            return self.get(namespace, name)

    def remove(self, namespace: str, name: str) -> None:
        """Lock, unmount, detach and delete a volume. VolumeBusy while a container uses it."""
        with self._lock:
            if not self.image_path(namespace, name).exists():
                raise VolumeNotFound(f"no volume {name!r} in namespace {namespace!r}")
            self._remove_locked(namespace, name)
            log.info("removed volume %s/%s", namespace, name)

    def get(self, namespace: str, name: str) -> Volume:
        image = self.image_path(namespace, name)
        try:
            size = image.stat().st_size
        except FileNotFoundError:
            raise VolumeNotFound(f"no volume {name!r} in namespace {namespace!r}") from None
        mount_point = self.mount_point(namespace, name)
        loop = self._loop_of(image)
        mounted = loop is not None and any(
            m.mount_point == str(mount_point) and m.source == loop for m in loopdev.mounts()
        )
        unlocked, used = False, None
        if mounted:
            identifier = self._identifiers.get(namespace)
            fd = fscrypt.open_dir(str(mount_point))
            try:
                unlocked = identifier is not None and (
                    fscrypt.key_status(fd, identifier) == fscrypt.STATUS_PRESENT
                )
                stat = os.fstatvfs(fd)
                used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
            finally:
                os.close(fd)
        return Volume(namespace, name, size, image, mount_point, loop, mounted, unlocked, used)

    def list(self, namespace: str | None = None) -> list[Volume]:
        found: list[Volume] = []
        for image in sorted(self.images_dir.glob(f"{namespace or '*'}/*{_IMAGE_SUFFIX}")):
            with contextlib.suppress(VolumeNotFound):  # removed while we listed
                found.append(self.get(image.parent.name, image.name.removesuffix(_IMAGE_SUFFIX)))
        return found

    def resolve(self, namespace: str, ref: str) -> Volume:
        """The volume a container of `namespace` names `ref` (`NAME` or `NS/NAME`), ready.

        A container mounts only its own namespace's volumes: naming another
        namespace's raises VolumeForbidden, whether or not that volume exists.
        """
        owner, sep, name = ref.rpartition("/")
        if sep and owner != namespace:
            raise VolumeForbidden(
                f"volume {ref!r} belongs to namespace {owner!r}; a container in namespace "
                f"{namespace!r} can mount only its own namespace's volumes"
            )
        check_name(name, "volume name")
        with self._lock:
            volume = self.get(namespace, name)
            if volume.state != "ready":
                self._open(namespace, name, self._key(namespace))
                volume = self.get(namespace, name)
            return volume

    def refuse_host_dir(self, path: str) -> None:
        """A plain `--dir` must not reach into the volumes: that would skip the namespace check."""
        real = os.path.realpath(path)
        if _under(real, self.root) or _under(str(self.root), real):
            raise VolumeForbidden(
                f"--dir {path!r} overlaps Nova's volume store ({self.root}); "
                "use --volume NAME:/PATH to mount a volume"
            )

    def recover(self) -> Recovery:
        """Converge after a start or a crash: every image opened, our leftovers removed."""
        report = Recovery()
        with self._lock:
            for stale in self.images_dir.glob(f"*/*{_CREATING_SUFFIX}"):
                stale.unlink(missing_ok=True)  # a create that never finished
                report.deleted.append(str(stale))
            wanted: dict[str, str] = {}  # mount point -> image, for every volume
            for image in sorted(self.images_dir.glob(f"*/*{_IMAGE_SUFFIX}")):
                namespace, name = image.parent.name, image.name.removesuffix(_IMAGE_SUFFIX)
                wanted[str(self.mount_point(namespace, name))] = str(image)
            self._remove_leftovers(wanted, report)
            for mount_point, image_path in wanted.items():
                namespace, name = Path(image_path).parent.name, Path(mount_point).name
                try:
                    self._open(namespace, name, self._key(namespace))
                    report.opened.append(f"{namespace}/{name}")
                except (OSError, errors.NovaError) as exc:
                    report.failed[f"{namespace}/{name}"] = str(exc)
                    log.error("cannot open volume %s/%s: %s", namespace, name, exc)
            self._remove_empty_mount_points(set(wanted))
        return report

    def close_all(self) -> None:
        """Lock, unmount and detach every volume; keep images and keys (uninstall, tests)."""
        with self._lock:
            for volume in self.list():
                self._close(volume.namespace, volume.name)
            self._remove_leftovers({}, Recovery())

    # -- steps ------------------------------------------------------------

    def _key(self, namespace: str) -> bytes:
        key = self.keys.get(namespace)
        if key is None:
            raise VolumeError(
                f"the key of namespace {namespace!r} is missing ({self.keys.path(namespace)}): "
                "its volumes cannot be unlocked"
            )
        return key

    def _loop_of(self, image: Path) -> str | None:
        """The loop device of `image`: the one mounted at its mount point if several."""
        devices = [
            loop.device
            for loop in loopdev.loops()
            if loop.backing_file == str(image) and not loop.backing_deleted
        ]
        if len(devices) > 1:
            mount_point = str(self.mount_point(image.parent.name, image.stem))
            sources = {m.source for m in loopdev.mounts() if m.mount_point == mount_point}
            devices.sort(key=lambda device: device not in sources)
        return devices[0] if devices else None

    def _open(self, namespace: str, name: str, key: bytes) -> None:
        """Attach, mount, add the key, make `data/` encrypted: each step only if needed."""
        image = self.image_path(namespace, name)
        mount_point = self.mount_point(namespace, name)
        mount_point.mkdir(parents=True, exist_ok=True, mode=0o700)
        device = self._loop_of(image) or loopdev.attach(image)
        current = [m for m in loopdev.mounts() if m.mount_point == str(mount_point)]
        if not any(m.source == device for m in current):
            loopdev.mount(device, mount_point)
        fd = fscrypt.open_dir(str(mount_point))
        try:
            identifier = fscrypt.add_key(fd, key)
        finally:
            os.close(fd)
        self._identifiers[namespace] = identifier
        data = mount_point / DATA_DIR
        with contextlib.suppress(FileExistsError):
            data.mkdir(mode=0o755)
        fd = fscrypt.open_dir(str(data))
        try:
            policy = fscrypt.get_policy_identifier(fd)
            if policy is None:  # new, or a crash between mkdir and the policy: still empty
                fscrypt.set_policy(fd, identifier)
            elif policy != identifier:
                raise VolumeError(
                    f"volume {namespace}/{name}: {data} is encrypted under another key "
                    f"than namespace {namespace!r}'s; refusing to use it"
                )
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise VolumeError(
                    f"volume {namespace}/{name}: {data} holds unencrypted files; refusing to use it"
                ) from None
            raise
        finally:
            os.close(fd)

    def _close(self, namespace: str, name: str) -> None:
        """Remove the key, unmount, detach. VolumeBusy (and nothing changed) while in use."""
        mount_point = self.mount_point(namespace, name)
        device = self._loop_of(self.image_path(namespace, name))
        if any(m.mount_point == str(mount_point) for m in loopdev.mounts()):
            self._lock_and_unmount(namespace, name, mount_point)
        if device is not None:
            loopdev.detach(device)

    def _lock_and_unmount(self, namespace: str, name: str, mount_point: Path) -> None:
        # Key first: it also leaves the superblock if another mount namespace keeps it alive.
        key = self.keys.get(namespace)
        fd = fscrypt.open_dir(str(mount_point))
        try:
            if key is not None:
                identifier = fscrypt.add_key(fd, key)  # idempotent; gives the identifier
                if fscrypt.remove_key(fd, identifier).files_busy:
                    fscrypt.add_key(fd, key)
                    raise VolumeBusy(
                        f"volume {name!r} in namespace {namespace!r} is in use by a running "
                        "container; stop it first"
                    )
        finally:
            os.close(fd)
        try:
            loopdev.umount(mount_point)
        except loopdev.LoopError as exc:
            if key is not None:
                fd = fscrypt.open_dir(str(mount_point))
                try:
                    fscrypt.add_key(fd, key)
                finally:
                    os.close(fd)
            reason = exc.message.rpartition(": ")[2].rstrip(".")
            raise VolumeBusy(
                f"volume {name!r} in namespace {namespace!r} is in use ({reason}); "
                "stop what uses it first"
            ) from None

    def _remove_locked(self, namespace: str, name: str) -> None:
        self._close(namespace, name)
        self.image_path(namespace, name).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError, OSError):
            self.mount_point(namespace, name).rmdir()
        with contextlib.suppress(OSError):  # the namespace's last volume: its dirs go too
            self.mount_point(namespace, name).parent.rmdir()
        with contextlib.suppress(OSError):
            self.image_path(namespace, name).parent.rmdir()
        if not self.image_path(namespace, name).parent.exists():
            self.keys.delete(namespace)  # nothing is encrypted under it any more
            self._identifiers.pop(namespace, None)

    def _remove_leftovers(self, wanted: dict[str, str], report: Recovery) -> None:
        """Unmount and detach what we made that no volume claims; never anything else."""
        by_device = {loop.device: loop for loop in loopdev.loops()}
        kept_images: set[str] = set()  # one loop device per image: the mounted one
        for mount in loopdev.mounts():
            if not _under(mount.mount_point, self.mnt_dir):
                continue
            loop = by_device.get(mount.source)
            if loop is None or not self._is_ours(loop.backing_file):
                log.warning("leaving %s on %s alone: not a volume of ours", mount.source, mount)
                continue
            image = wanted.get(mount.mount_point)
            if (
                image is not None
                and loop.backing_file == image
                and not loop.backing_deleted
                and image not in kept_images
            ):
                kept_images.add(image)
                continue
            with contextlib.suppress(loopdev.LoopError):
                loopdev.umount(Path(mount.mount_point))
                report.unmounted.append(mount.mount_point)
        mounted = {m.source for m in loopdev.mounts()}
        for loop in by_device.values():
            if not self._is_ours(loop.backing_file) or loop.device in mounted:
                continue  # not ours, or mounted (ours are claimed above; leave others alone)
            reusable = loop.backing_file in wanted.values() and not loop.backing_deleted
            if reusable and loop.backing_file not in kept_images:
                kept_images.add(loop.backing_file)  # attached, not mounted yet: reuse it
                continue
            with contextlib.suppress(loopdev.LoopError):
                loopdev.detach(loop.device)
                report.detached.append(loop.device)

    def _remove_empty_mount_points(self, wanted: set[str]) -> None:
        for mount_point in self.mnt_dir.glob("*/*"):
            if str(mount_point) not in wanted:
                with contextlib.suppress(OSError):
                    mount_point.rmdir()  # only when empty: never data
        for namespace_dir in self.mnt_dir.glob("*"):
            with contextlib.suppress(OSError):
                namespace_dir.rmdir()

    def teardown(self) -> None:
        """Remove every volume, key and the store itself (uninstall, tests)."""
        with self._lock:
            for volume in self.list():
                self._remove_locked(volume.namespace, volume.name)
            self._remove_leftovers({}, Recovery())
            shutil.rmtree(self.root, ignore_errors=True)


def _under(path: str, root: Path | str) -> bool:
    prefix = str(root).rstrip("/")
    return path == prefix or path.startswith(prefix + "/")
