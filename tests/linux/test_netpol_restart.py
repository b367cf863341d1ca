"""Item 7 of network policy, with real packets: an engine killed and restarted
never lets a denied packet through, and uninstall removes everything.

The engine runs in a child process (tests/linux/netpol_engine_child.py)
that the test SIGKILLs, as an agent crash or upgrade would end it. A UDP
stream (one datagram a millisecond, each echoed by the target when it
arrives) runs from a denied pod and from an allowed pod through the whole
kill / restart / recovery, so a window of even a few milliseconds shows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.netpol.tables import IPPROTO_UDP
from agent.netpol.uninstall import uninstall
from tests.linux.netpol_lab import Lab, backend_params, built_lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, veth, tc, nftables"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
    pytest.mark.timeout(180),
]

ROOT = Path(__file__).resolve().parents[2]
UDP81 = (IPPROTO_UDP, 81)

# Sends a datagram to TARGET:81 every millisecond until a line arrives on stdin,
# counting echoes; prints {"sent": n, "echoed": m}.
STREAM = r"""
import json, socket, sys, threading, time
target = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.05)
counts = {"sent": 0, "echoed": 0}
stop = threading.Event()
def receive():
    while not stop.is_set():
        try:
            s.recvfrom(64); counts["echoed"] += 1
        except OSError:
            pass
threading.Thread(target=receive, daemon=True).start()
def send():
    while not stop.is_set():
        s.sendto(b"nova", (target, 81)); counts["sent"] += 1; time.sleep(0.001)
threading.Thread(target=send, daemon=True).start()
print("streaming", flush=True)
sys.stdin.readline()
stop.set(); time.sleep(0.1)
print(json.dumps(counts), flush=True)
"""

ONLY_C_TO_A = json.dumps(
    {
        "apiVersion": "nova.sh/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "only-c", "namespace": "x"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}],
        },
    }
)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab() as lab:
        yield lab


class Stream:
    def __init__(self, lab: Lab, source: str, target: str) -> None:
        netns, address = lab.pods[source].netns, str(lab.pods[target].address)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", STREAM, address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "streaming"

    def stop(self) -> dict[str, int]:
        out, _ = self.proc.communicate("stop\n", timeout=10)
        counts: dict[str, int] = json.loads(out)
        return counts


class Child:
    """One engine process (netpol_engine_child.py), started and waited for."""

    def __init__(self, lab: Lab, backend: str, table: str, policy_dir: Path, recovery_s: float):
        endpoints = [
            [e.key, str(e.ip), e.namespace, e.labels, e.host_ifname] for e in lab.endpoints()
        ]
        argv = [backend, table, lab.link_prefix, lab.host_netns, str(policy_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.linux.netpol_engine_child", *argv,
             json.dumps(endpoints), str(recovery_s)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"engine child exited ({self.proc.poll()}) before it enforced"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def reachable(lab: Lab, source: str, target: str) -> bool:
    return lab.matrices([UDP81])[UDP81][source, target]


def wait_reachable(lab: Lab, source: str, target: str, want: bool, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while reachable(lab, source, target) != want:
        assert time.monotonic() < deadline, f"{source} -> {target} not {want} in {timeout}s"


@pytest.mark.parametrize("backend", backend_params())
def test_restart_keeps_drops_in_place_and_uninstall_removes_all(
    lab: Lab, backend: str, tmp_path: Path
) -> None:
    table = f"nova_r{os.getpid()}"
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "only-c.yaml").write_text(ONLY_C_TO_A)
    children: list[Child] = []
    streams: list[Stream] = []
    try:
        first = Child(lab, backend, table, policy_dir, recovery_s=0)
        children.append(first)
        first.wait_ready()
        assert not reachable(lab, "x/b", "x/a") and reachable(lab, "x/c", "x/a")

        streams = [Stream(lab, "x/b", "x/a"), Stream(lab, "x/c", "x/a")]
        time.sleep(0.2)
        first.kill()  # the agent dies: nothing cleaned up, nothing re-applied
        time.sleep(0.3)
        # A new agent: loads its programs, then takes 0.3 s to recover its containers.
        second = Child(lab, backend, table, policy_dir, recovery_s=0.3)
        children.append(second)
        second.wait_ready()
        time.sleep(0.2)
        denied, allowed = (s.stop() for s in streams)
        streams = []
        assert denied["sent"] > 500 and denied["echoed"] == 0, denied
        assert allowed["echoed"] > 0, allowed

        # The new process is in control: removing the file opens x/a again.
        (policy_dir / "only-c.yaml").unlink()
        wait_reachable(lab, "x/b", "x/a", True)
        (policy_dir / "only-c.yaml").write_text(ONLY_C_TO_A)
        wait_reachable(lab, "x/b", "x/a", False)
        second.kill()  # enforcement stays in the kernel with no agent...
        assert not reachable(lab, "x/b", "x/a")
    finally:
        for stream in streams:
            stream.proc.kill()
            stream.proc.wait()
        for child in children:
            child.kill()
        # ...until uninstall, which finds it without the process that made it (and
        # leaves the lab clean for the next backend even when an assertion failed).
        removed = uninstall(table=table, link_prefix=lab.link_prefix, netns=lab.host_netns)
    if backend == "ebpf":
        assert sorted(removed) == sorted(
            f"eBPF policy filters on {p.host_ifname}" for p in lab.pods.values()
        )
    else:
        assert f"nftables table inet {table}" in removed
        assert f"nftables table bridge {table}" in removed
        tables = subprocess.run(
            ["ip", "netns", "exec", lab.host_netns, "nft", "list", "tables"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert table not in tables
    assert uninstall(table=table, link_prefix=lab.link_prefix, netns=lab.host_netns) == []
    assert reachable(lab, "x/b", "x/a")
