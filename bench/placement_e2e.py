"""Placement (b): end to end into a real Consul, with a real nova-coordinator.

One run:
  1. a Consul dev agent; N simulated nodes registered as agents register
     (`nova/v1/nodes/<node>` held by a session: healthy), from the same
     seeded cluster as part (a);
  2. a `nova-coordinator` process elected leader (its first, empty pass done);
  3. t0: every deployment written (`nova/v1/deployments/<ns>/<name>`, one
     txn per 64); the leader's placement loop places them and writes the
     per-node assignments in fenced txns;
  4. done: the leader's pass that saw every deployment has finished, i.e.
     every assignment txn was acknowledged by Consul (raft-committed). The
     time is t_done - t0, from the coordinator's own pass report;
  5. reschedule: a share of the nodes fail (their keys lose the session);
     time until the leader has persisted their replicas elsewhere;
  6. checked outside the timings: every assignment read back and parsed with
     the agent's own parser; each replica exactly once; none on a failed node.

Reported: the times, the coordinator's peak RSS (VmHWM), Consul's RSS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.cluster.assignments import parse_assignment
from bench import common
from bench.consul_dev import ConsulDev, free_port, proc_mib
from bench.placement import synthetic_cluster
from coordinator.placement import Request, Snapshot
from nova.store import StoreError, TxnOp, encode_json, keys
from nova.store.consul import ConsulStore

DONE_TIMEOUT_S = 3600.0
POLL_S = 0.1


def _node_value(node: Any) -> bytes:
    """The node key as `nova-agent --consul` writes it; capacity net of the reservation."""
    return encode_json(
        {
            "node": node.name,
            "address": "127.0.0.1",
            "capacity": {
                "cpu_millicores": node.capacity.cpu_millis - node.allocated.cpu_millis,
                "memory_bytes": node.capacity.memory_bytes - node.allocated.memory_bytes,
            },
            "labels": dict(node.labels),
            "segment_endpoint": "127.0.0.1",
            "agent_version": "bench",
            "started_at": time.time(),
        }
    )


def deployment_specs(requests: list[Request]) -> list[dict[str, Any]]:
    """Part (a)'s requests as deployment specs (constraints as expressions: the same workload)."""
    specs = []
    for r in requests:
        constraints = [str(s) for s in r.constraints]
        digest = "sha256:" + hashlib.sha256(f"{r.namespace}/{r.name}".encode()).hexdigest()
        specs.append(
            {
                "namespace": r.namespace,
                "name": r.name,
                "image": "bench:1",
                "digest": digest,
                "replicas": r.replicas,
                "cpu_millicores": r.resources.cpu_millis,
                "memory_bytes": r.resources.memory_bytes,
                "labels": {"app": r.name},
                "constraints": constraints,
                "args": [],
                "env": {},
                "spread": r.spread_key,
                "generation": 1,
            }
        )
    return specs


async def _gather_limited(coros: list[Any], limit: int) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def register_nodes(store: ConsulStore, snapshot: Snapshot) -> str:
    """Every node key acquired by one session (a real agent holds its own; same effect)."""
    session = await store.create_session(ttl=None, name="bench simulated agents")
    results = await _gather_limited(
        [store.acquire(keys.node(n.name), _node_value(n), session) for n in snapshot.nodes], 64
    )
    if not all(results):
        raise common.BenchError("could not acquire every simulated node key")
    return session


async def write_deployments(store: ConsulStore, specs: list[dict[str, Any]]) -> None:
    ops = [TxnOp.set(keys.deployment(s["namespace"], s["name"]), encode_json(s)) for s in specs]
    batches = [ops[i : i + 64] for i in range(0, len(ops), 64)]
    results = await _gather_limited([store.txn(b) for b in batches], 4)
    if not all(r.ok for r in results):
        raise common.BenchError("writing the deployments failed")


def _placement(api: str) -> dict[str, Any]:
    with urllib.request.urlopen(api + "/v1/placement", timeout=30) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def wait_pass(
    api: str, coordinator: subprocess.Popen[bytes], done: Any, timeout: float = DONE_TIMEOUT_S
) -> dict[str, Any]:
    """Poll the leader's pass report until `done(report)`; the report."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if coordinator.poll() is not None:
            raise common.BenchError(f"nova-coordinator exited with {coordinator.returncode}")
        try:
            body = _placement(api)
        except OSError:
            body = {}
        last = body.get("last_pass")
        if last and done(last):
            return dict(last)
        time.sleep(POLL_S)
    raise common.BenchError(f"the placement pass did not finish in {timeout:.0f} s")


async def verify(store: ConsulStore, expected: int, failed: set[str]) -> dict[str, Any]:
    """Read every assignment back, parse it as an agent does, check each replica once."""
    entries = await store.list(keys.ASSIGNMENTS)
    seen: set[str] = set()
    total = 0
    size = 0
    for entry in entries:
        node = keys.split(entry.key, keys.ASSIGNMENTS)[0]
        doc = parse_assignment(entry.json(), where=entry.key)
        if node in failed and doc.replicas:
            raise common.BenchError(f"failed node {node} still has {len(doc.replicas)} replicas")
        seen.update(doc.replicas)
        total += len(doc.replicas)
        size += len(entry.value)
    if total != len(seen):
        raise common.BenchError(f"{total - len(seen)} replicas are assigned twice")
    if total != expected:
        raise common.BenchError(f"{total} replicas assigned, the leader reported {expected}")
    return {"assignment_keys": len(entries), "replicas": total, "assignment_mib": size / 2**20}


def _start_coordinator(
    consul: ConsulDev, strategy: str, timing: tuple[str, str, str], log: Path
) -> tuple[Any, str]:
    port = free_port()
    session_ttl, check_ttl, heartbeat = timing
    command = [sys.executable, "-m", "coordinator.main", "--consul", consul.url,
               "--listen", f"127.0.0.1:{port}", "--id", "bench-coordinator",
               "--strategy", strategy, "--log-level", "warning", "--session-ttl", session_ttl,
               "--check-ttl", check_ttl, "--heartbeat", heartbeat]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=common.REPO_ROOT
        )
    return process, f"http://127.0.0.1:{port}"


def measure(  # noqa: PLR0917 (the benchmark's parameters)
    nodes: int,
    containers: int,
    seed: int,
    strategy: str,
    fail_fraction: float,
    timing: tuple[str, str, str] = ("1s", "1.5s", "300ms"),
) -> dict[str, Any]:
    snapshot, requests = synthetic_cluster(nodes, containers, seed)
    specs = deployment_specs(requests)
    with ConsulDev() as consul:
        result = asyncio.run(
            _measure(consul, snapshot, specs, containers, strategy, fail_fraction, timing)
        )
    result["coordinator_timing"] = dict(
        zip(("session_ttl", "check_ttl", "heartbeat"), timing, strict=True)
    )
    return result


async def _measure(  # noqa: PLR0917 (one private call site)
    consul: ConsulDev,
    snapshot: Snapshot,
    specs: list[dict[str, Any]],
    containers: int,
    strategy: str,
    fail_fraction: float,
    timing: tuple[str, str, str],
) -> dict[str, Any]:
    store = ConsulStore(consul.url, timeout=120.0)
    log = consul.dir / "coordinator.log"
    coordinator = None
    try:
        started = time.monotonic()
        session = await register_nodes(store, snapshot)
        register_s = time.monotonic() - started
        coordinator, api = _start_coordinator(consul, strategy, timing, log)
        await asyncio.to_thread(wait_pass, api, coordinator, lambda last: True, 120.0)
        rss_idle = proc_mib(coordinator.pid)

        t0 = time.time()
        await write_deployments(store, specs)
        written_s = time.time() - t0
        report = await asyncio.to_thread(
            wait_pass, api, coordinator,
            lambda last: last["deployments"] == len(specs) and last["finished_at"] > t0,
        )  # fmt: skip
        initial_s = report["finished_at"] - t0
        placed = report["replicas"]

        failing_nodes = snapshot.nodes[:: max(1, round(1 / fail_fraction))]
        failing = [n.name for n in failing_nodes]
        t1 = time.time()
        # As Consul releases a dead agent's key: the value stays, the session goes.
        releases = [
            store.release(keys.node(n.name), session, _node_value(n)) for n in failing_nodes
        ]
        await _gather_limited(releases, 64)
        healthy = len(snapshot.nodes) - len(failing)
        moved_report = await asyncio.to_thread(
            wait_pass, api, coordinator,
            lambda last: last["healthy_nodes"] == healthy and last["finished_at"] > t1,
        )  # fmt: skip
        reschedule_s = moved_report["finished_at"] - t1
        peak = proc_mib(coordinator.pid, "VmHWM")
        lost = log.read_text(errors="replace").count("stopped acting as leader")
        consul_rss = consul.rss_mib()
        checked = await verify(store, moved_report["replicas"], set(failing))
        return {
            "strategy": strategy,
            "nodes": len(snapshot.nodes),
            "containers": containers,
            "deployments": len(specs),
            "register_nodes_s": round(register_s, 2),
            "write_deployments_s": round(written_s, 3),
            "initial": {
                "deployments_to_persisted_s": round(initial_s, 2),
                "placed": placed,
                "unplaced": report["unplaced"],
                "last_pass": report,
            },
            "reschedule": {
                "failed_nodes": len(failing),
                "failure_to_persisted_s": round(reschedule_s, 2),
                "moved": moved_report["moved"],
                "unplaced": moved_report["unplaced"],
                "last_pass": moved_report,
            },
            "verified": checked,
            "coordinator_rss_mib": {"idle": rss_idle, "peak": peak},
            "lease_lapses": lost,
            "consul_rss_mib_after": consul_rss,
        }
    except StoreError as exc:
        raise common.BenchError(f"Consul: {exc}") from None
    finally:
        await store.close()
        if coordinator is not None and coordinator.poll() is None:
            coordinator.send_signal(signal.SIGTERM)
            try:
                coordinator.wait(30)
            except subprocess.TimeoutExpired:
                coordinator.kill()
                coordinator.wait()
        if coordinator is not None and coordinator.returncode not in (0, None):
            tail = log.read_text(errors="replace").splitlines()[-20:]
            print("coordinator log (tail):\n" + "\n".join(tail), file=sys.stderr)
