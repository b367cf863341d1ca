# ruff: noqa: F811  (the start_agent fixture is imported, then requested by name)
"""Every container in its own netns on its namespace's segment, through the real agent.

As root, with real workers, veths, bridges and packets. Each test's agent
gets a node CIDR and segment-id range of its own (NOVA_NODE_CIDR,
NOVA_SEGMENT_IDS from the `nova_dirs` fixture), so its netns, veths, bridges
and routes are told apart from anyone else's by iproute2 alone
(`network_leftovers`), and removed at the end whatever the agent did.

Probes run inside the containers' netns (`ip netns exec`), from the test,
to the addresses Nova gave them: nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nova import paths
from tests.conftest import (
    NetworkUnderTest,
    network_leftovers,
    owned_cgroups,
    process_alive,
    remove_cgroup_root,
)
from tests.unit.test_agent import (  # noqa: F401 (start_agent is a fixture used by name)
    NOVA_AGENT,
    POLICY_OFF,
    StartAgent,
    free_port,
    ps,
    start_agent,
    wait_for,
)
from tests.unit.test_cli import NOVA, nova

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="container networks need root"),
]

PROBE = """\
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    with socket.create_connection((host, port), timeout=float(sys.argv[3])) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: probe\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    print(data.split(b"\\r\\n\\r\\n", 1)[-1].decode().strip())
except OSError as exc:
    print(f"error: {exc.__class__.__name__}")
"""


def in_netns(netns: str, *argv: str, timeout: float = 20) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.stdout + result.stderr


def http_from(netns: str, ip: str, port: int, timeout: float = 2.0) -> str:
    """GET http://ip:port/ from inside `netns`: the body, or 'error: <kind>'."""
    return in_netns(netns, sys.executable, "-c", PROBE, ip, str(port), str(timeout)).strip()


def ping_from(netns: str, ip: str) -> bool:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "1", ip],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def neighbour_state(netns: str, ip: str) -> str:
    """The container's ARP entry for `ip` ('' if none): REACHABLE means ARP was answered."""
    return in_netns(netns, "ip", "neigh", "show", ip).strip()


def node_cidr() -> IPv4Network:
    return IPv4Network(os.environ["NOVA_NODE_CIDR"])


def leftovers() -> dict[str, list[str]]:
    ids = os.environ["NOVA_SEGMENT_IDS"].split("-")
    net = NetworkUnderTest(node_cidr(), range(int(ids[0]), int(ids[1]) + 1))
    return network_leftovers(net)


def run_web(name: str, port: int, examples: Path, *flags: str) -> dict[str, Any]:
    result = nova("run", "-d", "--name", name, "--port", str(port), *flags,
                  examples / "http-hello.wasm")  # fmt: skip
    assert result.returncode == 0, result.stderr
    [row] = [r for r in ps() if r["name"] == name]
    return row


@pytest.fixture(autouse=True)
def stop_containers(start_agent: StartAgent) -> Iterator[None]:
    """Containers outlive agents by design: stop this test's before its agents end."""
    yield
    if paths.socket_answers(paths.socket_path()):
        for row in ps():
            nova("stop", row["id"])


def test_same_namespace_containers_reach_each_other_other_namespaces_cannot(
    start_agent: StartAgent,
    examples: Path,
) -> None:
    start_agent()
    ports = [free_port() for _ in range(3)]
    a1 = run_web("a1", ports[0], examples)
    a2 = run_web("a2", ports[1], examples)
    b1 = run_web("b1", ports[2], examples, "--namespace", "team-b", "--label", "app=web")
    for row in (a1, a2, b1):
        assert IPv4Address(row["ip"]) in node_cidr(), row
        assert row["network"]["netns"] == f"nova-ctr-{row['id']}"
        assert process_alive(row["pid"])
        # The worker really lives in that netns, not in the host's.
        assert os.readlink(f"/proc/{row['pid']}/ns/net") != os.readlink("/proc/self/ns/net")
    assert len({a1["ip"], a2["ip"], b1["ip"]}) == 3
    assert a1["network"]["segment_id"] == a2["network"]["segment_id"] != b1["network"]["segment_id"]
    assert b1["labels"] == {"app": "web"}

    # Same namespace: TCP (the container's own address and port) and ICMP pass.
    assert http_from(a1["network"]["netns"], a2["ip"], ports[1]) == "hello from nova"
    assert http_from(a2["network"]["netns"], a1["ip"], ports[0]) == "hello from nova"
    assert ping_from(a1["network"]["netns"], a2["ip"])
    assert "REACHABLE" in neighbour_state(a1["network"]["netns"], a2["ip"])

    # Other namespace: not a frame gets through (TCP, ICMP, and ARP unanswered).
    b_ns = b1["network"]["netns"]
    assert http_from(b_ns, a1["ip"], ports[0], timeout=1.0).startswith("error:")
    assert not ping_from(b_ns, a2["ip"])
    assert "REACHABLE" not in neighbour_state(b_ns, a2["ip"])
    assert http_from(a1["network"]["netns"], b1["ip"], ports[2], timeout=1.0).startswith("error:")

    # The published port still answers on the host's loopback.
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, "127.0.0.1", str(ports[2]), "2"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert probe.stdout.strip() == "hello from nova"


def test_a_containers_network_goes_with_it_and_the_agent_leaves_nothing(
    start_agent: StartAgent,
    examples: Path,
) -> None:
    agent = start_agent()
    result = nova("run", "--name", "once", examples / "hello.wasm")
    assert result.returncode == 0, result.stderr
    [row] = [r for r in ps("-a") if r["name"] == "once"]
    assert row["network"] is None  # released with its worker
    port = free_port()
    web = run_web("web", port, examples, "--namespace", "team-c")
    assert nova("stop", "web").returncode == 0
    wait_for("web's netns to go", lambda: web["network"]["netns"] not in leftovers()["netns"])
    left = leftovers()
    # The warm pools' sandboxes (2 for 'default', 2 for team-c), nothing else.
    assert len(left["netns"]) == 4 and len(left["bridges"]) == 2, left
    assert agent.end() == 0
    assert leftovers() == {"netns": [], "veths": [], "bridges": [], "routes": []}


def test_restart_after_sigkill_adopts_running_containers_and_removes_orphans(
    start_agent: StartAgent,
    examples: Path,
) -> None:
    first = start_agent()
    port = free_port()
    web = run_web("web", port, examples)
    idle = set(leftovers()["netns"]) - {web["network"]["netns"]}
    assert len(idle) == 2  # the warm pool's sandboxes
    assert first.end(signal.SIGKILL) == -signal.SIGKILL
    assert set(leftovers()["netns"]) >= idle  # a crash removes nothing...

    start_agent()
    left = set(leftovers()["netns"])
    assert not (idle & left), "orphaned pool sandboxes survived the restart"
    assert web["network"]["netns"] in left
    [adopted] = ps()
    assert (adopted["name"], adopted["ip"]) == ("web", web["ip"])
    peer = run_web("peer", free_port(), examples)
    assert http_from(peer["network"]["netns"], web["ip"], port) == "hello from nova"
    assert nova("stop", "web").returncode == 0
    wait_for("the adopted container's netns to go", lambda: web["network"]["netns"]
             not in leftovers()["netns"])  # fmt: skip


async def _create_many(count: int, module: Path, started: list[str]) -> None:
    connector = aiohttp.UnixConnector(path=str(paths.socket_path()), limit=8)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def create(i: int) -> None:
            body = {"module": str(module), "argv": ["sleep", "20"], "name": f"c{i}"}
            if i % 3 == 0:
                body["namespace"] = "team-k"
            try:
                async with session.post("http://agent/v1/containers", json=body) as response:
                    if response.status == 201:
                        started.append(f"c{i}")
            except aiohttp.ClientError:
                pass  # the agent died under us: that start may or may not have happened

        await asyncio.gather(*(create(i) for i in range(count)))


def test_kill_9_during_100_creates_loses_nothing_and_leaks_nothing(
    start_agent: StartAgent,
    examples: Path,
) -> None:
    first = start_agent()
    started: list[str] = []

    def kill_midway() -> None:
        deadline = time.monotonic() + 60
        while len(started) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        first.proc.kill()

    loop = asyncio.new_event_loop()
    try:
        killer = loop.run_in_executor(None, kill_midway)
        loop.run_until_complete(_create_many(100, examples / "sleep.wasm", started))
        loop.run_until_complete(killer)
    finally:
        loop.close()
    first.proc.wait()
    assert 40 <= len(started) < 100, len(started)

    start_agent()
    rows = {r["name"]: r for r in ps("-a")}
    for name in started:  # every acknowledged start is still known, running, with its netns
        assert name in rows, f"{name} was acknowledged but lost"
        assert rows[name]["state"] == "running", rows[name]
        assert rows[name]["network"]["netns"] in leftovers()["netns"]
    running = {r["network"]["netns"] for r in rows.values() if r["state"] == "running"}
    left = set(leftovers()["netns"])
    pool = left - running
    assert len(pool) <= 2 + 2, f"more than the warm pools' sandboxes: {sorted(pool)}"
    ids = {r["id"] for r in rows.values() if r["state"] == "running"}
    assert owned_cgroups(os.environ["NOVA_CGROUP_ROOT"]) - ids == {
        ns.removeprefix("nova-ctr-") for ns in pool
    }
    for name, row in rows.items():
        if row["state"] == "running":
            assert nova("stop", name).returncode == 0
    wait_for("every container's netns to go", lambda: set(leftovers()["netns"]) <= pool, 30)


def test_1000_create_destroy_cycles_leave_the_host_as_before(
    start_agent: StartAgent,
    examples: Path,
) -> None:
    def host_state() -> dict[str, Any]:
        # Only what is this test's: other work on this machine may add links meanwhile.
        return {"nova": leftovers(), "cgroups": owned_cgroups(os.environ["NOVA_CGROUP_ROOT"])}

    before = host_state()
    agent = start_agent()
    module = examples / "hello.wasm"

    async def cycles(count: int) -> list[int]:
        connector = aiohttp.UnixConnector(path=str(paths.socket_path()), limit=4)
        codes: list[int] = []
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(i: int) -> None:
                body = {"module": str(module), "name": f"h{i}"}
                if i % 2:
                    body["namespace"] = "team-z"
                async with session.post("http://agent/v1/containers", json=body) as response:
                    codes.append(response.status)
                    name = (await response.json())["name"]
                async with session.get(f"http://agent/v1/containers/{name}/wait") as response:
                    await response.read()
                async with session.delete(f"http://agent/v1/containers/{name}") as response:
                    codes.append(response.status)

            sem = asyncio.Semaphore(4)

            async def bounded(i: int) -> None:
                async with sem:
                    await one(i)

            await asyncio.gather(*(bounded(i) for i in range(count)))
        return codes

    codes = asyncio.run(cycles(1000))
    assert sorted(set(codes)) == [200, 201], sorted(set(codes))
    assert ps("-a") == []
    assert agent.end() == 0
    after = host_state()
    assert after == before, json.dumps({"before": before, "after": after}, default=sorted)


# -- two hosts, one segment ------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_hosts(nova_dirs: Path) -> Iterator[tuple[str, str]]:
    """Host netns A and B (192.168.77.1 and .2) cabled to a switch netns: all this test's."""
    token = secrets.token_hex(3)
    switch, hosts = f"nvt-sw-{token}", (f"nvt-a-{token}", f"nvt-b-{token}")
    made: list[str] = []
    try:
        for name in (switch, *hosts):
            _ip("netns", "add", name)
            made.append(name)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, host in enumerate(hosts, start=1):
            port = f"port{i}"
            _ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", host)  # fmt: skip
            _ip("-n", switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", host, "addr", "add", f"192.168.77.{i}/24", "dev", "eth0")
            _ip("-n", host, "link", "set", "eth0", "up")
            _ip("-n", host, "link", "set", "lo", "up")
        yield hosts
    finally:
        for name in made:  # their links (bridges, veths, VXLAN devices) go with them
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def test_two_agents_on_two_hosts_share_a_segment_over_vxlan(
    two_hosts: tuple[str, str], nova_dirs: Path, examples: Path, no_leftover_processes: None
) -> None:
    cluster = IPv4Network(f"10.{node_cidr().network_address.packed[1]}.0.0/16")
    cidrs = [f"{cluster.network_address + 256 * (i + 1)}/24" for i in range(2)]
    roots = [f"nova-test-{secrets.token_hex(5)}" for _ in range(2)]
    agents: list[subprocess.Popen[bytes]] = []
    sockets = [nova_dirs / f"agent-{i}.sock" for i in range(2)]

    def on(i: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return nova(*args, env={**os.environ, "NOVA_SOCKET": str(sockets[i])})

    try:
        for i, host in enumerate(two_hosts):
            env = {**os.environ, "NOVA_CGROUP_ROOT": roots[i], "NOVA_SOCKET": str(sockets[i])}
            agents.append(
                subprocess.Popen(  # nsenter, not `ip netns exec`: that hides /sys/fs/cgroup
                    [
                        "nsenter",
                        f"--net=/var/run/netns/{host}",
                        *NOVA_AGENT,
                        "--standalone",
                        *POLICY_OFF,
                        "--node",
                        f"host-{i}",
                        "--state-dir",
                        str(nova_dirs / f"state-{i}"),
                        "--pool-size",
                        "1",
                        "--node-cidr",
                        cidrs[i],
                        "--cluster-cidr",
                        str(cluster),
                        "--vxlan-local",
                        f"192.168.77.{i + 1}",
                        "--vxlan-peers",
                        f"192.168.77.{2 - i}",
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=(nova_dirs / f"agent-{i}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )
        for i, sock in enumerate(sockets):
            wait_for(f"agent {i}", lambda s=sock: paths.socket_answers(s), 30)  # type: ignore[misc]
        ports = [free_port(), free_port(), free_port()]
        rows = []
        for i, port in enumerate(ports[:2]):
            result = on(i, "run", "-d", "--name", f"web{i}", "--port", str(port),
                        examples / "http-hello.wasm")  # fmt: skip
            assert result.returncode == 0, result.stderr
            [row] = json.loads(on(i, "ps", "--json").stdout)
            rows.append(row)
        result = on(1, "run", "-d", "--name", "other", "--namespace", "team-x", "--port",
                    str(ports[2]), examples / "http-hello.wasm")  # fmt: skip
        assert result.returncode == 0, result.stderr
        [other] = [r for r in json.loads(on(1, "ps", "--json").stdout) if r["name"] == "other"]

        a, b = rows
        assert IPv4Address(a["ip"]) in IPv4Network(cidrs[0])
        assert IPv4Address(b["ip"]) in IPv4Network(cidrs[1])
        # One segment across the hosts: L2 over VXLAN, both ways.
        assert http_from(a["network"]["netns"], b["ip"], ports[1]) == "hello from nova"
        assert http_from(b["network"]["netns"], a["ip"], ports[0]) == "hello from nova"
        # Another namespace on host B: no frame reaches A's container.
        assert http_from(other["network"]["netns"], a["ip"], ports[0], 1.0).startswith("error:")
        assert not ping_from(other["network"]["netns"], a["ip"])
        for i, name in ((0, "web0"), (1, "web1"), (1, "other")):
            assert on(i, "stop", name).returncode == 0
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        for root in roots:
            remove_cgroup_root(root)
    left = network_leftovers(NetworkUnderTest(cluster, range(0)))
    assert left["netns"] == [], left


def test_a_daemonless_run_gets_its_netns_on_the_same_segment(
    start_agent: StartAgent, examples: Path
) -> None:
    start_agent()
    port, own_port = free_port(), free_port()
    web = run_web("web", port, examples)
    before = set(leftovers()["netns"])
    daemonless = subprocess.Popen(
        [*NOVA, "run", "--no-agent", "--port", str(own_port), examples / "http-hello.wasm"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for("the daemonless run's netns", lambda: bool(set(leftovers()["netns"]) - before), 20)
        [netns] = set(leftovers()["netns"]) - before
        ip = in_netns(netns, "ip", "-4", "-o", "addr", "show", "dev", "eth0").split()[3]
        assert IPv4Address(ip.split("/")[0]) in node_cidr()
        wait_for(
            "the daemonless server",
            lambda: http_from(netns, "127.0.0.1", own_port, 0.5) == "hello from nova",
        )
        # The agent's container and the daemonless one share the default segment...
        assert http_from(web["network"]["netns"], ip.split("/")[0], own_port) == "hello from nova"
        assert http_from(netns, web["ip"], port) == "hello from nova"
        # ...and the published port answers on the host.
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, "127.0.0.1", str(own_port), "2"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert probe.stdout.strip() == "hello from nova"
    finally:
        daemonless.send_signal(signal.SIGINT)
        _, stderr = daemonless.communicate(timeout=30)
    assert daemonless.returncode == 0, stderr  # an HTTP server stopped on request
    assert netns not in leftovers()["netns"]


def test_an_idle_namespace_loses_its_pool_and_segment(
    start_agent: StartAgent, examples: Path
) -> None:
    start_agent("--namespace-pool-idle", "2s")
    result = nova("run", "--namespace", "team-q", examples / "hello.wasm")
    assert result.returncode == 0, result.stderr
    assert len(leftovers()["bridges"]) == 2  # default's and team-q's
    wait_for("team-q's pool and bridge to go", lambda: len(leftovers()["bridges"]) == 1, 20)
    assert len(leftovers()["netns"]) == 2  # the default pool's sandboxes only
    result = nova("run", "--namespace", "team-q", examples / "hello.wasm")  # and it comes back
    assert (result.returncode, result.stdout) == (0, "hello from wasm, world\n"), result.stderr


def test_runtime_launches_in_any_namespace_and_relabels_that_namespaces_pool(
    nova_dirs: Path, examples: Path
) -> None:
    """`launch(spec)` claims from the spec's namespace; the pool a worker came from
    carries the run's limits afterwards, so the next start there writes nothing."""
    from agent.isolation.cgroups import Limits
    from agent.sandbox.cgroups import SandboxCgroups, run_limits
    from agent.sandbox.network import NetworkConfig, SandboxNetwork
    from agent.sandbox.runtime import SandboxRuntime
    from agent.sandbox.spec import Isolation, RunSpec
    from nova.store import open_store

    async def scenario() -> None:
        cgroups = SandboxCgroups.for_host(os.environ["NOVA_CGROUP_ROOT"])
        assert cgroups is not None
        store = open_store(str(nova_dirs / "state.db"))
        await store.open()
        network = SandboxNetwork(
            store,
            node="t",
            config=NetworkConfig.parse(
                os.environ["NOVA_NODE_CIDR"], segment_ids=os.environ["NOVA_SEGMENT_IDS"]
            ),
        )
        await network.start()
        runtime = SandboxRuntime(
            str(nova_dirs / "cache"), pool_size=1, cgroups=cgroups, network=network,
            namespace_pool_size=1,
        )  # fmt: skip
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            await runtime.start()
            module = await runtime.resolve(str(examples / "hello.wasm"))
            spec = RunSpec(
                id="", name="t", digest=module.digest, artifact=str(module.artifact),
                module_path=str(examples / "hello.wasm"), argv=("hello",),
                isolation=Isolation.CGROUP, namespace="team-r", memory_bytes=32 << 20,
            )  # fmt: skip
            container = await runtime.launch(spec, (devnull, devnull, devnull))
            assert container.worker.network is not None
            assert container.worker.network.namespace == "team-r"
            assert (await container.wait()).exit_code == 0
            pool = runtime.pools["team-r"]
            wanted: Limits = run_limits(container.spec)
            deadline = time.monotonic() + 20
            while not (pool.idle and all(w.cgroup_limits == wanted for w in pool._idle)):
                assert time.monotonic() < deadline, "team-r's idle worker was not relabelled"
                await asyncio.sleep(0.05)
        finally:
            os.close(devnull)
            await runtime.close()
            await network.close()
            await store.close()

    asyncio.run(scenario())
    assert leftovers() == {"netns": [], "veths": [], "bridges": [], "routes": []}
