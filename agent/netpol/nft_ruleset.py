"""Pure part of the nftables backend: compiled tables -> the `Ruleset` nft should hold.

`nft_objects` turns a Ruleset into a transaction (a replacement, or an
update against the previous one). Unit-tested without root
(tests/unit/test_netpol_backend_tables.py, test_netpol_nft_objects.py). Layout of
the tables (family inet for policy, family bridge for source checks):

    table inet NAME
      chain forward/input/output   ct state established,related accept;
                                   ip saddr vmap @egress   (isolated senders)
                                   ip daddr vmap @ingress  (isolated receivers)
      map egress, ingress          endpoint address -> jump e<n>_<dir>
      chain e<n>_<dir>             PEER . l4proto . th dport vmap @e<n>_<dir>_ports
                                   PEER vmap @e<n>_<dir>_any
                                   counter name <deny counter> drop
      map e<n>_<dir>_ports/_any    disjoint intervals -> goto p<k>
      chain p<k>                   counter name <policy counter> return
    table bridge NAME
      chain prerouting             a frame from an endpoint's port whose source
                                   address is not the endpoint's: drop

PEER is `ip saddr` for ingress, `ip daddr` for egress. A chain reached by a
`jump` returns to the hook chain, which then checks the receiver's side; the
verdict maps `goto` a per-policy chain that counts and returns to the hook
chain too. Overlapping rules (a pod address inside a rule CIDR, two port
ranges that meet) are split into disjoint intervals first, because
concatenated interval maps must not overlap; the first rule keeps the count.
Chain names are stable for the life of a backend (`ChainNames`), so an
update changes only the chains and elements whose content changed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from agent.netpol.backend import (
    COUNTER_ESTABLISHED,
    COUNTER_NOT_IPV4,
    COUNTER_SPOOFED,
    deny_counter_name,
)
from agent.netpol.nft_objects import Json, Ruleset
from agent.netpol.tables import CompiledPolicy, DirectionTable, Rule

HOOKS = ("forward", "input", "output")
_PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp"}


@dataclass
class Counters:
    """Counter object names in the table <-> the names `counters()` reports."""

    # (report name, counts denials) -> counter object name
    by_name: dict[tuple[str, bool], str] = field(default_factory=dict)

    def object(self, name: str, *, denied: bool = False) -> str:
        if (name, denied) not in self.by_name:
            self.by_name[name, denied] = f"c{len(self.by_name)}"
        return self.by_name[name, denied]


def atoms(spans: Sequence[tuple[int, int, int]]) -> Iterator[tuple[int, int, list[int]]]:
    """Disjoint [lo, hi] pieces of the union of `spans` (first, last, label), each with
    the sorted labels of every span covering it. A sweep: O(n log n + output)."""
    events: dict[int, list[tuple[int, int]]] = {}
    for first, last, label in spans:
        events.setdefault(first, []).append((1, label))
        events.setdefault(last + 1, []).append((-1, label))
    active: dict[int, int] = {}
    points = sorted(events)
    for lo, nxt in itertools.pairwise(points):
        for delta, label in events[lo]:
            active[label] = active.get(label, 0) + delta
            if not active[label]:
                del active[label]
        if active:
            yield lo, nxt - 1, sorted(active)


def disjoint(intervals: Sequence[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Split overlapping [first, last] intervals (in priority order) into disjoint ones.

    Where several cover a point, the earliest wins; neighbours with the same
    label are merged.
    """
    out: list[tuple[int, int, str]] = []
    for lo, hi, covering in atoms([(a, b, n) for n, (a, b, _) in enumerate(intervals)]):
        label = intervals[covering[0]][2]
        if out and out[-1][2] == label and out[-1][1] == lo - 1:
            out[-1] = (out[-1][0], hi, label)
        else:
            out.append((lo, hi, label))
    return out


def _addresses(rule: Rule, by_identity: Mapping[int, list[IPv4Address]]) -> list[tuple[int, int]]:
    spans = [(int(ip), int(ip)) for i in rule.identities for ip in by_identity.get(i, ())]
    spans += [(int(c.network_address), int(c.broadcast_address)) for c in rule.cidrs]
    return spans


def direction_maps(
    table: DirectionTable, by_identity: Mapping[int, list[IPv4Address]]
) -> tuple[list[tuple[int, int, int, int, int, str]], list[tuple[int, int, str]]]:
    """(ports elements, any-protocol elements) of one endpoint direction, all disjoint.

    Ports elements are (addr first, addr last, protocol, port first, port last, policy).
    """
    addr_spans = [
        (a, b, n) for n, rule in enumerate(table.rules) for a, b in _addresses(rule, by_identity)
    ]
    ports: list[tuple[int, int, int, int, int, str]] = []
    any_proto: list[tuple[int, int, str]] = []
    for lo, hi, covering in atoms(addr_spans):
        rules = [table.rules[n] for n in covering]
        wildcard = next((r.policy for r in rules if not r.ports), None)
        if wildcard is not None:
            any_proto.append((lo, hi, wildcard))
        for proto in sorted({p.protocol for r in rules for p in r.ports}):
            ranges = [
                (p.first, p.last, r.policy) for r in rules for p in r.ports if p.protocol == proto
            ]
            ports += [(lo, hi, proto, a, b, pol) for a, b, pol in disjoint(ranges)]
    return ports, any_proto


def _addr(value: int) -> str:
    return str(IPv4Address(value))


def _span(lo: int, hi: int) -> Any:
    return _addr(lo) if lo == hi else {"range": [_addr(lo), _addr(hi)]}


def _port_span(lo: int, hi: int) -> Any:
    return lo if lo == hi else {"range": [lo, hi]}


def _payload(field_: str) -> Json:
    return {"payload": {"protocol": "ip", "field": field_}}


@dataclass
class ChainNames:
    """Stable chain names for one backend process: an endpoint keeps `e<n>_<dir>`
    and a policy keeps `p<k>` across applies, so an update touches only what changed."""

    endpoints: dict[str, int] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)

    def endpoint(self, key: str, direction: str) -> str:
        n = self.endpoints.setdefault(key, len(self.endpoints))
        return f"e{n}_{direction}"

    def policy(self, name: str) -> str:
        return self.policies.setdefault(name, f"p{len(self.policies)}")


def desired(
    compiled: CompiledPolicy,
    *,
    table: str,
    ports: Mapping[str, str],
    counters: Counters,
    names: ChainNames,
    drop_log_rate: int = 0,
) -> Ruleset:
    """Nova's tables (inet for policy, bridge for source checks) for `compiled`.

    `ports` maps endpoint key -> host veth name; endpoints missing from it
    are not enforced (their veth does not exist). `drop_log_rate` > 0 logs
    drops to the kernel log, at most that many a second per endpoint and direction.
    """
    rs = Ruleset(table=table, families=("inet", "bridge"))
    rs.counter("inet", counters.object(COUNTER_ESTABLISHED))
    for name in (COUNTER_SPOOFED, COUNTER_NOT_IPV4):
        rs.counter("bridge", counters.object(name, denied=True))
    by_identity: dict[int, list[IPv4Address]] = {}
    for address, identity in compiled.ipcache.items():
        by_identity.setdefault(identity, []).append(address)

    def policy_chain(policy: str) -> str:
        chain = names.policy(policy)
        if ("inet", chain) not in rs.chains:
            rs.counter("inet", counters.object(policy))
            rs.chain("inet", chain).rules.append(
                [{"counter": counters.object(policy)}, {"return": None}]
            )
        return chain

    dispatch = {
        direction: rs.collection("inet", direction, type="ipv4_addr", map="verdict")
        for direction in ("ingress", "egress")
    }
    for key in sorted(k for k in compiled.endpoints if k in ports):
        entry = compiled.endpoints[key]
        for direction, dtable in (("ingress", entry.ingress), ("egress", entry.egress)):
            if dtable.isolated:
                chain = names.endpoint(key, direction)
                _endpoint_chain(
                    rs,
                    chain,
                    direction=direction,
                    dtable=dtable,
                    by_identity=by_identity,
                    policy_chain=policy_chain,
                )
                deny_name = deny_counter_name(entry, dtable)
                rules = rs.chains["inet", chain].rules
                if drop_log_rate > 0:  # its own rule: the limit must never decide the verdict
                    prefix = f"nova drop {entry.endpoint.key} {direction} ({deny_name}): "
                    rules.append([
                        {"limit": {"rate": drop_log_rate, "per": "second"}},
                        {"log": {"prefix": prefix[:127], "level": "info"}},
                    ])  # fmt: skip
                deny = counters.object(deny_name, denied=True)
                rs.counter("inet", deny)
                rules.append([{"counter": deny}, {"drop": None}])
                element = [str(entry.endpoint.ip), {"jump": {"target": chain}}]
                dispatch[direction].add(element, identity=(entry.endpoint.ip, chain))
    _hook_chains(rs, counters)
    _bridge_table(rs, compiled, ports=ports, counters=counters)
    return rs


def _endpoint_chain(
    rs: Ruleset,
    chain: str,
    *,
    direction: str,
    dtable: DirectionTable,
    by_identity: Mapping[int, list[IPv4Address]],
    policy_chain: Callable[[str], str],
) -> None:
    """One isolated endpoint direction: its chain and its two verdict maps."""
    peer = _payload("saddr" if direction == "ingress" else "daddr")
    port_elems, any_elems = direction_maps(dtable, by_identity)
    ports_map = rs.collection(
        "inet",
        f"{chain}_ports",
        type=["ipv4_addr", "inet_proto", "inet_service"],
        map="verdict",
        flags=["interval"],
    )
    any_map = rs.collection(
        "inet", f"{chain}_any", type="ipv4_addr", map="verdict", flags=["interval"]
    )
    for a, b, proto, p, q, pol in port_elems:
        span = {"concat": [_span(a, b), _PROTO_NAMES.get(proto, proto), _port_span(p, q)]}
        target = policy_chain(pol)
        ports_map.add([span, {"goto": {"target": target}}], identity=(a, b, proto, p, q, target))
    for a, b, pol in any_elems:
        target = policy_chain(pol)
        any_map.add([_span(a, b), {"goto": {"target": target}}], identity=(a, b, target))
    l4 = [peer, {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]
    rs.chain("inet", chain).rules += [
        [{"vmap": {"key": {"concat": l4}, "data": f"@{chain}_ports"}}],
        [{"vmap": {"key": peer, "data": f"@{chain}_any"}}],
    ]


def _hook_chains(rs: Ruleset, counters: Counters) -> None:
    established = {
        "match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}
    }
    for hook in HOOKS:
        chain = rs.chain("inet", hook, type="filter", hook=hook, prio=0, policy="accept")
        chain.rules.append(
            [established, {"counter": counters.object(COUNTER_ESTABLISHED)}, {"accept": None}]
        )
        if hook != "output":  # output: the host sends; only receivers' ingress applies
            chain.rules.append([{"vmap": {"key": _payload("saddr"), "data": "@egress"}}])
        if hook != "input":
            chain.rules.append([{"vmap": {"key": _payload("daddr"), "data": "@ingress"}}])


def _bridge_table(
    rs: Ruleset, compiled: CompiledPolicy, *, ports: Mapping[str, str], counters: Counters
) -> None:
    endpoints = [compiled.endpoints[k] for k in sorted(compiled.endpoints) if k in ports]
    members: dict[str, tuple[Any, list[str]]] = {
        "ports": ("ifname", [ports[e.endpoint.key] for e in endpoints]),
        "isolated_out": ("ifname", [ports[e.endpoint.key] for e in endpoints if e.egress.isolated]),
        "isolated_in": ("ifname", [ports[e.endpoint.key] for e in endpoints if e.ingress.isolated]),
    }
    for name, (kind, names) in members.items():
        collection = rs.collection("bridge", name, type=kind)
        for ifname in names:
            collection.add(ifname, identity=ifname)
    owned = rs.collection("bridge", "owned", type=["ifname", "ipv4_addr"])
    for e in endpoints:
        port, address = ports[e.endpoint.key], str(e.endpoint.ip)
        owned.add({"concat": [port, address]}, identity=(port, address))
    iif, oif = {"meta": {"key": "iifname"}}, {"meta": {"key": "oifname"}}
    spoofed = counters.object(COUNTER_SPOOFED, denied=True)
    not_ipv4 = counters.object(COUNTER_NOT_IPV4, denied=True)
    not_ip = {
        "match": {
            "op": "!=",
            "left": {"meta": {"key": "protocol"}},
            "right": {"set": ["ip", "arp"]},
        }
    }
    base = {"type": "filter", "prio": -200, "policy": "accept"}
    rs.chain("bridge", "prerouting", hook="prerouting", **base).rules += [
        [
            {"match": {"op": "==", "left": iif, "right": "@ports"}},
            {"match": {"op": "==", "left": {"meta": {"key": "protocol"}}, "right": "ip"}},
            {
                "match": {
                    "op": "!=",
                    "left": {"concat": [iif, _payload("saddr")]},
                    "right": "@owned",
                }
            },
            {"counter": spoofed},
            {"drop": None},
        ],
        [
            {"match": {"op": "==", "left": iif, "right": "@isolated_out"}},
            not_ip,
            {"counter": not_ipv4},
            {"drop": None},
        ],
    ]
    rs.chain("bridge", "forward", hook="forward", **base).rules.append(
        [
            {"match": {"op": "==", "left": oif, "right": "@isolated_in"}},
            not_ip,
            {"counter": not_ipv4},
            {"drop": None},
        ]
    )
