"""Follow a key prefix: call back with its entries on every change, forever.

The loop every watcher of the store needs, written once: blocking queries,
the index reset when it goes backwards (a restored or rebuilt store), and
exponential backoff while the store does not answer (the last state stays
with the caller; `on_error` is told, e.g. to report the store's health).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nova.store.base import KVEntry, Store, StoreError

log = logging.getLogger("nova.store")

WATCH_WAIT = 60.0
FIRST_RETRY_S = 0.2
MAX_RETRY_S = 5.0


async def follow_prefix(
    store: Store,
    prefix: str,
    on_change: Callable[[list[KVEntry]], Awaitable[None] | None],
    *,
    on_error: Callable[[StoreError], None] | None = None,
    wait: float = WATCH_WAIT,
) -> None:
    """Call `on_change(entries)` once now and after every change under `prefix`."""
    index = 0
    delay = FIRST_RETRY_S
    while True:
        try:
            current, entries = await store.watch(prefix, index, wait)
        except StoreError as exc:
            if on_error is not None:
                on_error(exc)
            else:
                log.warning("watch %s failed (retrying in %.1f s): %s", prefix, delay, exc)
            index = 0  # resync: the store may have been rebuilt meanwhile
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S)
            continue
        delay = FIRST_RETRY_S
        if current == index:
            continue  # the wait ended with nothing new
        index = 0 if current < index else current
        result = on_change(entries)
        if result is not None:
            await result
