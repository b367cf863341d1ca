"""The sandbox runtime: module cache + zygote + warm pool behind one API.

    runtime = SandboxRuntime(cache_dir="/var/lib/nova/cache", pool_size=8)
    await runtime.start()
    module = await runtime.resolve("app.wasm")       # validate + compile once
    container = await runtime.launch(spec, stdio)    # claim a warm worker, run
    status = await container.wait()

The agent and `nova run` both use it; benchmarks measure it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field

from agent.sandbox.cache import CachedModule, ModuleCache
from agent.sandbox.pool import WarmPool
from agent.sandbox.process import WorkerHandle, Zygote, spawn_cold_worker
from agent.sandbox.spec import ExitStatus, RunSpec

log = logging.getLogger("nova.agent.sandbox")

HARD_TIMEOUT_GRACE_S = 2.0  # beyond the worker's own watchdog: SIGKILL from outside
STOP_GRACE_S = 2.0


@dataclass(slots=True)
class Container:
    """A launched container: its worker, and how to wait for or stop it."""

    spec: RunSpec
    worker: WorkerHandle
    request_ns: int  # CLOCK_MONOTONIC when the start was requested
    launched_ns: int  # when the run message was handed to the worker
    pooled: bool  # True when the worker came warm from the pool
    _status: asyncio.Task[ExitStatus] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.worker.pid

    def signal(self, sig: int) -> bool:
        return self.worker.signal(sig)

    async def wait(self) -> ExitStatus:
        if self._status is None:
            self._status = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._status)

    async def wait_started(self) -> int:
        """CLOCK_MONOTONIC ns at which the guest's _start was entered."""
        if self._status is None:
            self._status = asyncio.ensure_future(self._wait())
        await self.worker.started.wait()
        return self.worker.entry_ns

    async def _wait(self) -> ExitStatus:
        timeout = self.spec.timeout_s
        result = asyncio.ensure_future(self.worker.result())
        if timeout is None or self.spec.http_port is not None:
            return await result  # an HTTP container's timeout is per request
        done, _ = await asyncio.wait({result}, timeout=timeout + HARD_TIMEOUT_GRACE_S)
        if not done:
            # The worker's own watchdog did not end it; end it from outside.
            self.worker.timed_out = True
            self.worker.kill()
        return await result

    async def stop(self, grace_s: float = STOP_GRACE_S) -> ExitStatus:
        """SIGTERM, then SIGKILL after `grace_s`; returns once the worker is gone."""
        self.worker.stop_requested = True
        self.worker.signal(signal.SIGTERM)
        try:
            status = await asyncio.wait_for(self.wait(), grace_s)
        except TimeoutError:
            self.worker.kill()
            status = await self.wait()
        await self.worker.exited()
        return status


class SandboxRuntime:
    def __init__(
        self,
        cache_dir: str,
        *,
        pool_size: int = 4,
        memory_cache_entries: int = 64,
        use_zygote: bool = True,
    ) -> None:
        self.cache = ModuleCache(cache_dir, memory_entries=memory_cache_entries)
        self.use_zygote = use_zygote
        self.zygote = Zygote() if use_zygote else None
        self.pool = WarmPool(self.zygote, pool_size) if self.zygote else None

    async def start(self, *, fill: bool = True) -> None:
        if self.zygote is not None and self.pool is not None:
            await self.zygote.start()
            if fill:
                await self.pool.fill()
            self.pool.start()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.zygote is not None:
            await self.zygote.close()

    async def resolve(self, path: str) -> CachedModule:
        """Validate and compile (once) the module at `path`; make it hot in the pool."""
        module = self.cache.lookup(path)
        if module is None:
            module = await asyncio.to_thread(self.cache.resolve, path)
        await self.make_hot(module)
        return module

    async def make_hot(self, module: CachedModule) -> None:
        """Have the pool load `module` (and keep it on standby) for the next starts."""
        if self.pool is not None:
            with contextlib.suppress(Exception):  # hotness is an optimisation only
                await self.pool.preload(
                    module.digest, str(module.artifact), standby=not module.has_start_section
                )

    async def launch(
        self, spec: RunSpec, stdio: tuple[int, int, int], *, request_ns: int | None = None
    ) -> Container:
        """Start `spec` in a worker whose stdin/stdout/stderr are `stdio`.

        The fds are duplicated into the worker; the caller keeps its own.
        """
        request_ns = request_ns or time.monotonic_ns()
        if self.pool is not None:
            pooled = self.pool.idle > 0
            worker = await self.pool.claim()
        else:
            pooled = False
            worker = await spawn_cold_worker()
        worker.run(spec, stdio)
        return Container(
            spec=spec,
            worker=worker,
            request_ns=request_ns,
            launched_ns=time.monotonic_ns(),
            pooled=pooled,
        )
