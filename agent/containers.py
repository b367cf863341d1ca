"""The agent's container manager: create, supervise, stop, recover.

Every container has a record in the store and a run directory:

    <state>/containers/<id>/stdout.log, stderr.log   the container's output
    <state>/containers/<id>/result.json              written by the worker at exit

Agent restarts never kill containers: workers live in their own sessions and
report through result.json when the agent is away. On start the agent
re-adopts every recorded container whose process still runs (same pid, same
start time) and settles the rest from their result files.

With cgroups, a container's cgroup lives exactly as long as its worker: the
runtime labels it at the start, and whoever watches the worker's end (the
runtime's Container, or AdoptedProcess after a restart) reads its usage and
removes it. On start, cgroups under Nova's root that no live record claims
are orphans of a crash and are destroyed (`recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from agent.metrics import AgentMetrics
from agent.records import EXITED, RUNNING, ContainerRecord, pid_start_ticks
from agent.sandbox.cgroups import SandboxCgroups
from agent.sandbox.network import SandboxNetwork, detach_quietly
from agent.sandbox.process import pidfd_signal, read_result
from agent.sandbox.runtime import STOP_GRACE_S, SandboxRuntime
from agent.sandbox.spec import ExitReason, ExitStatus, RunSpec
from nova import errors
from nova.store import Store, keys

log = logging.getLogger("nova.agent.containers")

LOG_POLL_S = 0.05
STREAMS = ("stdout", "stderr")


class NotFound(errors.NovaError):
    exit_code = errors.EXIT_NOVA


class Conflict(errors.NovaError):
    exit_code = errors.EXIT_NOVA


class Supervised(Protocol):
    """What the manager needs of a running container, launched or adopted."""

    def signal(self, sig: int) -> bool: ...
    async def wait(self) -> ExitStatus: ...
    async def stop(self, grace_s: float = STOP_GRACE_S) -> ExitStatus: ...


class NetworkListener(Protocol):
    """Told when a container with its own netns starts and ends (network policy)."""

    async def container_starting(self, record: ContainerRecord) -> None:
        """Its sandbox (netns, veth, address) exists, its workload is not running yet;
        raising NovaError stops the start."""

    def container_up(self, record: ContainerRecord) -> None: ...
    def container_down(self, record: ContainerRecord) -> None: ...


class AdoptedProcess:
    """A container started by an earlier agent: watched through a pidfd.

    With `cgroups`, its cgroup is settled (usage read, removed) when it ends.
    """

    def __init__(
        self,
        record: ContainerRecord,
        run_dir: Path,
        cgroups: SandboxCgroups | None = None,
        network: SandboxNetwork | None = None,
    ) -> None:
        self.record = record
        self.run_dir = run_dir
        self.cgroups = cgroups
        self.network = network
        self.pidfd = os.pidfd_open(record.pid)
        self.stop_requested = False
        self._exited = asyncio.Event()
        self._status: asyncio.Future[ExitStatus] | None = None
        asyncio.get_running_loop().add_reader(self.pidfd, self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        self._exited.set()

    def signal(self, sig: int) -> bool:
        return pidfd_signal(self.pidfd, sig)

    async def wait(self) -> ExitStatus:
        if self._status is None:
            self._status = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._status)

    async def _wait(self) -> ExitStatus:
        await self._exited.wait()
        status = read_result(self.run_dir)
        if status is None and self.stop_requested:
            status = ExitStatus.for_reason(ExitReason.STOPPED, "stopped on request")
        elif status is None:
            status = ExitStatus.for_reason(ExitReason.KILLED, "the worker process died")
        if self.cgroups is not None:
            status = await asyncio.to_thread(self.cgroups.settle, self.record.spec, status)
        if self.network is not None:
            await detach_quietly(self.network, self.record.id)
        return status

    async def stop(self, grace_s: float = STOP_GRACE_S) -> ExitStatus:
        self.stop_requested = True
        self.signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                return await self.wait()
        except TimeoutError:
            self.signal(signal.SIGKILL)
            return await self.wait()


class ContainerManager:
    def __init__(
        self,
        *,
        node: str,
        store: Store,
        runtime: SandboxRuntime,
        containers_dir: Path,
        metrics: AgentMetrics,
    ) -> None:
        self.node = node
        self.store = store
        self.runtime = runtime
        self.cgroups = runtime.cgroups
        self.containers_dir = containers_dir
        self.metrics = metrics
        self._records: dict[str, ContainerRecord] = {}
        self._running: dict[str, Supervised] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._exited: dict[str, asyncio.Event] = {}
        self._starting: dict[str, int | None] = {}  # name -> http port, while create() runs
        self._network_listeners: list[NetworkListener] = []

    # -- queries ------------------------------------------------------------

    def list(self, *, include_exited: bool = False) -> list[ContainerRecord]:
        records = sorted(self._records.values(), key=lambda r: r.created_at)
        return [r for r in records if include_exited or r.state == RUNNING]

    def get(self, ref: str) -> ContainerRecord:
        """By name, id, or unique id prefix.

        A name may be reused once its container exited: the running one (or
        else the newest) is the one meant.
        """
        named = [r for r in self._records.values() if ref in (r.name, r.id)]
        if named:
            return max(named, key=lambda r: (r.state == RUNNING, r.created_at))
        matches = [r for r in self._records.values() if r.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise NotFound(f"no container named {ref!r} (see `nova ps -a`)")

    def run_dir(self, record: ContainerRecord) -> Path:
        return self.containers_dir / record.id

    # -- lifecycle ------------------------------------------------------------

    async def create(self, spec: RunSpec, *, request_ns: int | None = None) -> ContainerRecord:
        """Validate, launch and start supervising one container.

        `spec` comes from the API with `module_path` set and no digest yet.
        Raises NovaError subclasses with messages for users.
        """
        request_ns = request_ns or time.monotonic_ns()
        name = spec.name or _default_name(spec.module_path)
        self._claim_name(name, spec.http_port)
        self._starting[name] = spec.http_port  # held across the awaits below
        try:
            return await self._start(replace(spec, name=name), request_ns)
        finally:
            del self._starting[name]

    async def _start(self, spec: RunSpec, request_ns: int) -> ContainerRecord:
        name = spec.name
        try:
            module = await self.runtime.resolve(spec.module_path)
            # Its sandbox id is the container's id; with a network it is born in
            # its own netns on the namespace's segment.
            worker = await self.runtime.claim(spec.namespace, spec.isolation)
        except errors.NovaError as exc:
            self.metrics.start_failures.labels(type(exc).__name__).inc()
            raise
        container_id = worker.sandbox_id
        run_dir = self.containers_dir / container_id
        try:
            run_dir.mkdir(parents=True, mode=0o700)
            stdio = _open_stdio(run_dir)
        except OSError:
            await self.runtime.release(worker)
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        spec = replace(
            spec,
            id=container_id,
            name=name,
            digest=module.digest,
            artifact=str(module.artifact),
            run_dir=str(run_dir),
        )
        record = ContainerRecord(id=container_id, name=name, node=self.node, spec=spec)
        if worker.network is not None:
            record.network = worker.network.to_json()
        launched = False
        try:
            # Network policy that selects it is in force before its first packet.
            if record.network is not None:
                for listener in self._network_listeners:
                    await listener.container_starting(record)
            launched = True  # launch() ends the worker itself when it fails
            container = await self.runtime.launch(spec, stdio, request_ns=request_ns, worker=worker)
        except errors.NovaError as exc:
            self.metrics.start_failures.labels(type(exc).__name__).inc()
            if not launched:
                await self.runtime.release(worker)
            shutil.rmtree(run_dir, ignore_errors=True)
            if record.network is not None:
                for listener in self._network_listeners:
                    listener.container_down(record)
            raise
        finally:
            for fd in stdio:
                os.close(fd)
        record.spec = container.spec
        record.pid = container.pid
        record.pid_start_ticks = pid_start_ticks(container.pid)
        self.metrics.container_starts.labels(str(container.pooled).lower()).inc()
        self.metrics.active_containers.inc()
        self._track(record, container)
        await self._save(record)

        async def observe_start() -> None:
            entry_ns = await container.wait_started()
            if entry_ns:
                record.startup_us = (entry_ns - request_ns) / 1000
                self.metrics.startup_duration.observe(record.startup_us)
                if record.state == RUNNING:  # an exited record was saved with it already
                    await self._save(record)

        self._spawn(observe_start(), f"nova-started-{container_id}")
        return record

    async def stop(self, ref: str, *, grace_s: float = STOP_GRACE_S) -> ContainerRecord:
        record = self.get(ref)
        running = self._running.get(record.id)
        if running is not None:
            await running.stop(grace_s)
            await self._exited[record.id].wait()
        return record

    async def wait(self, ref: str) -> ContainerRecord:
        record = self.get(ref)
        event = self._exited.get(record.id)
        if event is not None:
            await event.wait()
        return record

    async def remove(self, ref: str) -> None:
        record = self.get(ref)
        if record.state == RUNNING:
            raise Conflict(f"container {record.name} is running; stop it first (`nova stop`)")
        await self.store.delete(keys.container(self.node, record.id))
        self._records.pop(record.id, None)
        self._exited.pop(record.id, None)
        shutil.rmtree(self.run_dir(record), ignore_errors=True)

    async def recover(self) -> None:
        """Adopt containers an earlier agent started; settle those that ended;
        remove the cgroups no live record claims (orphans of a crash)."""
        # Listed before the records are read: a cgroup made after this (by a
        # daemonless run that recorded itself first) is never taken for an orphan.
        owned = set(await asyncio.to_thread(self.cgroups.owned)) if self.cgroups else set()
        claimed: set[str] = set()
        for entry in await self.store.list(keys.containers_on(self.node)):
            try:
                record = ContainerRecord.from_json(entry.json())
            except (KeyError, TypeError, ValueError) as exc:
                log.error("skipping unreadable container record %s: %s", entry.key, exc)
                continue
            self._records[record.id] = record
            if record.state != RUNNING:
                continue
            alive = record.pid and pid_start_ticks(record.pid) == record.pid_start_ticks
            if record.spec.run_dir is None:
                # A daemonless `nova run`: its own process records how it ends.
                if alive:
                    claimed.add(record.id)
                else:
                    status = ExitStatus.for_reason(
                        ExitReason.KILLED, "the daemonless run ended without recording a result"
                    )
                    await self._finish(record, await self._settle(record, status, owned))
                continue
            run_dir = self.run_dir(record)
            if alive:
                try:
                    cgroups = self.cgroups if record.id in owned else None
                    network = self.runtime.network if record.network is not None else None
                    adopted = AdoptedProcess(record, run_dir, cgroups, network)
                except ProcessLookupError:
                    alive = False
                else:
                    log.info("adopted running container %s (pid %d)", record.name, record.pid)
                    claimed.add(record.id)
                    self.metrics.active_containers.inc()
                    self._track(record, adopted)
                    continue
            status = read_result(run_dir) or ExitStatus.for_reason(
                ExitReason.KILLED, "ended while the agent was down; no result was recorded"
            )
            await self._finish(record, await self._settle(record, status, owned))
        await self._remove_orphans(owned - claimed)
        if self.runtime.network is not None:
            # Every sandbox network with a lease here but no live container: idle
            # workers of a crashed agent, starts it never recorded, containers
            # that ended while it was away.
            await self.runtime.network.recover(claimed)

    async def _settle(
        self, record: ContainerRecord, status: ExitStatus, owned: set[str]
    ) -> ExitStatus:
        """A container that ended while the agent was away: its cgroup's usage
        (an OOM kill shows there) goes into its status, and the cgroup goes."""
        if self.cgroups is None or record.id not in owned:
            return status
        owned.discard(record.id)
        return await asyncio.to_thread(self.cgroups.settle, record.spec, status)

    async def _remove_orphans(self, unclaimed: set[str]) -> None:
        """Destroy cgroups no live record claims: idle workers of a crashed agent,
        starts it never recorded, containers that ended before their cgroup went."""
        if self.cgroups is None:
            return
        cgroups = self.cgroups
        ours = {record.pid for record in self.list() if record.pid}  # adopted, daemonless
        for sandbox_id in sorted(unclaimed - self.runtime.sandbox_ids()):
            inside = set(await asyncio.to_thread(cgroups.pids, sandbox_id))
            if inside & ours:  # never kill an adopted container, whatever its cgroup is called
                log.warning("cgroup %s holds a running container's process; kept", sandbox_id)
                continue
            log.info("removing orphaned cgroup %s (%d process(es) in it)", sandbox_id, len(inside))
            await asyncio.to_thread(cgroups.discard, sandbox_id)

    async def close(self) -> None:
        """Stop supervising. Containers keep running; a new agent adopts them."""
        for task in list(self._watchers.values()):
            task.cancel()
        for task in list(self._watchers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watchers.clear()

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(cid) for cid in list(self._running)))

    # -- logs -----------------------------------------------------------------

    async def logs(self, ref: str, stream: str, *, follow: bool) -> AsyncIterator[bytes]:
        if stream not in STREAMS:
            raise errors.UsageError(f"unknown log stream {stream!r}: use stdout or stderr")
        record = self.get(ref)
        path = self.run_dir(record) / f"{stream}.log"
        try:
            handle = open(path, "rb")  # noqa: SIM115, ASYNC230 (a local log file; closed in finally)
        except FileNotFoundError:
            return
        try:
            while True:
                chunk = handle.read(65536)
                if chunk:
                    yield chunk
                    continue
                if not follow or record.state != RUNNING:
                    # One last read: the container may have written just before exiting.
                    tail = handle.read()
                    if tail:
                        yield tail
                    return
                await asyncio.sleep(LOG_POLL_S)
        finally:
            handle.close()

    # -- internals ----------------------------------------------------------

    def _claim_name(self, name: str, http_port: int | None) -> None:
        if name in self._starting:
            raise Conflict(f"a container named {name!r} is already running")
        if http_port and http_port in self._starting.values():
            raise Conflict(f"port {http_port} is already served by a starting container")
        for record in list(self._records.values()):
            if record.state == RUNNING and record.name == name:
                raise Conflict(f"a container named {name!r} is already running")
            if record.state == RUNNING and http_port and record.spec.http_port == http_port:
                raise Conflict(f"port {http_port} is already served by container {record.name}")

    def add_network_listener(self, listener: NetworkListener) -> None:
        """Be told of every running container with a netns: now, as it starts, as it ends."""
        self._network_listeners.append(listener)
        for record in self.list():
            if record.network is not None:
                listener.container_up(record)

    def _track(self, record: ContainerRecord, running: Supervised) -> None:
        if record.network is not None:
            for listener in self._network_listeners:
                listener.container_up(record)
        self._records[record.id] = record
        self._running[record.id] = running
        self._exited[record.id] = asyncio.Event()
        self._watchers[record.id] = self._spawn(self._supervise(record, running), record.id)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro, name=name)

    async def _supervise(self, record: ContainerRecord, running: Supervised) -> None:
        status = await running.wait()
        self.metrics.active_containers.dec()
        await self._finish(record, status)

    async def _finish(self, record: ContainerRecord, status: ExitStatus) -> None:
        if record.network is not None:
            for listener in self._network_listeners:
                listener.container_down(record)
            record.network = None  # its netns went with its worker
        record.state = EXITED
        record.status = status
        record.finished_at = time.time()
        self._running.pop(record.id, None)
        self._watchers.pop(record.id, None)
        self.metrics.container_exits.labels(status.reason.value).inc()
        log.info("container %s %s", record.name, status.describe())
        try:
            await self._save(record)
        finally:
            event = self._exited.setdefault(record.id, asyncio.Event())
            event.set()

    async def _save(self, record: ContainerRecord) -> None:
        await self.store.put_json(keys.container(self.node, record.id), record.to_json())


def _open_stdio(run_dir: Path) -> tuple[int, int, int]:
    """The container's stdin (/dev/null) and its log files, as fds the caller closes."""
    opened: list[int] = []
    try:
        opened.append(os.open(os.devnull, os.O_RDONLY))
        for stream in STREAMS:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            opened.append(os.open(run_dir / f"{stream}.log", flags, 0o600))
    except OSError:
        for fd in opened:
            os.close(fd)
        raise
    return opened[0], opened[1], opened[2]


def _default_name(module_path: str) -> str:
    stem = Path(module_path).stem.lower()
    stem = "".join(ch if ch.isalnum() else "-" for ch in stem).strip("-")[:40] or "container"
    return f"{stem}-{secrets.token_hex(3)}"
