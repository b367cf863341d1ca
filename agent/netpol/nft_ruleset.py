"""Pure part of the nftables backend: compiled tables -> one `nft -j` transaction.

Unit-tested without root (tests/unit/test_netpol_nft_ruleset.py). Layout of
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
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from agent.netpol.backend import (
    COUNTER_ESTABLISHED,
    COUNTER_NOT_IPV4,
    COUNTER_SPOOFED,
    deny_counter_name,
)
from agent.netpol.tables import CompiledPolicy, DirectionTable, Rule

HOOKS = ("forward", "input", "output")
_PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp"}

Json = dict[str, Any]


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


def transaction(
    compiled: CompiledPolicy,
    *,
    table: str,
    ports: Mapping[str, str],
    counters: Counters,
    drop_log_rate: int = 0,
) -> Json:
    """The whole ruleset for `compiled` as one `nft -j` document (replaces the tables).

    `ports` maps endpoint key -> host veth name; endpoints missing from it
    are not enforced (their veth does not exist). `drop_log_rate` > 0 logs
    drops to the kernel log, at most that many a second per endpoint and direction.
    """
    inet: list[Json] = []
    T = {"family": "inet", "table": table}

    def add(kind: str, **body: Any) -> None:
        inet.append({"add": {kind: {**T, **body}}})

    cmds: list[Json] = []
    for family in ("inet", "bridge"):  # replace both tables in this one transaction
        cmds.append({"add": {"table": {"family": family, "name": table}}})
        cmds.append({"delete": {"table": {"family": family, "name": table}}})
        cmds.append({"add": {"table": {"family": family, "name": table}}})
    counters.object(COUNTER_ESTABLISHED)
    for name in (COUNTER_SPOOFED, COUNTER_NOT_IPV4):
        counters.object(name, denied=True)
    by_identity: dict[int, list[IPv4Address]] = {}
    for address, identity in compiled.ipcache.items():
        by_identity.setdefault(identity, []).append(address)
    policy_chains: dict[str, str] = {}

    def policy_chain(policy: str) -> str:
        if policy not in policy_chains:
            chain = f"p{len(policy_chains)}"
            policy_chains[policy] = chain
            add("chain", name=chain)
            add("rule", chain=chain, expr=[{"counter": counters.object(policy)}, {"return": None}])
        return policy_chains[policy]

    # Every policy chain before any map whose elements go to it (nft -j refuses
    # the transaction otherwise, with ENOENT).
    for key in sorted(k for k in compiled.endpoints if k in ports):
        entry = compiled.endpoints[key]
        for dtable in (entry.ingress, entry.egress):
            for rule in dtable.rules if dtable.isolated else ():
                policy_chain(rule.policy)
    dispatch: dict[str, list[Any]] = {"ingress": [], "egress": []}
    for n, key in enumerate(sorted(k for k in compiled.endpoints if k in ports)):
        entry = compiled.endpoints[key]
        for direction, dtable in (("ingress", entry.ingress), ("egress", entry.egress)):
            if not dtable.isolated:
                continue
            chain = f"e{n}_{direction}"
            peer = _payload("saddr" if direction == "ingress" else "daddr")
            port_elems, any_elems = direction_maps(dtable, by_identity)
            add("chain", name=chain)
            add(
                "map",
                name=f"{chain}_ports",
                type=["ipv4_addr", "inet_proto", "inet_service"],
                map="verdict",
                flags=["interval"],
            )
            add("map", name=f"{chain}_any", type="ipv4_addr", map="verdict", flags=["interval"])
            if port_elems:
                add(
                    "element",
                    name=f"{chain}_ports",
                    elem=[
                        [
                            {
                                "concat": [
                                    _span(a, b),
                                    _PROTO_NAMES.get(proto, proto),
                                    _port_span(p, q),
                                ]
                            },
                            {"goto": {"target": policy_chain(pol)}},
                        ]
                        for a, b, proto, p, q, pol in port_elems
                    ],
                )
            if any_elems:
                add(
                    "element",
                    name=f"{chain}_any",
                    elem=[
                        [_span(a, b), {"goto": {"target": policy_chain(pol)}}]
                        for a, b, pol in any_elems
                    ],
                )
            add(
                "rule",
                chain=chain,
                expr=[
                    {
                        "vmap": {
                            "key": {
                                "concat": [
                                    peer,
                                    {"meta": {"key": "l4proto"}},
                                    {"payload": {"protocol": "th", "field": "dport"}},
                                ]
                            },
                            "data": f"@{chain}_ports",
                        }
                    }
                ],
            )
            add("rule", chain=chain, expr=[{"vmap": {"key": peer, "data": f"@{chain}_any"}}])
            deny_name = deny_counter_name(entry, dtable)
            if drop_log_rate > 0:  # its own rule: the limit must never decide the verdict
                prefix = f"nova drop {entry.endpoint.key} {direction} ({deny_name}): "
                add("rule", chain=chain, expr=[
                    {"limit": {"rate": drop_log_rate, "per": "second"}},
                    {"log": {"prefix": prefix[:127], "level": "info"}},
                ])  # fmt: skip
            deny = counters.object(deny_name, denied=True)
            add("rule", chain=chain, expr=[{"counter": deny}, {"drop": None}])
            dispatch[direction].append([str(entry.endpoint.ip), {"jump": {"target": chain}}])
    for direction in ("ingress", "egress"):
        add("map", name=direction, type="ipv4_addr", map="verdict")
        if dispatch[direction]:
            add("element", name=direction, elem=dispatch[direction])
    for hook in HOOKS:
        add("chain", name=hook, type="filter", hook=hook, prio=0, policy="accept")
        add(
            "rule",
            chain=hook,
            expr=[
                {
                    "match": {
                        "op": "in",
                        "left": {"ct": {"key": "state"}},
                        "right": ["established", "related"],
                    }
                },
                {"counter": counters.object(COUNTER_ESTABLISHED)},
                {"accept": None},
            ],
        )
        if hook != "output":  # output: the host sends; only receivers' ingress applies
            add("rule", chain=hook, expr=[{"vmap": {"key": _payload("saddr"), "data": "@egress"}}])
        if hook != "input":
            add("rule", chain=hook, expr=[{"vmap": {"key": _payload("daddr"), "data": "@ingress"}}])
    # counter objects first: the rules above refer to them
    cmds += [{"add": {"counter": {**T, "name": name}}} for name in counters.by_name.values()]
    cmds += inet
    cmds += _bridge_table(compiled, table=table, ports=ports, counters=counters)
    return {"nftables": cmds}


def _bridge_table(
    compiled: CompiledPolicy, *, table: str, ports: Mapping[str, str], counters: Counters
) -> Iterable[Json]:
    B = {"family": "bridge", "table": table}
    endpoints = [compiled.endpoints[k] for k in sorted(compiled.endpoints) if k in ports]
    yield {"add": {"counter": {**B, "name": counters.object(COUNTER_SPOOFED, denied=True)}}}
    yield {"add": {"counter": {**B, "name": counters.object(COUNTER_NOT_IPV4, denied=True)}}}
    for name, kind in (
        ("ports", "ifname"),
        ("owned", ["ifname", "ipv4_addr"]),
        ("isolated_out", "ifname"),
        ("isolated_in", "ifname"),
    ):
        yield {"add": {"set": {**B, "name": name, "type": kind}}}
    sets: dict[str, list[Any]] = {
        "ports": [ports[e.endpoint.key] for e in endpoints],
        "owned": [{"concat": [ports[e.endpoint.key], str(e.endpoint.ip)]} for e in endpoints],
        "isolated_out": [ports[e.endpoint.key] for e in endpoints if e.egress.isolated],
        "isolated_in": [ports[e.endpoint.key] for e in endpoints if e.ingress.isolated],
    }
    for name, elems in sets.items():
        if elems:
            yield {"add": {"element": {**B, "name": name, "elem": elems}}}
    iif, oif = {"meta": {"key": "iifname"}}, {"meta": {"key": "oifname"}}
    not_ip = {
        "match": {
            "op": "!=",
            "left": {"meta": {"key": "protocol"}},
            "right": {"set": ["ip", "arp"]},
        }
    }
    yield {
        "add": {
            "chain": {
                **B,
                "name": "prerouting",
                "type": "filter",
                "hook": "prerouting",
                "prio": -200,
                "policy": "accept",
            }
        }
    }
    yield {
        "add": {
            "rule": {
                **B,
                "chain": "prerouting",
                "expr": [
                    {"match": {"op": "==", "left": iif, "right": "@ports"}},
                    {"match": {"op": "==", "left": {"meta": {"key": "protocol"}}, "right": "ip"}},
                    {
                        "match": {
                            "op": "!=",
                            "left": {"concat": [iif, _payload("saddr")]},
                            "right": "@owned",
                        }
                    },
                    {"counter": counters.object(COUNTER_SPOOFED, denied=True)},
                    {"drop": None},
                ],
            }
        }
    }
    yield {
        "add": {
            "rule": {
                **B,
                "chain": "prerouting",
                "expr": [
                    {"match": {"op": "==", "left": iif, "right": "@isolated_out"}},
                    not_ip,
                    {"counter": counters.object(COUNTER_NOT_IPV4, denied=True)},
                    {"drop": None},
                ],
            }
        }
    }
    yield {
        "add": {
            "chain": {
                **B,
                "name": "forward",
                "type": "filter",
                "hook": "forward",
                "prio": -200,
                "policy": "accept",
            }
        }
    }
    yield {
        "add": {
            "rule": {
                **B,
                "chain": "forward",
                "expr": [
                    {"match": {"op": "==", "left": oif, "right": "@isolated_in"}},
                    not_ip,
                    {"counter": counters.object(COUNTER_NOT_IPV4, denied=True)},
                    {"drop": None},
                ],
            }
        }
    }


Made = list[tuple[str, str, str]]  # (kind "chain"|"map"|"set", family, name): non-base objects


def made_by(document: Json) -> Made:
    """The sets, maps and non-base chains `document` creates (what the next apply deletes)."""
    out: Made = []
    for cmd in document["nftables"]:
        for kind in ("chain", "map", "set"):
            body = cmd.get("add", {}).get(kind)
            if body is not None and "hook" not in body:
                out.append((kind, body["family"], body["name"]))
    return out


def in_place(document: Json, *, table: str, previous: Made) -> Json:
    """`document` rewritten to change the existing tables instead of replacing them.

    Same end state, still one transaction, but counter objects (and base
    chains) survive, so counts never reset and need no reading per apply.
    `previous` is what the last applied document made (`made_by`).
    """
    head: list[Json] = []
    for family in ("inet", "bridge"):
        head.append({"add": {"table": {"family": family, "name": table}}})
        head.append({"flush": {"table": {"family": family, "name": table}}})
    # maps and sets first: their elements refer to the chains deleted after them
    for kind, family, name in sorted(previous, key=lambda m: m[0] == "chain"):
        head.append({"delete": {kind: {"family": family, "table": table, "name": name}}})
    rest = [
        cmd
        for cmd in document["nftables"]
        if "table" not in cmd.get("add", {}) and "table" not in cmd.get("delete", {})
    ]
    return {"nftables": head + rest}
