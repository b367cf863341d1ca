"""Parsing of the sizes and durations users type (`--memory 64Mi`, `--timeout 5s`)."""

from __future__ import annotations

import re

from nova.errors import UsageError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1 << 40,
    "tib": 1 << 40,
}
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, *, what: str = "size") -> int:
    """`64Mi` -> 67108864. Units: B, K/Ki, M/Mi, G/Gi, T/Ti (decimal or binary)."""
    match = _NUMBER_UNIT.match(text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise UsageError(
            f"invalid {what} {text!r}: expected a number with an optional unit "
            "(B, K, Ki, M, Mi, G, Gi, T, Ti), e.g. 64Mi"
        )
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value < 1:
        raise UsageError(f"invalid {what} {text!r}: must be at least 1 byte")
    return int(value)


def parse_duration(text: str, *, what: str = "duration") -> float:
    """`5s` -> 5.0, `250ms` -> 0.25, `2m` -> 120.0; a bare number is seconds."""
    match = _NUMBER_UNIT.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in _DURATION_UNITS):
        raise UsageError(
            f"invalid {what} {text!r}: expected a number with a unit (us, ms, s, m, h), e.g. 5s"
        )
    seconds = float(match.group(1)) * _DURATION_UNITS.get(unit, 1.0)
    if seconds <= 0:
        raise UsageError(f"invalid {what} {text!r}: must be greater than zero")
    return seconds


def format_size(n: int) -> str:
    """67108864 -> '64Mi' (binary units, as users type them)."""
    for unit, factor in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"
