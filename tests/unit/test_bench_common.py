"""bench.common: the pure statistics, table and result-file helpers."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from bench import common


def test_percentile_of_one_to_one_hundred_matches_numpy_linear() -> None:
    data = list(range(1, 101))  # numpy.percentile(data, q) for q = 0, 50, 90, 99, 100
    assert common.percentile(data, 0) == 1
    assert common.percentile(data, 50) == pytest.approx(50.5)
    assert common.percentile(data, 90) == pytest.approx(90.1)
    assert common.percentile(data, 99) == pytest.approx(99.01)
    assert common.percentile(data, 100) == 100


def test_percentile_does_not_depend_on_input_order() -> None:
    assert common.percentile([5, 1, 4, 2, 3], 50) == 3
    assert common.percentile([10, 0], 25) == pytest.approx(2.5)


def test_percentile_of_a_single_sample_is_that_sample() -> None:
    assert common.percentile([7.0], 0) == 7.0
    assert common.percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_q_outside_0_to_100(q: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        common.percentile([1, 2, 3], q)


def test_percentile_rejects_an_empty_sample() -> None:
    with pytest.raises(ValueError, match="empty"):
        common.percentile([], 50)


def test_summarize_converts_nanoseconds_to_microseconds() -> None:
    samples_ns = [i * 1000 for i in range(1, 101)]  # 1..100 µs
    summary = common.summarize(samples_ns)
    assert summary.n == 100
    assert summary.p50_us == pytest.approx(50.5)
    assert summary.p90_us == pytest.approx(90.1)
    assert summary.p99_us == pytest.approx(99.01)
    assert summary.max_us == 100
    assert summary.min_us == 1
    assert summary.mean_us == pytest.approx(50.5)


def test_summary_json_has_every_reported_field_rounded() -> None:
    data = common.summarize([1234, 5678, 9999]).to_json()
    assert set(data) == {"n", "p50_us", "p90_us", "p99_us", "max_us", "mean_us", "min_us"}
    assert data["n"] == 3
    assert data["p50_us"] == 5.678
    assert data["mean_us"] == round((1.234 + 5.678 + 9.999) / 3, 3)


def test_summarize_rejects_an_empty_sample() -> None:
    with pytest.raises(ValueError, match="empty"):
        common.summarize([])


def test_ratio_is_none_without_a_positive_denominator() -> None:
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(1.0, 3.0) == 0.333
    assert common.ratio(1.0, 0.0) is None


def test_ratios_cover_only_pairs_whose_variants_were_measured() -> None:
    summaries = {
        "warm": common.summarize([100_000, 200_000]),  # p50 150 µs
        "peer": common.summarize([300_000, 300_000]),  # p50 300 µs
    }
    result = common.ratios(summaries, [("warm", "peer"), ("warm", "absent")])
    assert result == {"warm/peer": {"p50": 0.5, "p99": pytest.approx(0.663, abs=1e-3)}}


def test_split_evenly_keeps_the_total_and_differs_by_at_most_one() -> None:
    assert common.split_evenly(1000, 10) == [100] * 10
    assert common.split_evenly(7, 3) == [3, 2, 2]
    assert common.split_evenly(2, 4) == [1, 1, 0, 0]
    with pytest.raises(ValueError):
        common.split_evenly(5, 0)


def test_rotate_starts_each_round_with_the_next_item() -> None:
    items = ["a", "b", "c"]
    assert common.rotate(items, 0) == ["a", "b", "c"]
    assert common.rotate(items, 1) == ["b", "c", "a"]
    assert common.rotate(items, 4) == ["b", "c", "a"]
    assert common.rotate([], 3) == []


def test_cpu_model_reads_the_model_name_line() -> None:
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
    assert common.cpu_model(cpuinfo) == "AMD EPYC 7B13"


def test_utc_timestamp_is_iso8601_with_z() -> None:
    moment = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.UTC)
    assert common.utc_timestamp(moment) == "2024-05-06T07:08:09Z"


def test_format_table_aligns_columns() -> None:
    text = common.format_table(
        ["variant", "n", "p50 µs"], [["warm", 1000, 212.4], ["cold", 50, 1.5]]
    )
    lines = text.splitlines()
    assert lines[0] == "variant     n  p50 µs"
    assert lines[1] == "-------  ----  ------"
    assert lines[2] == "warm     1000     212"
    assert lines[3] == "cold       50    1.50"


def test_format_table_shows_missing_values_and_rejects_ragged_rows() -> None:
    assert common.format_table(["a", "b"], [["x", None]]).splitlines()[2] == "x  -"
    with pytest.raises(ValueError, match="cells"):
        common.format_table(["a", "b"], [["x"]])


def test_result_document_wraps_the_body_with_timestamp_and_host() -> None:
    body = {"parameters": {"runs": 3}, "variants": {"warm": {"n": 3}}}
    document = common.result_document(
        "startup", body, host={"kernel": "6.1"}, timestamp="2024-01-01T00:00:00Z"
    )
    assert document["benchmark"] == "startup"
    assert document["timestamp"] == "2024-01-01T00:00:00Z"
    assert document["host"] == {"kernel": "6.1"}
    assert document["parameters"] == {"runs": 3}
    assert document["variants"] == {"warm": {"n": 3}}
    assert document["schema"] == common.SCHEMA_VERSION


def test_write_result_writes_and_overwrites_json(tmp_path: Path) -> None:
    summary = common.summarize([1000, 2000, 3000])
    first = common.write_result("startup", {"variants": {"warm": summary}}, tmp_path)
    assert first == tmp_path / "startup.json"
    assert json.loads(first.read_text())["variants"]["warm"]["p50_us"] == 2.0

    second = common.write_result("startup", {"variants": {}}, tmp_path)
    assert second == first
    assert json.loads(second.read_text()) == {"variants": {}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["startup.json"]  # no temp left


def test_write_result_creates_the_directory(tmp_path: Path) -> None:
    path = common.write_result("http", {"ok": True}, tmp_path / "nested" / "results")
    assert json.loads(path.read_text()) == {"ok": True}


@pytest.mark.parametrize("name", ["", "../escape", ".hidden"])
def test_write_result_rejects_names_that_are_not_plain_file_names(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(ValueError, match="invalid benchmark name"):
        common.write_result(name, {}, tmp_path)


def test_write_result_refuses_values_json_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot write"):
        common.write_result("startup", {"bad": object()}, tmp_path)
