"""What the compiled policy does with one packet, and why (pure; `nova policy test`).

It evaluates the same tables the kernel backends enforce, with the same
rule: delivered iff the source's egress allows it AND the destination's
ingress allows it. A side that is not an endpoint of this node is not
filtered here (its own node enforces its policies).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from ipaddress import IPv4Address
from typing import Any

from agent.netpol.tables import (
    IDENTITY_WORLD,
    CompiledPolicy,
    EndpointTables,
    Rule,
)

PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 132: "SCTP"}


@dataclass(frozen=True, slots=True)
class DirectionVerdict:
    direction: str  # "egress" (of the source) or "ingress" (of the destination)
    endpoint: str | None  # the endpoint enforcing it, None if not one of this node
    allowed: bool
    reason: str
    policy: str | None = None  # the policy whose rule allowed it
    rule: int | None = None  # that rule's index in the policy's ingress/egress list


@dataclass(frozen=True, slots=True)
class Explanation:
    allowed: bool
    src_identity: int
    dst_identity: int
    egress: DirectionVerdict
    ingress: DirectionVerdict

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def identity_of(compiled: CompiledPolicy, ip: IPv4Address) -> int:
    return compiled.ipcache.get(ip, IDENTITY_WORLD)


def endpoint_at(compiled: CompiledPolicy, ip: IPv4Address) -> EndpointTables | None:
    for tables in compiled.endpoints.values():
        if tables.endpoint.ip == ip:
            return tables
    return None


def rule_matches(
    rule: Rule, peer_ip: IPv4Address, peer_identity: int, protocol: int, port: int
) -> bool:
    peer = peer_identity in rule.identities or any(peer_ip in cidr for cidr in rule.cidrs)
    return peer and (
        not rule.ports
        or any(m.protocol == protocol and m.first <= port <= m.last for m in rule.ports)
    )


def explain(
    compiled: CompiledPolicy,
    src_ip: IPv4Address,
    dst_ip: IPv4Address,
    protocol: int,
    port: int,
) -> Explanation:
    """The verdict on a new connection from `src_ip` to `dst_ip` (protocol number, port)."""
    src_identity, dst_identity = identity_of(compiled, src_ip), identity_of(compiled, dst_ip)
    src, dst = endpoint_at(compiled, src_ip), endpoint_at(compiled, dst_ip)
    if src_ip == dst_ip:
        # A container talking to itself stays on its own loopback: no veth, no policy.
        note = f"{src_ip} talks to itself over loopback, which policy never filters"
        egress = DirectionVerdict("egress", _key(src), True, note)
        ingress = DirectionVerdict("ingress", _key(dst), True, note)
    else:
        egress = _side(
            "egress", src, peer_ip=dst_ip, peer_identity=dst_identity, protocol=protocol, port=port
        )
        ingress = _side(
            "ingress", dst, peer_ip=src_ip, peer_identity=src_identity, protocol=protocol, port=port
        )
    return Explanation(
        allowed=egress.allowed and ingress.allowed,
        src_identity=src_identity,
        dst_identity=dst_identity,
        egress=egress,
        ingress=ingress,
    )


def _key(tables: EndpointTables | None) -> str | None:
    return tables.endpoint.key if tables is not None else None


def _side(
    direction: str,
    tables: EndpointTables | None,
    *,
    peer_ip: IPv4Address,
    peer_identity: int,
    protocol: int,
    port: int,
) -> DirectionVerdict:
    if tables is None:
        return DirectionVerdict(
            direction, None, True, f"not an endpoint of this node: its {direction} is not "
            "filtered here",
        )  # fmt: skip
    key = tables.endpoint.key
    table = tables.egress if direction == "egress" else tables.ingress
    if not table.isolated:
        return DirectionVerdict(
            direction, key, True, f"no policy selects {key} for {direction}: all allowed"
        )
    for rule in table.rules:
        if rule_matches(rule, peer_ip, peer_identity, protocol, port):
            return DirectionVerdict(
                direction, key, True,
                f"allowed by policy {rule.policy}, {direction} rule {rule.index}",
                policy=rule.policy, rule=rule.index,
            )  # fmt: skip
    traffic = f"{PROTOCOL_NAMES.get(protocol, f'protocol {protocol}')}/{port}"
    toward = "to" if direction == "egress" else "from"
    return DirectionVerdict(
        direction,
        key,
        False,
        f"{key} is isolated for {direction} by {', '.join(table.policies)} and no rule allows "
        f"{traffic} {toward} {peer_ip} (identity {peer_identity}): default deny",
    )
