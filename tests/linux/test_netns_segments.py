"""Container netns + namespace segments on the real kernel, proved with real packets.

Every topology lives in network namespaces this file makes (simulated hosts
`nova-host-<role>-<token>` and container netns `nova-ctr-<token>…`); the
only object in the machine's own netns is one test's `nvh<token>…` veth. The
`lab` fixture registers each netns and link before it is made, removes them
all even when the test fails, and then asserts that nothing carrying the
test's token is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

import pytest

from agent.isolation.ipam import IpamConfig, IpamState, Lease
from agent.isolation.netns import (
    ContainerNet,
    ContainerNetSpec,
    ensure_container_net,
    host_ifname,
    netns_exists,
    netns_name,
    remove_container_net,
    rtnl,
)
from agent.isolation.segments import (
    Segment,
    VlanSegment,
    VlanUnsupported,
    VxlanSegment,
    bridge_name,
    vlan_name,
    vlan_support,
    vxlan_name,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: creates netns, veth, bridge and VXLAN links"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
    pytest.mark.timeout(60),
]

PY = sys.executable
PORT = 7070
UNDERLAY_A = IPv4Interface("192.0.2.1/24")
UNDERLAY_B = IPv4Interface("192.0.2.2/24")
CLUSTER = "10.88.0.0/16"


# -- commands run inside the namespaces -------------------------------------------


@dataclass(frozen=True)
class Result:
    rc: int
    out: str


async def run(*argv: str, limit: float = 10.0) -> Result:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(errors="replace"))


def in_netns(ns: str, *argv: str) -> tuple[str, ...]:
    return ("ip", "netns", "exec", ns, *argv)


_SCAPY_PING = """
import sys
from scapy.layers.inet import ICMP, IP
from scapy.sendrecv import sr1
sys.exit(0 if sr1(IP(dst=sys.argv[1]) / ICMP(), timeout=1, verbose=0) else 1)
"""


async def pings(ns: str, ip: IPv4Address, *, tries: int = 1) -> bool:
    """An ICMP echo from netns `ns` to `ip` is answered within 1 s (in one of `tries`)."""
    if shutil.which("ping"):
        argv: tuple[str, ...] = ("ping", "-c1", "-W1", "-n", str(ip))
    else:  # iputils-ping missing: the same echo through scapy
        argv = (PY, "-c", _SCAPY_PING, str(ip))
    for _ in range(tries):
        if (await run(*in_netns(ns, *argv))).rc == 0:
            return True
    return False


async def reaches(ns: str, ip: IPv4Address) -> bool:
    """`pings` for checks that must pass: a loaded CI box gets three tries."""
    return await pings(ns, ip, tries=3)


_TCP_SERVER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
conn.sendall(b"nova\\n")
conn.close()
"""

_TCP_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5) as conn:
        sys.exit(0 if conn.recv(16) == b"nova\\n" else 2)
except OSError as exc:
    print(exc)
    sys.exit(1)
"""


async def tcp_connects(server_ns: str, server_ip: IPv4Address, client_ns: str) -> bool:
    """A TCP connection from `client_ns` to a listener in `server_ns` exchanges data."""
    server = await asyncio.create_subprocess_exec(
        *in_netns(server_ns, PY, "-c", _TCP_SERVER, str(server_ip), str(PORT)),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        assert await asyncio.wait_for(server.stdout.readline(), 10) == b"ready\n"
        client = await run(*in_netns(client_ns, PY, "-c", _TCP_CLIENT, str(server_ip), str(PORT)))
        return client.rc == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
        await server.wait()


_ARP_PROBE = """
import json, sys
from scapy.layers.l2 import ARP, Ether
from scapy.sendrecv import srp
answered, _ = srp(
    [Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=ip) for ip in sys.argv[1:]],
    iface="eth0", timeout=1, verbose=0,
)
print(json.dumps(sorted({reply[ARP].psrc for _, reply in answered})))
"""


async def arp_answers(ns: str, *targets: IPv4Address) -> set[IPv4Address]:
    """Which of `targets` answer a broadcast ARP request sent from `ns`'s eth0 (scapy)."""
    res = await run(*in_netns(ns, PY, "-c", _ARP_PROBE, *map(str, targets)))
    assert res.rc == 0, res.out
    return {IPv4Address(ip) for ip in json.loads(res.out.strip().splitlines()[-1])}


_SNIFFER = """
import json, sys
from scapy.layers.l2 import Ether  # registers Ethernet, so frames decode
from scapy.sendrecv import sniff
mac = sys.argv[1].lower()
frames = sniff(
    iface="eth0", timeout=float(sys.argv[2]),
    lfilter=lambda frame: Ether in frame and frame[Ether].src.lower() == mac,
    started_callback=lambda: print("ready", flush=True),
)
print(json.dumps(len(frames)), flush=True)
"""


@contextlib.asynccontextmanager
async def frames_from(ns: str, mac: str, window: float) -> AsyncIterator[list[int]]:
    """Counts the frames from `mac` that reach `ns`'s eth0 while the block runs."""
    proc = await asyncio.create_subprocess_exec(
        *in_netns(ns, PY, "-c", _SNIFFER, mac, str(window)), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    count: list[int] = []
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"ready\n"
        yield count
        count.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), window + 10)))
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# -- the fixture -----------------------------------------------------------------


class NetLab:
    """Registers every netns and link before it is made; `cleanup()` removes them all."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.netns: list[str] = []
        self.links: list[tuple[str | None, str]] = []  # (netns, ifname); None: the host's
        self.ipam: dict[str, IpamState] = {}

    def container_id(self, name: str) -> str:
        return f"{self.token}{name}"  # 6 hex + up to 6: fits nvh<id> in 15 characters

    async def host(self, role: str, node_cidr: str) -> str:
        """A simulated host: its own netns, with its own node CIDR for IPAM."""
        name = f"nova-host-{role}-{self.token}"
        self.netns.append(name)
        async with rtnl(name, create=True) as ipr:
            await ipr.link("set", index=(await ipr.link_lookup(ifname="lo"))[0], state="up")
        self.ipam[name] = IpamState(IpamConfig.parse(node_cidr, CLUSTER))
        return name

    async def underlay(self, host_a: str, host_b: str) -> tuple[str, str]:
        """A veth 'wire' between two hosts, 192.0.2.1/24 on A and .2/24 on B."""
        end_a, end_b = f"nvu{self.token}a", f"nvu{self.token}b"
        self.links += [(host_a, end_a), (host_b, end_b)]
        fd = os.open(f"/var/run/netns/{host_b}", os.O_RDONLY)
        try:
            async with rtnl(host_a) as ipr:
                await ipr.link(
                    "add", ifname=end_a, kind="veth", peer={"ifname": end_b, "net_ns_fd": fd}
                )
        finally:
            os.close(fd)
        for host, end, address in ((host_a, end_a, UNDERLAY_A), (host_b, end_b, UNDERLAY_B)):
            async with rtnl(host) as ipr:
                (index,) = await ipr.link_lookup(ifname=end)
                await ipr.addr("add", index=index, address=str(address.ip), prefixlen=24)
                await ipr.link("set", index=index, state="up")
        return end_a, end_b

    async def segment(self, segment: Segment) -> Segment:
        names = [bridge_name(segment.segment_id)]
        if isinstance(segment, VxlanSegment):
            names.append(vxlan_name(segment.segment_id))
        if isinstance(segment, VlanSegment):
            names.append(vlan_name(segment.segment_id))
        self.links += [(segment.netns, name) for name in names]
        await segment.ensure()
        return segment

    def lease(self, host: str, name: str, namespace: str) -> Lease:
        return self.ipam[host].allocate(self.container_id(name), namespace)

    async def container(
        self, host: str | None, name: str, segment: Segment | None, lease: Lease | None
    ) -> ContainerNet:
        cid = self.container_id(name)
        self.netns.append(netns_name(cid))
        self.links.append((host, host_ifname(cid)))
        links = None if segment is None else await segment.ensure()
        spec = ContainerNetSpec(
            cid,
            address=None if lease is None else lease.address,
            gateway=None if lease is None else lease.gateway,
            bridge=None if links is None else links.bridge,
            mtu=None if links is None else links.mtu,
            host_netns=host,
            host_route=lease is not None and links is not None,
        )
        return await ensure_container_net(spec)

    async def cleanup(self) -> None:
        """Containers' links first, then every netns (which takes its links along)."""
        for ns, ifname in reversed(self.links):
            argv = (
                ("ip", "link", "del", ifname)
                if ns is None
                else ("ip", "-n", ns, "link", "del", ifname)
            )
            if ns is None or netns_exists(ns):
                await run(*argv)
        for ns in reversed(self.netns):
            if netns_exists(ns):
                await run("ip", "netns", "del", ns)

    async def leftovers(self) -> list[str]:
        """Every netns, and every link of the machine's own netns, that carries the token."""
        netns = [
            line.split()[0] for line in (await run("ip", "netns", "list")).out.splitlines() if line
        ]
        links = [
            line.split(":")[1].strip() for line in (await run("ip", "-o", "link")).out.splitlines()
        ]
        found = [f"netns {ns}" for ns in netns if self.token in ns or ns in self.netns]
        found += [f"link {link}" for link in links if self.token in link]
        return found


@pytest.fixture
async def lab() -> AsyncIterator[NetLab]:
    lab = NetLab(secrets.token_hex(3))
    try:
        yield lab
    finally:
        await lab.cleanup()
        assert await lab.leftovers() == []


# -- one host: a segment per namespace -------------------------------------------


@dataclass
class OneHost:
    host: str
    a1: ContainerNet  # namespace "shop", segment 11
    a2: ContainerNet  # namespace "shop", segment 11
    b1: ContainerNet  # namespace "bank", segment 12


async def one_host(lab: NetLab) -> OneHost:
    host = await lab.host("a", "10.88.1.0/24")
    local = UNDERLAY_A.ip  # no underlay wire: the VXLAN uplinks have no peers here
    shop = await lab.segment(
        VxlanSegment(11, local=local, gateway=lab.ipam[host].gateway("shop"), netns=host)
    )
    bank = await lab.segment(
        VxlanSegment(12, local=local, gateway=lab.ipam[host].gateway("bank"), netns=host)
    )
    a1 = await lab.container(host, "a1", shop, lab.lease(host, "a1", "shop"))
    a2 = await lab.container(host, "a2", shop, lab.lease(host, "a2", "shop"))
    b1 = await lab.container(host, "b1", bank, lab.lease(host, "b1", "bank"))
    return OneHost(host, a1, a2, b1)


def ip(net: ContainerNet) -> IPv4Address:
    assert net.address is not None
    return net.address.ip


async def test_same_namespace_containers_reach_each_other(lab: NetLab) -> None:
    """ICMP, TCP and ARP all pass between two containers of one namespace."""
    topo = await one_host(lab)
    a1, a2 = topo.a1, topo.a2
    async with frames_from(a2.netns, a1.mac, window=2.0) as seen:
        assert await reaches(a1.netns, ip(a2))
    assert seen[0] >= 2  # the sniffer sees a1's frames (ARP, ICMP) when they can pass
    assert await reaches(a2.netns, ip(a1))
    assert await tcp_connects(a2.netns, ip(a2), a1.netns)
    assert await arp_answers(a1.netns, ip(a2)) == {ip(a2)}
    assert a1.gateway is not None and await reaches(a1.netns, a1.gateway)  # the host answers


async def test_different_namespaces_cannot_exchange_a_frame(lab: NetLab) -> None:
    """ARP, ICMP and TCP from a "shop" container to a "bank" one all fail; b1 sees no frame."""
    topo = await one_host(lab)
    a1, b1 = topo.a1, topo.b1
    async with frames_from(b1.netns, a1.mac, window=3.0) as seen:
        arp, icmp, tcp, control = await asyncio.gather(
            arp_answers(a1.netns, ip(b1), ip(topo.a2)),
            pings(a1.netns, ip(b1)),
            tcp_connects(b1.netns, ip(b1), a1.netns),
            pings(b1.netns, ip(a1)),
        )
    assert arp == {ip(topo.a2)}  # the probe works: the same-namespace peer answers it
    assert not icmp
    assert not tcp
    assert not control
    assert seen == [0]


# -- two hosts: one segment over VXLAN ----------------------------------------------


async def test_two_hosts_share_a_segment_over_vxlan_and_only_that_one(lab: NetLab) -> None:
    """Same VNI on hosts A and B: one L2 segment; another VNI on B stays unreachable."""
    host_a = await lab.host("a", "10.88.1.0/24")
    host_b = await lab.host("b", "10.88.2.0/24")
    wire_a, wire_b = await lab.underlay(host_a, host_b)

    def vxlan(vni: int, host: str, ns: str) -> VxlanSegment:
        local, wire = (UNDERLAY_A.ip, wire_a) if host == host_a else (UNDERLAY_B.ip, wire_b)
        gateway = lab.ipam[host].gateway(ns)
        return VxlanSegment(vni, local=local, underlay=wire, gateway=gateway, netns=host)

    shop_a = await lab.segment(vxlan(100, host_a, "shop"))
    shop_b = await lab.segment(vxlan(100, host_b, "shop"))
    bank_b = await lab.segment(vxlan(200, host_b, "bank"))
    assert isinstance(shop_a, VxlanSegment)
    await shop_a.set_peers([UNDERLAY_B.ip, UNDERLAY_A.ip])  # itself is never a peer
    assert await shop_a.peers() == {UNDERLAY_B.ip}
    for segment in (shop_b, bank_b):
        await segment.set_peers([UNDERLAY_A.ip])

    a1 = await lab.container(host_a, "a1", shop_a, lab.lease(host_a, "a1", "shop"))
    b1 = await lab.container(host_b, "b1", shop_b, lab.lease(host_b, "b1", "shop"))
    b2 = await lab.container(host_b, "b2", bank_b, lab.lease(host_b, "b2", "bank"))
    assert a1.mtu == b1.mtu == 1450  # the underlay's 1500 less VXLAN's 50

    assert await reaches(a1.netns, ip(b1))
    assert await reaches(b1.netns, ip(a1))
    other_vni, tcp = await asyncio.gather(
        pings(a1.netns, ip(b2)), tcp_connects(b1.netns, ip(b1), a1.netns)
    )
    assert tcp
    assert not other_vni

    # Take B out of A's flood list: ARP for b1 no longer reaches host B.
    await shop_a.set_peers([])
    assert await shop_a.peers() == set()
    await run(*in_netns(a1.netns, "ip", "neigh", "flush", "all"))
    assert await arp_answers(a1.netns, ip(b1)) == set()


# -- 802.1Q mode --------------------------------------------------------------------

_VLAN = vlan_support()


@pytest.mark.skipif(_VLAN.available is not True, reason=f"kernel lacks 8021q ({_VLAN.how})")
async def test_vlan_segments_span_two_hosts_on_a_trunk(lab: NetLab) -> None:
    host_a = await lab.host("a", "10.88.1.0/24")
    host_b = await lab.host("b", "10.88.2.0/24")
    wire_a, wire_b = await lab.underlay(host_a, host_b)
    shop_a = await lab.segment(VlanSegment(100, uplink=wire_a, netns=host_a))
    shop_b = await lab.segment(VlanSegment(100, uplink=wire_b, netns=host_b))
    bank_b = await lab.segment(VlanSegment(200, uplink=wire_b, netns=host_b))
    a1 = await lab.container(host_a, "a1", shop_a, lab.lease(host_a, "a1", "shop"))
    b1 = await lab.container(host_b, "b1", shop_b, lab.lease(host_b, "b1", "shop"))
    b2 = await lab.container(host_b, "b2", bank_b, lab.lease(host_b, "b2", "bank"))
    assert await reaches(a1.netns, ip(b1))
    assert not await pings(a1.netns, ip(b2))


@pytest.mark.skipif(_VLAN.available is not False, reason="the kernel has 8021q")
async def test_vlan_mode_says_the_kernel_lacks_8021q(lab: NetLab) -> None:
    host = await lab.host("a", "10.88.1.0/24")
    segment = VlanSegment(100, uplink="lo", netns=host)
    for operation in (segment.ensure(), segment.set_peers([]), segment.remove()):
        with pytest.raises(VlanUnsupported, match="this kernel lacks 8021q"):
            await operation
    async with rtnl(host) as ipr:  # it failed before making anything
        assert await ipr.link_lookup(ifname=segment.bridge) == []


# -- idempotence and repair ---------------------------------------------------------


async def ifindex(ns: str, ifname: str) -> int | None:
    async with rtnl(ns) as ipr:
        found = await ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


async def test_a_vxlan_with_other_settings_is_recreated(lab: NetLab) -> None:
    host = await lab.host("a", "10.88.1.0/24")
    old = await lab.segment(VxlanSegment(11, local=UNDERLAY_A.ip, netns=host))
    assert isinstance(old, VxlanSegment)
    before = await ifindex(host, old.vxlan)
    new = VxlanSegment(11, local=UNDERLAY_B.ip, netns=host)  # this host's address changed
    links = await new.ensure()
    assert await ifindex(host, new.vxlan) not in (None, before)
    shown = (await run("ip", "-n", host, "-d", "link", "show", new.vxlan)).out
    assert f"local {UNDERLAY_B.ip}" in shown and f"master {links.bridge}" in shown


async def test_ensure_is_idempotent_repairs_and_relabels(lab: NetLab) -> None:
    host = await lab.host("a", "10.88.1.0/24")
    segment = await lab.segment(
        VxlanSegment(11, local=UNDERLAY_A.ip, gateway=lab.ipam[host].gateway("shop"), netns=host)
    )
    assert isinstance(segment, VxlanSegment)
    uplink = await ifindex(host, segment.vxlan)
    assert await segment.ensure() == await segment.ensure()
    assert await ifindex(host, segment.vxlan) == uplink  # adopted, not recreated
    first = await lab.container(host, "a1", segment, lab.lease(host, "a1", "shop"))
    again = await lab.container(host, "a1", segment, lab.lease(host, "a1", "shop"))
    assert again == first  # the same pair, nothing recreated

    # A crash left only half a pair: ensure makes a whole one again.
    await run("ip", "-n", first.netns, "link", "del", "eth0")
    repaired = await lab.container(host, "a1", segment, lab.lease(host, "a1", "shop"))
    assert repaired.address == first.address and repaired.host_index != first.host_index
    assert await reaches(first.netns, lab.ipam[host].gateway("shop"))

    # Re-labelled with a new address: the old address and its host route go.
    lab.ipam[host].release(lab.container_id("a1"))
    relabelled = await lab.container(host, "a1", segment, lab.lease(host, "a1", "shop"))
    assert relabelled.address != first.address
    routes = (await run("ip", "-n", host, "route", "show", "proto", "78")).out
    assert str(ip(relabelled)) in routes and str(ip(first)) not in routes
    assert await reaches(first.netns, lab.ipam[host].gateway("shop"))

    cid = lab.container_id("a1")
    assert await remove_container_net(cid, host_netns=host) is True
    assert await remove_container_net(cid, host_netns=host) is False
    assert not netns_exists(first.netns)
    assert (await run("ip", "-n", host, "route", "show", "proto", "78")).out.strip() == ""
    assert await segment.remove() is True
    assert await segment.remove() is False


async def test_container_net_in_the_machines_own_netns(lab: NetLab) -> None:
    """The agent's real path: host end in this process's netns (no bridge, no address)."""
    net = await lab.container(None, "r1", None, None)
    assert await lab.container(None, "r1", None, None) == net
    shown = await run("ip", "-o", "link", "show", net.host_ifname)
    assert shown.rc == 0 and ",UP" in shown.out
    inside = await run("ip", "-n", net.netns, "-o", "link", "show", "eth0")
    assert inside.rc == 0 and net.mac in inside.out
    assert await remove_container_net(net.container_id) is True
    assert (await run("ip", "link", "show", net.host_ifname)).rc != 0
    assert not netns_exists(net.netns)
