"""The policy engine with real sources: a real directory under real inotify, a real store.

What reaches the backend is recorded (tests/unit/netpol_recording.py); the
kernel backends themselves are tested with real packets in tests/linux.
Latencies are asserted loosely (< 1 s): the 100 ms goal is measured in bench.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent.netpol.backend import PolicyBackendError
from agent.netpol.engine import PolicyEngine, PolicyMetrics
from agent.netpol.sources import DirectorySource, StoreSource, parse_store_value
from agent.netpol.tables import IPPROTO_TCP, CompiledPolicy, Endpoint
from agent.netpol.wiring import add_arguments, make_engine
from agent.netpol.yamltree import PolicyError
from nova.errors import NovaError
from nova.store import SqliteStore, keys
from tests.unit.netpol_helpers import (
    ALLOW_B_TO_A,
    BAD,
    DENY_A,
    DENY_B_EGRESS,
    A,
    B,
    C,
    RecordingBackend,
    policy_yaml,
    write_atomically,
)

LOOSE_S = 1.0  # the engine's own budget is 100 ms; CI machines are noisy


def isolated(key: str, direction: str = "ingress") -> Callable[[CompiledPolicy], bool]:
    def check(compiled: CompiledPolicy) -> bool:
        tables = compiled.endpoints.get(key)
        return tables is not None and getattr(tables, direction).isolated

    return check


def open_(key: str, direction: str = "ingress") -> Callable[[CompiledPolicy], bool]:
    def check(compiled: CompiledPolicy) -> bool:
        return not isolated(key, direction)(compiled)

    return check


def allows(src: Endpoint, dst: Endpoint, engine: PolicyEngine, port: int = 80) -> bool:
    return engine.explain(src.key, dst.key, IPPROTO_TCP, port).allowed


async def enforced(
    backend: RecordingBackend,
    check: Callable[[CompiledPolicy], bool],
    timeout: float = LOOSE_S,  # noqa: ASYNC109 (a deadline for a poll, not a cancel scope)
) -> float:
    """Seconds until a compiled policy passing `check` reached the backend."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        for at, compiled in reversed(backend.applied):
            if at >= started - 0.001 and check(compiled):
                return at - started
        if time.monotonic() > deadline:
            raise AssertionError(f"not enforced within {timeout}s; last: {backend.applied[-1:]}")
        await asyncio.sleep(0.002)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    return tmp_path / "policies"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def running(
    policy_dir: Path, registry: CollectorRegistry
) -> AsyncIterator[tuple[PolicyEngine, RecordingBackend]]:
    backend = RecordingBackend()
    engine = PolicyEngine(
        backend, sources=[DirectorySource(policy_dir)], metrics=PolicyMetrics(registry)
    )
    engine.set_endpoints([A, B, C], names={"web": "ep-a"})
    await engine.start()
    await engine.wait_applied()
    yield engine, backend
    await engine.close()
    assert backend.closed_with is False


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- the directory, under real inotify ----------------------------------------


async def test_files_present_at_start_are_in_the_first_apply(policy_dir: Path) -> None:
    os.mkdir(policy_dir)
    (policy_dir / "deny.yaml").write_text(DENY_A)
    backend = RecordingBackend()
    engine = PolicyEngine(backend, sources=[DirectorySource(policy_dir)])
    engine.set_endpoints([A, B])
    await engine.start()
    try:
        await engine.wait_applied()
        assert backend.started
        assert isolated("ep-a")(backend.applied[0][1])  # never an open first generation
    finally:
        await engine.close(remove=True)
    assert backend.closed_with is True


async def test_first_apply_waits_for_the_agents_endpoints(policy_dir: Path) -> None:
    """An agent starts the engine before recovering its containers: an apply before they
    are reported would drop their enforcement (the kernel keeps the last agent's meanwhile)."""
    os.mkdir(policy_dir)
    (policy_dir / "deny.yaml").write_text(DENY_A)
    backend = RecordingBackend()
    engine = PolicyEngine(backend, sources=[DirectorySource(policy_dir)], endpoints_pending=True)
    await engine.start()
    try:
        engine.add_endpoint(A)  # recovery reports containers one by one
        await asyncio.sleep(0.05)
        assert backend.applied == []
        assert engine.status()["pending"] and not engine.status()["endpoints_synced"]
        engine.add_endpoint(B)
        engine.endpoints_synced()
        await engine.wait_applied()
        (_, first), *_ = backend.applied
        assert set(first.endpoints) == {"ep-a", "ep-b"} and isolated("ep-a")(first)
    finally:
        await engine.close()


async def test_create_modify_atomic_replace_delete(
    running: tuple[PolicyEngine, RecordingBackend], policy_dir: Path
) -> None:
    engine, backend = running
    path = policy_dir / "web.yaml"
    assert allows(B, A, engine)

    write_atomically(path, DENY_A)  # create
    assert await enforced(backend, isolated("ep-a")) < LOOSE_S
    assert not allows(B, A, engine)

    path.write_text(DENY_A + "---\n" + ALLOW_B_TO_A)  # modify in place
    await enforced(backend, lambda c: len(c.endpoints["ep-a"].ingress.policies) == 2)
    assert allows(B, A, engine) and not allows(C, A, engine)

    write_atomically(path, DENY_B_EGRESS)  # atomic replace
    await enforced(backend, lambda c: open_("ep-a")(c) and isolated("ep-b", "egress")(c))
    assert allows(C, A, engine) and not allows(B, A, engine)

    path.unlink()  # delete
    await enforced(backend, open_("ep-b", "egress"))
    assert allows(B, A, engine)
    assert engine.status()["origins"] == []


async def test_bad_file_keeps_its_last_good_version(
    running: tuple[PolicyEngine, RecordingBackend],
    policy_dir: Path,
    registry: CollectorRegistry,
) -> None:
    engine, backend = running
    path = policy_dir / "web.yaml"
    write_atomically(path, DENY_A)
    await enforced(backend, isolated("ep-a"))
    applies = len(backend.applied)

    write_atomically(path, BAD)
    for _ in range(100):
        if engine.status()["errors"]:
            break
        await asyncio.sleep(0.005)
    (error,) = engine.status()["errors"]
    assert error["origin"] == str(path)
    assert error["message"] == f"{path}:9: spec.ingress[0].ports[0].port: 70000 is not a port"
    (origin,) = engine.status()["origins"]
    assert origin["policies"] == ["x/deny-a"]  # still enforced
    assert (
        origin["error"]["line"] == 9 and origin["error"]["field"] == "spec.ingress[0].ports[0].port"
    )
    assert metric(registry, "nova_policy_errors_total", stage="parse") == 1
    assert len(backend.applied) == applies  # nothing re-applied, nothing opened
    assert isolated("ep-a")(backend.current)

    write_atomically(path, ALLOW_B_TO_A)  # fixed: error clears, the new version applies
    await enforced(backend, lambda c: c.endpoints["ep-a"].ingress.policies == ("x/allow-b",))
    assert engine.status()["errors"] == []


async def test_deleting_one_file_removes_only_its_policies(
    running: tuple[PolicyEngine, RecordingBackend], policy_dir: Path
) -> None:
    engine, backend = running
    write_atomically(policy_dir / "a.yaml", DENY_A)
    write_atomically(policy_dir / "b.yml", DENY_B_EGRESS)
    await enforced(backend, lambda c: isolated("ep-a")(c) and isolated("ep-b", "egress")(c))
    (policy_dir / "b.yml").unlink()
    await enforced(backend, lambda c: isolated("ep-a")(c) and open_("ep-b", "egress")(c))
    assert [o["origin"] for o in engine.status()["origins"]] == [str(policy_dir / "a.yaml")]


async def test_half_written_and_temporary_files_are_never_applied(
    running: tuple[PolicyEngine, RecordingBackend], policy_dir: Path
) -> None:
    engine, backend = running
    applies = len(backend.applied)
    (policy_dir / ".web.yaml.swp").write_text(BAD)
    (policy_dir / "web.yaml.tmp").write_text(DENY_A)
    (policy_dir / "web.yaml~").write_text(DENY_A)
    (policy_dir / "notes.txt").write_text("hello")
    with (policy_dir / "web.yaml").open("w") as writer:
        writer.write(DENY_A[: len(DENY_A) // 2])
        writer.flush()
        await asyncio.sleep(0.1)  # the engine would have applied a change by now
        assert len(backend.applied) == applies
        assert engine.status()["errors"] == []
        writer.write(DENY_A[len(DENY_A) // 2 :])
    await enforced(backend, isolated("ep-a"))  # complete at close: applied once, whole
    assert engine.status()["errors"] == []
    assert [o["origin"] for o in engine.status()["origins"]] == [str(policy_dir / "web.yaml")]


async def test_moving_a_file_away_removes_it_and_moving_in_adds_it(
    running: tuple[PolicyEngine, RecordingBackend], policy_dir: Path, tmp_path: Path
) -> None:
    _, backend = running
    outside = tmp_path / "deny.yaml"
    outside.write_text(DENY_A)
    os.rename(outside, policy_dir / "deny.yaml")
    await enforced(backend, isolated("ep-a"))
    os.rename(policy_dir / "deny.yaml", policy_dir / "deny.yaml.disabled")
    await enforced(backend, open_("ep-a"))


async def test_a_removed_directory_drops_its_files_and_is_followed_again(
    policy_dir: Path,
) -> None:
    os.mkdir(policy_dir)
    (policy_dir / "deny.yaml").write_text(DENY_A)
    backend = RecordingBackend()
    engine = PolicyEngine(backend, sources=[DirectorySource(policy_dir, retry_s=0.02)])
    engine.set_endpoints([A])
    await engine.start()
    try:
        await enforced(backend, isolated("ep-a"))
        (policy_dir / "deny.yaml").unlink()
        os.rmdir(policy_dir)
        await enforced(backend, open_("ep-a"))
        os.mkdir(policy_dir)
        await asyncio.sleep(0.1)  # the source notices the directory again
        write_atomically(policy_dir / "deny.yaml", DENY_A)
        await enforced(backend, isolated("ep-a"))
    finally:
        await engine.close()


# -- endpoints, the backend failing, status and metrics -----------------------


async def test_endpoints_added_and_removed_are_enforced(
    running: tuple[PolicyEngine, RecordingBackend], policy_dir: Path
) -> None:
    engine, backend = running
    write_atomically(policy_dir / "deny.yaml", DENY_A)
    await enforced(backend, isolated("ep-a"))
    twin = Endpoint("ep-a2", IPv4Address("10.0.1.9"), "x", {"pod": "a"}, "npc-xa2")
    engine.add_endpoint(twin, name="web-2")
    await enforced(backend, isolated("ep-a2"))
    assert backend.current.endpoints["ep-a2"].identity == backend.current.endpoints["ep-a"].identity
    assert not engine.explain("ep-b", "web-2", IPPROTO_TCP, 80).allowed
    engine.remove_endpoint("ep-a2")
    await enforced(backend, lambda c: "ep-a2" not in c.endpoints)


async def test_namespace_labels_change_the_tables(
    running: tuple[PolicyEngine, RecordingBackend], policy_dir: Path
) -> None:
    engine, backend = running
    write_atomically(
        policy_dir / "from-prod.yaml",
        policy_yaml(
            "from-prod",
            "  podSelector: {matchLabels: {pod: a}}\n"
            "  ingress: [{from: [{namespaceSelector: {matchLabels: {env: prod}}}]}]\n",
        ),
    )
    await enforced(backend, isolated("ep-a"))
    assert not allows(C, A, engine)
    engine.set_namespace_labels("y", {"env": "prod"})
    c_identity = backend.current.endpoints["ep-c"].identity
    await enforced(
        backend,
        lambda c: any(c_identity in r.identities for r in c.endpoints["ep-a"].ingress.rules),
    )
    assert allows(C, A, engine)


async def test_a_failing_backend_keeps_retrying_and_reports(
    running: tuple[PolicyEngine, RecordingBackend],
    policy_dir: Path,
    registry: CollectorRegistry,
) -> None:
    engine, backend = running
    backend.fail_next = 2
    write_atomically(policy_dir / "deny.yaml", DENY_A)
    for _ in range(200):
        if any(e["origin"] == "backend" for e in engine.status()["errors"]):
            break
        await asyncio.sleep(0.005)
    status = engine.status()
    assert status["pending"]
    assert "recording policy backend: apply on memory failed" in status["errors"][0]["message"]
    assert await enforced(backend, isolated("ep-a"), timeout=3.0) < 3.0  # retried with backoff
    await engine.wait_applied()
    assert engine.status()["errors"] == [] and not engine.status()["pending"]
    assert metric(registry, "nova_policy_errors_total", stage="apply") == 2


async def test_an_unexpected_failure_does_not_stop_the_engine(
    running: tuple[PolicyEngine, RecordingBackend],
    policy_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, backend = running
    real_apply = backend.apply
    calls = 0

    async def buggy_once(compiled: CompiledPolicy) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        await real_apply(compiled)

    monkeypatch.setattr(backend, "apply", buggy_once)
    write_atomically(policy_dir / "deny.yaml", DENY_A)
    await enforced(backend, isolated("ep-a"), timeout=3.0)
    assert calls >= 2


async def test_status_and_metrics(
    running: tuple[PolicyEngine, RecordingBackend],
    policy_dir: Path,
    registry: CollectorRegistry,
) -> None:
    engine, backend = running
    write_atomically(policy_dir / "web.yaml", DENY_A + "---\n" + ALLOW_B_TO_A)
    await enforced(backend, isolated("ep-a"))
    generation = await engine.wait_applied()
    status = engine.status()
    assert status["backend"] == "recording"
    assert status["generation"] == generation == backend.current.generation
    assert status["policies"] == 2 and status["rules"] == 1 and status["endpoints"] == 3
    assert status["origins"][0]["policies"] == ["x/deny-a", "x/allow-b"]
    assert status["applied_at"] is not None and status["apply_seconds"] is not None
    assert json.loads(json.dumps(status)) == status  # what the API sends
    assert metric(registry, "nova_policy_rules") == 1
    assert metric(registry, "nova_policy_apply_duration_seconds_count") >= 2


async def test_resolve_names_ids_prefixes_and_ips(
    running: tuple[PolicyEngine, RecordingBackend],
) -> None:
    engine, _ = running
    assert engine.resolve("web") == A.ip
    assert engine.resolve("ep-c") == C.ip
    assert engine.resolve("10.9.9.9") == IPv4Address("10.9.9.9")
    with pytest.raises(Exception, match="matches several containers: ep-a, ep-b, ep-c"):
        engine.resolve("ep-")
    with pytest.raises(Exception, match="neither an IPv4 address nor a container"):
        engine.resolve("nope")


# -- the store -----------------------------------------------------------------


def store_policy(namespace: str, name: str, spec: dict) -> bytes:  # type: ignore[type-arg]
    doc = {
        "apiVersion": "nova.sh/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return json.dumps(doc, indent=1).encode()


async def test_store_policies_follow_the_store(tmp_path: Path, policy_dir: Path) -> None:
    async with SqliteStore(tmp_path / "state.db", poll_interval=0.02) as store:
        key = keys.policy("x", "deny-a")
        await store.put(key, store_policy("x", "deny-a", {"podSelector": {"pod": "a"}}))
        backend = RecordingBackend()
        engine = PolicyEngine(
            backend, sources=[DirectorySource(policy_dir), StoreSource(store, wait_s=5.0)]
        )
        engine.set_endpoints([A, B])
        await engine.start()
        try:
            await engine.wait_applied()
            assert isolated("ep-a")(backend.applied[0][1])  # synced before the first apply

            bad = store_policy("x", "deny-a", {"podSelector": {"pod": "a"}, "ingres": []})
            await store.put(key, bad)
            for _ in range(200):
                if engine.status()["errors"]:
                    break
                await asyncio.sleep(0.005)
            (error,) = engine.status()["errors"]
            assert error["message"] == (
                f"store:{key}:12: spec.ingres: unknown field; expected one of: egress, "
                "ingress, podSelector, policyTypes"
            )
            assert isolated("ep-a")(backend.current)  # last good stays

            await store.put(keys.policy("x", "deny-b"), DENY_B_EGRESS.encode())  # YAML too
            await store.put(key, store_policy("x", "deny-a", {"podSelector": {"pod": "z"}}))
            await enforced(backend, lambda c: open_("ep-a")(c) and isolated("ep-b", "egress")(c))
            await store.delete(keys.policy("x", "deny-b"))
            await enforced(backend, open_("ep-b", "egress"))
            assert engine.status()["errors"] == []
        finally:
            await engine.close()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            keys.policy("x", "p"),
            store_policy("y", "p", {"podSelector": {}}),
            "store:nova/v1/policies/x/p:1: metadata: policy y/p does not match its key "
            "(expected x/p)",
        ),
        ("nova/v1/policies/x", b"{}", "store:nova/v1/policies/x: policy keys are"),
        (keys.policy("x", "p"), b"", "holds 0 policies; a key holds one"),
        (keys.policy("x", "p"), b"\xff", "not UTF-8"),
    ],
)
def test_store_values_must_match_their_keys(key: str, value: bytes, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_store_value(key, value)
    assert message in caught.value.message


def test_store_value_namespace_defaults_to_the_key() -> None:
    value = (
        b"apiVersion: nova.sh/v1\nkind: NetworkPolicy\nmetadata: {name: p}\n"
        b"spec: {podSelector: {}}\n"
    )
    (policy,) = parse_store_value(keys.policy("team-a", "p"), value)
    assert policy.key == "team-a/p"


def test_agent_flags_make_the_engine(policy_dir: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    registry = CollectorRegistry()
    assert (
        make_engine(parser.parse_args(["--policy-backend", "none"]), store=None, registry=registry)
        is None
    )
    assert metric(registry, "nova_policy_errors_total", stage="parse") == 0
    args = parser.parse_args([])
    assert (args.policy_dir, args.policy_backend) == (Path("/etc/nova/policies"), "auto")
    assert args.policy_log_drops == 0
    assert parser.parse_args(["--policy-log-drops", "20"]).policy_log_drops == 20
    for bad in (["--policy-backend", "iptables"], ["--policy-log-drops", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_auto_without_a_backend_is_off_unless_policies_wait(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not root, no nft, no bcc: `auto` runs without policy, except when policy files
    are there to enforce (running then would fail open)."""

    def unavailable(*_args: object, **_kwargs: object) -> None:
        raise PolicyBackendError("nftables", "select", "this host", "needs root")

    monkeypatch.setattr("agent.netpol.wiring.select_backend", unavailable)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--policy-dir", str(policy_dir)])
    assert make_engine(args, store=None, registry=CollectorRegistry()) is None
    policy_dir.mkdir()
    (policy_dir / "deny.yaml").write_text(DENY_A)
    with pytest.raises(PolicyBackendError, match=r"holds policies \(deny.yaml\)"):
        make_engine(args, store=None, registry=CollectorRegistry())
    with pytest.raises(PolicyBackendError, match="needs root"):
        make_engine(
            parser.parse_args(["--policy-backend", "nftables"]),
            store=None,
            registry=CollectorRegistry(),
        )


async def test_a_selected_container_starts_only_once_enforced(policy_dir: Path) -> None:
    """The agent awaits endpoint_starting() between making a container's sandbox and
    running its workload: a selected container's first packet meets its policy."""
    os.mkdir(policy_dir)
    (policy_dir / "deny.yaml").write_text(DENY_A)
    backend = RecordingBackend()
    engine = PolicyEngine(backend, sources=[DirectorySource(policy_dir)], debounce_s=0.05)
    engine.set_endpoints([C])
    await engine.start()
    try:
        await engine.wait_applied()
        before = len(backend.applied)
        await engine.endpoint_starting(B, name="b")  # not selected: no wait for an apply
        assert len(backend.applied) == before
        await engine.endpoint_starting(A, name="a")  # selected: returns once enforced
        assert isolated("ep-a")(backend.current) and "ep-b" in backend.current.endpoints
        backend.fail_next = 1000  # a kernel refusing every change: the start fails, closed
        selected_too = Endpoint("ep-a2", IPv4Address("10.0.1.9"), "x", {"pod": "a"}, "npc-xa2")
        with pytest.raises(NovaError, match=r"a2 was not enforced within 0\.3s"):
            await engine.endpoint_starting(selected_too, name="a2", timeout=0.3)
    finally:
        await engine.close()
