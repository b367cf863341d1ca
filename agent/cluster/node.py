"""What a node advertises in `nova/v1/nodes/<node>`: capacity, labels, addresses."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from nova import errors
from nova.store import keys


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node: str
    address: str
    cpu_millicores: int
    memory_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    segment_endpoint: str = ""
    agent_version: str = ""
    started_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "address": self.address,
            "capacity": {"cpu_millicores": self.cpu_millicores, "memory_bytes": self.memory_bytes},
            "labels": dict(self.labels),
            "segment_endpoint": self.segment_endpoint or self.address,
            "agent_version": self.agent_version,
            "started_at": self.started_at,
        }


def parse_labels(text: str | None) -> dict[str, str]:
    """`zone=a,disk=ssd` -> {"zone": "a", "disk": "ssd"}; UsageError naming the bad item."""
    labels: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.strip().partition("=")
        try:
            keys.segment(name, what="label name")
            if value:
                keys.segment(value, what="label value")
        except ValueError as exc:
            raise errors.UsageError(f"invalid --labels item {item!r}: {exc}") from None
        if not sep:
            raise errors.UsageError(f"invalid --labels item {item!r}: expected NAME=VALUE")
        labels[name] = value
    return labels


def check_address(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise errors.UsageError(f"invalid --advertise {text!r}: expected an IPv4 address") from None


def route_source(consul_url: str) -> str:
    """The local IPv4 address the kernel would use to reach Consul (no packet is sent)."""
    host = urllib.parse.urlsplit(consul_url).hostname or "127.0.0.1"
    try:
        target = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))  # UDP connect only picks a route
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def host_memory_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def agent_version() -> str:
    try:
        return metadata.version("nova")
    except metadata.PackageNotFoundError:
        return "dev"


def describe_host(node: str, address: str, labels: dict[str, str]) -> NodeInfo:
    return NodeInfo(
        node=node,
        address=address,
        cpu_millicores=(os.cpu_count() or 1) * 1000,
        memory_bytes=host_memory_bytes(),
        labels=labels,
        segment_endpoint=address,
        agent_version=agent_version(),
    )


def check_cluster_args(args: Any) -> None:
    """UsageError for a bad --consul, --labels or --advertise, before anything starts."""
    if not args.consul:
        if args.labels or args.advertise:
            raise errors.UsageError("--labels and --advertise need --consul")
        return
    from nova.store.consul import ConsulStore

    try:
        ConsulStore(args.consul)
    except ValueError as exc:
        raise errors.UsageError(f"invalid --consul: {exc}") from None
    try:
        keys.segment(args.node, what="node name")
    except ValueError as exc:
        raise errors.UsageError(f"invalid --node: {exc}") from None
    parse_labels(args.labels)
    if args.advertise:
        check_address(args.advertise)
