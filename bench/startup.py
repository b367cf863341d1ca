"""Startup: time from a start request to the module's `_start` entry (hello.wasm).

Variants, measured in the same run in alternating blocks (rounds), so that
machine noise hits all of them alike:

  warm               Nova: SandboxRuntime with a warm pool, module cached and hot
  cold               Nova: empty module cache (compile) and no pool (new interpreter)
  naive-instantiate  peer: wasmtime-py in this process, Engine + Module kept,
                     per start Linker + define_wasi + Store + WasiConfig + instantiate
  naive-compile      peer: the same, plus a new Engine and Module.from_file per start
  native-fork-exec   peer: the same C program built for the host, posix_spawn'ed;
                     "entry" is its first stdout byte arriving in a pipe

docs/benchmarks.md says exactly what each one measures and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import wasmtime

from agent.sandbox.cgroups import SandboxCgroups
from agent.sandbox.runtime import SandboxRuntime
from agent.sandbox.spec import ExitReason, ExitStatus, RunSpec
from bench import common

WASM_APP = common.REPO_ROOT / "examples" / "build" / "hello.wasm"
NATIVE_APP = common.REPO_ROOT / "examples" / "build" / "native" / "hello"
ARGV = ("hello",)
ENV = (("NAME", "bench"),)

WARM, COLD = "warm", "cold"
NAIVE_INSTANTIATE, NAIVE_COMPILE = "naive-instantiate", "naive-compile"
NATIVE = "native-fork-exec"
VARIANTS = (WARM, COLD, NAIVE_INSTANTIATE, NAIVE_COMPILE, NATIVE)
RATIO_PAIRS = (
    (WARM, NAIVE_INSTANTIATE),
    (WARM, NATIVE),
    (COLD, WARM),
    (WARM, NAIVE_COMPILE),
    (NAIVE_INSTANTIATE, NATIVE),
)
GOAL_WARM_P50_US = 240.0
GOAL_WARM_P99_US = 1000.0
POOL_READY_TIMEOUT_S = 30.0
WORKER_GONE_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 30.0

# Phases of one warm start, from the timestamps Nova records.
PHASE_PARENT = "request -> handoff (parent: claim + send)"
PHASE_WAKE = "handoff -> worker receives"
PHASE_WORKER = "worker receives -> _start entry"
PHASE_GUEST = "(after entry) _start entry -> _start returned"
PHASE_REPORT = "(after entry) _start returned -> wait() returned (incl. worker exit)"
PHASE_RESOLVE = "request -> module resolved (compile)"
PHASE_SPAWN = "resolved -> handoff (new interpreter ready)"
PHASE_EXEC = "request -> posix_spawn returned (exec done)"
PHASE_MAIN = "exec done -> first stdout byte"

MEASURES = {
    WARM: "request_ns (just before runtime.launch) -> ExitStatus.entry_ns in the pooled worker",
    COLD: "request_ns -> entry_ns, including resolve() (compile, fresh cache) and a new "
    "interpreter (spawn_cold_worker); the runtime object (engine) exists beforehand",
    NAIVE_INSTANTIATE: "in-process: new Linker + define_wasi + Store + WasiConfig + "
    "instantiate, until just before calling _start (Engine + compiled Module kept)",
    NAIVE_COMPILE: "in-process: new Engine + Module.from_file (compile) + the same as "
    "naive-instantiate, until just before calling _start",
    NATIVE: "posix_spawn (vfork+exec) of the native build -> its first stdout byte read "
    "from a pipe; stdout is block-buffered, so the byte leaves at exit(): an upper bound "
    "on main() entry, by main's few µs of work",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs",
        type=int,
        default=1000,
        help="warm, naive-instantiate and native starts each (default: %(default)s)",
    )
    parser.add_argument(
        "--cold-runs",
        type=int,
        default=50,
        help="cold starts; each takes 100s of ms (default: %(default)s)",
    )
    parser.add_argument(
        "--compile-runs", type=int, default=100, help="naive-compile starts (default: %(default)s)"
    )
    parser.add_argument(
        "--pool-size", type=int, default=4, help="warm pool target size (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="alternating blocks each variant's runs are split into (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=20,
        help="unrecorded starts per fast variant before measuring (default: %(default)s)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset to run (default: all)",
    )
    parser.add_argument(
        "--isolation",
        choices=["auto", "none"],
        default="none",
        help="warm variant: auto gives each container its own cgroup as the agent does "
        "(needs root; the cgroups go under a nova-bench-<hex> root, removed at the end); "
        "none: no cgroups (default: %(default)s)",
    )
    parser.add_argument("--wasm", type=Path, default=WASM_APP, help="default: %(default)s")
    parser.add_argument("--native", type=Path, default=NATIVE_APP, help="default: %(default)s")


# -- samples ---------------------------------------------------------------------


@dataclass(slots=True)
class Samples:
    """Per-variant measurements in nanoseconds."""

    startup: list[int] = field(default_factory=list)  # request -> _start entry
    end_to_end: list[int] = field(default_factory=list)  # request -> the start's end is known
    phases: dict[str, list[int]] = field(default_factory=dict)

    def add(self, startup: int, end_to_end: int, **phases: int) -> None:
        if startup <= 0:
            raise common.BenchError(f"non-positive startup time {startup} ns: clocks disagree")
        self.startup.append(startup)
        self.end_to_end.append(end_to_end)
        for name, value in phases.items():
            self.phases.setdefault(name, []).append(value)


class Variant(Protocol):
    """One way of starting the hello app; `once` starts it and waits for its end.

    Nova's variants are coroutines. The peers run synchronously: they block
    the event loop on purpose, which is idle then (the pool is full).
    """

    name: str
    samples: Samples

    def once(self, record: bool) -> Awaitable[None] | None: ...
    def facts(self) -> dict[str, Any]: ...


def _check(status: ExitStatus, variant: str) -> None:
    if status.reason is not ExitReason.EXITED or status.exit_code != 0 or not status.entry_ns:
        raise common.BenchError(f"{variant}: hello did not run cleanly: {status.describe()}")


def _spec(module_digest: str, artifact: str, wasm: Path, run: int) -> RunSpec:
    return RunSpec(
        id=f"bench-{run}",
        name="bench-hello",
        digest=module_digest,
        artifact=artifact,
        module_path=str(wasm),
        argv=ARGV,
        env=ENV,
    )


# -- Nova ------------------------------------------------------------------------


class WarmVariant:
    """Nova's fast path: a pooled worker, the module cached and hot."""

    name = WARM

    def __init__(self, runtime: SandboxRuntime, spec: RunSpec, stdio: tuple[int, int, int]):
        self.runtime = runtime
        self.spec = spec
        self.stdio = stdio
        self.samples = Samples()
        self.empty_pool_starts = 0
        self.not_pooled = 0

    @classmethod
    async def create(
        cls,
        wasm: Path,
        pool_size: int,
        cache_dir: str,
        stdio: tuple[int, int, int],
        cgroups: SandboxCgroups | None = None,
    ) -> WarmVariant:
        runtime = SandboxRuntime(cache_dir, pool_size=pool_size, cgroups=cgroups)
        await runtime.start()
        module = await runtime.resolve(str(wasm))  # compiles once, preloads into the pool
        return cls(runtime, _spec(module.digest, str(module.artifact), wasm, 0), stdio)

    async def _pool_full(self) -> None:
        pool = self.runtime.pool
        assert pool is not None
        deadline = time.monotonic() + POOL_READY_TIMEOUT_S
        while pool.idle < pool.size:
            if time.monotonic() > deadline:
                raise common.BenchError(f"warm pool did not refill to {pool.size} in time")
            await asyncio.sleep(0.0005)

    async def once(self, record: bool) -> None:
        await self._pool_full()
        pool = self.runtime.pool
        assert pool is not None
        empty = pool.idle == 0
        request_ns = time.monotonic_ns()
        container = await self.runtime.launch(self.spec, self.stdio, request_ns=request_ns)
        status = await container.wait()
        done_ns = time.monotonic_ns()
        _check(status, self.name)
        await _gone(container.pid)  # the next start must not race this worker's teardown
        if not record:
            return
        self.empty_pool_starts += empty
        self.not_pooled += not container.pooled
        received_ns = int(status.extra.get("received_ns", 0))
        phases: dict[str, int] = {}
        if received_ns:
            phases = {
                PHASE_PARENT: container.launched_ns - request_ns,
                PHASE_WAKE: received_ns - container.launched_ns,
                PHASE_WORKER: status.entry_ns - received_ns,
            }
        if status.end_ns:
            phases[PHASE_GUEST] = status.end_ns - status.entry_ns
            phases[PHASE_REPORT] = done_ns - status.end_ns
        self.samples.add(status.entry_ns - request_ns, done_ns - request_ns, **phases)

    async def close(self) -> None:
        await self.runtime.close()

    def facts(self) -> dict[str, Any]:
        pool = self.runtime.pool
        stats = pool.stats if pool is not None else None
        cgroups = self.runtime.cgroups
        return {
            "isolation": cgroups.describe() if cgroups is not None else "none",
            "pool_size": pool.size if pool is not None else 0,
            "empty_pool_starts": self.empty_pool_starts,
            "not_pooled_starts": self.not_pooled,
            "pool_hits": stats.hits if stats else 0,
            "pool_misses": stats.misses if stats else 0,
            "workers_spawned": stats.spawned if stats else 0,
        }


async def _gone(pid: int) -> None:
    """Wait until process `pid` has exited and been reaped (the zygote auto-reaps)."""
    deadline = time.monotonic() + WORKER_GONE_TIMEOUT_S
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            raise common.BenchError(f"worker {pid} did not exit after its container ended")
        await asyncio.sleep(0.0002)


class ColdVariant:
    """Nova's slow path: nothing cached, no zygote, no pool."""

    name = COLD

    def __init__(self, wasm: Path, stdio: tuple[int, int, int], scratch: Path):
        self.wasm = wasm
        self.stdio = stdio
        self.scratch = scratch
        self.samples = Samples()
        self.count = 0

    async def once(self, record: bool) -> None:
        self.count += 1
        cache_dir = self.scratch / f"cold-{self.count}"
        runtime = SandboxRuntime(str(cache_dir), use_zygote=False)  # the agent's engine exists
        try:
            request_ns = time.monotonic_ns()
            module = await runtime.resolve(str(self.wasm))  # empty cache: compile + write
            resolved_ns = time.monotonic_ns()
            spec = _spec(module.digest, str(module.artifact), self.wasm, self.count)
            container = await runtime.launch(spec, self.stdio, request_ns=request_ns)
            status = await container.wait()
            done_ns = time.monotonic_ns()
        finally:
            await runtime.close()
            shutil.rmtree(cache_dir, ignore_errors=True)
        _check(status, self.name)
        if not record:
            return
        phases = {
            PHASE_RESOLVE: resolved_ns - request_ns,
            PHASE_SPAWN: container.launched_ns - resolved_ns,
        }
        received_ns = int(status.extra.get("received_ns", 0))
        if received_ns:
            phases[PHASE_WAKE] = received_ns - container.launched_ns
            phases[PHASE_WORKER] = status.entry_ns - received_ns
        self.samples.add(status.entry_ns - request_ns, done_ns - request_ns, **phases)

    def facts(self) -> dict[str, Any]:
        return {}


# -- peers -----------------------------------------------------------------------


def _naive_start(engine: wasmtime.Engine, module: wasmtime.Module) -> tuple[wasmtime.Store, Any]:
    """What a straightforward wasmtime-py embedder does to start a WASI command."""
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    config = wasmtime.WasiConfig()
    config.argv = list(ARGV)
    config.env = [list(pair) for pair in ENV]
    config.stdout_file = os.devnull
    config.stderr_file = os.devnull
    store.set_wasi(config)
    instance = linker.instantiate(store, module)
    return store, instance.exports(store)["_start"]


def _call_start(store: wasmtime.Store, start: Any) -> None:
    try:
        start(store)
    except wasmtime.ExitTrap as exc:
        if exc.code != 0:
            raise common.BenchError(f"the hello app exited with {exc.code}") from None


class NaiveInstantiateVariant:
    """wasmtime-py in this process: Engine and compiled Module kept across starts."""

    name = NAIVE_INSTANTIATE

    def __init__(self, wasm: Path):
        self.engine = wasmtime.Engine()  # a straightforward embedder's default config
        self.module = wasmtime.Module.from_file(self.engine, str(wasm))
        self.samples = Samples()

    def once(self, record: bool) -> None:
        request_ns = time.monotonic_ns()
        store, start = _naive_start(self.engine, self.module)
        entry_ns = time.monotonic_ns()
        _call_start(store, start)
        done_ns = time.monotonic_ns()
        if record:
            self.samples.add(entry_ns - request_ns, done_ns - request_ns)

    def facts(self) -> dict[str, Any]:
        return {}


class NaiveCompileVariant:
    """wasmtime-py in this process: a new Engine and a compile on every start."""

    name = NAIVE_COMPILE

    def __init__(self, wasm: Path):
        self.wasm = str(wasm)
        self.samples = Samples()

    def once(self, record: bool) -> None:
        request_ns = time.monotonic_ns()
        engine = wasmtime.Engine()
        module = wasmtime.Module.from_file(engine, self.wasm)
        store, start = _naive_start(engine, module)
        entry_ns = time.monotonic_ns()
        _call_start(store, start)
        done_ns = time.monotonic_ns()
        if record:
            self.samples.add(entry_ns - request_ns, done_ns - request_ns)

    def facts(self) -> dict[str, Any]:
        return {}


class NativeVariant:
    """The same program built for the host, started the way a good launcher does."""

    name = NATIVE

    def __init__(self, program: Path):
        self.program = str(program)
        self.env = {**dict(ENV), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self.samples = Samples()

    def once(self, record: bool) -> None:
        read_end, write_end = os.pipe()
        try:
            actions = [
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, write_end, 1),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ]
            request_ns = time.monotonic_ns()
            pid = os.posix_spawn(
                self.program, [self.program, *ARGV[1:]], self.env, file_actions=actions
            )
            spawned_ns = time.monotonic_ns()  # glibc's posix_spawn returns after exec
            os.close(write_end)
            write_end = -1
            first = os.read(read_end, 1)
            entry_ns = time.monotonic_ns()
            while os.read(read_end, 65536):
                pass
            _, wait_status = os.waitpid(pid, 0)
            done_ns = time.monotonic_ns()
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        if not first or os.waitstatus_to_exitcode(wait_status) != 0:
            raise common.BenchError(f"{self.program} printed nothing or failed ({wait_status})")
        if record:
            self.samples.add(
                entry_ns - request_ns,
                done_ns - request_ns,
                **{PHASE_EXEC: spawned_ns - request_ns, PHASE_MAIN: entry_ns - spawned_ns},
            )

    def facts(self) -> dict[str, Any]:
        return {}


# -- the run -----------------------------------------------------------------------


def _selected(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise common.BenchError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    return [n for n in VARIANTS if n in names]


def _check_inputs(args: argparse.Namespace, names: list[str]) -> None:
    needed = [args.wasm] + ([args.native] if NATIVE in names else [])
    missing = [str(p) for p in needed if not Path(p).is_file()]
    if missing:
        raise common.BenchError(f"missing {', '.join(missing)}: build them with `make examples`")
    for option in ("runs", "cold_runs", "compile_runs", "rounds"):
        if getattr(args, option) < 1:
            raise common.BenchError(f"--{option.replace('_', '-')} must be at least 1")
    if args.pool_size < 1 and WARM in names:
        raise common.BenchError("--pool-size must be at least 1 for the warm variant")
    if args.isolation == "auto" and os.geteuid() != 0:
        raise common.BenchError("--isolation auto needs root (cgroups)")


@contextlib.contextmanager
def _bench_cgroups(isolation: str) -> Iterator[SandboxCgroups | None]:
    """Cgroups under a root of this run's own, torn down (with anything left) at the end."""
    if isolation == "none":
        yield None
        return
    cgroups = SandboxCgroups.for_host(f"nova-bench-{secrets.token_hex(4)}")
    if cgroups is None:
        raise common.BenchError("--isolation auto: no usable cgroup filesystem on this host")
    try:
        yield cgroups
    finally:
        cgroups.cgroups.teardown()


@contextlib.contextmanager
def _devnull_stdio() -> Iterator[tuple[int, int, int]]:
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(os.devnull, os.O_WRONLY)
    try:
        yield (stdin, stdout, stdout)
    finally:
        os.close(stdin)
        os.close(stdout)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


Results = dict[str, tuple[Samples, dict[str, Any]]]


async def _start_once(variant: Variant, record: bool) -> None:
    pending = variant.once(record)
    if pending is not None:
        await pending


async def _measure(args: argparse.Namespace, names: list[str], scratch: Path) -> Results:
    totals = {
        WARM: args.runs,
        NAIVE_INSTANTIATE: args.runs,
        NATIVE: args.runs,
        COLD: args.cold_runs,
        NAIVE_COMPILE: args.compile_runs,
    }
    with _devnull_stdio() as stdio, _bench_cgroups(args.isolation) as cgroups:
        warm: WarmVariant | None = None
        variants: list[Variant] = []
        try:
            if WARM in names:
                _progress(f"starting the warm pool ({args.pool_size} workers)...")
                warm = await WarmVariant.create(
                    args.wasm, args.pool_size, str(scratch / "warm-cache"), stdio, cgroups
                )
                variants.append(warm)
            if COLD in names:
                variants.append(ColdVariant(args.wasm, stdio, scratch))
            if NAIVE_INSTANTIATE in names:
                variants.append(NaiveInstantiateVariant(args.wasm))
            if NAIVE_COMPILE in names:
                variants.append(NaiveCompileVariant(args.wasm))
            if NATIVE in names:
                variants.append(NativeVariant(args.native))
            for variant in variants:  # caches, pool, page cache: hot before measuring
                slow = variant.name in (COLD, NAIVE_COMPILE)
                for _ in range(1 if slow else args.warmup):
                    await _start_once(variant, record=False)
            plan = {v.name: common.split_evenly(totals[v.name], args.rounds) for v in variants}
            started = time.monotonic()
            for round_no in range(args.rounds):
                for variant in common.rotate(variants, round_no):
                    gc.collect()  # outside the timed starts, the same for every variant
                    for _ in range(plan[variant.name][round_no]):
                        await _start_once(variant, record=True)
                elapsed = time.monotonic() - started
                _progress(f"round {round_no + 1}/{args.rounds} done ({elapsed:.0f}s)")
            return {v.name: (v.samples, v.facts()) for v in variants}
        finally:
            if warm is not None:
                _progress("closing the warm pool...")
                try:
                    await asyncio.wait_for(warm.close(), CLOSE_TIMEOUT_S)
                except TimeoutError:
                    _progress(f"warning: the runtime did not close within {CLOSE_TIMEOUT_S:g}s")


def _body(results: Results, args: argparse.Namespace) -> dict[str, Any]:
    """The result file's body: parameters, per-variant summaries, ratios, goals."""
    startup = {name: common.summarize(s.startup) for name, (s, _) in results.items()}
    variants: dict[str, Any] = {}
    for name, (samples, facts) in results.items():
        end_to_end = common.summarize(samples.end_to_end)
        variants[name] = {
            **startup[name].to_json(),
            "end_to_end_p50_us": round(end_to_end.p50_us, 3),
            "end_to_end": end_to_end.to_json(),
            "phases": {p: common.summarize(v).to_json() for p, v in samples.phases.items()},
            "measures": MEASURES[name],
            **facts,
        }
    goals: dict[str, Any] = {
        "warm_p50_us_max": GOAL_WARM_P50_US,
        "warm_p99_us_max": GOAL_WARM_P99_US,
    }
    if WARM in startup:
        goals["p50_met"] = startup[WARM].p50_us <= GOAL_WARM_P50_US
        goals["p99_met"] = startup[WARM].p99_us <= GOAL_WARM_P99_US
    return {
        "parameters": {
            "runs": args.runs,
            "cold_runs": args.cold_runs,
            "compile_runs": args.compile_runs,
            "pool_size": args.pool_size,
            "isolation": args.isolation,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "wasm": str(args.wasm),
            "native": str(args.native),
            "argv": list(ARGV),
            "env": dict(ENV),
            "variants": list(results),
        },
        "variants": variants,
        "ratios": common.ratios(startup, RATIO_PAIRS),
        "goals": goals,
        "notes": [
            "startup = request -> _start entry (CLOCK_MONOTONIC, system-wide); "
            "end_to_end = request -> the run is over: Nova's container.wait() returned "
            "(it returns once the worker process has exited), the naive peers' _start "
            "returned, the native program was reaped",
            "variants run in alternating blocks within one run; compare ratios, "
            "not absolute times, across runs on shared machines",
            f"cold and naive-compile compile the module on every start, so they use fewer "
            f"runs ({args.cold_runs} and {args.compile_runs})",
        ],
    }


def _print_report(results: Results, body: dict[str, Any]) -> None:
    startup = {name: common.summarize(s.startup) for name, (s, _) in results.items()}
    rows = [
        [*row, body["variants"][name]["end_to_end_p50_us"]]
        for name, row in zip(startup, common.summary_rows(startup), strict=True)
    ]
    print("\nstartup: request -> _start entry (µs)")
    print(common.format_table([*common.SUMMARY_HEADERS, "e2e p50 µs"], rows))
    for name, (samples, _) in results.items():
        if samples.phases:
            phases = {p: common.summarize(v) for p, v in samples.phases.items()}
            print(f"\n{name}: where the time goes (µs)")
            headers = ["phase", "n", "p50", "p90", "p99", "max", "mean"]
            print(common.format_table(headers, common.summary_rows(phases)))
    ratios = body["ratios"]
    if ratios:
        print("\nratios of startup times (< 1: the first is faster)")
        rows = [[pair, r["p50"], r["p99"]] for pair, r in ratios.items()]
        print(common.format_table(["a/b", "p50", "p99"], rows))
    if WARM in results:
        facts, goals = results[WARM][1], body["goals"]
        print(
            f"\nwarm: {facts['empty_pool_starts']} of {startup[WARM].n} starts found the pool "
            f"empty (should be 0); goal p50 <= {GOAL_WARM_P50_US:.0f} µs: "
            f"{'met' if goals['p50_met'] else 'NOT met'}, p99 <= {GOAL_WARM_P99_US:.0f} µs: "
            f"{'met' if goals['p99_met'] else 'NOT met'}"
        )
    for note in body["notes"][2:]:
        print(note)


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = _selected(args.variants)
    _check_inputs(args, names)
    scratch = Path(tempfile.mkdtemp(prefix="nova-bench-startup-"))
    try:
        results = asyncio.run(_measure(args, names, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body = _body(results, args)
    _print_report(results, body)
    return body
