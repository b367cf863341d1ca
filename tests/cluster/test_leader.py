"""Leader election on a real Consul dev agent: one leader, the epoch, the fence, failover.

Each test elects under its own key (`unique_prefix`), so tests sharing the
session's agent never see each other's leader. The multi-host faults (a
SIGKILLed coordinator process, a host cut off) are in test_failover.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

import pytest

from coordinator.leader import LeaderElection, NotLeader, check_id
from coordinator.lease import LeaseTiming
from nova.store import TxnOp
from nova.store.consul import FENCE_OP, ConsulStore
from tests.cluster.conftest import ConsulAgent
from tests.cluster.test_store_consul import wait_stopped

pytestmark = pytest.mark.consul

TIMING = LeaseTiming(session_ttl=1.0, check_ttl=1.5, heartbeat=0.3, margin=0.15)


class Candidate:
    """One election in a task of its own, with its own client (as separate processes have)."""

    def __init__(self, url: str, name: str, key: str) -> None:
        self.store = ConsulStore(url, timeout=1.0)
        self.election = LeaderElection(
            self.store, name, api=f"http://{name}", timing=TIMING, key=key
        )
        self.task = asyncio.create_task(self.election.run())

    async def crash(self) -> None:
        """Stop everything at once, as SIGKILL would: no resign, no release."""

        async def no_resign() -> None:
            return None

        self.election.resign = no_resign  # type: ignore[method-assign]
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.store.close()


@pytest.fixture
async def candidates(
    consul_agent: ConsulAgent, unique_prefix: str
) -> AsyncIterator[Callable[[str], Candidate]]:
    started: list[Candidate] = []

    def start(name: str) -> Candidate:
        candidate = Candidate(
            consul_agent.url, f"{name}-{unique_prefix[5:-1]}", unique_prefix + "leader"
        )
        started.append(candidate)
        return candidate

    yield start
    for candidate in started:
        await candidate.stop()


async def first_leader(*cands: Candidate, within: float = 10.0) -> Candidate:
    waits = {asyncio.create_task(c.election.wait_acting()): c for c in cands}
    done, pending = await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    assert done, f"no leader within {within} s"
    return waits[done.pop()]


async def test_one_leader_and_its_epoch_is_the_lock_index(
    candidates: Callable[[str], Candidate],
) -> None:
    a, b = candidates("a"), candidates("b")
    leader = await first_leader(a, b)
    other = b if leader is a else a
    await asyncio.sleep(3 * TIMING.heartbeat)  # the standby had every chance to grab it
    assert leader.election.acting and not other.election.acting
    entry = await leader.store.get(leader.election.key)
    assert entry is not None and entry.session == leader.election.session
    assert leader.election.epoch == entry.lock_index >= 1
    # The new term is announced through the fence.
    assert leader.election.first_write_at is not None
    # Only the leader's writes pass; the standby is refused before it sends anything.
    ok = await leader.election.fenced([TxnOp.set(leader.election.key + "-x", b"1")])
    assert ok.ok
    with pytest.raises(NotLeader):
        await other.election.fenced([TxnOp.set(leader.election.key + "-x", b"2")])
    # Both are registered with a TTL check that their sessions are bound to.
    info = await leader.store.session_info(leader.election.session or "")
    assert info is not None and info["LockDelay"] == 0
    assert check_id(leader.election.id) in str(info.get("ServiceChecks"))


async def test_crashed_leader_is_replaced_and_fenced(
    candidates: Callable[[str], Candidate],
) -> None:
    a, b = candidates("a"), candidates("b")
    leader = await first_leader(a, b)
    other = b if leader is a else a
    await other.election.wait_not_acting()
    old_session, old_epoch = leader.election.session, leader.election.epoch
    assert old_session is not None
    crashed_at = time.monotonic()
    await leader.crash()
    await asyncio.wait_for(other.election.wait_acting(), 5.0)
    took = time.monotonic() - crashed_at
    # The check goes critical after check_ttl; the session is dropped with it.
    assert took < TIMING.check_ttl + 2.0
    assert other.election.epoch == old_epoch + 1
    # The crashed leader's session no longer passes the fence on the servers.
    stale = await other.store.txn_fenced(
        [TxnOp.set(other.election.key + "-x", b"stale")], other.election.key, old_session
    )
    assert not stale.ok and stale.errors[0].op_index == FENCE_OP
    # The new term was announced through the fence, with the new epoch.
    term = await other.store.get_json(other.election.term_key)
    assert term["id"] == other.election.id and term["epoch"] == other.election.epoch


async def test_leader_that_cannot_reach_consul_stops_acting_within_its_lease(
    consul_factory: Callable[[], ConsulAgent], unique_prefix: str
) -> None:
    agent = consul_factory()
    store = ConsulStore(agent.url, timeout=1.0)
    election = LeaderElection(store, "solo", timing=TIMING, key=unique_prefix + "leader")
    task = asyncio.create_task(election.run())
    try:
        await asyncio.wait_for(election.wait_acting(), 10.0)
        assert agent.process is not None
        pid = agent.process.pid
        os.kill(pid, signal.SIGSTOP)  # Consul hangs: no proof can succeed
        stopped_at = time.monotonic()
        try:
            wait_stopped(pid)
            await asyncio.wait_for(election.wait_not_acting(), TIMING.lease + 1.0)
            # It stopped before the servers could have dropped its session.
            assert time.monotonic() - stopped_at <= TIMING.lease + 0.1
            with pytest.raises(NotLeader):
                await election.fenced([TxnOp.set(unique_prefix + "x", b"1")])
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
        agent.stop()


async def test_clean_stop_hands_over_at_once(candidates: Callable[[str], Candidate]) -> None:
    a, b = candidates("a"), candidates("b")
    leader = await first_leader(a, b)
    other = b if leader is a else a
    await other.election.wait_not_acting()
    stopped_at = time.monotonic()
    await leader.stop()
    await asyncio.wait_for(other.election.wait_acting(), 5.0)
    # Released, not expired: well under the check TTL.
    assert time.monotonic() - stopped_at < TIMING.check_ttl
