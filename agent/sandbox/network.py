"""Each sandbox's network: a netns with a veth into its Nova namespace's segment.

    network = SandboxNetwork(store, node="n1", config=NetworkConfig.parse("10.88.0.0/20"))
    await network.start()
    attachment = await network.attach(sandbox_id, "shop")   # lease, segment, netns, veth
    fd = network.open_netns(sandbox_id)                      # the zygote's worker joins it
    ...
    await network.detach(sandbox_id)                         # netns, veth, route, lease gone

The warm pool attaches a sandbox before its worker is forked (the worker
joins the netns right after the fork, as it joins its cgroup), so a warm
start does no network work at all. A sandbox belongs to one namespace from
birth: it is never re-labelled into another tenant's segment.

Crash safety: the IPAM lease (owner = sandbox id) is written to the store
*before* any kernel object is made, and released only *after* they are
removed. So every `nova-ctr-<id>` netns and `nvh<id>` link this agent made
has a lease in this node's IPAM record: `recover(live)` removes exactly the
ones whose lease is ours and whose sandbox is not live, and never touches a
netns without such a lease (another agent's, or anyone else's).

Segments: one per Nova namespace (segments.py), with the namespace's segment
id from its record (segment_ids.py); a bridge alone on a single host, or
with a VXLAN uplink when `NetworkConfig.vxlan_local` is set. A segment whose
last sandbox is detached stays until `close()` or `prune()`: namespaces come
back, and a bridge costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from agent.isolation.ipam import IpamConfig, IpamStore, Lease
from agent.isolation.netns import NETNS_DIR, host_ifname, list_container_netns, netns_name
from agent.isolation.nlhelper import NetlinkHelper, NetlinkHelperError
from agent.isolation.segment_ids import SegmentIdRange, namespace_segment_id
from agent.isolation.segments import BridgeSegment, Segment, VxlanSegment
from nova.store import Store, StoreError, keys

log = logging.getLogger("nova.agent.sandbox.network")

DEFAULT_NODE_CIDR = "10.88.0.0/20"
LISTEN_BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """How this node addresses and connects its sandboxes.

    `ipam`: the node CIDR (and cluster CIDR) addresses come from.
    `segment_ids`: where new namespaces' segment ids are taken from.
    `vxlan_local`: this host's underlay address; None = single host (bridges only).
    `vxlan_underlay`: the underlay NIC (None: the kernel routes VXLAN packets).
    """

    ipam: IpamConfig
    segment_ids: SegmentIdRange = field(default_factory=SegmentIdRange)
    vxlan_local: IPv4Address | None = None
    vxlan_underlay: str | None = None

    @classmethod
    def parse(
        cls,
        node_cidr: str = DEFAULT_NODE_CIDR,
        *,
        cluster_cidr: str | None = None,
        segment_ids: str | None = None,
        vxlan_local: str | None = None,
        vxlan_underlay: str | None = None,
    ) -> NetworkConfig:
        """From flag strings; ValueError names the bad one."""
        local = None
        if vxlan_local is not None:
            try:
                local = IPv4Address(vxlan_local)
            except ValueError:
                raise ValueError(
                    f"--vxlan-local {vxlan_local!r} is not an IPv4 address of this host"
                ) from None
        ids = SegmentIdRange.parse(segment_ids) if segment_ids else SegmentIdRange()
        return cls(IpamConfig.parse(node_cidr, cluster_cidr), ids, local, vxlan_underlay)


@dataclass(frozen=True, slots=True)
class NetAttachment:
    """A sandbox's place on the network, as containers and policy see it."""

    sandbox_id: str
    namespace: str
    ip: IPv4Address
    prefixlen: int
    gateway: IPv4Address
    segment_id: int

    @property
    def netns(self) -> str:
        return netns_name(self.sandbox_id)

    @property
    def host_ifname(self) -> str:
        return host_ifname(self.sandbox_id)

    def to_json(self) -> dict[str, object]:
        return {
            "namespace": self.namespace,
            "ip": str(self.ip),
            "prefixlen": self.prefixlen,
            "gateway": str(self.gateway),
            "segment_id": self.segment_id,
            "netns": self.netns,
            "host_ifname": self.host_ifname,
        }


class SandboxNetwork:
    """`store` keeps this node's IPAM record; `segment_store` (default: `store`) the
    namespace records with their segment ids, which must be the same on every host:
    in a cluster, Consul. Ids learnt from it are cached in `store`, so a node whose
    Consul is down still starts containers in namespaces it has seen."""

    def __init__(
        self,
        store: Store,
        *,
        node: str,
        config: NetworkConfig,
        segment_store: Store | None = None,
    ) -> None:
        self.netlink = NetlinkHelper()
        self.segment_store = segment_store or store
        self.store = store
        self.node = node
        self.config = config
        self.ipam = IpamStore(store, node, config.ipam)
        self._segments: dict[str, Segment] = {}  # namespace -> its segment, ensured
        self._segment_locks: dict[str, asyncio.Lock] = {}
        self._attached: dict[str, NetAttachment] = {}
        self._peers: set[IPv4Address] = set()

    async def start(self) -> None:
        """Read this node's IPAM record (IpamError if it was made for another CIDR)."""
        state = await self.ipam.load()
        for lease in state.leases():
            segment_id = await self._segment_id(lease.namespace)
            self._attached[lease.owner] = _attachment(lease, segment_id)

    # -- queries ----------------------------------------------------------------

    def attachment(self, sandbox_id: str) -> NetAttachment | None:
        return self._attached.get(sandbox_id)

    def attachments(self) -> list[NetAttachment]:
        return list(self._attached.values())

    def describe(self) -> str:
        mode = f"vxlan from {self.config.vxlan_local}" if self.config.vxlan_local else "bridge"
        return f"netns per container, {mode}, node CIDR {self.config.ipam.node_cidr}"

    # -- lifecycle ----------------------------------------------------------------

    async def attach(self, sandbox_id: str, namespace: str) -> NetAttachment:
        """Give sandbox `sandbox_id` of `namespace` its netns, veth, address and routes.

        Idempotent (a retry after a failure converges). On failure the caller
        must `detach()`, which removes whatever was made.
        """
        lease = await self.ipam.allocate(sandbox_id, namespace)  # persisted first
        segment = await self._segment(namespace, lease.gateway)
        attachment = _attachment(lease, segment.segment_id)
        self._attached[sandbox_id] = attachment
        spec = {
            "container_id": sandbox_id,
            "address": str(lease.address),
            "gateway": str(lease.gateway),
            "bridge": segment.bridge,
            "mtu": self._mtu,
            "host_route": True,
        }
        try:
            await self.netlink.call({"op": "ensure_net", "spec": spec})
        except NetlinkHelperError:
            self._segments.pop(namespace, None)  # e.g. its bridge was deleted: ensure it anew
            raise
        return attachment

    async def detach(self, sandbox_id: str) -> None:
        """Remove the sandbox's network, then its lease (kernel objects first: see above)."""
        await self.netlink.call({"op": "remove_net", "id": sandbox_id})
        await self.ipam.release(sandbox_id)
        self._attached.pop(sandbox_id, None)

    def open_netns(self, sandbox_id: str) -> int:
        """An fd of the sandbox's netns, for a worker to setns() into (caller closes it)."""
        return os.open(NETNS_DIR / netns_name(sandbox_id), os.O_RDONLY | os.O_CLOEXEC)

    async def recover(self, live: Collection[str]) -> list[str]:
        """Remove the networks of sandboxes that hold a lease here but are not `live`.

        `live`: containers still running (adopted) and nothing else: at
        start-up no idle pooled sandbox exists yet. Returns the ids removed.
        """
        state = await self.ipam.load()
        ours = {lease.owner for lease in state.leases()}
        orphans = sorted(ours - set(live))
        for sandbox_id in orphans:
            log.info("removing the network of orphaned sandbox %s", sandbox_id)
            await self.detach(sandbox_id)
        strangers = set(list_container_netns()) - ours
        if strangers:
            log.debug("netns of other owners left alone: %s", sorted(strangers))
        await self.prune()
        return orphans

    async def prune(self) -> list[str]:
        """Remove the segments (and gateways) of namespaces with no sandbox left here."""
        state = await self.ipam.load()
        busy = {lease.namespace for lease in state.leases()}
        removed = []
        for namespace in sorted(set(state.gateways()) - busy):
            segment_id = await self._segment_id(namespace)
            await self._segment_call("remove", self._make_segment(segment_id, None))
            await self.ipam.release_gateway(namespace)
            self._segments.pop(namespace, None)
            removed.append(namespace)
        return removed

    async def set_peers(self, peers: Iterable[IPv4Address]) -> None:
        """The other hosts' underlay addresses: every segment floods to them."""
        self._peers = {IPv4Address(p) for p in peers}
        for segment in list(self._segments.values()):
            await self._segment_call("set_peers", segment)

    async def close(self) -> None:
        """After the pools let their idle sandboxes go: drop the segments nobody uses."""
        try:
            await self.prune()
        finally:
            self.netlink.close()

    # -- internals ------------------------------------------------------------

    async def _segment_id(self, namespace: str) -> int:
        if self.segment_store is self.store:
            return await namespace_segment_id(self.store, namespace, self.config.segment_ids)
        try:
            segment_id = await namespace_segment_id(
                self.segment_store, namespace, self.config.segment_ids
            )
        except StoreError as exc:
            cached = await self.store.get(keys.namespace(namespace))
            value = cached.json() if cached is not None else None
            if isinstance(value, dict) and isinstance(value.get("segment_id"), int):
                log.warning("segment id of %s from the local cache: %s", namespace, exc)
                return int(value["segment_id"])
            raise
        await self.store.put_json(keys.namespace(namespace), {"segment_id": segment_id})
        return segment_id

    async def _segment_call(self, action: str, segment: Segment) -> None:
        description = {
            "kind": segment.kind,
            "id": segment.segment_id,
            "gateway": str(segment.gateway) if segment.gateway else None,
            "local": str(self.config.vxlan_local) if self.config.vxlan_local else None,
            "underlay": self.config.vxlan_underlay,
        }
        peers = sorted(str(p) for p in self._peers)
        await self.netlink.call(
            {"op": "segment", "action": action, "segment": description, "peers": peers}
        )

    @property
    def _mtu(self) -> int | None:
        return 1450 if self.config.vxlan_local is not None else None

    def _make_segment(self, segment_id: int, gateway: IPv4Address | None) -> Segment:
        if self.config.vxlan_local is None:
            return BridgeSegment(segment_id, gateway=gateway)
        return VxlanSegment(
            segment_id,
            local=self.config.vxlan_local,
            underlay=self.config.vxlan_underlay,
            gateway=gateway,
        )

    async def _segment(self, namespace: str, gateway: IPv4Address) -> Segment:
        segment = self._segments.get(namespace)
        if segment is not None:
            return segment
        lock = self._segment_locks.setdefault(namespace, asyncio.Lock())
        async with lock:
            segment = self._segments.get(namespace)
            if segment is None:
                segment_id = await self._segment_id(namespace)
                segment = self._make_segment(segment_id, gateway)
                await self._segment_call("ensure", segment)
                if self._peers:
                    await self._segment_call("set_peers", segment)
                self._segments[namespace] = segment
                log.info("namespace %s: segment %s up", namespace, segment.where)
        return segment


def _attachment(lease: Lease, segment_id: int) -> NetAttachment:
    return NetAttachment(
        sandbox_id=lease.owner,
        namespace=lease.namespace,
        ip=lease.address.ip,
        prefixlen=lease.address.network.prefixlen,
        gateway=lease.gateway,
        segment_id=segment_id,
    )


async def detach_quietly(network: SandboxNetwork, sandbox_id: str) -> None:
    """`detach`, logging a failure: the next start's recovery removes what is left."""
    try:
        await network.detach(sandbox_id)
    except Exception as exc:
        log.warning("cannot remove sandbox %s's network (recovery will): %s", sandbox_id, exc)


def publish_port(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) in this process's (the host's) netns.

    A sandboxed worker serves a published port from this socket: sockets keep
    the netns they were made in, so the worker stays in its own for
    everything else it does.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
