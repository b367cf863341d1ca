"""What every benchmark shares: summaries, host facts, result files, tables.

The statistics here are pure functions of their inputs (unit-tested in
tests/unit/test_bench_common.py); everything that looks at the machine is
in `host_facts()`.

Units: samples are collected as CLOCK_MONOTONIC nanoseconds and reported in
microseconds; every `*_us` field of a result file is in microseconds.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1
NS_PER_US = 1000.0


class BenchError(Exception):
    """A benchmark cannot run or produced a wrong result; the message says why."""


# -- statistics ----------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100), linear between closest ranks.

    The same definition as numpy's default ("linear", type 7): p0 is the
    minimum, p100 the maximum, p50 of an even count the mean of the two
    middle values. Raises ValueError on an empty sequence.
    """
    if not samples:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Summary:
    """One measured variant, in microseconds."""

    n: int
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    mean_us: float
    min_us: float

    def to_json(self) -> dict[str, float | int]:
        return {k: (v if isinstance(v, int) else round(v, 3)) for k, v in asdict(self).items()}


def summarize(samples: Sequence[float], *, unit_ns: float = NS_PER_US) -> Summary:
    """Summary of `samples` given in nanoseconds (or in 1/`unit_ns` microseconds)."""
    if not samples:
        raise ValueError("cannot summarize an empty sample")
    scaled = sorted(s / unit_ns for s in samples)
    return Summary(
        n=len(scaled),
        p50_us=percentile(scaled, 50),
        p90_us=percentile(scaled, 90),
        p99_us=percentile(scaled, 99),
        max_us=scaled[-1],
        mean_us=sum(scaled) / len(scaled),
        min_us=scaled[0],
    )


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, rounded; None when the denominator is not positive."""
    if denominator <= 0:
        return None
    return round(numerator / denominator, 3)


def ratios(summaries: Mapping[str, Summary], pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """p50 and p99 ratios for each (a, b) pair present in `summaries`, keyed "a/b".

    A ratio below 1 means `a` is faster than `b`.
    """
    out: dict[str, Any] = {}
    for a, b in pairs:
        if a in summaries and b in summaries:
            sa, sb = summaries[a], summaries[b]
            out[f"{a}/{b}"] = {
                "p50": ratio(sa.p50_us, sb.p50_us),
                "p99": ratio(sa.p99_us, sb.p99_us),
            }
    return out


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` runs split into `parts` blocks whose sizes differ by at most one."""
    if parts < 1 or total < 0:
        raise ValueError(f"cannot split {total} into {parts} parts")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def rotate(items: Sequence[T], shift: int) -> list[T]:
    """`items` rotated left by `shift`: round r of alternating blocks starts with item r."""
    if not items:
        return []
    k = shift % len(items)
    return [*items[k:], *items[:k]]


# -- host facts ----------------------------------------------------------------


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (or the given text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
        except OSError:
            return platform.processor() or platform.machine()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return platform.processor() or platform.machine()


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD's commit id, with "-dirty" when the tree has changes; None without git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None  # no git, not a repository, or no commit yet
    return f"{head}-dirty" if dirty else head


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def host_facts() -> dict[str, Any]:
    """What the numbers depend on: kernel, CPU, cores, Python, wasmtime, commit, load."""
    try:
        usable_cpus: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cpus = None
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "nproc": usable_cpus or os.cpu_count(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "wasmtime": _package_version("wasmtime"),
        "git_commit": git_commit(),
        "loadavg_at_start": load,
    }


# -- result files ----------------------------------------------------------------


def utc_timestamp(now: datetime.datetime | None = None) -> str:
    moment = now or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def result_document(
    benchmark: str,
    body: Mapping[str, Any],
    *,
    host: Mapping[str, Any] | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """A benchmark's result body wrapped with what makes it comparable later.

    `body` is what the benchmark's `run()` returned (parameters, variants,
    ratios, notes); its own keys win over the wrapper's defaults.
    """
    document: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "benchmark": benchmark,
        "timestamp": timestamp or utc_timestamp(),
        "host": dict(host) if host is not None else host_facts(),
    }
    document.update(body)
    return document


def write_result(
    benchmark: str, document: Mapping[str, Any], results_dir: Path = RESULTS_DIR
) -> Path:
    """Write `<results_dir>/<benchmark>.json` atomically (replacing any earlier run)."""
    if not benchmark or "/" in benchmark or benchmark.startswith("."):
        raise ValueError(f"invalid benchmark name {benchmark!r}")
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{benchmark}.json"
    tmp = results_dir / f"{benchmark}.json.tmp"
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(value: object) -> Any:
    if isinstance(value, Summary):
        return value.to_json()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to a result file")


# -- tables ----------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table has {len(headers)} columns")
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(row) for row in cells)])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        size = abs(value)
        if size >= 1000:
            return f"{value:,.0f}"
        if size >= 100:
            return f"{value:.0f}"
        return f"{value:.1f}" if size >= 10 else f"{value:.2f}"
    return str(value)


def summary_rows(summaries: Mapping[str, Summary]) -> list[list[object]]:
    """Rows for `SUMMARY_HEADERS`, one per variant, in the mapping's order."""
    return [
        [name, s.n, s.p50_us, s.p90_us, s.p99_us, s.max_us, s.mean_us]
        for name, s in summaries.items()
    ]


SUMMARY_HEADERS = ("variant", "n", "p50 µs", "p90 µs", "p99 µs", "max µs", "mean µs")
