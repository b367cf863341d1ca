"""SQLite backend: the embedded single-host store, with the semantics of `Store`.

One connection per `SqliteStore`, owned by a dedicated worker thread, so the
event loop never waits on the disk. Several processes (agent, CLI) may open
the same file: SQLite's locks serialise their writers, and watchers notice
another process's commits by polling `PRAGMA data_version` while, and only
while, someone is watching. WAL with `synchronous=NORMAL`: a commit survives
a crash of the process; a power loss may drop the last few commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from nova.store.base import (
    WRITE_VERBS,
    KVEntry,
    Store,
    StoreError,
    StoreUnavailable,
    TxnError,
    TxnOp,
    TxnResult,
    TxnVerb,
)

log = logging.getLogger("nova.store.sqlite")

T = TypeVar("T")

SCHEMA_VERSION = 1
TOMBSTONE_RETAIN = 100_000
"""A deleted key's tombstone lives this many writes, then is reaped (Consul reaps too)."""
_REAP_EVERY = 1_000
_KV_COLUMNS = "key, value, flags, create_index, modify_index, lock_index, session"
_SCHEMA_V1 = (
    """CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        flags INTEGER NOT NULL,          -- uint64 stored as two's complement int64
        create_index INTEGER NOT NULL,
        modify_index INTEGER NOT NULL,
        lock_index INTEGER NOT NULL,
        session TEXT
    )""",
    # Deleted keys with the index that deleted them, so that a deletion
    # advances the index of every prefix above it (Consul's graveyard).
    "CREATE TABLE tombstones (key TEXT PRIMARY KEY, modify_index INTEGER NOT NULL)",
    "CREATE INDEX tombstones_by_index ON tombstones (modify_index)",
    # Index 1 is the empty store (a watch never answers below 1), so the first
    # write gets 2 and is always seen as newer.
    "INSERT INTO meta (name, value) VALUES ('last_index', 1)",
    "INSERT INTO meta (name, value) VALUES ('schema_version', 1)",
)


class SqliteStore(Store):
    """The store in one SQLite file (created with its directory, mode 0700/0600).

    `poll_interval` is how often a watched store looks for commits made by
    other processes; `busy_timeout` how long a write waits for another
    process's write lock before raising StoreUnavailable. Use it from one
    event loop.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        poll_interval: float = 0.1,
    ) -> None:
        if busy_timeout < 0 or poll_interval <= 0:
            raise ValueError("busy_timeout must be >= 0 and poll_interval > 0")
        self._path = Path(path)
        self._busy_timeout = busy_timeout
        self._poll_interval = poll_interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nova-store-sqlite")
        self._db: _Db | None = None  # touched only by the worker thread
        self._closed = False
        self._waiters: set[_Waiter] = set()
        self._poller: asyncio.Task[None] | None = None
        self._data_version: int | None = None

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"SqliteStore({str(self._path)!r})"

    async def open(self) -> None:
        await self._call("open", lambda db: None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake(None)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_db)
        finally:
            self._executor.shutdown(wait=False)

    # -- operations ----------------------------------------------------------

    async def _get(self, key: str) -> KVEntry | None:
        return await self._call("get", lambda db: db.get(key))

    async def _list(self, prefix: str) -> list[KVEntry]:
        return await self._call("list", lambda db: db.tree(prefix))

    async def _put(self, key: str, value: bytes, cas: int | None, flags: int) -> bool:
        return await self._write("put", lambda db: db.put(key, value, cas, flags))

    async def _delete(self, key: str, cas: int | None, recurse: bool) -> bool:
        return await self._write("delete", lambda db: db.delete(key, cas, recurse))

    async def _txn(self, ops: tuple[TxnOp, ...]) -> TxnResult:
        return await self._write("txn", lambda db: db.txn(ops))

    async def _watch(
        self,
        prefix: str,
        index: int,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, list[KVEntry]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter = _Waiter(prefix)
        self._waiters.add(waiter)
        self._ensure_poller()
        try:
            while True:
                waiter.event.clear()  # before the read: a later write sets it again
                current, entries, version = await self._call(
                    "watch", lambda db: db.read_prefix(prefix)
                )
                self._observe(version)
                remaining = deadline - loop.time()
                if current != index or remaining <= 0:
                    return current, entries
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await waiter.event.wait()
        finally:
            self._waiters.discard(waiter)

    # -- change notification ---------------------------------------------------

    def _wake(self, keys: Sequence[str] | None) -> None:
        """Wake watchers of prefixes above `keys` (all watchers when None)."""
        for waiter in self._waiters:
            if keys is None or any(key.startswith(waiter.prefix) for key in keys):
                waiter.event.set()

    def _observe(self, version: int) -> None:
        """Record the connection's data_version; a new value means another process wrote."""
        if version != self._data_version:
            seen_before = self._data_version is not None
            self._data_version = version
            if seen_before:
                self._wake(None)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(
                self._poll(), name=f"nova-store-poll {self._path}"
            )

    async def _poll(self) -> None:
        """Notice commits by other processes, as long as anyone is watching."""
        failing = ""
        while self._waiters and not self._closed:
            await asyncio.sleep(self._poll_interval)
            if not self._waiters or self._closed:
                return
            try:
                version = await self._call("poll", lambda db: db.data_version())
            except StoreError as exc:
                if str(exc) != failing:  # once per distinct failure, not every tick
                    log.warning("polling for other writers failed: %s", exc)
                failing = str(exc)
                continue
            failing = ""
            self._observe(version)

    # -- the worker thread ---------------------------------------------------

    async def _write(self, what: str, fn: Callable[[_Db], tuple[T, list[str]]]) -> T:
        """Run a write; the worker schedules the wake-up itself, so that a caller
        cancelled while its write commits cannot leave watchers asleep."""
        loop = asyncio.get_running_loop()

        def write_then_wake(db: _Db) -> T:
            result, changed = fn(db)
            if changed:
                loop.call_soon_threadsafe(self._wake, changed)
            return result

        return await self._call(what, write_then_wake)

    async def _call(self, what: str, fn: Callable[[_Db], T]) -> T:
        if self._closed:
            raise StoreUnavailable(what, str(self._path), "the store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, what, fn)

    def _run(self, what: str, fn: Callable[[_Db], T]) -> T:
        try:
            if self._db is None:
                self._db = _Db.open(self._path, self._busy_timeout)
            return fn(self._db)
        except sqlite3.Error as exc:
            raise _store_error(what, self._path, exc) from exc
        except OSError as exc:
            raise StoreError(what, str(self._path), _os_reason(exc)) from exc

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.conn.close()
            except sqlite3.Error as exc:
                raise _store_error("close", self._path, exc) from exc


@dataclasses.dataclass(eq=False)
class _Waiter:
    prefix: str
    event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class _Db:
    """The connection and its SQL. Used only from the store's worker thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, path: Path, busy_timeout: float) -> _Db:
        _prepare_path(path)
        # `timeout` is SQLite's busy timeout: how long to wait for a lock.
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        try:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                log.warning("%s: journal mode is %s, not wal (filesystem?)", path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            _migrate(conn, path)
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    def get(self, key: str) -> KVEntry | None:
        return _Batch(self.conn, 0).get(key)

    def tree(self, prefix: str) -> list[KVEntry]:
        return _Batch(self.conn, 0).tree(prefix)

    def data_version(self) -> int:
        (version,) = self.conn.execute("PRAGMA data_version").fetchone()
        return int(version)

    def read_prefix(self, prefix: str) -> tuple[int, list[KVEntry], int]:
        """(prefix index, entries, data_version), all from one snapshot."""
        with _transaction(self.conn, "BEGIN"):
            entries = self.tree(prefix)
            index = max((entry.modify_index for entry in entries), default=0)
            if prefix:
                where, args = _under(prefix)
                (buried,) = self.conn.execute(
                    f"SELECT max(modify_index) FROM tombstones{where}", args
                ).fetchone()
                index = max(index, buried or 0)
            if index == 0 or not prefix:
                index = _last_index(self.conn)
            return max(index, 1), entries, self.data_version()

    def put(self, key: str, value: bytes, cas: int | None, flags: int) -> tuple[bool, list[str]]:
        with self._writing() as batch:
            if cas is None:
                batch.set(key, value, flags)
                ok = True
            else:
                ok = batch.cas(key, value, flags, cas) is not None
        return ok, batch.changed

    def delete(self, key: str, cas: int | None, recurse: bool) -> tuple[bool, list[str]]:
        with self._writing() as batch:
            ok = True
            if recurse:
                batch.delete_tree(key)
            elif cas is None:
                batch.delete(key)
            else:
                ok = batch.delete_cas(key, cas)
        return ok, batch.changed

    def txn(self, ops: tuple[TxnOp, ...]) -> tuple[TxnResult, list[str]]:
        results: list[KVEntry] = []
        errors: list[TxnError] = []
        read_only = not any(op.verb in WRITE_VERBS for op in ops)
        try:
            with self._writing(read_only=read_only) as batch:
                for op_index, op in enumerate(ops):
                    try:
                        results.extend(_apply(batch, op))
                    except _OpFailed as exc:
                        errors.append(TxnError(op_index, str(exc)))
                if errors:
                    raise _OpFailed("rollback")
        except _OpFailed:
            return TxnResult(ok=False, errors=tuple(errors)), []
        return TxnResult(ok=True, results=tuple(results)), batch.changed

    @contextlib.contextmanager
    def _writing(self, *, read_only: bool = False) -> Iterator[_Batch]:
        """A write transaction whose changes all carry the next global index."""
        with _transaction(self.conn, "BEGIN" if read_only else "BEGIN IMMEDIATE"):
            batch = _Batch(self.conn, _last_index(self.conn) + 1)
            yield batch
            if batch.changed:
                self.conn.execute(
                    "UPDATE meta SET value = ? WHERE name = 'last_index'", (batch.index,)
                )
                if batch.index % _REAP_EVERY == 0:
                    self.conn.execute(
                        "DELETE FROM tombstones WHERE modify_index <= ?",
                        (batch.index - TOMBSTONE_RETAIN,),
                    )


class _OpFailed(Exception):
    """A transaction operation failed; the message is Consul's wording."""


class _Batch:
    """Consul's KV verbs inside an open transaction; writes carry `index`."""

    def __init__(self, conn: sqlite3.Connection, index: int) -> None:
        self.conn = conn
        self.index = index
        self.changed: list[str] = []

    def get(self, key: str) -> KVEntry | None:
        row = self.conn.execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else _entry(row)

    def tree(self, prefix: str) -> list[KVEntry]:
        where, args = _under(prefix)
        rows = self.conn.execute(f"SELECT {_KV_COLUMNS} FROM kv{where} ORDER BY key", args)
        return [_entry(row) for row in rows]

    def set(self, key: str, value: bytes, flags: int) -> KVEntry:
        old = self.get(key)
        if old is not None and old.value == value and old.flags == flags:
            return old  # identical: no write, no new index (as Consul)
        new = KVEntry(
            key=key,
            value=value,
            create_index=self.index if old is None else old.create_index,
            modify_index=self.index,
            flags=flags,
            session=None if old is None else old.session,
            lock_index=0 if old is None else old.lock_index,
        )
        self.conn.execute(
            f"INSERT OR REPLACE INTO kv ({_KV_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                value,
                _to_int64(flags),
                new.create_index,
                self.index,
                new.lock_index,
                new.session,
            ),
        )
        self.conn.execute("DELETE FROM tombstones WHERE key = ?", (key,))
        self.changed.append(key)
        return new

    def cas(self, key: str, value: bytes, flags: int, index: int) -> KVEntry | None:
        old = self.get(key)
        matches = old is None if index == 0 else old is not None and old.modify_index == index
        return self.set(key, value, flags) if matches else None

    def delete(self, key: str) -> None:
        if self.conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount:
            self._bury([key])

    def delete_cas(self, key: str, index: int) -> bool:
        old = self.get(key)
        if old is not None and old.modify_index != index:
            return False
        self.delete(key)
        return True

    def delete_tree(self, prefix: str) -> None:
        where, args = _under(prefix)
        keys = [key for (key,) in self.conn.execute(f"SELECT key FROM kv{where}", args)]
        if keys:
            self.conn.execute(f"DELETE FROM kv{where}", args)
            self._bury(keys)

    def _bury(self, keys: list[str]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO tombstones (key, modify_index) VALUES (?, ?)",
            [(key, self.index) for key in keys],
        )
        self.changed.extend(keys)


def _apply(batch: _Batch, op: TxnOp) -> list[KVEntry]:
    """Run one transaction op; raise _OpFailed, worded as Consul does, if it fails."""
    key, quoted = op.key, json.dumps(op.key, ensure_ascii=False)
    match op.verb:
        case TxnVerb.SET:
            return [_without_value(batch.set(key, op.value, op.flags))]
        case TxnVerb.CAS:
            entry = batch.cas(key, op.value, op.flags, op.index)
            if entry is None:
                raise _OpFailed(f"failed to set key {quoted}, index is stale")
            return [_without_value(entry)]
        case TxnVerb.GET:
            entry = batch.get(key)
            if entry is None:
                raise _OpFailed(f"key {quoted} doesn't exist")
            return [entry]
        case TxnVerb.GET_TREE:
            return batch.tree(key)
        case TxnVerb.DELETE:
            batch.delete(key)
        case TxnVerb.DELETE_TREE:
            batch.delete_tree(key)
        case TxnVerb.DELETE_CAS:
            if not batch.delete_cas(key, op.index):
                raise _OpFailed(f"failed to delete key {quoted}, index is stale")
        case TxnVerb.CHECK_INDEX:
            entry = batch.get(key)
            if entry is None:
                raise _OpFailed(f"failed to check index, key {quoted} doesn't exist")
            if entry.modify_index != op.index:
                raise _OpFailed(
                    f"failed index check for key {quoted}, "
                    f"current modify index {entry.modify_index} != {op.index}"
                )
            return [_without_value(entry)]
        case TxnVerb.CHECK_NOT_EXISTS:
            if batch.get(key) is not None:
                raise _OpFailed(f"key {quoted} exists")
    return []


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[None]:
    """BEGIN … COMMIT; on any error ROLLBACK, so committed data is never touched."""
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    with _transaction(conn, "BEGIN IMMEDIATE"):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                "open",
                str(path),
                f"the file has store schema version {version}, but this Nova understands "
                f"only up to {SCHEMA_VERSION}: a newer Nova wrote it. Upgrade Nova, or "
                "point it at another state file.",
            )
        if version == 0:
            for statement in _SCHEMA_V1:
                conn.execute(statement)


def _last_index(conn: sqlite3.Connection) -> int:
    (index,) = conn.execute("SELECT value FROM meta WHERE name = 'last_index'").fetchone()
    return int(index)


def _under(prefix: str) -> tuple[str, tuple[str | bytes, ...]]:
    """A WHERE clause for keys starting with `prefix`, as a range scan on the key index."""
    if not prefix:
        return "", ()
    raw = prefix.encode()
    upper = raw[:-1] + bytes([raw[-1] + 1])  # UTF-8 never contains 0xFF: no carry
    return " WHERE key >= ? AND key < CAST(? AS TEXT)", (prefix, upper)


def _entry(row: tuple[Any, ...]) -> KVEntry:
    key, value, flags, create_index, modify_index, lock_index, session = row
    return KVEntry(
        key=key,
        value=bytes(value),
        create_index=create_index,
        modify_index=modify_index,
        flags=flags + (1 << 64) if flags < 0 else flags,
        session=session,
        lock_index=lock_index,
    )


def _without_value(entry: KVEntry) -> KVEntry:
    return dataclasses.replace(entry, value=b"")


def _to_int64(flags: int) -> int:
    return flags - (1 << 64) if flags >= 1 << 63 else flags


def _prepare_path(path: Path) -> None:
    """Create the parent directory (0700) and the file (0600) if they are missing."""
    parent = path.parent
    if not parent.is_dir():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        parent.chmod(0o700)  # independent of the umask
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def _store_error(what: str, path: Path, exc: sqlite3.Error) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", -1) & 0xFF
    reason = f"{exc} ({getattr(exc, 'sqlite_errorname', type(exc).__name__)})"
    if code == sqlite3.SQLITE_FULL:
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(path.parent).free} bytes free in {path.parent}"
    elif code == sqlite3.SQLITE_READONLY:
        reason += "; the file, its directory or its filesystem is read-only"
    elif code == sqlite3.SQLITE_CANTOPEN:
        if not os.access(path.parent, os.W_OK | os.X_OK):
            reason += f"; no write access to {path.parent}"
    elif code == sqlite3.SQLITE_NOTADB:
        reason += "; the file is not a Nova state database"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreUnavailable(what, str(path), reason + "; another process holds the lock")
    return StoreError(what, str(path), reason)


def _os_reason(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"
