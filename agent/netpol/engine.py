"""The policy engine: sources + endpoints -> compile -> the kernel backend.

Every change (a policy origin loaded, failed or removed; an endpoint added,
removed or relabelled; namespace labels) marks the engine dirty; one task
waits `debounce_s` to coalesce a burst, compiles everything (pure, fast) and
calls `backend.apply()`. A file written is thus enforced within a few
milliseconds plus the backend's apply time, well inside 100 ms.

Never fail open:
- an origin that fails to parse keeps its last good policies (status and
  `nova_policy_errors_total{stage="parse"}` say which file and why);
- a failed apply leaves the backend's last state (it guarantees that) and is
  retried with backoff, counted under `stage="apply"`;
- `start()` starts the sources and waits for their first sync (the store's up
  to `initial_sync_s`) before the first apply, so a restart never enforces a
  partial set of policies when it could have the whole;
- with `endpoints_pending=True` (the agent) the first apply also waits for
  `endpoints_synced()`: the agent starts the engine before it recovers its
  containers, and an apply before then would drop the endpoints it has not
  reported yet. Until that first apply the kernel keeps what the previous
  agent left in force, so a restart has no window without enforcement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent.netpol.backend import PolicyBackend
from agent.netpol.compiler import IdentityAllocator, compile_policy, rule_count
from agent.netpol.explain import Explanation, explain
from agent.netpol.model import NetworkPolicy
from agent.netpol.sources import PolicySource
from agent.netpol.tables import CompiledPolicy, Endpoint
from agent.netpol.yamltree import PolicyError
from nova.errors import NovaError, UsageError

log = logging.getLogger("nova.agent.netpol")

APPLY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class PolicyMetrics:
    """`nova_policy_*` metrics, registered in the agent's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.errors = Counter(
            "nova_policy_errors",
            "Policy errors: a source that does not parse (parse) or a failed kernel apply (apply)",
            ["stage"],
            registry=registry,
        )
        self.apply_duration = Histogram(
            "nova_policy_apply_duration_seconds",
            "Compile plus kernel apply of the whole policy",
            buckets=APPLY_BUCKETS_S,
            registry=registry,
        )
        self.rules = Gauge(
            "nova_policy_rules", "Rules enforced, over every endpoint and direction",
            registry=registry,
        )  # fmt: skip
        for stage in ("parse", "apply"):
            self.errors.labels(stage)  # exported at 0 from the start: alerts see the series
        self.packets = _PacketCollector()
        registry.register(self.packets)


class _PacketCollector(Collector):
    """Allowed/denied packets per policy, as last read from the backend."""

    def __init__(self) -> None:
        self.counts: Mapping[str, tuple[int, int]] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "nova_policy_packets", "Packets by policy and verdict", labels=["policy", "verdict"]
        )
        for policy, (allowed, denied) in sorted(self.counts.items()):
            family.add_metric([policy, "allowed"], allowed)
            family.add_metric([policy, "denied"], denied)
        yield family


@dataclass
class OriginState:
    """One file or store key: its last good policies and its current error."""

    policies: tuple[NetworkPolicy, ...] = ()
    loaded_at: float | None = None
    error: PolicyError | None = None
    error_at: float | None = None

    def to_dict(self, origin: str) -> dict[str, Any]:
        error = None
        if self.error is not None:
            error = {
                "message": self.error.message,
                "line": self.error.line,
                "field": self.error.field,
                "reason": self.error.reason,
                "at": self.error_at,
            }
        return {
            "origin": origin,
            "policies": [p.key for p in self.policies],
            "loaded_at": self.loaded_at,
            "error": error,
        }


@dataclass
class _ApplyState:
    generation: int = 0
    compiled: CompiledPolicy | None = None
    applied_at: float | None = None
    duration_s: float | None = None
    error: str | None = None
    error_at: float | None = None
    applied_version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class PolicyEngine:
    """Combines policy sources and endpoints and keeps the backend converged."""

    def __init__(
        self,
        backend: PolicyBackend,
        *,
        sources: Iterable[PolicySource] = (),
        metrics: PolicyMetrics | None = None,
        debounce_s: float = 0.005,
        retry_s: float = 0.1,
        max_retry_s: float = 5.0,
        initial_sync_s: float = 5.0,
        counters_s: float = 10.0,
        endpoints_pending: bool = False,
    ) -> None:
        self.backend = backend
        self.sources = list(sources)
        self.metrics = metrics
        self.allocator = IdentityAllocator()
        self._debounce_s = debounce_s
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._initial_sync_s = initial_sync_s
        self._counters_s = counters_s
        self._origins: dict[str, OriginState] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._remote: tuple[Endpoint, ...] = ()  # other hosts' containers: peers only
        self._names: dict[str, str] = {}  # container name -> endpoint key
        self._namespace_labels: dict[str, dict[str, str]] = {}
        self._unsynced: list[str] = []
        self._version = 0  # bumped on every input change
        self._dirty = asyncio.Event()
        self._endpoints_ready = asyncio.Event()
        if not endpoints_pending:
            self._endpoints_ready.set()
        self._state = _ApplyState()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifetime ----------------------------------------------------------

    async def start(self) -> None:
        """Start the backend and the sources, wait for their first sync, then enforce."""
        await self.backend.start()
        for source in self.sources:
            await source.start(self)
        for source in self.sources:
            if not await source.wait_synced(self._initial_sync_s):
                log.error(
                    "policy source %s did not sync in %.1fs", source.name, self._initial_sync_s
                )
                self._unsynced.append(source.name)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._apply_loop())]
        if self.metrics is not None:
            self._tasks.append(loop.create_task(self._counters_loop()))
        self._changed()

    async def close(self, *, remove: bool = False) -> None:
        """Stop following; `remove=True` also uninstalls the backend's kernel state."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for source in self.sources:
            await source.close()
        await self.backend.close(remove=remove)

    # -- inputs (PolicySink and endpoints) ----------------------------------

    def source_loaded(self, origin: str, policies: list[NetworkPolicy]) -> None:
        self._origins[origin] = OriginState(tuple(policies), time.time())
        log.info("policy source %s: %d policies loaded", origin, len(policies))
        self._changed()

    def source_failed(self, origin: str, error: PolicyError) -> None:
        state = self._origins.setdefault(origin, OriginState())
        state.error, state.error_at = error, time.time()
        log.error("policy rejected, last good version stays enforced: %s", error.message)
        if self.metrics is not None:
            self.metrics.errors.labels("parse").inc()

    def source_removed(self, origin: str) -> None:
        if self._origins.pop(origin, None) is not None:
            log.info("policy source %s removed", origin)
            self._changed()

    def set_endpoints(
        self, endpoints: Iterable[Endpoint], names: Mapping[str, str] | None = None
    ) -> None:
        """Replace the whole endpoint set; `names` maps container names to endpoint keys."""
        self._endpoints = {e.key: e for e in endpoints}
        self._names = dict(names or {})
        self._changed()

    def set_remote_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Other hosts' containers (cluster-wide): selectors match them as peers."""
        remote = tuple(sorted(endpoints, key=lambda e: e.key))
        if remote != self._remote:
            self._remote = remote
            self._changed()

    def add_endpoint(self, endpoint: Endpoint, *, name: str | None = None) -> None:
        if self._endpoints.get(endpoint.key) == endpoint and (
            not name or self._names.get(name) == endpoint.key
        ):
            return  # told again (starting, then up): nothing changes
        self._endpoints[endpoint.key] = endpoint
        if name:
            self._names[name] = endpoint.key
        self._changed()

    def remove_endpoint(self, key: str) -> None:
        if self._endpoints.pop(key, None) is not None:
            self._names = {n: k for n, k in self._names.items() if k != key}
            self._changed()

    def selects(self, endpoint: Endpoint) -> bool:
        """True when a policy in force selects `endpoint` (it is isolated in a direction)."""
        return any(
            p.namespace == endpoint.namespace and p.pod_selector.matches(endpoint.labels)
            for p in self.policies
        )

    async def endpoint_starting(
        self,
        endpoint: Endpoint,
        *,
        name: str | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> None:
        """A container is about to run: report it, and when a policy selects it, return only
        once that is enforced (its first packet meets its policy). Others do not wait: until
        the next apply their address is unknown to the kernel, which only ever denies it.

        Raises NovaError when enforcement does not come within `timeout`.
        """
        self.add_endpoint(endpoint, name=name)
        if not self.selects(endpoint):
            return
        try:
            await self.wait_applied(timeout)
        except TimeoutError:
            raise NovaError(
                f"network policy for container {name or endpoint.key} was not enforced within "
                f"{timeout:g}s ({self._state.error or 'apply pending'}); not starting it"
            ) from None

    def endpoints_synced(self) -> None:
        """Every endpoint that exists has been reported: the first apply may run."""
        if not self._endpoints_ready.is_set():
            log.info("policy endpoints synced (%d); enforcing", len(self._endpoints))
            self._endpoints_ready.set()

    def set_namespace_labels(self, namespace: str, labels: Mapping[str, str]) -> None:
        self._namespace_labels[namespace] = dict(labels)
        self._changed()

    # -- reading -------------------------------------------------------------

    @property
    def policies(self) -> list[NetworkPolicy]:
        return [p for origin in sorted(self._origins) for p in self._origins[origin].policies]

    @property
    def compiled(self) -> CompiledPolicy | None:
        """What the backend enforces now (the last successful apply)."""
        return self._state.compiled

    async def wait_applied(self, timeout: float = 5.0) -> int:  # noqa: ASYNC109
        """Wait until every change made so far is enforced; the generation that holds it."""
        wanted = self._version
        async with asyncio.timeout(timeout), self._state.changed:
            await self._state.changed.wait_for(lambda: self._state.applied_version >= wanted)
        return self._state.generation

    def status(self) -> dict[str, Any]:
        state = self._state
        compiled = state.compiled
        errors = [
            {"origin": origin, "message": s.error.message, "at": s.error_at}
            for origin, s in sorted(self._origins.items())
            if s.error is not None
        ]
        if state.error is not None:
            errors.append({"origin": "backend", "message": state.error, "at": state.error_at})
        errors.extend(
            {"origin": name, "message": f"{name} had not synced at start", "at": None}
            for name in self._unsynced
        )
        return {
            "backend": self.backend.name,
            "generation": state.generation,
            "applied_at": state.applied_at,
            "apply_seconds": state.duration_s,
            "pending": state.applied_version < self._version,
            "endpoints_synced": self._endpoints_ready.is_set(),
            "policies": len(self.policies),
            "rules": rule_count(compiled) if compiled is not None else 0,
            "endpoints": len(compiled.endpoints) if compiled is not None else 0,
            "sources": [s.name for s in self.sources],
            "origins": [s.to_dict(o) for o, s in sorted(self._origins.items())],
            "errors": errors,
        }

    def resolve(self, ref: str) -> IPv4Address:
        """An IP address, or the IP of an endpoint given by container name, id or id prefix."""
        with contextlib.suppress(ValueError):
            return IPv4Address(ref)
        key = self._names.get(ref, ref)
        if key in self._endpoints:
            return self._endpoints[key].ip
        matches = [k for k in self._endpoints if k.startswith(ref)]
        if len(matches) == 1:
            return self._endpoints[matches[0]].ip
        if matches:
            raise UsageError(f"{ref!r} matches several containers: {', '.join(sorted(matches))}")
        raise UsageError(f"{ref!r} is neither an IPv4 address nor a container with policy here")

    def explain(self, src: str, dst: str, protocol: int, port: int) -> Explanation:
        """What the enforced policy does with a new connection (names, ids or IPs)."""
        compiled = self._state.compiled or self._compile(0)
        return explain(compiled, self.resolve(src), self.resolve(dst), protocol, port)

    # -- the loop ------------------------------------------------------------

    def _changed(self) -> None:
        self._version += 1
        self._dirty.set()

    def _compile(self, generation: int) -> CompiledPolicy:
        return compile_policy(
            self.policies,
            self._endpoints.values(),
            self._namespace_labels,
            self.allocator,
            generation,
            remote=self._remote,
        )

    async def _apply_loop(self) -> None:
        delay = self._retry_s
        await self._endpoints_ready.wait()  # never apply a partial endpoint set
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._debounce_s)
            self._dirty.clear()
            try:
                applied = await self._apply_once()
            except Exception:  # a bug: log it whole, keep the last state, keep the loop alive
                log.exception("policy compile/apply failed unexpectedly")
                self._state.error, self._state.error_at = "internal error; see the log", time.time()
                if self.metrics is not None:
                    self.metrics.errors.labels("apply").inc()
                applied = False
            if applied:
                delay = self._retry_s
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_retry_s)
                self._dirty.set()

    async def _apply_once(self) -> bool:
        state = self._state
        version = self._version
        started = time.perf_counter()
        compiled = self._compile(state.generation + 1)
        try:
            await self.backend.apply(compiled)
        except NovaError as exc:  # PolicyBackendError and the like: the backend kept its state
            state.error, state.error_at = exc.message, time.time()
            log.error("policy apply failed; the previous policy stays enforced: %s", exc.message)
            if self.metrics is not None:
                self.metrics.errors.labels("apply").inc()
            return False
        duration = time.perf_counter() - started
        state.generation = compiled.generation
        state.compiled = compiled
        state.applied_at, state.duration_s = time.time(), duration
        state.error = state.error_at = None
        if self.metrics is not None:
            self.metrics.apply_duration.observe(duration)
            self.metrics.rules.set(rule_count(compiled))
        async with state.changed:
            state.applied_version = version
            state.changed.notify_all()
        log.debug("policy generation %d applied in %.1f ms", compiled.generation, duration * 1e3)
        return True

    async def _counters_loop(self) -> None:
        assert self.metrics is not None
        while True:
            try:
                self.metrics.packets.counts = await self.backend.counters()
            except NovaError as exc:
                log.warning("policy counters unavailable: %s", exc.message)
            await asyncio.sleep(self._counters_s)
