"""Pure parsing and arithmetic for cgroup files: no I/O, unit-tested without root."""

from __future__ import annotations

import math
import re

from nova.errors import UsageError

CPU_PERIOD_US = 100_000  # the kernel's default CFS period
CPU_QUOTA_MIN_US = 1_000  # the kernel refuses smaller quotas (and periods)
CPU_PERIOD_MAX_US = 1_000_000

_CPU_TEXT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m?)\s*$")


def parse_millicores(text: str) -> int:
    """`500m` -> 500, `0.5` -> 500, `2` -> 2000 (Kubernetes CPU units)."""
    match = _CPU_TEXT.match(text)
    if match is None:
        raise UsageError(
            f"invalid cpu {text!r}: expected cores or millicores, e.g. 500m (half a core) or 2"
        )
    value = float(match.group(1))
    millicores = round(value if match.group(2) else value * 1000)
    if millicores < 1:
        raise UsageError(f"invalid cpu {text!r}: must be at least 1m (a thousandth of a core)")
    return millicores


def cpu_quota(millicores: int, period_us: int = CPU_PERIOD_US) -> tuple[int, int]:
    """CFS (quota_us, period_us) that grant `millicores` thousandths of a core.

    500m -> (50000, 100000). Below the kernel's 1 ms quota floor the period
    grows instead, so small shares stay exact: 5m -> (1000, 200000).
    """
    if millicores < 1:
        raise ValueError(f"cpu quota must be at least 1m, not {millicores}m")
    if not CPU_QUOTA_MIN_US <= period_us <= CPU_PERIOD_MAX_US:
        raise ValueError(f"cpu period must be 1000..1000000 us, not {period_us}")
    quota = millicores * period_us // 1000
    if quota >= CPU_QUOTA_MIN_US:
        return quota, period_us
    period = min(CPU_PERIOD_MAX_US, math.ceil(CPU_QUOTA_MIN_US * 1000 / millicores))
    return CPU_QUOTA_MIN_US, period


def format_cpu_max(quota_us: int | None, period_us: int) -> str:
    """cgroup v2 cpu.max: `50000 100000`, or `max 100000` for no quota."""
    return f"{'max' if quota_us is None else quota_us} {period_us}"


def parse_cpu_max(text: str) -> tuple[int | None, int]:
    """cgroup v2 cpu.max -> (quota_us or None for `max`, period_us)."""
    fields = text.split()
    if len(fields) != 2:
        raise ValueError(f"cpu.max: expected 'QUOTA PERIOD', got {text!r}")
    quota = None if fields[0] == "max" else int(fields[0])
    return quota, int(fields[1])


def millicores_of(quota_us: int | None, period_us: int) -> int | None:
    """The inverse of cpu_quota (rounded): (50000, 100000) -> 500; no quota -> None."""
    if quota_us is None or quota_us < 0:
        return None
    return round(quota_us * 1000 / period_us)


def parse_keyed(text: str) -> dict[str, int]:
    """Flat keyed files (`key value` per line): memory.stat, memory.events, cpu.stat,
    v1 memory.oom_control. Lines that are not `key integer` are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2:
            try:
                out[fields[0]] = int(fields[1])
            except ValueError:
                continue
    return out


def parse_limit(text: str) -> int | None:
    """A v2 `max`-or-number file (memory.max, pids.max); `max` -> None."""
    value = text.strip()
    return None if value == "max" else int(value)


# v1 memory.limit_in_bytes reads back as PAGE_COUNTER_MAX * PAGE_SIZE when unlimited:
# 9223372036854771712 on 4 KiB pages. Anything this large means "no limit".
V1_UNLIMITED_FLOOR = 1 << 62


def parse_v1_memory_limit(text: str) -> int | None:
    value = int(text.strip())
    return None if value >= V1_UNLIMITED_FLOOR or value < 0 else value


def parse_pids(text: str) -> list[int]:
    """cgroup.procs / tasks: one pid per line."""
    return [int(line) for line in text.split()]


def working_set(current: int, stat: dict[str, int], *, v1: bool) -> int:
    """Memory the container cannot give back easily: usage minus inactive file cache
    (what kubelet reports as the working set)."""
    inactive = stat.get("total_inactive_file" if v1 else "inactive_file", 0)
    return max(0, current - inactive)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup -> {controller: path}; the v2 hierarchy is under the key "".

    `4:memory:/nova/containers/c1` -> {"memory": "/nova/containers/c1"};
    `0::/x` -> {"": "/x"}; co-mounted controllers (`2:cpu,cpuacct:/`) each get
    the path; named v1 hierarchies (`name=systemd`) keep their name.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            out[controller] = parts[2]
    return out
