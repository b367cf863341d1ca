"""Sizes and durations as users type them."""

from __future__ import annotations

import pytest

from nova.errors import UsageError
from nova.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64Mi", 64 << 20), ("1Gi", 1 << 30), ("500M", 500_000_000), ("4096", 4096), ("2KiB", 2048)],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12XB", "", "Mi", "-5Mi", "0"])
def test_bad_sizes_say_what_is_accepted(text: str) -> None:
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("5s", 5.0), ("250ms", 0.25), ("2m", 120.0), ("3", 3.0)]
)
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["5x", "", "0s", "fast"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError, match="invalid duration"):
        parse_duration(text)


def test_format_size_round_trips() -> None:
    assert format_size(64 << 20) == "64Mi"
    assert parse_size(format_size(3 << 30)) == 3 << 30
