"""The leader's lease: until when it may act, from the proofs its session is alive.

Pure timing, no I/O (unit-tested in tests/unit/test_lease.py). The leader
holds the lock through a Consul session that servers invalidate when

  * its service TTL check goes critical: `check_ttl` after the last pass
    reached the local agent, or
  * its session TTL runs out: Consul's timer is 2 x `session_ttl` after the
    last renew reached the servers (we count only 1 x: the documented floor).

A pass or renew cannot reach Consul before it was sent, so a proof sent at
time t keeps the session alive at least until t + TTL. The lease is the
earliest such deadline minus a `margin` for clock-rate differences and
scheduling: past it the leader stops acting, before any server could have
given the lock to someone else. A later successful proof extends it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class TimingError(ValueError):
    """Lease timings that cannot keep a leader (the message says which and why)."""


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """How the leader proves it is alive, in seconds.

    session_ttl  the session's TTL (Consul's floor is the servers' session_ttl_min)
    check_ttl    the TTL of the service check `nova-coordinator:<id>` bound to the session
    heartbeat    how often the check is passed and the session renewed
    margin       how long before the earliest possible invalidation the leader stops
    """

    session_ttl: float = 1.0
    check_ttl: float = 1.5
    heartbeat: float = 0.3
    margin: float = 0.15

    def __post_init__(self) -> None:
        for name in ("session_ttl", "check_ttl", "heartbeat", "margin"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise TimingError(f"lease timing: {name} must be a positive number, not {value!r}")
        if self.lease < 2 * self.heartbeat:
            raise TimingError(
                f"lease timing: min(session_ttl, check_ttl) - margin = {self.lease:g} s leaves "
                f"fewer than two heartbeats of {self.heartbeat:g} s: lower the heartbeat or "
                "raise the TTLs"
            )

    @property
    def lease(self) -> float:
        """How long one proof lets the leader act, counted from when it was sent."""
        return min(self.session_ttl, self.check_ttl) - self.margin

    @property
    def request_timeout(self) -> float:
        """A heartbeat request slower than this cannot prove anything useful: give up on it."""
        return max(self.heartbeat, self.lease - self.heartbeat)


class Lease:
    """The deadlines from the last passed check and the last renewed session.

    Times are `time.monotonic()` seconds, passed in by the caller.
    """

    __slots__ = ("_check_until", "_session_until", "timing")

    def __init__(self, timing: LeaseTiming) -> None:
        self.timing = timing
        self._check_until = -math.inf
        self._session_until = -math.inf

    def check_passed(self, sent_at: float) -> None:
        """The TTL check was passed by a request sent at `sent_at`."""
        self._check_until = max(self._check_until, sent_at + self.timing.check_ttl)

    def session_renewed(self, sent_at: float) -> None:
        """The session was renewed (so it existed) by a request sent at `sent_at`."""
        self._session_until = max(self._session_until, sent_at + self.timing.session_ttl)

    def revoke(self) -> None:
        """The session is gone (or its check failed): nothing proves it alive any more."""
        self._check_until = self._session_until = -math.inf

    @property
    def deadline(self) -> float:
        """Until when the holder may act (-inf before the first full proof)."""
        return min(self._check_until, self._session_until) - self.timing.margin

    def valid(self, now: float) -> bool:
        return now < self.deadline

    def remaining(self, now: float) -> float:
        """Seconds left to act (0 when expired)."""
        return max(0.0, self.deadline - now)
