"""Prometheus metrics of the agent (names from the product brief).

Counters the sandbox keeps as plain integers (pool and cache statistics) are
read at scrape time by a collector, so the start path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.sandbox.runtime import SandboxRuntime

# Microsecond buckets around the 240 us warm-start goal, up to cold starts.
STARTUP_BUCKETS_US = (
    50, 100, 150, 200, 240, 300, 400, 500, 750, 1_000, 2_500, 5_000,
    10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
)  # fmt: skip


class SandboxCollector(Collector):
    def __init__(self, runtime: SandboxRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        # One series per warm pool: a Nova namespace's, or "-" for the host-network pool.
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "hits": CounterMetricFamily(
                "nova_pool_hits", "Starts that took a warm worker from the pool",
                labels=["namespace"],
            ),
            "misses": CounterMetricFamily(
                "nova_pool_misses", "Starts that found the pool empty", labels=["namespace"]
            ),
            "failures": CounterMetricFamily(
                "nova_pool_spawn_failures", "Workers the pool failed to fork",
                labels=["namespace"],
            ),
            "idle": GaugeMetricFamily(
                "nova_pool_idle_workers", "Warm workers ready", labels=["namespace"]
            ),
            "size": GaugeMetricFamily(
                "nova_pool_target_size", "Warm pool target", labels=["namespace"]
            ),
        }  # fmt: skip
        for namespace, pool in list(self.runtime.pools.items()):
            label = [namespace or "-"]
            families["hits"].add_metric(label, pool.stats.hits)
            families["misses"].add_metric(label, pool.stats.misses)
            families["failures"].add_metric(label, pool.stats.spawn_failures)
            families["idle"].add_metric(label, pool.idle)
            families["size"].add_metric(label, pool.size)
        yield from families.values()
        network = self.runtime.network
        if network is not None:
            yield GaugeMetricFamily(
                "nova_network_sandboxes",
                "Sandboxes with their own netns and address (running and warm)",
                value=len(network.attachments()),
            )
        stats = self.runtime.cache.stats
        hits = CounterMetricFamily(
            "nova_module_cache_hits", "Compiled-module cache hits", labels=["tier"]
        )
        hits.add_metric(["memory"], stats.memory_hits)
        hits.add_metric(["disk"], stats.disk_hits)
        yield hits
        yield CounterMetricFamily(
            "nova_module_cache_misses", "Modules compiled from source", value=stats.misses
        )
        yield CounterMetricFamily(
            "nova_module_cache_rebuilds", "Corrupt or stale cache entries rebuilt",
            value=stats.rebuilds,
        )  # fmt: skip


class AgentMetrics:
    def __init__(self, runtime: SandboxRuntime) -> None:
        self.registry = CollectorRegistry()
        self.container_starts = Counter(
            "nova_container_starts",
            "Total container starts",
            ["pooled"],
            registry=self.registry,
        )
        self.startup_duration = Histogram(
            "nova_startup_duration_microseconds",
            "Container startup time: start request to the module's _start entry",
            buckets=STARTUP_BUCKETS_US,
            registry=self.registry,
        )
        self.active_containers = Gauge(
            "nova_active_containers", "Number of active containers", registry=self.registry
        )
        self.container_exits = Counter(
            "nova_container_exits",
            "Containers that ended, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.start_failures = Counter(
            "nova_container_start_failures",
            "Start requests refused (bad module, bad input)",
            ["kind"],
            registry=self.registry,
        )
        self.registry.register(SandboxCollector(runtime))
