"""The leader's placement loop: nodes + deployments -> place() -> changed assignments, fenced.

It runs only while this coordinator acts as the leader (main.py cancels it
when the lease or the key is lost). On start it adopts the assignments in
the store (what the previous leader wrote), so a failover moves nothing.
Then, on every change under `nova/v1/nodes/` or `nova/v1/deployments/`
(blocking queries; changes gather for 50 ms, or a twentieth of the last
pass's time up to 1 s), one pass:

  1. read the nodes (healthy = an agent session holds the key) and specs;
  2. `place()` the specs' replicas over the kept placements (in a thread:
     a large pass must not stall the heartbeat that keeps the lease);
  3. encode each node's assignment and write only those whose containers
     changed, in fenced txns of at most `batch_ops` operations, `concurrency`
     at a time (a failed write marks its nodes unknown: the next pass rewrites
     them). A node that failed gets an empty assignment, so when it
     returns it stops what it ran: its replicas already run elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.leader import LeaderElection, NotLeader
from coordinator.placement import (
    Node,
    Placement,
    QuotaCheck,
    ReplicaId,
    Resources,
    Snapshot,
    Strategy,
    place,
)
from coordinator.state import (
    AssignmentEncoder,
    DeploymentSpec,
    RecordError,
    node_of,
    split_assignment,
)
from nova.store import KVEntry, Store, StoreError, TxnOp, keys

log = logging.getLogger("nova.coordinator.placer")

MAX_TXN_PAYLOAD = 400 * 1024  # of Consul's 512 KiB txn_max_req_len, with room for JSON framing
EMPTY_BODY = b'{"containers":{}'
UNKNOWN_BODY = b""  # never equal to an encoded body
WATCH_WAIT = 30.0
MAX_SETTLE = 1.0


@dataclass
class PassReport:
    """What one placement pass did (the status API shows the last one)."""

    epoch: int
    nodes: int = 0
    healthy_nodes: int = 0
    deployments: int = 0
    replicas: int = 0
    unplaced: int = 0
    unplaced_by_reason: dict[str, int] = field(default_factory=dict)
    moved: int = 0
    written: int = 0
    txns: int = 0
    place_s: float = 0.0
    write_s: float = 0.0
    finished_at: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "skipped"} | {
            "skipped": self.skipped[:20]
        }


@dataclass(frozen=True, slots=True)
class Encoded:
    """What the last pass encoded: the bodies' replicas per node, and each spec's fragment."""

    by_node: dict[str, list[ReplicaId]]
    heads: dict[tuple[str, str], bytes]


@dataclass
class _Plan:
    report: PassReport
    bodies: dict[str, bytes]
    encoded: Encoded
    placements: list[Placement]
    changed: dict[str, bytes | None]  # None: delete the key (the node is gone)


class Placer:
    """Keep `nova/v1/assignments/` equal to place(nodes, deployments), incrementally."""

    def __init__(
        self,
        store: Store,
        election: LeaderElection,
        *,
        strategy: Strategy | str = Strategy.LEAST_LOADED,
        overcommit: float = 1.0,
        quota: QuotaCheck | None = None,
        batch_ops: int = 63,
        concurrency: int = 2,
        debounce: float = 0.05,
    ) -> None:
        if not 1 <= batch_ops <= 127:
            raise ValueError(
                f"batch_ops must be 1..127 (one more op is the fence), not {batch_ops}"
            )
        self.store = store
        self.election = election
        self.strategy = Strategy(strategy)
        self.overcommit = overcommit
        self.quota = quota  # tenant quotas plug in here (the quota model comes later)
        self.batch_ops = batch_ops
        self.concurrency = concurrency
        self.debounce = debounce
        self.bodies: dict[str, bytes] = {}  # node -> assignment body as stored
        self.placements: list[Placement] = []
        self.last: PassReport | None = None
        self.epoch: int | None = None  # the term whose writes `bodies` reflects
        self.encoded: Encoded | None = None  # None: encode every node on the next pass
        self._dirty = asyncio.Event()

    async def run(self, epoch: int) -> None:
        """Adopt, then place on every change, until cancelled (or no longer the leader)."""
        if self.epoch is None or epoch not in (self.epoch, self.epoch + 1):
            await self.adopt()
        # else: the same term resumed (the lease lapsed, the key stayed ours) or
        # we led the one just before (LockIndex grows by one per acquisition):
        # nobody else wrote, so what we know is what is stored.
        self.epoch = epoch
        watchers = [
            asyncio.create_task(self._watch(prefix), name=f"placer-watch {prefix}")
            for prefix in (keys.NODES, keys.DEPLOYMENTS)
        ]
        try:
            delay = 0.1
            self._dirty.set()
            while True:
                await self._dirty.wait()
                await asyncio.sleep(self._settle_time())  # let a burst of changes land
                self._dirty.clear()
                try:
                    await self.run_pass(epoch)
                    delay = 0.1
                except StoreError as exc:
                    log.warning("placement pass failed (retrying in %.1f s): %s", delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    self._dirty.set()
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    def _settle_time(self) -> float:
        """How long to let changes gather before a pass: `debounce`, or longer when
        passes are expensive (a 15 s pass at a million replicas should not start on
        the first of a hundred node failures), at most MAX_SETTLE."""
        if self.last is None:
            return self.debounce
        took = self.last.place_s + self.last.write_s
        return min(max(self.debounce, took / 20), MAX_SETTLE)

    async def adopt(self) -> None:
        """Take the stored assignments as the current placement."""
        bodies: dict[str, bytes] = {}
        placements: list[Placement] = []
        for entry in await self.store.list(keys.ASSIGNMENTS):
            try:
                node, body, held = split_assignment(entry)
            except (RecordError, ValueError) as exc:
                log.warning("ignoring %s", exc)
                continue
            bodies[node] = body
            placements.extend(held)
        self.bodies, self.placements, self.encoded = bodies, placements, None

    async def _watch(self, prefix: str) -> None:
        index = 0
        while True:
            try:
                new_index, _ = await self.store.watch(prefix, index, WATCH_WAIT)
            except StoreError as exc:
                log.warning("watch %s failed: %s", prefix, exc)
                index = 0
                await asyncio.sleep(1.0)
                continue
            if new_index != index:
                self._dirty.set()
            index = 0 if new_index < index else new_index

    async def run_pass(self, epoch: int) -> PassReport:
        """One full pass; NotLeader ends it (and the loop) if the fence refuses a write."""
        node_entries, spec_entries = await asyncio.gather(
            self.store.list(keys.NODES), self.store.list(keys.DEPLOYMENTS)
        )
        plan = await asyncio.to_thread(
            self._plan, epoch, node_entries, spec_entries,
            bodies=self.bodies, placements=self.placements, previous=self.encoded,
        )  # fmt: skip
        started = time.monotonic()
        try:
            written, txns = await self._write(plan.changed, epoch)
        except BaseException:
            # Some batches may have landed: what those nodes hold is unknown now,
            # so the next pass rewrites them whatever it decides.
            for node in plan.changed:
                self.bodies[node] = UNKNOWN_BODY
            raise
        plan.report.written, plan.report.txns = written, txns
        plan.report.write_s = round(time.monotonic() - started, 3)
        plan.report.finished_at = time.time()
        self.bodies, self.placements, self.encoded = plan.bodies, plan.placements, plan.encoded
        self.last = plan.report
        if written:
            log.info(
                "epoch %d: placed %d replicas (%d moved, %d unplaced); wrote %d assignments",
                epoch, plan.report.replicas, plan.report.moved, plan.report.unplaced, written,
            )  # fmt: skip
        return plan.report

    @staticmethod
    def _encode(
        encoder: AssignmentEncoder,
        by_node: Mapping[str, list[ReplicaId]],
        bodies: Mapping[str, bytes],
        previous: Encoded | None,
    ) -> dict[str, bytes]:
        """Every node's body; a node whose replicas and their specs are unchanged keeps its own.

        (Encoding a million replicas is most of a pass; a reschedule changes few nodes.)
        """
        if previous is None:
            return {node: encoder.body(reps) for node, reps in by_node.items()}
        changed_specs = {k for k, head in encoder.heads.items() if previous.heads.get(k) != head}
        out = {}
        for node, reps in by_node.items():
            body = bodies.get(node)
            if (
                body
                and previous.by_node.get(node) == reps
                and not (
                    changed_specs and any((r.namespace, r.name) in changed_specs for r in reps)
                )
            ):
                out[node] = body
            else:
                out[node] = encoder.body(reps)
        return out

    def _plan(
        self,
        epoch: int,
        node_entries: list[KVEntry],
        spec_entries: list[KVEntry],
        *,
        bodies: Mapping[str, bytes],
        placements: list[Placement],
        previous: Encoded | None,
    ) -> _Plan:
        started = time.monotonic()
        report = PassReport(epoch)
        nodes: list[Node] = []
        for entry in node_entries:
            try:
                nodes.append(node_of(entry))
            except (RecordError, ValueError) as exc:
                report.skipped.append(str(exc))
        specs: dict[tuple[str, str], DeploymentSpec] = {}
        for entry in spec_entries:
            try:
                spec = DeploymentSpec.from_json(entry.json(), entry.key)
            except (RecordError, ValueError) as exc:
                report.skipped.append(str(exc))
                continue
            specs[(spec.namespace, spec.name)] = spec
        # Placements of deleted deployments are dropped here: place() keeps what it is not asked.
        kept = [p for p in placements if (p.replica.namespace, p.replica.name) in specs]
        result = place(
            Snapshot(tuple(nodes), tuple(kept)),
            [s.request() for s in specs.values()],
            strategy=self.strategy,
            overcommit=self.overcommit,
            quota=self.quota,
        )
        encoder = AssignmentEncoder(specs.values())
        by_node = result.by_node()
        new_bodies = self._encode(encoder, by_node, bodies, previous)
        present = {n.name for n in nodes}
        changed: dict[str, bytes | None] = {}
        for node, body in new_bodies.items():
            if bodies.get(node) != body:
                changed[node] = body
        for node in bodies.keys() - new_bodies.keys():
            if node not in present:
                changed[node] = None
            elif bodies[node] != EMPTY_BODY:
                changed[node] = EMPTY_BODY
                new_bodies[node] = EMPTY_BODY
            else:
                new_bodies[node] = EMPTY_BODY
        size = {k: Resources(s.cpu_millicores, s.memory_bytes) for k, s in specs.items()}
        report.nodes = len(nodes)
        report.healthy_nodes = sum(n.healthy for n in nodes)
        report.deployments = len(specs)
        report.replicas = len(result.decisions)
        report.unplaced = result.unplaced_count
        for u in result.unplaced:
            reason = str(u.reason)
            report.unplaced_by_reason[reason] = report.unplaced_by_reason.get(reason, 0) + len(
                u.indices
            )
        report.moved = sum(d.is_moved for d in result.decisions)
        report.place_s = round(time.monotonic() - started, 3)
        return _Plan(
            report,
            new_bodies,
            Encoded(by_node, encoder.heads),
            [
                Placement(d.replica, d.node, size[(d.replica.namespace, d.replica.name)])
                for d in result.decisions
            ],
            changed,
        )

    async def _write(self, changed: Mapping[str, bytes | None], epoch: int) -> tuple[int, int]:
        """Write `changed` in fenced batches; (keys written, txns sent).

        `concurrency` senders share one lazy batch iterator: at most that many
        txns are built and in flight, so memory stays flat and Consul keeps
        headroom for the heartbeats that hold the lease.
        """
        batches = self._batches(changed, epoch)
        sent = 0

        async def sender() -> None:
            nonlocal sent
            for ops in batches:
                sent += 1
                result = await self.election.fenced(ops)
                if not result.ok:
                    raise StoreError("assignments txn", "consul", str(result.errors[:3]))

        tasks = [asyncio.create_task(sender()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return len(changed), sent

    def _batches(self, changed: Mapping[str, bytes | None], epoch: int) -> Iterable[list[TxnOp]]:
        ops: list[TxnOp] = []
        size = 0
        for node in sorted(changed):
            body = changed[node]
            key = keys.assignment(node)
            if body is None:
                op, cost = TxnOp.delete(key), len(key) + 64
            else:
                value = AssignmentEncoder.value(body, epoch)
                op, cost = TxnOp.set(key, value), len(key) + 64 + len(base64.b64encode(value))
            if ops and (len(ops) >= self.batch_ops or size + cost > MAX_TXN_PAYLOAD):
                yield ops
                ops, size = [], 0
            ops.append(op)
            size += cost
        if ops:
            yield ops

    def counts(self) -> dict[str, int]:
        """Replicas per node, from the last pass (or adoption)."""
        out: dict[str, int] = {}
        for p in self.placements:
            out[p.node] = out.get(p.node, 0) + 1
        return out


async def cancel(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, NotLeader):
        await task
