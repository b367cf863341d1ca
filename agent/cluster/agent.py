"""`nova-agent --consul URL`: the agent's cluster half, next to its local API.

Four tasks, each retrying on its own with backoff when Consul does not
answer, none ever stopping a container because of that:

    registration  service, TTL check, session, node key (registration.py)
    watch         blocking queries on nova/v1/assignments/<node>
    reconcile     plans applied with the container manager (reconciler.py)
    status        observed status written to nova/v1/status/<node>/ (status.py)
    peers         (with container networks) other nodes' segment endpoints -> VXLAN FDB
    endpoints     this node's containers published, other nodes' fed to network policy
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.cluster.assignments import parse_assignment
from agent.cluster.endpoints import EndpointPublisher, watch_remote
from agent.cluster.health import Backoff, StoreHealth
from agent.cluster.node import NodeInfo
from agent.cluster.reconciler import Reconciler
from agent.cluster.registration import Registration
from agent.cluster.status import StatusReporter
from agent.containers import ContainerManager
from agent.netpol.tables import Endpoint
from agent.sandbox.network import SandboxNetwork
from nova.errors import NovaError
from nova.images import ImageCache, ImageRef, resolve
from nova.store import KVEntry, Store, StoreError, keys
from nova.store.consul import ConsulStore
from nova.store.follow import follow_prefix

log = logging.getLogger("nova.agent.cluster")

WATCH_WAIT = 60.0
STORE_TIMEOUT = 5.0


class ClusterAgent:
    def __init__(
        self,
        *,
        consul_url: str,
        info: NodeInfo,
        manager: ContainerManager,
        local: Store,
        cache_dir: Path,
        registry: CollectorRegistry,
        network: SandboxNetwork | None = None,
    ) -> None:
        self.info = info
        self.network = network
        self.node = info.node
        self.store = ConsulStore(consul_url, timeout=STORE_TIMEOUT)
        self.health = StoreHealth(self.store.url, registry)
        self.status = StatusReporter(self.store, self.node, self.health)
        self.images = ImageCache(cache_dir, self.store)
        self.reconciler = Reconciler(
            node=self.node, manager=manager, local=local, images=self.images, status=self.status
        )
        self.registration = Registration(
            self.store, info, self.health, on_registered=self.status.resync
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.manager = manager
        self.endpoints = EndpointPublisher(self.store, self.node) if network is not None else None
        # Set by the agent when it enforces network policy: other nodes' containers.
        self.on_remote_endpoints: Callable[[list[Endpoint]], None] | None = None

    async def start(self) -> None:
        """Adopt the replicas recorded locally, then start the loops (Consul need not answer)."""
        await self.reconciler.load()
        for coro, name in (
            (self.registration.run(), "registration"),
            (self._watch_assignments(), "watch"),
            (self.reconciler.run(), "reconcile"),
            (self.status.run(), "status"),
        ):
            self._spawn(coro, name)
        if self.network is not None:
            self._spawn(self._watch_peers(), "peers")
        if self.endpoints is not None:
            self.manager.add_network_listener(self.endpoints)
            self._spawn(self.endpoints.run(), "endpoints")
        if self.on_remote_endpoints is not None:
            self._spawn(
                watch_remote(self.store, self.node, self.on_remote_endpoints), "peers-policy"
            )

    async def close(self) -> None:
        """Stop the loops. Containers keep running; the session lapses with the TTL check."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.reconciler.close()
        await self.store.close()

    def describe(self) -> dict[str, Any]:
        """What `/v1/health` and `nova ps` show about the cluster."""
        return {
            **self.health.describe(),
            "node": self.node,
            "registered": self.registration.registered.is_set(),
            "session": self.registration.session,
            "epoch": self.reconciler.epoch,
        }

    async def image_path(self, text: str) -> str:
        """`nova run --image REF`: the verified module file for REF, fetched if needed."""
        digest = await resolve(self.store, ImageRef.parse(text, what="--image"))
        return str(await self.images.get(digest))

    async def _watch_assignments(self) -> None:
        key = keys.assignment(self.node)
        index = 0
        backoff = Backoff()
        while True:
            try:
                current, entries = await self.store.watch(key, index, WATCH_WAIT)
            except StoreError as exc:
                self.health.failed("watch assignments", exc)
                index = 0  # resync: the store may have been rebuilt meanwhile
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.health.ok()
            if current < index:  # went backwards: a restored or rebuilt store
                log.warning("store index went back (%d -> %d): reading anew", index, current)
                index = 0
                continue
            if current == index:
                continue  # the wait ended with nothing new
            index = current
            # The watch is on a prefix: node "a" also sees "a1"; take our key only.
            entry = next((e for e in entries if e.key == key), None)
            try:
                data = None if entry is None else entry.json()
                assignment = parse_assignment(data, where=key)
            except ValueError as exc:  # InvalidAssignment is one
                log.error("ignoring a bad assignment, keeping the last good one: %s", exc)
                continue
            self.reconciler.set_desired(assignment)

    async def _watch_peers(self) -> None:
        """Every other node's segment endpoint -> the VXLAN flood list of every segment.

        A node that leaves (its session-bound key goes) stops receiving our
        segments' broadcasts; one that joins starts. Consul being down keeps
        the last list.
        """
        network = self.network
        assert network is not None

        async def changed(entries: list[KVEntry]) -> None:
            self.health.ok()
            peers = set()
            for entry in entries:
                try:
                    data = entry.json()
                    if data.get("node") != self.node and data.get("segment_endpoint"):
                        peers.add(IPv4Address(data["segment_endpoint"]))
                except (ValueError, AttributeError) as exc:
                    log.warning("ignoring node record %s: %s", entry.key, exc)
            try:
                await network.set_peers(peers)
            except NovaError as exc:
                log.error("cannot update the segments' peers: %s", exc)

        await follow_prefix(
            self.store,
            keys.NODES,
            changed,
            on_error=lambda exc: self.health.failed("watch nodes", exc),
        )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"nova-cluster-{name}")
        task.add_done_callback(_log_death)
        self._tasks.append(task)


def _log_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("cluster task %s died", task.get_name(), exc_info=task.exception())
