"""py-consul's asyncio client with what Nova needs and py-consul 1.8 lacks.

A thin subclass, not a second client: every endpoint is py-consul's, and the
changes are these.

- HTTP: every request has a deadline (py-consul's asyncio client has none by
  default), and a blocking query's deadline is the wait plus Consul's jitter
  (wait/16) plus the ordinary request timeout, as py-consul's sync client
  already does. An HTTP error status raises `ConsulHTTPError` carrying the
  status and body (py-consul raises a class per status and puts the status
  only in some messages). The aiohttp session is built without the
  deprecated connector arguments.
- Sessions: TTLs below 10 s (the server's `session_ttl_min` is the real
  floor) and fractions of a second; `LockDelay` always sent, so 0 means 0
  and not Consul's 15 s default; `NodeChecks` and `ServiceChecks`, so a
  session can hang on a service TTL check instead of serfHealth alone;
  `renew` says False for a session that is gone instead of raising.
- Transactions: the ACL token is sent (py-consul drops it), and a 409 (some
  operation failed: the body says which) is an answer, not an error.

py-consul is untyped; this module is the only one importing it, and it
gives the rest of Nova typed signatures.
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import consul.aio  # type: ignore[import-untyped, unused-ignore]
import consul.base  # type: ignore[import-untyped, unused-ignore]
import consul.std  # type: ignore[import-untyped, unused-ignore]
from consul.api.session import Session  # type: ignore[import-untyped, unused-ignore]
from consul.api.txn import Txn  # type: ignore[import-untyped, unused-ignore]
from consul.callback import CB  # type: ignore[import-untyped, unused-ignore]
from consul.exceptions import ConsulException  # type: ignore[import-untyped, unused-ignore]

JITTER_FRACTION = 16
"""Consul adds up to wait/16 of random delay to a blocking query (structs.JitterFraction)."""
DEFAULT_WAIT = 300.0
"""Consul's wait for a blocking query that names none."""

Callback = Callable[[Any], Any]

__all__ = ["ConsulException", "ConsulHTTPError", "HTTPClient", "NovaConsul", "go_duration"]


class ConsulHTTPError(ConsulException):  # type: ignore[misc, unused-ignore]
    """Consul answered with an error status: `status` and `body` as sent."""

    def __init__(self, status: int, body: str, method: str, url: str) -> None:
        super().__init__(f"{method} {url}: HTTP {status}: {body.strip()}")
        self.status = status
        self.body = body.strip()


def go_duration(seconds: float) -> str:
    """`seconds` as a Go duration in whole milliseconds: 1.5 -> '1500ms'."""
    return f"{round(seconds * 1000)}ms"


def parse_wait(params: Sequence[tuple[str, Any]] | None) -> float | None:
    """The wait of a blocking query's parameters in seconds; None if it is no blocking query."""
    query = dict(params or ())
    if "index" not in query:
        return None
    wait = consul.std.parse_duration(str(query.get("wait", "")))
    return float(wait) if wait > 0 else DEFAULT_WAIT  # no wait: Consul's default


class HTTPClient(consul.aio.HTTPClient):  # type: ignore[misc, unused-ignore]
    """py-consul's aiohttp adapter with deadlines and status-carrying errors."""

    def __init__(
        self,
        host: str,
        port: int,
        scheme: str,
        *,
        verify: bool | str,
        cert: Any,
        timeout: float,
        connections_limit: int,
    ) -> None:
        # The grandparent sets host, port, base_uri; the parent's constructor
        # would pass aiohttp connector arguments that it deprecates.
        consul.base.HTTPClient.__init__(self, host, port, scheme, verify, cert)
        self.loop = None
        self.timeout = timeout
        ssl_arg: ssl.SSLContext | bool = False
        if scheme == "https" and verify:
            ssl_arg = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if cert:
                ssl_arg.load_cert_chain(*(cert if isinstance(cert, tuple) else (cert,)))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_arg, limit=connections_limit),
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    def deadline(self, params: Sequence[tuple[str, Any]] | None) -> float:
        """Seconds to allow a request: a blocking query gets its wait and jitter on top."""
        wait = parse_wait(params)
        return self.timeout if wait is None else self.timeout + wait + wait / JITTER_FRACTION

    async def _request(  # noqa: PLR0917 (py-consul's signature)
        self,
        callback: Callback,
        method: str,
        uri: str,
        headers: dict[str, str] | None,
        data: Any = None,
        connections_timeout: float | None = None,
        raw: bool = False,
    ) -> Any:
        def checked(response: Any) -> Any:
            try:
                return callback(response)
            except ConsulException as exc:
                if response.code < 400:  # a body that did not decode
                    raise
                path = urllib.parse.urlsplit(uri).path
                raise ConsulHTTPError(response.code, str(response.body), method, path) from exc

        return await super()._request(
            checked, method, uri, headers, data, connections_timeout or self.timeout, raw
        )

    def get(  # noqa: PLR0917 (py-consul's signature)
        self,
        callback: Callback,
        path: str,
        params: Sequence[tuple[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        raw: bool = False,
        connections_timeout: float | None = None,
    ) -> Any:
        return super().get(
            callback, path, params, headers, raw, connections_timeout or self.deadline(params)
        )


class SessionAPI(Session):  # type: ignore[misc, unused-ignore]
    """py-consul's Session endpoint; `create` and `renew` replaced."""

    def create(  # noqa: PLR0917 (py-consul's signature, extended)
        self,
        name: str | None = None,
        node: str | None = None,
        checks: Sequence[str] | None = None,
        lock_delay: float = 15.0,
        behavior: str = "release",
        ttl: float | None = None,
        dc: str | None = None,
        token: str | None = None,
        *,
        node_checks: Sequence[str] | None = None,
        service_checks: Sequence[str] | None = None,
    ) -> Any:
        """Create a session; returns (a coroutine for) its ID.

        Unlike py-consul: `ttl` and `lock_delay` are seconds as floats, any
        TTL the server's `session_ttl_min` allows; `LockDelay` is always
        sent; `node_checks` (default: serfHealth, decided by Consul) and
        `service_checks` (check IDs) bind the session to health checks.
        """
        if behavior not in ("release", "delete"):
            raise ValueError(f"session behavior must be 'release' or 'delete', got {behavior!r}")
        if lock_delay < 0 or (ttl is not None and ttl <= 0):
            raise ValueError("session lock_delay must be >= 0 and ttl > 0")
        body: dict[str, Any] = {"LockDelay": go_duration(lock_delay), "Behavior": behavior}
        if name:
            body["Name"] = name
        if node:
            body["Node"] = node
        if checks is not None:
            body["Checks"] = list(checks)
        if node_checks is not None:
            body["NodeChecks"] = list(node_checks)
        if service_checks is not None:
            body["ServiceChecks"] = [{"ID": check} for check in service_checks]
        if ttl is not None:
            body["TTL"] = go_duration(ttl)
        params = [("dc", dc or self.agent.dc)] if dc or self.agent.dc else []
        return self.agent.http.put(
            CB.json(is_id=True),
            "/v1/session/create",
            params=params,
            headers=self.agent.prepare_headers(token),
            data=json.dumps(body),
        )

    def renew(self, session_id: str, dc: str | None = None, token: str | None = None) -> Any:
        """Renew the session's TTL; (a coroutine for) False if the session is gone."""
        params = [("dc", dc or self.agent.dc)] if dc or self.agent.dc else []
        return self.agent.http.put(
            _found,
            f"/v1/session/renew/{session_id}",
            params=params,
            headers=self.agent.prepare_headers(token),
        )


class TxnAPI(Txn):  # type: ignore[misc, unused-ignore]
    """py-consul's Txn endpoint; `put` sends the token and answers a 409."""

    def put(self, payload: Sequence[dict[str, Any]], token: str | None = None) -> Any:
        """(A coroutine for) the body: `{"Results": [...], "Errors": [...]}`.

        HTTP 200 (all applied) and 409 (nothing applied; `Errors` says why)
        are answers; anything else raises ConsulHTTPError.
        """
        params = [("dc", self.agent.dc)] if self.agent.dc else []
        return self.agent.http.put(
            _txn_body,
            "/v1/txn",
            params=params,
            headers=self.agent.prepare_headers(token),
            data=json.dumps(payload),
        )


class NovaConsul(consul.aio.Consul):  # type: ignore[misc, unused-ignore]
    """py-consul's asyncio client with the session, txn and HTTP changes above.

    Construct it inside a running event loop (aiohttp requires one). `timeout`
    bounds every request; blocking queries get their wait on top.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        scheme: str = "http",
        token: str | None = None,
        timeout: float = 10.0,
        connections_limit: int = 100,
        verify: bool | str = True,
        cert: Any = None,
    ) -> None:
        self._timeout = timeout
        self._connections_limit = connections_limit
        super().__init__(host=host, port=port, token=token, scheme=scheme, verify=verify, cert=cert)
        self.session = SessionAPI(self)
        self.txn = TxnAPI(self)

    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None
    ) -> HTTPClient:
        return HTTPClient(
            host,
            port,
            scheme,
            verify=verify,
            cert=cert,
            timeout=self._timeout,
            connections_limit=self._connections_limit,
        )

    @property
    def base_uri(self) -> str:
        return str(self.http.base_uri)


# -- callbacks: a py-consul Response (code, headers, body) to a result ------------


def _raise_for(response: Any) -> None:
    """Raise ConsulException for an error status (the HTTP client adds the status)."""
    CB._status(response, allow_404=False)


def _found(response: Any) -> bool:
    if response.code == 404:
        return False
    _raise_for(response)
    return True


def _txn_body(response: Any) -> dict[str, Any]:
    if response.code != 409:
        _raise_for(response)
    try:
        body = json.loads(response.body)
    except ValueError as exc:
        raise ConsulException(f"txn: the answer is not JSON: {response.body[:200]!r}") from exc
    if not isinstance(body, dict):
        raise ConsulException(f"txn: unexpected answer {response.body[:200]!r}")
    return body
