"""A Nova namespace's segment id (its VNI), kept in its namespace record.

`nova/v1/namespaces/<ns>` holds `{"segment_id": N, ...}`. Every host reads
the same record, which is what makes the per-host bridges one segment. A
namespace seen for the first time gets the lowest id of `ids` that no other
namespace record holds, written with compare-and-set (create-only), so two
agents or coordinators racing for a new namespace agree on one id and two
namespaces never share one. An existing id is never changed.

Ids are never reused while a record holds them: deleting a namespace's
record is the operator's (or the coordinator's) decision, after every node
has removed its bridge (docs/networking.md, "Segment ids").
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from agent.isolation.segments import MAX_VNI
from nova.errors import NovaError
from nova.store import Store, keys

DEFAULT_FIRST = 4096  # 2..4094 are left to VLAN mode, where the fabric decides
CAS_ATTEMPTS = 32


class SegmentIdError(NovaError):
    """No segment id could be given to a namespace."""


@dataclass(frozen=True, slots=True)
class SegmentIdRange:
    first: int = DEFAULT_FIRST
    last: int = MAX_VNI

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.last <= MAX_VNI:
            raise ValueError(
                f"segment id range {self.first}-{self.last} must lie within 1-{MAX_VNI}"
            )

    @classmethod
    def parse(cls, text: str) -> SegmentIdRange:
        """'4096-16777215' -> the range; ValueError says what is wrong."""
        first, sep, last = text.partition("-")
        try:
            return cls(int(first), int(last) if sep else MAX_VNI)
        except ValueError as exc:
            if "must lie" in str(exc):
                raise
            raise ValueError(
                f"segment id range {text!r} is not FIRST-LAST, e.g. 4096-8191"
            ) from None

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def _segment_id(value: Any) -> int | None:
    if isinstance(value, dict) and isinstance(value.get("segment_id"), int):
        return int(value["segment_id"])
    return None


async def namespace_segment_id(store: Store, namespace: str, ids: SegmentIdRange) -> int:
    """The namespace's segment id, allocating one (lowest free in `ids`) if it has none."""
    key = keys.namespace(namespace)
    for attempt in range(CAS_ATTEMPTS):
        entry = await store.get(key)
        record: dict[str, Any] = {}
        if entry is not None:
            value = entry.json()
            found = _segment_id(value)
            if found is not None:
                return found
            if isinstance(value, dict):
                record = dict(value)
        used = set()
        for other in await store.list(keys.NAMESPACES):
            try:
                other_id = _segment_id(other.json())
            except ValueError:
                continue
            if other_id is not None:
                used.add(other_id)
        free = next((i for i in range(ids.first, ids.last + 1) if i not in used), None)
        if free is None:
            raise SegmentIdError(
                f"no free segment id in {ids} for namespace {namespace!r}: "
                f"{len(used)} namespaces hold ids; widen --segment-ids"
            )
        record["segment_id"] = free
        index = entry.modify_index if entry is not None else 0
        if await store.put_json(key, record, cas=index):
            return free
        await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))  # raced: re-read
    raise SegmentIdError(f"namespace {namespace!r}: its record kept changing; retry later")
