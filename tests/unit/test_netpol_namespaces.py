"""Namespace labels follow the namespace records (real SQLite store, real watches)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from agent.netpol.engine import PolicyEngine
from agent.netpol.namespaces import follow_namespace_labels, labels_of
from nova.store import SqliteStore, keys


class Recorder:
    """Stands in for the engine: only the one call this path makes."""

    def __init__(self) -> None:
        self.labels: dict[str, dict[str, str]] = {}
        self.changed = asyncio.Event()

    def set_namespace_labels(self, namespace: str, labels: Mapping[str, str]) -> None:
        self.labels[namespace] = dict(labels)
        self.changed.set()


async def _until(recorder: Recorder, want: dict[str, dict[str, str]]) -> None:
    async with asyncio.timeout(5):
        while recorder.labels != want:
            recorder.changed.clear()
            await recorder.changed.wait()


def test_labels_of_tolerates_records_without_labels() -> None:
    assert labels_of({"segment_id": 4096}) == {}
    assert labels_of({"labels": {"team": "edge"}}) == {"team": "edge"}
    assert labels_of({"labels": ["not", "a", "map"]}) == {}
    assert labels_of("not an object") == {}


def test_records_changing_reach_the_engine(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteStore(str(tmp_path / "state.db"))
        await store.open()
        recorder = Recorder()
        engine = cast(PolicyEngine, recorder)
        task = asyncio.create_task(follow_namespace_labels(store, engine))
        try:
            value: Any = {"segment_id": 4096, "labels": {"team": "edge"}}
            await store.put_json(keys.namespace("shop"), value)
            await _until(recorder, {"shop": {"team": "edge"}})
            await store.put_json(keys.namespace("shop"), {"segment_id": 4096})
            await _until(recorder, {"shop": {}})
            await store.put_json(keys.namespace("ops"), {"labels": {"tier": "infra"}})
            await _until(recorder, {"shop": {}, "ops": {"tier": "infra"}})
            await store.delete(keys.namespace("ops"))
            await _until(recorder, {"shop": {}, "ops": {}})
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await store.close()

    asyncio.run(scenario())
