"""A daemonless `nova run`'s network: the same netns, segment and IPAM as the agent's.

The supervisor calls `attach()` before it forks the worker and `detach()`
after the worker is gone. Each runs its own short event loop and leaves no
thread behind (the store and the netlink helper are closed), so the fork
that follows is a single-threaded process's, as daemonless.py requires.

The lease is taken in the local state's IPAM record of this node, which an
agent on the same state directory shares (compare-and-set), so the two never
hand out one address twice; the node CIDR is the agent's (from the record),
else $NOVA_NODE_CIDR, else the default. A supervisor that dies without
detaching leaves a lease whose container is not running: the agent's next
start removes that network (docs/networking.md, "Crash safety").
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from agent.isolation.ipam import ipam_key
from agent.sandbox.network import (
    DEFAULT_NODE_CIDR,
    NetAttachment,
    NetworkConfig,
    SandboxNetwork,
    publish_port,
)
from agent.sandbox.spec import RunSpec
from nova import errors, paths
from nova.store import open_store


@dataclass(slots=True)
class DaemonlessNetwork:
    """What the worker child needs: the netns fd to join, and a published port's listener."""

    attachment: NetAttachment
    netns_fd: int
    listener: socket.socket | None

    def close_fds(self) -> None:
        os.close(self.netns_fd)
        if self.listener is not None:
            self.listener.close()


@asynccontextmanager
async def _network() -> AsyncIterator[SandboxNetwork]:
    store = open_store(str(paths.state_dir() / "state.db"))
    await store.open()
    network = None
    try:
        node = socket.gethostname()
        recorded = await store.get(ipam_key(node))
        value = recorded.json() if recorded is not None else {}
        config = NetworkConfig.parse(
            value.get("node_cidr") or os.environ.get("NOVA_NODE_CIDR") or DEFAULT_NODE_CIDR,
            cluster_cidr=value.get("cluster_cidr") or None,
            segment_ids=os.environ.get("NOVA_SEGMENT_IDS"),
        )
        network = SandboxNetwork(store, node=node, config=config)
        await network.start()
        yield network
    finally:
        if network is not None:
            network.netlink.close()
        await store.close()


def attach(spec: RunSpec) -> DaemonlessNetwork:
    """Give container `spec.id` its netns on its namespace's segment (before the fork)."""

    async def go() -> NetAttachment:
        async with _network() as network:
            try:
                return await network.attach(spec.id, spec.namespace)
            except BaseException:
                await network.detach(spec.id)
                raise

    try:
        attachment = asyncio.run(go())
    except (OSError, ValueError) as exc:
        raise errors.SandboxError(f"cannot set up the container's network: {exc}") from None
    listener = None
    try:
        netns_fd = os.open(f"/var/run/netns/{attachment.netns}", os.O_RDONLY | os.O_CLOEXEC)
        if spec.http_port is not None:  # published in the host's netns, served from its own
            listener = publish_port(spec.http_host, spec.http_port)
    except OSError as exc:
        detach(spec.id)
        raise errors.SandboxError(
            f"cannot listen on {spec.http_host}:{spec.http_port}: {exc.strerror or exc}"
        ) from None
    return DaemonlessNetwork(attachment, netns_fd, listener)


def detach(container_id: str) -> None:
    """Remove the container's network and release its lease (after the worker is gone)."""

    async def go() -> None:
        async with _network() as network:
            await network.detach(container_id)
            await network.prune()

    asyncio.run(go())
