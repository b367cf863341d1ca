"""Whether the cluster store answers, and since when it does not.

Every loop that talks to Consul reports here after each call; operators see
the result in `nova ps` (a warning line), `/v1/health` and the metrics
`nova_cluster_store_available` and `nova_cluster_store_errors`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("nova.agent.cluster")


class StoreHealth:
    def __init__(self, url: str, registry: CollectorRegistry) -> None:
        self.url = url
        self.unavailable_since: float | None = None
        self.last_error = ""
        self._available = Gauge(
            "nova_cluster_store_available",
            "1 while the cluster store (Consul) answers, 0 while it does not",
            registry=registry,
        )
        self._errors = Counter(
            "nova_cluster_store_errors",
            "Failed calls to the cluster store, by operation",
            ["operation"],
            registry=registry,
        )
        self._available.set(1)

    @property
    def available(self) -> bool:
        return self.unavailable_since is None

    def ok(self) -> None:
        if self.unavailable_since is not None:
            down = time.time() - self.unavailable_since
            log.warning("cluster store at %s answers again after %.1f s", self.url, down)
            self.unavailable_since = None
            self.last_error = ""
            self._available.set(1)

    def failed(self, operation: str, error: Exception) -> None:
        self._errors.labels(operation).inc()
        self.last_error = str(error)
        if self.unavailable_since is None:
            self.unavailable_since = time.time()
            self._available.set(0)
            log.error(
                "cluster store unavailable (%s): %s; containers keep running, retrying",
                operation,
                error,
            )
        else:
            log.debug("cluster store still unavailable (%s): %s", operation, error)

    def describe(self) -> dict[str, Any]:
        return {
            "consul": self.url,
            "store": "available" if self.available else "unavailable",
            "unavailable_since": self.unavailable_since,
            "last_error": self.last_error or None,
        }


class Backoff:
    """Exponential delays between retries: `first`, doubled up to `cap`; `reset()` on success."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first
