"""Pure part of the eBPF backend: compiled tables -> the exact map entries.

Kept apart from the loader so it is unit-tested without root
(tests/unit/test_netpol_ebpf_keys.py). The map layouts are the structs in
bpf/policy.c:

- endpoints are identified by the ifindex of their host veth;
- port ranges become their covering prefixes (`port_prefixes`): a range costs
  at most 30 LPM entries, whatever its width, instead of one entry per port;
- every distinct CIDR of any rule gets a CIDR identity (`CIDR_IDENTITY_BASE`
  + n), stored in a second LPM trie (nova_cidrs_v1). A peer address is first
  looked up by its endpoint identity and, if that allows nothing, by the
  identity of the most specific CIDR containing it. A rule with CIDR c
  therefore grants the identities of c and of every rule CIDR inside c.
  Endpoint addresses are matched by CIDR rules too (Kubernetes ipBlock
  semantics), without granting their whole label identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Network
from typing import NamedTuple

from agent.netpol.tables import CompiledPolicy, DirectionTable

DIR_INGRESS = 0
DIR_EGRESS = 1
ANY_PROTOCOL = 0
CIDR_IDENTITY_BASE = 1 << 24
FIXED_BITS = 80  # endpoint 32 + identity 32 + direction 8 + protocol 8
PORT_BITS = 16


class PolicyKey(NamedTuple):
    endpoint: int
    identity: int
    direction: int
    protocol: int
    port: int  # host order; only its top `port_bits` bits count
    port_bits: int

    @property
    def prefixlen(self) -> int:
        return FIXED_BITS + self.port_bits


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """The fewest (value, bits) prefixes covering exactly ports first..last."""
    if not 0 <= first <= last <= 0xFFFF:
        raise ValueError(f"port range {first}-{last} is not within 0..65535")
    out: list[tuple[int, int]] = []
    while first <= last:
        size = first & -first if first else 1 << PORT_BITS
        while first + size - 1 > last:
            size >>= 1
        out.append((first, PORT_BITS - size.bit_length() + 1))
        first += size
    return out


def cidr_identities(
    cidrs: Iterable[IPv4Network], previous: Mapping[IPv4Network, int]
) -> dict[IPv4Network, int]:
    """An identity for each CIDR; one it had in `previous` is kept (stable across applies)."""
    wanted = set(cidrs)
    out = {c: i for c, i in previous.items() if c in wanted}
    used = set(out.values())
    candidate = CIDR_IDENTITY_BASE
    for cidr in sorted(wanted - out.keys()):
        while candidate in used:
            candidate += 1
        out[cidr] = candidate
        used.add(candidate)
    return out


def rule_cidrs(compiled: CompiledPolicy) -> set[IPv4Network]:
    return {
        cidr
        for entry in compiled.endpoints.values()
        for table in (entry.ingress, entry.egress)
        for rule in table.rules
        for cidr in rule.cidrs
    }


def cidrs_within(cidrs: Iterable[IPv4Network]) -> dict[IPv4Network, list[IPv4Network]]:
    """For each CIDR, the CIDRs of the set inside it (itself included). O(32 n)."""
    present = {(int(c.network_address), c.prefixlen): c for c in cidrs}
    inside: dict[IPv4Network, list[IPv4Network]] = {c: [] for c in present.values()}
    for (base, length), cidr in present.items():
        for bits in range(length + 1):
            outer = present.get((base & ((0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF), bits))
            if outer is not None:
                inside[outer].append(cidr)
    return inside


def policy_entries(
    compiled: CompiledPolicy,
    endpoint_ids: Mapping[str, int],
    cidr_ids: Mapping[IPv4Network, int],
    counter_slot: Callable[[str], int],
) -> dict[PolicyKey, int]:
    """Every nova_policy_v1 entry (key -> counter slot) for the endpoints in `endpoint_ids`.

    Endpoints not in `endpoint_ids` (no host veth found) get none. Where two
    rules give the same key, the first (by endpoint, direction, rule order) wins.
    """
    inside = cidrs_within(cidr_ids)
    out: dict[PolicyKey, int] = {}
    for key in sorted(compiled.endpoints):
        if key not in endpoint_ids:
            continue
        entry = compiled.endpoints[key]
        for direction, table in ((DIR_INGRESS, entry.ingress), (DIR_EGRESS, entry.egress)):
            _direction_entries(
                out,
                (endpoint_ids[key], direction),
                table,
                inside=inside,
                cidr_ids=cidr_ids,
                counter_slot=counter_slot,
            )
    return out


def _direction_entries(
    out: dict[PolicyKey, int],
    where: tuple[int, int],  # (endpoint, direction)
    table: DirectionTable,
    *,
    inside: Mapping[IPv4Network, list[IPv4Network]],
    cidr_ids: Mapping[IPv4Network, int],
    counter_slot: Callable[[str], int],
) -> None:
    endpoint, direction = where
    if not table.isolated:
        return  # the program passes everything; entries would be dead weight
    for rule in table.rules:
        slot = counter_slot(rule.policy)
        peers = set(rule.identities)
        for cidr in rule.cidrs:
            peers.update(cidr_ids[c] for c in inside[cidr])
        if rule.ports:
            matches = [
                (p.protocol, value, bits)
                for p in rule.ports
                for value, bits in port_prefixes(p.first, p.last)
            ]
        else:
            matches = [(ANY_PROTOCOL, 0, 0)]
        for peer in sorted(peers):
            for protocol, value, bits in matches:
                out.setdefault(PolicyKey(endpoint, peer, direction, protocol, value, bits), slot)
