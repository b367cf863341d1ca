"""The warm pool: idle, pre-forked workers waiting to be claimed.

Claiming takes a ready worker without waiting (a pool hit). When the pool is
empty the caller forks one on the spot (a miss). A background task refills
the pool to its target size; workers are never reused: one container each.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass

from agent.sandbox.process import WorkerHandle, Zygote

log = logging.getLogger("nova.agent.sandbox.pool")

REFILL_BACKOFF_S = (0.1, 0.5, 1.0, 5.0)
# Forking a replacement competes for the CPUs with the start that claimed the
# worker (two cores here): refill a moment later unless the pool ran dry.
REFILL_DELAY_S = 0.005


@dataclass(slots=True)
class PoolStats:
    hits: int = 0
    misses: int = 0
    spawned: int = 0
    spawn_failures: int = 0


class WarmPool:
    def __init__(self, zygote: Zygote, size: int) -> None:
        if size < 0:
            raise ValueError("pool size must be >= 0")
        self.zygote = zygote
        self.size = size
        self.stats = PoolStats()
        self._idle: collections.deque[WorkerHandle] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._latest: str | None = None  # the module workers keep on standby
        self._refill_after = 0.0

    @property
    def idle(self) -> int:
        return len(self._idle)

    def start(self) -> None:
        self._task = asyncio.create_task(self._refill_loop(), name="nova-pool-refill")

    async def fill(self) -> None:
        """Wait until the pool holds its target size (start-up, benchmarks)."""
        while len(self._idle) < self.size:
            self._idle.append(await self._spawn())

    async def claim(self) -> WorkerHandle:
        while self._idle:
            worker = self._idle.popleft()
            self._refill_after = time.monotonic() + (REFILL_DELAY_S if self._idle else 0.0)
            self._wakeup.set()
            if worker.signal(0):  # still alive (pidfd: no pid-reuse race)
                self.stats.hits += 1
                return worker
            worker.close_channel()
        self.stats.misses += 1
        self._wakeup.set()
        return await self._spawn()

    async def preload(self, digest: str, artifact: str, *, standby: bool) -> None:
        """Make a module hot: the zygote loads it for future workers, idle ones now.

        With `standby`, workers also instantiate it ahead of their run, so the
        most recently started module starts fastest.
        """
        if self._latest == digest:
            return
        await self.zygote.preload(digest, artifact, standby=standby)
        self._latest = digest
        for worker in self._idle:
            worker.preload(digest, artifact, standby=standby)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._idle:
            worker = self._idle.popleft()
            worker.close_channel()  # EOF ends an idle worker
            worker.kill()

    async def _spawn(self) -> WorkerHandle:
        worker = await self.zygote.spawn()
        self.stats.spawned += 1
        return worker

    async def _refill_loop(self) -> None:
        failures = 0
        while True:
            if len(self._idle) >= self.size:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = self._refill_after - time.monotonic()
            if delay > 0 and self._idle:
                await asyncio.sleep(delay)
                continue
            try:
                self._idle.append(await self._spawn())
                failures = 0
            except Exception as exc:  # the loop must survive; log, count, back off
                self.stats.spawn_failures += 1
                delay = REFILL_BACKOFF_S[min(failures, len(REFILL_BACKOFF_S) - 1)]
                failures += 1
                log.warning("warm pool: spawning a worker failed (%s); retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)
