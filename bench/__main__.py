"""`python -m bench NAME [options]` and `python -m bench all`.

Benchmarks are imported lazily: listing them, or running one, never imports
the others (and their heavier dependencies).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import common


@dataclass(frozen=True, slots=True)
class Benchmark:
    module: str  # imported when the benchmark runs
    summary: str  # the one line `--help` shows


BENCHMARKS: dict[str, Benchmark] = {
    "startup": Benchmark(
        "bench.startup",
        "start request -> the module's _start entry (hello.wasm): warm pool, cold, "
        "naive wasmtime-py, native fork+exec",
    ),
    "http": Benchmark(
        "bench.http",
        "HTTP serving of a wasm container (WAGI): throughput and latency against its peers",
    ),
    "isolation": Benchmark(
        "bench.isolation",
        "starts with cgroup + netns + veth per container (warm, cold) vs the raw kernel "
        "floor; density",
    ),
    "placement": Benchmark("bench.placement", "pure placement engine: 1M containers, 10k nodes"),
    "failover": Benchmark(
        "bench.failover",
        "leader failover (SIGKILL, host cut off): fault -> new leader's first fenced write, "
        "beside `consul lock` (root, a 5-host lab)",
    ),
    "netpol": Benchmark(
        "bench.netpol",
        "network policy: eBPF vs nftables vs iptables at 0-10,000 rules; policy update latency",
    ),
}


def _listing() -> str:
    width = max(len(name) for name in BENCHMARKS)
    lines = [f"  {name.ljust(width)}  {b.summary}" for name, b in BENCHMARKS.items()]
    lines.append(f"  {'all'.ljust(width)}  every benchmark above, each with its defaults")
    return "benchmarks:\n" + "\n".join(lines)


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        usage="python -m bench [-h] NAME [options]",
        description="Run a Nova benchmark: prints a table and writes bench/results/NAME.json.",
        epilog=_listing() + "\n\n`python -m bench NAME --help` shows a benchmark's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", metavar="NAME", choices=[*BENCHMARKS, "all"], help="see below")
    parser.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=common.RESULTS_DIR,
        help="where NAME.json is written (default: %(default)s)",
    )


def _load(name: str) -> ModuleType:
    module_name = BENCHMARKS[name].module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # a missing dependency: let its own error speak
        message = f"benchmark {name!r} is not available: no module {module_name}"
        raise common.BenchError(message) from None


def _parser_for(name: str, module: ModuleType) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m bench {name}",
        description=(module.__doc__ or BENCHMARKS[name].summary).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments = getattr(module, "add_arguments", None)
    if add_arguments is not None:
        add_arguments(parser)
    _add_common(parser)
    return parser


def run_one(name: str, argv: Sequence[str]) -> Path:
    """Run benchmark `name` with `argv`; returns the result file it wrote."""
    module = _load(name)
    args = _parser_for(name, module).parse_args(list(argv))
    started = time.monotonic()
    body: dict[str, Any] = module.run(args)
    body.setdefault("parameters", {k: v for k, v in vars(args).items() if k != "results_dir"})
    body.setdefault("wall_s", round(time.monotonic() - started, 1))
    path = common.write_result(name, common.result_document(name, body), args.results_dir)
    print(f"\n{name}: results written to {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    # A benchmark that seems stuck: `kill -USR1 <pid>` prints every thread's stack.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    top = _top_parser().parse_args(argv)
    if top.name != "all":
        try:
            run_one(top.name, top.options)
        except common.BenchError as exc:
            print(f"{top.name}: {exc}", file=sys.stderr)
            return 1
        return 0
    # `all` runs every benchmark with its defaults; only the common options apply.
    all_parser = argparse.ArgumentParser(
        prog="python -m bench all", description="Run every benchmark with its defaults."
    )
    _add_common(all_parser)
    shared = all_parser.parse_args(top.options)
    failed: list[str] = []
    for name in BENCHMARKS:
        print(f"=== {name} ===", flush=True)
        try:
            run_one(name, ["--results-dir", str(shared.results_dir)])
        except (Exception, SystemExit) as exc:  # one broken benchmark must not stop the rest
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(name)
        print()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
