"""Placement: (a) the pure engine placing C containers on N simulated nodes.

Variants, for each strategy (least-loaded, bin-pack), each round in a fresh
worker process (so its peak RSS is its own), strategies alternating:

  initial     every replica placed on an empty cluster (C decisions)
  reschedule  a fraction of the nodes fails; place again from the first
              result's assignments: only the failed nodes' replicas move
  reschedule-affected
              the same, passing only the deployments that lost replicas (the
              others' placements stay in the snapshot and hold their resources);
              checked to decide exactly what the full reschedule decided

The cluster is synthetic and seeded (docs/placement.md describes it): mixed
node sizes, zone/disk/tier labels, deployments of 1..1000 replicas, some with
constraints or zone spread. No wasm runs and nothing is written anywhere.
Every result is checked (counts, capacity, stability, no duplicates) outside
the timed section.

Part (b), end to end into a real Consul with a real nova-coordinator (time
until every assignment is persisted, then a reschedule; the coordinator's
peak RSS), is in bench/placement_e2e.py and runs after (a) with the same
--nodes, --containers and --seed. `--part a` or `--part b` runs one alone.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from typing import Any

from bench import common
from coordinator.placement import (
    Node,
    Placement,
    PlacementResult,
    Request,
    Resources,
    Selector,
    Snapshot,
    place,
)

MiB = 1 << 20
GiB = 1 << 30
STRATEGIES = ("least-loaded", "bin-pack")
INITIAL, RESCHEDULE, AFFECTED = "initial", "reschedule", "reschedule-affected"
PHASES = (INITIAL, RESCHEDULE, AFFECTED)
WORKER_TIMEOUT_S = 3600.0

# (cores, GiB of memory), weight
NODE_SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((8, 32), 3),
    ((16, 64), 5),
    ((32, 128), 2),
)
SYSTEM_RESERVE = Resources(250, 512 * MiB)
# (millicores, MiB) per container, weight: small wasm workloads, ~105m CPU on average
CONTAINER_SIZES: tuple[tuple[tuple[int, int], float], ...] = (
    ((25, 32), 3),
    ((50, 64), 3),
    ((100, 128), 2),
    ((250, 256), 1.5),
    ((500, 512), 0.5),
)
REPLICA_COUNTS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
ZONES = ("zone-a", "zone-b", "zone-c")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nodes", type=int, default=10_000, help="simulated nodes (default: %(default)s)"
    )
    parser.add_argument(
        "--containers",
        type=int,
        default=1_000_000,
        help="replicas to place, over all deployments (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="fresh worker runs per strategy, strategies alternating (default: %(default)s)",
    )
    parser.add_argument(
        "--fail-fraction",
        type=float,
        default=0.01,
        help="share of nodes that fail before the reschedule (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default: %(default)s)")
    parser.add_argument(
        "--part",
        choices=["a", "b", "ab"],
        default="ab",
        help="a: the pure engine; b: end to end into Consul; ab: both (default)",
    )
    parser.add_argument(
        "--e2e-timing",
        default="5s,5s,500ms",
        metavar="SESSION_TTL,CHECK_TTL,HEARTBEAT",
        help="the coordinator's lease timing in part (b) (default: %(default)s; with its own "
        "defaults, 1s,1.5s,300ms, Consul under this load on 2 cores outlasts the lease)",
    )
    parser.add_argument(
        "--e2e-strategy",
        choices=STRATEGIES,
        default="least-loaded",
        help="the coordinator's strategy in part (b) (default: %(default)s)",
    )


# -- the synthetic cluster ------------------------------------------------------------------


def synthetic_cluster(nodes: int, containers: int, seed: int) -> tuple[Snapshot, list[Request]]:
    """Seeded nodes and deployments; the requests add up to exactly `containers` replicas."""
    rng = random.Random(seed)
    sizes = [size for size, _ in NODE_SIZES]
    weights = [weight for _, weight in NODE_SIZES]
    cluster = []
    for i in range(nodes):
        cores, gib = rng.choices(sizes, weights)[0]
        labels = {
            "zone": rng.choice(ZONES),
            "disk": "ssd" if rng.random() < 0.3 else "hdd",
            "tier": "edge" if rng.random() < 0.1 else "core",
        }
        capacity = Resources(cores * 1000, gib * GiB)
        cluster.append(Node(f"node-{i:05d}", capacity, labels, allocated=SYSTEM_RESERVE))
    shapes = [shape for shape, _ in CONTAINER_SIZES]
    shares = [weight for _, weight in CONTAINER_SIZES]
    ssd = (Selector.equals("disk", "ssd"),)
    two_zones = (Selector.one_of("zone", "zone-a", "zone-b"),)
    not_edge = (Selector.none_of("tier", "edge"),)
    requests: list[Request] = []
    total = 0
    while total < containers:
        count = min(containers - total, rng.choice(REPLICA_COUNTS))
        cpu, mib = rng.choices(shapes, shares)[0]
        pick = rng.random()
        constraints = (
            ssd if pick < 0.10 else two_zones if pick < 0.15 else not_edge if pick < 0.20 else ()
        )
        spread = "zone" if rng.random() < 0.3 else None
        d = len(requests)
        requests.append(
            Request(
                f"team-{d % 50:02d}",
                f"app-{d:05d}",
                count,
                Resources(cpu, mib * MiB),
                constraints,
                spread,
            )
        )
        total += count
    return Snapshot(tuple(cluster)), requests


# -- one measured run (in a worker process) ---------------------------------------------------


def _rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _check_capacity(snapshot: Snapshot, requests: list[Request], result: PlacementResult) -> None:
    size = {r.key: r.resources for r in requests}
    used: dict[str, list[int]] = {}
    for d in result.decisions:
        r = size[(d.replica.namespace, d.replica.name)]
        u = used.setdefault(d.node, [0, 0])
        u[0] += r.cpu_millis
        u[1] += r.memory_bytes
    for n in snapshot.nodes:
        u = used.get(n.name, [0, 0])
        if u[0] + n.allocated.cpu_millis > n.capacity.cpu_millis or (
            u[1] + n.allocated.memory_bytes > n.capacity.memory_bytes
        ):
            raise common.BenchError(f"node {n.name} is over capacity: {u}")
        if u != [0, 0] and not n.healthy:
            raise common.BenchError(f"unhealthy node {n.name} holds replicas")


def _utilization(
    snapshot: Snapshot, requests: list[Request], result: PlacementResult
) -> dict[str, Any]:
    size = {r.key: r.resources.cpu_millis for r in requests}
    cpu: Counter[str] = Counter()
    for d in result.decisions:
        cpu[d.node] += size[(d.replica.namespace, d.replica.name)]
    shares = [
        (cpu[n.name] + n.allocated.cpu_millis) / n.capacity.cpu_millis
        for n in snapshot.nodes
        if n.name in cpu
    ]
    return {
        "nodes_used": len(cpu),
        "cpu_used_share_mean": round(statistics.fmean(shares), 3) if shares else None,
        "cpu_used_share_max": round(max(shares), 3) if shares else None,
    }


def measure(
    strategy: str, nodes: int, containers: int, seed: int, fail_fraction: float
) -> dict[str, Any]:
    """Build the cluster, place it, fail some nodes, place again; times and checks."""
    started = time.perf_counter()
    snapshot, requests = synthetic_cluster(nodes, containers, seed)
    build_s = time.perf_counter() - started
    rss_inputs = _rss_mib()

    t0 = time.perf_counter_ns()
    first = place(snapshot, requests, strategy=strategy)
    initial_ns = time.perf_counter_ns() - t0
    rss_initial = _rss_mib()
    if len(first.decisions) + first.unplaced_count != containers:
        raise common.BenchError("initial: decisions + unplaced != containers")
    _check_capacity(snapshot, requests, first)

    size = {r.key: r.resources for r in requests}
    current = tuple(
        Placement(d.replica, d.node, size[(d.replica.namespace, d.replica.name)])
        for d in first.decisions
    )
    failing = set(random.Random(seed + 1).sample(range(nodes), k=int(nodes * fail_fraction)))
    down = tuple(
        replace(n, healthy=False) if i in failing else n for i, n in enumerate(snapshot.nodes)
    )
    failed_names = {snapshot.nodes[i].name for i in failing}
    after_failure = Snapshot(down, current)
    t0 = time.perf_counter_ns()
    second = place(after_failure, requests, strategy=strategy)
    reschedule_ns = time.perf_counter_ns() - t0
    rss_peak = _rss_mib()

    before = {d.replica: d.node for d in first.decisions}
    on_failed = sum(1 for node in before.values() if node in failed_names)
    moved = sum(1 for d in second.decisions if d.is_moved)
    if len({d.replica for d in second.decisions}) != len(second.decisions):
        raise common.BenchError("reschedule: a replica was placed twice")
    if any(
        not d.is_kept
        for d in second.decisions
        if before.get(d.replica) not in failed_names | {None}
    ):
        raise common.BenchError("reschedule: a replica on a healthy node moved")
    if moved + second.unplaced_count - first.unplaced_count != on_failed:
        raise common.BenchError("reschedule: moved + newly unplaced != replicas on failed nodes")
    _check_capacity(after_failure, requests, second)

    # What a placement loop can do instead: pass only the deployments that lost replicas;
    # the others' placements stay in the snapshot and keep holding their resources.
    hit = {(r.namespace, r.name) for r, node in before.items() if node in failed_names}
    affected = [r for r in requests if r.key in hit]
    t0 = time.perf_counter_ns()
    third = place(after_failure, affected, strategy=strategy)
    affected_ns = time.perf_counter_ns() - t0
    expected = tuple(d for d in second.decisions if (d.replica.namespace, d.replica.name) in hit)
    if third.decisions != expected:
        raise common.BenchError("reschedule-affected: differs from the full reschedule")
    return {
        "strategy": strategy,
        "deployments": len(requests),
        "build_s": round(build_s, 2),
        INITIAL: {
            "wall_ns": initial_ns,
            "placed": len(first.decisions),
            "unplaced": first.unplaced_count,
            **_utilization(snapshot, requests, first),
        },
        RESCHEDULE: {
            "wall_ns": reschedule_ns,
            "failed_nodes": len(failing),
            "replicas_on_failed_nodes": on_failed,
            "moved": moved,
            "kept": sum(1 for d in second.decisions if d.is_kept),
            "unplaced": second.unplaced_count,
        },
        AFFECTED: {
            "wall_ns": affected_ns,
            "deployments": len(affected),
            "moved": sum(1 for d in third.decisions if d.is_moved),
            "kept": sum(1 for d in third.decisions if d.is_kept),
            "unplaced": third.unplaced_count,
        },
        "rss_mib": {"inputs": rss_inputs, "after_initial": rss_initial, "peak": rss_peak},
    }


def _run_worker(strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = {
        "strategy": strategy,
        "nodes": args.nodes,
        "containers": args.containers,
        "seed": args.seed,
        "fail_fraction": args.fail_fraction,
    }
    cmd = [sys.executable, "-m", "bench.placement", "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_S,
            cwd=common.REPO_ROOT,
        )
    except subprocess.TimeoutExpired:
        raise common.BenchError(f"{strategy}: worker took over {WORKER_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise common.BenchError(f"{strategy}: worker failed:\n{done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the harness side ---------------------------------------------------------------------------


def _check_inputs(args: argparse.Namespace) -> None:
    if args.nodes < 1 or args.containers < 1 or args.rounds < 1:
        raise common.BenchError("--nodes, --containers and --rounds must be at least 1")
    if not 0.0 <= args.fail_fraction < 1.0:
        raise common.BenchError("--fail-fraction must be in [0, 1)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(args)
    body: dict[str, Any] = {}
    if "a" in args.part:
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in STRATEGIES}
        for round_no in range(args.rounds):
            for strategy in common.rotate(STRATEGIES, round_no):
                print(f"round {round_no + 1}/{args.rounds}: {strategy} ...", flush=True)
                runs[strategy].append(_run_worker(strategy, args))
        body = _body(runs, args)
        _print_report(body, args)
    if "b" in args.part:
        from bench import placement_e2e

        print(f"(b) end to end into Consul: {args.containers:,} containers ...", flush=True)
        timing = tuple(args.e2e_timing.split(","))
        if len(timing) != 3:
            raise common.BenchError("--e2e-timing: give SESSION_TTL,CHECK_TTL,HEARTBEAT")
        e2e = placement_e2e.measure(
            args.nodes, args.containers, args.seed, args.e2e_strategy, args.fail_fraction,
            (timing[0], timing[1], timing[2]),
        )  # fmt: skip
        body["part_b_end_to_end_consul"] = e2e
        body.setdefault("parameters", {}).update(
            {"nodes": args.nodes, "containers": args.containers, "seed": args.seed}
        )
        _print_e2e(e2e)
    return body


def _print_e2e(e2e: dict[str, Any]) -> None:
    initial, again = e2e["initial"], e2e["reschedule"]
    rss = e2e["coordinator_rss_mib"]
    print(
        f"\nplacement (b): {e2e['containers']:,} containers ({e2e['deployments']:,} deployments) "
        f"on {e2e['nodes']:,} nodes in a real Consul, {e2e['strategy']}"
    )
    rows = [
        ["deployments written -> every assignment persisted", initial["deployments_to_persisted_s"],
         f"{initial['placed']:,} placed, {initial['unplaced']:,} unplaced"],
        [f"{again['failed_nodes']} nodes fail -> their replicas persisted elsewhere",
         again["failure_to_persisted_s"], f"{again['moved']:,} moved"],
    ]  # fmt: skip
    print(common.format_table(["phase", "seconds", "replicas"], rows))
    print(
        f"coordinator lease timing {e2e['coordinator_timing']}; lease lapses: {e2e['lease_lapses']}"
    )
    print(
        f"coordinator RSS: {rss['idle']} MiB idle, {rss['peak']} MiB peak; "
        f"Consul RSS after: {e2e['consul_rss_mib_after']} MiB; "
        f"{e2e['verified']['assignment_mib']:.0f} MiB of assignments read back and checked"
    )


def _body(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    summaries: dict[str, common.Summary] = {}
    for strategy, samples in runs.items():
        for phase in PHASES:
            name = f"{strategy}/{phase}"
            walls = [s[phase]["wall_ns"] for s in samples]
            summary = summaries[name] = common.summarize(walls)
            last = {k: v for k, v in samples[-1][phase].items() if k != "wall_ns"}
            decided = last["placed"] if phase == INITIAL else last["kept"] + last["moved"]
            variants[name] = {
                **summary.to_json(),
                "wall_s_p50": round(summary.p50_us / 1e6, 3),
                "decisions": decided,
                "decisions_per_s_p50": round(decided / (summary.p50_us / 1e6)),
                **last,
                "peak_rss_mib_max": max(s["rss_mib"]["peak"] for s in samples),
                "inputs_rss_mib": samples[-1]["rss_mib"]["inputs"],
                "after_initial_rss_mib_max": max(s["rss_mib"]["after_initial"] for s in samples),
            }
    return {
        "parameters": {
            "nodes": args.nodes,
            "containers": args.containers,
            "rounds": args.rounds,
            "fail_fraction": args.fail_fraction,
            "seed": args.seed,
            "deployments": runs[STRATEGIES[0]][0]["deployments"],
        },
        "variants": variants,
        "ratios": common.ratios(
            summaries,
            [
                (f"bin-pack/{INITIAL}", f"least-loaded/{INITIAL}"),
                (f"bin-pack/{RESCHEDULE}", f"least-loaded/{RESCHEDULE}"),
                (f"least-loaded/{AFFECTED}", f"least-loaded/{RESCHEDULE}"),
                (f"bin-pack/{AFFECTED}", f"bin-pack/{RESCHEDULE}"),
            ],
        ),
        "notes": [
            "part (a) only: the pure engine in one Python process, nothing persisted",
            "wall = the place() call alone (building the inputs and checking the result are "
            "outside it); decisions/s for the reschedules counts every requested replica, "
            "kept or moved, since place() answers for all of them",
            "peak RSS is the worker process's ru_maxrss: interpreter + inputs + results; "
            "the reschedule's snapshot adds one Placement per container",
            "shared 2-core VM with other work running: absolute times are noisy; see "
            "host.loadavg_at_start",
        ],
    }


def _print_report(body: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nplacement (a): pure engine, {args.containers:,} containers on {args.nodes:,} nodes "
        f"({body['parameters']['deployments']:,} deployments), {args.rounds} rounds"
    )
    headers = ["variant", "n", "p50 s", "max s", "decisions/s", "placed/moved", "unplaced",
               "nodes used", "RSS after MiB", "peak RSS MiB"]  # fmt: skip
    rows = []
    for name, v in body["variants"].items():
        max_s = round(v["max_us"] / 1e6, 3)
        rows.append([
            name, v["n"], v["wall_s_p50"], max_s, float(v["decisions_per_s_p50"]),
            v.get("placed", v.get("moved")), v["unplaced"], v.get("nodes_used", "-"),
            v["after_initial_rss_mib_max"] if name.endswith(INITIAL) else "-",
            v["peak_rss_mib_max"],
        ])  # fmt: skip
    print(common.format_table(headers, rows))
    for phase in (INITIAL, RESCHEDULE):
        r = body["ratios"].get(f"bin-pack/{phase}/least-loaded/{phase}")
        if r is not None:
            print(f"{phase}: bin-pack / least-loaded wall time, p50 ratio {r['p50']}")
    for strategy in STRATEGIES:
        r = body["ratios"].get(f"{strategy}/{AFFECTED}/{strategy}/{RESCHEDULE}")
        if r is not None:
            print(f"{strategy}: affected deployments only / all, p50 ratio {r['p50']}")


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = measure(
        spec["strategy"], spec["nodes"], spec["containers"], spec["seed"], spec["fail_fraction"]
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2]))
    sys.exit("usage: python -m bench placement [options]  (this module is run by bench)")
