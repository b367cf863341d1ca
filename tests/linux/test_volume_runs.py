"""Encrypted volumes end to end: `nova volume` and `nova run --volume` through a real agent.

As root, with real workers (cat.wasm writes and reads the files) and real
loop devices and mounts under the test's tmp dir; namespaces start with `nvt`.
The fixture removes every volume, mount and loop device the test made.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.isolation.volumes import VolumeManager
from tests.linux.test_volumes import force_cleanup, volume_leftovers
from tests.unit.test_agent import StartAgent, start_agent
from tests.unit.test_cli import nova

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="volumes need root (loop devices, mounts)"),
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) missing"),
    pytest.mark.usefixtures("shared_module_cache"),
]

__all__ = ["start_agent"]  # a fixture this module uses


@pytest.fixture
def volumes_removed(nova_dirs: Path) -> Iterator[Path]:
    """The state dir; afterwards (agents ended first) every volume of the test is gone."""
    state = nova_dirs / "state"
    yield state
    try:
        if (state / "volumes").exists():
            VolumeManager(state).teardown()
        mounts, loops = volume_leftovers(nova_dirs)
        assert not mounts and not loops, f"left behind: {mounts} {loops}"
    finally:
        force_cleanup(nova_dirs)


def _run(namespace: str, *args: str | Path) -> tuple[int, str, str]:
    done = nova("run", "--namespace", namespace, *args)
    return done.returncode, done.stdout, done.stderr


def test_containers_of_a_namespace_share_its_volume_and_no_other_namespace_can(
    volumes_removed: Path, start_agent: StartAgent, examples: Path
) -> None:
    state, cat = volumes_removed, examples / "cat.wasm"
    agent = start_agent()
    created = nova("volume", "create", "nvt-data", "--size", "16Mi", "--namespace", "nvta")
    assert (created.returncode, created.stdout) == (0, "nvta/nvt-data\n"), created.stderr
    again = nova("volume", "create", "nvt-data", "--size", "16Mi", "--namespace", "nvta")
    assert again.returncode == 125 and "already exists in namespace 'nvta'" in again.stderr

    volume: list[str | Path] = ["--volume", "nvt-data:/data", cat]
    assert _run("nvta", *volume, "--", "--write", "/data/note.txt", "nvt hello from nvta") == (
        0, "", ""
    )  # fmt: skip
    assert _run("nvta", *volume, "--", "/data/note.txt") == (0, "nvt hello from nvta", "")

    code, _, err = _run("nvtb", *volume, "--", "/data/note.txt")
    assert code == 127 and "no volume 'nvt-data' in namespace 'nvtb'" in err
    code, _, err = _run("nvtb", "--volume", "nvta/nvt-data:/data", cat, "--", "/data/note.txt")
    assert code == 125 and "belongs to namespace 'nvta'" in err
    data_dir = state / "volumes" / "mnt" / "nvta" / "nvt-data" / "data"
    code, _, err = _run("nvtb", "--dir", f"{data_dir}:/data", cat, "--", "/data/note.txt")
    assert code == 125 and "overlaps Nova's volume store" in err

    os.sync()
    raw = (state / "volumes" / "images" / "nvta" / "nvt-data.img").read_bytes()
    assert b"nvt hello from nvta" not in raw and b"note.txt" not in raw

    listed = nova("volume", "ls")
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[1].split()[:3] == ["nvta", "nvt-data", "16Mi"]
    assert listed.stdout.splitlines()[1].split()[-1] == "ready"

    # A host restart: the agent ends and nothing stays mounted; the next agent opens it.
    agent.end()
    VolumeManager(state).close_all()
    start_agent()
    assert _run("nvta", *volume, "--", "/data/note.txt") == (0, "nvt hello from nvta", "")


def test_a_volume_in_use_is_not_removed(
    volumes_removed: Path, start_agent: StartAgent, examples: Path
) -> None:
    start_agent()
    assert nova("volume", "create", "nvt-busy", "--size", "16Mi").returncode == 0
    started = nova(
        "run", "-d", "--name", "nvt-sleeper", "--volume", "nvt-busy:/data",
        examples / "sleep.wasm", "--", "30",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    time.sleep(0.2)
    busy = nova("volume", "rm", "nvt-busy")
    assert busy.returncode == 125 and "in use" in busy.stderr
    assert nova("volume", "ls").stdout.split()[-1] == "ready"
    assert nova("stop", "nvt-sleeper", "--grace", "0.1s").returncode == 0
    removed = nova("volume", "rm", "nvt-busy")
    assert removed.returncode == 0, removed.stderr
    assert nova("volume", "ls").stdout.splitlines() == ["NAMESPACE  NAME  SIZE  USED  STATE"]
    gone = nova("volume", "rm", "nvt-busy")
    assert gone.returncode == 127 and "no volume 'nvt-busy' in namespace 'default'" in gone.stderr
