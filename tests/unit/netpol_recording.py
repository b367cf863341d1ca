"""An in-memory PolicyBackend that records what reaches it (pure-logic tests only).

The real backends (eBPF, nftables) are tested with real packets in
tests/linux; this one lets the engine's logic be tested without root.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from agent.netpol.backend import PolicyBackend, PolicyBackendError
from agent.netpol.tables import CompiledPolicy


class RecordingBackend(PolicyBackend):
    name = "recording"

    def __init__(self) -> None:
        self.started = False
        self.closed_with: bool | None = None
        self.applied: list[tuple[float, CompiledPolicy]] = []  # (monotonic time, compiled)
        self.fail_next = 0  # the next N applies raise, as a refusing kernel would
        self.counts: dict[str, tuple[int, int]] = {}
        self.applied_event = asyncio.Event()

    @property
    def current(self) -> CompiledPolicy:
        assert self.applied, "nothing applied yet"
        return self.applied[-1][1]

    async def start(self) -> None:
        self.started = True

    async def apply(self, compiled: CompiledPolicy) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise PolicyBackendError("recording", "apply", "memory", "refused for the test")
        self.applied.append((time.monotonic(), compiled))
        self.applied_event.set()

    async def counters(self) -> Mapping[str, tuple[int, int]]:
        return dict(self.counts)

    async def close(self, *, remove: bool) -> None:
        self.closed_with = remove
