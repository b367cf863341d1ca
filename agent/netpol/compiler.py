"""The policy compiler (pure): policies + endpoints + namespace labels -> CompiledPolicy.

Selection happens on identities, not on endpoints: every distinct (namespace,
label set) of the endpoints gets a numeric identity (as Cilium does), each
policy rule compiles once into the set of peer identities it allows plus its
CIDRs (excepts removed), and each endpoint's table is the union of the rules
of the policies that select it. The kernel then matches (identity, protocol,
port), whatever the number of rules.

Kubernetes semantics: a policy selects endpoints of its own namespace only;
a podSelector in a peer means pods of the policy's namespace; a
namespaceSelector matches namespaces by their labels (every namespace also
carries `nova.sh/namespace=<name>` and `kubernetes.io/metadata.name=<name>`);
both in one peer must both hold; a rule without peers allows every peer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, collapse_addresses

from agent.netpol.model import IPBlock, NetworkPolicy, Peer, PolicyRule
from agent.netpol.tables import (
    FIRST_ENDPOINT_IDENTITY,
    CompiledPolicy,
    DirectionTable,
    Endpoint,
    EndpointTables,
    Rule,
)

NAMESPACE_LABEL = "nova.sh/namespace"
KUBERNETES_NAMESPACE_LABEL = "kubernetes.io/metadata.name"
EVERYWHERE = IPv4Network("0.0.0.0/0")

IdentityKey = tuple[str, frozenset[tuple[str, str]]]  # (namespace, labels)


class IdentityAllocator:
    """Numeric identities of (namespace, label set), stable for as long as the set lives.

    The engine keeps one allocator across compiles. An identity whose label set
    is gone is released and never handed out again (ids only grow): a stale
    map entry or conntrack flow can then never be confused with a new set.
    """

    def __init__(self, first: int = FIRST_ENDPOINT_IDENTITY) -> None:
        self._ids: dict[IdentityKey, int] = {}
        self._next = first

    def sync(self, live: Iterable[IdentityKey]) -> dict[IdentityKey, int]:
        """Identities of exactly the `live` keys: known ones keep theirs, new ones get the next.

        New keys are allocated in sorted order, so the same history gives the same ids.
        """
        wanted = set(live)
        for gone in self._ids.keys() - wanted:
            del self._ids[gone]
        for key in sorted(wanted - self._ids.keys(), key=_sort_key):
            self._ids[key] = self._next
            self._next += 1
        return dict(self._ids)


def _sort_key(key: IdentityKey) -> tuple[str, list[tuple[str, str]]]:
    return key[0], sorted(key[1])


def identity_key(endpoint: Endpoint) -> IdentityKey:
    return endpoint.namespace, frozenset(endpoint.labels.items())


def namespace_labels_of(
    namespace: str, namespace_labels: Mapping[str, Mapping[str, str]]
) -> dict[str, str]:
    """A namespace's labels, with the two name labels every namespace carries."""
    return {
        **namespace_labels.get(namespace, {}),
        NAMESPACE_LABEL: namespace,
        KUBERNETES_NAMESPACE_LABEL: namespace,
    }


def compile_policy(
    policies: Sequence[NetworkPolicy],
    endpoints: Iterable[Endpoint],
    namespace_labels: Mapping[str, Mapping[str, str]],
    allocator: IdentityAllocator,
    generation: int,
    *,
    remote: Iterable[Endpoint] = (),
) -> CompiledPolicy:
    """The per-endpoint tables. Endpoints are taken in key order; an IP claimed twice
    keeps the first endpoint in that order (the other gets no ipcache entry).

    `remote` endpoints run on other hosts: they get identities and ipcache entries
    (so selectors match them as peers) but no tables (this host does not enforce
    them); a local endpoint wins an IP over a remote one."""
    ordered = sorted(endpoints, key=lambda e: e.key)
    others = sorted(remote, key=lambda e: e.key)
    ids = allocator.sync(identity_key(e) for e in (*ordered, *others))
    identities = _IdentityIndex(ids, namespace_labels)
    ordered_policies = sorted(policies, key=lambda p: (p.key, p.source, p.line))
    ingress_rules = {id(p): identities.rules(p, p.ingress) for p in ordered_policies}
    egress_rules = {id(p): identities.rules(p, p.egress) for p in ordered_policies}

    ipcache: dict[IPv4Address, int] = {}
    tables: dict[str, EndpointTables] = {}
    for endpoint in ordered:
        identity = ids[identity_key(endpoint)]
        ipcache.setdefault(endpoint.ip, identity)
        selecting = [
            p
            for p in ordered_policies
            if p.namespace == endpoint.namespace and p.pod_selector.matches(endpoint.labels)
        ]
        tables[endpoint.key] = EndpointTables(
            endpoint=endpoint,
            identity=identity,
            ingress=_direction([p for p in selecting if p.affects_ingress], ingress_rules),
            egress=_direction([p for p in selecting if p.affects_egress], egress_rules),
        )
    for endpoint in others:
        ipcache.setdefault(endpoint.ip, ids[identity_key(endpoint)])
    return CompiledPolicy(generation=generation, ipcache=ipcache, endpoints=tables)


def _direction(
    policies: list[NetworkPolicy], rules_of: Mapping[int, tuple[Rule, ...]]
) -> DirectionTable:
    if not policies:
        return DirectionTable(isolated=False, rules=())
    rules = tuple(rule for p in policies for rule in rules_of[id(p)])
    return DirectionTable(
        isolated=True, rules=rules, policies=tuple(sorted({p.key for p in policies}))
    )


@dataclass(frozen=True, slots=True)
class _Identity:
    id: int
    namespace: str
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str]


class _IdentityIndex:
    def __init__(
        self, ids: Mapping[IdentityKey, int], namespace_labels: Mapping[str, Mapping[str, str]]
    ) -> None:
        self.identities = [
            _Identity(i, ns, dict(labels), namespace_labels_of(ns, namespace_labels))
            for (ns, labels), i in sorted(ids.items(), key=lambda item: item[1])
        ]

    def rules(self, policy: NetworkPolicy, rules: Sequence[PolicyRule]) -> tuple[Rule, ...]:
        compiled = []
        for index, rule in enumerate(rules):
            if not rule.peers:
                identities: frozenset[int] = frozenset()
                cidrs: tuple[IPv4Network, ...] = (EVERYWHERE,)
            else:
                identities = frozenset(
                    i for peer in rule.peers for i in self._peer_identities(policy, peer)
                )
                cidrs = _cidrs(tuple(p.ip_block for p in rule.peers if p.ip_block is not None))
                if not identities and not cidrs:
                    continue  # selects nobody known: allows nothing (isolation still holds)
            compiled.append(Rule(policy.key, identities, cidrs, rule.ports, index=index))
        return tuple(compiled)

    def _peer_identities(self, policy: NetworkPolicy, peer: Peer) -> Iterable[int]:
        if peer.ip_block is not None:
            return ()
        pods, namespaces = peer.pod_selector, peer.namespace_selector
        return (
            ident.id
            for ident in self.identities
            if (
                namespaces.matches(ident.namespace_labels)
                if namespaces is not None
                else ident.namespace == policy.namespace
            )
            and (pods is None or pods.matches(ident.labels))
        )


@functools.lru_cache(maxsize=65536)
def _cidrs(blocks: tuple[IPBlock, ...]) -> tuple[IPv4Network, ...]:
    """The union of the blocks, each minus its excepts, as disjoint sorted prefixes.

    IPv6 blocks are dropped: Nova's segments carry IPv4 only, so they can match nothing.
    Cached: every compile meets the same blocks again, and `ipaddress` arithmetic was
    most of a 1,000-rule compile.
    """
    allowed: list[IPv4Network] = []
    for block in blocks:
        if not isinstance(block.cidr, IPv4Network):
            continue
        parts = [block.cidr]
        for excluded in block.excepts:
            assert isinstance(excluded, IPv4Network)  # the model checks the family
            parts = [piece for part in parts for piece in _exclude(part, excluded)]
        allowed.extend(parts)
    return tuple(collapse_addresses(allowed))


def _exclude(network: IPv4Network, excluded: IPv4Network) -> list[IPv4Network]:
    if excluded.subnet_of(network):
        return list(network.address_exclude(excluded))
    if network.subnet_of(excluded):
        return []
    return [network]


def rule_count(compiled: CompiledPolicy) -> int:
    """Rules across every endpoint and direction (the `nova_policy_rules` gauge)."""
    return sum(len(t.ingress.rules) + len(t.egress.rules) for t in compiled.endpoints.values())
