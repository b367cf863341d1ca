"""A node dies: its containers run elsewhere within seconds; when it returns, no duplicates.

Real parts end to end: a Consul dev agent, a `nova-coordinator`, and two
`nova-agent --consul` processes (each with its own state dir, socket and
cgroup root, as two hosts would have) running real wasm replicas.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster.conftest import ConsulAgent
from tests.cluster.coordinators import Coordinator, placed
from tests.conftest import remove_cgroup_root, unique_cgroup_root
from tests.unit.test_agent import NOVA_AGENT, POLICY_OFF, wait_for
from tests.unit.test_cli import nova

pytestmark = [
    pytest.mark.consul,
    pytest.mark.usefixtures("nova_dirs", "shared_module_cache", "no_leftover_processes"),
]

# The agent's check TTL (3 s), Consul's reaper, a pass, a start, on a loaded 2-core host.
MOVE_BOUND = 15.0


class Host:
    """One `nova-agent --consul` as its own host: state, socket and cgroup root of its own."""

    def __init__(self, tmp: Path, consul: ConsulAgent, node: str) -> None:
        self.node = node
        self.consul = consul
        self.dir = tmp / node
        self.dir.mkdir()
        self.socket = self.dir / "agent.sock"
        self.cgroup_root = unique_cgroup_root()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        env = os.environ | {
            "NOVA_STATE_DIR": str(self.dir / "state"),
            "NOVA_SOCKET": str(self.socket),
            "NOVA_CGROUP_ROOT": self.cgroup_root,
        }
        with (self.dir / "agent.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*NOVA_AGENT, "--consul", self.consul.url, "--node", self.node,
                 "--pool-size", "1", "--advertise", "127.0.0.1", "--labels", f"host={self.node}",
                 *POLICY_OFF],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        wait_for(f"{self.node}'s API", self._answers, timeout=30)

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.dir / "agent.log").read_text(errors="replace")
            pytest.fail(f"nova-agent {self.node} exited with {self.proc.returncode}:\n{log}")
        try:
            self.running()
        except (OSError, aiohttp.ClientError):
            return False
        return True

    def running(self) -> dict[str, str]:
        """Running replicas: name (replica id) -> container id."""

        async def get() -> Any:
            connector = aiohttp.UnixConnector(path=str(self.socket))
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get("http://nova-agent/v1/containers?all=1") as response,
            ):
                return json.loads(await response.text())

        return {r["name"]: r["id"] for r in asyncio.run(get()) if r["state"] == "running"}

    def end(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[Host]]:
    made: list[Host] = []
    yield made
    for host in made:
        host.end()
    for host in made:
        remove_cgroup_root(host.cgroup_root)


def everywhere(hosts: list[Host]) -> list[str]:
    """Every running replica on every host, with repeats (a duplicate shows twice)."""
    return sorted(name for host in hosts for name in host.running())


def test_a_killed_node_s_replicas_move_and_its_return_leaves_no_duplicates(
    private_consul: ConsulAgent, tmp_path: Path, hosts: list[Host], examples: Path
) -> None:
    pushed = nova(
        "image", "push", "sleep:1", examples / "sleep.wasm", "--consul", private_consul.url
    )
    assert pushed.returncode == 0, pushed.stderr
    a = Host(tmp_path, private_consul, "host-a")
    hosts.append(a)
    b = Host(tmp_path, private_consul, "host-b")
    hosts.append(b)
    coordinator = Coordinator(tmp_path, private_consul, "coord")
    wait_for("the coordinator to lead", coordinator.acting)
    wait_for(
        "both nodes healthy",
        lambda: sum(n["healthy"] for n in coordinator.status()["nodes"]) == 2,
        timeout=15,
    )

    done = nova("deploy", "web", "--image", "sleep:1", "--replicas", "2", "--cpu", "100m",
                "--memory", "16Mi", "--arg", "300", "--coordinator", coordinator.url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    replicas = ["default.web.0", "default.web.1"]
    wait_for("one replica on each host", lambda: everywhere(hosts) == replicas, timeout=30)
    assert len(a.running()) == len(b.running()) == 1  # spread across nodes
    [on_a] = a.running()

    a.end(signal.SIGKILL)
    killed = time.monotonic()
    wait_for("b to run both", lambda: sorted(b.running()) == replicas, timeout=MOVE_BOUND + 10)
    moved_after = time.monotonic() - killed
    assert moved_after < MOVE_BOUND, moved_after
    assert placed(private_consul) == {r: "host-b" for r in replicas}
    host_a = [n for n in coordinator.status()["nodes"] if n["node"] == "host-a"]
    assert [n["healthy"] for n in host_a] == [False]

    # host-a comes back: it registers again and stops what it ran; nothing moves back.
    a.start()
    wait_for(
        "host-a healthy again",
        lambda: all(n["healthy"] for n in coordinator.status()["nodes"]),
        timeout=15,
    )
    wait_for("host-a to run nothing", lambda: not a.running(), timeout=20)
    assert on_a not in a.running()
    time.sleep(1.0)  # reconcile passes had their chance to (wrongly) double something
    assert everywhere(hosts) == replicas
    assert placed(private_consul) == {r: "host-b" for r in replicas}

    done = nova("deploy", "web", "--delete", "--coordinator", coordinator.url)
    assert done.returncode == 0, done.stderr
    wait_for("every replica to stop", lambda: not everywhere(hosts), timeout=20)
    coordinator.end()
