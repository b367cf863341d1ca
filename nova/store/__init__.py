"""Nova's state store: one async KV interface (Consul semantics), several backends.

`open_store()` picks the backend from a location; the contracts are on `Store`.
"""

from __future__ import annotations

import os
import urllib.parse

from nova.store.base import (
    MAX_TXN_OPS,
    MAX_VALUE_SIZE,
    KVEntry,
    Store,
    StoreError,
    StoreUnavailable,
    TxnError,
    TxnOp,
    TxnResult,
    TxnVerb,
    encode_json,
)
from nova.store.sqlite import SqliteStore

__all__ = [
    "MAX_TXN_OPS",
    "MAX_VALUE_SIZE",
    "KVEntry",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TxnError",
    "TxnOp",
    "TxnResult",
    "TxnVerb",
    "encode_json",
    "open_store",
]

_CONSUL_SCHEMES = frozenset({"consul", "http", "https"})


def open_store(location: str | os.PathLike[str]) -> Store:
    """The store at `location`; nothing is opened until first use or `async with`.

    - a plain path, `sqlite:relative/path` or `sqlite:///absolute/path`
      (the URL's path is taken as is, as in `file:` URLs) → SqliteStore
    - `consul://host:port`, `http://…`, `https://…` → the Consul backend

    ValueError for anything else, saying what is accepted.
    """
    if isinstance(location, os.PathLike):
        return SqliteStore(location)
    if not location:
        raise ValueError("store location is empty: give a file path or a consul:// URL")
    if "://" not in location and not location.startswith("sqlite:"):
        return SqliteStore(location)
    url = urllib.parse.urlsplit(location)
    scheme = url.scheme.lower()
    if scheme in _CONSUL_SCHEMES:
        from nova.store.consul import ConsulStore  # imports aiohttp: only when asked for

        return ConsulStore(location)
    if scheme != "sqlite":
        raise ValueError(
            f"store location {location!r}: unknown scheme {url.scheme!r}; use a file path, "
            "sqlite:///absolute/path.db or consul://host:port"
        )
    if url.netloc or not url.path or url.query or url.fragment:
        raise ValueError(
            f"store location {location!r}: a sqlite URL is sqlite:///absolute/path.db "
            "or sqlite:relative/path.db (no host, query or fragment)"
        )
    return SqliteStore(urllib.parse.unquote(url.path))
