"""`nova-agent --consul` against a real Consul, with real agents and real wasm.

What the coordinator and operators rely on: a node is visible and healthy in
Consul while its agent lives, and its key is released within the check TTL
when the agent dies; the agent runs exactly what its assignment says and never
restarts what did not change; an agent restart adopts instead of duplicating;
Consul going away stops nothing, and the status catches up when it returns.
Assignments are written by hand here, as the coordinator's leader would write
them (one /v1/txn).
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nova.images import ImageRef, push
from nova.store.consul import ConsulStore
from tests.cluster.conftest import ConsulAgent
from tests.conftest import process_alive
from tests.unit.test_agent import NOVA_AGENT, POLICY_OFF, api, listing, wait_for
from tests.unit.test_cli import nova

pytestmark = [
    pytest.mark.consul,
    pytest.mark.usefixtures("nova_dirs", "shared_module_cache", "no_leftover_processes"),
]

CHECK_TTL = 3.0  # agent/cluster/registration.py
RELEASE_BOUND = CHECK_TTL + 4.0  # TTL, Consul's reaper tick and a loaded 2-core host


# -- Consul, seen as an operator or the coordinator sees it ---------------------------


def consul_get(agent: ConsulAgent, path: str) -> Any:
    with urllib.request.urlopen(agent.url + path, timeout=5) as response:
        return json.loads(response.read() or b"null")


def consul_put(agent: ConsulAgent, path: str, body: Any) -> Any:
    request = urllib.request.Request(agent.url + path, data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read() or b"null")


def kv(agent: ConsulAgent, key: str) -> dict[str, Any] | None:
    try:
        entries = consul_get(agent, f"/v1/kv/{key}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return dict(entries[0]) if entries else None


def value_of(entry: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(entry["Value"]))


def statuses(agent: ConsulAgent, node: str) -> dict[str, dict[str, Any]]:
    try:
        entries = consul_get(agent, f"/v1/kv/nova/v1/status/{node}/?recurse")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise
    return {e["Key"].rsplit("/", 1)[1]: value_of(e) for e in entries or ()}


def assign(agent: ConsulAgent, node: str, containers: dict[str, dict[str, Any]]) -> None:
    """Write the node's assignment in one transaction, as the leader does."""
    doc = {"epoch": 1, "containers": containers}
    value = base64.b64encode(json.dumps(doc).encode()).decode()
    op = {"KV": {"Verb": "set", "Key": f"nova/v1/assignments/{node}", "Value": value}}
    result = consul_put(agent, "/v1/txn", [op])
    assert not result.get("Errors"), result


def replica(digest: str, index: int, *args: str, generation: int = 1) -> dict[str, Any]:
    return {
        "namespace": "default",
        "deployment": "sl",
        "replica": index,
        "digest": digest,
        "cpu_millicores": 100,
        "memory_bytes": 16 * 1024 * 1024,
        "labels": {},
        "args": list(args),
        "env": {},
        "generation": generation,
    }


def push_image(agent: ConsulAgent, module: Path) -> str:
    data = module.read_bytes()

    async def go() -> str:
        async with ConsulStore(agent.url) as store:
            return (await push(store, ImageRef.parse("sleep:test"), data)).digest

    return asyncio.run(go())


# -- the agent ----------------------------------------------------------------------


class ClusterAgent:
    """One `nova-agent --consul` subprocess on this test's dirs."""

    def __init__(self, tmp: Path, consul: ConsulAgent, node: str) -> None:
        self.log = tmp / f"agent-{time.monotonic_ns()}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*NOVA_AGENT, "--consul", consul.url, "--node", node, "--pool-size", "1",
                 "--labels", "zone=test", "--advertise", "127.0.0.1", *POLICY_OFF],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for("the agent's socket", self._ready, timeout=30)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"nova-agent exited with {self.proc.returncode}:\n{self.output()}")
        from nova import paths

        return paths.socket_answers(paths.socket_path())

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def end(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Any]:
    agents: list[ClusterAgent] = []

    def start(consul: ConsulAgent, node: str) -> ClusterAgent:
        agents.append(ClusterAgent(tmp_path, consul, node))
        return agents[-1]

    yield start
    for agent in agents:
        agent.end()


@pytest.fixture
def node() -> str:
    return f"nvac-{uuid.uuid4().hex[:8]}"


def running() -> dict[str, dict[str, Any]]:
    """Running containers by name (replica id)."""
    return {r["name"]: r for r in listing() if r["state"] == "running"}


def stop_everything(consul: ConsulAgent, node: str) -> None:
    assign(consul, node, {})
    wait_for("every replica to stop", lambda: not running(), timeout=20)


def health() -> dict[str, Any]:
    status, body = asyncio.run(api("GET", "/v1/health"))
    assert status == 200, body
    return dict(json.loads(body))


# -- registration -------------------------------------------------------------------


def test_registration_is_visible_and_released_when_the_agent_is_killed(
    consul_agent: ConsulAgent, start_agent: Any, node: str
) -> None:
    agent = start_agent(consul_agent, node)
    check_id = f"nova-agent:{node}"

    def registered() -> bool:
        entry = kv(consul_agent, f"nova/v1/nodes/{node}")
        return entry is not None and entry.get("Session") is not None

    wait_for("the node key to be held", registered)
    entry = kv(consul_agent, f"nova/v1/nodes/{node}")
    assert entry is not None
    info = value_of(entry)
    assert info["node"] == node
    assert (info["address"], info["segment_endpoint"]) == ("127.0.0.1", "127.0.0.1")
    assert info["labels"] == {"zone": "test"}
    assert info["capacity"]["cpu_millicores"] >= 1000
    assert info["capacity"]["memory_bytes"] > 0

    session = consul_get(consul_agent, f"/v1/session/info/{entry['Session']}")[0]
    assert session["Name"] == check_id
    assert session["LockDelay"] == 0
    assert check_id in [c["ID"] for c in session.get("ServiceChecks") or []]
    services = consul_get(consul_agent, "/v1/health/service/nova-agent")
    [mine] = [s for s in services if s["Service"]["ID"] == check_id]
    [check] = [c for c in mine["Checks"] if c["CheckID"] == check_id]
    assert check["Status"] == "passing"
    time.sleep(CHECK_TTL + 0.5)  # the heartbeat keeps it passing past its TTL
    [check] = [
        c
        for c in consul_get(consul_agent, "/v1/health/checks/nova-agent")
        if c["CheckID"] == check_id
    ]
    assert check["Status"] == "passing"

    killed = time.monotonic()
    agent.end(signal.SIGKILL)
    wait_for("the node key's release", lambda: not registered(), timeout=RELEASE_BOUND + 5)
    released_after = time.monotonic() - killed
    assert released_after < RELEASE_BOUND, released_after
    assert consul_get(consul_agent, f"/v1/session/info/{entry['Session']}") in (None, [])
    assert kv(consul_agent, f"nova/v1/nodes/{node}") is not None  # released, not deleted


# -- reconcile ------------------------------------------------------------------------


def test_assignment_changes_start_restart_and_stop_exactly_what_changed(
    consul_agent: ConsulAgent, start_agent: Any, node: str, examples: Path
) -> None:
    digest = push_image(consul_agent, examples / "sleep.wasm")
    start_agent(consul_agent, node)
    r0, r1, r2, flaky = (f"default.sl.{i}" for i in range(4))
    assign(consul_agent, node, {r0: replica(digest, 0, "60"), r1: replica(digest, 1, "60")})
    wait_for("two replicas", lambda: set(running()) == {r0, r1}, timeout=20)
    wait_for(
        "their status",
        lambda: (
            {k: v["state"] for k, v in statuses(consul_agent, node).items()}
            == {r0: "running", r1: "running"}
        ),
    )
    before = running()
    assert statuses(consul_agent, node)[r0]["container_id"] == before[r0]["id"]

    # r1 gets a new generation, r2 and a replica that exits at once are added: r0 untouched.
    assign(
        consul_agent,
        node,
        {
            r0: replica(digest, 0, "60"),
            r1: replica(digest, 1, "60", generation=2),
            r2: replica(digest, 2, "60"),
            flaky: replica(digest, 3, "0"),
        },
    )
    wait_for(
        "r1 replaced and r2 started",
        lambda: (now := running()).keys() >= {r0, r1, r2} and now[r1]["id"] != before[r1]["id"],
        timeout=20,
    )
    after = running()
    assert (after[r0]["id"], after[r0]["pid"]) == (before[r0]["id"], before[r0]["pid"])
    assert not process_alive(int(before[r1]["pid"]))
    wait_for(
        "the exiting replica to be started again",
        lambda: statuses(consul_agent, node).get(flaky, {}).get("restarts", 0) >= 2,
        timeout=20,
    )
    wait_for(
        "r1's status to show generation 2",
        lambda: (
            statuses(consul_agent, node)[r1]["generation"] == 2
            and statuses(consul_agent, node)[r1]["container_id"] == after[r1]["id"]
        ),
    )
    # Restarts do not pile up records: one container per replica is kept.
    assert sorted(r["name"] for r in listing()).count(flaky) == 1

    # r0 removed: stopped, and its status key goes.
    assign(
        consul_agent,
        node,
        {r1: replica(digest, 1, "60", generation=2), r2: replica(digest, 2, "60")},
    )
    wait_for("r0 and the flaky one to stop", lambda: set(running()) == {r1, r2}, timeout=20)
    assert not process_alive(int(before[r0]["pid"]))
    wait_for("their status keys to go", lambda: set(statuses(consul_agent, node)) == {r1, r2})
    assert running()[r2]["id"] == after[r2]["id"]
    stop_everything(consul_agent, node)
    wait_for("no status left", lambda: statuses(consul_agent, node) == {})


def test_a_restarted_agent_adopts_its_replicas_without_duplicates(
    consul_agent: ConsulAgent, start_agent: Any, node: str, examples: Path
) -> None:
    digest = push_image(consul_agent, examples / "sleep.wasm")
    first = start_agent(consul_agent, node)
    replicas = {f"default.sl.{i}": replica(digest, i, "60") for i in range(2)}
    assign(consul_agent, node, replicas)
    wait_for("two replicas", lambda: set(running()) == set(replicas), timeout=20)
    before = {name: r["id"] for name, r in running().items()}

    first.end(signal.SIGKILL)
    restarted = time.monotonic()
    start_agent(consul_agent, node)
    # Its earlier session is taken over at once, not after the TTL.
    wait_for("registration", lambda: health()["cluster"]["registered"], timeout=10)
    assert time.monotonic() - restarted < 10
    time.sleep(1.0)  # a reconcile pass had its chance to (wrongly) start duplicates
    assert {name: r["id"] for name, r in running().items()} == before
    assert len(listing()) == 2
    assert {k: v["container_id"] for k, v in statuses(consul_agent, node).items()} == before

    # A document the agent cannot read changes nothing: the last good one holds.
    op = {"KV": {"Verb": "set", "Key": f"nova/v1/assignments/{node}",
                 "Value": base64.b64encode(b'{"containers": 5}').decode()}}  # fmt: skip
    assert not consul_put(consul_agent, "/v1/txn", [op]).get("Errors")
    time.sleep(0.5)
    assert {name: r["id"] for name, r in running().items()} == before
    stop_everything(consul_agent, node)


# -- Consul going away ------------------------------------------------------------------


class PersistentConsul(ConsulAgent):
    """A single Consul server keeping its data across restarts, as in production."""

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("-dev")] = "-server"
        return [*command, "-bootstrap-expect", "1", "-hcl", "performance { raft_multiplier = 1 }"]


@pytest.fixture
def persistent_consul(consul_binary: str, tmp_path: Path) -> Iterator[ConsulAgent]:
    agent = PersistentConsul(consul_binary, tmp_path / "consul")
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def test_consul_down_keeps_containers_running_and_status_catches_up(
    persistent_consul: ConsulAgent, start_agent: Any, node: str, examples: Path
) -> None:
    consul = persistent_consul
    digest = push_image(consul, examples / "sleep.wasm")
    first = start_agent(consul, node)
    replicas = {f"default.sl.{i}": replica(digest, i, "60") for i in range(2)}
    assign(consul, node, replicas)
    wait_for("two replicas", lambda: set(running()) == set(replicas), timeout=20)
    wait_for("their status", lambda: len(statuses(consul, node)) == 2)
    pids = {name: int(r["pid"]) for name, r in running().items()}

    consul.stop()
    wait_for("the agent to notice", lambda: health()["cluster"]["store"] == "unavailable")
    shown = nova("ps")
    assert shown.returncode == 0
    assert "cluster store" in shown.stderr and "unavailable since" in shown.stderr
    _, metrics = asyncio.run(api("GET", "/metrics"))
    assert "nova_cluster_store_available 0.0" in metrics
    # A replica that ends meanwhile is started again from the last assignment.
    assert nova("stop", "default.sl.1").returncode == 0
    wait_for(
        "default.sl.1 to run again",
        lambda: (
            "default.sl.1" in (now := running())
            and int(now["default.sl.1"]["pid"]) != pids["default.sl.1"]
        ),
        timeout=15,
    )
    assert process_alive(pids["default.sl.0"])
    new_id = running()["default.sl.1"]["id"]

    # An agent restarted while Consul is away adopts and keeps everything.
    first.end()
    start_agent(consul, node)
    time.sleep(0.5)
    assert {n: r["id"] for n, r in running().items()} == {
        "default.sl.0": running()["default.sl.0"]["id"],
        "default.sl.1": new_id,
    }
    assert int(running()["default.sl.0"]["pid"]) == pids["default.sl.0"]

    consul.start()
    wait_for("the store to answer again", lambda: health()["cluster"]["store"] == "available",
             timeout=30)  # fmt: skip
    wait_for(
        "the status to catch up",
        lambda: statuses(consul, node).get("default.sl.1", {}).get("container_id") == new_id,
        timeout=15,
    )
    wait_for(
        "the node key to be held again",
        lambda: (kv(consul, f"nova/v1/nodes/{node}") or {}).get("Session") is not None,
        timeout=15,
    )
    assert set(running()) == set(replicas)  # nothing lost, nothing doubled
    assert int(running()["default.sl.0"]["pid"]) == pids["default.sl.0"]
    assert nova("ps").stderr == ""
    stop_everything(consul, node)


# -- nova run --image ---------------------------------------------------------------------


def test_nova_run_image_fetches_verifies_and_runs(
    consul_agent: ConsulAgent, start_agent: Any, node: str, examples: Path
) -> None:
    name = f"hello-{node}"
    module = examples / "hello.wasm"
    pushed = nova("image", "push", f"{name}:1", module, "--consul", consul_agent.url)
    assert pushed.returncode == 0, pushed.stderr
    digest = pushed.stdout.strip()
    start_agent(consul_agent, node)
    by_tag = nova("run", "--image", f"{name}:1", "-e", "NAME=cluster", "--", "a")
    assert (by_tag.returncode, by_tag.stderr) == (0, "")
    assert by_tag.stdout == "hello from wasm, cluster\narg[1]=a\n"
    by_digest = nova("run", "--image", digest, "-e", "NAME=digest")
    assert (by_digest.returncode, by_digest.stdout) == (0, "hello from wasm, digest\n")
    missing = nova("run", "--image", f"{name}:2")
    assert missing.returncode == 127
    assert f"no image {name}:2 in the cluster" in missing.stderr
