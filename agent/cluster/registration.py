"""The node in Consul: a service with a TTL check, a session bound to it, the node key.

    service  nova-agent, ID nova-agent:<node>, TTL check nova-agent:<node>
    session  name nova-agent:<node>, LockDelay 0, behavior release, bound to
             serfHealth and the TTL check
    key      nova/v1/nodes/<node> acquired with the session (NodeInfo as JSON)

The heartbeat passes the check and renews the session every `heartbeat` s.
If the agent dies, the check goes critical after `check_ttl` s, Consul
invalidates the session and releases the key: the coordinator sees the node
unhealthy and moves its containers. When the check or the session is gone
(Consul restarted without its data, a partition outlived the TTL) the agent
registers again from scratch. A key still held by an earlier incarnation of
this agent (same name, same Consul agent) is taken over at once by
destroying that stale session; a key held from elsewhere is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from agent.cluster.health import Backoff, StoreHealth
from agent.cluster.node import NodeInfo
from nova.store import StoreError, encode_json, keys
from nova.store.consul import ConsulStore

log = logging.getLogger("nova.agent.cluster.registration")

SERVICE = "nova-agent"
CHECK_TTL = 3.0
SESSION_TTL = 10.0
HEARTBEAT = 1.0


class Registration:
    def __init__(
        self,
        store: ConsulStore,
        info: NodeInfo,
        health: StoreHealth,
        *,
        on_registered: Callable[[], None] = lambda: None,
        check_ttl: float = CHECK_TTL,
        session_ttl: float = SESSION_TTL,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self.store = store
        self.info = info
        self.health = health
        self.on_registered = on_registered
        self.check_ttl = check_ttl
        self.session_ttl = session_ttl
        self.heartbeat = heartbeat
        self.service_id = self.check_id = f"{SERVICE}:{info.node}"
        self.key = keys.node(info.node)
        self.session: str | None = None
        self.registered = asyncio.Event()

    async def run(self) -> None:
        """Register, then keep the registration alive; never returns (cancel it)."""
        backoff = Backoff(cap=self.heartbeat * 5)
        while True:
            try:
                await self._beat()
            except StoreError as exc:
                self.health.failed("heartbeat", exc)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.health.ok()
            await asyncio.sleep(self.heartbeat)

    async def _beat(self) -> None:
        if self.session is not None:
            if not await self.store.pass_check(self.check_id):
                log.warning("Consul lost the check %s; registering again", self.check_id)
                self._lost()
            elif not await self.store.renew_session(self.session):
                log.warning("session %s is gone (invalidated or Consul restarted)", self.session)
                self._lost()
        if self.session is None:
            await self._register()

    def _lost(self) -> None:
        self.session = None
        self.registered.clear()

    async def _register(self) -> None:
        await self.store.register_ttl_service(
            name=SERVICE,
            service_id=self.service_id,
            check_id=self.check_id,
            ttl=self.check_ttl,
            address=self.info.address,
            meta={"node": self.info.node},
        )
        await self.store.pass_check(self.check_id)
        session = await self.store.create_session(
            ttl=self.session_ttl,
            name=self.service_id,
            lock_delay=0.0,
            behavior="release",
            service_checks=[self.check_id],
        )
        try:
            if not await self._acquire(session):
                await self.store.destroy_session(session)
                return  # the next beat tries again
        except BaseException:
            await asyncio.shield(self._destroy_quietly(session))
            raise
        self.session = session
        log.info("registered node %s in Consul (session %s)", self.info.node, session)
        self.registered.set()
        self.on_registered()

    async def _acquire(self, session: str) -> bool:
        value = encode_json(self.info.to_json())
        if await self.store.acquire(self.key, value, session):
            return True
        entry = await self.store.get(self.key)
        holder = entry.session if entry else None
        if holder and await self._is_earlier_incarnation(holder, session):
            log.info("taking the node key over from this agent's previous session %s", holder)
            await self.store.destroy_session(holder)
            return await self.store.acquire(self.key, value, session)
        log.warning(
            "node key %s is held by session %s (another agent with --node %s?); waiting",
            self.key,
            holder,
            self.info.node,
        )
        return False

    async def _is_earlier_incarnation(self, holder: str, mine: str) -> bool:
        theirs = await self.store.session_info(holder)
        ours = await self.store.session_info(mine)
        if theirs is None or ours is None:
            return False
        return bool(
            theirs.get("Name") == self.service_id and theirs.get("Node") == ours.get("Node")
        )

    async def _destroy_quietly(self, session: str) -> None:
        with contextlib.suppress(StoreError):  # its TTL check ends it anyway
            await self.store.destroy_session(session)
