"""Faults in a multi-host lab: real processes in network namespaces, a 3-server Consul.

One lab for the module (tests/cluster/lab.py): hosts h0-h2 run Consul
servers, h3 a Consul client; every host runs a nova-agent; h1, h2 and h3
run nova-coordinator. One deployment of long-running containers is placed
at the start; each test injects a fault, checks what users rely on (a
leader within 5 s, every replica placed and running exactly once, the old
leader silent), and leaves the lab whole for the next test.

Times: "fault -> the new leader's first fenced write" is the `at` of the
term record (`nova/v1/coordinator/term`, written through the fence by each
new leader) minus the wall clock just before the fault. Same machine, same
clock.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from nova.store import keys
from tests.cluster.lab import Lab, coordinator_id
from tests.cluster.lab_nova import Cluster, log_time, wait_for

pytestmark = [pytest.mark.consul, pytest.mark.root]

FAILOVER_LIMIT = 5.0  # the promise: a standby leads within 5 s of the fault
CO_LOCATED_LIMIT = 10.0  # raft election (split votes happen) + 2 x session TTL + acquire
REPLICAS = 6
COORDINATOR_HOSTS = (1, 2, 3)


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Iterator[Cluster]:
    cluster = Cluster.start(lab, COORDINATOR_HOSTS)
    cluster.deploy(REPLICAS)
    cluster.wait_converged(60.0)
    yield cluster
    print(cluster.log_tails())  # shown when a test failed


def test_sigkilled_leader_is_replaced_within_5s_and_placements_stay(cluster: Cluster) -> None:
    placed_before = wait_for("stable placement", cluster.placed_once, 20.0)
    old = cluster.leader_host()
    old_term = cluster.term()
    assert old_term is not None
    process = cluster.coordinators[old.name]
    fault_at = time.time()
    process.kill()
    new_term = cluster.wait_new_term(old_term["epoch"], FAILOVER_LIMIT + 5)
    took = new_term["at"] - fault_at
    assert new_term["id"] != old_term["id"]
    assert took < FAILOVER_LIMIT, f"failover took {took:.2f} s"
    # The new leader runs its placement pass: nothing is lost, doubled or moved.
    time.sleep(2.0)
    assert cluster.placed_once() == placed_before
    cluster.wait_converged()
    cluster.start_coordinator(old)
    cluster.wait_standby(old)


def cut_leader_host(cluster: Cluster, limit: float) -> float:
    """Cut the Nova leader's host off; check that a standby leads within `limit` s and that
    the old leader stopped acting first and can no longer write; heal. Returns the time."""
    cluster.wait_converged()
    old = cluster.leader_host()
    old_term = cluster.term()
    assert old_term is not None
    _, old_session = cluster.lab.kv(keys.LEADER)[keys.LEADER]
    assert old_session is not None
    old_process = cluster.coordinators[old.name]
    fault_at = time.time()
    cluster.lab.cut(old)
    try:
        new_term = cluster.wait_new_term(old_term["epoch"], limit + 10)
        took: float = new_term["at"] - fault_at
        assert took < limit, f"failover took {took:.2f} s"
        # The old leader fenced itself: it stopped acting before the new leader's first write.
        stopped_at = wait_for(
            "the old leader logging that it stopped acting",
            lambda: log_time(
                old_process, rf"stopped acting as leader \(epoch {old_term['epoch']}\)"
            ),
            5.0,
        )
        assert fault_at < stopped_at < new_term["at"], (fault_at, stopped_at, new_term["at"])
        # Asked inside its host (its loopback still works), it says it does not act.
        inside = old.run(
            sys.executable, "-c",
            "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            f"'{cluster.lab.coordinator_api(old)}/v1/status', timeout=10).read().decode())",
            check=False,
        )  # fmt: skip
        if inside:  # the API may fail for want of Consul; if it answers, it must not act
            assert json.loads(inside).get("coordinator", {}).get("acting") is not True
        # Its session is gone: a write fenced on it is refused by the servers.
        stale = urllib.request.Request(
            f"{cluster.lab.reachable()[0].consul_url}/v1/txn",
            data=json.dumps([
                {"KV": {"Verb": "check-session", "Key": keys.LEADER, "Session": old_session}},
                {"KV": {"Verb": "set", "Key": keys.ROOT + "lab-stale", "Value": ""}},
            ]).encode(),
            method="PUT",
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(stale, timeout=5)
        assert refused.value.code == 409
    finally:
        cluster.lab.heal(old)
    # Whole again: the old coordinator stands by, every replica runs once (those of the
    # cut-off node may have moved; when it came back none may remain twice).
    cluster.lab.wait_consul()
    cluster.wait_standby(old)
    cluster.wait_converged(60.0)
    return took


def test_cut_off_leader_host_is_replaced_and_the_old_leader_stops(cluster: Cluster) -> None:
    # The Consul raft leader elsewhere: the case the 5 s promise is about (see the next test).
    leader = cluster.leader_host()
    if cluster.lab.consul_leader() is leader:
        cluster.lab.move_raft_leader(next(h for h in cluster.lab.servers if h is not leader))
    cut_leader_host(cluster, FAILOVER_LIMIT)


def test_cut_off_host_of_both_leaders_nova_and_consul_raft(cluster: Cluster) -> None:
    """The Nova leader and the Consul raft leader on one host, cut off together.

    Consul elects a raft leader first (~1-3 s with raft_multiplier 1), and a new
    raft leader restarts every session's TTL timer (2 x 1 s): the standby can only
    lead after both. Measured ~5-5.5 s here, so the 5 s promise does not hold in
    this case; the bound asserted is that sum with room for a loaded machine.
    """
    lab = cluster.lab
    leader = cluster.leader_host()
    if leader not in lab.servers:  # hand the lead to a coordinator on a server host
        cluster.coordinators[leader.name].stop()  # resigns: a standby leads at once
        cluster.start_coordinator(leader)
        cluster.wait_standby(leader)
        leader = cluster.leader_host()
    assert leader in lab.servers
    lab.move_raft_leader(leader)
    took = cut_leader_host(cluster, CO_LOCATED_LIMIT)
    print(f"failover with the raft leader cut off too: {took:.2f} s")


def test_consul_server_leader_killed_election_and_placement_continue(cluster: Cluster) -> None:
    cluster.wait_converged()
    raft_leader = cluster.lab.consul_leader()
    assert raft_leader is not None
    term_before = cluster.term()
    assert term_before is not None
    cluster.lab.consul[raft_leader.name].kill()
    try:
        new_raft = wait_for(
            "a new Consul raft leader",
            lambda: (h := cluster.lab.consul_leader()) and h is not raft_leader and h,
            15.0,
        )
        assert new_raft is not raft_leader
        # Some coordinator acts (the same one, or a new one if the leader lived there) ...
        wait_for(
            "a coordinator acting as leader",
            lambda: any(
                cluster.status_of(cluster.host(n))["coordinator"]["acting"]
                for n, p in cluster.coordinators.items()
                if p.alive() and n != raft_leader.name
            ),
            15.0,
        )
        # ... and places: one more replica is assigned exactly once.
        cluster.deploy(REPLICAS + 1)
        wait_for("the added replica placed", cluster.placed_once, 20.0)
    finally:
        cluster.lab.start_consul(raft_leader)
        cluster.lab.wait_consul()
    if coordinator_id(raft_leader) == term_before["id"]:
        cluster.wait_standby(raft_leader)
    cluster.deploy(REPLICAS)
    cluster.wait_converged(60.0)


def test_killed_agent_containers_move_and_none_remain_twice(cluster: Cluster) -> None:
    before = cluster.wait_converged()
    by_node: dict[str, int] = {}
    for node, _ in before.values():
        by_node[node] = by_node.get(node, 0) + 1
    victim = cluster.host(max(by_node, key=lambda n: by_node[n]))
    cluster.agents[victim.name].kill()

    def moved_off() -> dict[str, tuple[str, str]] | None:
        running = cluster.converged(ignore=victim.name)
        return running if running and all(n != victim.name for n, _ in running.values()) else None

    # Its node goes unhealthy (TTL check critical), its replicas are placed elsewhere and run.
    moved = wait_for(f"the replicas of {victim.name} running elsewhere", moved_off, 45.0, 0.25)
    assert set(moved) == set(before)
    # The agent returns: it adopts its old containers, sees they are no longer its own,
    # and stops them; no replica runs twice.
    cluster.agents[victim.name] = cluster.lab.start_agent(victim)
    wait_for(
        f"{victim.name} registered again",
        lambda: cluster.lab.kv(keys.node(victim.name))[keys.node(victim.name)][1],
        30.0,
    )
    time.sleep(3.0)  # its reconcile pass
    after = cluster.wait_converged()
    assert set(after) == set(before)


def test_restart_everything_converges_to_the_same_desired_state(cluster: Cluster) -> None:
    before = cluster.wait_converged()
    term_before = cluster.term()
    assert term_before is not None
    lab = cluster.lab
    for process in [*cluster.coordinators.values(), *cluster.agents.values()]:
        process.stop()
    for host in lab.hosts:
        lab.consul[host.name].stop()
    for host in lab.hosts:
        lab.start_consul(host)
    lab.wait_consul()
    for host in lab.hosts:
        cluster.agents[host.name] = lab.start_agent(host)
    for i in COORDINATOR_HOSTS:
        cluster.start_coordinator(lab.hosts[i])
    cluster.wait_new_term(term_before["epoch"], 30.0)
    wait_for(
        "every agent registered with a new session",
        lambda: all(lab.kv(keys.node(h.name))[keys.node(h.name)][1] is not None for h in lab.hosts),
        30.0,
    )
    time.sleep(2.0)  # a placement pass of the new leader and a reconcile pass of each agent
    after = cluster.wait_converged(90.0)
    assert set(after) == set(before) == cluster.desired()
    # Containers whose node did not change are adopted, not restarted: the new leader
    # keeps a node's replicas while its agent re-registers (the placer's rejoin grace).
    restarted = [
        f"{rid} on {node}"
        for rid, (node, container) in after.items()
        if before[rid][0] == node and container != before[rid][1]
    ]
    assert not restarted, f"a full restart restarted containers: {restarted}"
