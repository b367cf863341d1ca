"""The policy compiler and `explain`, against Kubernetes' network-policy e2e scenarios.

As in the Kubernetes e2e suite: namespaces x, y, z (labelled ns=<name>), each
with pods a, b, c (labelled pod=<name>). For each scenario the full 9x9
reachability matrix the compiled tables give (via `explain`, which evaluates
exactly what the backends enforce) is compared with the expected one.
"""

from __future__ import annotations

import fnmatch
import textwrap
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from itertools import pairwise

import pytest

from agent.netpol.compiler import EVERYWHERE, IdentityAllocator, compile_policy, rule_count
from agent.netpol.explain import explain
from agent.netpol.model import NetworkPolicy, parse_policies
from agent.netpol.tables import (
    FIRST_ENDPOINT_IDENTITY,
    IDENTITY_WORLD,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CompiledPolicy,
    Endpoint,
    PortMatch,
)

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PEERS = tuple(f"{ns}/{pod}" for ns in NAMESPACES for pod in PODS)
NAMESPACE_LABELS = {ns: {"ns": ns} for ns in NAMESPACES}


def ip_of(peer: str) -> IPv4Address:
    ns, pod = peer.split("/")
    return IPv4Address(f"10.0.{NAMESPACES.index(ns) + 1}.{PODS.index(pod) + 1}")


def endpoint(peer: str, **labels: str) -> Endpoint:
    ns, pod = peer.split("/")
    return Endpoint(
        key=f"{ns}-{pod}",
        ip=ip_of(peer),
        namespace=ns,
        labels={"pod": pod, **labels},
        host_ifname=f"npc-{ns}{pod}",
    )


ENDPOINTS = [endpoint(peer) for peer in PEERS]


def policy(ns: str, name: str, spec: str) -> str:
    body = textwrap.indent(textwrap.dedent(spec), "  ")
    return (
        f"apiVersion: nova.sh/v1\nkind: NetworkPolicy\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"
    )


def load(*docs: str) -> list[NetworkPolicy]:
    return parse_policies("---\n".join(docs), "test.yaml")


def build(*docs: str, endpoints: Sequence[Endpoint] = ENDPOINTS) -> CompiledPolicy:
    return compile_policy(load(*docs), endpoints, NAMESPACE_LABELS, IdentityAllocator(), 1)


def reachability(compiled: CompiledPolicy, port: int = 80, protocol: int = IPPROTO_TCP) -> dict:  # type: ignore[type-arg]
    return {
        (s, d): explain(compiled, ip_of(s), ip_of(d), protocol, port).allowed
        for s in PEERS
        for d in PEERS
    }


class Expect:
    """An expected matrix: a default, then (src pattern, dst pattern, allowed) overrides.

    Patterns are globs over "ns/pod": "x/*", "*/a", "x/a". Loopback always passes.
    """

    def __init__(self, default: bool) -> None:
        self.matrix = {(s, d): default for s in PEERS for d in PEERS}

    def set(self, src: str, dst: str, allowed: bool) -> Expect:
        for s, d in self.matrix:
            if fnmatch.fnmatch(s, src) and fnmatch.fnmatch(d, dst):
                self.matrix[(s, d)] = allowed
        return self

    def result(self) -> dict:  # type: ignore[type-arg]
        return {(s, d): (True if s == d else v) for (s, d), v in self.matrix.items()}


def assert_matrix(actual: dict, expected: Expect) -> None:  # type: ignore[type-arg]
    want = expected.result()
    wrong = [
        f"{s} -> {d}: got {'allow' if actual[(s, d)] else 'deny'}"
        for (s, d) in want
        if actual[(s, d)] != want[(s, d)]
    ]
    assert not wrong, "reachability differs:\n" + "\n".join(wrong)


# -- the e2e scenarios ---------------------------------------------------------


def test_no_policy_allows_everything() -> None:
    assert_matrix(reachability(build()), Expect(True))


def test_default_deny_ingress_isolates_only_its_namespace() -> None:
    compiled = build(policy("x", "deny", "podSelector: {}\npolicyTypes: [Ingress]\n"))
    assert_matrix(reachability(compiled), Expect(True).set("*", "x/*", False))


def test_default_deny_egress() -> None:
    compiled = build(policy("x", "deny", "podSelector: {}\npolicyTypes: [Egress]\n"))
    assert_matrix(reachability(compiled), Expect(True).set("x/*", "*", False))


def test_default_deny_both_directions() -> None:
    compiled = build(policy("x", "deny", "podSelector: {}\npolicyTypes: [Ingress, Egress]\n"))
    assert_matrix(
        reachability(compiled), Expect(True).set("x/*", "*", False).set("*", "x/*", False)
    )


def test_allow_by_pod_label_within_the_namespace_only() -> None:
    compiled = build(
        policy(
            "x",
            "allow-b",
            """\
            podSelector: {matchLabels: {pod: a}}
            ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
            """,
        )
    )
    # y/b and z/b carry pod=b too, but a podSelector alone means x's pods.
    assert_matrix(
        reachability(compiled), Expect(True).set("*", "x/a", False).set("x/b", "x/a", True)
    )


def test_allow_by_namespace_label() -> None:
    compiled = build(
        policy(
            "x",
            "allow-y",
            """\
            podSelector: {matchLabels: {pod: a}}
            ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
            """,
        )
    )
    assert_matrix(
        reachability(compiled), Expect(True).set("*", "x/a", False).set("y/*", "x/a", True)
    )


def test_namespace_selector_match_expressions() -> None:
    compiled = build(
        policy(
            "x",
            "not-x",
            """\
            podSelector: {matchLabels: {pod: a}}
            ingress:
              - from:
                  - namespaceSelector:
                      matchExpressions: [{key: ns, operator: NotIn, values: [x]}]
            """,
        )
    )
    assert_matrix(reachability(compiled), Expect(True).set("x/*", "x/a", False))


def test_pod_and_namespace_selector_in_one_peer_must_both_match() -> None:
    compiled = build(
        policy(
            "x",
            "and",
            """\
            podSelector: {matchLabels: {pod: a}}
            ingress:
              - from:
                  - namespaceSelector: {matchLabels: {ns: y}}
                    podSelector: {matchLabels: {pod: b}}
            """,
        )
    )
    assert_matrix(
        reachability(compiled), Expect(True).set("*", "x/a", False).set("y/b", "x/a", True)
    )


def test_pod_and_namespace_selector_as_two_peers_are_ored() -> None:
    compiled = build(
        policy(
            "x",
            "or",
            """\
            podSelector: {matchLabels: {pod: a}}
            ingress:
              - from:
                  - namespaceSelector: {matchLabels: {ns: y}}
                  - podSelector: {matchLabels: {pod: b}}
            """,
        )
    )
    expected = Expect(True).set("*", "x/a", False).set("y/*", "x/a", True).set("x/b", "x/a", True)
    assert_matrix(reachability(compiled), expected)


def test_empty_pod_selector_peer_means_every_pod_of_the_namespace() -> None:
    compiled = build(
        policy("x", "same-ns", "podSelector: {}\ningress: [{from: [{podSelector: {}}]}]\n")
    )
    assert_matrix(
        reachability(compiled), Expect(True).set("*", "x/*", False).set("x/*", "x/*", True)
    )


def test_empty_namespace_selector_peer_means_every_namespace() -> None:
    compiled = build(
        policy(
            "x",
            "all-ns-b",
            """\
            podSelector: {}
            ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]}]
            """,
        )
    )
    assert_matrix(
        reachability(compiled), Expect(True).set("*", "x/*", False).set("*/b", "x/*", True)
    )


def test_ingress_rule_without_peers_allows_everyone() -> None:
    compiled = build(
        policy("x", "deny", "podSelector: {}\npolicyTypes: [Ingress]\n"),
        policy("x", "allow-all", "podSelector: {}\ningress: [{}]\n"),
    )
    assert_matrix(reachability(compiled), Expect(True))


def test_multiple_policies_are_unioned() -> None:
    compiled = build(
        policy(
            "x",
            "from-b",
            "podSelector: {matchLabels: {pod: a}}\n"
            "ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
        ),
        policy(
            "x",
            "from-z",
            "podSelector: {matchLabels: {pod: a}}\n"
            "ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]\n",
        ),
    )
    expected = Expect(True).set("*", "x/a", False).set("x/b", "x/a", True).set("z/*", "x/a", True)
    assert_matrix(reachability(compiled), expected)
    tables = compiled.endpoints["x-a"].ingress
    assert tables.policies == ("x/from-b", "x/from-z")


def test_policies_never_select_other_namespaces() -> None:
    # y's deny-all must not touch x or z, even though x's and z's pods match {}.
    compiled = build(policy("y", "deny", "podSelector: {}\npolicyTypes: [Ingress, Egress]\n"))
    assert_matrix(
        reachability(compiled), Expect(True).set("y/*", "*", False).set("*", "y/*", False)
    )


def test_egress_only_policy_leaves_ingress_open() -> None:
    compiled = build(
        policy(
            "x",
            "a-to-b",
            """\
            podSelector: {matchLabels: {pod: a}}
            policyTypes: [Egress]
            egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]
            """,
        )
    )
    assert_matrix(
        reachability(compiled), Expect(True).set("x/a", "*", False).set("x/a", "x/b", True)
    )
    assert not compiled.endpoints["x-a"].ingress.isolated


def test_both_ends_must_allow() -> None:
    # x/a may send to anyone, but y/b accepts nothing: egress allowed, ingress denied.
    compiled = build(
        policy("x", "out", "podSelector: {}\npolicyTypes: [Egress]\negress: [{}]\n"),
        policy("y", "in", "podSelector: {matchLabels: {pod: b}}\npolicyTypes: [Ingress]\n"),
    )
    assert_matrix(reachability(compiled), Expect(True).set("*", "y/b", False))
    verdict = explain(compiled, ip_of("x/a"), ip_of("y/b"), IPPROTO_TCP, 80)
    assert verdict.egress.allowed and verdict.egress.policy == "x/out"
    assert not verdict.ingress.allowed
    assert "y-b is isolated for ingress by y/in" in verdict.ingress.reason


def test_ports_and_port_ranges() -> None:
    compiled = build(
        policy(
            "x",
            "ports",
            """\
            podSelector: {matchLabels: {pod: a}}
            ingress:
              - ports: [{port: 80}, {port: 8000, endPort: 8080}, {protocol: UDP, port: 53}]
            """,
        )
    )
    closed = Expect(True).set("*", "x/a", False)
    assert_matrix(reachability(compiled, 80), Expect(True))
    assert_matrix(reachability(compiled, 81), closed)
    assert_matrix(reachability(compiled, 8000), Expect(True))
    assert_matrix(reachability(compiled, 8080), Expect(True))
    assert_matrix(reachability(compiled, 8081), closed)
    assert_matrix(reachability(compiled, 53, IPPROTO_UDP), Expect(True))
    assert_matrix(reachability(compiled, 53, IPPROTO_TCP), closed)
    assert_matrix(reachability(compiled, 80, IPPROTO_UDP), closed)
    assert_matrix(reachability(compiled, 80, IPPROTO_SCTP), closed)


def test_protocol_without_port_allows_every_port_of_that_protocol() -> None:
    compiled = build(policy("x", "udp", "podSelector: {}\ningress: [{ports: [{protocol: UDP}]}]\n"))
    assert_matrix(reachability(compiled, 1, IPPROTO_UDP), Expect(True))
    assert_matrix(reachability(compiled, 65535, IPPROTO_UDP), Expect(True))
    assert_matrix(reachability(compiled, 80, IPPROTO_TCP), Expect(True).set("*", "x/*", False))


def test_egress_cidr_with_except() -> None:
    compiled = build(
        policy(
            "x",
            "cidr",
            """\
            podSelector: {matchLabels: {pod: a}}
            policyTypes: [Egress]
            egress:
              - to:
                  - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24, 10.0.3.3/32]}
            """,
        )
    )
    # y (10.0.2.0/24) and z/c (10.0.3.3) are excepted.
    expected = Expect(True).set("x/a", "y/*", False).set("x/a", "z/c", False)
    assert_matrix(reachability(compiled), expected)
    (rule,) = compiled.endpoints["x-a"].egress.rules
    assert rule.identities == frozenset()
    assert all(a.broadcast_address < b.network_address for a, b in pairwise(rule.cidrs))
    assert IPv4Network("10.0.2.0/24") not in rule.cidrs
    assert sum(n.num_addresses for n in rule.cidrs) == 2**16 - 256 - 1


def test_ingress_cidr_for_addresses_outside_the_node() -> None:
    compiled = build(
        policy(
            "x",
            "world",
            """\
            podSelector: {}
            ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.9.0/24]}}]}]
            """,
        )
    )
    dst = ip_of("x/a")
    allowed = explain(compiled, IPv4Address("192.168.1.1"), dst, IPPROTO_TCP, 80)
    assert allowed.allowed and allowed.src_identity == IDENTITY_WORLD
    assert allowed.ingress.reason == "allowed by policy x/world, ingress rule 0"
    assert allowed.egress.endpoint is None  # the sender is not ours to filter
    assert not explain(compiled, IPv4Address("192.168.9.1"), dst, IPPROTO_TCP, 80).allowed
    assert not explain(compiled, IPv4Address("172.16.0.1"), dst, IPPROTO_TCP, 80).allowed


def test_cidr_rules_apply_to_endpoint_addresses_too() -> None:
    compiled = build(
        policy(
            "x",
            "cidr-in",
            "podSelector: {matchLabels: {pod: a}}\n"
            "ingress: [{from: [{ipBlock: {cidr: 10.0.3.0/24}}]}]\n",
        )
    )
    assert_matrix(
        reachability(compiled), Expect(True).set("*", "x/a", False).set("z/*", "x/a", True)
    )


def test_ipv6_blocks_match_nothing() -> None:
    compiled = build(
        policy("x", "v6", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: '::/0'}}]}]\n")
    )
    assert_matrix(reachability(compiled), Expect(True).set("*", "x/*", False))
    assert compiled.endpoints["x-a"].ingress.rules == ()


def test_peer_selecting_nobody_allows_nothing_but_still_isolates() -> None:
    compiled = build(
        policy(
            "x",
            "ghost",
            "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {pod: ghost}}}]}]\n",
        )
    )
    assert_matrix(reachability(compiled), Expect(True).set("*", "x/*", False))


def test_policy_types_without_rules_for_egress_isolate_with_no_rules() -> None:
    compiled = build(
        policy(
            "x",
            "in-only-rules",
            "podSelector: {}\npolicyTypes: [Ingress, Egress]\ningress: [{}]\n",
        )
    )
    assert_matrix(reachability(compiled), Expect(True).set("x/*", "*", False))


def test_ingress_rules_are_ignored_when_policy_types_exclude_ingress() -> None:
    compiled = build(
        policy(
            "x",
            "egress-only",
            "podSelector: {}\npolicyTypes: [Egress]\negress: [{}]\n"
            "ingress: [{from: [{podSelector: {matchLabels: {pod: none}}}]}]\n",
        )
    )
    assert_matrix(reachability(compiled), Expect(True))


def test_namespace_name_labels_are_automatic() -> None:
    compiled = compile_policy(
        load(
            policy(
                "x",
                "by-name",
                "podSelector: {}\ningress:\n"
                "  - from: [{namespaceSelector: {matchLabels: {nova.sh/namespace: y}}}]\n"
                "  - from: [{namespaceSelector: "
                "{matchLabels: {kubernetes.io/metadata.name: z}}}]\n",
            )
        ),
        ENDPOINTS,
        {},  # no namespace labels known at all
        IdentityAllocator(),
        1,
    )
    expected = Expect(True).set("*", "x/*", False).set("y/*", "x/*", True).set("z/*", "x/*", True)
    assert_matrix(reachability(compiled), expected)


def test_brief_example_tiers() -> None:
    web = Endpoint("web", IPv4Address("10.1.0.2"), "default", {"tier": "web"}, "npc-web")
    front = Endpoint("front", IPv4Address("10.1.0.3"), "default", {"tier": "frontend"}, "npc-fr")
    db = Endpoint("db", IPv4Address("10.1.0.4"), "default", {"tier": "database"}, "npc-db")
    text = (
        "apiVersion: nova.sh/v1\nkind: NetworkPolicy\nmetadata: {name: web-tier-policy}\n"
        "spec:\n  podSelector: {tier: web}\n"
        "  ingress: [{from: [{podSelector: {tier: frontend}}], ports: [{port: 8080}]}]\n"
        "  egress: [{to: [{podSelector: {tier: database}}], ports: [{port: 5432}]}]\n"
    )
    compiled = compile_policy(
        parse_policies(text, "web.yaml"), [web, front, db], {}, IdentityAllocator(), 1
    )

    def allowed(src: Endpoint, dst: Endpoint, port: int) -> bool:
        return explain(compiled, src.ip, dst.ip, IPPROTO_TCP, port).allowed

    assert allowed(front, web, 8080)
    assert not allowed(front, web, 80)
    assert not allowed(db, web, 8080)
    assert allowed(web, db, 5432)
    assert not allowed(web, db, 5433)
    assert not allowed(web, front, 8080)
    assert allowed(front, db, 9999)  # neither is selected


# -- identities and the shape of the tables -----------------------------------


def test_identities_follow_label_sets_and_stay_stable() -> None:
    allocator = IdentityAllocator()
    first = compile_policy([], ENDPOINTS, NAMESPACE_LABELS, allocator, 1)
    ids = {key: t.identity for key, t in first.endpoints.items()}
    assert min(ids.values()) == FIRST_ENDPOINT_IDENTITY
    assert len(set(ids.values())) == 9  # nine distinct (namespace, labels)

    # A second replica of x/a shares its identity; y/c going away keeps the others.
    twin = Endpoint("x-a2", IPv4Address("10.0.1.9"), "x", {"pod": "a"}, "npc-xa2")
    rest = [e for e in ENDPOINTS if e.key != "y-c"]
    second = compile_policy([], [*rest, twin], NAMESPACE_LABELS, allocator, 2)
    assert second.endpoints["x-a2"].identity == ids["x-a"]
    assert {k: t.identity for k, t in second.endpoints.items() if k != "x-a2"} == {
        k: v for k, v in ids.items() if k != "y-c"
    }
    assert second.ipcache[IPv4Address("10.0.1.9")] == ids["x-a"]
    assert second.generation == 2

    # A released label set is never reused: y/c coming back gets a new id.
    third = compile_policy([], ENDPOINTS, NAMESPACE_LABELS, allocator, 3)
    assert third.endpoints["y-c"].identity not in ids.values()

    # Relabelling moves the endpoint to another identity.
    relabelled = [endpoint("x/a", role="db"), *ENDPOINTS[1:]]
    fourth = compile_policy([], relabelled, NAMESPACE_LABELS, allocator, 4)
    assert fourth.endpoints["x-a"].identity not in ids.values()


def test_same_labels_in_other_namespaces_are_other_identities() -> None:
    compiled = build()
    assert compiled.endpoints["x-a"].identity != compiled.endpoints["y-a"].identity


def test_compile_is_deterministic() -> None:
    docs = (
        policy("x", "p1", "podSelector: {}\ningress: [{from: [{namespaceSelector: {}}]}]\n"),
        policy("x", "p2", "podSelector: {matchLabels: {pod: a}}\negress: [{ports: [{port: 1}]}]\n"),
    )
    one = build(*docs)
    two = compile_policy(
        list(reversed(load(*docs))),
        list(reversed(ENDPOINTS)),
        NAMESPACE_LABELS,
        IdentityAllocator(),
        1,
    )
    assert one == two


def test_table_shape() -> None:
    compiled = build(
        policy(
            "x",
            "shape",
            """\
            podSelector: {matchLabels: {pod: a}}
            ingress:
              - from: [{podSelector: {matchLabels: {pod: b}}}, {ipBlock: {cidr: 1.2.3.0/24}}]
                ports: [{port: 443}]
              - {}
            """,
        )
    )
    table = compiled.endpoints["x-a"].ingress
    assert table.isolated and table.policies == ("x/shape",)
    first, second = table.rules
    assert (first.policy, first.index, second.index) == ("x/shape", 0, 1)
    assert first.identities == {compiled.endpoints["x-b"].identity}
    assert first.cidrs == (IPv4Network("1.2.3.0/24"),)
    assert first.ports == (PortMatch(IPPROTO_TCP, 443, 443),)
    assert (second.identities, second.cidrs, second.ports) == (frozenset(), (EVERYWHERE,), ())
    assert not compiled.endpoints["x-b"].ingress.isolated
    assert rule_count(compiled) == 2
    assert len(compiled.ipcache) == 9


def test_explain_loopback_and_reasons() -> None:
    compiled = build(policy("x", "deny", "podSelector: {}\npolicyTypes: [Ingress, Egress]\n"))
    self_talk = explain(compiled, ip_of("x/a"), ip_of("x/a"), IPPROTO_TCP, 80)
    assert self_talk.allowed and "loopback" in self_talk.egress.reason
    denied = explain(compiled, ip_of("x/a"), ip_of("x/b"), IPPROTO_TCP, 80)
    assert not denied.allowed
    assert denied.egress.reason == (
        "x-a is isolated for egress by x/deny and no rule allows TCP/80 to 10.0.1.2 "
        f"(identity {compiled.endpoints['x-b'].identity}): default deny"
    )
    open_side = explain(compiled, ip_of("y/a"), ip_of("z/a"), IPPROTO_UDP, 53)
    assert open_side.allowed
    assert (
        open_side.to_dict()["ingress"]["reason"] == "no policy selects z-a for ingress: all allowed"
    )


@pytest.mark.parametrize("count", [1, 50])
def test_many_policies_compile_to_tables_per_endpoint(count: int) -> None:
    docs = [
        policy(
            "x",
            f"p{i}",
            f"podSelector: {{}}\ningress: [{{ports: [{{port: {1000 + i}}}]}}]\n",
        )
        for i in range(count)
    ]
    compiled = build(*docs)
    assert rule_count(compiled) == 3 * count
    assert explain(compiled, ip_of("y/a"), ip_of("x/a"), IPPROTO_TCP, 1000 + count - 1).allowed
    assert not explain(compiled, ip_of("y/a"), ip_of("x/a"), IPPROTO_TCP, 1000 + count).allowed


def test_remote_endpoints_are_peers_but_not_enforced_here() -> None:
    """Other hosts' containers get identities and ipcache entries, never tables."""
    doc = policy(
        "x",
        "allow-b",
        """\
        podSelector: {matchLabels: {pod: a}}
        ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
        """,
    )
    local = [endpoint("x/a")]
    remote = [endpoint("x/b"), endpoint("x/c")]
    compiled = compile_policy(
        load(doc), local, NAMESPACE_LABELS, IdentityAllocator(), 1, remote=remote
    )
    assert set(compiled.endpoints) == {"x-a"}  # only this host's container is enforced
    assert set(compiled.ipcache) == {ip_of("x/a"), ip_of("x/b"), ip_of("x/c")}
    [rule] = compiled.endpoints["x-a"].ingress.rules
    assert rule.identities == {compiled.ipcache[ip_of("x/b")]}  # the remote x/b is a peer
    assert compiled.ipcache[ip_of("x/c")] not in rule.identities
    # A local endpoint wins an address over a stale remote entry.
    stale = Endpoint("n2/old", ip_of("x/a"), "x", {"pod": "b"}, "")
    again = compile_policy(
        load(doc), local, NAMESPACE_LABELS, IdentityAllocator(), 2, remote=[stale]
    )
    assert again.ipcache[ip_of("x/a")] == again.endpoints["x-a"].identity
