"""SqliteStore against real SQLite files: Consul KV semantics, watches, durability."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nova.store import (
    MAX_TXN_OPS,
    MAX_VALUE_SIZE,
    SqliteStore,
    StoreError,
    StoreUnavailable,
    TxnOp,
    keys,
    open_store,
)

# Short enough to keep the file fast, long enough for a loaded 2-core CI box.
POLL = 0.02
SHORT = 0.15


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "nova.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(db_path, poll_interval=POLL) as opened:
        yield opened


# -- get / put / list / delete ------------------------------------------------


async def test_put_then_get_returns_value_flags_and_indexes(store: SqliteStore) -> None:
    assert await store.get("a/x") is None
    assert await store.put("a/x", b"one", flags=(1 << 64) - 1)
    first = await store.get("a/x")
    assert first is not None
    assert (first.value, first.flags, first.session) == (b"one", (1 << 64) - 1, None)
    assert first.create_index == first.modify_index >= 1

    assert await store.put("a/x", b"two")
    second = await store.get("a/x")
    assert second is not None
    assert second.value == b"two"
    assert second.create_index == first.create_index
    assert second.modify_index > first.modify_index


async def test_identical_put_keeps_modify_index(store: SqliteStore) -> None:
    await store.put("k", b"same", flags=3)
    before = await store.get("k")
    assert await store.put("k", b"same", flags=3)
    assert await store.get("k") == before


async def test_list_returns_exactly_the_prefix_sorted(store: SqliteStore) -> None:
    for key in ["a/b/2", "a/bc", "a/b/1", "a/b", "a/c", "b/a", "a/b\u00ff", "a/b/\U0010ffff"]:
        await store.put(key, key.encode())
    listed = [entry.key for entry in await store.list("a/b/")]
    assert listed == ["a/b/1", "a/b/2", "a/b/\U0010ffff"]
    assert [e.key for e in await store.list("a/b")] == [
        "a/b",
        "a/b/1",
        "a/b/2",
        "a/b/\U0010ffff",
        "a/bc",
        "a/b\u00ff",
    ]
    assert len(await store.list("")) == 8


async def test_json_helpers_round_trip_readable_utf8(store: SqliteStore) -> None:
    assert await store.put_json("j", {"b": [1, 2], "a": "é"})
    entry = await store.get("j")
    assert entry is not None
    assert entry.value == '{"a":"é","b":[1,2]}'.encode()
    assert await store.get_json("j") == {"a": "é", "b": [1, 2]}
    assert await store.get_json("absent") is None
    await store.put("not-json", b"\xff")
    with pytest.raises(ValueError, match="not-json"):
        await store.get_json("not-json")


async def test_bad_arguments_raise_value_error_before_io(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="empty"):
        await store.put("", b"x")
    with pytest.raises(ValueError, match="'/'"):
        await store.get("/abs")
    with pytest.raises(ValueError, match="limit"):
        await store.put("big", b"x" * (MAX_VALUE_SIZE + 1))
    with pytest.raises(ValueError, match="cas and recurse"):
        await store.delete("a/", cas=1, recurse=True)
    with pytest.raises(ValueError, match="operations"):
        await store.txn([TxnOp.get("k")] * (MAX_TXN_OPS + 1))


# -- compare-and-set ----------------------------------------------------------


async def test_cas_zero_creates_only_if_absent(store: SqliteStore) -> None:
    assert await store.put("lock", b"me", cas=0)
    assert not await store.put("lock", b"you", cas=0)
    entry = await store.get("lock")
    assert entry is not None and entry.value == b"me"


async def test_cas_with_stale_or_missing_index_fails(store: SqliteStore) -> None:
    assert not await store.put("k", b"v", cas=5)  # absent key, non-zero cas
    await store.put("k", b"v1")
    entry = await store.get("k")
    assert entry is not None
    assert await store.put("k", b"v2", cas=entry.modify_index)
    assert not await store.put("k", b"v3", cas=entry.modify_index)  # now stale
    latest = await store.get("k")
    assert latest is not None and latest.value == b"v2"


async def test_delete_cas_like_consul(store: SqliteStore) -> None:
    await store.put("k", b"v")
    entry = await store.get("k")
    assert entry is not None
    assert not await store.delete("k", cas=entry.modify_index + 1)
    assert await store.get("k") is not None
    assert await store.delete("k", cas=entry.modify_index)
    assert await store.get("k") is None
    assert await store.delete("k", cas=123)  # absent: Consul reports success
    assert await store.delete("never-there")


async def test_recursive_delete_removes_only_the_prefix(store: SqliteStore) -> None:
    for key in ["a/1", "a/2/x", "ab", "b"]:
        await store.put(key, b"")
    assert await store.delete("a/", recurse=True)
    assert [entry.key for entry in await store.list()] == ["ab", "b"]


async def test_concurrent_cas_increments_from_two_stores_lose_nothing(db_path: Path) -> None:
    async def increment(store: SqliteStore) -> None:
        while True:
            entry = await store.get("counter")
            assert entry is not None
            if await store.put("counter", b"%d" % (int(entry.value) + 1), cas=entry.modify_index):
                return

    async with SqliteStore(db_path) as one, SqliteStore(db_path) as two:
        await one.put("counter", b"0")
        await asyncio.gather(*(increment(s) for s in [one, two] * 10))
        assert await one.get_json("counter") == 20


# -- transactions -------------------------------------------------------------


async def test_txn_applies_every_op_at_one_index(store: SqliteStore) -> None:
    await store.put("t/old", b"x")
    result = await store.txn(
        [
            TxnOp.check_not_exists("t/new"),
            TxnOp.set("t/new", b"1", flags=7),
            TxnOp.cas("t/created", b"2", 0),
            TxnOp.delete("t/old"),
            TxnOp.get("t/new"),
        ]
    )
    assert result.ok and not result.errors
    set_result, cas_result, got = result.results
    assert set_result.value == b"" and cas_result.value == b""  # values blanked, as Consul
    assert got.value == b"1" and got.flags == 7
    assert set_result.modify_index == cas_result.modify_index == got.modify_index
    assert await store.get("t/old") is None


async def test_failing_txn_applies_nothing_and_names_the_ops(store: SqliteStore) -> None:
    await store.put("t/a", b"a")
    a = await store.get("t/a")
    assert a is not None
    before = await store.watch("", 0, 0)
    result = await store.txn(
        [
            TxnOp.set("t/b", b"b"),
            TxnOp.delete("t/a"),
            TxnOp.check_index("t/a", a.modify_index + 1),
            TxnOp.check_not_exists("t/b"),
            TxnOp.get("t/missing"),
        ]
    )
    assert not result.ok and not result.results
    assert [(e.op_index, e.what) for e in result.errors] == [
        (2, 'failed to check index, key "t/a" doesn\'t exist'),
        (3, 'key "t/b" exists'),
        (4, 'key "t/missing" doesn\'t exist'),
    ]
    assert await store.get("t/b") is None
    assert await store.get("t/a") == a
    assert await store.watch("", 0, 0) == before  # the global index did not move


async def test_read_only_txn_and_trees(store: SqliteStore) -> None:
    for key in ["r/1", "r/2", "s/1"]:
        await store.put(key, key.encode())
    result = await store.txn([TxnOp.get_tree("r/"), TxnOp.get("s/1")])
    assert [e.key for e in result.results] == ["r/1", "r/2", "s/1"]
    assert (await store.txn([TxnOp.delete_tree("r/")])).ok
    assert [e.key for e in await store.list()] == ["s/1"]
    stale = await store.txn([TxnOp.delete_cas("s/1", 999)])
    assert stale.errors[0].what == 'failed to delete key "s/1", index is stale'


# -- watches ------------------------------------------------------------------


async def test_watch_wakes_on_put_under_prefix(store: SqliteStore) -> None:
    index, _ = await store.watch("w/", 0, 0)
    waiting = asyncio.create_task(store.watch("w/", index, 5))
    await asyncio.sleep(0.01)
    await store.put("w/x", b"1")
    new_index, entries = await asyncio.wait_for(waiting, 1)
    assert new_index > index
    assert [e.key for e in entries] == ["w/x"]


async def test_watch_wakes_on_delete_and_index_advances(store: SqliteStore) -> None:
    await store.put("w/x", b"1")
    await store.put("w/y", b"2")
    index, _ = await store.watch("w/", 0, 0)
    waiting = asyncio.create_task(store.watch("w/", index, 5))
    await asyncio.sleep(0.01)
    await store.delete("w/x")
    new_index, entries = await asyncio.wait_for(waiting, 1)
    assert new_index > index  # the tombstone, not an entry, carries the new index
    assert [e.key for e in entries] == ["w/y"]
    # and the index stays put afterwards: no spurious wake-ups
    assert (await store.watch("w/", new_index, SHORT))[0] == new_index


async def test_watch_ignores_writes_to_other_prefixes(store: SqliteStore) -> None:
    await store.put("w/x", b"1")
    index, _ = await store.watch("w/", 0, 0)
    waiting = asyncio.create_task(store.watch("w/", index, SHORT))
    await asyncio.sleep(0.01)
    await store.put("other/x", b"1")
    await store.put("w", b"sibling, not below w/")
    assert await waiting == (index, await store.list("w/"))


async def test_watch_times_out_with_the_same_index(store: SqliteStore) -> None:
    await store.put("w/x", b"1")
    index, _ = await store.watch("w/", 0, 0)
    started = time.monotonic()
    assert (await store.watch("w/", index, SHORT))[0] == index
    assert SHORT <= time.monotonic() - started < SHORT + 1


async def test_watch_with_index_zero_or_ahead_returns_at_once(store: SqliteStore) -> None:
    await store.put("w/x", b"1")
    current, _ = await store.watch("w/", 0, 0)
    started = time.monotonic()
    assert (await store.watch("w/", 0, 5))[0] == current >= 1
    # The caller's index is ahead of the store (restored, tombstones reaped):
    # answer now so that the caller resets to 0 instead of sleeping.
    behind, entries = await store.watch("w/", current + 1000, 5)
    assert behind == current and [e.key for e in entries] == ["w/x"]
    assert time.monotonic() - started < 1


async def test_watch_on_an_empty_store_returns_index_one(store: SqliteStore) -> None:
    assert await store.watch("nothing/", 0, 0) == (1, [])


async def test_two_stores_on_one_file_see_each_other_through_watch(db_path: Path) -> None:
    async with (
        SqliteStore(db_path, poll_interval=POLL) as agent,
        SqliteStore(db_path, poll_interval=POLL) as cli,
    ):
        index, _ = await agent.watch("shared/", 0, 0)
        waiting = asyncio.create_task(agent.watch("shared/", index, 5))
        await asyncio.sleep(POLL * 2)
        await cli.put("shared/x", b"from the cli")
        put_index, entries = await asyncio.wait_for(waiting, 2)
        assert [e.value for e in entries] == [b"from the cli"]

        waiting = asyncio.create_task(agent.watch("shared/", put_index, 5))
        await asyncio.sleep(POLL * 2)
        await cli.delete("shared/", recurse=True)
        deleted_index, entries = await asyncio.wait_for(waiting, 2)
        assert deleted_index > put_index and entries == []


async def test_a_cancelled_put_that_commits_still_wakes_watchers(
    store: SqliteStore, db_path: Path
) -> None:
    index, _ = await store.watch("w/", 0, 0)
    waiting = asyncio.create_task(store.watch("w/", index, 5))
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the put inside the worker thread
    put = asyncio.create_task(store.put("w/x", b"1"))
    await asyncio.sleep(0.05)
    put.cancel()
    other.close()  # the put now commits, though its caller has gone
    new_index, entries = await asyncio.wait_for(waiting, 2)
    assert new_index > index and [e.key for e in entries] == ["w/x"]
    assert put.cancelled()


async def test_close_wakes_watchers_with_store_unavailable(db_path: Path) -> None:
    store = SqliteStore(db_path)
    index, _ = await store.watch("w/", 0, 0)
    waiting = asyncio.create_task(store.watch("w/", index, 5))
    await asyncio.sleep(0.01)
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(StoreUnavailable):
        await store.get("w/x")
    await store.close()  # idempotent


# -- files, durability, errors --------------------------------------------------


async def test_reopen_after_close_keeps_data_and_index(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await store.put("k", b"kept")
        index, _ = await store.watch("", 0, 0)
    async with SqliteStore(db_path) as store:
        entry = await store.get("k")
        assert entry is not None and entry.value == b"kept"
        await store.put("k2", b"")
        assert (await store.watch("", 0, 0))[0] == index + 1


async def test_creates_private_directory_and_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "nova.db"
    async with SqliteStore(path):
        pass
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_refuses_a_newer_schema(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        await store.put("k", b"v")
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE meta SET value = 99 WHERE name = 'schema_version'")
    with pytest.raises(StoreError, match=r"schema version 99.*Upgrade Nova") as caught:
        async with SqliteStore(db_path):
            pass
    assert caught.value.where == str(db_path)


async def test_not_a_database_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"garbage\.db.*not a database"):
        async with SqliteStore(path):
            pass


async def test_write_lock_held_elsewhere_is_store_unavailable(db_path: Path) -> None:
    async with SqliteStore(db_path, busy_timeout=0.05) as store:
        await store.put("k", b"v")
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process is writing
            with pytest.raises(StoreUnavailable, match="locked"):
                await store.put("k", b"w")
            entry = await store.get("k")  # WAL: readers are not blocked
            assert entry is not None and entry.value == b"v"
        finally:
            other.close()
        assert await store.put("k", b"w")


async def test_disk_full_is_a_store_error_and_keeps_committed_data(store: SqliteStore) -> None:
    await store.put("kept", b"committed")

    def shrink_disk(db: object) -> None:  # SQLITE_FULL without a real full disk
        conn: sqlite3.Connection = db.conn  # type: ignore[attr-defined]
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")

    await store._call("test", shrink_disk)
    with pytest.raises(StoreError, match=r"nova\.db.*disk is full.*bytes free") as caught:
        await store.put("big", b"x" * MAX_VALUE_SIZE)
    assert caught.value.what == "put"
    entry = await store.get("kept")
    assert entry is not None and entry.value == b"committed"
    assert await store.get("big") is None
    assert await store.put("small", b"")  # still usable where space allows


# -- factory and key builders ---------------------------------------------------


async def test_open_store_understands_paths_and_urls(tmp_path: Path) -> None:
    locations: list[str | Path] = [
        str(tmp_path / "a.db"),
        f"sqlite://{tmp_path}/b.db",
        f"sqlite:{tmp_path}/c%20d.db",
        tmp_path / "e.db",
    ]
    for location, name in zip(locations, ["a.db", "b.db", "c d.db", "e.db"], strict=True):
        async with open_store(location) as store:
            assert isinstance(store, SqliteStore)
            assert store.path == tmp_path / name
            assert await store.put("k", b"v")
    from nova.store.consul import ConsulStore

    for url in ["consul://127.0.0.1:8500", "http://127.0.0.1:8500"]:
        consul_store = open_store(url)  # nothing is contacted until first use
        assert isinstance(consul_store, ConsulStore)
        await consul_store.close()
    for bad in ["", "postgres://x/y", "sqlite://host/x.db"]:
        with pytest.raises(ValueError):
            open_store(bad)


def test_key_builders_follow_the_layout_and_validate_segments() -> None:
    assert keys.node("host-1.lab") == "nova/v1/nodes/host-1.lab"
    assert keys.deployment("team-a", "web") == "nova/v1/deployments/team-a/web"
    assert keys.container("n1", "c0ffee") == "nova/v1/containers/n1/c0ffee"
    assert keys.status("n1", "containers", "0") == "nova/v1/status/n1/containers/0"
    digest = "sha256:" + "ab" * 32
    assert keys.image(digest, "meta") == f"nova/v1/images/{digest}/meta"
    assert keys.split(keys.policy("ns", "deny-all"), keys.POLICIES) == ("ns", "deny-all")
    for bad in ["", "a/b", "..", "-x", "x y", "a" * 254]:
        with pytest.raises(ValueError, match="namespace"):
            keys.namespace(bad)
    with pytest.raises(ValueError, match="digest"):
        keys.image("latest")
