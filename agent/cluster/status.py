"""Observed status per replica, `nova/v1/status/<node>/<replica-id>`, written when it can be.

The reconciler states what each replica's status is now (`set`, `drop`);
one task writes the differences. While the store does not answer, only the
latest status of each replica waits (no queue grows); when it answers again
the status catches up. `resync()` (a new session, a restored store) rewrites
everything and deletes status keys of replicas this node no longer has.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from agent.cluster.health import Backoff, StoreHealth
from nova.store import Store, StoreError, encode_json, keys

log = logging.getLogger("nova.agent.cluster.status")


class StatusReporter:
    def __init__(self, store: Store, node: str, health: StoreHealth) -> None:
        self.store = store
        self.node = node
        self.health = health
        self._wanted: dict[str, bytes] = {}
        self._written: dict[str, bytes | None] = {}  # None: known to be absent
        self._full_sync = True
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()

    def set(self, replica_id: str, status: dict[str, Any]) -> None:
        self._wanted[replica_id] = encode_json(status)
        self._kick()

    def drop(self, replica_id: str) -> None:
        self._wanted.pop(replica_id, None)
        self._kick()

    def get(self, replica_id: str) -> dict[str, Any] | None:
        raw = self._wanted.get(replica_id)
        return None if raw is None else dict(json.loads(raw))

    def resync(self) -> None:
        self._full_sync = True
        self._kick()

    async def synced(self) -> None:
        """Until everything wanted is written (for tests and shutdown)."""
        await self._synced.wait()

    def _kick(self) -> None:
        self._synced.clear()
        self._changed.set()

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._flush()
            except StoreError as exc:
                self.health.failed("write status", exc)
                self._changed.set()  # retry, after a pause
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.health.ok()
            if not self._changed.is_set():
                self._synced.set()

    async def _flush(self) -> None:
        if self._full_sync:
            prefix = keys.status_of(self.node)
            stored = await self.store.list(prefix)
            self._written = {
                e.key.removeprefix(prefix): e.value
                for e in stored
                if "/" not in e.key.removeprefix(prefix)  # not a key this agent writes
            }
            self._full_sync = False
        for replica_id, value in list(self._wanted.items()):
            if self._written.get(replica_id) != value:
                await self.store.put(keys.status(self.node, replica_id), value)
                self._written[replica_id] = value
        for replica_id in [r for r, v in self._written.items() if v and r not in self._wanted]:
            await self.store.delete(keys.status(self.node, replica_id))
            self._written[replica_id] = None
