"""The agent's container-network flags, and the SandboxNetwork they ask for.

network_flags.add_arguments(parser)
network = network_flags.make_network(args, store=..., cgroups_on=...)   # or None
"""

from __future__ import annotations

import argparse
import logging
import os
from ipaddress import IPv4Address

from agent.sandbox.network import DEFAULT_NODE_CIDR, NetworkConfig, SandboxNetwork
from nova import errors
from nova.store import Store
from nova.units import parse_duration

log = logging.getLogger("nova.agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "container network",
        "Each container gets its own network namespace, with a veth into its Nova "
        "namespace's segment (a bridge per namespace; VXLAN to other hosts), and an "
        "address from this node's CIDR. See docs/networking.md.",
    )
    group.add_argument(
        "--network",
        default="auto",
        choices=["auto", "on", "off"],
        help="auto: on as root with cgroups, standalone, or in a cluster when --node-cidr "
        "is given (default); off: containers share the host's network (unsafe)",
    )
    group.add_argument(
        "--node-cidr",
        metavar="CIDR",
        default=os.environ.get("NOVA_NODE_CIDR"),
        help=f"this node's container addresses ($NOVA_NODE_CIDR; default standalone: "
        f"{DEFAULT_NODE_CIDR}; in a cluster every node needs its own, inside --cluster-cidr)",
    )
    group.add_argument(
        "--cluster-cidr",
        metavar="CIDR",
        default=None,
        help="the CIDR of every node's container addresses, on-link for containers "
        "(default: the node CIDR)",
    )
    group.add_argument(
        "--segment-ids",
        metavar="FIRST-LAST",
        default=os.environ.get("NOVA_SEGMENT_IDS"),
        help="segment ids (VXLAN VNIs) new namespaces get ($NOVA_SEGMENT_IDS; "
        "default: 4096-16777215)",
    )
    group.add_argument(
        "--vxlan-local",
        metavar="IP",
        default=None,
        help="this host's underlay address: segments get a VXLAN uplink from it "
        "(default: none standalone; --advertise in a cluster)",
    )
    group.add_argument(
        "--vxlan-peers",
        metavar="IP,...",
        default="",
        help="other hosts' underlay addresses, for segments spanning hosts without Consul "
        "(in a cluster they come from the node inventory); needs --vxlan-local",
    )
    group.add_argument(
        "--vxlan-underlay",
        metavar="IFNAME",
        default=None,
        help="the underlay NIC for VXLAN (default: the kernel routes it)",
    )
    group.add_argument(
        "--namespace-pool-size",
        type=int,
        default=2,
        metavar="N",
        help="warm sandboxes kept per Nova namespace other than 'default', made on its "
        "first start (default: 2; 'default' keeps --pool-size)",
    )
    group.add_argument(
        "--namespace-pool-idle",
        metavar="DURATION",
        default="5m",
        help="drop a namespace's warm pool (and then its segment) after it started nothing "
        "for this long (default: 5m)",
    )


def pool_idle_seconds(args: argparse.Namespace) -> float:
    """--namespace-pool-idle in seconds; UsageError when malformed."""
    return parse_duration(args.namespace_pool_idle, what="--namespace-pool-idle")


def wants_network(args: argparse.Namespace, *, cgroups_on: bool) -> bool:
    """Whether the flags (and this host) call for per-container networks."""
    if args.network == "off":
        log.warning("--network off: containers share the host's network namespace")
        return False
    clustered = bool(getattr(args, "consul", None))
    if args.network == "on":
        if os.geteuid() != 0:
            raise errors.UsageError("--network on needs root (network namespaces, veths)")
        if clustered and not args.node_cidr:
            raise errors.UsageError("--network on in a cluster needs --node-cidr")
        return True
    if os.geteuid() != 0 or not cgroups_on:
        return False
    if clustered and not args.node_cidr:
        log.warning("no --node-cidr: containers share the host's network namespace")
        return False
    return True


def static_peers(args: argparse.Namespace) -> list[IPv4Address]:
    """--vxlan-peers as addresses; UsageError naming a bad one."""
    peers = []
    for item in filter(None, (p.strip() for p in args.vxlan_peers.split(","))):
        try:
            peers.append(IPv4Address(item))
        except ValueError:
            raise errors.UsageError(f"invalid --vxlan-peers address {item!r}") from None
    if peers and not args.vxlan_local:
        raise errors.UsageError("--vxlan-peers needs --vxlan-local (this host's underlay address)")
    return peers


def make_network(
    args: argparse.Namespace,
    *,
    store: Store,
    advertise: str | None,
    segment_store: Store | None = None,
) -> SandboxNetwork:
    """The network the flags describe; UsageError naming a bad flag."""
    if args.namespace_pool_size < 0:
        raise errors.UsageError("--namespace-pool-size must be 0 or more")
    try:
        config = NetworkConfig.parse(
            args.node_cidr or DEFAULT_NODE_CIDR,
            cluster_cidr=args.cluster_cidr,
            segment_ids=args.segment_ids,
            vxlan_local=args.vxlan_local or advertise,
            vxlan_underlay=args.vxlan_underlay,
        )
    except ValueError as exc:
        raise errors.UsageError(str(exc)) from None
    return SandboxNetwork(store, node=args.node, config=config, segment_store=segment_store)
