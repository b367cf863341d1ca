"""Pure parts of the kernel backends: port prefixes, CIDR identities, disjoint intervals.

The kernel behaviour itself is proved with packets in tests/linux/test_netpol_matrix.py;
these pin the arithmetic the map contents depend on, over many cases.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from agent.netpol.ebpf_keys import (
    ANY_PROTOCOL,
    CIDR_IDENTITY_BASE,
    DIR_EGRESS,
    DIR_INGRESS,
    PolicyKey,
    cidr_identities,
    cidrs_within,
    policy_entries,
    port_prefixes,
)
from agent.netpol.nft_ruleset import atoms, direction_maps, disjoint
from agent.netpol.tables import (
    IPPROTO_TCP,
    CompiledPolicy,
    DirectionTable,
    Endpoint,
    EndpointTables,
    PortMatch,
    Rule,
)


def covered(prefixes: list[tuple[int, int]]) -> list[int]:
    return sorted(p for value, bits in prefixes for p in range(value, value + (1 << (16 - bits))))


@pytest.mark.parametrize("first,last", [(80, 80), (1, 65535), (0, 65535), (8000, 8100), (1, 2)])
def test_port_prefixes_cover_exactly_the_range(first: int, last: int) -> None:
    prefixes = port_prefixes(first, last)
    assert covered(prefixes) == list(range(first, last + 1))
    assert len(prefixes) <= 30


def test_port_prefixes_random_ranges_stay_small_and_exact() -> None:
    rng = random.Random(5)
    for _ in range(300):
        first = rng.randint(1, 65535)
        last = rng.randint(first, min(65535, first + rng.choice([0, 10, 1000, 65535])))
        prefixes = port_prefixes(first, last)
        assert len(prefixes) <= 30
        assert covered(prefixes) == list(range(first, last + 1))


def test_port_prefixes_reject_out_of_range() -> None:
    with pytest.raises(ValueError, match="70000"):
        port_prefixes(1, 70000)


def test_cidr_identities_are_stable_and_distinct() -> None:
    a, b, c = (IPv4Network(n) for n in ("10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24"))
    first = cidr_identities([a, b], {})
    assert sorted(first.values()) == [CIDR_IDENTITY_BASE, CIDR_IDENTITY_BASE + 1]
    second = cidr_identities([b, c], first)
    assert second[b] == first[b]
    assert second[c] not in (second[b],)


def test_cidrs_within_lists_nested_prefixes() -> None:
    a, b, c = (IPv4Network(n) for n in ("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24"))
    inside = cidrs_within([a, b, c])
    assert sorted(inside[a]) == [a, b, c]
    assert sorted(inside[b]) == [b, c]
    assert inside[c] == [c]


def _compiled(ingress: DirectionTable) -> CompiledPolicy:
    ep = Endpoint("x/a", IPv4Address("10.77.0.11"), "x", {"pod": "a"}, "nvhxa")
    entry = EndpointTables(ep, 256, ingress, DirectionTable(False, ()))
    return CompiledPolicy(1, {ep.ip: 256}, {"x/a": entry})


def test_policy_entries_grant_nested_cidr_identities_and_port_prefixes() -> None:
    outer, inner = IPv4Network("10.0.0.0/8"), IPv4Network("10.1.0.0/16")
    rules = (
        Rule("x/p", frozenset({257}), (outer,), (PortMatch(IPPROTO_TCP, 8000, 8001),)),
        Rule("x/q", frozenset(), (inner,), ()),
    )
    cidrs = cidr_identities([outer, inner], {})
    slots = {"x/p": 20, "x/q": 21}
    got = policy_entries(
        _compiled(DirectionTable(True, rules, ("x/p", "x/q"))), {"x/a": 7}, cidrs, slots.__getitem__
    )
    port_key = {(k.identity, k.protocol, k.port, k.port_bits): v for k, v in got.items()}
    for identity in (257, cidrs[outer], cidrs[inner]):  # outer's rule covers inner's addresses
        assert port_key[identity, IPPROTO_TCP, 8000, 15] == 20
    assert port_key[cidrs[inner], ANY_PROTOCOL, 0, 0] == 21
    assert (cidrs[outer], ANY_PROTOCOL, 0, 0) not in port_key
    assert all(k.endpoint == 7 and k.direction == DIR_INGRESS for k in got)
    assert PolicyKey(7, 257, DIR_INGRESS, IPPROTO_TCP, 8000, 15).prefixlen == 95


def test_unisolated_direction_has_no_entries() -> None:
    rules = (Rule("x/p", frozenset({257}), (), ()),)
    got = policy_entries(_compiled(DirectionTable(False, rules)), {"x/a": 7}, {}, lambda _: 20)
    assert got == {}
    assert DIR_EGRESS != DIR_INGRESS


def test_atoms_split_overlaps_with_every_covering_label() -> None:
    assert list(atoms([(0, 9, 0), (5, 14, 1)])) == [(0, 4, [0]), (5, 9, [0, 1]), (10, 14, [1])]
    assert list(atoms([(3, 3, 0), (7, 8, 1)])) == [(3, 3, [0]), (7, 8, [1])]


def test_disjoint_gives_overlaps_to_the_first_interval() -> None:
    # 91-95 is in the 2nd and 3rd interval: the 2nd ("b") comes first
    assert disjoint([(80, 90, "a"), (85, 100, "b"), (91, 95, "a")]) == [
        (80, 90, "a"),
        (91, 100, "b"),
    ]
    assert disjoint([(1, 5, "a"), (6, 9, "a")]) == [(1, 9, "a")]


def test_direction_maps_never_overlap() -> None:
    rng = random.Random(7)
    by_identity = {257: [IPv4Address("10.0.0.5")], 258: [IPv4Address("10.0.1.9")]}
    for _ in range(50):
        rules = tuple(
            Rule(
                f"x/p{n}",
                frozenset(rng.sample([257, 258], rng.randint(0, 2))),
                (IPv4Network(f"10.0.{rng.randint(0, 1)}.0/{rng.choice([24, 28, 32])}"),),
                tuple(
                    PortMatch(IPPROTO_TCP, a, a + rng.randint(0, 50))
                    for a in rng.sample(range(1, 200), rng.randint(0, 3))
                ),
            )
            for n in range(rng.randint(1, 5))
        )
        ports, anys = direction_maps(DirectionTable(True, rules), by_identity)
        assert len(ports) == len({(e[0], e[3]) for e in ports})
        for i, e in enumerate(ports):  # no two elements share an (address, port) point
            for f in ports[i + 1 :]:
                assert e[1] < f[0] or f[1] < e[0] or e[4] < f[3] or f[4] < e[3] or e[2] != f[2]
        for i, g in enumerate(anys):
            for h in anys[i + 1 :]:
                assert g[1] < h[0] or h[1] < g[0]
