"""Shared fixtures: example apps, isolated Nova directories and cgroups, process hygiene."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
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
def nova_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """State, cache, socket and cgroup root of this test only, for this process and its
    children. As root, agents and `nova run` give containers cgroups: they go under a
    root of this test's own (`nova-test-<hex>`), removed with everything in it at the end.
    """
    monkeypatch.setenv("NOVA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NOVA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NOVA_SOCKET", str(tmp_path / "agent.sock"))
    cgroup_root = unique_cgroup_root()
    monkeypatch.setenv("NOVA_CGROUP_ROOT", cgroup_root)
    net = unique_test_network()
    monkeypatch.setenv("NOVA_NODE_CIDR", str(net.cidr))
    monkeypatch.setenv("NOVA_SEGMENT_IDS", f"{net.segments.start}-{net.segments.stop - 1}")
    yield tmp_path
    if os.geteuid() == 0:
        remove_cgroup_root(cgroup_root)
        remove_test_network(net)


@dataclass(frozen=True)
class NetworkUnderTest:
    """A node CIDR and segment-id range no other test (or Nova install) uses."""

    cidr: IPv4Network
    segments: range


def unique_test_network() -> NetworkUnderTest:
    rng = random.SystemRandom()
    cidr = IPv4Network(f"10.{rng.randrange(128, 255)}.{rng.randrange(256)}.0/24")
    first = rng.randrange(1_000_000, 16_000_000, 64)
    return NetworkUnderTest(cidr, range(first, first + 64))


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False).stdout


def network_leftovers(net: NetworkUnderTest) -> dict[str, list[str]]:
    """What Nova left of `net` in the kernel, read with iproute2 (not with Nova's code):
    container netns whose eth0 has an address in its CIDR, their host veths, the
    bridges of its segment ids, host routes into its CIDR."""
    netns = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith("nova-ctr-"):
            continue
        addresses = _ip("-n", name, "-4", "-o", "addr", "show", "dev", "eth0").split()
        if any(
            "." in a and "/" in a and IPv4Address(a.split("/")[0]) in net.cidr for a in addresses
        ):
            netns.append(name)
    links = _ip("-o", "link", "show").splitlines()
    names = [line.split(":")[1].strip().split("@")[0] for line in links if ":" in line]
    bridges = [
        n for n in names if n.startswith("nvb") and n[3:].isdigit() and int(n[3:]) in net.segments
    ]
    veths = [
        f"nvh{ns[len('nova-ctr-') :]}" for ns in netns if f"nvh{ns[len('nova-ctr-') :]}" in names
    ]
    routes = [
        r
        for r in _ip("-4", "route", "show", "proto", "78").splitlines()
        if r.split() and IPv4Address(r.split()[0].split("/")[0]) in net.cidr
    ]
    return {"netns": netns, "veths": veths, "bridges": bridges, "routes": routes}


def remove_test_network(net: NetworkUnderTest) -> None:
    """Remove whatever `network_leftovers` finds; nothing outside `net` is touched."""
    left = network_leftovers(net)
    for route in left["routes"]:
        subprocess.run(["ip", "route", "del", *route.split()], capture_output=True, check=False)
    for veth in left["veths"]:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
    for name in left["netns"]:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    for bridge in left["bridges"]:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


def unique_cgroup_root() -> str:
    """A cgroup root name no other test (or Nova install) uses."""
    return f"nova-test-{uuid.uuid4().hex[:10]}"


def cgroup_root_paths(root_name: str) -> list[Path]:
    """Where `root_name` is (or would be) in each hierarchy Nova uses on this host."""
    from agent.isolation.cgroups import Cgroups, NoCgroupFilesystem

    try:
        return [Path(p) for p in Cgroups.detect(root_name).root_paths]
    except NoCgroupFilesystem:
        return []


def owned_cgroups(root_name: str) -> set[str]:
    """Container cgroups under `root_name`, in any hierarchy."""
    return {
        child.name
        for root in cgroup_root_paths(root_name)
        if (root / "containers").is_dir()
        for child in (root / "containers").iterdir()
        if child.is_dir()
    }


def remove_cgroup_root(root_name: str) -> None:
    """Kill what is left under `root_name` and remove it, bottom-up, in every hierarchy.

    Independent of the code under test. Never touches anything outside that root.
    """
    roots = [root for root in cgroup_root_paths(root_name) if root.exists()]
    for _ in range(250):
        left = [Path(d) for root in roots for d, _, _ in os.walk(root, topdown=False)]
        if not left:
            return
        for d in left:
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                d.rmdir()
        time.sleep(0.02)
    raise AssertionError(f"cannot remove the test's cgroups: {left}")


@pytest.fixture(scope="session")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("module-cache")


@pytest.fixture
def shared_module_cache(
    nova_dirs: Path, module_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One compiled-module cache for the session, as on a user's host: each app compiles once.

    (A test that counts compiles sets its own, empty cache.)
    """
    monkeypatch.setenv("NOVA_CACHE_DIR", str(module_cache))


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
