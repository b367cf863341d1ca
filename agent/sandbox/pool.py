"""The warm pool: idle, pre-forked workers waiting to be claimed.

Claiming takes a ready worker without waiting (a pool hit). When the pool is
empty the caller forks one on the spot (a miss). A background task refills
the pool to its target size; workers are never reused: one container each.

With cgroups, each worker is forked for a container id chosen ahead
(`sandbox_id`): the pool makes that container's cgroup first and the worker
joins it right after the fork, so claiming one never moves a process.
Idle workers' cgroups carry the limits of the latest run (`expect_limits`),
so a start with the same limits writes nothing. A worker that dies idle, or
is closed with the pool, takes its cgroup along.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass

from agent.isolation.cgroups import Limits
from agent.sandbox.cgroups import IDLE_LIMITS, SandboxCgroups, new_sandbox_id
from agent.sandbox.network import SandboxNetwork
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
    """Idle workers of one Nova namespace (`namespace`), or of none (host network).

    With `network`, each worker is born into its own netns on `namespace`'s
    segment (attached before the fork, detached when the sandbox goes), so a
    pool's sandboxes never serve another tenant.
    """

    def __init__(
        self,
        zygote: Zygote,
        size: int,
        *,
        cgroups: SandboxCgroups | None = None,
        network: SandboxNetwork | None = None,
        namespace: str | None = None,
    ) -> None:
        if size < 0:
            raise ValueError("pool size must be >= 0")
        if (network is None) != (namespace is None):
            raise ValueError("a pool has a network and a namespace, or neither")
        self.zygote = zygote
        self.size = size
        self.cgroups = cgroups
        self.network = network
        self.namespace = namespace
        self.last_claim = time.monotonic()
        self._discarding: set[asyncio.Task[None]] = set()
        self._limits = IDLE_LIMITS  # what idle workers' cgroups carry: the latest run's
        self.stats = PoolStats()
        self._idle: collections.deque[WorkerHandle] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._latest: str | None = None  # the module workers keep on standby
        self._refill_after = 0.0

    @property
    def idle(self) -> int:
        return len(self._idle)

    def sandbox_ids(self) -> set[str]:
        """The container ids (and cgroups) the idle workers hold."""
        return {worker.sandbox_id for worker in self._idle}

    def start(self) -> None:
        self._task = asyncio.create_task(self._refill_loop(), name="nova-pool-refill")

    async def fill(self) -> None:
        """Wait until the pool holds its target size (start-up, benchmarks)."""
        while len(self._idle) < self.size:
            self._idle.append(await self._spawn())

    async def claim(self) -> WorkerHandle:
        self.last_claim = time.monotonic()
        while self._idle:
            worker = self._idle.popleft()
            self._refill_after = time.monotonic() + (REFILL_DELAY_S if self._idle else 0.0)
            self._wakeup.set()
            if worker.signal(0):  # still alive (pidfd: no pid-reuse race)
                self.stats.hits += 1
                worker.pooled = True
                return worker
            worker.close_channel()
            self.discard_later(worker)
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
        idle = list(self._idle)
        self._idle.clear()
        for worker in idle:
            worker.close_channel()  # EOF ends an idle worker
            worker.kill()
        relabels = [worker.relabel for worker in idle if worker.relabel is not None]
        await asyncio.gather(*relabels, return_exceptions=True)  # before their cgroups go
        await asyncio.gather(*(worker.exited() for worker in idle), return_exceptions=True)
        if self.cgroups is not None or self.network is not None:
            await asyncio.gather(*(self._discard(worker.sandbox_id) for worker in idle))
        if self._discarding:
            await asyncio.gather(*self._discarding, return_exceptions=True)

    def expect_limits(self, limits: Limits) -> None:
        """Label idle workers' cgroups (and new ones) with `limits`, in the background.

        `WorkerHandle.cgroup_limits` always says what a cgroup has; a claim
        awaits a relabel still in flight (`WorkerHandle.relabel`) first.
        """
        if self.cgroups is None or limits == self._limits:
            return
        self._limits = limits
        for worker in self._idle:
            self._relabel(worker, limits)

    def _relabel(self, worker: WorkerHandle, limits: Limits) -> asyncio.Future[None]:
        cgroups, previous = self.cgroups, worker.relabel
        assert cgroups is not None

        async def relabel() -> None:
            if previous is not None:
                await previous
            worker.cgroup_limits = None  # unknown until the write is done
            try:
                await asyncio.to_thread(cgroups.relabel, worker.sandbox_id, limits)
            except OSError as exc:
                log.warning("cannot relabel idle worker %d's cgroup: %s", worker.pid, exc)
            else:
                worker.cgroup_limits = limits

        worker.relabel = task = asyncio.ensure_future(relabel())
        return task

    def discard_later(self, worker: WorkerHandle) -> None:
        """Remove a dead or unused worker's cgroup and network in the background."""
        if self.cgroups is not None or self.network is not None:
            task = asyncio.ensure_future(self._discard(worker.sandbox_id))
            self._discarding.add(task)
            task.add_done_callback(self._discarding.discard)

    async def _discard(self, sandbox_id: str) -> None:
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.discard, sandbox_id)
        if self.network is not None:
            try:
                await self.network.detach(sandbox_id)
            except Exception as exc:  # recovery at the next start removes what is left
                log.warning("cannot remove sandbox %s's network: %s", sandbox_id, exc)

    async def _spawn(self) -> WorkerHandle:
        sandbox_id = new_sandbox_id()
        netns_fd = None
        try:
            if self.network is not None:
                assert self.namespace is not None
                await self.network.attach(sandbox_id, self.namespace)
                netns_fd = self.network.open_netns(sandbox_id)
            if self.cgroups is not None:
                await asyncio.to_thread(self.cgroups.prepare_idle, sandbox_id)
            worker = await self.zygote.spawn(
                sandbox_id, join=self.cgroups is not None, netns_fd=netns_fd
            )
        except BaseException:
            await self._discard(sandbox_id)
            raise
        finally:
            if netns_fd is not None:
                os.close(netns_fd)
        worker.network = self.network.attachment(sandbox_id) if self.network else None
        if self.cgroups is not None:
            worker.cgroup_limits = IDLE_LIMITS
            if self._limits != IDLE_LIMITS:  # after its warm-up: no CPU quota slows that
                await self._relabel(worker, self._limits)
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
