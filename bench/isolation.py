"""Isolation: starts with a cgroup + netns + veth + address per container, and density.

Variants, measured in the same run in alternating rounds (noise hits all alike):

  warm-isolated  Nova: a pooled sandbox (cgroup, netns, veth on the namespace's
                 bridge, IP, worker) claimed and started: request -> _start entry
  warm-plain     Nova without isolation (no cgroup, host network): the same start
  cold-isolated  Nova: the sandbox built on the spot (a namespace whose pool is 0):
                 IPAM lease (SQLite CAS), netns + veth + address + routes (netlink
                 helper), cgroup, fork from the zygote, worker ready, start
  raw-floor      the same kernel steps done directly: `ip netns add`, `ip link add
                 veth ... netns`, `ip link set master <bridge> up`, `ip -n addr add`,
                 `ip -n link set eth0 up`, cgroup mkdir + memory/pids limits, then
                 fork + setns + cgroup join + exec of the native hello: request ->
                 its first stdout byte

Then density: N long-running isolated containers (sleep.wasm) at steady state;
host memory used per container (MemAvailable before/after) and the sum of
their cgroups' memory, as containers per GiB.

Everything is made under a cgroup root, node CIDR, segment-id range and
netns names of this run's own, and removed at the end, even on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from agent.isolation.nsjoin import join_netns
from agent.sandbox.cgroups import SandboxCgroups
from agent.sandbox.network import NetworkConfig, SandboxNetwork
from agent.sandbox.runtime import Container, SandboxRuntime
from agent.sandbox.spec import ExitReason, RunSpec
from bench import common
from nova.store import open_store

WASM_APP = common.REPO_ROOT / "examples" / "build" / "hello.wasm"
SLEEP_APP = common.REPO_ROOT / "examples" / "build" / "sleep.wasm"
NATIVE_APP = common.REPO_ROOT / "examples" / "build" / "native" / "hello"

WARM_ISOLATED, WARM_PLAIN = "warm-isolated", "warm-plain"
COLD_ISOLATED, RAW_FLOOR = "cold-isolated", "raw-floor"
VARIANTS = (WARM_ISOLATED, WARM_PLAIN, COLD_ISOLATED, RAW_FLOOR)
RATIO_PAIRS = ((WARM_ISOLATED, WARM_PLAIN), (COLD_ISOLATED, RAW_FLOOR))
GOAL_WARM_P50_US = 240.0
COLD_NAMESPACE = "bench-cold"
POOL_TIMEOUT_S = 60.0
GiB = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=300, help="warm starts per variant")
    parser.add_argument(
        "--cold-runs", type=int, default=60, help="cold-isolated and raw-floor starts"
    )
    parser.add_argument("--rounds", type=int, default=6, help="alternating blocks")
    parser.add_argument("--pool-size", type=int, default=4, help="warm pool size")
    parser.add_argument(
        "--density", type=int, default=100, help="containers for the density measurement (0: skip)"
    )


@dataclass
class Samples:
    startup_ns: list[int] = field(default_factory=list)


def _spec(module: Any, wasm: Path, namespace: str, argv: tuple[str, ...]) -> RunSpec:
    return RunSpec(
        id="",
        name="bench",
        digest=module.digest,
        artifact=str(module.artifact),
        module_path=str(wasm),
        argv=argv,
        env=(("NAME", "bench"),),
        namespace=namespace,
    )


async def _pool_full(runtime: SandboxRuntime) -> None:
    pool = runtime.pool
    assert pool is not None
    deadline = time.monotonic() + POOL_TIMEOUT_S
    while pool.idle < pool.size:
        if time.monotonic() > deadline:
            raise common.BenchError("the warm pool did not refill in time")
        await asyncio.sleep(0.001)


async def _start(runtime: SandboxRuntime, spec: RunSpec, stdio: tuple[int, int, int]) -> int:
    """One start through the runtime: request -> _start entry, in ns (waits for the end)."""
    request_ns = time.monotonic_ns()
    worker = await runtime.claim(spec.namespace, spec.isolation)
    container = await runtime.launch(spec, stdio, request_ns=request_ns, worker=worker)
    status = await container.wait()
    if status.reason is not ExitReason.EXITED or status.exit_code != 0:
        raise common.BenchError(f"a benchmark start failed: {status.describe()}")
    await container.worker.exited()
    return status.entry_ns - request_ns


class RawFloor:
    """The kernel steps of an isolated start done directly (iproute2, cgroupfs, fork+exec)."""

    def __init__(self, token: str, bridge: str, cidr: IPv4Network, cgroup_dirs: list[Path]):
        self.token = token
        self.bridge = bridge
        self.hosts = list(cidr.hosts())[-60:]  # the top of the CIDR: IPAM starts at the bottom
        self.cgroup_dirs = cgroup_dirs
        self.count = 0

    def once(self) -> int:
        self.count += 1
        name = f"nvbench-{self.token}-{self.count}"
        veth = f"nvq{self.token}{self.count % 1000}"[:15]
        address = self.hosts[self.count % len(self.hosts)]
        boxes = [d / f"raw-{self.count}" for d in self.cgroup_dirs]
        read_end, write_end = os.pipe()
        request_ns = time.monotonic_ns()
        try:
            for argv in (
                ["ip", "netns", "add", name],
                ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name],
                ["ip", "link", "set", veth, "master", self.bridge, "up"],
                ["ip", "-n", name, "addr", "add", f"{address}/24", "dev", "eth0"],
                ["ip", "-n", name, "link", "set", "eth0", "up"],
            ):
                subprocess.run(argv, check=True, capture_output=True)
            for box in boxes:
                box.mkdir()
                for knob, value in (("memory.limit_in_bytes", "134217728"), ("pids.max", "64")):
                    if (box / knob).exists():  # v1: each knob in its own hierarchy
                        (box / knob).write_text(value)
            netns_fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the child)
                try:
                    for box in boxes:
                        (box / "cgroup.procs").write_text("0")
                    join_netns(netns_fd)
                    os.dup2(write_end, 1)
                    os.execv(str(NATIVE_APP), [str(NATIVE_APP)])
                finally:
                    os._exit(127)
            os.close(netns_fd)
            os.close(write_end)
            write_end = -1
            first = os.read(read_end, 1)
            entry_ns = time.monotonic_ns()
            while os.read(read_end, 65536):
                pass
            os.waitpid(pid, 0)
            if not first:
                raise common.BenchError("the native hello printed nothing")
            return entry_ns - request_ns
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
            subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            for box in boxes:
                with contextlib.suppress(OSError):
                    box.rmdir()


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise common.BenchError("no MemAvailable in /proc/meminfo")


async def _density(
    runtime: SandboxRuntime, cgroups: SandboxCgroups, module: Any, count: int, stdio: Any
) -> dict[str, Any]:
    await _pool_full(runtime)
    await asyncio.sleep(2)
    before = _mem_available()
    spec = _spec(module, SLEEP_APP, "default", ("sleep", "600"))
    running: list[Container] = []
    try:
        for _ in range(count):
            worker = await runtime.claim(spec.namespace, spec.isolation)
            running.append(await runtime.launch(spec, stdio, worker=worker))
        await _pool_full(runtime)
        await asyncio.sleep(3)  # steady state: pages touched, pool refilled
        after = _mem_available()
        cgroup_bytes = 0
        for container in running:
            usage = cgroups.cgroups.container(container.spec.id).usage()
            cgroup_bytes += usage.memory_bytes or 0
    finally:
        await asyncio.gather(*(c.stop(0.5) for c in running), return_exceptions=True)
    host_per = max(1, (before - after) // max(count, 1))
    cgroup_per = max(1, cgroup_bytes // max(count, 1))
    return {
        "containers": count,
        "host_bytes_per_container": host_per,
        "cgroup_bytes_per_container": cgroup_per,
        "containers_per_gib_host": round(GiB / host_per, 1),
        "containers_per_gib_cgroup": round(GiB / cgroup_per, 1),
        "measures": "MemAvailable drop (host-wide: includes netns, veths, kernel objects) and "
        "the sum of the containers' cgroup memory usage, per running sleep.wasm container",
    }


@contextlib.contextmanager
def _raw_bridge(token: str) -> Iterator[str]:
    bridge = f"nvbq{token}"[:15]
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
    try:
        yield bridge
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


async def _measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    token = secrets.token_hex(3)
    rnd = int(token, 16)
    cidr = IPv4Network(f"10.{128 + rnd % 120}.{rnd % 256}.0/24")
    first_id = 1_000_000 + (rnd % 200_000) * 64
    cgroups = SandboxCgroups.for_host(f"nova-bench-{token}")
    if cgroups is None:
        raise common.BenchError("isolation needs root and a cgroup filesystem")
    store = open_store(str(scratch / "state.db"))
    await store.open()
    network = SandboxNetwork(
        store,
        node="bench",
        config=NetworkConfig.parse(str(cidr), segment_ids=f"{first_id}-{first_id + 63}"),
    )
    await network.start()
    isolated = SandboxRuntime(
        str(scratch / "cache"),
        pool_size=args.pool_size,
        cgroups=cgroups,
        network=network,
        namespace_pool_size=0,
    )
    plain = SandboxRuntime(str(scratch / "cache"), pool_size=args.pool_size)
    samples = {name: Samples() for name in VARIANTS}
    density: dict[str, Any] = {}
    devnull = os.open(os.devnull, os.O_RDWR)
    stdio = (devnull, devnull, devnull)
    try:
        await isolated.start()
        await plain.start()
        module = await isolated.resolve(str(WASM_APP))
        await plain.resolve(str(WASM_APP))
        warm_spec = _spec(module, WASM_APP, "default", ("hello",))
        cold_spec = _spec(module, WASM_APP, COLD_NAMESPACE, ("hello",))
        await _start(isolated, cold_spec, stdio)  # makes the cold namespace's segment once
        cgroup_dirs = [Path(p) for p in cgroups.cgroups.root_paths]
        with _raw_bridge(token) as bridge:
            raw = RawFloor(token, bridge, cidr, cgroup_dirs)
            raw.once()  # warm-up
            for round_ in range(args.rounds):
                order = common.rotate(VARIANTS, round_)
                for name in order:
                    n = args.runs if name.startswith("warm") else args.cold_runs
                    for _ in range(common.split_evenly(n, args.rounds)[round_]):
                        if name == WARM_ISOLATED:
                            await _pool_full(isolated)
                            samples[name].startup_ns.append(
                                await _start(isolated, warm_spec, stdio)
                            )
                        elif name == WARM_PLAIN:
                            await _pool_full(plain)
                            samples[name].startup_ns.append(await _start(plain, warm_spec, stdio))
                        elif name == COLD_ISOLATED:
                            samples[name].startup_ns.append(
                                await _start(isolated, cold_spec, stdio)
                            )
                        else:
                            samples[name].startup_ns.append(raw.once())
                print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        if args.density > 0:
            sleep_module = await isolated.resolve(str(SLEEP_APP))
            density = await _density(isolated, cgroups, sleep_module, args.density, stdio)
        stats = isolated.pools[COLD_NAMESPACE].stats if COLD_NAMESPACE in isolated.pools else None
        facts = {"cold_pool_misses": stats.misses if stats else 0}
    finally:
        os.close(devnull)
        await plain.close()
        await isolated.close()
        await network.close()
        await store.close()
        cgroups.cgroups.teardown()
    return {"samples": samples, "density": density, "facts": facts, "cidr": str(cidr)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    for path in (WASM_APP, SLEEP_APP, NATIVE_APP):
        if not path.is_file():
            raise common.BenchError(f"missing {path}: build it with `make examples`")
    if os.geteuid() != 0:
        raise common.BenchError("the isolation benchmark needs root (cgroups, netns)")
    scratch = Path(tempfile.mkdtemp(prefix="nova-bench-isolation-"))
    try:
        measured = asyncio.run(_measure(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summaries = {name: common.summarize(s.startup_ns) for name, s in measured["samples"].items()}
    body: dict[str, Any] = {
        "parameters": {
            "runs": args.runs,
            "cold_runs": args.cold_runs,
            "rounds": args.rounds,
            "pool_size": args.pool_size,
            "density": args.density,
        },
        "variants": {name: s.to_json() for name, s in summaries.items()},
        "ratios": common.ratios(summaries, RATIO_PAIRS),
        "density": measured["density"],
        "facts": measured["facts"],
        "goals": {
            "warm_isolated_p50_us_max": GOAL_WARM_P50_US,
            "p50_met": summaries[WARM_ISOLATED].p50_us <= GOAL_WARM_P50_US,
        },
        "notes": [
            "startup = request -> guest _start entry (Nova) or first stdout byte (raw floor)",
            "cold-isolated includes everything but compiling (the module is cached)",
            "variants alternate in rounds within one run: compare ratios across machines",
        ],
    }
    print("\nisolation: request -> _start entry (µs)")
    print(common.format_table(common.SUMMARY_HEADERS, common.summary_rows(summaries)))
    print("\nratios (< 1: the first is faster)")
    rows = [[pair, r["p50"], r["p99"]] for pair, r in body["ratios"].items()]
    print(common.format_table(["a/b", "p50", "p99"], rows))
    if measured["density"]:
        d = measured["density"]
        print(
            f"\ndensity ({d['containers']} sleeping containers): "
            f"{d['host_bytes_per_container'] / 2**20:.1f} MiB host memory each "
            f"({d['containers_per_gib_host']} per GiB); "
            f"{d['cgroup_bytes_per_container'] / 2**20:.1f} MiB in their cgroups "
            f"({d['containers_per_gib_cgroup']} per GiB)"
        )
    print(
        f"\nwarm-isolated p50 {summaries[WARM_ISOLATED].p50_us:.0f} µs; goal <= "
        f"{GOAL_WARM_P50_US:.0f} µs: {'met' if body['goals']['p50_met'] else 'NOT met'}"
    )
    return body
