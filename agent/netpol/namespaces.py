"""Namespace labels for `namespaceSelector`, from the namespace records in the store.

`nova/v1/namespaces/<ns>` is a JSON object; its optional `"labels"` map is what
a namespaceSelector matches (besides the two name labels every namespace has).
Operators set it in the Consul UI or with any KV client, e.g.
`{"segment_id": 4096, "labels": {"team": "edge"}}`; the segment id is Nova's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agent.netpol.engine import PolicyEngine
from nova.store import Store, StoreError, keys

log = logging.getLogger("nova.agent.netpol")

WATCH_WAIT = 60.0
RETRY_S = 2.0


def labels_of(value: Any) -> dict[str, str]:
    """The record's labels; a malformed record has none (it is logged)."""
    labels = value.get("labels", {}) if isinstance(value, dict) else {}
    if not isinstance(labels, dict):
        return {}
    return {str(k): str(v) for k, v in labels.items() if isinstance(v, str | int | float)}


async def follow_namespace_labels(store: Store, engine: PolicyEngine) -> None:
    """Keep the engine's namespace labels equal to the records', until cancelled."""
    index = 0
    known: dict[str, dict[str, str]] = {}
    while True:
        try:
            current, entries = await store.watch(keys.NAMESPACES, index, WATCH_WAIT)
        except StoreError as exc:
            log.warning("watch %s failed: %s", keys.NAMESPACES, exc)
            index = 0
            await asyncio.sleep(RETRY_S)
            continue
        if current == index:
            continue
        index = 0 if current < index else current
        seen: dict[str, dict[str, str]] = {}
        for entry in entries:
            namespace = keys.split(entry.key, keys.NAMESPACES)[0]
            try:
                seen[namespace] = labels_of(entry.json())
            except ValueError as exc:
                log.warning("namespace record %s is not JSON: %s", entry.key, exc)
        for namespace in known.keys() - seen.keys():
            engine.set_namespace_labels(namespace, {})
        for namespace, labels in seen.items():
            if known.get(namespace) != labels:
                engine.set_namespace_labels(namespace, labels)
        known = seen
