"""Real `nova-coordinator` processes on a real Consul: the API, `nova status`/`deploy`, placement.

What users rely on: any coordinator answers `nova status` (leader, epoch,
nodes and their health) and `nova deploy`; only the leader places; a standby
that takes over adopts the placements and moves nothing; placement honours
capacity (no overcommit), constraints, spread and the strategy; a failed
node's replicas move and do not come back doubled. Nodes are simulated here
(node keys held by the test's session); test_reschedule.py runs real agents.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from agent.cluster.assignments import parse_assignment
from tests.cluster.conftest import ConsulAgent
from tests.cluster.coordinators import (
    Coordinator,
    SimulatedNodes,
    assignments,
    http,
    placed,
)
from tests.unit.test_agent import wait_for
from tests.unit.test_cli import nova

pytestmark = pytest.mark.consul

TAKEOVER_BOUND = 10.0  # check TTL 1.5 s + Consul's reaper + a loaded 2-core host


def push(consul: ConsulAgent, examples: Path) -> None:
    done = nova("image", "push", "sleep:1", examples / "sleep.wasm", "--consul", consul.url)
    assert done.returncode == 0, done.stderr


def deploy(coordinators: list[Coordinator], *args: str | Path) -> Any:
    urls = ",".join(c.url for c in coordinators)
    return nova("deploy", *args, "--coordinator", urls)


def status(coordinator: Coordinator) -> dict[str, Any]:
    done = nova("status", "--json", "--coordinator", coordinator.url)
    assert done.returncode == 0, done.stderr
    body: dict[str, Any] = json.loads(done.stdout)
    return body


def settled(coordinator: Coordinator, replicas: int) -> dict[str, Any]:
    """Wait until the leader's last pass covers `replicas` and none is pending."""

    def done() -> bool:
        last = http(coordinator.url + "/v1/placement")["last_pass"]
        return bool(last) and last["replicas"] + last["unplaced"] == replicas

    wait_for(f"a placement pass over {replicas} replicas", done, timeout=15)
    time.sleep(0.3)  # a later change's pass, if any, lands too
    last: dict[str, Any] = http(coordinator.url + "/v1/placement")["last_pass"]
    return last


def per_node(consul: ConsulAgent) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in placed(consul).values():
        out[node] = out.get(node, 0) + 1
    return out


def test_status_deploy_and_a_takeover_that_moves_nothing(
    private_consul: ConsulAgent, tmp_path: Path, examples: Path
) -> None:
    push(private_consul, examples)
    nodes = SimulatedNodes(private_consul)
    for name, zone in (("n-a", "a"), ("n-b", "b"), ("n-c", "a")):
        nodes.add(name, zone=zone)
    first = Coordinator(tmp_path, private_consul, "coord-a")
    wait_for("coord-a to lead", first.acting)
    second = Coordinator(tmp_path, private_consul, "coord-b")

    # Any coordinator answers: the standby names the leader and its epoch.
    seen = status(second)
    assert seen["leader"]["id"] == "coord-a"
    assert seen["leader"]["api"] == first.url
    epoch = seen["leader"]["epoch"]
    assert epoch >= 1
    assert seen["coordinator"] == seen["coordinator"] | {"id": "coord-b", "acting": False}
    assert sorted((n["node"], n["healthy"]) for n in seen["nodes"]) == [
        ("n-a", True), ("n-b", True), ("n-c", True)
    ]  # fmt: skip
    text = nova("status", "--coordinator", second.url).stdout
    assert f"coord-a ({first.url}), epoch {epoch}" in text
    assert "3 (3 healthy, 0 failed)" in text

    done = deploy([second, first], "web", "--image", "sleep:1", "--replicas", "6",
                  "--cpu", "500m", "--memory", "64Mi", "--arg", "60")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "created default/web: 6 x sleep:1" in done.stdout
    settled(first, 6)
    assert per_node(private_consul) == {"n-a": 2, "n-b": 2, "n-c": 2}  # spread over nodes
    docs = assignments(private_consul)
    for node, doc in docs.items():  # what the agents read, in the agents' own parser
        parsed = parse_assignment(doc, where=node)
        assert parsed.epoch == epoch
        assert {d.deployment for d in parsed.replicas.values()} == {"web"}
        assert all(d.args == ("60",) and d.cpu_millicores == 500 for d in parsed.replicas.values())
    before = placed(private_consul)
    assert nova("status", "--coordinator", first.url).stdout.count("healthy  127.0.0.1") == 3
    standby_view = status(second)  # the standby asks the leader for the per-node counts
    assert standby_view["replicas_assigned"] == 6
    assert {n["node"]: n["assigned"] for n in standby_view["nodes"]} == per_node(private_consul)

    first.end(signal.SIGKILL)
    killed = time.monotonic()
    wait_for("coord-b to lead", second.acting, timeout=TAKEOVER_BOUND + 5)
    assert time.monotonic() - killed < TAKEOVER_BOUND
    now = status(second)
    assert (now["leader"]["id"], now["coordinator"]["acting"]) == ("coord-b", True)
    assert now["leader"]["epoch"] > epoch
    term = http(private_consul.url + "/v1/kv/nova/v1/coordinator/term?raw")
    assert term["id"] == "coord-b"
    assert term["epoch"] == now["leader"]["epoch"]
    settled(second, 6)
    # Adopted: the same placement, and not even rewritten (the old epoch is still there).
    assert placed(private_consul) == before
    assert {doc["epoch"] for doc in assignments(private_consul).values()} == {epoch}
    assert http(second.url + "/v1/placement")["last_pass"]["written"] == 0

    done = deploy([second], "web", "--image", "sleep:1", "--replicas", "3",
                  "--cpu", "500m", "--memory", "64Mi", "--arg", "60")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "updated default/web" in done.stdout
    settled(second, 3)
    kept = placed(private_consul)
    assert len(kept) == 3
    assert all(before[r] == node for r, node in kept.items())  # scaling down moves nothing
    assert second.end() == 0  # SIGTERM: a clean exit, the lock released


def test_capacity_constraints_spread_and_files(
    private_consul: ConsulAgent, tmp_path: Path, examples: Path
) -> None:
    push(private_consul, examples)
    nodes = SimulatedNodes(private_consul)
    nodes.add("small-ssd", cpu_millicores=1000, zone="a", disk="ssd")
    nodes.add("big-a", cpu_millicores=8000, zone="a", disk="hdd")
    nodes.add("big-b", cpu_millicores=8000, zone="b", disk="hdd")
    leader = Coordinator(tmp_path, private_consul, "coord")
    wait_for("the coordinator to lead", leader.acting)

    # Only the ssd node qualifies, and it has room for two: the third stays unplaced.
    done = deploy([leader], "db", "--image", "sleep:1", "--replicas", "3", "--cpu", "400m",
                  "--constraint", "disk=ssd")  # fmt: skip
    assert done.returncode == 0, done.stderr
    last = settled(leader, 3)
    assert (last["unplaced"], last["unplaced_by_reason"]) == (1, {"insufficient-resources": 1})
    assert (
        "1 unplaced (1 insufficient-resources)"
        in nova("status", "--coordinator", leader.url).stdout
    )
    assert set(placed(private_consul).values()) == {"small-ssd"}
    assert per_node(private_consul) == {"small-ssd": 2}

    # Spread across zones first: with two zones, two replicas land one per zone.
    spec = tmp_path / "web.yaml"
    spec.write_text(
        "apiVersion: nova.sh/v1\nkind: Deployment\n"
        "metadata: {name: web, namespace: team-a, labels: {app: web}}\n"
        "spec:\n  image: sleep:1\n  replicas: 2\n  resources: {cpu: 1, memory: 32Mi}\n"
        "  constraints: ['disk notin (ssd)']\n  spread: zone\n  args: ['60']\n"
        "  env: {MODE: test}\n"
    )
    done = deploy([leader], "-f", spec)
    assert done.returncode == 0, done.stderr
    assert "created team-a/web" in done.stdout
    settled(leader, 5)
    web = {r: n for r, n in placed(private_consul).items() if r.startswith("team-a.web.")}
    assert sorted(web.values()) == ["big-a", "big-b"]
    doc = assignments(private_consul)["big-a"]["containers"]
    [entry] = [v for k, v in doc.items() if k.startswith("team-a.web.")]
    assert (entry["env"], entry["labels"], entry["cpu_millicores"]) == (
        {"MODE": "test"}, {"app": "web"}, 1000
    )  # fmt: skip

    # Removing a deployment stops its replicas: its entries leave the assignments.
    done = deploy([leader], "db", "--delete")
    assert done.returncode == 0, done.stderr
    wait_for("db's replicas to go", lambda: "default.db.0" not in placed(private_consul))
    assert assignments(private_consul)["small-ssd"]["containers"] == {}
    leader.end()


def test_bin_pack_fills_one_node_before_the_next(
    private_consul: ConsulAgent, tmp_path: Path, examples: Path
) -> None:
    push(private_consul, examples)
    nodes = SimulatedNodes(private_consul)
    for name in ("p1", "p2", "p3"):
        nodes.add(name, cpu_millicores=4000)
    leader = Coordinator(tmp_path, private_consul, "coord", "--strategy", "bin-pack")
    wait_for("the coordinator to lead", leader.acting)
    for i in range(3):
        done = deploy([leader], f"job-{i}", "--image", "sleep:1", "--cpu", "1")
        assert done.returncode == 0, done.stderr
        settled(leader, i + 1)
    assert len(set(placed(private_consul).values())) == 1  # all three on one node
    leader.end()


def test_usage_and_refusals(private_consul: ConsulAgent, tmp_path: Path) -> None:
    leader = Coordinator(tmp_path, private_consul, "coord")
    done = deploy([leader], "web", "--image", "missing:1")
    assert done.returncode == 125
    assert "no image missing:1" in done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: nova.sh/v1\nkind: Deployment\nspec: {image: a, replicaz: 2}\n")
    done = deploy([leader], "-f", bad)
    assert done.returncode == 2
    assert "unknown field spec.replicaz" in done.stderr
    done = deploy([leader], "Bad/Name", "--image", "sleep:1")
    assert done.returncode == 2
    assert "deployment name" in done.stderr
    done = nova("status", "--coordinator", "http://127.0.0.1:9")  # nothing listens there
    assert done.returncode == 125
    assert "no coordinator answered" in done.stderr
    leader.end()


def test_a_failed_node_s_replicas_move_and_never_come_back_doubled(
    private_consul: ConsulAgent, tmp_path: Path, examples: Path
) -> None:
    push(private_consul, examples)
    nodes = SimulatedNodes(private_consul)
    for name in ("f1", "f2", "f3"):
        nodes.add(name)
    leader = Coordinator(tmp_path, private_consul, "coord")
    wait_for("the coordinator to lead", leader.acting)
    done = deploy([leader], "web", "--image", "sleep:1", "--replicas", "6")
    assert done.returncode == 0, done.stderr
    settled(leader, 6)
    before = placed(private_consul)
    lost = {r for r, n in before.items() if n == "f1"}
    assert len(lost) == 2

    nodes.fail("f1")
    wait_for("f1's replicas to move", lambda: "f1" not in placed(private_consul).values())
    after = placed(private_consul)
    assert set(after) == set(before)  # every replica still placed, each once (placed() checks)
    assert all(after[r] == before[r] for r in before if r not in lost)  # the others stay
    assert assignments(private_consul)["f1"]["containers"] == {}  # f1 must stop them on return
    failed = status(leader)
    assert [n["healthy"] for n in failed["nodes"] if n["node"] == "f1"] == [False]

    nodes.add("f1")  # the node returns
    wait_for("f1 healthy again", lambda: all(n["healthy"] for n in status(leader)["nodes"]))
    time.sleep(0.5)
    assert placed(private_consul) == after  # nothing moves back, nothing is doubled
    leader.end()
