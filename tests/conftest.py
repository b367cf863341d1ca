"""Shared fixtures: example apps, isolated Nova directories, process hygiene."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "build"


@pytest.fixture(scope="session")
def examples() -> Path:
    """The built example apps (make -C examples); builds them if needed."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples")], check=True)
    return EXAMPLES


@pytest.fixture
def nova_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """State, cache and socket under tmp_path, for this process and its children."""
    monkeypatch.setenv("NOVA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NOVA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NOVA_SOCKET", str(tmp_path / "agent.sock"))
    return tmp_path


def descendants(pid: int) -> set[int]:
    """Every process whose ancestry leads to `pid` (through /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def marked_processes(mark: str) -> set[int]:
    """Processes (other than this one) whose environment carries `mark`."""
    needle = f"NOVA_TEST_MARK={mark}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0") and process_alive(int(entry)):
                found.add(int(entry))
    return found


@pytest.fixture
def no_leftover_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test if anything it started (zygote, workers, agents) outlives it.

    Children inherit a unique environment mark, so the check sees exactly this
    test's processes, even after they re-parent, and never anyone else's.
    """
    mark = uuid.uuid4().hex
    monkeypatch.setenv("NOVA_TEST_MARK", mark)
    yield
    deadline = time.monotonic() + 15  # exiting workers can be slow on a loaded 2-core host
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:  # report them, but never leave a spinning guest on the machine
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {sorted(left)}"
