"""cgroup parsing, quota arithmetic and layout detection: pure, no root, no kernel."""

from __future__ import annotations

import errno

import pytest

from agent.isolation.cgroups import (
    CgroupBusy,
    CgroupError,
    Cgroups,
    CgroupsV1,
    CgroupsV2,
    ControllerUnavailable,
    Limits,
    NoCgroupFilesystem,
    cpu_quota,
    limits_for_run,
    parse_millicores,
)
from agent.isolation.cgroups.base import check_name, check_root_name
from agent.isolation.cgroups.detect import choose_layout, parse_mountinfo
from agent.isolation.cgroups.hook import WORKER_MEMORY_OVERHEAD
from agent.isolation.cgroups.parse import (
    format_cpu_max,
    millicores_of,
    parse_cpu_max,
    parse_keyed,
    parse_limit,
    parse_pids,
    parse_proc_cgroup,
    parse_v1_memory_limit,
    working_set,
)
from agent.sandbox.spec import RunSpec
from nova.errors import UsageError

# This dev host: cpu, memory, pids on v1; a cgroup2 mount without controllers.
HYBRID = """\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

# A current systemd distro: only the unified hierarchy.
UNIFIED = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
27 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
"""

# Older distros co-mount cpu and cpuacct (and give it a name with a comma).
CO_MOUNTED = """\
30 24 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
31 24 0:27 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
32 24 0:28 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
33 24 0:29 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
"""

V2_MEMORY_STAT = """\
anon 1056768
file 4325376
kernel 425984
shmem 0
file_mapped 2027520
active_anon 1048576
inactive_anon 0
active_file 1646592
inactive_file 2678784
unevictable 0
pgfault 2093
workingset_refault_anon 0
"""

V1_MEMORY_STAT = """\
cache 4096000
rss 1114112
mapped_file 1998848
inactive_file 1000
total_cache 4096000
total_rss 1114112
total_inactive_file 2097152
total_active_file 1998848
"""

V2_MEMORY_EVENTS = "low 0\nhigh 0\nmax 312\noom 2\noom_kill 1\noom_group_kill 0\n"
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
V2_CPU_STAT = "usage_usec 201345\nuser_usec 200001\nsystem_usec 1344\nnr_periods 11\n"


# --- CPU quota ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "millicores"),
    [("500m", 500), ("0.5", 500), ("2", 2000), ("1.25", 1250), ("200m", 200), (" 1m ", 1)],
)
def test_cpu_as_users_type_it(text: str, millicores: int) -> None:
    assert parse_millicores(text) == millicores


@pytest.mark.parametrize("text", ["", "half", "0", "0m", "-1", "5mi", "0.0001"])
def test_bad_cpu_says_what_is_accepted(text: str) -> None:
    with pytest.raises(UsageError, match="invalid cpu"):
        parse_millicores(text)


@pytest.mark.parametrize(
    ("millicores", "quota_period"),
    [
        (500, (50_000, 100_000)),  # --cpu 500m: half a core
        (200, (20_000, 100_000)),
        (1000, (100_000, 100_000)),
        (2500, (250_000, 100_000)),  # more than one core: quota > period
        (10, (1_000, 100_000)),  # exactly the kernel's 1 ms floor
        (5, (1_000, 200_000)),  # below it the period grows instead
        (1, (1_000, 1_000_000)),
        (3, (1_000, 333_334)),
    ],
)
def test_cpu_quota(millicores: int, quota_period: tuple[int, int]) -> None:
    assert cpu_quota(millicores) == quota_period


@pytest.mark.parametrize("millicores", [1, 3, 5, 10, 99, 200, 333, 500, 1000, 1999, 64_000])
def test_cpu_quota_round_trips_and_respects_kernel_bounds(millicores: int) -> None:
    quota, period = cpu_quota(millicores)
    assert quota >= 1000
    assert 1000 <= period <= 1_000_000
    assert millicores_of(quota, period) == millicores
    assert parse_cpu_max(format_cpu_max(quota, period)) == (quota, period)


def test_cpu_quota_rejects_what_the_kernel_would() -> None:
    with pytest.raises(ValueError, match="at least 1m"):
        cpu_quota(0)
    with pytest.raises(ValueError, match="period"):
        cpu_quota(500, period_us=500)


def test_cpu_max_formats() -> None:
    assert format_cpu_max(50_000, 100_000) == "50000 100000"
    assert format_cpu_max(None, 100_000) == "max 100000"
    assert parse_cpu_max("max 100000\n") == (None, 100_000)
    assert millicores_of(None, 100_000) is None
    assert millicores_of(-1, 100_000) is None  # v1 cfs_quota_us reads -1 when unlimited
    with pytest.raises(ValueError, match=r"cpu\.max"):
        parse_cpu_max("50000")


# --- memory, events, stat files ---------------------------------------------------------


def test_parse_keyed_reads_memory_stat_and_events() -> None:
    stat = parse_keyed(V2_MEMORY_STAT)
    assert stat["anon"] == 1_056_768
    assert stat["inactive_file"] == 2_678_784
    assert len(stat) == 12
    assert parse_keyed(V2_MEMORY_EVENTS)["oom_kill"] == 1
    assert parse_keyed(V1_OOM_CONTROL) == {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3}
    assert parse_keyed(V2_CPU_STAT)["usage_usec"] == 201_345


def test_parse_keyed_skips_lines_that_are_not_key_integer() -> None:
    text = "some avg10=0.00 avg60=0.00 total=0\nnr_periods 4\nweird x\n\nthree fields here\n"
    assert parse_keyed(text) == {"nr_periods": 4}


def test_working_set_subtracts_inactive_file_cache() -> None:
    v2 = parse_keyed(V2_MEMORY_STAT)
    assert working_set(10_000_000, v2, v1=False) == 10_000_000 - 2_678_784
    v1 = parse_keyed(V1_MEMORY_STAT)
    assert working_set(10_000_000, v1, v1=True) == 10_000_000 - 2_097_152  # total_, not local
    assert working_set(1000, v1, v1=True) == 0  # never negative


def test_limit_files() -> None:
    assert parse_limit("max\n") is None
    assert parse_limit("67108864\n") == 64 << 20
    assert parse_v1_memory_limit("9223372036854771712\n") is None  # v1 "unlimited"
    assert parse_v1_memory_limit("67108864\n") == 64 << 20
    assert parse_pids("12\n345\n") == [12, 345]
    assert parse_pids("") == []


def test_proc_cgroup_on_a_hybrid_host() -> None:
    text = (
        "9:name=systemd:/\n8:pids:/nova/containers/c1\n4:memory:/nova/containers/c1\n"
        "2:cpu,cpuacct:/nova/containers/c1\n0::/user.slice\n"
    )
    where = parse_proc_cgroup(text)
    assert where["memory"] == where["cpu"] == where["cpuacct"] == "/nova/containers/c1"
    assert where["name=systemd"] == "/"
    assert where[""] == "/user.slice"


# --- detection ----------------------------------------------------------------------------


def test_hybrid_host_uses_v1_for_every_limit_controller() -> None:
    layout = choose_layout(parse_mountinfo(HYBRID))
    assert layout.version == 1
    assert layout.v1_mounts == {
        "cpu": "/sys/fs/cgroup/cpu",
        "cpuacct": "/sys/fs/cgroup/cpuacct",
        "memory": "/sys/fs/cgroup/memory",
        "pids": "/sys/fs/cgroup/pids",
    }
    assert layout.v2_mount == "/sys/fs/cgroup/unified"
    cgroups = Cgroups.detect("nova", mountinfo=HYBRID)
    assert isinstance(cgroups, CgroupsV1)
    assert cgroups.version == 1
    assert cgroups.available() == {"cpu", "cpuacct", "memory", "pids"}
    assert cgroups.root_paths == (
        "/sys/fs/cgroup/cpu/nova",
        "/sys/fs/cgroup/cpuacct/nova",
        "/sys/fs/cgroup/memory/nova",
        "/sys/fs/cgroup/pids/nova",
    )


def test_unified_host_uses_v2() -> None:
    cgroups = Cgroups.detect("nova", mountinfo=UNIFIED)
    assert isinstance(cgroups, CgroupsV2)
    assert cgroups.root_paths == ("/sys/fs/cgroup/nova",)
    assert cgroups.container("c1").paths == ("/sys/fs/cgroup/nova/containers/c1",)


def test_co_mounted_controllers_share_one_tree() -> None:
    cgroups = Cgroups.detect("nova", mountinfo=CO_MOUNTED)
    assert isinstance(cgroups, CgroupsV1)
    assert cgroups.mounts["cpu"] == cgroups.mounts["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert cgroups.root_paths == (
        "/sys/fs/cgroup/cpu,cpuacct/nova",
        "/sys/fs/cgroup/memory/nova",
        "/sys/fs/cgroup/pids/nova",
    )


def test_one_v1_limit_controller_is_enough_to_mean_v1() -> None:
    text = UNIFIED + "40 24 0:40 / /cg/memory rw - cgroup cgroup rw,memory\n"
    layout = choose_layout(parse_mountinfo(text))
    assert layout.version == 1
    assert layout.v1_mounts == {"memory": "/cg/memory"}


def test_v1_hierarchies_without_limit_controllers_do_not_count() -> None:
    text = (
        "40 24 0:40 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        "41 24 0:41 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n"
        "42 24 0:42 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    assert isinstance(Cgroups.detect(mountinfo=text), CgroupsV2)


def test_mountinfo_escapes_and_first_mount_wins() -> None:
    text = (
        "50 24 0:50 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n"
        "51 24 0:50 / /mnt/again rw - cgroup2 cgroup2 rw\n"
        "garbage line without separator\n"
    )
    mounts = parse_mountinfo(text)
    assert [m.mount_point for m in mounts] == ["/mnt/my cgroups", "/mnt/again"]
    assert choose_layout(mounts).v2_mount == "/mnt/my cgroups"


def test_no_cgroup_filesystem_is_a_typed_error() -> None:
    text = "22 28 0:21 / /sys rw,nosuid - sysfs sysfs rw\n"
    with pytest.raises(NoCgroupFilesystem, match="no cgroup2 mount") as caught:
        Cgroups.detect(mountinfo=text)
    assert isinstance(caught.value, OSError)
    assert caught.value.errno == errno.ENODEV


def test_root_name_is_configurable_and_may_nest() -> None:
    cgroups = Cgroups.detect("system.slice/nova.service/payload", mountinfo=UNIFIED)
    assert cgroups.root_paths == ("/sys/fs/cgroup/system.slice/nova.service/payload",)


# --- names, limits, errors ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../etc", "-x", "a b", "x" * 129])
def test_unsafe_container_ids_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid cgroup container id"):
        check_name(name)


@pytest.mark.parametrize("root", ["", "/nova", "nova/", "nova/../x", "a//b"])
def test_unsafe_root_names_are_refused(root: str) -> None:
    with pytest.raises(ValueError, match="invalid cgroup root name"):
        check_root_name(root)


def test_container_ids_as_the_agent_makes_them() -> None:
    assert check_name("3f2a9c0d1e4b") == "3f2a9c0d1e4b"
    assert Cgroups.detect(mountinfo=HYBRID).container("web-1.a_b").id == "web-1.a_b"


def test_limits_validate_and_name_their_controllers() -> None:
    assert Limits().wanted() == []
    assert Limits(memory_bytes=1, cpu_millicores=500, pids_max=4).wanted() == [
        "cpu",
        "memory",
        "pids",
    ]
    with pytest.raises(ValueError, match="pids_max must be at least 1"):
        Limits(pids_max=0)


def test_limits_for_run_add_the_worker_overhead() -> None:
    spec = RunSpec(id="c1", name="web", digest="sha256:x", artifact="", memory_bytes=32 << 20)
    limits = limits_for_run(spec, cpu_millicores=500)
    assert limits.memory_bytes == (32 << 20) + WORKER_MEMORY_OVERHEAD
    assert limits.cpu_millicores == 500
    assert limits.pids_max is not None
    unlimited = RunSpec(id="c2", name="web", digest="sha256:x", artifact="")
    assert limits_for_run(unlimited, pids_max=None) == Limits()


def test_errors_name_the_path_and_the_os_reason() -> None:
    error = CgroupError("write '0' to", "/sys/fs/cgroup/pids/nova/c1/cgroup.procs", errno.ENOENT)
    assert str(error) == (
        "cannot write '0' to /sys/fs/cgroup/pids/nova/c1/cgroup.procs: No such file or directory"
    )
    assert isinstance(error, OSError)  # the worker's start path fails closed on OSError
    assert error.errno == errno.ENOENT
    assert error.path == "/sys/fs/cgroup/pids/nova/c1/cgroup.procs"
    busy = CgroupBusy("/x", "2 process(es) still in it 5s after SIGKILL")
    assert busy.errno == errno.EBUSY
    assert str(busy) == "cannot remove /x: 2 process(es) still in it 5s after SIGKILL"
    missing = ControllerUnavailable("memory", "/y", "not offered")
    assert missing.controller == "memory"
    assert str(missing) == "cannot use the memory controller at /y: not offered"
