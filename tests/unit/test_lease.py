"""The leader's lease: pure timing (the real election is tested in tests/cluster/test_leader.py)."""

from __future__ import annotations

import math

import pytest

from coordinator.lease import Lease, LeaseTiming, TimingError


def test_no_proof_no_lease() -> None:
    lease = Lease(LeaseTiming())
    assert not lease.valid(0.0)
    assert lease.remaining(0.0) == 0.0


def test_lease_counts_from_when_the_proof_was_sent() -> None:
    timing = LeaseTiming(session_ttl=1.0, check_ttl=1.5, heartbeat=0.3, margin=0.15)
    lease = Lease(timing)
    lease.check_passed(10.0)
    lease.session_renewed(10.0)
    # The session TTL is the tighter one: 10 + 1.0 - 0.15.
    assert lease.deadline == pytest.approx(10.85)
    assert lease.valid(10.84)
    assert not lease.valid(10.85)


def test_both_proofs_are_needed() -> None:
    lease = Lease(LeaseTiming(session_ttl=1.0, check_ttl=1.5))
    lease.session_renewed(5.0)
    assert not lease.valid(5.0)  # the check was never passed
    lease.check_passed(5.0)
    assert lease.valid(5.0)


def test_the_older_proof_bounds_the_lease() -> None:
    timing = LeaseTiming(session_ttl=1.0, check_ttl=1.5, heartbeat=0.3, margin=0.15)
    lease = Lease(timing)
    lease.check_passed(0.0)
    lease.session_renewed(0.0)
    lease.session_renewed(1.0)  # renewals go on, the check pass stalled at 0.0
    assert lease.deadline == pytest.approx(1.5 - 0.15)


def test_a_late_answer_never_shortens_the_lease() -> None:
    lease = Lease(LeaseTiming())
    lease.check_passed(3.0)
    lease.session_renewed(3.0)
    before = lease.deadline
    lease.check_passed(2.0)  # an older request answered late
    lease.session_renewed(2.0)
    assert lease.deadline == before


def test_revoke_ends_the_lease_at_once() -> None:
    lease = Lease(LeaseTiming())
    lease.check_passed(0.0)
    lease.session_renewed(0.0)
    lease.revoke()
    assert lease.deadline == -math.inf
    assert not lease.valid(0.0)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"heartbeat": 0.0}, "heartbeat must be a positive number"),
        ({"session_ttl": float("nan")}, "session_ttl must be a positive number"),
        ({"heartbeat": 0.5}, "fewer than two heartbeats"),
        ({"margin": 0.9}, "fewer than two heartbeats"),
    ],
)
def test_timings_that_cannot_keep_a_leader_are_refused(
    kwargs: dict[str, float], fragment: str
) -> None:
    with pytest.raises(TimingError, match=fragment):
        LeaseTiming(**kwargs)


def test_request_timeout_leaves_room_for_a_retry() -> None:
    timing = LeaseTiming(session_ttl=1.0, check_ttl=1.5, heartbeat=0.3, margin=0.15)
    assert timing.request_timeout == pytest.approx(0.55)
    assert timing.request_timeout + timing.heartbeat <= timing.lease + 1e-9
