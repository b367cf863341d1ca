"""Nova in the lab: coordinators, agents and one deployment, as tests and benchmarks see them.

`Cluster` wraps a `Lab` (tests/cluster/lab.py) with the Nova processes it
runs and answers what users rely on, read from Consul and from each agent's
own API: who leads (the term record each new leader writes through the
fence), where each replica is assigned, what runs where.
"""

from __future__ import annotations

import datetime
import http.client
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from coordinator.state import replica_id
from nova.store import keys
from tests.cluster.lab import ROOT, Host, Lab, LabError, LabProcess, coordinator_id

TERM = keys.ROOT + "coordinator/term"
NAMESPACE = "lab"
DEPLOYMENT = "sleepers"
IMAGE = "sleep:lab"


class LabTimeout(AssertionError):
    """Something the lab waited for did not happen in time (the message says what)."""


T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; AssertionError naming `what` if not."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (OSError, ValueError, KeyError, LabError) as exc:  # restarting, not there yet
            last, value = exc, None
        if value:
            return value
        time.sleep(every)
    raise LabTimeout(f"not within {timeout} s: {what}" + (f" (last error: {last})" if last else ""))


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.unix_path))
        self.sock = sock


def agent_get(path: Path, url: str, timeout: float = 3.0) -> Any:
    """GET from an agent's local API on its unix socket."""
    connection = _UnixConnection(path, timeout)
    try:
        connection.request("GET", url)
        response = connection.getresponse()
        if response.status != 200:
            raise OSError(f"{path}: GET {url}: HTTP {response.status}")
        return json.loads(response.read())
    finally:
        connection.close()


def http_json(url: str, body: Any = None, timeout: float = 3.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


@dataclass
class Cluster:
    """The module's lab with its Nova processes, and what the tests ask of it."""

    lab: Lab
    coordinators: dict[str, LabProcess]  # host name -> process
    agents: dict[str, LabProcess]

    @classmethod
    def start(cls, lab: Lab, coordinator_hosts: tuple[int, ...] = (1, 2, 3)) -> Cluster:
        """Push the sleep app, start an agent on every host and the coordinators; wait
        until one leads and every node is registered."""
        subprocess.run(["make", "-s", "-C", str(ROOT / "examples")], check=True)
        push = subprocess.run(
            [sys.executable, "-m", "nova.cli.main", "image", "push", "--consul",
             lab.hosts[0].consul_url, IMAGE, str(ROOT / "examples/build/sleep.wasm")],
            capture_output=True, text=True, cwd=ROOT, check=False,
        )  # fmt: skip
        if push.returncode != 0:
            raise LabError(f"nova image push {IMAGE} failed: {push.stderr}")
        cluster = cls(lab, {}, {})
        for host in lab.hosts:
            cluster.agents[host.name] = lab.start_agent(host)
        for i in coordinator_hosts:
            cluster.start_coordinator(lab.hosts[i])
        cluster.leader_host()
        wait_for(
            "every agent's node registered",
            lambda: len(lab.kv(keys.NODES)) == len(lab.hosts),
            30.0,
        )
        return cluster

    def log_tails(self) -> str:
        processes = [*self.coordinators.values(), *self.agents.values()]
        return "\n".join(f"--- {p.name} on {p.host}\n{p.log_tail(10)}" for p in processes)

    def host(self, name: str) -> Host:
        return next(h for h in self.lab.hosts if h.name == name)

    # -- coordinators ------------------------------------------------------------------

    def start_coordinator(self, host: Host) -> None:
        self.coordinators[host.name] = self.lab.start_coordinator(host)

    def term(self) -> dict[str, Any] | None:
        value, _ = self.lab.kv(keys.ROOT + "coordinator/term").get(
            keys.ROOT + "coordinator/term", (None, None)
        )
        return value if isinstance(value, dict) else None

    def leader_host(self) -> Host:
        term = wait_for("a term record", self.term, 15.0)
        return next(h for h in self.lab.hosts if coordinator_id(h) == term["id"])

    def wait_new_term(self, old_epoch: int, timeout: float = 15.0) -> dict[str, Any]:
        return wait_for(
            f"a leader with an epoch above {old_epoch}",
            lambda: (t := self.term()) and t["epoch"] > old_epoch and t,
            timeout,
            every=0.05,
        )

    def status_of(self, host: Host) -> dict[str, Any]:
        return http_json(self.lab.coordinator_api(host) + "/v1/status")  # type: ignore[no-any-return]

    def wait_standby(self, host: Host) -> None:
        """The coordinator on `host` answers, holds a session, and does not act."""
        wait_for(
            f"coordinator on {host.name} standing by",
            lambda: (s := self.status_of(host)["coordinator"])["session"] and not s["acting"],
            20.0,
        )

    def api(self) -> str:
        """Any coordinator API that answers (all serve the cluster API)."""
        for name, process in self.coordinators.items():
            host = self.host(name)
            if process.alive() and name not in self.lab.cut_off:
                try:
                    self.status_of(host)
                except OSError:
                    continue
                return self.lab.coordinator_api(host)
        raise AssertionError("no coordinator API answers")

    # -- placement -----------------------------------------------------------------------

    def deploy(self, replicas: int, namespace: str = NAMESPACE, name: str = DEPLOYMENT) -> None:
        """Create or scale a deployment of sleepers (an hour each)."""
        http_json(
            self.api() + "/v1/deployments",
            {
                "namespace": namespace,
                "name": name,
                "image": IMAGE,
                "replicas": replicas,
                "cpu_millicores": 100,
                "memory_bytes": 64 << 20,
                "args": ["3600"],
            },
        )

    def desired(self) -> set[str]:
        spec, _ = self.lab.kv(keys.deployment(NAMESPACE, DEPLOYMENT))[
            keys.deployment(NAMESPACE, DEPLOYMENT)
        ]
        return {replica_id(NAMESPACE, DEPLOYMENT, i) for i in range(spec["replicas"])}

    def placements(self) -> dict[str, list[str]]:
        """replica id -> the nodes whose assignment lists it (one, when all is well)."""
        placed: dict[str, list[str]] = {}
        for key, (value, _) in self.lab.kv(keys.ASSIGNMENTS).items():
            node = keys.split(key, keys.ASSIGNMENTS)[0]
            for rid in (value or {}).get("containers", {}):
                placed.setdefault(rid, []).append(node)
        return placed

    def running(self, ignore: str | None = None) -> dict[str, list[tuple[str, str]]]:
        """replica id -> (node, container id) of every agent that reports it running
        (but node `ignore`: a dead agent's last words stay until it returns)."""
        found: dict[str, list[tuple[str, str]]] = {}
        for key, (value, _) in self.lab.kv(keys.STATUS).items():
            node, rid = keys.split(key, keys.STATUS)[:2]
            if node == ignore:
                continue
            if isinstance(value, dict) and value.get("state") == "running":
                found.setdefault(rid, []).append((node, value["container_id"]))
        return found

    def local_running(self, ignore: str | None = None) -> dict[str, list[tuple[str, str]]]:
        """replica id -> (node, container id) from every agent's own API (the ground truth)."""
        found: dict[str, list[tuple[str, str]]] = {}
        for host in self.lab.hosts:
            if host.name == ignore:
                continue
            for record in agent_get(self.lab.agent_socket(host), "/v1/containers"):
                found.setdefault(record["name"], []).append((host.name, record["id"]))
        return found

    def placed_once(self) -> dict[str, str] | None:
        """replica id -> node when every desired replica is assigned exactly once."""
        desired, placed = self.desired(), self.placements()
        if set(placed) != desired or any(len(nodes) != 1 for nodes in placed.values()):
            return None
        return {rid: nodes[0] for rid, nodes in placed.items()}

    def converged(self, ignore: str | None = None) -> dict[str, tuple[str, str]] | None:
        """Placed once, and each replica running exactly once, on the node it is assigned to."""
        placed = self.placed_once()
        running = self.running(ignore)
        if placed is None or set(running) != set(placed):
            return None
        if any(len(r) != 1 or r[0][0] != placed[rid] for rid, r in running.items()):
            return None
        if self.local_running(ignore) != running:  # what the agents run is what they report
            return None
        return {rid: r[0] for rid, r in running.items()}

    def wait_converged(self, timeout: float = 45.0) -> dict[str, tuple[str, str]]:
        return wait_for(
            "every replica assigned and running exactly once", self.converged, timeout, every=0.25
        )


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(process: LabProcess, pattern: str) -> float | None:
    """Wall-clock time of the last log line of `process` matching `pattern` (None: no such line)."""
    found = None
    for line in process.log_path.read_text(errors="replace").splitlines():
        match = LOG_TIME.match(line)
        if match and re.search(pattern, line):
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            found = stamp.timestamp()  # logging's asctime is local time, as is strptime here
    return found
