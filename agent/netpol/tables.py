"""The compiled form of network policy: what the compiler produces and the kernel backends enforce.

This is the contract between the pure compiler (`compiler.py`) and the
backends (`ebpf.py`, `nft.py`). Fields are only ever added.

Semantics (Kubernetes NetworkPolicy): a packet from S to D is delivered iff
S's egress allows it (S is not egress-isolated, or a rule of S.egress matches
D's identity/IP and the protocol/port) AND D's ingress allows it (likewise
with S). Replies of an allowed connection always pass both directions. The
identity of an IP is `ipcache[ip]`, else IDENTITY_WORLD (CIDR rules decide).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP = 6, 17, 132
IDENTITY_HOST = 1  # the node itself (gateway address of a segment)
IDENTITY_WORLD = 2  # any IP the ipcache does not know
FIRST_ENDPOINT_IDENTITY = 256


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Compiler input: one container with its own netns/veth."""

    key: str  # container id
    ip: IPv4Address
    namespace: str
    labels: Mapping[str, str]
    host_ifname: str  # host end of its veth (where backends attach)


@dataclass(frozen=True, slots=True)
class PortMatch:
    protocol: int  # 6, 17, 132
    first: int  # 1..65535
    last: int  # first..65535 (first=1, last=65535: any port of that protocol)


@dataclass(frozen=True, slots=True)
class Rule:
    policy: str  # "<namespace>/<name>" that produced it (counters, `nova policy test`)
    identities: frozenset[int]  # peer identities allowed
    cidrs: tuple[IPv4Network, ...]  # peer prefixes allowed, excepts already removed
    ports: tuple[PortMatch, ...]  # empty: every protocol and port
    index: int = 0  # position of the rule in its policy's ingress/egress list (`nova policy test`)


@dataclass(frozen=True, slots=True)
class DirectionTable:
    isolated: bool  # False: no policy selects the endpoint for this direction -> allow all
    rules: tuple[Rule, ...]  # when isolated: allowed = union of rules; everything else dropped
    policies: tuple[str, ...] = ()  # "<ns>/<name>" of the policies isolating it (sorted)


@dataclass(frozen=True, slots=True)
class EndpointTables:
    endpoint: Endpoint
    identity: int
    ingress: DirectionTable  # traffic TO the endpoint   (tc egress on its host veth)
    egress: DirectionTable  # traffic FROM the endpoint (tc ingress on its host veth)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    generation: int  # increases with every compile
    ipcache: Mapping[IPv4Address, int]  # every known endpoint IP -> its identity
    endpoints: Mapping[str, EndpointTables]  # by Endpoint.key
