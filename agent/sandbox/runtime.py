"""The sandbox runtime: module cache + zygote + warm pool behind one API.

    runtime = SandboxRuntime(cache_dir="/var/lib/nova/cache", pool_size=8,
                             cgroups=SandboxCgroups.for_host("nova"))
    await runtime.start()
    module = await runtime.resolve("app.wasm")       # validate + compile once
    container = await runtime.launch(spec, stdio)    # claim a warm worker, label, run
    status = await container.wait()                  # usage read, cgroup removed

The agent and `nova run` both use it; benchmarks measure it. With cgroups,
a container's id is its worker's `sandbox_id` (it names the cgroup the
worker joined while idle), and `launch` writes the run's limits to that
cgroup, in a thread, before the spec reaches the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from dataclasses import dataclass, field

from agent.sandbox.cache import CachedModule, ModuleCache
from agent.sandbox.cgroups import SandboxCgroups, new_sandbox_id, run_limits
from agent.sandbox.pool import WarmPool
from agent.sandbox.process import WorkerHandle, Zygote, spawn_cold_worker
from agent.sandbox.spec import ExitStatus, Isolation, RunSpec
from nova import errors

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
    cgroups: SandboxCgroups | None = None  # set when the worker has a cgroup to settle
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
        status = await self._result()
        if self.cgroups is None:
            return status
        await self.worker.exited()  # usage is final once the worker is gone
        return await asyncio.to_thread(self.cgroups.settle, self.spec, status)

    async def _result(self) -> ExitStatus:
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
        cgroups: SandboxCgroups | None = None,
    ) -> None:
        self.cache = ModuleCache(cache_dir, memory_entries=memory_cache_entries)
        self.use_zygote = use_zygote
        self.cgroups = cgroups
        cgroup_root = cgroups.root_name if cgroups is not None else None
        self.zygote = Zygote(cgroup_root=cgroup_root) if use_zygote else None
        self.pool = WarmPool(self.zygote, pool_size, cgroups=cgroups) if self.zygote else None

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

    def resolve_isolation(self, asked: Isolation) -> Isolation:
        """`auto` -> `cgroup` when this runtime has cgroups, else `none`."""
        if asked is Isolation.NONE:
            return Isolation.NONE
        if self.cgroups is not None:
            return Isolation.CGROUP
        if asked is Isolation.CGROUP:
            raise errors.SandboxError("cgroup isolation needs root and a cgroup filesystem")
        return Isolation.NONE

    def sandbox_ids(self) -> set[str]:
        """Container ids whose cgroups belong to idle workers of this runtime."""
        return self.pool.sandbox_ids() if self.pool is not None else set()

    async def claim(self) -> WorkerHandle:
        """A worker for the next container: warm from the pool, or a new one.

        Its `sandbox_id` is the container's id. Hand it to `launch`, or to
        `release` if the start is abandoned.
        """
        if self.pool is not None:
            return await self.pool.claim()
        cgroup_root = self.cgroups.root_name if self.cgroups is not None else None
        return await spawn_cold_worker(new_sandbox_id(), cgroup_root=cgroup_root)

    async def release(self, worker: WorkerHandle) -> None:
        """End a claimed worker that will not run anything, and remove its cgroup."""
        worker.close_channel()
        worker.kill()
        if self.cgroups is not None:
            if worker.relabel is not None:
                await worker.relabel  # never write to a cgroup after it is gone
            await worker.exited()
            await asyncio.to_thread(self.cgroups.discard, worker.sandbox_id)

    async def launch(
        self,
        spec: RunSpec,
        stdio: tuple[int, int, int],
        *,
        request_ns: int | None = None,
        worker: WorkerHandle | None = None,
    ) -> Container:
        """Start `spec` in a worker whose stdin/stdout/stderr are `stdio`.

        The container's id becomes the worker's `sandbox_id` and `auto`
        isolation is resolved; `Container.spec` is the spec that ran. With
        cgroups, the run's limits are written before the worker gets the
        spec; a failure there ends the worker and raises SandboxError.
        The fds are duplicated into the worker; the caller keeps its own.
        """
        request_ns = request_ns or time.monotonic_ns()
        if worker is None:
            worker = await self.claim()
        isolation = self.resolve_isolation(spec.isolation)
        if spec.id != worker.sandbox_id or spec.isolation is not isolation:
            spec = dataclasses.replace(spec, id=worker.sandbox_id, isolation=isolation)
        cgroups = None
        if self.cgroups is not None and (isolation is Isolation.CGROUP or worker.in_cgroup):
            cgroups = self.cgroups
            limits = run_limits(spec)
            try:
                if worker.relabel is not None:
                    await worker.relabel  # the pool was still writing its standby limits
                if limits != worker.cgroup_limits:  # unchanged: nothing to write
                    await asyncio.to_thread(cgroups.label, spec, worker.cgroup_limits)
            except OSError as exc:
                await self.release(worker)
                raise errors.SandboxError(f"cannot set up the container's cgroup: {exc}") from None
        try:
            worker.run(spec, stdio)
        except errors.SandboxError:
            await self.release(worker)
            raise
        if cgroups is not None and self.pool is not None:
            self.pool.expect_limits(limits)  # the next start with these limits writes nothing
        return Container(
            spec=spec,
            worker=worker,
            request_ns=request_ns,
            launched_ns=time.monotonic_ns(),
            pooled=worker.pooled,
            cgroups=cgroups,
        )
