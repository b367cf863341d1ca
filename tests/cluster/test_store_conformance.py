"""One contract suite, run against every Store backend: SqliteStore and ConsulStore.

Each test states a guarantee from `nova/store/base.py` and must hold on both
backends, unchanged: code written against the embedded store runs on a
cluster. Consul is a real dev agent (see conftest.py), shared by the
session, so every test keeps to its own key prefix `p`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from nova.store import (
    MAX_TXN_OPS,
    MAX_VALUE_SIZE,
    SqliteStore,
    Store,
    StoreUnavailable,
    TxnOp,
)
from nova.store.consul import ConsulStore
from tests.cluster.conftest import ConsulAgent

SHORT = 0.3  # a watch that must not wake; long enough for a loaded 2-core CI box
WAKE = 2.0  # a watch that must wake: the bound on its latency


@dataclass(frozen=True)
class Backend:
    name: str
    make: Callable[[], Store]  # another store on the same data (another process, agent)


@pytest.fixture(params=["sqlite", pytest.param("consul", marks=pytest.mark.consul)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "nova.db"
        return Backend("sqlite", lambda: SqliteStore(path, poll_interval=0.02))
    agent: ConsulAgent = request.getfixturevalue("consul_agent")
    return Backend("consul", lambda: ConsulStore(agent.url))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    async with backend.make() as opened:
        yield opened


@pytest.fixture
def p(unique_prefix: str) -> str:
    return unique_prefix


async def index_of(store: Store, prefix: str) -> int:
    return (await store.watch(prefix, 0, 0))[0]


# -- get / put / list / delete ------------------------------------------------


async def test_put_then_get_returns_value_flags_and_indexes(store: Store, p: str) -> None:
    assert await store.get(p + "x") is None
    assert await store.put(p + "x", b"one", flags=(1 << 64) - 1)
    first = await store.get(p + "x")
    assert first is not None
    assert (first.key, first.value, first.flags, first.session) == (
        p + "x",
        b"one",
        (1 << 64) - 1,
        None,
    )
    assert first.create_index == first.modify_index >= 1 and first.lock_index == 0

    assert await store.put(p + "x", b"two")
    second = await store.get(p + "x")
    assert second is not None
    assert (second.value, second.flags) == (b"two", 0)
    assert second.create_index == first.create_index
    assert second.modify_index > first.modify_index


async def test_identical_put_keeps_modify_index_and_wakes_no_watcher(store: Store, p: str) -> None:
    await store.put(p + "k", b"same", flags=3)
    before = await store.get(p + "k")
    index = await index_of(store, p)
    assert await store.put(p + "k", b"same", flags=3)
    assert await store.get(p + "k") == before
    assert (await store.watch(p, index, SHORT))[0] == index


async def test_empty_and_largest_values_round_trip(store: Store, p: str) -> None:
    largest = bytes(range(256)) * (MAX_VALUE_SIZE // 256)
    assert len(largest) == MAX_VALUE_SIZE
    assert await store.put(p + "empty", b"")
    assert await store.put(p + "largest", largest)
    empty, big = await store.list(p)
    assert (empty.key, empty.value) == (p + "empty", b"")
    assert big.value == largest


async def test_list_returns_exactly_the_prefix_sorted(store: Store, p: str) -> None:
    # U+FF5E sorts after U+1F600 in UTF-16 order, before it in code point (UTF-8) order.
    names = ["a/b/2", "a/bc", "a/b/1", "a/b", "a/c", "b/a", "a/b/\U0001f600", "a/b/\uff5e"]
    for name in names:
        await store.put(p + name, name.encode())
    listed = [entry.key for entry in await store.list(p + "a/b/")]
    assert listed == [p + "a/b/" + k for k in ["1", "2", "\uff5e", "\U0001f600"]]
    assert [e.key for e in await store.list(p + "a/b")] == [
        p + k for k in ["a/b", "a/b/1", "a/b/2", "a/b/\uff5e", "a/b/\U0001f600", "a/bc"]
    ]
    assert [e.value for e in await store.list(p)] == sorted(n.encode() for n in names)
    assert await store.list(p + "nothing/") == []


async def test_json_helpers_round_trip_readable_utf8(store: Store, p: str) -> None:
    assert await store.put_json(p + "j", {"b": [1, 2], "a": "é"})
    entry = await store.get(p + "j")
    assert entry is not None
    assert entry.value == '{"a":"é","b":[1,2]}'.encode()
    assert await store.get_json(p + "j") == {"a": "é", "b": [1, 2]}
    assert await store.get_json(p + "absent") is None
    await store.put(p + "not-json", b"\xff")
    with pytest.raises(ValueError, match="not-json"):
        await store.get_json(p + "not-json")


async def test_bad_arguments_raise_value_error(store: Store, p: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        await store.put("", b"x")
    with pytest.raises(ValueError, match="'/'"):
        await store.get("/abs")
    with pytest.raises(ValueError, match="limit"):
        await store.put(p + "big", b"x" * (MAX_VALUE_SIZE + 1))
    with pytest.raises(ValueError, match="cas and recurse"):
        await store.delete(p, cas=1, recurse=True)
    with pytest.raises(ValueError, match="operations"):
        await store.txn([TxnOp.get(p + "k")] * (MAX_TXN_OPS + 1))
    with pytest.raises(ValueError, match="index"):
        await store.watch(p, -1, 1)
    assert await store.list(p) == []


# -- compare-and-set ----------------------------------------------------------


async def test_cas_zero_creates_only_if_absent(store: Store, p: str) -> None:
    assert await store.put(p + "lock", b"me", cas=0)
    assert not await store.put(p + "lock", b"you", cas=0)
    entry = await store.get(p + "lock")
    assert entry is not None and entry.value == b"me"


async def test_cas_with_stale_or_missing_index_fails(store: Store, p: str) -> None:
    assert not await store.put(p + "k", b"v", cas=5)  # absent key, non-zero cas
    assert await store.get(p + "k") is None
    await store.put(p + "k", b"v1")
    entry = await store.get(p + "k")
    assert entry is not None
    assert await store.put(p + "k", b"v2", cas=entry.modify_index)
    assert not await store.put(p + "k", b"v3", cas=entry.modify_index)  # now stale
    latest = await store.get(p + "k")
    assert latest is not None and latest.value == b"v2"


async def test_delete_cas_like_consul(store: Store, p: str) -> None:
    await store.put(p + "k", b"v")
    entry = await store.get(p + "k")
    assert entry is not None
    assert not await store.delete(p + "k", cas=entry.modify_index + 1)
    assert not await store.delete(p + "k", cas=0)  # 0 never matches an existing key
    assert await store.get(p + "k") is not None
    assert await store.delete(p + "k", cas=entry.modify_index)
    assert await store.get(p + "k") is None
    assert await store.delete(p + "k", cas=123)  # absent: Consul reports success
    assert await store.delete(p + "never-there")


async def test_recursive_delete_removes_only_the_prefix(store: Store, p: str) -> None:
    for name in ["a/1", "a/2/x", "ab", "b"]:
        await store.put(p + name, b"")
    assert await store.delete(p + "a/", recurse=True)
    assert [entry.key for entry in await store.list(p)] == [p + "ab", p + "b"]


async def test_concurrent_cas_increments_from_two_stores_lose_nothing(
    backend: Backend, p: str
) -> None:
    async def increment(store: Store) -> None:
        while True:
            entry = await store.get(p + "counter")
            assert entry is not None
            if await store.put(
                p + "counter", b"%d" % (int(entry.value) + 1), cas=entry.modify_index
            ):
                return

    async with backend.make() as one, backend.make() as two:
        await one.put(p + "counter", b"0")
        await asyncio.gather(*(increment(s) for s in [one, two] * 10))
        assert await two.get_json(p + "counter") == 20


# -- transactions -------------------------------------------------------------


async def test_txn_applies_every_op_at_one_index(store: Store, p: str) -> None:
    await store.put(p + "old", b"x")
    result = await store.txn(
        [
            TxnOp.check_not_exists(p + "new"),
            TxnOp.set(p + "new", b"1", flags=7),
            TxnOp.cas(p + "created", b"2", 0),
            TxnOp.delete(p + "old"),
            TxnOp.get(p + "new"),
        ]
    )
    assert result.ok and not result.errors
    set_result, cas_result, got = result.results
    assert set_result.value == b"" and cas_result.value == b""  # values blanked, as Consul
    assert (got.key, got.value, got.flags) == (p + "new", b"1", 7)
    assert set_result.modify_index == cas_result.modify_index == got.modify_index
    assert await store.get(p + "old") is None
    assert await index_of(store, p) == got.modify_index  # the delete carries it too


async def test_failing_txn_applies_nothing_and_names_every_failing_op(store: Store, p: str) -> None:
    await store.put(p + "a", b"a")
    a = await store.get(p + "a")
    assert a is not None
    before = await store.watch("", 0, 0)
    result = await store.txn(
        [
            TxnOp.set(p + "b", b"b"),
            TxnOp.delete(p + "a"),
            TxnOp.check_index(p + "a", a.modify_index + 1),
            TxnOp.check_not_exists(p + "b"),
            TxnOp.get(p + "missing"),
        ]
    )
    assert not result.ok and not result.results
    assert [(e.op_index, e.what) for e in result.errors] == [
        (2, f'failed to check index, key "{p}a" doesn\'t exist'),
        (3, f'key "{p}b" exists'),
        (4, f'key "{p}missing" doesn\'t exist'),
    ]
    assert await store.get(p + "b") is None
    assert await store.get(p + "a") == a
    assert await store.watch("", 0, 0) == before  # the global index did not move


async def test_txn_cas_and_check_index_report_stale_indexes(store: Store, p: str) -> None:
    await store.put(p + "k", b"v")
    k = await store.get(p + "k")
    assert k is not None
    result = await store.txn(
        [
            TxnOp.cas(p + "k", b"w", k.modify_index + 1),
            TxnOp.check_index(p + "k", k.modify_index + 1),
            TxnOp.cas(p + "k", b"w", 0),
        ]
    )
    assert [(e.op_index, e.what) for e in result.errors] == [
        (0, f'failed to set key "{p}k", index is stale'),
        (
            1,
            f'failed index check for key "{p}k", current modify index '
            f"{k.modify_index} != {k.modify_index + 1}",
        ),
        (2, f'failed to set key "{p}k", index is stale'),
    ]
    ok = await store.txn(
        [TxnOp.check_index(p + "k", k.modify_index), TxnOp.cas(p + "k", b"w", k.modify_index)]
    )
    assert ok.ok and ok.results[0].modify_index == k.modify_index
    assert ok.results[1].modify_index > k.modify_index


async def test_read_only_txn_and_trees(store: Store, p: str) -> None:
    for name in ["r/1", "r/2", "s/1"]:
        await store.put(p + name, name.encode())
    result = await store.txn([TxnOp.get_tree(p + "r/"), TxnOp.get(p + "s/1")])
    assert [(e.key, e.value) for e in result.results] == [
        (p + "r/1", b"r/1"),
        (p + "r/2", b"r/2"),
        (p + "s/1", b"s/1"),
    ]
    assert (await store.txn([TxnOp.delete_tree(p + "r/")])).ok
    assert [e.key for e in await store.list(p)] == [p + "s/1"]
    stale = await store.txn([TxnOp.delete_cas(p + "s/1", 999_999_999)])
    assert [e.what for e in stale.errors] == [f'failed to delete key "{p}s/1", index is stale']
    assert (await store.txn([TxnOp.delete_cas(p + "absent", 5)])).ok


# -- watches ------------------------------------------------------------------


async def test_watch_wakes_on_put_under_prefix(store: Store, p: str) -> None:
    index = await index_of(store, p + "w/")
    waiting = asyncio.create_task(store.watch(p + "w/", index, 10))
    await asyncio.sleep(0.05)
    await store.put(p + "w/x", b"1")
    new_index, entries = await asyncio.wait_for(waiting, WAKE)
    assert new_index > index
    assert [e.key for e in entries] == [p + "w/x"]
    assert new_index == entries[0].modify_index


async def test_watch_wakes_on_delete_and_index_advances(store: Store, p: str) -> None:
    await store.put(p + "w/x", b"1")
    await store.put(p + "w/y", b"2")
    index = await index_of(store, p + "w/")
    waiting = asyncio.create_task(store.watch(p + "w/", index, 10))
    await asyncio.sleep(0.05)
    await store.delete(p + "w/x")
    new_index, entries = await asyncio.wait_for(waiting, WAKE)
    assert new_index > index  # the tombstone, not an entry, carries the new index
    assert [e.key for e in entries] == [p + "w/y"]
    # and the index stays put afterwards: no spurious wake-ups
    assert (await store.watch(p + "w/", new_index, SHORT))[0] == new_index


async def test_watch_ignores_writes_to_other_prefixes(store: Store, p: str) -> None:
    await store.put(p + "w/x", b"1")
    index = await index_of(store, p + "w/")
    waiting = asyncio.create_task(store.watch(p + "w/", index, SHORT * 2))
    await asyncio.sleep(0.05)
    await store.put(p + "other/x", b"1")
    await store.put(p + "w", b"sibling, not below w/")
    await store.put(p + "wx", b"sibling too")
    await store.delete(p + "other/x")
    assert await waiting == (index, await store.list(p + "w/"))


async def test_watch_times_out_with_the_same_index(store: Store, p: str) -> None:
    await store.put(p + "w/x", b"1")
    index = await index_of(store, p + "w/")
    started = time.monotonic()
    assert (await store.watch(p + "w/", index, SHORT))[0] == index
    elapsed = time.monotonic() - started
    assert SHORT <= elapsed < SHORT + 1


async def test_watch_with_index_zero_returns_at_once(store: Store, p: str) -> None:
    await store.put(p + "w/x", b"1")
    started = time.monotonic()
    current, entries = await store.watch(p + "w/", 0, 5)
    assert current >= 1 and [e.key for e in entries] == [p + "w/x"]
    assert (await store.watch(p + "w/", current - 1, 5))[0] == current  # behind: at once
    assert time.monotonic() - started < 1
    assert (await store.watch(p + "empty/", 0, 5))[0] >= 1  # never 0, even with no keys


async def test_watch_with_an_index_ahead_returns_a_lower_one(
    backend: Backend, store: Store, p: str
) -> None:
    """The index went backwards (restore, reaped tombstones): the caller must reset.

    SQLite answers at once; Consul only at the next change or the wait.
    """
    await store.put(p + "w/x", b"1")
    current = await index_of(store, p + "w/")
    started = time.monotonic()
    behind, entries = await store.watch(p + "w/", current + 1000, SHORT)
    elapsed = time.monotonic() - started
    assert behind == current and [e.key for e in entries] == [p + "w/x"]
    assert elapsed < (0.2 if backend.name == "sqlite" else SHORT + 1)


async def test_close_wakes_watchers_with_store_unavailable(backend: Backend, p: str) -> None:
    store = backend.make()
    await store.put(p + "w/x", b"1")
    index = await index_of(store, p + "w/")
    waiting = asyncio.create_task(store.watch(p + "w/", index, 10))
    await asyncio.sleep(0.05)
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(StoreUnavailable):
        await store.get(p + "w/x")
    with pytest.raises(StoreUnavailable):
        await store.put(p + "w/x", b"2")
    await store.close()  # idempotent


async def test_writes_from_one_store_wake_a_watcher_on_another(backend: Backend, p: str) -> None:
    async with backend.make() as agent, backend.make() as cli:
        index = await index_of(agent, p)
        waiting = asyncio.create_task(agent.watch(p, index, 10))
        await asyncio.sleep(0.05)
        await cli.put(p + "x", b"from the cli")
        put_index, entries = await asyncio.wait_for(waiting, WAKE)
        assert [e.value for e in entries] == [b"from the cli"]

        waiting = asyncio.create_task(agent.watch(p, put_index, 10))
        await asyncio.sleep(0.05)
        await cli.delete(p, recurse=True)
        deleted_index, entries = await asyncio.wait_for(waiting, WAKE)
        assert deleted_index > put_index and entries == []
