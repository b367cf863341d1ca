"""Containers of one Nova namespace on different hosts reach each other over VXLAN.

A lab of 4 hosts whose agents give every container its own netns on its
namespace's segment (`Lab.with_container_network()`: one node CIDR per host
inside a cluster CIDR, segment ids from Consul, VXLAN peers from the node
inventory). The coordinator places replicas; each container is probed from
inside another container's netns with ping (the sleeper app listens on
nothing, and deployments publish no ports yet), so what is tested is the
path: container -> its host's bridge -> VXLAN -> the other host's bridge
-> container, and that another namespace's segment does not join it.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from ipaddress import IPv4Address
from typing import Any

import pytest

from tests.cluster.lab import Lab
from tests.cluster.lab_nova import Cluster, agent_get, wait_for
from tests.linux.test_container_network import ping_from

pytestmark = [pytest.mark.consul, pytest.mark.root]


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Iterator[Cluster]:
    lab.with_container_network()
    cluster = Cluster.start(lab, coordinator_hosts=(1,))
    cluster.deploy(4, namespace="lab", name="a")
    cluster.deploy(1, namespace="other", name="b")
    yield cluster
    print(cluster.log_tails())  # shown when a test failed


def containers(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Every running container with a network, by replica id, with its node."""
    found: dict[str, dict[str, Any]] = {}
    for host in cluster.lab.hosts:
        for record in agent_get(cluster.lab.agent_socket(host), "/v1/containers"):
            if record.get("network"):
                found[record["name"]] = {**record["network"], "node": host.name}
    return found


def running_containers(cluster: Cluster) -> dict[str, dict[str, Any]]:
    wanted = {"lab.a.0", "lab.a.1", "lab.a.2", "lab.a.3", "other.b.0"}

    def all_up() -> dict[str, dict[str, Any]] | None:
        found = containers(cluster)
        return found if set(found) == wanted else None

    return wait_for("5 containers running with networks", all_up, 60.0, every=0.25)


def test_same_namespace_reaches_across_hosts_over_vxlan(cluster: Cluster) -> None:
    lab = cluster.lab
    running = running_containers(cluster)
    ours = [running[f"lab.a.{i}"] for i in range(4)]
    # Each container has an address from its own node's CIDR.
    for net in running.values():
        node = next(h for h in lab.hosts if h.name == net["node"])
        assert IPv4Address(net["ip"]) in lab.node_cidr(node)
    pairs = [(a, b) for a in ours for b in ours if a["node"] != b["node"]]
    assert pairs, f"the replicas all landed on one node: {[c['node'] for c in ours]}"
    for a, b in pairs:
        assert a["segment_id"] == b["segment_id"]
        # A first ping may wait for ARP over the flood list: retry briefly.
        wait_for(f"{a['node']} -> {b['node']}", partial(ping_from, a["netns"], b["ip"]), 10.0)


def test_other_namespace_is_another_segment(cluster: Cluster) -> None:
    running = running_containers(cluster)
    ours = [running[f"lab.a.{i}"] for i in range(4)]
    other = running["other.b.0"]
    assert other["segment_id"] != ours[0]["segment_id"]
    for target in ours:
        assert not ping_from(other["netns"], target["ip"]), f"other.b.0 reached {target['node']}"
