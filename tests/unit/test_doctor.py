"""nova doctor against the real host: the report's shape, and probes whose
answers this test can work out independently (from /proc and /sys)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from nova import doctor


@pytest.fixture(scope="module")
def checks() -> list[doctor.Check]:
    return doctor.collect()


def by_feature(checks: list[doctor.Check], feature: str) -> doctor.Check:
    matches = [c for c in checks if c.feature == feature]
    assert len(matches) == 1, f"expected one {feature!r} check, got {matches}"
    return matches[0]


def v1_controllers_from_mountinfo() -> dict[str, str]:
    """controller -> mount point for v1 hierarchies, parsed here independently."""
    found: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_fields, _, fs_fields = line.partition(" - ")
        fstype, _source, options = fs_fields.split()[:3]
        if fstype == "cgroup":
            for opt in options.split(","):
                found.setdefault(opt, mount_fields.split()[4])
    return found


def test_every_check_has_a_unique_feature_and_a_known_status(checks: list[doctor.Check]) -> None:
    assert len(checks) == len(doctor.CHECKS)
    features = [c.feature for c in checks]
    assert len(set(features)) == len(features)
    for c in checks:
        assert c.status in ("ok", "missing", "warn"), c
        assert c.detail, c
        assert not c.detail.startswith("probe failed"), c  # no probe may crash here


def test_table_has_one_row_per_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rule, *rows = lines
    assert header.split()[:3] == ["feature", "status", "detail"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert len(rows) == len(doctor.CHECKS)
    # aligned: the status column starts at the same offset on every row
    col = header.index("status")
    for row in rows:
        assert row[col:].split()[0] in ("ok", "missing", "warn"), row


def test_json_parses_and_matches_the_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, list)
    assert len(data) == len(doctor.CHECKS)
    for item in data:
        assert set(item) == {"feature", "status", "detail", "data"}
        assert item["status"] in ("ok", "missing", "warn")


def test_kernel_check_reports_the_running_release(checks: list[doctor.Check]) -> None:
    check = by_feature(checks, "kernel")
    assert platform.release() in check.detail
    assert check.data["release"] == platform.release()


def test_cgroup_layout_matches_mountinfo(checks: list[doctor.Check]) -> None:
    check = by_feature(checks, "cgroups")
    v1 = v1_controllers_from_mountinfo()
    reported_v1 = check.data["v1"]
    assert isinstance(reported_v1, dict)
    if "memory" in v1:
        # This host (DESIGN.md "This kernel"): memory is on a v1 hierarchy.
        assert check.data["layout"] in ("v1", "hybrid")
        assert reported_v1["memory"] == v1["memory"]
        assert f"memory={v1['memory']}" in check.detail
    else:
        assert "memory" not in reported_v1
    for ctrl in ("cpu", "pids"):
        assert reported_v1.get(ctrl) == v1.get(ctrl)


def test_cgroup2_controllers_come_from_the_mount(checks: list[doctor.Check]) -> None:
    check = by_feature(checks, "cgroups")
    mount = check.data["cgroup2_mount"]
    if mount is None:
        pytest.skip("no cgroup2 mount on this host")
    assert isinstance(mount, str)
    expected = (Path(mount) / "cgroup.controllers").read_text().split()
    assert check.data["cgroup2_controllers"] == expected


def test_root_check_matches_euid(checks: list[doctor.Check]) -> None:
    check = by_feature(checks, "root")
    assert check.data["euid"] == os.geteuid()
    if os.geteuid() != 0:
        assert check.status == "warn"


def test_bpf_map_create_works_as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    assert doctor.bpf_map_create_probe() == (0, "")


def test_btf_check_matches_sysfs(checks: list[doctor.Check]) -> None:
    expected = "ok" if Path("/sys/kernel/btf/vmlinux").exists() else "missing"
    assert by_feature(checks, "btf").status == expected


def test_kernel_features_agree_with_the_config(checks: list[doctor.Check]) -> None:
    config = doctor.kernel_config()
    if config is None:
        pytest.skip("no kernel config on this host")
    for feature, symbol in (("vxlan", "CONFIG_VXLAN"), ("8021q", "CONFIG_VLAN_8021Q")):
        value = config.values.get(symbol)
        status = by_feature(checks, feature).status
        if value == "y":
            assert status == "ok", (feature, status)
        elif value in (None, "n"):
            assert status == "missing", (feature, status)


def test_mountinfo_parser_unescapes_paths(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "41 31 0:38 / /sys/fs/cgroup/un\\040ified rw,relatime - cgroup2 cgroup2 rw\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n"
    )
    assert doctor.mounts(str(info)) == [
        doctor.Mount("/sys/fs/cgroup/un ified", "cgroup2", ("rw",)),
        doctor.Mount("/sys/fs/cgroup/memory", "cgroup", ("rw", "memory")),
    ]
