"""ConsulStore against a real Consul: what only Consul has, and Consul failing.

Blocking queries, sessions (TTL below 10 s, LockDelay 0, health checks),
the leader-write fence, and the agent going away and coming back. The
contract shared with SQLite is in test_store_conformance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nova.store import Store, StoreError, StoreUnavailable, TxnOp, open_store
from nova.store.consul import FENCE_OP, ConsulStore, SessionInvalid
from tests.cluster.conftest import ConsulAgent, free_port

pytestmark = pytest.mark.consul

STOP_GRACE = 10.0  # how long an agent may take to shut down


@pytest.fixture
async def store(consul_agent: ConsulAgent) -> AsyncIterator[ConsulStore]:
    async with ConsulStore(consul_agent.url) as opened:
        yield opened


@pytest.fixture
def p(unique_prefix: str) -> str:
    return unique_prefix


def agent_call(agent: ConsulAgent, method: str, path: str, body: Any = None) -> Any:
    """A raw request to the agent's HTTP API, as an operator's tool would make it."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(agent.url + path, data=data, method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        raw = response.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def wait_stopped(pid: int) -> None:
    """Until every thread of `pid` is stopped: SIGSTOP lands on each asynchronously."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = set()
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                states.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states <= {"T", "t"}:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop: thread states {states}")


async def wait_until_released(store: Store, key: str, within: float) -> float:
    """Seconds until `key` has no session holding it (watched, not polled)."""
    started = time.monotonic()
    index = 0
    while time.monotonic() - started < within:
        index, entries = await store.watch(key, index, within)
        if [e for e in entries if e.key == key and e.session is None]:
            return time.monotonic() - started
    raise AssertionError(f"{key} still held after {within} s")


# -- locations and keys -------------------------------------------------------


async def test_open_store_gives_a_consul_store_for_consul_and_http_urls(
    consul_agent: ConsulAgent,
) -> None:
    port = consul_agent.http_port
    for location in [f"consul://127.0.0.1:{port}", f"http://127.0.0.1:{port}", consul_agent.url]:
        store = open_store(location)
        assert isinstance(store, ConsulStore)
        assert store.url == f"http://127.0.0.1:{port}"
        async with store:
            assert await store.get("never/written") is None
    assert ConsulStore("consul://consul.example").url == "http://consul.example:8500"
    assert ConsulStore("https://[::1]:8501").url == "https://[::1]:8501"
    for bad in ["consul://", "consul://h:port", "consul://h:8500/v1/kv", "ftp://h:1"]:
        with pytest.raises(ValueError):
            ConsulStore(bad)


async def test_values_are_stored_as_given_readable_in_the_ui(
    store: ConsulStore, consul_agent: ConsulAgent, p: str
) -> None:
    await store.put_json(p + "node", {"cpu": 2, "name": "h1"})
    raw = agent_call(consul_agent, "GET", f"/v1/kv/{p}node?raw")
    assert raw == {"cpu": 2, "name": "h1"}  # what the KV browser shows: the JSON itself


async def test_keys_that_http_would_rewrite_or_refuse_are_value_errors(
    store: ConsulStore, p: str
) -> None:
    for bad in ["a//b", "a/./b", "a/../b", "..", "a/.", "a\nb", "a\x00b", "a\U0010ffffb"]:
        with pytest.raises(ValueError, match="Consul"):
            await store.put(p + bad, b"x")
        with pytest.raises(ValueError, match="Consul"):
            await store.txn([TxnOp.set(p + bad, b"x")])
    with pytest.raises(ValueError, match="non-empty prefix"):
        await store.txn([TxnOp.get_tree("")])
    assert await store.list(p) == []  # nothing reached Consul
    assert await store.put(p + "trailing/", b"")  # a 'directory' key is fine


async def test_a_txn_over_consuls_request_limit_is_a_value_error(
    store: ConsulStore, p: str
) -> None:
    big = b"x" * (400 * 1024)  # fine alone; over 512 KiB once base64-encoded in a txn
    assert await store.put(p + "alone", big)
    with pytest.raises(ValueError, match="txn_max_req_len"):
        await store.txn([TxnOp.set(p + "in-txn", big)])


# -- blocking queries ---------------------------------------------------------


async def test_a_blocking_watch_waits_its_time_and_wakes_at_once_on_a_put(
    store: ConsulStore, p: str
) -> None:
    await store.put(p + "w/x", b"1")
    index, _ = await store.watch(p + "w/", 0, 0)

    started = time.monotonic()
    assert (await store.watch(p + "w/", index, 1.0))[0] == index
    waited = time.monotonic() - started
    assert 1.0 <= waited < 1.0 + 1.0 / 16 + 0.5  # Consul's wait plus its jitter

    waiting = asyncio.create_task(store.watch(p + "w/", index, 30))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await store.put(p + "w/y", b"2")
    put_done = time.monotonic()
    new_index, entries = await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - put_done < 0.2
    assert new_index > index and [e.key for e in entries] == [p + "w/x", p + "w/y"]


async def test_a_watch_never_spins_when_consul_answers_at_once(
    store: ConsulStore, p: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If Consul keeps answering at once with the same index, the watch backs off.

    Provoked on the real agent by dropping the index from each request, so
    that every blocking query comes back immediately, unchanged.
    """
    await store.put(p + "w/x", b"1")
    index, _ = await store.watch(p + "w/", 0, 0)
    kv = store._client("test").kv
    real_get = kv.get
    calls = 0

    async def get_without_index(key: str, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        kwargs.pop("index", None)
        return await real_get(key, **kwargs)

    monkeypatch.setattr(kv, "get", get_without_index)
    started = time.monotonic()
    assert (await store.watch(p + "w/", index, 1.5))[0] == index
    assert 1.5 <= time.monotonic() - started < 2.5
    assert calls <= 10, f"{calls} requests in 1.5 s: the watch spins"


# -- sessions and locks ---------------------------------------------------------


async def test_an_unrenewed_session_expires_and_frees_its_lock_for_another_at_once(
    store: ConsulStore, p: str
) -> None:
    key = p + "leader"
    first = await store.create_session(ttl=2, name="nova-test-first")
    info = await store.session_info(first)
    assert info is not None
    assert (info["TTL"], info["LockDelay"], info["Behavior"]) == ("2000ms", 0, "release")
    assert await store.acquire(key, b'{"holder":"first"}', first)
    held = await store.get(key)
    assert held is not None and held.session == first and held.lock_index == 1

    second = await store.create_session(ttl=10, name="nova-test-second")  # outlives the wait
    assert not await store.acquire(key, b'{"holder":"second"}', second)
    assert await store.renew_session(second)

    # Consul invalidates a TTL session between TTL and 2x TTL without a renewal.
    freed_after = await wait_until_released(store, key, 6)
    assert freed_after <= 2 * 2 + 1
    assert await store.session_info(first) is None
    assert not await store.renew_session(first)

    # LockDelay 0: the other session takes the lock at once, with a new epoch.
    assert await store.renew_session(second)
    assert await store.acquire(key, b'{"holder":"second"}', second)
    taken = await store.get(key)
    assert taken is not None and taken.session == second and taken.lock_index == 2
    with pytest.raises(SessionInvalid, match="invalid session"):
        await store.acquire(key, b"", first)
    await store.destroy_session(second)
    await store.destroy_session(second)  # gone already: fine


async def test_release_frees_the_lock_and_writes_the_value(store: ConsulStore, p: str) -> None:
    key = p + "lock"
    session = await store.create_session(ttl=10)
    try:
        assert await store.acquire(key, b"held", session)
        assert not await store.release(key, "00000000-0000-0000-0000-000000000000")
        assert await store.release(key, session, b"free")
        entry = await store.get(key)
        assert entry is not None and (entry.session, entry.value) == (None, b"free")
    finally:
        await store.destroy_session(session)


async def test_a_session_bound_to_a_service_check_dies_when_the_check_fails(
    store: ConsulStore, consul_agent: ConsulAgent, p: str
) -> None:
    """The coordinator's fast failover: no waiting for serfHealth or the TTL."""
    service = "nova-test-" + p.split("/")[1]
    check = f"service:{service}"
    agent_call(
        consul_agent,
        "PUT",
        "/v1/agent/service/register",
        {"Name": service, "ID": service, "Check": {"TTL": "10s", "Status": "passing"}},
    )
    try:
        session = await store.create_session(ttl=30, service_checks=[check], node_checks=[])
        info = await store.session_info(session)
        assert info is not None and not info["NodeChecks"]  # no serfHealth either
        assert [c["ID"] for c in info["ServiceChecks"]] == [check]
        assert await store.acquire(p + "leader", b"", session)
        agent_call(consul_agent, "PUT", f"/v1/agent/check/fail/{check}")
        assert await wait_until_released(store, p + "leader", 5) < 1
        assert await store.session_info(session) is None
    finally:
        agent_call(consul_agent, "PUT", f"/v1/agent/service/deregister/{service}")


async def test_consul_refusing_a_session_is_a_store_error_not_unavailable(
    store: ConsulStore,
) -> None:
    with pytest.raises(StoreError, match="Invalid Session TTL") as below_floor:
        await store.create_session(ttl=0.5)  # below the agent's session_ttl_min of 1 s
    assert not isinstance(below_floor.value, StoreUnavailable)
    with pytest.raises(StoreError, match="Missing check") as unknown:
        await store.create_session(ttl=5, service_checks=["service:no-such-service"])
    assert not isinstance(unknown.value, StoreUnavailable)


async def test_fenced_writes_apply_only_while_the_session_holds_the_key(
    store: ConsulStore, p: str
) -> None:
    leader, other = p + "leader", p + "other-session-key"
    session = await store.create_session(ttl=10)
    rival = await store.create_session(ttl=10)
    try:
        assert await store.acquire(leader, b"", session)
        done = await store.txn_fenced(
            [TxnOp.set(p + "a", b"1"), TxnOp.get(p + "a")], leader, session
        )
        assert done.ok and [(e.key, e.value) for e in done.results] == [
            (p + "a", b""),
            (p + "a", b"1"),
        ]
        assert (await store.txn_fenced([], leader, session)).ok  # only the check

        a = await store.get(p + "a")
        assert a is not None
        stale = await store.txn_fenced(
            [TxnOp.cas(p + "a", b"2", a.modify_index + 1)], leader, session
        )
        assert [(e.op_index, e.what) for e in stale.errors] == [
            (0, f'failed to set key "{p}a", index is stale')
        ]

        assert await store.acquire(other, b"", rival)
        lost = await store.txn_fenced([TxnOp.set(p + "a", b"rival")], leader, rival)
        assert [e.op_index for e in lost.errors] == [FENCE_OP]
        assert "failed session check" in lost.errors[0].what

        assert await store.release(leader, session)
        after = await store.txn_fenced([TxnOp.set(p + "a", b"late")], leader, session)
        assert not after.ok and after.errors[0].op_index == FENCE_OP
        entry = await store.get(p + "a")
        assert entry is not None and entry.value == b"1"  # neither write landed
    finally:
        await store.destroy_session(session)
        await store.destroy_session(rival)


# -- Consul unavailable ----------------------------------------------------------


async def test_consul_down_is_unavailable_naming_the_url_and_it_recovers(
    private_consul: ConsulAgent,
) -> None:
    async with ConsulStore(private_consul.url, timeout=2) as store:
        for n in range(30):  # move the index well past a fresh agent's
            await store.put("w/x", b"%d" % n)
        index, _ = await store.watch("w/", 0, 0)
        watching = asyncio.create_task(store.watch("w/", index, 30))
        await asyncio.sleep(0.2)

        started = time.monotonic()
        private_consul.stop()
        with pytest.raises(StoreUnavailable, match=private_consul.url) as in_flight:
            await asyncio.wait_for(watching, 5)
        for call in [store.get("w/x"), store.put("w/x", b"down"), store.watch("w/", index, 1)]:
            with pytest.raises(StoreUnavailable, match=private_consul.url) as refused:
                await call
            assert refused.value.where == private_consul.url
        assert time.monotonic() - started < 2 + STOP_GRACE
        assert in_flight.value.what == "watch"

        private_consul.start()  # a dev agent restarts empty, with a small index
        assert await store.get("w/x") is None
        assert await store.put("w/x", b"back")
        current, entries = await store.watch("w/", index, 1)
        assert current < index, "the index went backwards: the caller must reset to 0"
        assert [e.value for e in entries] == [b"back"]


async def test_a_hung_consul_is_unavailable_within_the_client_timeout(
    private_consul: ConsulAgent,
) -> None:
    async with ConsulStore(private_consul.url, timeout=1) as store:
        await store.put("k", b"v")
        index, _ = await store.watch("", 0, 0)
        assert private_consul.process is not None
        private_consul.process.send_signal(signal.SIGSTOP)
        try:
            wait_stopped(private_consul.process.pid)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no answer within") as hung:
                await store.get("k")
            assert 1 <= time.monotonic() - started < 2
            assert hung.value.where == private_consul.url

            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no answer within"):
                await store.watch("", index, 1)  # 1 s wait + jitter + 1 s timeout
            assert 2 <= time.monotonic() - started < 3
        finally:
            private_consul.process.send_signal(signal.SIGCONT)
        entry = await store.get("k")
        assert entry is not None and entry.value == b"v"


def test_the_fixture_agent_allows_short_session_ttls(consul_agent: ConsulAgent) -> None:
    session = agent_call(consul_agent, "PUT", "/v1/session/create", {"TTL": "1s"})
    agent_call(consul_agent, "PUT", f"/v1/session/destroy/{session['ID']}")


async def test_open_fails_fast_when_no_agent_listens() -> None:
    no_agent = f"http://127.0.0.1:{free_port()}"
    store = ConsulStore(no_agent)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=rf"open failed on {no_agent}: cannot connect"):
        await store.open()
    assert time.monotonic() - started < 1
    await store.close()
