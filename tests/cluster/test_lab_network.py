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

import urllib.request
from collections.abc import Iterator
from functools import partial
from ipaddress import IPv4Address
from typing import Any

import pytest

from tests.cluster.lab import Lab
from tests.cluster.lab_nova import IMAGE, Cluster, agent_get, http_json, wait_for
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


POLICY = """\
apiVersion: nova.sh/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: lab}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: client}}}]
"""


def test_a_policy_selects_peers_on_other_hosts(cluster: Cluster) -> None:
    """podSelector peers match containers on any host (endpoints shared through Consul)."""
    for name, labels, replicas in (("web", {"app": "web"}, 1), ("client", {"app": "client"}, 3)):
        http_json(
            cluster.api() + "/v1/deployments",
            {"namespace": "lab", "name": name, "image": IMAGE, "replicas": replicas,
             "cpu_millicores": 100, "memory_bytes": 64 << 20, "args": ["3600"],
             "labels": labels},
        )  # fmt: skip
    wanted = {"lab.web.0", "lab.client.0", "lab.client.1", "lab.client.2", "lab.a.0"}

    def all_up() -> dict[str, dict[str, Any]] | None:
        found = containers(cluster)
        return found if wanted <= set(found) else None

    running = wait_for("web and its clients running", all_up, 60.0, every=0.25)
    web = running["lab.web.0"]
    remote = [c for c in running.values() if c["node"] != web["node"]]
    clients = [c for rid, c in running.items() if rid.startswith("lab.client.") and c in remote]
    strangers = [c for rid, c in running.items() if rid.startswith("lab.a.") and c in remote]
    assert clients and strangers, f"no client/stranger on another host than web: {running}"
    key = "nova/v1/policies/lab/web-from-client"
    put = urllib.request.Request(
        f"{cluster.lab.hosts[0].consul_url}/v1/kv/{key}", data=POLICY.encode(), method="PUT"
    )
    urllib.request.urlopen(put, timeout=5).read()
    web_agent = cluster.lab.agent_socket(cluster.host(web["node"]))

    def enforced() -> bool:
        status = agent_get(web_agent, "/v1/policies")
        return bool(status["policies"] == 1 and not status["pending"] and status["endpoints"])

    try:
        # No probe before the policy is in the kernel: a flow seen before would stay
        # tracked (established), as conntrack keeps it on nftables.
        wait_for("web's agent to enforce the policy", enforced, 30.0)
        for client in clients:  # allowed by label, though it runs on another host
            assert ping_from(client["netns"], web["ip"]), f"client on {client['node']} denied"
        for stranger in strangers:  # same namespace, other labels, other host
            assert not ping_from(stranger["netns"], web["ip"]), stranger
    finally:
        delete = urllib.request.Request(
            f"{cluster.lab.hosts[0].consul_url}/v1/kv/{key}", method="DELETE"
        )
        urllib.request.urlopen(delete, timeout=5).read()
    wait_for("access restored", lambda: ping_from(strangers[0]["netns"], web["ip"]), 30.0)
