"""Encrypted volumes on the real kernel, as root: ext4 + fscrypt on loop devices.

Every test's volumes live under its own tmp dir (images, mount points, keys);
namespaces start with `nvt`. The fixture checks the manager's own teardown
left nothing behind, then removes, independently of the code under test,
every mount and loop device whose path is under that tmp dir, and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.isolation import fscrypt, loopdev
from agent.isolation.volume_keys import VolumeKeyError
from agent.isolation.volumes import VolumeBusy, VolumeForbidden, VolumeManager, VolumeNotFound
from nova import errors

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root"),
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) missing"),
]

SIZE = 16 << 20
NS_A, NS_B = "nvta", "nvtb"


def volume_leftovers(tmp: Path) -> tuple[list[loopdev.Mount], list[loopdev.Loop]]:
    """Mounts and loop devices whose paths are under `tmp`: what a test made."""
    root = str(tmp.resolve())
    mounts = [m for m in loopdev.mounts() if m.mount_point.startswith(root + "/")]
    loops = [lo for lo in loopdev.loops() if lo.backing_file.startswith(root + "/")]
    return mounts, loops


def force_cleanup(tmp: Path) -> None:
    """Unmount and detach what `volume_leftovers` finds, without the code under test."""
    mounts, _ = volume_leftovers(tmp)
    for mount in sorted(mounts, key=lambda m: -len(m.mount_point)):
        subprocess.run(["umount", "-l", mount.mount_point], check=False)
    for loop in volume_leftovers(tmp)[1]:
        subprocess.run(["losetup", "-d", loop.device], check=False)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state"
    try:
        with contextlib.suppress(Exception):
            VolumeManager(tmp_path / "state").teardown()
        mounts, loops = volume_leftovers(tmp_path)
        assert not mounts and not loops, f"teardown left {mounts} {loops}"
        assert not (tmp_path / "state" / "volumes").exists()
    finally:
        force_cleanup(tmp_path)


@pytest.fixture
def volumes(state: Path) -> VolumeManager:
    return VolumeManager(state)


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_data_is_encrypted_at_rest(volumes: VolumeManager) -> None:
    volume = volumes.create(NS_A, "nvt-data", SIZE)
    assert volume.state == "ready"
    secret_name, secret = "nvt-name-7f3a9c.txt", "nvt-plaintext-marker-5d1e8b" * 40
    _write(volume.data_path / secret_name, secret)
    # The control: the same kind of write outside the encrypted directory is
    # visible in the image, so the search below can find plaintext when it is there.
    _write(volume.mount_point / "nvt-control.txt", "nvt-control-marker-91c2e4")
    os.sync()
    raw = volume.image.read_bytes()
    assert b"nvt-control-marker-91c2e4" in raw
    assert b"nvt-plaintext-marker-5d1e8b" not in raw
    assert secret_name.encode() not in raw
    assert (volume.data_path / secret_name).read_text() == secret
    assert os.stat(volume.image).st_blocks * 512 < SIZE  # sparse


def test_without_its_key_the_volume_is_unreadable(volumes: VolumeManager) -> None:
    volume = volumes.create(NS_A, "nvt-data", SIZE)
    volumes.create(NS_B, "nvt-other", SIZE)  # gives namespace B a key of its own
    _write(volume.data_path / "notes.txt", "nvt secret notes")
    key_a, key_b = volumes.keys.get(NS_A), volumes.keys.get(NS_B)
    assert key_a is not None and key_b is not None and key_a != key_b
    fd = fscrypt.open_dir(str(volume.mount_point))
    try:
        fscrypt.remove_key(fd, fscrypt.add_key(fd, key_a))
        assert volumes.get(NS_A, "nvt-data").state == "locked"
        names = os.listdir(volume.data_path)
        assert len(names) == 1 and names[0] != "notes.txt"  # names are ciphertext
        with pytest.raises(OSError) as locked:
            (volume.data_path / names[0]).read_bytes()
        assert locked.value.errno == errno.ENOKEY
        with pytest.raises(OSError) as no_create:
            (volume.data_path / "new.txt").write_text("x")
        assert no_create.value.errno == errno.ENOKEY
        # Namespace B's key, in the same filesystem's keyring, unlocks nothing.
        fscrypt.add_key(fd, key_b)
        with pytest.raises(OSError) as other_key:
            (volume.data_path / names[0]).read_bytes()
        assert other_key.value.errno == errno.ENOKEY
        assert not (volume.data_path / "notes.txt").exists()
        # Its own key does: the lock above was the key, not a broken file.
        fscrypt.add_key(fd, key_a)
        assert (volume.data_path / "notes.txt").read_text() == "nvt secret notes"
    finally:
        os.close(fd)


def test_reopened_after_unmount_with_a_new_manager(state: Path, volumes: VolumeManager) -> None:
    volume = volumes.create(NS_A, "nvt-data", SIZE)
    _write(volume.data_path / "kept.txt", "survives a restart")
    volumes.close_all()
    assert volumes.get(NS_A, "nvt-data").state == "detached"
    assert not volume_leftovers(state.parent)[0] and not volume_leftovers(state.parent)[1]
    report = VolumeManager(state).recover()  # what the agent does when it starts
    assert report.opened == [f"{NS_A}/nvt-data"] and not report.failed
    assert (volume.data_path / "kept.txt").read_text() == "survives a restart"


def test_a_namespace_cannot_name_another_namespaces_volume(volumes: VolumeManager) -> None:
    volume_b = volumes.create(NS_B, "nvt-data", SIZE)
    with pytest.raises(VolumeForbidden, match=r"belongs to namespace 'nvtb'.*'nvta'"):
        volumes.resolve(NS_A, "nvtb/nvt-data")
    with pytest.raises(VolumeNotFound, match=r"no volume 'nvt-data' in namespace 'nvta'"):
        volumes.resolve(NS_A, "nvt-data")  # unqualified names are the caller's namespace
    with pytest.raises(VolumeForbidden, match="overlaps Nova's volume store"):
        volumes.refuse_host_dir(str(volume_b.data_path))  # nor around it with --dir
    with pytest.raises(VolumeForbidden):
        volumes.refuse_host_dir(str(volumes.root.parent))  # a parent of the store holds it
    volumes.refuse_host_dir("/usr/share")  # an unrelated directory is fine
    assert volumes.resolve(NS_B, "nvt-data").data_path == volume_b.data_path
    assert volumes.resolve(NS_B, "nvtb/nvt-data").data_path == volume_b.data_path


def test_bad_names_and_sizes_are_refused(volumes: VolumeManager) -> None:
    for namespace, name, size in [
        ("NVT", "ok", SIZE),
        ("nvta", "../x", SIZE),
        ("nvta", "", SIZE),
        ("nvta", "ok", 1 << 20),
    ]:
        with pytest.raises(errors.UsageError):
            volumes.create(namespace, name, size)
    assert volumes.list() == []


def test_remove_refuses_while_in_use_then_removes_everything(
    state: Path, volumes: VolumeManager
) -> None:
    volume = volumes.create(NS_A, "nvt-data", SIZE)
    _write(volume.data_path / "open.txt", "in use")
    with (volume.data_path / "open.txt").open() as held:
        with pytest.raises(VolumeBusy, match="in use"):
            volumes.remove(NS_A, "nvt-data")
        assert volumes.get(NS_A, "nvt-data").state == "ready"  # nothing changed
        assert held.read() == "in use"
    volumes.remove(NS_A, "nvt-data")
    assert volumes.list() == []
    assert not volume_leftovers(state.parent)[0] and not volume_leftovers(state.parent)[1]
    assert not volume.image.exists() and not volume.mount_point.exists()
    assert volumes.keys.get(NS_A) is None  # its last volume: the key is shredded too
    with pytest.raises(VolumeNotFound):
        volumes.remove(NS_A, "nvt-data")


def test_recover_converges_after_a_crash_and_leaves_others_alone(
    tmp_path: Path, state: Path, volumes: VolumeManager
) -> None:
    a = volumes.create(NS_A, "nvt-a", SIZE)
    b = volumes.create(NS_A, "nvt-b", SIZE)
    c = volumes.create(NS_B, "nvt-c", SIZE)
    _write(a.data_path / "a.txt", "volume a")
    # Crash states: a is attached but not mounted; b has a second loop device;
    # c's image was deleted while mounted; a create never finished.
    loopdev.umount(a.mount_point)
    extra_b = loopdev.attach(b.image)
    c.image.unlink()
    creating = a.image.with_name("nvt-z.img.creating")
    creating.write_bytes(b"\0" * 4096)
    # Someone else's loop-mounted image, outside the volume store: never touched.
    foreign = tmp_path / "foreign.img"
    with foreign.open("wb") as f:
        f.truncate(SIZE)
    loopdev.mkfs_encrypt(foreign, "nvt-foreign")
    foreign_loop = loopdev.attach(foreign)
    (tmp_path / "foreign-mnt").mkdir()
    loopdev.mount(foreign_loop, tmp_path / "foreign-mnt")

    report = VolumeManager(state).recover()

    assert sorted(report.opened) == [f"{NS_A}/nvt-a", f"{NS_A}/nvt-b"]
    assert report.unmounted == [str(c.mount_point)]
    assert extra_b in report.detached and len(report.detached) == 2  # b's extra, c's
    assert report.deleted == [str(creating)] and not creating.exists()
    assert (a.data_path / "a.txt").read_text() == "volume a"
    ours = [lo for lo in loopdev.loops() if lo.backing_file.startswith(str(volumes.root))]
    assert sorted(lo.backing_file for lo in ours) == sorted([str(a.image), str(b.image)])
    assert not c.mount_point.exists()
    assert any(lo.device == foreign_loop for lo in loopdev.loops())
    assert any(m.mount_point == str(tmp_path / "foreign-mnt") for m in loopdev.mounts())
    loopdev.umount(tmp_path / "foreign-mnt")
    loopdev.detach(foreign_loop)


def test_a_key_file_moved_to_another_namespace_does_not_unwrap(volumes: VolumeManager) -> None:
    volumes.create(NS_A, "nvt-data", SIZE)
    key = volumes.keys.get(NS_A)
    assert key is not None
    blob = volumes.keys.path(NS_A).read_bytes()
    assert key not in blob
    assert volumes.keys.path(NS_A).stat().st_mode & 0o777 == 0o600
    assert (volumes.root / "master.key").stat().st_mode & 0o777 == 0o600
    volumes.keys.path("nvtc").write_bytes(blob)
    with pytest.raises(VolumeKeyError, match="does not verify"):
        volumes.keys.get("nvtc")
    volumes.keys.delete("nvtc")
