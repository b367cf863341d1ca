"""Consul backend: the cluster store, with the semantics of `Store`, on Consul's KV.

Values are stored as given (Nova writes UTF-8 JSON), so operators read them
in the Consul UI's KV browser. Reads and writes map one to one onto
`/v1/kv` (`recurse` for `list`, `cas` for compare-and-set), transactions
onto `/v1/txn`, watches onto blocking queries. Every request goes through
one py-consul asyncio client (`NovaConsul`); transport failures, timeouts
and server errors become StoreUnavailable naming the agent's URL.

Beyond `Store`, the session helpers the coordinator and agents build on:
`create_session` (TTL, LockDelay 0, release/delete, health checks),
`renew_session`, `destroy_session`, `acquire`/`release` of a key, and
`txn_fenced`, the leader-write fence.

Watches, on Consul: an index that went backwards (snapshot restore, a
rebuilt dev server, reaped tombstones) is seen only when Consul answers, at
the next change or at the wait. A caller that got StoreUnavailable should
therefore resync from index 0 rather than resume with its old index.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import json
import logging
import os
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp

from nova.store.base import (
    MAX_TXN_OPS,
    KVEntry,
    Store,
    StoreError,
    StoreUnavailable,
    TxnError,
    TxnOp,
    TxnResult,
    TxnVerb,
    check_flags,
    check_key,
    check_value,
)
from nova.store.consul_client import ConsulException, ConsulHTTPError, NovaConsul, go_duration

log = logging.getLogger("nova.store.consul")

DEFAULT_PORT = 8500
MAX_TXN_BYTES = 512 * 1024
"""Consul's default `txn_max_req_len`: the largest `/v1/txn` body (values travel in base64)."""
FENCE_OP = -1
"""`TxnError.op_index` of the fence in a `txn_fenced` result: the session lost the key."""

_MIN_WAIT = 0.001  # Consul reads wait=0 as "the default wait" (5 min): never send it
# Plain reads in Consul's `consistent` mode. In the default mode a raft leader
# answers from its state machine, which right after an election (a restart of
# the Consul servers) can lag writes that were already committed: a new Nova
# leader then planned from a state without its predecessor's last assignments
# and moved replicas that should have stayed. `consistent` makes the leader
# confirm its leadership and serve only once it has applied every commit.
CONSISTENT = "consistent"
_EARLY = 0.05  # a blocking query answering faster than this with the same index is suspicious
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0
_VALUE_VERBS = frozenset({TxnVerb.SET, TxnVerb.CAS})
_TREE_VERBS = frozenset({TxnVerb.GET_TREE, TxnVerb.DELETE_TREE})


class SessionInvalid(StoreError):
    """The session does not exist (expired, destroyed, invalidated): create a new one."""


class ConsulStore(Store):
    """The store in a Consul cluster, through the agent at `url`.

    `url` is `consul://host[:port]` (plain HTTP), `http://…` or `https://…`;
    the port defaults to 8500. The ACL token comes from `token` or
    `CONSUL_HTTP_TOKEN`. `timeout` bounds every request (blocking queries
    get their wait on top); `max_txn_bytes` is the server's
    `txn_max_req_len`. Use it from one event loop.
    """

    def __init__(
        self,
        url: str = f"consul://127.0.0.1:{DEFAULT_PORT}",
        *,
        token: str | None = None,
        timeout: float = 10.0,
        max_txn_bytes: int = MAX_TXN_BYTES,
        connections_limit: int = 100,
    ) -> None:
        if timeout <= 0 or max_txn_bytes <= 0:
            raise ValueError("timeout and max_txn_bytes must be > 0")
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("consul", "http", "https"):
            raise ValueError(f"Consul location {url!r}: use consul://host:port or http(s)://…")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"Consul location {url!r}: the port is not a number") from None
        if not parts.hostname or parts.path.strip("/") or parts.query or parts.fragment:
            raise ValueError(
                f"Consul location {url!r}: give only a host and port, e.g. consul://127.0.0.1:8500"
            )
        self._scheme = "https" if scheme == "https" else "http"
        self._host = parts.hostname
        self._port = port
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._url = f"{self._scheme}://{host}:{port}"
        self._token = token
        self._timeout = timeout
        self._max_txn_bytes = max_txn_bytes
        self._connections_limit = connections_limit
        self._consul: NovaConsul | None = None
        self._closed = False

    @property
    def url(self) -> str:
        """The agent's base URL, as named in errors."""
        return self._url

    def __repr__(self) -> str:
        return f"ConsulStore({self._url!r})"

    async def open(self) -> None:
        """Connect and ask for the cluster leader: StoreUnavailable if there is none."""
        client = self._client("open")
        with self._errors("open"):
            leader = await client.status.leader()
        if not leader:
            raise StoreUnavailable("open", self._url, "the Consul cluster has no leader")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, self._consul = self._consul, None
        if client is not None:
            await client.close()

    # -- operations ----------------------------------------------------------

    async def _get(self, key: str) -> KVEntry | None:
        check_http_key(key)
        client = self._client("get")
        with self._errors("get"):
            _, item = await client.kv.get(key, consistency=CONSISTENT)
        return None if item is None else _entry(item)

    async def _list(self, prefix: str) -> list[KVEntry]:
        check_http_key(prefix)
        _, entries = await self._read_tree("list", prefix, 0, 0.0)
        return entries

    async def _put(self, key: str, value: bytes, cas: int | None, flags: int) -> bool:
        check_http_key(key)
        client = self._client("put")
        with self._errors("put"):
            return bool(await client.kv.put(key, value, cas=cas, flags=flags))

    async def _delete(self, key: str, cas: int | None, recurse: bool) -> bool:
        check_http_key(key)
        client = self._client("delete")
        with self._errors("delete"):
            return bool(await client.kv.delete(key, recurse=recurse or None, cas=cas))

    async def _txn(self, ops: tuple[TxnOp, ...]) -> TxnResult:
        body = await self._send_txn("txn", [_wire_op(op) for op in ops])
        return _txn_result(body, offset=0)

    async def txn(self, ops: Sequence[TxnOp]) -> TxnResult:
        """`Store.txn`; also ValueError for keys `check_http_key` refuses and for
        get-tree or delete-tree of the empty prefix, which Consul's `/v1/txn`
        refuses ("Must provide key")."""
        _check_txn_keys(ops)
        return await super().txn(ops)

    async def _watch(
        self,
        prefix: str,
        index: int,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, builtins.list[KVEntry]]:
        check_http_key(prefix)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backoff = 0.0
        while True:
            started = loop.time()
            remaining = deadline - started
            blocking = index if remaining >= _MIN_WAIT else 0
            current, entries = await self._read_tree("watch", prefix, blocking, remaining)
            now = loop.time()
            # A new index, or one that went backwards (the caller resets), or time is up.
            if current != index or now >= deadline or not blocking:
                return current, entries
            # Consul woke early with nothing new under the prefix (a write
            # elsewhere in its watch set). Ask again; if it keeps answering at
            # once, back off rather than spin.
            if now - started < _EARLY:
                backoff = min(max(backoff * 2, _BACKOFF_MIN), _BACKOFF_MAX)
                log.debug("watch %r: early answers at index %d; backing off", prefix, index)
                await asyncio.sleep(min(backoff, deadline - now))
            else:
                backoff = 0.0

    # -- sessions and locks ----------------------------------------------------

    async def create_session(
        self,
        *,
        ttl: float | None,
        name: str | None = None,
        lock_delay: float = 0.0,
        behavior: str = "release",
        node_checks: Sequence[str] | None = None,
        service_checks: Sequence[str] | None = None,
    ) -> str:
        """A new session's ID.

        `ttl` in seconds (None: no TTL; the server's `session_ttl_min` is the
        floor and Consul may let it live up to 2x TTL); `lock_delay` defaults
        to 0, so that another session can take a released lock at once;
        `behavior` 'release' frees held keys on invalidation, 'delete' deletes
        them. `node_checks` defaults to serfHealth; `service_checks` are check
        IDs, e.g. a TTL check the holder passes often, to fail over faster than
        serfHealth. StoreError if Consul refuses (TTL below the floor, unknown
        check).
        """
        client = self._client("create session")
        with self._errors("create session", refused_is_permanent=True):
            session_id = await client.session.create(
                name=name,
                lock_delay=lock_delay,
                behavior=behavior,
                ttl=ttl,
                node_checks=node_checks,
                service_checks=service_checks,
            )
        return str(session_id)

    async def renew_session(self, session: str) -> bool:
        """Renew the session's TTL; False if the session no longer exists."""
        client = self._client("renew session")
        with self._errors("renew session"):
            return bool(await client.session.renew(session))

    async def destroy_session(self, session: str) -> None:
        """Destroy the session, releasing (or deleting) its keys; absent is fine."""
        client = self._client("destroy session")
        with self._errors("destroy session"):
            await client.session.destroy(session)

    async def session_info(self, session: str) -> dict[str, Any] | None:
        """The session as Consul describes it (ID, TTL, checks, …), or None if gone."""
        client = self._client("session info")
        with self._errors("session info"):
            _, info = await client.session.info(session)
        return None if info is None else dict(info)

    async def acquire(self, key: str, value: bytes, session: str, *, flags: int = 0) -> bool:
        """Take the lock on `key` for `session`, writing `value`; False if another holds it.

        A successful acquisition by a new holder increments the key's
        `lock_index`: use it as the leader epoch. SessionInvalid if the
        session does not exist.
        """
        check_key(key)
        check_http_key(key)
        check_value(key, value)
        check_flags(flags)
        client = self._client("acquire")
        with self._errors("acquire"):
            return bool(await client.kv.put(key, value, flags=flags, acquire=session))

    async def release(self, key: str, session: str, value: bytes = b"", *, flags: int = 0) -> bool:
        """Give up `session`'s lock on `key`; False if it did not hold it.

        Consul writes `value` (and `flags`) as part of the release: pass what
        the key should read afterwards.
        """
        check_key(key)
        check_http_key(key)
        check_value(key, value)
        check_flags(flags)
        client = self._client("release")
        with self._errors("release"):
            return bool(await client.kv.put(key, value, flags=flags, release=session))

    async def txn_fenced(self, ops: Sequence[TxnOp], key: str, session: str) -> TxnResult:
        """The leader-write fence: `ops` apply only while `session` holds `key`.

        One `/v1/txn` whose first operation is Consul's `check-session` on
        `key`, then `ops` (at most `MAX_TXN_OPS - 1`; none only checks the
        fence). The result is about `ops` alone, as `txn` reports it; if the
        session no longer holds the key, `errors` has an entry with
        `op_index == FENCE_OP` and nothing is applied: the caller must stop
        acting as the holder.
        """
        check_key(key)
        if len(ops) > MAX_TXN_OPS - 1:
            raise ValueError(f"txn_fenced: at most {MAX_TXN_OPS - 1} operations, got {len(ops)}")
        if not session:
            raise ValueError("txn_fenced: session must not be empty")
        check_http_key(key)
        _check_txn_keys(ops)
        fence = {"KV": {"Verb": "check-session", "Key": key, "Session": session}}
        body = await self._send_txn("txn", [fence, *(_wire_op(op) for op in ops)])
        return _txn_result(body, offset=1)

    # -- services and TTL checks (on the local Consul agent) -------------------

    async def register_ttl_service(
        self,
        *,
        name: str,
        service_id: str,
        check_id: str,
        ttl: float,
        address: str | None = None,
        meta: dict[str, str] | None = None,
        deregister_after: float = 600.0,
    ) -> None:
        """Register a service with one TTL check, on the Consul agent at `url`.

        The check starts *passing*: registering again (after a Consul restart)
        never turns an existing check critical, which would invalidate the
        sessions bound to it. Consul drops the service once its check has been
        critical for `deregister_after` s (its floor is 60 s).
        """
        check = {
            "CheckID": check_id,
            "Name": f"{name} TTL",
            "TTL": go_duration(ttl),
            "Status": "passing",
            "DeregisterCriticalServiceAfter": go_duration(max(deregister_after, 60.0)),
        }
        client = self._client("register service")
        with self._errors("register service", refused_is_permanent=True):
            await client.agent.service.register(
                name, service_id=service_id, address=address, meta=meta, check=check
            )

    async def pass_check(self, check_id: str, note: str = "") -> bool:
        """Mark a TTL check passing; False if the local agent does not know it."""
        client = self._client("pass check")
        try:
            with self._errors("pass check"):
                return bool(await client.agent.check.ttl_pass(check_id, notes=note or None))
        except StoreError as exc:
            if "unknown check" in exc.reason.lower():  # some versions answer 500, not 404
                return False
            raise

    async def deregister_service(self, service_id: str) -> None:
        """Remove the service and its checks from the local agent; absent is fine."""
        client = self._client("deregister service")
        with self._errors("deregister service"):
            await client.agent.service.deregister(service_id)

    # -- plumbing --------------------------------------------------------------

    def _client(self, what: str) -> NovaConsul:
        if self._closed:
            raise StoreUnavailable(what, self._url, "the store is closed")
        if self._consul is None:
            self._consul = NovaConsul(
                self._host,
                self._port,
                scheme=self._scheme,
                token=self._token,
                timeout=self._timeout,
                connections_limit=self._connections_limit,
            )
        return self._consul

    async def _read_tree(
        self, what: str, prefix: str, index: int, wait: float
    ) -> tuple[int, list[KVEntry]]:
        """A recursive read; blocking (until past `index` or `wait` s) when `index` > 0."""
        client = self._client(what)
        with self._errors(what):
            raw_index, items = await client.kv.get(
                prefix,
                recurse=True,
                index=index or None,
                wait=go_duration(max(wait, _MIN_WAIT)),
                # A blocking query wakes on a change of the index it was given;
                # only a plain read must be up to date (see CONSISTENT).
                consistency=None if index else CONSISTENT,
            )
        try:
            current = int(raw_index)
        except (TypeError, ValueError):
            raise StoreError(what, self._url, f"bad X-Consul-Index {raw_index!r}") from None
        entries = sorted((_entry(item) for item in items or ()), key=lambda e: e.key)
        return max(current, 1), entries

    async def _send_txn(self, what: str, payload: list[dict[str, Any]]) -> dict[str, Any]:
        size = len(json.dumps(payload))
        if size > self._max_txn_bytes:
            raise ValueError(
                f"txn: the request is {size} bytes (values travel in base64); Consul takes at "
                f"most {self._max_txn_bytes} (txn_max_req_len): split it into several txns"
            )
        client = self._client(what)
        with self._errors(what):
            body: dict[str, Any] = await client.txn.put(payload)
        return body

    @contextlib.contextmanager
    def _errors(self, what: str, *, refused_is_permanent: bool = False) -> Iterator[None]:
        """Map transport and HTTP failures to StoreError/StoreUnavailable naming the URL."""
        try:
            yield
        except ConsulHTTPError as exc:
            if self._closed:
                raise StoreUnavailable(what, self._url, "the store is closed") from exc
            raise _http_error(what, self._url, exc, refused_is_permanent) from exc
        except TimeoutError as exc:
            raise StoreUnavailable(
                what, self._url, f"no answer within the client timeout ({self._timeout:g} s + wait)"
            ) from exc
        except (aiohttp.ClientError, ConsulException, OSError) as exc:
            reason = "the store is closed" if self._closed else _transport_reason(exc)
            raise StoreUnavailable(what, self._url, reason) from exc


def _http_error(
    what: str, url: str, exc: ConsulHTTPError, refused_is_permanent: bool
) -> StoreError:
    reason = f"HTTP {exc.status}: {exc.body or '(no body)'}"
    if "invalid session" in exc.body.lower():
        return SessionInvalid(what, url, reason)
    if exc.status == 429 or (exc.status >= 500 and not refused_is_permanent):
        return StoreUnavailable(what, url, reason)
    if exc.status >= 500 and _transient(exc.body):
        return StoreUnavailable(what, url, reason)
    if exc.status == 403:
        reason += "; the ACL token lacks permission (set CONSUL_HTTP_TOKEN)"
    return StoreError(what, url, reason)


def _transient(body: str) -> bool:
    """Whether a 5xx body reads like a cluster in trouble rather than a refused request."""
    lowered = body.lower()
    return any(
        word in lowered
        for word in (
            "no cluster leader",
            "leadership lost",
            "not ready to serve consistent reads",
            "rpc error",
            "timeout",
            "eof",
            "raft",
        )
    )


def check_http_key(key: str) -> None:
    """ValueError unless `key` reaches Consul's `/v1/kv/<key>` unchanged.

    Consul answers 400 to a path with a character Go's unicode.IsPrint
    refuses (controls, unassigned, private use, separators but ' '), and
    its HTTP router cleans paths: 'a//b', 'a/./b' and 'a/../b' would read
    and write another key. Nova's key builders (`nova.store.keys`) never
    produce either.
    """
    if not key.isprintable():
        raise ValueError(f"store key {key!r}: Consul takes only printable characters in keys")
    segments = key.split("/")
    if "" in segments[:-1] or any(s in (".", "..") for s in segments):
        raise ValueError(
            f"store key {key!r}: empty, '.' or '..' path segments would name another key in Consul"
        )


def _check_txn_keys(ops: Sequence[TxnOp]) -> None:
    for op in ops:
        check_http_key(op.key)
        if op.verb in _TREE_VERBS and not op.key:
            raise ValueError(f"txn {op.verb}: Consul needs a non-empty prefix in a transaction")


def _transport_reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        return f"cannot connect: {os.strerror(errno) if errno else exc.os_error}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _entry(item: dict[str, Any]) -> KVEntry:
    value = item.get("Value")
    if isinstance(value, str):  # /v1/txn answers in base64; py-consul decodes /v1/kv
        value = base64.b64decode(value)
    return KVEntry(
        key=str(item["Key"]),
        value=bytes(value or b""),
        create_index=int(item["CreateIndex"]),
        modify_index=int(item["ModifyIndex"]),
        flags=int(item.get("Flags") or 0),
        session=item.get("Session") or None,
        lock_index=int(item.get("LockIndex") or 0),
    )


def _wire_op(op: TxnOp) -> dict[str, Any]:
    kv: dict[str, Any] = {"Verb": op.verb.value, "Key": op.key}
    if op.verb in _VALUE_VERBS:
        kv["Value"] = base64.b64encode(op.value).decode("ascii")
        kv["Flags"] = op.flags
    if op.index:
        kv["Index"] = op.index
    return {"KV": kv}


def _txn_result(body: dict[str, Any], *, offset: int) -> TxnResult:
    """TxnResult from Consul's answer; the first `offset` ops were ours (the fence)."""
    errors = body.get("Errors") or []
    if errors:
        return TxnResult(
            ok=False,
            errors=tuple(
                TxnError(
                    FENCE_OP if int(e["OpIndex"]) < offset else int(e["OpIndex"]) - offset,
                    str(e["What"]),
                )
                for e in errors
            ),
        )
    results = [_entry(r["KV"]) for r in body.get("Results") or () if r.get("KV")]
    return TxnResult(ok=True, results=tuple(results[offset:]))
