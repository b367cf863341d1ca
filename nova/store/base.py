"""The store interface: one async key/value API with Consul KV semantics.

Every backend (SQLite now, Consul with the cluster work) behaves like Consul's
`/v1/kv`, `/v1/txn` and blocking queries, so code written against the
embedded store runs unchanged on a cluster. Values are bytes; Nova stores
UTF-8 JSON (`put_json`) so operators can read them in the Consul UI.
"""

from __future__ import annotations

import abc
import builtins
import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from nova.errors import NovaError

MAX_VALUE_SIZE = 512 * 1024
"""Consul's default `kv_max_value_size`; larger values are refused everywhere."""
MAX_TXN_OPS = 128
"""Consul's limit on operations in one `/v1/txn` request."""
MAX_WATCH_TIMEOUT = 600.0
"""Consul caps a blocking query's wait at 10 minutes; longer waits are clamped."""
_MAX_FLAGS = (1 << 64) - 1


class StoreError(NovaError):
    """The store could not be read or written (I/O, transport, corrupt or newer file).

    `what` is the operation, `where` the database file or agent address,
    `reason` the cause as the OS or the server reported it.
    """

    def __init__(self, what: str, where: str, reason: str) -> None:
        super().__init__(f"store {what} failed on {where}: {reason}")
        self.what = what
        self.where = where
        self.reason = reason


class StoreUnavailable(StoreError):
    """The store is there but cannot answer now (locked, closed, no leader): retry later."""


@dataclass(frozen=True, slots=True)
class KVEntry:
    """One key as Consul returns it. Indexes come from the store's global write index."""

    key: str
    value: bytes = field(repr=False)
    create_index: int
    modify_index: int
    flags: int = 0
    session: str | None = None  # the session holding the key's lock, if any
    lock_index: int = 0  # how often a session acquired the key: the leader epoch

    def json(self) -> Any:
        """The value decoded as UTF-8 JSON; ValueError names the key if it is not."""
        try:
            return json.loads(self.value.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError
            raise ValueError(f"store key {self.key!r} does not hold UTF-8 JSON: {exc}") from exc


class TxnVerb(enum.StrEnum):
    """The KV verbs of Consul's `/v1/txn`, spelled as on the wire."""

    SET = "set"
    CAS = "cas"
    GET = "get"
    GET_TREE = "get-tree"
    DELETE = "delete"
    DELETE_TREE = "delete-tree"
    DELETE_CAS = "delete-cas"
    CHECK_INDEX = "check-index"
    CHECK_NOT_EXISTS = "check-not-exists"


WRITE_VERBS = frozenset(
    {TxnVerb.SET, TxnVerb.CAS, TxnVerb.DELETE, TxnVerb.DELETE_TREE, TxnVerb.DELETE_CAS}
)
_TREE_VERBS = frozenset({TxnVerb.GET_TREE, TxnVerb.DELETE_TREE})
_INDEX_VERBS = frozenset({TxnVerb.CAS, TxnVerb.DELETE_CAS, TxnVerb.CHECK_INDEX})


@dataclass(frozen=True, slots=True)
class TxnOp:
    """One operation of a transaction; build it with the named constructors."""

    verb: TxnVerb
    key: str
    value: bytes = field(default=b"", repr=False)
    flags: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        if self.verb in _TREE_VERBS:
            check_prefix(self.key)
        else:
            check_key(self.key)
        check_value(self.key, self.value)
        check_flags(self.flags)
        if self.index < 0:
            raise ValueError(f"txn {self.verb} on {self.key!r}: index must be >= 0")
        if self.index and self.verb not in _INDEX_VERBS:
            raise ValueError(f"txn {self.verb} takes no index")

    @classmethod
    def set(cls, key: str, value: bytes, *, flags: int = 0) -> TxnOp:
        return cls(TxnVerb.SET, key, value, flags)

    @classmethod
    def cas(cls, key: str, value: bytes, index: int, *, flags: int = 0) -> TxnOp:
        """Set only if the key's modify index is `index` (0: only if absent)."""
        return cls(TxnVerb.CAS, key, value, flags, index)

    @classmethod
    def get(cls, key: str) -> TxnOp:
        """Read the key; fails the transaction if it does not exist."""
        return cls(TxnVerb.GET, key)

    @classmethod
    def get_tree(cls, prefix: str) -> TxnOp:
        return cls(TxnVerb.GET_TREE, prefix)

    @classmethod
    def delete(cls, key: str) -> TxnOp:
        return cls(TxnVerb.DELETE, key)

    @classmethod
    def delete_tree(cls, prefix: str) -> TxnOp:
        return cls(TxnVerb.DELETE_TREE, prefix)

    @classmethod
    def delete_cas(cls, key: str, index: int) -> TxnOp:
        """Delete only if the key's modify index is `index` (an absent key passes)."""
        return cls(TxnVerb.DELETE_CAS, key, index=index)

    @classmethod
    def check_index(cls, key: str, index: int) -> TxnOp:
        """Fail the transaction unless the key exists with modify index `index`."""
        return cls(TxnVerb.CHECK_INDEX, key, index=index)

    @classmethod
    def check_not_exists(cls, key: str) -> TxnOp:
        return cls(TxnVerb.CHECK_NOT_EXISTS, key)


@dataclass(frozen=True, slots=True)
class TxnError:
    """Why operation number `op_index` failed (Consul's wording in `what`)."""

    op_index: int
    what: str


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Outcome of `Store.txn`: `results` when `ok`, otherwise `errors` and nothing applied."""

    ok: bool
    results: tuple[KVEntry, ...] = ()
    errors: tuple[TxnError, ...] = ()


class Store(abc.ABC):
    """Async key/value store with Consul KV semantics. Contracts, by group:

    Keys and values
        A key is a non-empty string without a leading '/'; a prefix may be
        empty (everything). Values are at most `MAX_VALUE_SIZE` bytes; flags
        are an opaque uint64. Bad arguments raise ValueError before any I/O.

    Indexes
        The store keeps one global write index that grows on every change
        (like Consul's raft index). An entry's `create_index` is the index
        that created it, `modify_index` the last one that changed it; every
        change made by one `put`, `delete` or `txn` carries the same index.
        Writing a value and flags identical to the stored ones changes
        nothing: the modify index stays and no watcher wakes (as in Consul's
        state store).

    Reads (`get`, `list`)
        Each call sees one consistent snapshot of committed writes, from this
        process or any other sharing the store. `list` is sorted by key (byte
        order of UTF-8, which is code point order).

    Compare-and-set (`put`, `delete`, `txn`)
        `cas=0` means "only if absent", `cas=N` "only if modify_index == N".
        A failed comparison returns False (or a TxnResult with errors) and
        changes nothing; it is not an exception. A transaction is atomic: all
        of its operations apply at one index, or none does.

    Watches (`watch`)
        A Consul blocking query on a prefix, level-triggered: it returns the
        current entries and index, never a diff. It may return early with
        nothing changed; callers loop on the returned index. The index may go
        BACKWARDS (store restored, tombstones reaped): callers must then reset
        to 0 and resync, and must never busy-loop on errors.

    Errors and lifetime
        I/O and transport failures raise StoreError naming the operation and
        the location; transient ones (locked, closed, no leader) raise
        StoreUnavailable. A call cancelled while in flight may still have been
        applied, as with an HTTP request already sent. After `close()` every
        call raises StoreUnavailable. `async with` opens eagerly and closes.
    """

    # `list` below shadows the builtin inside this class: later annotations
    # spell it `builtins.list`.

    # -- reads ---------------------------------------------------------------

    async def get(self, key: str) -> KVEntry | None:
        """The entry at `key`, or None if there is none."""
        check_key(key)
        return await self._get(key)

    async def list(self, prefix: str = "") -> list[KVEntry]:
        """Every entry whose key starts with `prefix`, sorted by key."""
        check_prefix(prefix)
        return await self._list(prefix)

    async def get_json(self, key: str) -> Any:
        """The JSON value at `key`, or None if absent; ValueError if not JSON."""
        entry = await self.get(key)
        return None if entry is None else entry.json()

    # -- writes (compare-and-set) --------------------------------------------

    async def put(self, key: str, value: bytes, *, cas: int | None = None, flags: int = 0) -> bool:
        """Write `value` at `key`. With `cas`, only if the comparison holds.

        True if written (or already identical), False on a CAS mismatch.
        """
        check_key(key)
        check_value(key, value)
        check_flags(flags)
        check_cas(cas)
        return await self._put(key, value, cas, flags)

    async def put_json(self, key: str, obj: Any, *, cas: int | None = None, flags: int = 0) -> bool:
        """`put` of `obj` as compact UTF-8 JSON with sorted keys (stable bytes)."""
        return await self.put(key, encode_json(obj), cas=cas, flags=flags)

    async def delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool:
        """Delete `key`, or every key under the prefix `key` with `recurse`.

        True unless `cas` is given and the key exists with another modify
        index (deleting an absent key succeeds, as in Consul). `cas` and
        `recurse` are exclusive.
        """
        if recurse:
            if cas is not None:
                raise ValueError("delete: cas and recurse cannot be combined")
            check_prefix(key)
        else:
            check_key(key)
            check_cas(cas)
        return await self._delete(key, cas, recurse)

    async def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        """Apply `ops` atomically, in order, each seeing the effects of those before.

        On success `results` holds, in op order: the entry for get, each entry
        for get-tree, and the entry without its value for set, cas and
        check-index. On failure `errors` lists every failing op (index and
        reason) and nothing is applied. At most `MAX_TXN_OPS` operations.
        """
        if not 0 < len(ops) <= MAX_TXN_OPS:
            raise ValueError(f"txn: needs 1 to {MAX_TXN_OPS} operations, got {len(ops)}")
        return await self._txn(tuple(ops))

    # -- watches ---------------------------------------------------------------

    async def watch(
        self,
        prefix: str,
        index: int,
        timeout: float,  # noqa: ASYNC109 (a wait that ends normally, Consul's ?wait=)
    ) -> tuple[int, builtins.list[KVEntry]]:
        """Block until something under `prefix` changes past `index`, or `timeout` s.

        Returns `(current_index, entries)`. `current_index` is the highest
        modify index under the prefix, counting deletions there (Consul's
        X-Consul-Index for a recursive GET); with nothing ever written under
        it, the store's global index. It is at least 1, so `index=0` returns
        at once, and so does `current_index > index`. `current_index < index`
        means the index went backwards: the caller must reset to 0. SQLite
        returns that at once; a Consul server only at the next change or the
        timeout, so callers must not rely on the timing. At the timeout it
        returns the same index if nothing changed. Timeouts above
        `MAX_WATCH_TIMEOUT` are clamped.
        """
        check_prefix(prefix)
        if index < 0:
            raise ValueError(f"watch: index must be >= 0, got {index}")
        if not timeout >= 0:
            raise ValueError(f"watch: timeout must be >= 0, got {timeout}")
        return await self._watch(prefix, index, min(timeout, MAX_WATCH_TIMEOUT))

    # -- lifetime ------------------------------------------------------------

    async def open(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Connect now so that a bad location fails at startup (calls also open lazily)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the store; idempotent. Pending watches raise StoreUnavailable."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- backend hooks: arguments are already validated --------------------

    @abc.abstractmethod
    async def _get(self, key: str) -> KVEntry | None: ...

    @abc.abstractmethod
    async def _list(self, prefix: str) -> builtins.list[KVEntry]: ...

    @abc.abstractmethod
    async def _put(self, key: str, value: bytes, cas: int | None, flags: int) -> bool: ...

    @abc.abstractmethod
    async def _delete(self, key: str, cas: int | None, recurse: bool) -> bool: ...

    @abc.abstractmethod
    async def _txn(self, ops: tuple[TxnOp, ...]) -> TxnResult: ...

    @abc.abstractmethod
    async def _watch(
        self,
        prefix: str,
        index: int,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, builtins.list[KVEntry]]: ...


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON with sorted keys: equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def check_key(key: str) -> None:
    """ValueError unless `key` is a usable single key."""
    if not key:
        raise ValueError("store key must not be empty")
    check_prefix(key)


def check_prefix(prefix: str) -> None:
    """ValueError unless `prefix` is usable as a key prefix ('' is everything)."""
    if not isinstance(prefix, str):
        raise ValueError(f"store key must be a str, got {type(prefix).__name__}")
    if prefix.startswith("/"):
        raise ValueError(f"store key {prefix!r} must not start with '/'")
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"store key {prefix!r} is not valid Unicode: {exc.reason}") from None


def check_value(key: str, value: bytes) -> None:
    if not isinstance(value, bytes):
        raise ValueError(f"value for {key!r} must be bytes, got {type(value).__name__}")
    if len(value) > MAX_VALUE_SIZE:
        raise ValueError(
            f"value for {key!r} is {len(value)} bytes; the limit is {MAX_VALUE_SIZE} "
            "(Consul's kv_max_value_size): split it across keys"
        )


def check_flags(flags: int) -> None:
    if not 0 <= flags <= _MAX_FLAGS:
        raise ValueError(f"flags must be an unsigned 64-bit integer, got {flags}")


def check_cas(cas: int | None) -> None:
    if cas is not None and cas < 0:
        raise ValueError(f"cas index must be >= 0, got {cas}")
