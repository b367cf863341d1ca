"""Leader election among coordinators: a Consul session lock on `nova/v1/coordinator/leader`.

Every coordinator registers a service `nova-coordinator` with a TTL check
`nova-coordinator:<id>` on its local Consul agent and creates a session
bound to that check (and to its node's serfHealth), with LockDelay 0 and a
short TTL. A heartbeat passes the check and renews the session every
`LeaseTiming.heartbeat` seconds; each success is a proof that extends the
`Lease`.

Campaign: a blocking query on the leader key; when no session holds it, the
coordinator acquires it (value `{"id", "address", "api"}`). A new holder's
acquisition increments the key's LockIndex: that is the leader's **epoch**.

Fencing, twice over:
  * the leader acts only while its lease is valid (`acting`): when it cannot
    prove its session alive it stops before any server could invalidate it;
  * every leader write is `fenced()`: one `/v1/txn` with `check-session` on
    the leader key, so a write from a deposed leader is refused by Consul.

On election the new leader first writes `nova/v1/coordinator/term`
(`{"id", "epoch", "at"}`) through the fence: operators and the failover
benchmark see when a leader really started acting.

A SIGKILLed leader stops passing its check: the check goes critical after
`check_ttl` and Consul invalidates the session, releasing the key. A leader
cut off from the servers stops proving, stops acting after its lease, and
the servers drop its session by TTL or serfHealth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.lease import Lease, LeaseTiming
from nova.store import KVEntry, StoreError, TxnOp, TxnResult, encode_json, keys
from nova.store.consul import FENCE_OP, ConsulStore, SessionInvalid

log = logging.getLogger("nova.coordinator.leader")

SERVICE = "nova-coordinator"
TERM = keys.ROOT + "coordinator/term"
"""Written (fenced) by each new leader: `{"id", "epoch", "at"}` (wall-clock seconds)."""
WATCH_WAIT = 5.0
RETRY_MIN = 0.1
RETRY_MAX = 2.0


class NotLeader(Exception):
    """This coordinator may not write as the leader now (not elected, lease expired, fenced)."""


def check_id(coordinator_id: str) -> str:
    return f"{SERVICE}:{coordinator_id}"


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """Who holds the leader key, as the key says (`None` fields: nobody)."""

    id: str | None
    api: str | None
    epoch: int
    session: str | None

    @classmethod
    def from_entry(cls, entry: KVEntry | None) -> LeaderInfo:
        if entry is None or entry.session is None:
            return cls(None, None, entry.lock_index if entry else 0, None)
        try:
            value = entry.json()
        except ValueError:
            value = {}
        value = value if isinstance(value, dict) else {}
        return cls(value.get("id"), value.get("api"), entry.lock_index, entry.session)


class LeaderElection:
    """Campaign for the leader key, keep the lease, and fence every leader write.

    `store` talks to this host's Consul agent; use it for the election alone
    (its timeout bounds every heartbeat request). Call `run()` in a task;
    `wait_acting()` / `wait_not_acting()` follow the role; `fenced()` writes.
    """

    def __init__(
        self,
        store: ConsulStore,
        coordinator_id: str,
        *,
        api: str = "",
        address: str = "",
        timing: LeaseTiming | None = None,
        key: str = keys.LEADER,
    ) -> None:
        keys.segment(coordinator_id, what="coordinator id")
        self.store = store
        self.id = coordinator_id
        self.api = api
        self.address = address
        self.timing = timing or LeaseTiming()
        self.key = key
        self.term_key = key.rsplit("/", 1)[0] + "/term"  # TERM for the default key
        self.lease = Lease(self.timing)
        self.session: str | None = None
        self.holder = False  # the key says our session holds it
        self.epoch = 0  # LockIndex when we acquired it
        self.leader = LeaderInfo(None, None, 0, None)  # what the key said last
        self.first_write_at: float | None = None  # wall clock of the first fenced write
        self._changed = asyncio.Event()
        self._acting = False
        self._wake_campaign = asyncio.Event()

    # -- the role ------------------------------------------------------------------

    @property
    def acting(self) -> bool:
        """Elected, and the lease still proves the session alive."""
        return self.holder and self.lease.valid(time.monotonic())

    async def wait_acting(self) -> int:
        """Block until this coordinator acts as the leader; returns the epoch."""
        while not self._acting:
            await self._next_change()
        return self.epoch

    async def wait_not_acting(self) -> None:
        while self._acting:
            await self._next_change()

    async def _next_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def _update_role(self) -> None:
        acting = self.acting
        if acting != self._acting:
            self._acting = acting
            if acting:
                log.info("%s: leading, epoch %d", self.id, self.epoch)
            else:
                log.warning("%s: stopped acting as leader (epoch %d)", self.id, self.epoch)
            self._changed.set()

    def _step_down(self, why: str) -> None:
        if self.holder:
            log.warning("%s: lost the leader key (epoch %d): %s", self.id, self.epoch, why)
        self.holder = False
        self._update_role()

    # -- fenced writes ------------------------------------------------------------------

    async def fenced(self, ops: Sequence[TxnOp]) -> TxnResult:
        """Apply `ops` in one txn that Consul refuses unless our session holds the key.

        NotLeader if we are not acting, or if the fence failed (then we step
        down). A result with other errors (a failed CAS) is returned as is.
        """
        session = self.session
        if not self.acting or session is None:
            raise NotLeader(f"{self.id} is not acting as leader")
        result = await self.store.txn_fenced(ops, self.key, session)
        if not result.ok and any(e.op_index == FENCE_OP for e in result.errors):
            self._step_down("a fenced write was refused")
            raise NotLeader(f"{self.id}: the fence refused the write (leadership lost)")
        return result

    # -- the loops --------------------------------------------------------------------------

    async def run(self) -> None:
        """Register, then heartbeat and campaign until cancelled; then resign."""
        await self._register()
        tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="leader-heartbeat"),
            asyncio.create_task(self._campaign_loop(), name="leader-campaign"),
            asyncio.create_task(self._lease_timer(), name="leader-lease"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.shield(self.resign())

    async def resign(self) -> None:
        """Release the key and destroy the session (a clean stop: the standby leads at once)."""
        session, self.session = self.session, None
        was_holder = self.holder
        self.holder = False
        self._update_role()
        if session is None:
            return
        with contextlib.suppress(StoreError, OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                if was_holder:
                    await self.store.release(self.key, session, self._value())
                await self.store.destroy_session(session)
                await self.store.deregister_service(check_id(self.id))

    async def _register(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                await self.store.register_ttl_service(
                    name=SERVICE,
                    service_id=check_id(self.id),
                    check_id=check_id(self.id),
                    ttl=self.timing.check_ttl,
                    address=self.address or None,
                    meta={"api": self.api} if self.api else None,
                    deregister_after=60.0,
                )
                return
            except StoreError as exc:
                log.warning("%s: cannot register with Consul (retrying): %s", self.id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _new_session(self) -> str:
        """A session bound to our check (passed first: a critical check refuses it)."""
        await self._pass_check()
        session = await self.store.create_session(
            ttl=self.timing.session_ttl,
            name=f"{SERVICE} {self.id}",
            lock_delay=0.0,
            behavior="release",
            node_checks=None,  # Consul's default: the node's serfHealth
            service_checks=[check_id(self.id)],
        )
        log.info("%s: new session %s", self.id, session)
        return session

    async def _pass_check(self) -> None:
        if not await self.store.pass_check(check_id(self.id)):
            await self._register()  # the agent forgot us (it restarted)
            await self.store.pass_check(check_id(self.id))

    async def _heartbeat_loop(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.timing.request_timeout):
                    await self._heartbeat(started)
                failures = 0
            except SessionInvalid:
                self._lose_session("the session was invalidated")
            except (StoreError, TimeoutError) as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("%s: heartbeat failed (%d in a row): %s", self.id, failures, exc)
            self._update_role()
            await asyncio.sleep(max(0.0, started + self.timing.heartbeat - time.monotonic()))

    async def _heartbeat(self, started: float) -> None:
        if self.session is None:
            self.session = await self._new_session()
            self.lease.check_passed(started)
            self.lease.session_renewed(started)
            self._wake_campaign.set()
            return
        passed, renewed = await asyncio.gather(
            self.store.pass_check(check_id(self.id)), self.store.renew_session(self.session)
        )
        if not renewed:
            self._lose_session("the session no longer exists")
            return
        self.lease.session_renewed(started)
        if passed:
            self.lease.check_passed(started)
        else:
            await self._register()

    def _lose_session(self, why: str) -> None:
        self.session = None
        self.lease.revoke()
        self._step_down(why)

    async def _lease_timer(self) -> None:
        """Notice a lease that runs out between heartbeats (a stuck request)."""
        while True:
            remaining = self.lease.remaining(time.monotonic())
            await asyncio.sleep(remaining + 0.001 if self._acting else self.timing.heartbeat)
            self._update_role()

    async def _campaign_loop(self) -> None:
        index = 0
        delay = RETRY_MIN
        while True:
            try:
                new_index, entries = await self.store.watch(self.key, index, WATCH_WAIT)
                index = 0 if new_index < index else new_index
                entry = next((e for e in entries if e.key == self.key), None)
                await self._observe(entry)
                delay = RETRY_MIN
            except StoreError as exc:
                log.warning("%s: watching %s failed (retrying): %s", self.id, self.key, exc)
                index = 0
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _observe(self, entry: KVEntry | None) -> None:
        self.leader = LeaderInfo.from_entry(entry)
        if self.holder and (entry is None or entry.session != self.session):
            self._step_down("the key is no longer held by our session")
        if entry is not None and entry.session is not None:
            return
        if self.session is None or not self.lease.valid(time.monotonic()):
            # Not provably alive: wait for the heartbeat to bring a session.
            self._wake_campaign.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timing.heartbeat):
                    await self._wake_campaign.wait()
            return
        await self._try_acquire(self.session)

    async def _try_acquire(self, session: str) -> None:
        try:
            won = await self.store.acquire(self.key, self._value(), session)
        except SessionInvalid:
            self._lose_session("the session was invalidated")
            return
        if not won:
            return
        entry = await self.store.get(self.key)
        if entry is None or entry.session != session:
            return  # lost it again already
        self.leader = LeaderInfo.from_entry(entry)
        self.holder = True
        self.epoch = entry.lock_index
        self._update_role()
        await self._announce()

    async def _announce(self) -> None:
        """The first fenced write of a new term: proves to everyone that we act."""
        at = time.time()
        record = {"id": self.id, "epoch": self.epoch, "at": at}
        try:
            await self.fenced([TxnOp.set(self.term_key, encode_json(record))])
            self.first_write_at = at
            log.info("%s: term %d announced", self.id, self.epoch)
        except (NotLeader, StoreError) as exc:
            log.warning("%s: could not announce term %d: %s", self.id, self.epoch, exc)

    def _value(self) -> bytes:
        return encode_json({"id": self.id, "address": self.address, "api": self.api})

    def describe(self) -> dict[str, Any]:
        """This coordinator's view, for the status API."""
        now = time.monotonic()
        return {
            "id": self.id,
            "acting": self.acting,
            "session": self.session,
            "lease_remaining_s": round(self.lease.remaining(now), 3),
            "leader": {
                "id": self.leader.id,
                "api": self.leader.api,
                "epoch": self.leader.epoch,
            },
        }


def term_record(value: bytes) -> dict[str, Any]:
    """The decoded `nova/v1/coordinator/term` value."""
    record = json.loads(value)
    if not isinstance(record, dict):
        raise ValueError("coordinator term record is not an object")
    return record
