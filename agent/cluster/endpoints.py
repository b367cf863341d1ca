"""Policy peers across hosts: each agent publishes its containers, every agent reads the rest.

`nova/v1/endpoints/<node>` = {"node": N, "endpoints": {<container id>: {"ip", "namespace",
"labels"}}}, written by that node's agent whenever a container with a netns starts or
ends (debounced). Every agent watches the prefix and hands the other nodes' entries
to its policy engine as remote endpoints, so `podSelector` and `namespaceSelector`
match containers on any host, as in Kubernetes, not only through `ipBlock`.

A node that dies leaves its entry: its addresses come from its own node CIDR, so a
stale entry names addresses nobody else holds; the node rewrites it when it returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address
from typing import Any

from agent.cluster.health import Backoff
from agent.netpol.tables import Endpoint
from agent.records import ContainerRecord
from nova.store import Store, StoreError, keys
from nova.store.follow import follow_prefix

log = logging.getLogger("nova.agent.cluster.endpoints")

DEBOUNCE_S = 0.02


class EndpointPublisher:
    """A NetworkListener of the ContainerManager that keeps this node's entry current."""

    def __init__(self, store: Store, node: str) -> None:
        self.store = store
        self.node = node
        self._mine: dict[str, dict[str, Any]] = {}
        self._dirty = asyncio.Event()

    async def container_starting(self, record: ContainerRecord) -> None:
        """Published once it runs (container_up); nothing to wait for before."""

    def container_up(self, record: ContainerRecord) -> None:
        if record.network is None:
            return
        self._mine[record.id] = {
            "ip": record.network["ip"],
            "namespace": record.spec.namespace,
            "labels": dict(record.spec.labels),
        }
        self._dirty.set()

    def container_down(self, record: ContainerRecord) -> None:
        if self._mine.pop(record.id, None) is not None:
            self._dirty.set()

    async def run(self) -> None:
        """Write the entry after each change (retrying with backoff while Consul is down)."""
        backoff = Backoff()
        self._dirty.set()  # the first write replaces what an earlier run left
        while True:
            await self._dirty.wait()
            await asyncio.sleep(DEBOUNCE_S)
            self._dirty.clear()
            value = {"node": self.node, "endpoints": dict(self._mine)}
            try:
                await self.store.put_json(keys.endpoints(self.node), value)
                backoff.reset()
            except StoreError as exc:
                log.warning("cannot publish this node's endpoints: %s", exc)
                self._dirty.set()
                await asyncio.sleep(backoff.next())


def parse_entries(node: str, entries: Iterable[Any]) -> list[Endpoint]:
    """Other nodes' endpoints from the prefix's entries (malformed ones are skipped)."""
    found: list[Endpoint] = []
    for entry in entries:
        try:
            value = entry.json()
            if value.get("node") == node:
                continue
            for cid, data in value.get("endpoints", {}).items():
                found.append(
                    Endpoint(
                        key=f"{value['node']}/{cid}",
                        ip=IPv4Address(data["ip"]),
                        namespace=str(data["namespace"]),
                        labels={str(k): str(v) for k, v in data.get("labels", {}).items()},
                        host_ifname="",  # another host's: never enforced here
                    )
                )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring endpoints entry %s: %s", entry.key, exc)
    return found


async def watch_remote(store: Store, node: str, apply: Callable[[list[Endpoint]], None]) -> None:
    """Feed `apply` every other node's endpoints on every change; the last set stays
    while Consul is down."""
    await follow_prefix(store, keys.ENDPOINTS, lambda entries: apply(parse_entries(node, entries)))
