"""Namespace labels for `namespaceSelector`, from the namespace records in the store.

`nova/v1/namespaces/<ns>` is a JSON object; its optional `"labels"` map is what
a namespaceSelector matches (besides the two name labels every namespace has).
Operators set it in the Consul UI or with any KV client, e.g.
`{"segment_id": 4096, "labels": {"team": "edge"}}`; the segment id is Nova's.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.netpol.engine import PolicyEngine
from nova.store import KVEntry, Store, keys
from nova.store.follow import follow_prefix

log = logging.getLogger("nova.agent.netpol")


def labels_of(value: Any) -> dict[str, str]:
    """The record's labels; a malformed record has none (it is logged)."""
    labels = value.get("labels", {}) if isinstance(value, dict) else {}
    if not isinstance(labels, dict):
        return {}
    return {str(k): str(v) for k, v in labels.items() if isinstance(v, str | int | float)}


async def follow_namespace_labels(store: Store, engine: PolicyEngine) -> None:
    """Keep the engine's namespace labels equal to the records', until cancelled."""
    known: dict[str, dict[str, str]] = {}

    def changed(entries: list[KVEntry]) -> None:
        nonlocal known
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

    await follow_prefix(store, keys.NAMESPACES, changed)
