"""The coordinator's record conversions and the CLI's Deployment files, without I/O.

What the cluster relies on: an assignment value is exactly what `encode_json`
would write (so agents parse it and equal placements give equal bytes), it
round-trips through `split_assignment`, and bad records are refused with a
message naming the key and field.
"""

from __future__ import annotations

import json

import pytest

from agent.cluster.assignments import parse_assignment
from coordinator.placement import ReplicaId, Selector
from coordinator.placer import UNKNOWN_BODY, Encoded, Placer
from coordinator.state import (
    AssignmentEncoder,
    DeploymentSpec,
    RecordError,
    node_of,
    parse_selector,
    split_assignment,
)
from nova import errors
from nova.cli.cluster import deployment_from_doc, format_status
from nova.store import KVEntry, encode_json

DIGEST = "sha256:" + "ab" * 32


def spec(**changes: object) -> DeploymentSpec:
    base = {"namespace": "team-a", "name": "web", "image": "web:1", "digest": DIGEST,
            "replicas": 3, "cpu_millicores": 250, "memory_bytes": 64 << 20,
            "labels": {"app": "web"}, "constraints": {"zone": "a"}, "args": ["-v"],
            "env": {"K": "é"}, "spread": "zone"}  # fmt: skip
    return DeploymentSpec.from_json(base | changes)


def entry(key: str, value: bytes, session: str | None = None) -> KVEntry:
    return KVEntry(key, value, 1, 1, session=session)


def test_assignment_values_are_canonical_json_the_agent_reads() -> None:
    specs = [spec(), spec(name="db", args=[], env={})]
    encoder = AssignmentEncoder(specs)
    replicas = [ReplicaId("team-a", "db", 0), ReplicaId("team-a", "web", 2)]
    value = AssignmentEncoder.value(encoder.body(replicas), 7)
    doc = json.loads(value)
    assert value == encode_json(doc)  # byte-identical to the canonical encoding
    parsed = parse_assignment(doc, where="test")
    assert parsed.epoch == 7
    web = parsed.replicas["team-a.web.2"]
    assert (web.deployment, web.replica, web.digest, web.args) == ("web", 2, DIGEST, ("-v",))
    assert dict(web.env) == {"K": "é"}

    node, body, placements = split_assignment(entry("nova/v1/assignments/n1", value))
    assert (node, body) == ("n1", encoder.body(replicas))
    assert sorted(p.replica for p in placements) == replicas
    empty = AssignmentEncoder.value(encoder.body([]), 1)
    assert json.loads(empty) == {"containers": {}, "epoch": 1}


def test_deployment_specs_map_to_requests_and_refuse_bad_fields() -> None:
    request = spec().request()
    assert request.constraints == (Selector.equals("zone", "a"),)
    assert spec().constraints == ("zone=a",)  # a mapping is equalities
    assert request.spread_key == "zone"
    assert spec().same_spec(spec(generation=4))
    assert not spec().same_spec(spec(replicas=4))
    for bad, says in (
        ({"replicas": -1}, "replicas must be an integer >= 0"),
        ({"name": "a/b"}, "must not contain '/'"),
        ({"digest": "latest"}, "image digest"),
        ({"args": "x"}, "args must be a list of strings"),
        ({"spread": "a b"}, "spread label"),
        ({"constraints": ["zone in ()"]}, r"constraint 'zone in \(\)'"),
        ({"constraints": ["zone (a)"]}, "is not one of"),
        ({"constraints": "zone=a"}, "must be a list of expressions or a mapping"),
    ):
        with pytest.raises(RecordError, match=says):
            spec(**bad)


@pytest.mark.parametrize(
    ("text", "selector", "canonical"),
    [
        ("disk=ssd", Selector.equals("disk", "ssd"), "disk=ssd"),
        (" disk = ssd ", Selector.equals("disk", "ssd"), "disk=ssd"),
        ("tier!=edge", Selector.none_of("tier", "edge"), "tier notin (edge)"),
        ("zone in (b, a)", Selector.one_of("zone", "a", "b"), "zone in (a,b)"),
        ("zone notin (a)", Selector.none_of("zone", "a"), "zone notin (a)"),
        ("gpu", Selector.exists("gpu"), "gpu"),
        ("!gpu", Selector.absent("gpu"), "!gpu"),
    ],
)
def test_constraint_expressions(text: str, selector: Selector, canonical: str) -> None:
    assert parse_selector(text) == selector
    assert str(selector) == canonical
    assert parse_selector(canonical) == selector  # what the spec stores parses back the same
    assert spec(constraints=[text, "disk=ssd"]).request().constraints == tuple(
        sorted({selector, Selector.equals("disk", "ssd")})
    )


def test_node_keys_health_is_the_session() -> None:
    value = encode_json({"capacity": {"cpu_millicores": 2000, "memory_bytes": 1 << 30},
                         "labels": {"zone": "a"}})  # fmt: skip
    assert node_of(entry("nova/v1/nodes/n1", value, session="s")).healthy
    released = node_of(entry("nova/v1/nodes/n1", value))
    assert (released.name, released.healthy, released.labels["zone"]) == ("n1", False, "a")
    with pytest.raises(RecordError, match="nova/v1/nodes/n2: expected an object with a capacity"):
        node_of(entry("nova/v1/nodes/n2", b'{"labels": {}}'))


def test_deployment_files() -> None:
    doc = {"apiVersion": "nova.sh/v1", "kind": "Deployment",
           "metadata": {"name": "web", "namespace": "t", "labels": {"app": "web"}},
           "spec": {"image": "web:1", "replicas": 2,
                    "resources": {"cpu": "250m", "memory": "32Mi"}, "constraints": {"disk": "ssd"},
                    "spread": "zone", "args": [1], "env": {"A": 1}}}  # fmt: skip
    assert deployment_from_doc(doc, "web.yaml") == {
        "name": "web", "namespace": "t", "labels": {"app": "web"}, "image": "web:1",
        "replicas": 2, "cpu_millicores": 250, "memory_bytes": 32 << 20,
        "constraints": {"disk": "ssd"}, "env": {"A": "1"}, "spread": "zone", "args": ["1"],
    }  # fmt: skip
    with pytest.raises(errors.UsageError, match=r"web\.yaml: expected apiVersion: nova\.sh/v1"):
        deployment_from_doc({"kind": "Deployment"}, "web.yaml")
    with pytest.raises(errors.UsageError, match=r"unknown field spec\.replica"):
        deployment_from_doc(doc | {"spec": {"replica": 2}}, "web.yaml")


def test_status_text_names_the_leader_epoch_and_failed_nodes() -> None:
    body = {
        "leader": {"id": "c1", "api": "http://c1:8600", "epoch": 4},
        "coordinator": {"id": "c2", "acting": False},
        "nodes": [
            {
                "node": "n1",
                "healthy": True,
                "address": "10.0.0.1",
                "assigned": 3,
                "capacity": {"cpu_millicores": 2000, "memory_bytes": 1 << 30},
                "labels": {"z": "a"},
            },
            {
                "node": "n2",
                "healthy": False,
                "address": None,
                "assigned": 0,
                "capacity": {"cpu_millicores": 2000, "memory_bytes": 1 << 30},
                "labels": {},
            },
        ],
        "deployments": 1,
        "replicas_assigned": 3,
        "last_pass": None,
    }
    text = format_status(body)
    assert "leader:       c1 (http://c1:8600), epoch 4" in text
    assert "answered by:  c2 (standby)" in text
    assert "nodes:        2 (1 healthy, 1 failed)" in text
    assert "n2    failed   -" in text
    no_leader = format_status(body | {"leader": {"id": None, "api": None, "epoch": 4}})
    assert "leader:       none (last epoch 4)" in no_leader


def test_a_pass_reencodes_only_nodes_whose_replicas_or_specs_changed() -> None:
    first = AssignmentEncoder([spec(), spec(name="db")])
    web0, web1 = ReplicaId("team-a", "web", 0), ReplicaId("team-a", "web", 1)
    db0 = ReplicaId("team-a", "db", 0)
    by_node = {"n1": [web0], "n2": [web1], "n3": [db0]}
    previous = Encoded(by_node, first.heads)
    stored = {"n1": b"n1 as stored", "n2": b"n2 as stored", "n3": b"n3 as stored"}
    # Nothing changed: every node keeps what is stored (no encoding at all).
    assert Placer._encode(first, by_node, stored, previous) == stored
    # web's spec changed: its nodes are encoded again, db's node is kept.
    second = AssignmentEncoder([spec(generation=2), spec(name="db")])
    out = Placer._encode(second, by_node, stored, previous)
    assert out == {"n1": second.body([web0]), "n2": second.body([web1]), "n3": b"n3 as stored"}
    # A replica moved from n2 to n1: both are encoded again; a node marked unknown too.
    moved = {"n1": [web0, web1], "n3": [db0]}
    out = Placer._encode(first, moved, stored | {"n3": UNKNOWN_BODY}, previous)
    assert out == {"n1": first.body([web0, web1]), "n3": first.body([db0])}
