"""The agent's reconcile plan (pure) and the assignment parser: the rules, case by case.

The same rules run end to end against real Consul and real agents in
tests/cluster/test_cluster_agent.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.cluster.assignments import (
    Desired,
    InvalidAssignment,
    Running,
    parse_assignment,
    plan,
)

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def want(rid: str, generation: int = 1, digest: str = DIGEST_A) -> Desired:
    return Desired(rid, "default", "web", 0, digest, generation)


def have(rid: str, generation: int = 1, digest: str = DIGEST_A, *, alive: bool = True) -> Running:
    return Running(rid, f"c-{rid}-{generation}", generation, digest, alive)


def test_unchanged_replicas_are_left_alone() -> None:
    desired = {"a": want("a"), "b": want("b")}
    assert plan(desired, {"a": have("a"), "b": have("b")}).empty


def test_new_replicas_start_and_gone_ones_stop() -> None:
    steps = plan({"a": want("a"), "c": want("c")}, {"a": have("a"), "b": have("b")})
    assert [r.replica_id for r in steps.stop] == ["b"]
    assert [d.replica_id for d in steps.start] == ["c"]
    assert steps.forget == ()


@pytest.mark.parametrize(
    ("running", "why"),
    [(have("a", generation=1), "generation"), (have("a", digest=DIGEST_B, generation=2), "digest")],
)
def test_a_changed_version_is_replaced(running: Running, why: str) -> None:
    steps = plan({"a": want("a", generation=2)}, {"a": running})
    assert steps.stop == (running,), why
    assert steps.start == (want("a", generation=2),)


def test_exited_replicas_start_again_and_gone_exited_ones_are_forgotten() -> None:
    steps = plan({"a": want("a")}, {"a": have("a", alive=False), "b": have("b", alive=False)})
    assert steps.stop == ()
    assert steps.start == (want("a"),)
    assert steps.forget == ("b",)


def test_an_empty_assignment_stops_everything() -> None:
    steps = plan({}, {"a": have("a"), "b": have("b")})
    assert [r.replica_id for r in steps.stop] == ["a", "b"]
    assert steps.start == ()


def doc(**spec: Any) -> dict[str, Any]:
    base = {"namespace": "default", "deployment": "web", "replica": 0, "digest": DIGEST_A,
            "generation": 3, "args": ["x"], "env": {"K": "V"}, "cpu_millicores": 250,
            "memory_bytes": 1 << 20}  # fmt: skip
    return {"epoch": 7, "containers": {"default.web.0": {**base, **spec}}}


def test_the_coordinators_document_parses() -> None:
    assignment = parse_assignment(doc(), where="k")
    assert assignment.epoch == 7
    desired = assignment.replicas["default.web.0"]
    assert (desired.generation, desired.digest, desired.args) == (3, DIGEST_A, ("x",))
    assert (desired.env, desired.cpu_millicores) == ((("K", "V"),), 250)
    assert parse_assignment(None, where="k").replicas == {}  # no key: nothing assigned


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected {'epoch'"),
        ({"epoch": "1", "containers": {}}, "'epoch' must be an integer"),
        (doc(digest="latest"), "image digest 'latest' is invalid"),
        (doc(generation=-1), "generation must be a whole number"),
        (doc(args="x"), "args must be a list of strings"),
        (doc(env={"K": 1}), "env must map strings to strings"),
        ({"containers": {"a/b": {"digest": DIGEST_A}}}, "must not contain '/'"),
        ({"containers": {"a": {}}}, "field 'digest' is required"),
    ],
)
def test_a_bad_document_is_refused_naming_the_field(data: Any, message: str) -> None:
    with pytest.raises(InvalidAssignment, match=message.replace("(", r"\(").replace("{", r"\{")):
        parse_assignment(data, where="nova/v1/assignments/n1")
