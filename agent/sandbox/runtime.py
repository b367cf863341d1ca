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
from agent.sandbox.network import SandboxNetwork, detach_quietly, publish_port
from agent.sandbox.pool import WarmPool
from agent.sandbox.process import WorkerHandle, Zygote, spawn_cold_worker
from agent.sandbox.spec import DEFAULT_NAMESPACE, ExitStatus, Isolation, RunSpec
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
    network: SandboxNetwork | None = None  # set when the worker has a netns to remove
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
        if self.cgroups is None and self.network is None:
            return status
        await self.worker.exited()  # usage is final once the worker is gone
        if self.cgroups is not None:
            status = await asyncio.to_thread(self.cgroups.settle, self.spec, status)
        if self.network is not None:
            await detach_quietly(self.network, self.spec.id)
        return status

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
            async with asyncio.timeout(grace_s):
                status = await self.wait()
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
        network: SandboxNetwork | None = None,
        namespace_pool_size: int = 2,
        namespace_pool_idle_s: float = 300.0,
    ) -> None:
        if network is not None and not use_zygote:
            raise ValueError("per-container networks need the zygote (workers join at fork)")
        self.cache = ModuleCache(cache_dir, memory_entries=memory_cache_entries)
        self.use_zygote = use_zygote
        self.cgroups = cgroups
        self.network = network
        self.pool_size = pool_size
        self.namespace_pool_size = namespace_pool_size
        self.namespace_pool_idle_s = namespace_pool_idle_s
        self._reaper: asyncio.Task[None] | None = None
        cgroup_root = cgroups.root_name if cgroups is not None else None
        self.zygote = Zygote(cgroup_root=cgroup_root) if use_zygote else None
        # Pools by Nova namespace (with a network), or the one host-network pool (None).
        self.pools: dict[str | None, WarmPool] = {}
        self.pool = self._make_pool(DEFAULT_NAMESPACE if network else None) if self.zygote else None
        self._hot: CachedModule | None = None  # what new pools should keep on standby
        self._started = False

    async def start(self, *, fill: bool = True) -> None:
        if self.zygote is not None and self.pool is not None:
            await self.zygote.start()
            if fill:
                try:
                    await self.pool.fill()
                except errors.NovaError as exc:  # e.g. the store is down: the refill retries
                    log.error("warm pool: cannot fill it now (%s); retrying in the background", exc)
            self.pool.start()
            self._started = True
            if self.network is not None:
                self._reaper = asyncio.create_task(self._reap_idle_pools(), name="nova-pool-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        if self.zygote is not None:
            await self.zygote.close()

    def _make_pool(self, namespace: str | None) -> WarmPool:
        assert self.zygote is not None
        if self.network is None:
            size = self.pool_size
        elif namespace is None:  # --isolation none beside isolated containers: rare, unpooled
            size = 0
        else:
            size = self.pool_size if namespace == DEFAULT_NAMESPACE else self.namespace_pool_size
        pool = WarmPool(
            self.zygote,
            size,
            cgroups=self.cgroups,
            network=self.network if namespace is not None else None,
            namespace=namespace,
        )
        self.pools[namespace] = pool
        return pool

    async def _pool_for(self, namespace: str, isolation: Isolation) -> WarmPool | None:
        """The pool a container of `namespace` with `isolation` takes its worker from."""
        if self.pool is None:
            return None
        if self.network is None:
            return self.pool
        key = None if self.resolve_isolation(isolation) is Isolation.NONE else namespace
        pool = self.pools.get(key)
        if pool is None:
            pool = self._make_pool(key)
            if self._hot is not None:
                await self.make_hot(self._hot)
            if self._started:
                pool.start()  # refills in the background; this claim is a miss
        return pool

    async def drop_idle_pools(self, idle_s: float) -> list[str]:
        """Close the pools of namespaces (not 'default') that started nothing for `idle_s`;
        their sandboxes go, and their segments once no container of theirs runs here."""
        now = time.monotonic()
        dropped = [
            ns
            for ns, pool in self.pools.items()
            if ns not in (None, DEFAULT_NAMESPACE) and now - pool.last_claim >= idle_s
        ]
        for ns in dropped:
            pool = self.pools.pop(ns)
            await pool.close()
            log.info("namespace %s: no start for %.0fs, its warm pool is gone", ns, idle_s)
        if dropped and self.network is not None:
            await self.network.prune()
        return [ns for ns in dropped if ns is not None]

    async def _reap_idle_pools(self) -> None:
        period = max(1.0, min(60.0, self.namespace_pool_idle_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await self.drop_idle_pools(self.namespace_pool_idle_s)
            except Exception as exc:  # the loop must survive; the next round retries
                log.warning("cannot drop idle namespace pools: %s", exc)

    async def resolve(self, path: str) -> CachedModule:
        """Validate and compile (once) the module at `path`; make it hot in the pool."""
        module = self.cache.lookup(path)
        if module is None:
            module = await asyncio.to_thread(self.cache.resolve, path)
        await self.make_hot(module)
        return module

    async def make_hot(self, module: CachedModule) -> None:
        """Have the pools load `module` (and keep it on standby) for the next starts."""
        self._hot = module
        for pool in list(self.pools.values()):
            with contextlib.suppress(Exception):  # hotness is an optimisation only
                await pool.preload(
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
        """Container ids whose cgroups (and netns) belong to idle workers of this runtime."""
        return set().union(*(pool.sandbox_ids() for pool in self.pools.values()))

    async def claim(
        self, namespace: str = DEFAULT_NAMESPACE, isolation: Isolation = Isolation.AUTO
    ) -> WorkerHandle:
        """A worker for the next container: warm from its namespace's pool, or a new one.

        Its `sandbox_id` is the container's id; with a network it already sits
        in its own netns on `namespace`'s segment. Hand it to `launch`, or to
        `release` if the start is abandoned.
        """
        pool = await self._pool_for(namespace, isolation)
        if pool is not None:
            return await pool.claim()
        cgroup_root = self.cgroups.root_name if self.cgroups is not None else None
        return await spawn_cold_worker(new_sandbox_id(), cgroup_root=cgroup_root)

    async def release(self, worker: WorkerHandle) -> None:
        """End a claimed worker that will not run anything; remove its cgroup and netns."""
        worker.close_channel()
        worker.kill()
        if self.cgroups is not None or worker.network is not None:
            if worker.relabel is not None:
                await worker.relabel  # never write to a cgroup after it is gone
            await worker.exited()
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.discard, worker.sandbox_id)
        if worker.network is not None and self.network is not None:
            await detach_quietly(self.network, worker.sandbox_id)

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
            worker = await self.claim(spec.namespace, spec.isolation)
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
        if worker.network is not None and spec.namespace != worker.network.namespace:
            await self.release(worker)  # never across tenants; claim() makes this impossible
            raise errors.SandboxError(
                f"sandbox {worker.sandbox_id} belongs to namespace {worker.network.namespace}, "
                f"not {spec.namespace}"
            )
        fds = list(stdio)
        listener = None
        if worker.network is not None and spec.http_port is not None:
            try:  # published in the host's netns; the worker serves it from its own
                listener = publish_port(spec.http_host, spec.http_port)
            except OSError as exc:
                await self.release(worker)
                raise errors.SandboxError(
                    f"cannot listen on {spec.http_host}:{spec.http_port}: {exc.strerror or exc}"
                ) from None
            fds.append(listener.fileno())
        try:
            worker.run(spec, (fds[0], fds[1], fds[2]), extra_fds=fds[3:])
        except errors.SandboxError:
            await self.release(worker)
            raise
        finally:
            if listener is not None:
                listener.close()  # the worker has its own copy
        # The pool this worker came from (its namespace's, or the host-network one)
        # labels its idle workers alike: the next start with these limits writes nothing.
        pool = self.pools.get(worker.network.namespace if worker.network is not None else None)
        if cgroups is not None and pool is not None:
            pool.expect_limits(limits)
        return Container(
            spec=spec,
            worker=worker,
            request_ns=request_ns,
            launched_ns=time.monotonic_ns(),
            pooled=worker.pooled,
            cgroups=cgroups,
            network=self.network if worker.network is not None else None,
        )
