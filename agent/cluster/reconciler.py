"""Applies reconcile plans with the container manager, one pass at a time.

Each replica runs as a container named after its replica id (so `nova ps`
reads `default.web.0`). The mapping replica id -> container id, generation
and digest is kept in the agent's local store (`nova/v1/replicas/<node>/…`),
so a restarted agent, which re-adopts its running containers, also knows
which replica each one is: it adopts them rather than starting duplicates.

Nothing is stopped or started before the first assignment has been read:
an agent that starts while Consul is down keeps running what it runs.
A replica that exits is started again after a delay that doubles with each
quick exit (`RESTART_DELAY` up to `RESTART_DELAY_MAX`), so a crashing module
never spins; a run longer than `STABLE_RUN` resets the delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from typing import Any

from agent.api import parse_create
from agent.cluster.assignments import Assignment, Desired, Running, plan
from agent.cluster.status import StatusReporter
from agent.containers import ContainerManager, NotFound
from agent.records import RUNNING, ContainerRecord
from agent.sandbox.spec import DEFAULT_NAMESPACE
from nova import errors
from nova.images import ImageCache
from nova.store import Store, keys

log = logging.getLogger("nova.agent.cluster.reconcile")

RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
STABLE_RUN = 10.0
STOP_GRACE = 5.0


@dataclass(slots=True)
class ReplicaRecord:
    """What the agent runs for a replica (persisted locally)."""

    replica_id: str
    container_id: str
    generation: int
    digest: str
    started_at: float


class Reconciler:
    def __init__(
        self,
        *,
        node: str,
        manager: ContainerManager,
        local: Store,
        images: ImageCache,
        status: StatusReporter,
    ) -> None:
        self.node = node
        self.manager = manager
        self.local = local
        self.images = images
        self.status = status
        self.epoch = 0
        self.passes = 0
        self._desired: dict[str, Desired] | None = None  # None until the first assignment
        self._replicas: dict[str, ReplicaRecord] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._stopping: set[str] = set()  # container ids stopped on purpose
        self._errors: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- inputs ------------------------------------------------------------------

    async def load(self) -> None:
        """Read the local replica map; keep the entries whose container the manager knows."""
        prefix = keys.replicas_on(self.node)
        for entry in await self.local.list(prefix):
            try:
                record = ReplicaRecord(**entry.json())
                container = self.manager.get(record.container_id)
            except (TypeError, ValueError, NotFound) as exc:
                log.warning("dropping replica record %s: %s", entry.key, exc)
                await self.local.delete(entry.key)
                continue
            self._replicas[record.replica_id] = record
            self._report(record.replica_id)
            if container.state == RUNNING:
                log.info("replica %s: adopted container %s", record.replica_id, container.id)
                self._watch_exit(record.replica_id, container.id)

    def set_desired(self, assignment: Assignment) -> None:
        self.epoch = assignment.epoch
        self._desired = dict(assignment.replicas)
        self.wake()

    def wake(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def idle(self) -> None:
        """Until a pass found nothing to do (tests)."""
        await self._idle.wait()

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._desired is None:
                continue
            try:
                done = await self._pass(self._desired)
            except Exception:  # a bug must not end reconciling: log it, try again later
                log.exception("reconcile pass failed")
                self._wake_later(RESTART_DELAY_MAX)
                continue
            if done and not self._wake.is_set():
                self._idle.set()

    async def _pass(self, desired: dict[str, Desired]) -> bool:
        """One reconcile pass; True if nothing is left to do now."""
        self.passes += 1
        actual = {rid: self._running(record) for rid, record in self._replicas.items()}
        steps = plan(desired, actual)
        if steps.empty:
            return True
        await asyncio.gather(*(self._stop(have, desired) for have in steps.stop))
        for replica_id in steps.forget:
            await self._forget(replica_id)
        now = time.monotonic()
        due = [w for w in steps.start if self._retry_at.get(w.replica_id, 0.0) <= now]
        for waiting in steps.start:
            if waiting not in due:
                self._wake_later(self._retry_at[waiting.replica_id] - now)
        await asyncio.gather(*(self._start(want) for want in due))
        return len(due) == len(steps.start)

    def _running(self, record: ReplicaRecord) -> Running:
        try:
            alive = self.manager.get(record.container_id).state == RUNNING
        except NotFound:
            alive = False
        return Running(
            record.replica_id, record.container_id, record.generation, record.digest, alive
        )

    # -- steps ---------------------------------------------------------------------

    async def _stop(self, have: Running, desired: dict[str, Desired]) -> None:
        self._stopping.add(have.container_id)
        with contextlib.suppress(NotFound):
            await self.manager.stop(have.container_id, grace_s=STOP_GRACE)
        log.info("replica %s: stopped container %s", have.replica_id, have.container_id)
        if have.replica_id not in desired:
            await self._forget(have.replica_id)

    async def _forget(self, replica_id: str) -> None:
        record = self._replicas.pop(replica_id, None)
        self._failures.pop(replica_id, None)
        self._retry_at.pop(replica_id, None)
        self._errors.pop(replica_id, None)
        await self.local.delete(keys.replica(self.node, replica_id))
        if record is not None:
            await self._remove_container(record.container_id)
        self.status.drop(replica_id)

    async def _start(self, want: Desired) -> None:
        rid = want.replica_id
        old = self._replicas.get(rid)
        try:
            path = await self.images.get(want.digest)
            container = await self.manager.create(parse_create(_create_body(want, str(path))))
        except errors.NovaError as exc:  # StoreError, ImageCorrupt, a module that cannot run
            self._errors[rid] = exc.message
            delay = self._backoff(rid)
            log.error("replica %s: cannot start (%s); retrying in %.1f s", rid, exc.message, delay)
            self._report_failed(want, exc.message)
            self._wake_later(delay)
            return
        self._errors.pop(rid, None)
        record = ReplicaRecord(rid, container.id, want.generation, want.digest, time.time())
        self._replicas[rid] = record
        await self.local.put_json(keys.replica(self.node, rid), asdict(record))
        if old is not None and old.container_id != container.id:
            await self._remove_container(old.container_id)
        log.info(
            "replica %s: started container %s (generation %d)", rid, container.id, want.generation
        )
        self._report(rid)
        self._watch_exit(rid, container.id)

    async def _remove_container(self, container_id: str) -> None:
        """Forget an exited container of a replica: restarts must not pile up records."""
        with contextlib.suppress(NotFound, errors.NovaError):
            if self.manager.get(container_id).state != RUNNING:
                await self.manager.remove(container_id)
        self._stopping.discard(container_id)

    def _watch_exit(self, replica_id: str, container_id: str) -> None:
        async def watch() -> None:
            record = await self.manager.wait(container_id)
            if container_id in self._stopping:
                return
            current = self._replicas.get(replica_id)
            if current is None or current.container_id != container_id:
                return
            ran = (record.finished_at or time.time()) - current.started_at
            if ran >= STABLE_RUN:
                self._failures.pop(replica_id, None)
            delay = self._backoff(replica_id)
            log.warning(
                "replica %s: container %s %s; starting it again in %.1f s",
                replica_id,
                container_id,
                record.status.describe() if record.status else "ended",
                delay,
            )
            self._report(replica_id)
            self.wake()

        self._spawn(watch())

    def _backoff(self, replica_id: str) -> float:
        failures = self._failures.get(replica_id, 0) + 1
        self._failures[replica_id] = failures
        delay = min(RESTART_DELAY * 2.0 ** (failures - 1), RESTART_DELAY_MAX)
        self._retry_at[replica_id] = time.monotonic() + delay
        return delay

    def _wake_later(self, delay: float) -> None:
        async def later() -> None:
            await asyncio.sleep(max(delay, 0.0))
            self.wake()

        self._spawn(later())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- status --------------------------------------------------------------------

    def _report(self, replica_id: str) -> None:
        record = self._replicas[replica_id]
        try:
            container: ContainerRecord | None = self.manager.get(record.container_id)
        except NotFound:
            container = None
        state = "exited" if container is None or container.state != RUNNING else "running"
        self.status.set(
            replica_id,
            {
                "state": state,
                "container_id": record.container_id,
                "ip": None,  # containers share the host network until isolation is wired in
                "started_at": record.started_at,
                "exit": container.status.to_json() if container and container.status else None,
                "error": None,
                "generation": record.generation,
                "digest": record.digest,
                "restarts": self._failures.get(replica_id, 0),
            },
        )

    def _report_failed(self, want: Desired, error: str) -> None:
        self.status.set(
            want.replica_id,
            {
                "state": "failed",
                "container_id": None,
                "ip": None,
                "started_at": None,
                "exit": None,
                "error": error,
                "generation": want.generation,
                "digest": want.digest,
                "restarts": self._failures.get(want.replica_id, 0),
            },
        )


def _create_body(want: Desired, module_path: str) -> dict[str, Any]:
    """The agent API's create request for a replica (validated by `parse_create`)."""
    body: dict[str, Any] = {
        "module": module_path,
        "name": want.replica_id,
        "argv": [want.deployment, *want.args],
        "env": dict(want.env),
        "namespace": want.namespace or DEFAULT_NAMESPACE,  # its netns joins that segment
        "labels": dict(want.labels),  # network policy selects replicas by them
    }
    if want.memory_bytes:
        body["memory"] = want.memory_bytes
    if want.cpu_millicores:
        body["cpu"] = f"{want.cpu_millicores}m"
    return body
