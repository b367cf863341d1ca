"""Helpers for tests that run real `nova-coordinator` processes on a real Consul.

Simulated nodes are node keys held by a session the test owns, exactly as an
agent holds its own (healthy while the session holds the key); `fail()`
releases a key as Consul does when an agent's check goes critical.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import ConsulAgent, free_port
from tests.unit.test_agent import wait_for
from tests.unit.test_cli import console_script

NOVA_COORDINATOR = console_script("nova-coordinator", "coordinator.main")
GiB = 1 << 30


def http(url: str, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


class Coordinator:
    """One `nova-coordinator` subprocess with its API on a free loopback port."""

    def __init__(self, tmp: Path, consul: ConsulAgent, name: str, *flags: str) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tmp / f"coordinator-{name}-{time.monotonic_ns()}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*NOVA_COORDINATOR, "--consul", consul.url, "--listen",
                 self.url.removeprefix("http://"), "--id", name, "--log-level", "debug", *flags],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(f"coordinator {name}'s API", self._answers, timeout=30)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"nova-coordinator exited with {self.proc.returncode}:\n{self.output()}")
        try:
            self.status()
        except OSError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = http(self.url + "/v1/status")
        return body

    def acting(self) -> bool:
        return bool(http(self.url + "/v1/placement")["acting"])

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def end(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        return self.proc.returncode


class SimulatedNodes:
    """Node keys held by one session of the test's, as agents hold theirs."""

    def __init__(self, consul: ConsulAgent) -> None:
        self.consul = consul
        self.session = http(consul.url + "/v1/session/create", "PUT", {"Name": "test nodes"})["ID"]
        self.values: dict[str, Any] = {}

    def add(
        self, name: str, cpu_millicores: int = 4000, memory: int = 8 * GiB, **labels: str
    ) -> None:
        capacity = {"cpu_millicores": cpu_millicores, "memory_bytes": memory}
        value = {"node": name, "address": "127.0.0.1", "labels": labels, "capacity": capacity}
        url = f"{self.consul.url}/v1/kv/nova/v1/nodes/{name}?acquire={self.session}"
        assert http(url, "PUT", value) is True
        self.values[name] = value

    def fail(self, name: str) -> None:
        """What Consul does when the node's agent dies: the key is released, not deleted."""
        url = f"{self.consul.url}/v1/kv/nova/v1/nodes/{name}?release={self.session}"
        assert http(url, "PUT", self.values[name]) is True


def assignments(consul: ConsulAgent) -> dict[str, dict[str, Any]]:
    """Every node's assignment document."""
    try:
        entries = http(consul.url + "/v1/kv/nova/v1/assignments/?recurse")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise
    return {
        e["Key"].rsplit("/", 1)[1]: json.loads(base64.b64decode(e["Value"])) for e in entries or ()
    }


def placed(consul: ConsulAgent) -> dict[str, str]:
    """replica id -> node; fails the test if a replica is assigned to two nodes."""
    out: dict[str, str] = {}
    for node, doc in assignments(consul).items():
        for replica_id in doc["containers"]:
            assert replica_id not in out, f"{replica_id} on {out[replica_id]} and {node}"
            out[replica_id] = node
    return out
