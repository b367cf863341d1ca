"""Namespace segments: one L2 segment per Nova namespace, on every host it runs on.

On each host a segment is a bridge `nvb<segment-id>`; the containers' host
ends (`nvh<id>`, see netns.py) are its ports, and its uplink extends it to
the other hosts:

- `VxlanSegment` (the default): a VXLAN device `nvx<vni>` with VNI = segment
  id, a port of the bridge. Head-end replication without multicast: one FDB
  entry `00:00:00:00:00:00 dst <peer underlay IP>` per other node carrying
  the segment (from the node inventory), so broadcast and unknown unicast go
  to each of them; the bridge and the VXLAN device learn the rest.
- `BridgeSegment`: the bridge alone, for an agent on one host.
- `VlanSegment`: for bare-metal 802.1Q trunks, a VLAN sub-interface
  `nvv<vid>` of the uplink NIC (VID = segment id) as the bridge's port, so the
  switch carries the segment. Needs the kernel's 8021q; no bridge VLAN
  filtering is needed. On a kernel without it every operation raises
  `VlanUnsupported` saying so (`vlan_support()` tells beforehand).

Frames never cross between two bridges: containers of different namespaces
cannot exchange a frame; anything between them must be routed by the host
(and allowed by policy). The bridge may carry the namespace's gateway
address on this node (a /32: the host routes each local container with a
/32 of its own, netns.py).
"""

from __future__ import annotations

import abc
import asyncio
import errno
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Any, ClassVar

from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from agent.isolation.netns import (
    NetworkSetupError,
    get_link,
    ignore_exists,
    ignore_gone,
    link_index,
    link_kind,
    rtnl,
    set_ipv4_addresses,
    step,
)
from nova.doctor import kernel_feature

log = logging.getLogger("nova.agent.isolation.segments")

BRIDGE_PREFIX = "nvb"
VXLAN_PREFIX = "nvx"
VLAN_PREFIX = "nvv"
MAX_VNI = (1 << 24) - 1
MAX_VID = 4094
VXLAN_PORT = 4789  # IANA; the kernel's own default is 8472
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
FLOOD_MAC = "00:00:00:00:00:00"
_NUD_PERMANENT = 0x80
_NTF_SELF = 0x02
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT})


def bridge_name(segment_id: int) -> str:
    return f"{BRIDGE_PREFIX}{segment_id}"


def vxlan_name(vni: int) -> str:
    return f"{VXLAN_PREFIX}{vni}"


def vlan_name(vid: int) -> str:
    return f"{VLAN_PREFIX}{vid}"


class VlanUnsupported(NetworkSetupError):
    """The kernel lacks 8021q: the 802.1Q uplink mode cannot work on this host."""


@dataclass(frozen=True, slots=True)
class Support:
    """Whether a kernel feature is usable (None: cannot tell before trying) and why."""

    available: bool | None
    how: str


@functools.cache
def vlan_support() -> Support:
    """Whether this kernel has 802.1Q VLAN devices (8021q), from its config and modules."""
    feature = kernel_feature("VLAN_8021Q", "8021q")
    return Support(feature.available, feature.how)


def _lacks_8021q(where: str, detail: str) -> VlanUnsupported:
    return VlanUnsupported(
        "802.1Q uplink",
        where,
        f"this kernel lacks 8021q ({detail}): use VXLAN segments on this host",
    )


@dataclass(frozen=True, slots=True)
class SegmentLinks:
    """A segment as the kernel shows it on this host after `ensure()`."""

    segment_id: int
    bridge: str
    bridge_index: int
    uplink: str | None
    mtu: int  # give the containers' veths this MTU


class Segment(abc.ABC):
    """One Nova namespace's L2 segment on this host. Contracts, for every mode:

    `ensure()`   makes (or adopts: same names, same settings) the bridge and its
                 uplink, up, the gateway address (if any) alone on the bridge;
                 recreates an uplink whose settings differ; reads the kernel
                 back and returns what it shows. Idempotent.
    `remove()`   deletes the uplink and the bridge; absent ones are fine. The
                 containers' veths, if still there, just lose their master.
    `set_peers()` makes the set of other hosts that receive the segment's
                 flooded frames exactly `peers` (no-op where the fabric
                 floods, as on a VLAN trunk). Idempotent.

    `netns` is where the host's links live (None: this process's netns).
    Names are derived from the segment id, so two segments never share a
    link and a restarted agent finds its own.
    """

    kind: ClassVar[str]

    def __init__(
        self,
        segment_id: int,
        *,
        gateway: IPv4Address | None = None,
        netns: str | None = None,
    ) -> None:
        self.segment_id = segment_id
        self.gateway = gateway
        self.netns = netns

    @property
    def bridge(self) -> str:
        return bridge_name(self.segment_id)

    @property
    def where(self) -> str:
        return f"{self.netns or 'host'}/{self.bridge}"

    @abc.abstractmethod
    async def ensure(self) -> SegmentLinks: ...

    @abc.abstractmethod
    async def remove(self) -> bool: ...

    @abc.abstractmethod
    async def set_peers(self, peers: Iterable[IPv4Address]) -> None: ...

    async def _ensure_bridge(self, ipr: Any) -> int:
        index = await link_index(ipr, self.bridge)
        if index is not None and link_kind(await get_link(ipr, index)) != "bridge":
            raise NetworkSetupError("create bridge", self.where, "a non-bridge link has that name")
        if index is None:
            await step(
                "create bridge", self.where, ipr.link("add", ifname=self.bridge, kind="bridge")
            )
            index = await link_index(ipr, self.bridge)
            if index is None:
                raise NetworkSetupError("create bridge", self.where, "the kernel does not show it")
            log.debug("bridge %s created", self.where)
        wanted = set() if self.gateway is None else {IPv4Interface((self.gateway, 32))}
        await step("gateway address", self.where, set_ipv4_addresses(ipr, index, wanted))
        await step("bridge up", self.where, ipr.link("set", index=index, state="up"))
        return index

    async def _remove_links(self, *links: tuple[str, str]) -> bool:
        """Delete each (name, kind) present; a link of another kind is never Nova's: kept."""
        removed = False
        try:
            async with rtnl(self.netns) as ipr:
                for name, kind in links:
                    index = await link_index(ipr, name)
                    if index is None:
                        continue
                    if link_kind(await get_link(ipr, index)) != kind:
                        log.warning("%s/%s is not a %s: left alone", self.netns, name, kind)
                        continue
                    removed |= await ignore_gone(ipr.link("del", index=index))
        except FileNotFoundError:  # the netns is gone, and its links with it
            return False
        return removed

    async def _links(self, ipr: Any, bridge_index: int, uplink: str | None) -> SegmentLinks:
        bridge = await get_link(ipr, bridge_index)
        if not bridge["flags"] & 1:
            raise NetworkSetupError("verify", self.where, "the bridge is not up")
        mtu = int(bridge.get("mtu"))
        if uplink is not None:
            index = await link_index(ipr, uplink)
            link = None if index is None else await get_link(ipr, index)
            if link is None or link.get("master") != bridge_index or not link["flags"] & 1:
                raise NetworkSetupError("verify", self.where, f"{uplink} is not an up port")
            mtu = int(link.get("mtu"))
        return SegmentLinks(self.segment_id, self.bridge, bridge_index, uplink, mtu)


class BridgeSegment(Segment):
    """The segment on one host only: the bridge, no uplink (a single-host agent).

    Same names as the other modes, so an agent that later gets an underlay
    (`--vxlan-local`) adds the uplink to the bridge its containers are on.
    """

    kind = "bridge"

    async def ensure(self) -> SegmentLinks:
        async with rtnl(self.netns) as ipr:
            bridge = await self._ensure_bridge(ipr)
            return await self._links(ipr, bridge, None)

    async def remove(self) -> bool:
        return await self._remove_links((self.bridge, "bridge"))

    async def set_peers(self, peers: Iterable[IPv4Address]) -> None:
        """No other host carries a local-only segment."""


class VxlanSegment(Segment):
    """The segment over VXLAN (VNI = segment id), head-end replicated to `set_peers()`.

    `local` is this host's underlay address (the VXLAN source), `underlay` the
    underlay NIC (its MTU less 50 is the segment's MTU; None: routed by the
    kernel, MTU 1450).
    """

    kind = "vxlan"

    def __init__(
        self,
        segment_id: int,
        *,
        local: IPv4Address,
        underlay: str | None = None,
        port: int = VXLAN_PORT,
        gateway: IPv4Address | None = None,
        netns: str | None = None,
    ) -> None:
        if not 1 <= segment_id <= MAX_VNI:
            raise ValueError(f"VXLAN segment id {segment_id} is outside 1..{MAX_VNI}")
        super().__init__(segment_id, gateway=gateway, netns=netns)
        self.local = local
        self.underlay = underlay
        self.port = port

    @property
    def vxlan(self) -> str:
        return vxlan_name(self.segment_id)

    async def ensure(self) -> SegmentLinks:
        async with rtnl(self.netns) as ipr:
            bridge = await self._ensure_bridge(ipr)
            underlay = None
            if self.underlay is not None:
                underlay = await link_index(ipr, self.underlay)
                if underlay is None:
                    raise NetworkSetupError(
                        "create vxlan", self.where, f"no underlay {self.underlay}"
                    )
            index = await link_index(ipr, self.vxlan)
            if index is not None and not self._matches(await get_link(ipr, index), underlay):
                log.info("vxlan %s has other settings: recreating it", self.vxlan)
                await ignore_gone(ipr.link("del", index=index))
                index = None
            if index is None:
                spec: dict[str, Any] = {
                    "ifname": self.vxlan,
                    "kind": "vxlan",
                    "vxlan_id": self.segment_id,
                    "vxlan_local": str(self.local),
                    "vxlan_port": self.port,
                    "vxlan_learning": 1,
                }
                if underlay is not None:
                    spec["vxlan_link"] = underlay
                else:
                    spec["mtu"] = 1500 - VXLAN_OVERHEAD
                await step("create vxlan", self.where, ipr.link("add", **spec))
                index = await link_index(ipr, self.vxlan)
                if index is None:
                    raise NetworkSetupError(
                        "create vxlan", self.where, "the kernel does not show it"
                    )
                log.debug("vxlan %s (vni %d) created", self.vxlan, self.segment_id)
            await step(
                "vxlan up", self.where, ipr.link("set", index=index, master=bridge, state="up")
            )
            return await self._links(ipr, bridge, self.vxlan)

    def _matches(self, link: Any, underlay: int | None) -> bool:
        data = link.get(("linkinfo", "data"))
        if link_kind(link) != "vxlan" or data is None:
            return False
        return bool(
            data.get("vxlan_id") == self.segment_id
            and data.get("vxlan_local") == str(self.local)
            and data.get("vxlan_port") == self.port
            and (data.get("vxlan_link") or None) == underlay
        )

    async def remove(self) -> bool:
        return await self._remove_links((self.vxlan, "vxlan"), (self.bridge, "bridge"))

    async def peers(self) -> set[IPv4Address]:
        """The underlay addresses flooded frames go to (the all-zero FDB entries)."""
        async with rtnl(self.netns) as ipr:
            index = await link_index(ipr, self.vxlan)
            if index is None:
                return set()
            return await self._flood_list(ipr, index)

    async def _flood_list(self, ipr: Any, index: int) -> set[IPv4Address]:
        found = set()
        async for entry in await ipr.fdb("dump", ifindex=index):
            if entry.get("lladdr") == FLOOD_MAC and entry.get("dst"):
                found.add(IPv4Address(entry.get("dst")))
        return found

    async def set_peers(self, peers: Iterable[IPv4Address]) -> None:
        wanted = {IPv4Address(peer) for peer in peers} - {self.local}
        async with rtnl(self.netns) as ipr:
            index = await link_index(ipr, self.vxlan)
            if index is None:
                raise NetworkSetupError("set peers", self.where, f"{self.vxlan} does not exist")
            have = await self._flood_list(ipr, index)
            for gone in have - wanted:
                await step("del peer", self.where, ignore_gone(self._fdb(ipr, "del", index, gone)))
            for new in wanted - have:
                await step(
                    "add peer", self.where, ignore_exists(self._fdb(ipr, "append", index, new))
                )
            shown = await self._flood_list(ipr, index)
            if shown != wanted:
                raise NetworkSetupError(
                    "verify peers", self.where, f"FDB floods to {sorted(map(str, shown))}"
                )
            log.debug("vxlan %s floods to %s", self.vxlan, sorted(map(str, wanted)))

    def _fdb(self, ipr: Any, command: str, index: int, dst: IPv4Address) -> Any:
        return ipr.fdb(
            command,
            ifindex=index,
            lladdr=FLOOD_MAC,
            dst=str(dst),
            state=_NUD_PERMANENT,
            flags=_NTF_SELF,
        )


class VlanSegment(Segment):
    """The segment on an 802.1Q trunk: `uplink`.<segment id> as the bridge's port.

    Every operation first checks `vlan_support()` and raises VlanUnsupported
    ("this kernel lacks 8021q") where the kernel has no 8021q.
    """

    kind = "vlan"

    def __init__(
        self,
        segment_id: int,
        *,
        uplink: str,
        gateway: IPv4Address | None = None,
        netns: str | None = None,
    ) -> None:
        if not 2 <= segment_id <= MAX_VID:
            raise ValueError(
                f"VLAN segment id {segment_id} is outside 2..{MAX_VID} (1 is the default VLAN)"
            )
        super().__init__(segment_id, gateway=gateway, netns=netns)
        self.uplink = uplink

    @property
    def vlan(self) -> str:
        return vlan_name(self.segment_id)

    async def _require_8021q(self) -> None:
        support = await asyncio.to_thread(vlan_support)
        if support.available is False:
            raise _lacks_8021q(self.where, support.how)

    async def ensure(self) -> SegmentLinks:
        await self._require_8021q()
        async with rtnl(self.netns) as ipr:
            bridge = await self._ensure_bridge(ipr)
            uplink = await link_index(ipr, self.uplink)
            if uplink is None:
                raise NetworkSetupError("create vlan", self.where, f"no uplink {self.uplink}")
            index = await link_index(ipr, self.vlan)
            if index is not None:
                link = await get_link(ipr, index)
                data = link.get(("linkinfo", "data"))
                vid = None if data is None else data.get("vlan_id")
                if (
                    link_kind(link) != "vlan"
                    or link.get("link") != uplink
                    or vid != self.segment_id
                ):
                    await ignore_gone(ipr.link("del", index=index))
                    index = None
            if index is None:
                try:
                    await ipr.link(
                        "add", ifname=self.vlan, kind="vlan", link=uplink, vlan_id=self.segment_id
                    )
                except NetlinkError as exc:
                    if exc.code in _UNSUPPORTED:
                        raise _lacks_8021q(self.where, f"the kernel refused: {exc}") from exc
                    raise NetworkSetupError("create vlan", self.where, str(exc)) from exc
                index = await link_index(ipr, self.vlan)
                if index is None:
                    raise NetworkSetupError(
                        "create vlan", self.where, "the kernel does not show it"
                    )
            await step(
                "vlan up", self.where, ipr.link("set", index=index, master=bridge, state="up")
            )
            return await self._links(ipr, bridge, self.vlan)

    async def remove(self) -> bool:
        await self._require_8021q()
        return await self._remove_links((self.vlan, "vlan"), (self.bridge, "bridge"))

    async def set_peers(self, peers: Iterable[IPv4Address]) -> None:
        """Nothing to do: the switch floods the VLAN to every trunk port."""
        await self._require_8021q()
