"""How sandboxes use cgroups, without a kernel: the spec's new fields, the run's
limits, OOM translation, the prepare hook's choices, isolation resolution, and
the one-line notices when limits cannot be enforced."""

from __future__ import annotations

from typing import Any, cast

import pytest

from agent.isolation.cgroups import Cgroups, Limits, Usage
from agent.isolation.cgroups.hook import DEFAULT_PIDS_MAX
from agent.sandbox.cgroups import (
    IDLE_LIMITS,
    PrepareHook,
    oom_message,
    run_limits,
    settle_status,
)
from agent.sandbox.runtime import SandboxRuntime
from agent.sandbox.spec import ExitReason, ExitStatus, Isolation, RunSpec
from nova import errors
from nova.cli import commands, daemonless

MiB = 1 << 20


def spec(**kw: Any) -> RunSpec:
    fields: dict[str, Any] = {"id": "c1", "name": "web", "digest": "sha256:x", "artifact": ""}
    return RunSpec(**{**fields, **kw})


def test_run_spec_round_trips_limits_and_isolation() -> None:
    original = spec(
        memory_bytes=32 * MiB, cpu_millicores=250, pids_max=8, isolation=Isolation.CGROUP
    )
    data = original.to_json()
    assert (data["cpu_millicores"], data["pids_max"], data["isolation"]) == (250, 8, "cgroup")
    assert RunSpec.from_json(data) == original


def test_records_from_before_isolation_read_as_none() -> None:
    data = spec().to_json()
    for field in ("cpu_millicores", "pids_max", "isolation"):
        del data[field]
    old = RunSpec.from_json(data)
    assert (old.cpu_millicores, old.pids_max, old.isolation) == (None, None, Isolation.NONE)


def test_users_ask_for_auto_or_none_only() -> None:
    assert Isolation.parse("auto") is Isolation.AUTO
    assert Isolation.parse("none") is Isolation.NONE
    with pytest.raises(errors.UsageError, match="expected auto or none"):
        Isolation.parse("cgroup")  # what the runtime resolves to, not a choice


def test_run_limits_add_the_worker_overhead_and_a_default_pids_cap() -> None:
    boxed = spec(memory_bytes=32 * MiB, cpu_millicores=500, isolation=Isolation.CGROUP)
    assert run_limits(boxed) == Limits(
        memory_bytes=96 * MiB, cpu_millicores=500, pids_max=DEFAULT_PIDS_MAX
    )
    assert run_limits(spec(pids_max=8, isolation=Isolation.CGROUP)).pids_max == 8
    assert run_limits(spec(isolation=Isolation.CGROUP)) == IDLE_LIMITS  # nothing to relabel
    assert run_limits(spec(memory_bytes=MiB, isolation=Isolation.NONE)) == Limits()


def test_an_unreported_death_with_an_oom_kill_is_oomkilled() -> None:
    boxed = spec(memory_bytes=16 * MiB, isolation=Isolation.CGROUP)
    died = ExitStatus.for_reason(ExitReason.KILLED, "the worker process died", entry_ns=5)
    usage = Usage(cpu_seconds=0.5, memory_peak_bytes=80 * MiB, oom_kills=1)
    status = settle_status(boxed, died, usage)
    assert (status.reason, status.exit_code, status.entry_ns) == (
        ExitReason.OOM_KILLED,
        errors.EXIT_KILLED,
        5,
    )
    assert status.describe() == (
        "oomkilled: exceeded its memory limit of 80Mi (--memory 16Mi plus 64Mi for the "
        "worker process) and was killed by the kernel"
    )
    assert status.extra["usage"] == {
        "cpu_seconds": 0.5,
        "cpu_throttled_seconds": None,
        "memory_peak_bytes": 80 * MiB,
        "oom_kills": 1,
    }


def test_other_ends_keep_their_reason_and_gain_usage() -> None:
    boxed = spec(isolation=Isolation.CGROUP)
    usage = Usage(cpu_seconds=0.1, oom_kills=0)
    exited = ExitStatus(reason=ExitReason.EXITED, exit_code=0, extra={"received_ns": 1})
    settled = settle_status(boxed, exited, usage)
    assert (settled.reason, settled.extra["received_ns"]) == (ExitReason.EXITED, 1)
    assert settled.extra["usage"]["cpu_seconds"] == 0.1
    killed = ExitStatus.for_reason(ExitReason.KILLED, "the worker process died")
    assert settle_status(boxed, killed, usage).reason is ExitReason.KILLED  # no OOM counted
    stopped = ExitStatus.for_reason(ExitReason.STOPPED, "stopped on request")
    oom = Usage(oom_kills=1)
    assert settle_status(boxed, stopped, oom).reason is ExitReason.STOPPED  # we killed it
    assert settle_status(boxed, exited, None) is exited  # no cgroup usage: unchanged


def test_oom_without_a_memory_limit_blames_the_host() -> None:
    assert "the host ran out of memory" in oom_message(spec(isolation=Isolation.CGROUP))


class FakeBox:
    def __init__(self, calls: list[tuple[str, Any]], inside: bool) -> None:
        self.calls, self.inside = calls, inside

    def create(self, limits: Limits) -> None:
        self.calls.append(("create", limits))

    def contains(self, pid: int = 0) -> bool:
        self.calls.append(("contains", pid))
        return self.inside

    def attach(self, pid: int) -> None:
        self.calls.append(("attach", pid))


class FakeCgroups:
    def __init__(self, inside: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.inside = inside

    def container(self, container_id: str) -> FakeBox:
        self.calls.append(("container", container_id))
        return FakeBox(self.calls, self.inside)


def test_prepare_hook_joins_only_cgroup_runs_and_trusts_its_fork_time_join() -> None:
    fake = FakeCgroups()
    hook = PrepareHook(cast(Cgroups, fake))
    hook(spec(isolation=Isolation.NONE))
    assert fake.calls == []
    hook(spec(id="c1", isolation=Isolation.CGROUP))
    assert fake.calls == [("container", "c1"), ("contains", 0), ("attach", 0)]
    fake.calls.clear()
    hook.joined = "c1"  # the zygote's child attached itself at the fork
    hook(spec(id="c1", isolation=Isolation.CGROUP))
    assert fake.calls == []
    hook(spec(id="c2", isolation=Isolation.CGROUP))  # any other container: checked, moved
    assert fake.calls == [("container", "c2"), ("contains", 0), ("attach", 0)]


def test_prepare_hook_for_daemonless_runs_makes_the_cgroup_first() -> None:
    fake = FakeCgroups(inside=True)
    boxed = spec(memory_bytes=8 * MiB, isolation=Isolation.CGROUP)
    PrepareHook(cast(Cgroups, fake), create=True)(boxed)
    assert fake.calls == [("container", "c1"), ("create", run_limits(boxed)), ("contains", 0)]


def test_a_runtime_without_cgroups_resolves_auto_to_none(tmp_path: Any) -> None:
    runtime = SandboxRuntime(str(tmp_path), use_zygote=False)
    assert runtime.resolve_isolation(Isolation.AUTO) is Isolation.NONE
    assert runtime.resolve_isolation(Isolation.NONE) is Isolation.NONE
    with pytest.raises(errors.SandboxError, match="needs root"):
        runtime.resolve_isolation(Isolation.CGROUP)


def test_daemonless_non_root_notice_only_when_limits_need_cgroups(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert daemonless._host_cgroups(spec(memory_bytes=MiB)) is None
    assert capsys.readouterr().err == ""  # the wasm memory cap holds without cgroups
    assert daemonless._host_cgroups(spec(cpu_millicores=500, pids_max=4)) is None
    assert capsys.readouterr().err == (
        "nova: --cpu and --pids need cgroups, which need root: running without them "
        "(--isolation none; only the wasm limits hold)\n"
    )
    assert daemonless._host_cgroups(spec(isolation=Isolation.NONE, cpu_millicores=1)) is None
    assert capsys.readouterr().err == ""


def test_agent_without_cgroups_notice(capsys: pytest.CaptureFixture[str]) -> None:
    commands._cgroup_notice({"cpu": "500m"}, {"isolation": "none"})
    assert capsys.readouterr().err.startswith(
        "nova: --cpu needs cgroups, and the agent runs without them"
    )
    commands._cgroup_notice({"cpu": "500m"}, {"isolation": "cgroup"})
    commands._cgroup_notice({"memory": 1}, {"isolation": "none"})
    assert capsys.readouterr().err == ""
