"""Placement: which node runs each replica, as a pure function of a snapshot.

    result = place(snapshot, requests, strategy="least-loaded", overcommit=1.0)

The coordinator's placement loop builds a `Snapshot` (nodes + current
placements) and the `Request`s of desired state, calls `place()`, and only
persists `result.by_node()`. docs/placement.md describes the algorithm.
"""

from coordinator.placement.engine import place
from coordinator.placement.model import (
    NO_RESOURCES,
    Decision,
    Node,
    Op,
    Overcommit,
    Placement,
    PlacementInputError,
    PlacementResult,
    QuotaCheck,
    QuotaDemand,
    QuotaRefusal,
    Reason,
    ReplicaId,
    Request,
    Resources,
    Selector,
    Snapshot,
    Strategy,
    Unplaced,
)

__all__ = [
    "NO_RESOURCES",
    "Decision",
    "Node",
    "Op",
    "Overcommit",
    "Placement",
    "PlacementInputError",
    "PlacementResult",
    "QuotaCheck",
    "QuotaDemand",
    "QuotaRefusal",
    "Reason",
    "ReplicaId",
    "Request",
    "Resources",
    "Selector",
    "Snapshot",
    "Strategy",
    "Unplaced",
    "place",
]
