"""Placement's vocabulary: nodes, requests, the snapshot, and what `place()` answers.

Every value here is a frozen dataclass, checked when it is built: a value
that exists is valid, so the engine never re-checks it. Bad input raises
`PlacementInputError` naming the field and what to do.

Units: CPU in millicores (1000 = one core), memory in bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol


class PlacementInputError(ValueError):
    """A snapshot, request or option that placement cannot accept; the message says why."""


def _check_count(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PlacementInputError(f"{what} must be a non-negative integer, not {value!r}")


def _check_name(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise PlacementInputError(f"{what} must be a non-empty string, not {value!r}")


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of CPU (millicores) and memory (bytes)."""

    cpu_millis: int
    memory_bytes: int

    def __post_init__(self) -> None:
        _check_count(self.cpu_millis, "cpu_millis")
        _check_count(self.memory_bytes, "memory_bytes")

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu_millis + other.cpu_millis, self.memory_bytes + other.memory_bytes)

    def __str__(self) -> str:
        return f"{self.cpu_millis}m CPU, {format_bytes(self.memory_bytes)} memory"


NO_RESOURCES = Resources(0, 0)


def format_bytes(n: int) -> str:
    """`n` bytes as the largest binary unit that keeps it readable (512 MiB, 1.5 GiB)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


class Op(StrEnum):
    """How a `Selector` tests one node label (Kubernetes semantics)."""

    IN = "in"  # the label exists and its value is one of `values`
    NOT_IN = "notin"  # the label is absent, or its value is none of `values`
    EXISTS = "exists"  # the label exists, whatever its value
    DOES_NOT_EXIST = "!exists"  # the label is absent


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """One test on a node's labels; a request's constraints must all hold.

    Build them with `Selector.equals("zone", "a")`, `Selector.one_of(...)`,
    `Selector.none_of(...)`, `Selector.exists(...)`, `Selector.absent(...)`.
    `values` is kept sorted and without repeats, so equal tests compare equal.
    """

    key: str
    op: Op
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.key, "selector key")
        object.__setattr__(self, "op", Op(self.op))
        values = tuple(sorted(set(self.values)))
        if any(not isinstance(v, str) for v in values):
            raise PlacementInputError(f"selector {self.key!r}: values must be strings")
        needs_values = self.op in (Op.IN, Op.NOT_IN)
        if needs_values and not values:
            raise PlacementInputError(f"selector {self.key!r} {self.op}: give at least one value")
        if not needs_values and values:
            raise PlacementInputError(f"selector {self.key!r} {self.op} takes no values")
        object.__setattr__(self, "values", values)

    @classmethod
    def equals(cls, key: str, value: str) -> Selector:
        return cls(key, Op.IN, (value,))

    @classmethod
    def one_of(cls, key: str, *values: str) -> Selector:
        return cls(key, Op.IN, values)

    @classmethod
    def none_of(cls, key: str, *values: str) -> Selector:
        return cls(key, Op.NOT_IN, values)

    @classmethod
    def exists(cls, key: str) -> Selector:
        return cls(key, Op.EXISTS)

    @classmethod
    def absent(cls, key: str) -> Selector:
        return cls(key, Op.DOES_NOT_EXIST)

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op is Op.IN:
            return value is not None and value in self.values
        if self.op is Op.NOT_IN:
            return value is None or value not in self.values
        if self.op is Op.EXISTS:
            return value is not None
        return value is None

    def __str__(self) -> str:
        if self.op is Op.IN and len(self.values) == 1:
            return f"{self.key}={self.values[0]}"
        if self.op in (Op.IN, Op.NOT_IN):
            return f"{self.key} {self.op} ({','.join(self.values)})"
        return self.key if self.op is Op.EXISTS else f"!{self.key}"


@dataclass(frozen=True, slots=True)
class Node:
    """A host as placement sees it.

    `allocated` is what is in use on the node that the snapshot's placements
    do not account for (system reservation, pinned or standalone workloads);
    placement adds the resources of the placements it keeps on top.
    """

    name: str
    capacity: Resources
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    healthy: bool = True
    allocated: Resources = NO_RESOURCES

    def __post_init__(self) -> None:
        _check_name(self.name, "node name")
        if self.capacity.cpu_millis < 1 or self.capacity.memory_bytes < 1:
            raise PlacementInputError(
                f"node {self.name!r}: capacity must have CPU and memory above zero "
                f"(got {self.capacity})"
            )
        for key, value in self.labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise PlacementInputError(f"node {self.name!r}: labels must map str to str")
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))


@dataclass(frozen=True, slots=True, order=True)
class ReplicaId:
    """One replica of a deployment: replicas of `namespace/name` are 0..replicas-1."""

    namespace: str
    name: str
    index: int

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}#{self.index}"


@dataclass(frozen=True, slots=True)
class Placement:
    """A replica that a node holds in the snapshot (the current assignment)."""

    replica: ReplicaId
    node: str
    resources: Resources


@dataclass(frozen=True, slots=True)
class Request:
    """A deployment's desired replicas and what each one needs.

    `constraints` must all hold on a node for it to be eligible; they are
    kept sorted, so requests that differ only in their order share a class.
    `spread_key` names a node label (e.g. "zone") across whose values the
    replicas are spread before they are spread across nodes; replicas are
    always spread across nodes.
    """

    namespace: str
    name: str
    replicas: int
    resources: Resources
    constraints: tuple[Selector, ...] = ()
    spread_key: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.namespace, "request namespace")
        _check_name(self.name, "request name")
        _check_count(self.replicas, f"{self.namespace}/{self.name}: replicas")
        if self.spread_key is not None:
            _check_name(self.spread_key, f"{self.namespace}/{self.name}: spread_key")
        object.__setattr__(self, "constraints", tuple(sorted(set(self.constraints))))

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The inventory `place()` works on: every node, and what each one holds."""

    nodes: tuple[Node, ...]
    placements: tuple[Placement, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "placements", tuple(self.placements))
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise PlacementInputError(f"snapshot: node {node.name!r} appears more than once")
            seen.add(node.name)


@dataclass(frozen=True, slots=True)
class Overcommit:
    """How far the sum of requests may exceed a node's capacity (1.0: not at all)."""

    cpu: float = 1.0
    memory: float = 1.0

    def __post_init__(self) -> None:
        for what, factor in (("cpu", self.cpu), ("memory", self.memory)):
            if not isinstance(factor, int | float) or not math.isfinite(factor) or factor < 1.0:
                raise PlacementInputError(
                    f"overcommit {what} must be a finite number >= 1.0, not {factor!r} "
                    "(keep headroom with Node.allocated instead)"
                )


class Strategy(StrEnum):
    """Which node a replica prefers once spread is equal."""

    LEAST_LOADED = "least-loaded"  # the node with the lowest utilization
    BIN_PACK = "bin-pack"  # the node with the highest utilization that still fits


class Reason(StrEnum):
    """Why replicas stayed unplaced."""

    QUOTA = "quota"  # the namespace's QuotaCheck refused them
    NO_ELIGIBLE_NODE = "no-eligible-node"  # no healthy node satisfies the constraints
    INSUFFICIENT_RESOURCES = "insufficient-resources"  # eligible nodes exist, none has room


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a replica runs. `previous` is its node in the snapshot, or None.

    kept: previous == node; moved: previous names another (failed) node;
    new: previous is None.
    """

    replica: ReplicaId
    node: str
    previous: str | None = None

    @property
    def is_new(self) -> bool:
        return self.previous is None

    @property
    def is_kept(self) -> bool:
        return self.previous == self.node

    @property
    def is_moved(self) -> bool:
        return self.previous is not None and self.previous != self.node


@dataclass(frozen=True, slots=True)
class Unplaced:
    """Replicas of one request that have no node, and why."""

    namespace: str
    name: str
    indices: tuple[int, ...]
    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class PlacementResult:
    """What `place()` decided.

    decisions  one per placed replica of every request, in (namespace, name,
               index) order; each replica appears at most once.
    unplaced   the requested replicas that have no node, grouped per request
               and reason.
    released   the snapshot's placements of requested deployments that are
               not kept: scaled away, on a node that is unhealthy or gone,
               or a second copy of a replica. Placements of deployments that
               were not requested are left alone and not reported.
    """

    decisions: tuple[Decision, ...]
    unplaced: tuple[Unplaced, ...]
    released: tuple[Placement, ...]

    def by_node(self) -> dict[str, list[ReplicaId]]:
        """Every node's assignment set, nodes and replicas in sorted order."""
        out: dict[str, list[ReplicaId]] = {}
        for d in self.decisions:
            out.setdefault(d.node, []).append(d.replica)
        return {node: out[node] for node in sorted(out)}

    @property
    def unplaced_count(self) -> int:
        return sum(len(u.indices) for u in self.unplaced)


# -- the quota hook ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuotaDemand:
    """One request as the quota check sees it: how many replicas would be added."""

    request: Request
    kept: int  # replicas that keep their node
    missing: int  # replicas this call would place if admitted


@dataclass(frozen=True, slots=True)
class QuotaRefusal:
    """A quota's answer for one request: refuse all but `admit` of its missing replicas."""

    reason: str
    admit: int = 0

    def __post_init__(self) -> None:
        _check_count(self.admit, "QuotaRefusal.admit")


class QuotaCheck(Protocol):
    """Admission of new replicas per namespace; the quota model itself comes later.

    Called once per namespace that has missing replicas, in namespace order,
    before any node is chosen. `in_use` is what the namespace's kept
    placements hold (requested or not). Return a refusal per deployment name
    that must not (fully) grow; names not in the mapping are admitted. It must
    be pure: `place()` stays a function of its arguments only.
    """

    def __call__(
        self, namespace: str, in_use: Resources, demands: tuple[QuotaDemand, ...]
    ) -> Mapping[str, QuotaRefusal]: ...


def unique_requests(requests: Iterable[Request]) -> dict[tuple[str, str], Request]:
    """Requests keyed by (namespace, name); a deployment requested twice is an error."""
    out: dict[tuple[str, str], Request] = {}
    for request in requests:
        if request.key in out:
            raise PlacementInputError(
                f"request {request.namespace}/{request.name} appears more than once"
            )
        out[request.key] = request
    return out
