"""Per-container network namespaces: a netns and a veth pair into the host.

For container `<id>` (at most 12 characters, as the agent's ids are):

    netns      nova-ctr-<id>         (a bind mount under /var/run/netns, as `ip netns`)
    host end   nvh<id>               in the host's netns, a port of the segment bridge
    inside     eth0                  <address>, default route via <gateway>; lo up

The pair is created in one request with its peer already inside the container
netns, named eth0, so there is never a half-made pair in the host. Every verb
is idempotent: `ensure_*` converges whatever it finds (nothing, a partial
earlier attempt, a sandbox being re-labelled with a new address) to the spec
and reads the kernel back to verify; `remove_*` treats "already gone"
(ENOENT, ENODEV, ESRCH) as success.

Netlink sockets inside a netns come from pyroute2 (`AsyncIPRoute(netns=…)`),
which opens them in a short-lived child process: the calling process never
calls setns(). All rtnetlink traffic goes through `rtnl()`, so another source
of netns sockets (e.g. the zygote) would be a change in one place.

Everything here names only objects it made (by the prefixes above) and never
touches another link, address or route.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute  # type: ignore[import-untyped]
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from nova.errors import NovaError

log = logging.getLogger("nova.agent.isolation.netns")

NETNS_DIR = Path("/var/run/netns")
NETNS_PREFIX = "nova-ctr-"
HOST_IF_PREFIX = "nvh"
CONTAINER_IFNAME = "eth0"
MAX_ID_LENGTH = 12
"""`nvh` + 12 characters is IFNAMSIZ-1 (15), the longest interface name."""
ROUTE_PROTO = 0x4E
"""rtm_protocol of the host routes Nova adds ('N'), so orphans can be found by it."""
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,11}")
_SCOPE_ANY = 255  # RT_SCOPE_NOWHERE: a route delete that matches any scope
_GONE = frozenset({errno.ENOENT, errno.ENODEV, errno.ESRCH, errno.EADDRNOTAVAIL})


class NetworkSetupError(NovaError):
    """The kernel refused or did not show a network change.

    `what` is the step, `where` the netns/link, `reason` the kernel's answer.
    """

    def __init__(self, what: str, where: str, reason: str) -> None:
        super().__init__(f"network setup failed: {what} on {where}: {reason}")
        self.what = what
        self.where = where
        self.reason = reason


# -- names -------------------------------------------------------------------


def check_id(container_id: str) -> str:
    """`container_id` if it is usable in interface names, else ValueError saying why."""
    if not isinstance(container_id, str) or not _ID.fullmatch(container_id):
        raise ValueError(
            f"container id {container_id!r} cannot name a network namespace: use 1 to "
            f"{MAX_ID_LENGTH} lowercase letters, digits or '-', starting with a letter or digit"
        )
    return container_id


def netns_name(container_id: str) -> str:
    return NETNS_PREFIX + check_id(container_id)


def host_ifname(container_id: str) -> str:
    return HOST_IF_PREFIX + check_id(container_id)


def list_container_netns() -> list[str]:
    """Container ids that have a Nova netns on this host (for recovery), sorted."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    found = (name[len(NETNS_PREFIX) :] for name in names if name.startswith(NETNS_PREFIX))
    return sorted(cid for cid in found if _ID.fullmatch(cid))


# -- rtnetlink access --------------------------------------------------------


@contextlib.asynccontextmanager
async def rtnl(netns: str | None = None, *, create: bool = False) -> AsyncIterator[Any]:
    """An AsyncIPRoute in `netns` (None: this process's own netns).

    With `create` a missing netns is made; otherwise a missing one raises
    FileNotFoundError. The socket is made in a child process (pyroute2).
    """
    if netns is None:
        ipr = AsyncIPRoute()
    else:
        ipr = AsyncIPRoute(netns=netns, flags=os.O_CREAT if create else 0)
    try:
        await ipr.setup_endpoint()  # opens the socket now: the netns exists (or raised)
        yield ipr
    finally:
        ipr.close()


async def ignore_gone(coro: Any) -> bool:
    """Await `coro`; True if it did something, False if its object was already gone."""
    try:
        await coro
    except NetlinkError as exc:
        if exc.code in _GONE:
            return False
        raise
    return True


async def ignore_exists(coro: Any) -> bool:
    """Await `coro`; True if it created something, False on EEXIST."""
    try:
        await coro
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            return False
        raise
    return True


async def link_index(ipr: Any, ifname: str) -> int | None:
    found = await ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


async def get_link(ipr: Any, index: int) -> Any:
    (link,) = await ipr.link("get", index=index)
    return link


def link_kind(link: Any) -> str | None:
    kind = link.get(("linkinfo", "kind"))
    return None if kind is None else str(kind)


async def ipv4_addresses(ipr: Any, index: int) -> set[IPv4Interface]:
    return {
        IPv4Interface((msg.get("address"), msg["prefixlen"]))
        async for msg in await ipr.addr("dump", index=index, family=2)
    }


async def set_ipv4_addresses(ipr: Any, index: int, wanted: set[IPv4Interface]) -> None:
    """Make `wanted` the link's IPv4 addresses: add the missing, delete the others."""
    have = await ipv4_addresses(ipr, index)
    for extra in have - wanted:
        await ignore_gone(
            ipr.addr("del", index=index, address=str(extra.ip), prefixlen=extra.network.prefixlen)
        )
    for missing in wanted - have:
        await ignore_exists(
            ipr.addr(
                "add", index=index, address=str(missing.ip), prefixlen=missing.network.prefixlen
            )
        )


# -- netns -------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


async def ensure_netns(name: str) -> bool:
    """Make netns `name` if absent (loopback up); True if it was made now."""
    existed = netns_exists(name)
    async with rtnl(name, create=True) as ipr:
        await ipr.link("set", index=await link_index(ipr, "lo"), state="up")
    if not existed:
        log.debug("netns %s created", name)
    return not existed


def remove_netns(name: str) -> bool:
    """Unmount and delete netns `name`; True if it existed.

    The namespace itself (with its links) dies once no process is left in it.
    """
    try:
        pyroute2_netns.remove(name)
    except FileNotFoundError:
        return False
    log.debug("netns %s removed", name)
    return True


# -- container network -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerNetSpec:
    """What a container's network must look like.

    `address` None: eth0 is up with no IPv4 address (a pooled sandbox not yet
    labelled). `gateway` must be on-link for `address`. `bridge` is the host
    bridge the host end joins (its segment's). `mtu` applies to both ends
    (the segment's MTU, smaller than 1500 over VXLAN). `host_netns` is where
    the host end lives (None: this process's netns; tests use simulated
    hosts). `host_route` adds `<address>/32 dev <bridge> proto 78` there, so
    the host (the gateway) can answer the container.
    """

    container_id: str
    address: IPv4Interface | None = None
    gateway: IPv4Address | None = None
    bridge: str | None = None
    mtu: int | None = None
    host_netns: str | None = None
    host_route: bool = False

    def __post_init__(self) -> None:
        check_id(self.container_id)
        if self.gateway is not None:
            if self.address is None:
                raise ValueError("a gateway needs an address")
            if self.gateway not in self.address.network or self.gateway == self.address.ip:
                raise ValueError(
                    f"gateway {self.gateway} is not another address of {self.address.network}"
                )
        if self.host_route and (self.bridge is None or self.address is None):
            raise ValueError("host_route needs a bridge and an address")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise ValueError(f"mtu {self.mtu} is out of range (68..65535)")

    @property
    def netns(self) -> str:
        return netns_name(self.container_id)

    @property
    def host_ifname(self) -> str:
        return host_ifname(self.container_id)


@dataclass(frozen=True, slots=True)
class ContainerNet:
    """A container's network as the kernel shows it after `ensure_container_net`."""

    container_id: str
    netns: str
    host_ifname: str
    host_index: int
    mac: str  # eth0's
    address: IPv4Interface | None
    gateway: IPv4Address | None
    mtu: int


async def ensure_container_net(spec: ContainerNetSpec) -> ContainerNet:
    """Converge the container's netns, veth pair, address and routes to `spec`.

    Idempotent; safe after a crash at any step and for re-labelling a pooled
    sandbox (other addresses on eth0 are removed, the default route replaced).
    Raises NetworkSetupError naming the step, or FileNotFoundError if
    `spec.host_netns` does not exist.
    """
    ns = spec.netns
    async with rtnl(spec.host_netns) as host, rtnl(ns, create=True) as inner:
        await step(
            "loopback up", ns, inner.link("set", index=await link_index(inner, "lo"), state="up")
        )
        host_index = await _ensure_pair(spec, host, inner)
        bridge_index = None
        if spec.bridge is not None:
            bridge_index = await link_index(host, spec.bridge)
            if bridge_index is None:
                raise NetworkSetupError(
                    "join bridge", spec.host_ifname, f"bridge {spec.bridge} does not exist"
                )
        await step(
            "host end up",
            spec.host_ifname,
            host.link(
                "set",
                index=host_index,
                state="up",
                master=bridge_index or 0,
                **({"mtu": spec.mtu} if spec.mtu else {}),
            ),
        )
        eth0 = await link_index(inner, CONTAINER_IFNAME)
        assert eth0 is not None  # _ensure_pair made it
        where = f"{ns}/{CONTAINER_IFNAME}"
        await step(
            "eth0 up",
            where,
            inner.link("set", index=eth0, state="up", **({"mtu": spec.mtu} if spec.mtu else {})),
        )
        wanted = set() if spec.address is None else {spec.address}
        previous = await ipv4_addresses(inner, eth0)
        await step("eth0 address", where, set_ipv4_addresses(inner, eth0, wanted))
        await step("default route", where, _ensure_default_route(inner, eth0, spec.gateway))
        host_where = f"{spec.host_netns or 'host'}/{spec.bridge}"
        for old in previous - wanted:  # re-labelled: the old address's host route goes too
            await step("host route", host_where, _del_host_route(host, old.ip))
        if spec.host_route:
            assert spec.address is not None and bridge_index is not None
            await step(
                "host route",
                host_where,
                host.route(
                    "replace",
                    dst=str(spec.address.ip),
                    dst_len=32,
                    oif=bridge_index,
                    scope=253,  # link
                    proto=ROUTE_PROTO,
                ),
            )
        else:
            for address in wanted:
                await step("host route", host_where, _del_host_route(host, address.ip))
        return await _verify(
            spec,
            host=host,
            inner=inner,
            host_index=host_index,
            eth0=eth0,
            bridge_index=bridge_index,
        )


async def remove_container_net(container_id: str, *, host_netns: str | None = None) -> bool:
    """Remove the container's host route, veth pair and netns; True if anything was there.

    The host route is found through the address eth0 still has. Missing
    pieces are fine, and so is a missing `host_netns`.
    """
    removed = False
    ns = netns_name(container_id)
    addresses: set[IPv4Interface] = set()
    if netns_exists(ns):
        with contextlib.suppress(FileNotFoundError):
            async with rtnl(ns) as inner:
                eth0 = await link_index(inner, CONTAINER_IFNAME)
                if eth0 is not None:
                    addresses = await ipv4_addresses(inner, eth0)
    hname = host_ifname(container_id)
    with contextlib.suppress(FileNotFoundError):
        async with rtnl(host_netns) as host:
            for address in addresses:
                removed |= await _del_host_route(host, address.ip)
            index = await link_index(host, hname)
            if index is not None and link_kind(await get_link(host, index)) == "veth":
                removed |= await ignore_gone(host.link("del", index=index))
    removed |= remove_netns(ns)
    return removed


# -- internals ---------------------------------------------------------------


async def step(what: str, where: str, coro: Any) -> Any:
    """Await `coro`; a NetlinkError becomes NetworkSetupError naming `what` and `where`."""
    try:
        return await coro
    except NetlinkError as exc:
        raise NetworkSetupError(what, where, f"{exc.code} {os.strerror(exc.code)}") from exc


async def _ensure_pair(spec: ContainerNetSpec, host: Any, inner: Any) -> int:
    """The host end's ifindex, after making the pair if it is not whole."""
    hname = spec.host_ifname
    host_index = await link_index(host, hname)
    eth0 = await link_index(inner, CONTAINER_IFNAME)
    if host_index is not None and eth0 is not None:
        host_link = await get_link(host, host_index)
        inner_link = await get_link(inner, eth0)
        if (
            link_kind(host_link) == "veth"
            and link_kind(inner_link) == "veth"
            and inner_link.get("link") == host_index
            and host_link.get("link") == eth0
        ):
            return host_index
    # Not a whole pair of ours: clear what is there (a veth dies with its peer).
    if host_index is not None:
        if link_kind(await get_link(host, host_index)) != "veth":
            raise NetworkSetupError("create veth", hname, "a non-veth link has that name")
        await ignore_gone(host.link("del", index=host_index))
    if eth0 is not None:
        await ignore_gone(inner.link("del", index=eth0))
    fd = os.open(NETNS_DIR / spec.netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await step(
            "create veth",
            hname,
            host.link(
                "add",
                ifname=hname,
                kind="veth",
                peer={"ifname": CONTAINER_IFNAME, "net_ns_fd": fd},
            ),
        )
    finally:
        os.close(fd)
    index = await link_index(host, hname)
    if index is None:
        raise NetworkSetupError("create veth", hname, "the kernel does not show it")
    log.debug("veth %s <-> %s/%s created", hname, spec.netns, CONTAINER_IFNAME)
    return index


async def _del_host_route(host: Any, address: IPv4Address) -> bool:
    """Delete Nova's host route to `address` (only one with Nova's protocol)."""
    return await ignore_gone(
        host.route("del", dst=str(address), dst_len=32, proto=ROUTE_PROTO, scope=_SCOPE_ANY)
    )


async def _ensure_default_route(ipr: Any, oif: int, gateway: IPv4Address | None) -> None:
    if gateway is None:
        await ignore_gone(ipr.route("del", dst="0.0.0.0", dst_len=0, family=2, scope=_SCOPE_ANY))
        return
    await ipr.route("replace", dst="0.0.0.0", dst_len=0, gateway=str(gateway), oif=oif)


async def _default_gateway(ipr: Any) -> IPv4Address | None:
    async for route in await ipr.route("dump", family=2, table=254):
        if route["dst_len"] == 0 and route.get("gateway"):
            return IPv4Address(route.get("gateway"))
    return None


async def _verify(
    spec: ContainerNetSpec,
    *,
    host: Any,
    inner: Any,
    host_index: int,
    eth0: int,
    bridge_index: int | None,
) -> ContainerNet:
    host_link = await get_link(host, host_index)
    inner_link = await get_link(inner, eth0)
    where = f"{spec.netns}/{CONTAINER_IFNAME}"
    problems = []
    if (host_link.get("master") or None) != bridge_index:
        problems.append(f"{spec.host_ifname} is not a port of {spec.bridge}")
    if not inner_link["flags"] & 1 or not host_link["flags"] & 1:
        problems.append("the pair is not up")
    addresses = await ipv4_addresses(inner, eth0)
    if addresses != (set() if spec.address is None else {spec.address}):
        problems.append(f"eth0 has addresses {sorted(map(str, addresses))}")
    gateway = await _default_gateway(inner)
    if gateway != spec.gateway:
        problems.append(f"default gateway is {gateway}")
    if spec.mtu and inner_link.get("mtu") != spec.mtu:
        problems.append(f"eth0 mtu is {inner_link.get('mtu')}")
    if problems:
        raise NetworkSetupError("verify", where, "; ".join(problems))
    return ContainerNet(
        container_id=spec.container_id,
        netns=spec.netns,
        host_ifname=spec.host_ifname,
        host_index=host_index,
        mac=str(inner_link.get("address")),
        address=spec.address,
        gateway=gateway,
        mtu=int(inner_link.get("mtu")),
    )


__all__ = [
    "CONTAINER_IFNAME",
    "HOST_IF_PREFIX",
    "NETNS_PREFIX",
    "ContainerNet",
    "ContainerNetSpec",
    "NetworkSetupError",
    "check_id",
    "ensure_container_net",
    "ensure_netns",
    "host_ifname",
    "list_container_netns",
    "netns_name",
    "remove_container_net",
    "remove_netns",
    "rtnl",
]
