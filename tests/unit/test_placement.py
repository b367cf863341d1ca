"""Placement: the pure engine's guarantees, case by case, and against a brute-force reference."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from fractions import Fraction
from math import floor

import pytest

from bench.placement import synthetic_cluster
from coordinator.placement import (
    Decision,
    Node,
    Overcommit,
    Placement,
    PlacementInputError,
    PlacementResult,
    QuotaDemand,
    QuotaRefusal,
    Reason,
    ReplicaId,
    Request,
    Resources,
    Selector,
    Snapshot,
    Strategy,
    place,
)

MiB = 1 << 20
GiB = 1 << 30
SMALL = Resources(250, 256 * MiB)
CORE_GIB = Resources(1000, GiB)


def node(name: str, cpu: int = 1000, mem: int = GiB, **labels: str) -> Node:
    return Node(name, Resources(cpu, mem), labels)


def req(
    name: str, replicas: int, res: Resources = SMALL, ns: str = "default", **kw: object
) -> Request:
    return Request(ns, name, replicas, res, **kw)  # type: ignore[arg-type]


def nodes_of(result: PlacementResult, name: str | None = None) -> Counter[str]:
    """How many replicas (of deployment `name`, or of all) each node got."""
    return Counter(d.node for d in result.decisions if name is None or d.replica.name == name)


def as_placements(result: PlacementResult, requests: Sequence[Request]) -> tuple[Placement, ...]:
    """The result written back as the next snapshot's placements (what the loop persists)."""
    size = {(r.namespace, r.name): r.resources for r in requests}
    return tuple(
        Placement(d.replica, d.node, size[(d.replica.namespace, d.replica.name)])
        for d in result.decisions
    )


def replica_ids(result: PlacementResult) -> list[ReplicaId]:
    return [d.replica for d in result.decisions]


# -- resources ------------------------------------------------------------------------


def test_capacity_is_respected_exactly() -> None:
    result = place(Snapshot((node("n1"),)), [req("web", 5)])
    assert nodes_of(result) == {"n1": 4}  # 4 x 250m = 1000m: exactly full
    [unplaced] = result.unplaced
    assert (unplaced.name, unplaced.indices, unplaced.reason) == (
        "web",
        (4,),
        Reason.INSUFFICIENT_RESOURCES,
    )
    assert "250m CPU and 256 MiB" in unplaced.detail


def test_memory_alone_can_be_the_limit() -> None:
    big_memory = Resources(10, 400 * MiB)
    result = place(Snapshot((node("n1"),)), [req("cache", 3, big_memory)])
    assert len(result.decisions) == 2  # 800 MiB used; 1200 MiB would exceed 1 GiB
    assert result.unplaced[0].indices == (2,)


def test_allocated_resources_count_against_capacity() -> None:
    busy = Node("n1", CORE_GIB, allocated=Resources(500, 0))
    assert len(place(Snapshot((busy,)), [req("web", 4)]).decisions) == 2


def test_no_overcommit_by_default_and_the_factor_is_honoured() -> None:
    snapshot = Snapshot((node("n1"),))
    assert len(place(snapshot, [req("web", 10)]).decisions) == 4
    assert len(place(snapshot, [req("web", 10)], overcommit=2.0).decisions) == 8
    # CPU only: memory (256 MiB x 4 = 1 GiB) stays the limit.
    assert len(place(snapshot, [req("web", 10)], overcommit=Overcommit(cpu=3.0)).decisions) == 4
    tiny_memory = Resources(250, 1)
    assert (
        len(place(snapshot, [req("w", 20, tiny_memory)], overcommit=Overcommit(cpu=1.5)).decisions)
        == 6
    )


def test_overcommit_limit_is_floored_exactly() -> None:
    snapshot = Snapshot((node("n1", cpu=1001),))
    # floor(1001 * 1.1) = 1101 millicores: 11 replicas of 100m, not 12.
    expected = floor(Fraction(1001) * Fraction(1.1)) // 100
    result = place(snapshot, [req("w", 20, Resources(100, 0))], overcommit=1.1)
    assert len(result.decisions) == expected == 11


@pytest.mark.parametrize("factor", [0.5, 0.99, float("inf"), float("nan")])
def test_overcommit_below_one_or_not_finite_is_refused(factor: float) -> None:
    with pytest.raises(PlacementInputError, match="overcommit"):
        place(Snapshot((node("n1"),)), [req("w", 1)], overcommit=factor)


# -- spread ---------------------------------------------------------------------------


def test_spread_evens_replicas_across_nodes() -> None:
    nodes = tuple(node(f"n{i}", cpu=10_000, mem=100 * GiB) for i in range(10))
    result = place(Snapshot(nodes), [req("web", 25)])
    counts = nodes_of(result)
    assert len(counts) == 10 and set(counts.values()) == {2, 3}


def test_spread_wins_over_bin_packing_within_a_deployment() -> None:
    nodes = tuple(node(f"n{i}", cpu=10_000, mem=100 * GiB) for i in range(4))
    result = place(Snapshot(nodes), [req("web", 4)], strategy="bin-pack")
    assert nodes_of(result) == {"n0": 1, "n1": 1, "n2": 1, "n3": 1}


def test_zone_spread_evens_replicas_across_label_values() -> None:
    # Zone a has most nodes, and its names sort first.
    nodes = (
        *(node(f"a{i}", zone="a") for i in range(6)),
        *(node(f"b{i}", zone="b") for i in range(2)),
        node("c0", zone="c"),
    )
    snapshot = Snapshot(nodes)
    plain = place(snapshot, [req("web", 6)])
    assert {n[0] for n in nodes_of(plain)} == {"a"}  # ties by name: all in zone a
    zoned = place(snapshot, [req("web", 6, spread_key="zone")])
    per_zone = Counter(d.node[0] for d in zoned.decisions)
    assert per_zone == {"a": 2, "b": 2, "c": 2}
    assert nodes_of(zoned)["c0"] == 2  # the only node of zone c takes both


def test_zone_spread_counts_kept_replicas() -> None:
    nodes = (node("a0", zone="a"), node("a1", zone="a"), node("b0", zone="b"))
    kept = (
        Placement(ReplicaId("default", "web", 0), "a0", SMALL),
        Placement(ReplicaId("default", "web", 1), "a1", SMALL),
    )
    result = place(Snapshot(nodes, kept), [req("web", 4, spread_key="zone")])
    new = [d for d in result.decisions if d.is_new]
    assert [d.node for d in new] == ["b0", "b0"]  # zone b had none: it catches up


def test_nodes_without_the_spread_label_form_one_domain() -> None:
    nodes = (node("x0"), node("x1"), node("z0", zone="a"))
    result = place(Snapshot(nodes), [req("web", 2, spread_key="zone")])
    assert sorted(d.node for d in result.decisions) == ["x0", "z0"]


def test_spread_fills_nodes_that_lack_replicas_first_when_kept_ones_are_uneven() -> None:
    nodes = tuple(node(f"n{i}", cpu=10_000, mem=100 * GiB) for i in range(3))
    kept = tuple(Placement(ReplicaId("default", "web", i), "n0", SMALL) for i in range(3))
    result = place(Snapshot(nodes, kept), [req("web", 7)])
    assert nodes_of(result) == {"n0": 3, "n1": 2, "n2": 2}


def test_spread_is_soft_when_only_one_node_fits() -> None:
    nodes = (node("big", cpu=4000, mem=4 * GiB), node("small", cpu=100, mem=GiB))
    result = place(Snapshot(nodes), [req("web", 3)])
    assert nodes_of(result) == {"big": 3}


# -- constraints and health ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (Selector.equals("disk", "ssd"), {"ssd1", "ssd2"}),
        (Selector.one_of("zone", "a", "b"), {"ssd1", "hdd1", "ssd2"}),
        (Selector.none_of("disk", "ssd"), {"hdd1", "bare"}),  # absent label matches notin
        (Selector.exists("disk"), {"ssd1", "ssd2", "hdd1"}),
        (Selector.absent("disk"), {"bare"}),
    ],
)
def test_label_constraints(selector: Selector, expected: set[str]) -> None:
    nodes = (
        node("ssd1", disk="ssd", zone="a"),
        node("ssd2", disk="ssd", zone="b"),
        node("hdd1", disk="hdd", zone="a"),
        node("bare", zone="c"),
    )
    result = place(Snapshot(nodes), [req("w", 8, Resources(1, 1), constraints=(selector,))])
    assert set(nodes_of(result)) == expected


def test_all_constraints_must_hold() -> None:
    nodes = (node("n1", disk="ssd", zone="a"), node("n2", disk="ssd", zone="b"))
    both = (Selector.equals("disk", "ssd"), Selector.equals("zone", "b"))
    assert set(nodes_of(place(Snapshot(nodes), [req("w", 2, constraints=both)]))) == {"n2"}


def test_constraints_that_match_nothing_are_reported() -> None:
    ssd = (Selector.equals("disk", "ssd"),)
    result = place(Snapshot((node("n1", disk="hdd"),)), [req("db", 2, constraints=ssd)])
    [unplaced] = result.unplaced
    assert unplaced.reason is Reason.NO_ELIGIBLE_NODE and unplaced.indices == (0, 1)
    assert "disk=ssd" in unplaced.detail


def test_unhealthy_nodes_are_excluded() -> None:
    nodes = (replace(node("a"), healthy=False), node("b"), replace(node("c"), healthy=False))
    result = place(Snapshot(nodes), [req("web", 3, Resources(1, 1))])
    assert nodes_of(result) == {"b": 3}


def test_only_unhealthy_matches_say_so() -> None:
    nodes = (replace(node("a", disk="ssd"), healthy=False), node("b"))
    ssd = (Selector.equals("disk", "ssd"),)
    [unplaced] = place(Snapshot(nodes), [req("db", 1, constraints=ssd)]).unplaced
    assert unplaced.reason is Reason.NO_ELIGIBLE_NODE
    assert "1 matching nodes are unhealthy" in unplaced.detail


def test_empty_cluster_places_nothing() -> None:
    [unplaced] = place(Snapshot(()), [req("web", 2)]).unplaced
    assert unplaced.reason is Reason.NO_ELIGIBLE_NODE


# -- strategies ---------------------------------------------------------------------------------


def test_least_loaded_and_bin_pack_choose_opposite_nodes() -> None:
    nodes = (Node("busy", CORE_GIB, allocated=Resources(500, 0)), node("idle"))
    least = place(Snapshot(nodes), [req("w", 1)], strategy=Strategy.LEAST_LOADED)
    packed = place(Snapshot(nodes), [req("w", 1)], strategy=Strategy.BIN_PACK)
    assert [d.node for d in least.decisions] == ["idle"]
    assert [d.node for d in packed.decisions] == ["busy"]


def test_bin_pack_uses_fewer_nodes_than_least_loaded() -> None:
    nodes = tuple(node(f"n{i:02d}", cpu=4000, mem=4 * GiB) for i in range(20))
    requests = [req(f"app{i}", 2, Resources(500, 256 * MiB)) for i in range(16)]
    least = place(Snapshot(nodes), requests)
    packed = place(Snapshot(nodes), requests, strategy="bin-pack")
    assert len(nodes_of(least)) == 20
    assert len(nodes_of(packed)) == 4  # 32 x 500m = 16 cores = four full nodes
    assert least.unplaced == packed.unplaced == ()


def test_bin_pack_prefers_the_fullest_node_that_still_fits() -> None:
    nodes = (
        Node("almost", CORE_GIB, allocated=Resources(900, 0)),  # no room for 250m
        Node("half", CORE_GIB, allocated=Resources(500, 0)),
        node("empty"),
    )
    result = place(Snapshot(nodes), [req("w", 1)], strategy="bin-pack")
    assert [d.node for d in result.decisions] == ["half"]


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(PlacementInputError, match="least-loaded, bin-pack"):
        place(Snapshot(()), [], strategy="random")


# -- determinism and stability ------------------------------------------------------------------


def test_ties_are_broken_by_node_name() -> None:
    nodes = (node("c"), node("a"), node("b"))
    assert [d.node for d in place(Snapshot(nodes), [req("w", 1)]).decisions] == ["a"]
    packed = place(Snapshot(nodes), [req("w", 1)], strategy="bin-pack")
    assert [d.node for d in packed.decisions] == ["a"]


def test_same_input_same_output_whatever_the_order() -> None:
    rng = random.Random(7)
    snapshot, requests = random_case(rng, nodes=40, deployments=25)
    first = place(snapshot, requests)
    assert place(snapshot, requests) == first
    shuffled_nodes = list(snapshot.nodes)
    shuffled_placements = list(snapshot.placements)
    shuffled_requests = list(requests)
    for items in (shuffled_nodes, shuffled_placements, shuffled_requests):
        rng.shuffle(items)
    again = place(Snapshot(tuple(shuffled_nodes), tuple(shuffled_placements)), shuffled_requests)
    assert again == first


def test_existing_placements_stay_where_they_are() -> None:
    nodes = (node("a"), node("b"), node("c"))
    first = place(Snapshot(nodes), [req("web", 2)])
    assert [d.node for d in first.decisions] == ["a", "b"]
    # Make the old nodes the worst choice; scale up: old replicas still stay.
    loaded = tuple(replace(n, allocated=Resources(400, 0)) if n.name != "c" else n for n in nodes)
    requests = [req("web", 3)]
    second = place(Snapshot(loaded, as_placements(first, requests)), requests)
    assert [(d.node, d.previous) for d in second.decisions] == [("a", "a"), ("b", "b"), ("c", None)]
    assert second.released == ()


def test_replicas_stay_on_a_node_whose_labels_no_longer_match() -> None:
    ssd = (Selector.equals("disk", "ssd"),)
    kept = (Placement(ReplicaId("default", "db", 0), "n1", SMALL),)
    snapshot = Snapshot((node("n1", disk="hdd"), node("n2", disk="ssd")), kept)
    result = place(snapshot, [req("db", 2, constraints=ssd)])
    assert [(d.node, d.previous) for d in result.decisions] == [("n1", "n1"), ("n2", None)]


def test_scaling_down_releases_the_highest_replicas() -> None:
    requests = [req("web", 4)]
    snapshot = Snapshot((node("a"), node("b")))
    first = place(snapshot, requests)
    down = place(replace(snapshot, placements=as_placements(first, requests)), [req("web", 2)])
    assert [d.replica.index for d in down.decisions] == [0, 1]
    assert all(d.is_kept for d in down.decisions)
    assert [p.replica.index for p in down.released] == [2, 3]


def test_placements_of_deployments_not_requested_hold_their_resources() -> None:
    other = Placement(ReplicaId("team", "batch", 0), "a", Resources(1000, GiB))
    result = place(Snapshot((node("a"), node("b")), (other,)), [req("web", 2, Resources(1, 1))])
    assert nodes_of(result) == {"b": 2}  # "a" is full with someone else's replica
    assert result.released == ()


def test_reschedule_after_node_failure_moves_only_that_nodes_replicas() -> None:
    nodes = tuple(node(f"n{i}", cpu=2000, mem=2 * GiB) for i in range(5))
    requests = [req("web", 6), req("api", 4), req("db", 2, Resources(1000, GiB))]
    first = place(Snapshot(nodes), requests)
    assert first.unplaced == ()
    before = {d.replica: d.node for d in first.decisions}
    failed = "n1"
    down = tuple(replace(n, healthy=False) if n.name == failed else n for n in nodes)
    second = place(Snapshot(down, as_placements(first, requests)), requests)
    after = {d.replica: d.node for d in second.decisions}
    assert len(after) == len(second.decisions) == len(before)  # nothing lost, nothing doubled
    for replica, was in before.items():
        if was == failed:
            assert after[replica] != failed
        else:
            assert after[replica] == was
    moved = [d for d in second.decisions if d.is_moved]
    assert moved and all(d.previous == failed for d in moved)
    assert {p.node for p in second.released} == {failed}
    # The node returns: nothing moves back, and it holds no copies.
    third = place(Snapshot(nodes, as_placements(second, requests)), requests)
    assert {d.replica: d.node for d in third.decisions} == after
    assert all(d.is_kept for d in third.decisions) and third.released == ()


def test_a_replica_listed_on_two_nodes_keeps_one_copy() -> None:
    # The failed node came back before its old assignment was cleaned up.
    replica = ReplicaId("default", "web", 0)
    both = (Placement(replica, "b", SMALL), Placement(replica, "a", SMALL))
    result = place(Snapshot((node("a"), node("b")), both), [req("web", 1)])
    assert result.decisions == (Decision(replica, "a", "a"),)
    assert result.released == (Placement(replica, "b", SMALL),)


def test_which_copy_stays_does_not_depend_on_the_order() -> None:
    replica = ReplicaId("default", "web", 0)
    copies = [Placement(replica, "a", SMALL), Placement(replica, "a", Resources(500, GiB))]
    results = [
        place(Snapshot((node("a", cpu=2000, mem=4 * GiB),), tuple(order)), [req("web", 1)])
        for order in (copies, copies[::-1])
    ]
    assert results[0] == results[1]
    assert results[0].released == (copies[1],)


def test_a_replica_whose_node_left_the_snapshot_is_moved() -> None:
    gone = Placement(ReplicaId("default", "web", 0), "vanished", SMALL)
    result = place(Snapshot((node("a"),), (gone,)), [req("web", 1)])
    assert result.decisions == (Decision(gone.replica, "a", "vanished"),)
    assert result.released == (gone,)


def test_a_replica_that_cannot_move_is_unplaced_and_released() -> None:
    stuck = Placement(ReplicaId("default", "web", 0), "a", SMALL)
    snapshot = Snapshot((replace(node("a"), healthy=False), node("b", cpu=100)), (stuck,))
    result = place(snapshot, [req("web", 1)])
    assert result.decisions == ()
    assert result.unplaced[0].reason is Reason.INSUFFICIENT_RESOURCES
    assert result.released == (stuck,)


# -- the quota hook -------------------------------------------------------------------------------


class RecordingQuota:
    """Refuses what `refusals` names; records every call."""

    def __init__(self, refusals: Mapping[tuple[str, str], QuotaRefusal]) -> None:
        self.refusals = refusals
        self.calls: list[tuple[str, Resources, tuple[QuotaDemand, ...]]] = []

    def __call__(
        self, namespace: str, in_use: Resources, demands: tuple[QuotaDemand, ...]
    ) -> Mapping[str, QuotaRefusal]:
        self.calls.append((namespace, in_use, demands))
        return {n: r for (ns, n), r in self.refusals.items() if ns == namespace}


def test_quota_refusal_is_reported_per_request() -> None:
    kept = (Placement(ReplicaId("t1", "web", 0), "a", SMALL),)
    snapshot = Snapshot((node("a", cpu=10_000, mem=10 * GiB),), kept)
    requests = [req("web", 3, ns="t1"), req("api", 2, ns="t1"), req("web", 1, ns="t2")]
    quota = RecordingQuota(
        {("t1", "web"): QuotaRefusal("t1 is over its CPU quota (1.0 of 1.0 cores)", admit=1)}
    )
    result = place(snapshot, requests, quota=quota)
    placed = {(d.replica.namespace, d.replica.name, d.replica.index) for d in result.decisions}
    assert placed == {("t1", "web", 0), ("t1", "web", 1), ("t1", "api", 0), ("t1", "api", 1),
                      ("t2", "web", 0)}  # fmt: skip
    [refused] = result.unplaced
    assert (refused.namespace, refused.name, refused.indices, refused.reason) == (
        "t1",
        "web",
        (2,),
        Reason.QUOTA,
    )
    assert "over its CPU quota" in refused.detail
    # Called once per namespace, in order, with what is in use and what would be added.
    assert [call[0] for call in quota.calls] == ["t1", "t2"]
    _, in_use, demands = quota.calls[0]
    assert in_use == SMALL
    assert [(d.request.name, d.kept, d.missing) for d in demands] == [("api", 0, 2), ("web", 1, 2)]


def test_quota_refusing_everything_keeps_existing_replicas() -> None:
    kept = (Placement(ReplicaId("t1", "web", 0), "a", SMALL),)
    quota = RecordingQuota({("t1", "web"): QuotaRefusal("no quota left")})
    result = place(Snapshot((node("a"),), kept), [req("web", 3, ns="t1")], quota=quota)
    assert [d.replica.index for d in result.decisions] == [0]
    assert result.unplaced[0].indices == (1, 2)


def test_quota_is_not_asked_when_nothing_is_missing() -> None:
    kept = (Placement(ReplicaId("t1", "web", 0), "a", SMALL),)
    quota = RecordingQuota({})
    place(Snapshot((node("a"),), kept), [req("web", 1, ns="t1")], quota=quota)
    assert quota.calls == []


def test_quota_refusing_an_unknown_deployment_is_an_error() -> None:
    quota = RecordingQuota({("t1", "nope"): QuotaRefusal("x")})
    with pytest.raises(PlacementInputError, match="nope"):
        place(Snapshot((node("a"),)), [req("web", 1, ns="t1")], quota=quota)


# -- inputs and results --------------------------------------------------------------------------


def test_invalid_inputs_are_refused_with_the_field() -> None:
    with pytest.raises(PlacementInputError, match="cpu_millis"):
        Resources(-1, 0)
    with pytest.raises(PlacementInputError, match="replicas"):
        Request("ns", "web", -1, SMALL)
    with pytest.raises(PlacementInputError, match="capacity"):
        Node("n", Resources(0, GiB))
    with pytest.raises(PlacementInputError, match="at least one value"):
        Selector.one_of("zone")
    with pytest.raises(PlacementInputError, match="appears more than once"):
        Snapshot((node("a"), node("a")))
    with pytest.raises(PlacementInputError, match="default/web appears more than once"):
        place(Snapshot(()), [req("web", 1), req("web", 2)])


def test_selectors_normalise_and_render() -> None:
    assert Selector.one_of("zone", "b", "a", "b") == Selector.one_of("zone", "a", "b")
    assert str(Selector.one_of("zone", "b", "a")) == "zone in (a,b)"
    assert str(Selector.equals("disk", "ssd")) == "disk=ssd"
    assert str(Selector.none_of("tier", "edge")) == "tier notin (edge)"
    assert (str(Selector.exists("gpu")), str(Selector.absent("gpu"))) == ("gpu", "!gpu")
    a, b = Selector.exists("x"), Selector.exists("y")
    assert req("w", 1, constraints=(a, b)) == req("w", 1, constraints=(b, a))


def test_node_labels_are_a_read_only_copy() -> None:
    labels = {"zone": "a"}
    n = Node("n", CORE_GIB, labels)
    labels["zone"] = "b"
    assert n.labels == {"zone": "a"}
    with pytest.raises(TypeError):
        n.labels["zone"] = "c"  # type: ignore[index]


def test_by_node_groups_the_assignment_sets() -> None:
    result = place(Snapshot((node("b"), node("a"))), [req("web", 3)])
    assert result.by_node() == {
        "a": [ReplicaId("default", "web", 0), ReplicaId("default", "web", 2)],
        "b": [ReplicaId("default", "web", 1)],
    }


# -- randomized: invariants, and equality with a brute-force reference ------------------------

ZONES = ("a", "b", "c", "d")
SIZES = (Resources(100, 64 * MiB), Resources(250, 256 * MiB), Resources(500, 512 * MiB),
         Resources(1000, 128 * MiB), Resources(0, 0))  # fmt: skip
SELECTORS = (
    Selector.equals("disk", "ssd"),
    Selector.one_of("zone", "a", "b"),
    Selector.none_of("zone", "c"),
    Selector.exists("gpu"),
    Selector.absent("gpu"),
)


def random_case(
    rng: random.Random, *, nodes: int, deployments: int
) -> tuple[Snapshot, list[Request]]:
    """Random nodes (sizes, labels, health, allocation), requests, and a messy current state."""
    pool = []
    for i in range(nodes):
        labels = {"zone": rng.choice(ZONES)} if rng.random() < 0.9 else {}
        if rng.random() < 0.4:
            labels["disk"] = "ssd"
        if rng.random() < 0.1:
            labels["gpu"] = "yes"
        pool.append(
            Node(
                f"node-{rng.randrange(10**6):06d}-{i}",
                Resources(rng.choice((1000, 2000, 4000)), rng.choice((1, 2, 4)) * GiB),
                labels,
                healthy=rng.random() < 0.85,
                allocated=Resources(rng.choice((0, 100, 900)), rng.choice((0, 128 * MiB))),
            )
        )
    requests = []
    for d in range(deployments):
        constraints = tuple(rng.sample(SELECTORS, k=rng.choice((0, 0, 1, 2))))
        requests.append(
            Request(
                f"ns{rng.randrange(3)}",
                f"app{d}",
                rng.choice((0, 1, 2, 3, 5, 8, 13)),
                rng.choice(SIZES),
                constraints,
                spread_key=rng.choice((None, None, "zone")),
            )
        )
    placements = []
    names = [n.name for n in pool] + ["gone-node"]
    for r in requests:
        for i in range(r.replicas + 2):  # some beyond the count: scaled away
            for _ in range(rng.choice((0, 1, 1, 1, 2))):  # missing, placed, or doubled
                placements.append(
                    Placement(ReplicaId(r.namespace, r.name, i), rng.choice(names), r.resources)
                )
    placements.append(Placement(ReplicaId("other", "job", 0), names[0], Resources(300, MiB)))
    return Snapshot(tuple(pool), tuple(placements)), requests


def reference(
    snapshot: Snapshot, requests: Sequence[Request], strategy: str, factor: float
) -> dict[ReplicaId, str]:
    """The documented rule, by brute force: scan every node for every replica."""
    nodes = sorted(snapshot.nodes, key=lambda n: n.name)
    by_name = {n.name: n for n in nodes}
    limit = {
        n.name: (floor(Fraction(n.capacity.cpu_millis) * Fraction(factor)),
                 floor(Fraction(n.capacity.memory_bytes) * Fraction(factor)))
        for n in nodes
    }  # fmt: skip
    used = {n.name: [n.allocated.cpu_millis, n.allocated.memory_bytes] for n in nodes}
    wanted = {(r.namespace, r.name): r for r in requests}
    kept: dict[ReplicaId, Placement] = {}
    for p in snapshot.placements:
        n = by_name.get(p.node)
        if n is None or not n.healthy:
            continue
        r = wanted.get((p.replica.namespace, p.replica.name))
        if r is None:  # someone else's: it holds its resources
            used[p.node][0] += p.resources.cpu_millis
            used[p.node][1] += p.resources.memory_bytes
        elif p.replica.index < r.replicas and (
            p.replica not in kept or p.node < kept[p.replica].node
        ):
            kept[p.replica] = p
    for p in kept.values():
        used[p.node][0] += p.resources.cpu_millis
        used[p.node][1] += p.resources.memory_bytes
    healthy = [n for n in nodes if n.healthy]
    avg_cpu = max(1.0, sum(limit[n.name][0] for n in healthy) / max(1, len(healthy)))
    avg_mem = max(1.0, sum(limit[n.name][1] for n in healthy) / max(1, len(healthy)))

    def eligible(r: Request) -> list[Node]:
        return [n for n in healthy if all(s.matches(n.labels) for s in r.constraints)]

    def order(r: Request) -> tuple[int, float, str, str]:
        share = max(r.resources.cpu_millis / avg_cpu, r.resources.memory_bytes / avg_mem)
        return (len(eligible(r)), -share, r.namespace, r.name)

    sign = -1.0 if strategy == "bin-pack" else 1.0
    out = {k: p.node for k, p in kept.items()}
    for r in sorted(requests, key=order):
        mine = {k.index: v for k, v in out.items() if (k.namespace, k.name) == r.key}
        for index in range(r.replicas):
            if index in mine:
                continue
            best: tuple[int, int, float, str] | None = None
            for n in eligible(r):
                cpu, mem = used[n.name]
                if (cpu + r.resources.cpu_millis > limit[n.name][0]
                        or mem + r.resources.memory_bytes > limit[n.name][1]):  # fmt: skip
                    continue
                domain = n.labels.get(r.spread_key) if r.spread_key else None
                in_domain = sum(
                    1 for m in mine.values()
                    if r.spread_key is not None and by_name[m].labels.get(r.spread_key) == domain
                )  # fmt: skip
                on_node = sum(1 for m in mine.values() if m == n.name)
                score = sign * (cpu / limit[n.name][0] + mem / limit[n.name][1])
                key = (in_domain, on_node, score, n.name)
                if best is None or key < best:
                    best = key
            if best is None:
                break  # the engine stops at the first replica that fits nowhere, too
            chosen = best[3]
            mine[index] = chosen
            out[ReplicaId(r.namespace, r.name, index)] = chosen
            used[chosen][0] += r.resources.cpu_millis
            used[chosen][1] += r.resources.memory_bytes
    return out


def check_invariants(
    snapshot: Snapshot, requests: Sequence[Request], result: PlacementResult, factor: float
) -> None:
    by_name = {n.name: n for n in snapshot.nodes}
    wanted = {(r.namespace, r.name): r for r in requests}
    # Every requested replica is placed once or reported unplaced once; nothing else appears.
    seen = Counter(d.replica for d in result.decisions)
    assert all(c == 1 for c in seen.values())
    for u in result.unplaced:
        for i in u.indices:
            seen[ReplicaId(u.namespace, u.name, i)] += 1
    expected = {ReplicaId(r.namespace, r.name, i) for r in requests for i in range(r.replicas)}
    assert set(seen) == expected and all(c == 1 for c in seen.values())
    # Decisions are in replica order; new ones are on healthy, matching nodes.
    assert replica_ids(result) == sorted(replica_ids(result))
    for d in result.decisions:
        n = by_name[d.node]
        assert n.healthy
        if not d.is_kept:
            r = wanted[(d.replica.namespace, d.replica.name)]
            assert all(s.matches(n.labels) for s in r.constraints)
    # Kept: a replica on a healthy node keeps it (of two copies, the lower node name).
    placed = {d.replica: d.node for d in result.decisions}
    homes: dict[ReplicaId, set[str]] = {}
    for p in snapshot.placements:
        wants = wanted.get((p.replica.namespace, p.replica.name))
        home = by_name.get(p.node)
        if wants and p.replica.index < wants.replicas and home is not None and home.healthy:
            homes.setdefault(p.replica, set()).add(p.node)
    for replica, names in homes.items():
        assert placed[replica] == min(names)
    # Capacity: a node that received a new replica is within its limit.
    usage = {
        name: [n.allocated.cpu_millis, n.allocated.memory_bytes] for name, n in by_name.items()
    }
    sizes = {k: r.resources for k, r in wanted.items()}
    counted = set()
    for p in snapshot.placements:
        key = (p.replica.namespace, p.replica.name)
        if key not in wanted and p.node in by_name and by_name[p.node].healthy:
            usage[p.node][0] += p.resources.cpu_millis
            usage[p.node][1] += p.resources.memory_bytes
        elif key in wanted and placed.get(p.replica) == p.node and p.replica not in counted:
            counted.add(p.replica)
            usage[p.node][0] += p.resources.cpu_millis
            usage[p.node][1] += p.resources.memory_bytes
    for d in result.decisions:
        if not d.is_kept:
            size = sizes[(d.replica.namespace, d.replica.name)]
            usage[d.node][0] += size.cpu_millis
            usage[d.node][1] += size.memory_bytes
    for d in result.decisions:
        if not d.is_kept:
            cap = by_name[d.node].capacity
            assert usage[d.node][0] <= floor(Fraction(cap.cpu_millis) * Fraction(factor))
            assert usage[d.node][1] <= floor(Fraction(cap.memory_bytes) * Fraction(factor))
    # Insufficient resources is true: no eligible node has room left for one more.
    for u in result.unplaced:
        if u.reason is Reason.INSUFFICIENT_RESOURCES:
            r = wanted[(u.namespace, u.name)]
            for n in snapshot.nodes:
                if n.healthy and all(s.matches(n.labels) for s in r.constraints):
                    cap = n.capacity
                    fits = usage[n.name][0] + r.resources.cpu_millis <= floor(
                        Fraction(cap.cpu_millis) * Fraction(factor)
                    ) and usage[n.name][1] + r.resources.memory_bytes <= floor(
                        Fraction(cap.memory_bytes) * Fraction(factor)
                    )
                    assert not fits, f"{u.name} unplaced but {n.name} has room"


@pytest.mark.parametrize("strategy", ["least-loaded", "bin-pack"])
@pytest.mark.parametrize("seed", range(60))
def test_random_snapshots_hold_the_invariants_and_match_the_reference(
    strategy: str, seed: int
) -> None:
    rng = random.Random(seed)
    snapshot, requests = random_case(
        rng, nodes=rng.choice((1, 5, 30, 80)), deployments=rng.choice((1, 10, 40))
    )
    factor = rng.choice((1.0, 1.0, 1.5))
    result = place(snapshot, requests, strategy=strategy, overcommit=factor)
    check_invariants(snapshot, requests, result, factor)
    assert {d.replica: d.node for d in result.decisions} == reference(
        snapshot, requests, strategy, factor
    )


@pytest.mark.parametrize("strategy", ["least-loaded", "bin-pack"])
def test_the_benchmark_cluster_at_small_scale_holds_the_invariants(strategy: str) -> None:
    snapshot, requests = synthetic_cluster(nodes=300, containers=30_000, seed=3)
    result = place(snapshot, requests, strategy=strategy)
    check_invariants(snapshot, requests, result, 1.0)
    assert len(result.decisions) == 30_000


@pytest.mark.parametrize("strategy", ["least-loaded", "bin-pack"])
def test_random_repeated_failures_never_duplicate(strategy: str) -> None:
    """Nodes fail and return over many rounds; each round only the failed nodes' replicas move."""
    rng = random.Random(99)
    snapshot, requests = random_case(rng, nodes=60, deployments=30)
    nodes = [replace(n, healthy=True) for n in snapshot.nodes]
    placements: tuple[Placement, ...] = ()
    for _ in range(15):
        for i in rng.sample(range(len(nodes)), k=3):
            nodes[i] = replace(nodes[i], healthy=not nodes[i].healthy)
        current = Snapshot(tuple(nodes), placements)
        result = place(current, requests, strategy=strategy)
        check_invariants(current, requests, result, 1.0)
        healthy = {n.name for n in nodes if n.healthy}
        before = {p.replica: p.node for p in placements}
        for d in result.decisions:
            if before.get(d.replica) in healthy:
                assert d.is_kept
        placements = as_placements(result, requests)
