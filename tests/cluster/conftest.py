"""A real Consul for cluster tests: dev agents on free loopback ports, always stopped.

`consul_agent` is one dev agent shared by the whole session (tests keep to
their own key prefix, see `unique_prefix`); `consul_factory` starts private
agents that a test may stop and restart. Every agent runs in a temporary
data directory with `session_ttl_min = "1s"`, so sessions with TTLs below
Consul's default 10 s floor are allowed, and no DNS or gRPC listeners.
Without a `consul` binary (`make consul` builds it) the tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.lab import Lab, find_consul

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def _die_with_parent() -> None:
    """In the child: SIGTERM when pytest dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def free_port() -> int:
    """A loopback port free for both TCP and UDP now (Serf listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


@dataclass
class ConsulAgent:
    """One `consul agent -dev` process; `start()` again after `stop()` reuses the ports.

    A dev agent keeps its state in memory: a restart begins with an empty
    store and a small raft index (so indexes go backwards across it).
    """

    binary: str
    workdir: Path
    node: str = field(default_factory=lambda: f"nova-test-{uuid.uuid4().hex[:8]}")
    http_port: int = field(default_factory=free_port)
    server_port: int = field(default_factory=free_port)
    serf_lan_port: int = field(default_factory=free_port)
    serf_wan_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "consul.log"

    def command(self) -> list[str]:
        ports = (
            f"ports {{ http = {self.http_port}, server = {self.server_port}, "
            f"serf_lan = {self.serf_lan_port}, serf_wan = {self.serf_wan_port}, "
            "dns = -1, grpc = -1, grpc_tls = -1 }"
        )
        return [
            self.binary,
            "agent",
            "-dev",
            "-node",
            self.node,
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-data-dir",
            str(self.workdir / "data"),
            "-log-level",
            "info",
            "-hcl",
            ports,
            "-hcl",
            'session_ttl_min = "1s"',
            "-hcl",
            "disable_update_check = true",
        ]

    def start(self) -> None:
        """Start the agent and wait until it leads and its node is registered."""
        assert self.process is None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (only an async-signal-safe prctl)
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        """Leader elected and this node in the catalog with serfHealth passing.

        Sessions need the latter: they bind to the node's serfHealth check.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"consul exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self._get("/v1/status/leader") and self._serf_passing():
                return
            time.sleep(0.05)
        raise RuntimeError(f"consul not ready after {START_TIMEOUT} s:\n{self.log_tail()}")

    def _serf_passing(self) -> bool:
        checks = self._get(f"/v1/health/node/{self.node}") or []
        return any(c["CheckID"] == "serfHealth" and c["Status"] == "passing" for c in checks)

    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return json.loads(response.read() or b"null")
        except (OSError, ValueError):  # URLError is an OSError
            return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after `STOP_TIMEOUT`; idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="session")
def consul_binary() -> str:
    binary = find_consul()
    if binary is None:
        pytest.skip("no consul binary on PATH or in .venv/bin: run `make consul` to build it")
    return binary


@pytest.fixture(scope="session")
def consul_factory(consul_binary: str) -> Iterator[Callable[[], ConsulAgent]]:
    """Start private dev agents; every one is stopped at the end of the session."""
    started: list[ConsulAgent] = []
    with tempfile.TemporaryDirectory(prefix="nova-consul-") as tmp:

        def start() -> ConsulAgent:
            agent = ConsulAgent(consul_binary, Path(tmp) / f"agent-{len(started)}")
            started.append(agent)
            agent.start()
            return agent

        try:
            yield start
        finally:
            for agent in started:
                agent.stop()


@pytest.fixture(scope="session")
def consul_agent(consul_factory: Callable[[], ConsulAgent]) -> ConsulAgent:
    """The session's shared dev agent: keep to your own key prefix."""
    return consul_factory()


@pytest.fixture
def private_consul(consul_factory: Callable[[], ConsulAgent]) -> Iterator[ConsulAgent]:
    """A dev agent for this test alone, free to stop and restart; stopped afterwards."""
    agent = consul_factory()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def unique_prefix() -> str:
    """A key prefix no other test uses: `test/<random>/`."""
    return f"test/{uuid.uuid4().hex[:12]}/"


@pytest.fixture(scope="module")
def lab(consul_binary: str) -> Iterator[Lab]:
    """A multi-host lab (tests/cluster/lab.py) for one test module: 4 hosts, the first
    three Consul servers, h3 a Consul client; removed (processes, netns, links) afterwards.

    Tests that cut hosts off or kill Consul agents put them back (`lab.heal`,
    `lab.start_consul` + `lab.wait_consul`) before they end.
    """
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces)")
    built = Lab.create(4)
    try:
        built.up()
        yield built
    finally:
        built.down()
