"""`place(snapshot, requests) -> PlacementResult`: a pure function, fast at 10k x 1M.

docs/placement.md explains the algorithm, its cost and its guarantees. In
short: every replica goes to the eligible node that fits and minimises

    (replicas of its deployment in the node's spread domain,
     replicas of its deployment on the node,
     strategy score, node name)

and that choice is made without scanning nodes. Eligible nodes are grouped
into pools, one per (constraint class, spread key), each holding one heap per
spread domain ordered by (score, rank). A deployment walks the heaps
best-first; a node that does not fit it is parked until a smaller request of
the pool comes (free capacity only shrinks during a call), and leaves the
pool for good once it cannot fit the smallest request still to come.

Scores: utilization = cpu_used / cpu_limit + memory_used / memory_limit;
least-loaded prefers the lowest, bin-pack the highest (its score is the
negation). Least-loaded scores only grow, so a heap entry that went stale is
re-keyed when it reaches the top; bin-pack scores improve as a node fills, so
the node is marked dirty in its other pools, which push a fresh entry before
their next request.
"""

from __future__ import annotations

import gc
import heapq
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from math import floor

from coordinator.placement.model import (
    Decision,
    Node,
    Op,
    Overcommit,
    Placement,
    PlacementInputError,
    PlacementResult,
    QuotaCheck,
    QuotaDemand,
    Reason,
    ReplicaId,
    Request,
    Resources,
    Selector,
    Snapshot,
    Strategy,
    Unplaced,
    format_bytes,
    unique_requests,
)

_Key = tuple[str, str]  # (namespace, name) of a request


def place(
    snapshot: Snapshot,
    requests: Iterable[Request],
    *,
    strategy: Strategy | str = Strategy.LEAST_LOADED,
    overcommit: float | Overcommit = 1.0,
    quota: QuotaCheck | None = None,
) -> PlacementResult:
    """Choose a node for every missing replica of `requests`; keep the others.

    A replica keeps its node while that node is in the snapshot and healthy;
    the rest (new replicas, and those whose node failed or left) are placed.
    The answer depends only on the arguments, not on their order.
    """
    try:
        chosen_strategy = Strategy(strategy)
    except ValueError:
        choices = ", ".join(s.value for s in Strategy)
        raise PlacementInputError(f"unknown strategy {strategy!r}; use one of {choices}") from None
    if isinstance(overcommit, Overcommit):
        factors = overcommit
    else:
        factors = Overcommit(overcommit, overcommit)
    wanted = unique_requests(requests)
    collecting = gc.isenabled()
    gc.disable()  # ~2 new objects per replica, none cyclic: collections would only cost
    try:
        return _place(snapshot, wanted, chosen_strategy, factors, quota)
    finally:
        if collecting:
            gc.enable()


def _place(
    snapshot: Snapshot,
    wanted: Mapping[_Key, Request],
    strategy: Strategy,
    factors: Overcommit,
    quota: QuotaCheck | None,
) -> PlacementResult:
    cluster = _Cluster(snapshot.nodes, factors)
    existing = _settle(snapshot.placements, wanted, cluster)
    todo, unplaced = _admit(wanted, existing, quota)
    engine = _Engine(cluster, strategy)
    chosen = engine.place_all(wanted, todo, existing, unplaced)
    return _result(
        wanted, existing=existing, todo=todo, chosen=chosen, names=cluster.names, unplaced=unplaced
    )


# -- the nodes, by rank (name order), in parallel lists --------------------------------


def _limit(capacity: int, factor: float) -> int:
    return capacity if factor == 1.0 else floor(Fraction(capacity) * Fraction(factor))


class _Cluster:
    """Per-call mutable state of every node. Rank = position in name order."""

    def __init__(self, nodes: Iterable[Node], factors: Overcommit) -> None:
        ordered = sorted(nodes, key=lambda n: n.name)
        self.names = [n.name for n in ordered]
        self.rank = {name: r for r, name in enumerate(self.names)}
        self.labels = [n.labels for n in ordered]
        self.healthy = [n.healthy for n in ordered]
        self.cpu_limit = [_limit(n.capacity.cpu_millis, factors.cpu) for n in ordered]
        self.mem_limit = [_limit(n.capacity.memory_bytes, factors.memory) for n in ordered]
        self.cpu_used = [n.allocated.cpu_millis for n in ordered]
        self.mem_used = [n.allocated.memory_bytes for n in ordered]
        self.version = [0] * len(ordered)
        self._index: dict[str, dict[str, set[int]]] | None = None

    def matching(self, selectors: tuple[Selector, ...]) -> set[int]:
        """Ranks of every node (healthy or not) whose labels satisfy all `selectors`."""
        everyone = set(range(len(self.names)))
        if self._index is None:
            self._index = {}
            for r, labels in enumerate(self.labels):
                for key, value in labels.items():
                    self._index.setdefault(key, {}).setdefault(value, set()).add(r)
        result = everyone
        for s in selectors:
            by_value = self._index.get(s.key, {})
            if s.op in (Op.IN, Op.NOT_IN):
                hits = set().union(*(by_value.get(v, ()) for v in s.values))
            else:
                hits = set().union(*by_value.values())
            result &= hits if s.op in (Op.IN, Op.EXISTS) else everyone - hits
        return result


# -- what the snapshot already holds -------------------------------------------------


@dataclass
class _Existing:
    kept: dict[_Key, dict[int, Placement]] = field(default_factory=dict)
    lost: dict[_Key, dict[int, str]] = field(default_factory=dict)  # index -> its failed node
    released: list[Placement] = field(default_factory=list)
    in_use: dict[str, list[int]] = field(default_factory=dict)  # namespace -> [cpu, mem]


def _settle(
    placements: Iterable[Placement], wanted: Mapping[_Key, Request], cluster: _Cluster
) -> _Existing:
    """Sort the snapshot's placements into kept, lost and released; charge what stays."""
    out = _Existing()
    rank, healthy = cluster.rank, cluster.healthy
    staying: list[Placement] = []
    for p in placements:
        rep = p.replica
        r = rank.get(p.node)
        alive = r is not None and healthy[r]
        request = wanted.get((rep.namespace, rep.name))
        if request is None:
            if alive:
                staying.append(p)  # not ours to move: it holds its resources
            continue
        if not 0 <= rep.index < request.replicas:
            out.released.append(p)
            continue
        if not alive:
            out.released.append(p)
            lost = out.lost.setdefault(request.key, {})
            if rep.index not in lost or p.node < lost[rep.index]:
                lost[rep.index] = p.node
            continue
        slots = out.kept.setdefault(request.key, {})
        other = slots.get(rep.index)
        if other is None:
            slots[rep.index] = p
        elif _copy_order(p, rank) < _copy_order(other, rank):  # two copies: one stays
            out.released.append(other)
            slots[rep.index] = p
        else:
            out.released.append(p)
    staying.extend(p for slots in out.kept.values() for p in slots.values())
    cpu_used, mem_used, in_use = cluster.cpu_used, cluster.mem_used, out.in_use
    for p in staying:
        r = rank[p.node]
        cpu_used[r] += p.resources.cpu_millis
        mem_used[r] += p.resources.memory_bytes
        used = in_use.setdefault(p.replica.namespace, [0, 0])
        used[0] += p.resources.cpu_millis
        used[1] += p.resources.memory_bytes
    out.released.sort(
        key=lambda p: (p.replica, p.node, p.resources.cpu_millis, p.resources.memory_bytes)
    )
    return out


def _copy_order(p: Placement, rank: Mapping[str, int]) -> tuple[int, int, int]:
    """Of two copies of a replica, the lower stays: lower node name, then smaller."""
    return (rank[p.node], p.resources.cpu_millis, p.resources.memory_bytes)


# -- admission (the quota hook) ---------------------------------------------------------


def _admit(
    wanted: Mapping[_Key, Request], existing: _Existing, quota: QuotaCheck | None
) -> tuple[dict[_Key, list[int]], list[Unplaced]]:
    """The missing replica indices of each request that may be placed, and the refused."""
    missing: dict[_Key, list[int]] = {}
    for key, request in wanted.items():
        slots = existing.kept.get(key, {})
        gaps = [i for i in range(request.replicas) if i not in slots]
        if gaps:
            missing[key] = gaps
    unplaced: list[Unplaced] = []
    if quota is None:
        return missing, unplaced
    by_namespace: dict[str, list[_Key]] = {}
    for key in sorted(missing):
        by_namespace.setdefault(key[0], []).append(key)
    for namespace, keys in by_namespace.items():
        demands = tuple(
            QuotaDemand(wanted[k], len(existing.kept.get(k, {})), len(missing[k])) for k in keys
        )
        used = existing.in_use.get(namespace, [0, 0])
        refusals = quota(namespace, Resources(used[0], used[1]), demands)
        unknown = sorted(set(refusals) - {name for _, name in keys})
        if unknown:
            raise PlacementInputError(
                f"quota check for namespace {namespace!r} refused deployments with nothing "
                f"to place: {', '.join(unknown)}"
            )
        for name, refusal in sorted(refusals.items()):
            gaps = missing[(namespace, name)]
            refused = gaps[refusal.admit :]
            if refused:
                del gaps[refusal.admit :]
                unplaced.append(
                    Unplaced(namespace, name, tuple(refused), Reason.QUOTA, refusal.reason)
                )
    return {k: v for k, v in missing.items() if v}, unplaced


# -- the pools ----------------------------------------------------------------------------


class _Domain:
    """One pool's nodes with the same spread-label value: a heap of (score, rank, version)."""

    __slots__ = ("heap", "members", "value")

    def __init__(self, value: str | None, members: list[int]) -> None:
        self.value = value
        self.members = members
        self.heap: list[tuple[float, int, int]] = []


class _Pool:
    """The healthy nodes eligible for one (constraint class, spread key).

    A node of the pool is in its domain's heap, or taken by the deployment
    being placed, or away: parked (it could not fit a request of some size,
    so it cannot fit a later one at least as large) or retired (it cannot fit
    any later request of the pool).
    """

    __slots__ = (
        "alive", "away", "dirty", "domain_of", "domains", "eligible", "mins", "next",
        "parked", "unhealthy",
    )  # fmt: skip

    def __init__(self, eligible: list[int], unhealthy: int) -> None:
        self.eligible = eligible
        self.unhealthy = unhealthy  # nodes that match the constraints but are unhealthy
        self.domains: list[_Domain] = []
        self.domain_of: dict[int, _Domain] = {}
        self.mins: list[tuple[int, int]] = []  # per request in order: min (cpu, mem) from it on
        self.next = 0  # requests of this pool placed so far
        self.away: set[int] = set()
        self.parked: dict[tuple[int, int], list[int]] = {}  # by the size they could not fit
        self.dirty: set[int] = set()  # bin-pack: nodes filled through other pools
        self.alive = True


class _Engine:
    def __init__(self, cluster: _Cluster, strategy: Strategy) -> None:
        self.cluster = cluster
        self.sign = -1.0 if strategy is Strategy.BIN_PACK else 1.0
        self.lazy = strategy is Strategy.LEAST_LOADED  # scores only grow: re-key on pop
        self.pools: dict[tuple[tuple[Selector, ...], str | None], _Pool] = {}
        self.node_pools: list[list[_Pool]] = [[] for _ in cluster.names]

    def score(self, r: int) -> float:
        c = self.cluster
        return self.sign * (c.cpu_used[r] / c.cpu_limit[r] + c.mem_used[r] / c.mem_limit[r])

    def entry(self, r: int) -> tuple[float, int, int]:
        return (self.score(r), r, self.cluster.version[r])

    def place_all(
        self,
        wanted: Mapping[_Key, Request],
        todo: Mapping[_Key, list[int]],
        existing: _Existing,
        unplaced: list[Unplaced],
    ) -> dict[_Key, list[int]]:
        """Ranks chosen for each request's missing replicas, in index order (maybe fewer)."""
        order = self._order([wanted[k] for k in todo])
        for request in order:  # the pools' retirement bounds need the whole order first
            self._pool_of(request).mins.append(
                (request.resources.cpu_millis, request.resources.memory_bytes)
            )
        for pool in self.pools.values():
            for i in range(len(pool.mins) - 2, -1, -1):
                (c, m), (nc, nm) = pool.mins[i], pool.mins[i + 1]
                pool.mins[i] = (min(c, nc), min(m, nm))
        chosen: dict[_Key, list[int]] = {}
        for request in order:
            pool = self._pool_of(request)
            pool.next += 1
            count = len(todo[request.key])
            ranks: list[int] = []
            if pool.eligible:
                if not pool.domains:
                    self._build(pool, request.spread_key)
                ranks = self._fill(request, pool, count, existing.kept.get(request.key, {}))
            if pool.next == len(pool.mins):
                pool.alive = False
                pool.domains, pool.domain_of, pool.parked = [], {}, {}
            chosen[request.key] = ranks
            if len(ranks) < count:
                unplaced.append(self._shortfall(request, pool, todo[request.key][len(ranks) :]))
        return chosen

    def _order(self, requests: list[Request]) -> list[Request]:
        """Most constrained first (fewest eligible nodes), then larger (share of an
        average healthy node), then by key: the hard-to-place go while there is room."""
        c = self.cluster
        up = [r for r in range(len(c.names)) if c.healthy[r]] or [0]
        avg_cpu = max(1.0, sum(c.cpu_limit[r] for r in up) / len(up)) if c.names else 1.0
        avg_mem = max(1.0, sum(c.mem_limit[r] for r in up) / len(up)) if c.names else 1.0

        def rank(q: Request) -> tuple[int, float, str, str]:
            share = max(q.resources.cpu_millis / avg_cpu, q.resources.memory_bytes / avg_mem)
            return (len(self._pool_of(q).eligible), -share, q.namespace, q.name)

        return sorted(requests, key=rank)

    def _pool_of(self, request: Request) -> _Pool:
        key = (request.constraints, request.spread_key)
        pool = self.pools.get(key)
        if pool is None:
            c = self.cluster
            matching = c.matching(request.constraints)
            eligible = sorted(r for r in matching if c.healthy[r])
            pool = self.pools[key] = _Pool(eligible, len(matching) - len(eligible))
        return pool

    def _build(self, pool: _Pool, spread_key: str | None) -> None:
        by_value: dict[str | None, list[int]] = {}
        labels = self.cluster.labels
        for r in pool.eligible:
            value = None if spread_key is None else labels[r].get(spread_key)
            by_value.setdefault(value, []).append(r)
        for value, members in by_value.items():
            domain = _Domain(value, members)
            domain.heap = [self.entry(r) for r in members]
            heapq.heapify(domain.heap)
            pool.domains.append(domain)
            for r in members:
                pool.domain_of[r] = domain
        if not self.lazy:
            for r in pool.eligible:
                self.node_pools[r].append(pool)

    def _prepare(self, pool: _Pool, cpu: int, mem: int) -> None:
        """Bring the pool's heaps up to date for a request of (cpu, mem)."""
        for size in [s for s in pool.parked if cpu < s[0] or mem < s[1]]:
            nodes = pool.parked.pop(size)
            pool.away.difference_update(nodes)
            self._restore(pool, nodes, pool.mins[pool.next - 1])
        if pool.dirty:  # bin-pack: a node filled elsewhere moved up; its old entry is stale
            pool.dirty -= pool.away
            for r in sorted(pool.dirty):
                heapq.heappush(pool.domain_of[r].heap, self.entry(r))
            pool.dirty.clear()
            for domain in pool.domains:
                if len(domain.heap) > 2 * len(domain.members) + 64:
                    domain.heap = [self.entry(r) for r in domain.members if r not in pool.away]
                    heapq.heapify(domain.heap)

    def _fill(
        self, request: Request, pool: _Pool, count: int, kept: Mapping[int, Placement]
    ) -> list[int]:
        """Place `count` replicas of `request` in `pool`; the ranks chosen, best first."""
        c = self.cluster
        cpu, mem = request.resources.cpu_millis, request.resources.memory_bytes
        self._prepare(pool, cpu, mem)
        on_node: dict[int, int] = {}
        in_domain: dict[str | None, int] = {}
        for p in kept.values():
            r = c.rank[p.node]
            on_node[r] = on_node.get(r, 0) + 1
            if request.spread_key is not None:
                value = c.labels[r].get(request.spread_key)
                in_domain[value] = in_domain.get(value, 0) + 1
        taken: list[int] = []  # fitted when popped: back into the heap afterwards
        parked: list[int] = []  # did not fit this request
        walks = [
            self._candidates(d, cpu, mem, on_node, taken=taken, parked=parked) for d in pool.domains
        ]
        chosen: list[int] = []
        if len(walks) == 1 and self.lazy:  # the common case, inlined
            cu, mu, ver = c.cpu_used, c.mem_used, c.version
            for _level, _score, r in walks[0]:
                cu[r] += cpu
                mu[r] += mem
                ver[r] += 1
                chosen.append(r)
                if len(chosen) == count:
                    break
        elif len(walks) == 1:
            for _level, _score, r in walks[0]:
                self._assign(r, cpu, mem, pool)
                chosen.append(r)
                if len(chosen) == count:
                    break
        else:  # best domain first: fewest replicas there, then its best candidate
            fronts: list[tuple[int, int, float, int, int]] = []
            for i, walk in enumerate(walks):
                first = next(walk, None)
                if first is not None:
                    fronts.append((in_domain.get(pool.domains[i].value, 0), *first, i))
            heapq.heapify(fronts)
            while fronts and len(chosen) < count:
                spread, _level, _score, r, i = fronts[0]
                self._assign(r, cpu, mem, pool)
                chosen.append(r)
                following = next(walks[i], None)
                if following is None:
                    heapq.heappop(fronts)
                else:
                    heapq.heapreplace(fronts, (spread + 1, *following, i))
        for walk in walks:
            walk.close()
        if pool.next < len(pool.mins):
            self._restore(pool, taken, pool.mins[pool.next])
            if parked:
                pool.away.update(parked)
                pool.parked.setdefault((cpu, mem), []).extend(parked)
        return chosen

    def _candidates(
        self,
        domain: _Domain,
        cpu: int,
        mem: int,
        on_node: Mapping[int, int],
        *,
        taken: list[int],
        parked: list[int],
    ) -> Generator[tuple[int, float, int], None, None]:
        """(level, score, rank) of the domain's nodes that fit, best first; level =
        replicas of the deployment there. A node yielded is taken when the walk resumes.

        Nodes popped from the domain's heap go to `taken` (they fitted) or `parked`.
        """
        c = self.cluster
        cu, mu, cl, ml, ver = c.cpu_used, c.mem_used, c.cpu_limit, c.mem_limit, c.version
        heap, sign, lazy = domain.heap, self.sign, self.lazy
        pop, replace = heapq.heappop, heapq.heapreplace
        later: dict[int, list[int]] = {}  # level -> nodes holding that many replicas
        while heap:
            score, r, v = heap[0]
            if v != ver[r]:  # stale: re-key (scores only grew) or drop (a fresher entry exists)
                if lazy:
                    replace(heap, (sign * (cu[r] / cl[r] + mu[r] / ml[r]), r, ver[r]))
                else:
                    pop(heap)
                continue
            pop(heap)
            if cu[r] + cpu > cl[r] or mu[r] + mem > ml[r]:
                parked.append(r)
                continue
            taken.append(r)
            level = on_node.get(r, 0)
            if level:
                later.setdefault(level, []).append(r)
                continue
            yield 0, score, r
            later.setdefault(1, []).append(r)
        while later:
            level = min(later)
            nodes = [(sign * (cu[r] / cl[r] + mu[r] / ml[r]), r) for r in later.pop(level)]
            heapq.heapify(nodes)
            while nodes:
                score, r = pop(nodes)
                if cu[r] + cpu <= cl[r] and mu[r] + mem <= ml[r]:
                    yield level, score, r
                    later.setdefault(level + 1, []).append(r)

    def _assign(self, r: int, cpu: int, mem: int, pool: _Pool) -> None:
        c = self.cluster
        c.cpu_used[r] += cpu
        c.mem_used[r] += mem
        c.version[r] += 1
        if not self.lazy:
            for other in self.node_pools[r]:
                if other is not pool and other.alive:
                    other.dirty.add(r)

    def _restore(self, pool: _Pool, nodes: list[int], smallest: tuple[int, int]) -> None:
        """Put nodes back into their heaps, except those too full for the `smallest` request
        still to come: they leave the pool for good."""
        c = self.cluster
        cu, mu, cl, ml, ver = c.cpu_used, c.mem_used, c.cpu_limit, c.mem_limit, c.version
        cpu, mem, sign, push, domain_of = *smallest, self.sign, heapq.heappush, pool.domain_of
        for r in nodes:
            if cu[r] + cpu <= cl[r] and mu[r] + mem <= ml[r]:
                push(domain_of[r].heap, (sign * (cu[r] / cl[r] + mu[r] / ml[r]), r, ver[r]))
            else:
                pool.away.add(r)  # retired

    def _shortfall(self, request: Request, pool: _Pool, indices: list[int]) -> Unplaced:
        where = ", ".join(map(str, request.constraints))
        sick = f"; {pool.unhealthy} matching nodes are unhealthy" if pool.unhealthy else ""
        if not pool.eligible:
            what = f"no healthy node matches {where}" if where else "no healthy node"
            return Unplaced(
                request.namespace, request.name, tuple(indices), Reason.NO_ELIGIBLE_NODE,
                what + sick,
            )  # fmt: skip
        need = request.resources
        detail = (
            f"none of the {len(pool.eligible)} eligible nodes has {need.cpu_millis}m CPU and "
            f"{format_bytes(need.memory_bytes)} memory free"
            + (f" (constraints: {where})" if where else "")
            + sick
        )
        return Unplaced(
            request.namespace, request.name, tuple(indices), Reason.INSUFFICIENT_RESOURCES, detail
        )


# -- the answer ---------------------------------------------------------------------------


def _result(
    wanted: Mapping[_Key, Request],
    *,
    existing: _Existing,
    todo: Mapping[_Key, list[int]],
    chosen: Mapping[_Key, list[int]],
    names: list[str],
    unplaced: list[Unplaced],
) -> PlacementResult:
    decisions: list[Decision] = []
    for key in sorted(wanted):
        namespace, name = key
        slots = existing.kept.get(key, {})
        lost = existing.lost.get(key, {})
        new = dict(zip(todo.get(key, ()), chosen.get(key, ()), strict=False))
        for i in range(wanted[key].replicas):
            p = slots.get(i)
            if p is not None:
                decisions.append(Decision(p.replica, p.node, p.node))
                continue
            r = new.get(i)
            if r is not None:
                decisions.append(Decision(ReplicaId(namespace, name, i), names[r], lost.get(i)))
    unplaced.sort(key=lambda u: (u.namespace, u.name, u.indices))
    return PlacementResult(tuple(decisions), tuple(unplaced), tuple(existing.released))
