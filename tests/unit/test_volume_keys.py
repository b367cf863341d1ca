"""Volume keys at rest: wrapped with AES-256-GCM under the node master key (no root needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.isolation import mountinfo
from agent.isolation.volume_keys import LocalMasterKey, NamespaceKeys, VolumeKeyError


def _keys(tmp_path: Path) -> NamespaceKeys:
    return NamespaceKeys(tmp_path / "keys", LocalMasterKey(tmp_path / "master.key"))


def test_a_namespace_key_is_made_once_and_read_back(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    key = keys.get_or_create("nvta")
    assert len(key) == 64 and keys.get_or_create("nvta") == key
    assert _keys(tmp_path).get("nvta") == key  # a new process with the same master key
    assert keys.get_or_create("nvtb") != key
    assert key not in keys.path("nvta").read_bytes()
    assert keys.path("nvta").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    assert keys.namespaces() == ["nvta", "nvtb"]
    keys.delete("nvta")
    assert keys.get("nvta") is None


def test_a_wrapped_key_opens_only_for_its_namespace_and_master_key(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    keys.get_or_create("nvta")
    blob = keys.path("nvta").read_bytes()
    keys.path("nvtb").write_bytes(blob)
    with pytest.raises(VolumeKeyError, match=r"nvtb\.key: the wrapped key does not verify"):
        keys.get("nvtb")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keys").mkdir()
    (other / "keys" / "nvta.key").write_bytes(blob)
    with pytest.raises(VolumeKeyError, match="does not verify"):
        _keys(other).get("nvta")
    keys.path("nvta").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(VolumeKeyError, match="does not verify"):
        keys.get("nvta")


def test_a_master_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    blob = LocalMasterKey(tmp_path / "master.key").wrap(b"k" * 64, b"nvta")
    os.chmod(tmp_path / "master.key", 0o644)
    with pytest.raises(VolumeKeyError, match="readable by others"):
        LocalMasterKey(tmp_path / "master.key").unwrap(blob, b"nvta")


def test_mountinfo_gives_sources_and_unescaped_mount_points() -> None:
    line = (
        "36 35 7:3 / /var/lib/nova/volumes/mnt/a/my\\040vol rw,nodev - ext4 /dev/loop3 rw,seclabel"
    )
    (entry,) = mountinfo.parse(line + "\nbroken line\n")
    assert entry.source == "/dev/loop3" and entry.fstype == "ext4"
    assert entry.mount_point == "/var/lib/nova/volumes/mnt/a/my vol"
    assert "seclabel" in entry.super_options
