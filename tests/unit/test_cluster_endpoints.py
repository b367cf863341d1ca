"""Other nodes' published endpoints as policy peers (pure parsing)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address

from agent.cluster.endpoints import parse_entries
from nova.store import KVEntry, keys


def entry(node: str, value: object) -> KVEntry:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return KVEntry(key=keys.endpoints(node), value=raw, create_index=1, modify_index=1)


def test_other_nodes_endpoints_become_remote_peers_and_bad_entries_are_skipped() -> None:
    entries = [
        entry("n1", {"node": "n1", "endpoints": {"aaa": {"ip": "10.1.0.5", "namespace": "x",
                                                          "labels": {"app": "web"}}}}),
        entry("n2", {"node": "n2", "endpoints": {"bbb": {"ip": "10.1.1.7", "namespace": "x",
                                                          "labels": {"app": "client"}}}}),
        entry("n3", {"node": "n3", "endpoints": {"ccc": {"ip": "not-an-ip", "namespace": "x"}}}),
        entry("n4", b"{not json"),
    ]  # fmt: skip
    [peer] = parse_entries("n1", entries)  # n1 is this node: its own are local, not remote
    assert (peer.key, peer.ip, peer.namespace, dict(peer.labels), peer.host_ifname) == (
        "n2/bbb",
        IPv4Address("10.1.1.7"),
        "x",
        {"app": "client"},
        "",
    )
