"""Every container in its own cgroup, through the real agent and daemonless `nova run`.

As root, with real workers and the host's real cgroups (v1 here). Each test's
cgroups live under a root of its own (`nova-test-<hex>`, NOVA_CGROUP_ROOT,
from the `nova_dirs` fixture); the `cgroups_left` fixture fails the test if
Nova left any container cgroup behind, and `nova_dirs` then removes the root.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from agent.isolation.cgroups import Cgroups, Limits, NoCgroupFilesystem
from agent.isolation.cgroups.base import proc_cgroup
from nova import paths
from nova.store import keys, open_store
from tests.conftest import owned_cgroups, process_alive
from tests.unit.test_agent import AgentProcess, StartAgent, container, wait_for
from tests.unit.test_cli import NOVA, nova

MiB = 1 << 20
NOVA_RUN = [*NOVA, "run"]
CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")


def _why_no_cgroups() -> str | None:
    if os.geteuid() != 0:
        return "container cgroups need root (run tests/linux as root)"
    try:
        available = Cgroups.detect("nova").available()
    except NoCgroupFilesystem as exc:
        return f"no cgroup filesystem: {exc}"
    missing = [c for c in ("cpu", "memory", "pids") if c not in available]
    return f"this host gives Nova no {', '.join(missing)} controller" if missing else None


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(_why_no_cgroups() is not None, reason=_why_no_cgroups() or ""),
    pytest.mark.usefixtures("cgroups_left"),
]

# A guest the wasm memory cap cannot hold: table elements live in host memory,
# outside linear memory. Growing a funcref table by 256 Mi entries asks for 2 GiB.
TABLE_GROW_WAT = """
(module
  (memory (export "memory") 1)
  (table $t 0 funcref)
  (func (export "_start") (local $i i32)
    (loop $grow
      (if (i32.eq (table.grow $t (ref.null func) (i32.const 1048576)) (i32.const -1))
        (then unreachable))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $grow (i32.lt_u (local.get $i) (i32.const 256))))))
"""

# Forks (as a process in the container's cgroup would) until the kernel refuses.
FORKS = """\
import os, sys, time
sys.stdin.readline()
kids = []
while True:
    try:
        pid = os.fork()
    except OSError as exc:
        print(exc.errno, len(kids), flush=True)
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
sys.stdin.readline()
"""


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def cgroups_left(nova_dirs: Path, no_leftover_processes: None) -> Iterator[None]:
    """After the test (its agents ended, its runs done): Nova removed every container cgroup."""
    root = os.environ["NOVA_CGROUP_ROOT"]
    yield
    assert owned_cgroups(root) == set(), f"container cgroups left under {root}"


@pytest.fixture(autouse=True)
def shared_module_cache(
    nova_dirs: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOVA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "module-cache"))


@pytest.fixture
def start_agent(nova_dirs: Path) -> Iterator[StartAgent]:
    """Start agents on this test's dirs and cgroup root; each ends (SIGTERM) after the test."""
    agents: list[AgentProcess] = []

    def start(*extra: str) -> AgentProcess:
        agent = AgentProcess(nova_dirs, *extra)
        agents.append(agent)
        return agent.wait_ready()

    yield start
    for agent in agents:
        agent.end()


@pytest.fixture
def agent(start_agent: StartAgent) -> AgentProcess:
    return start_agent()


@pytest.fixture(scope="module")
def table_grow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wasm") / "table-grow.wasm"
    path.write_bytes(wasmtime.wat2wasm(TABLE_GROW_WAT))
    return path


def cgroups() -> Cgroups:
    """This test's cgroup root (what the agent and `nova run` use)."""
    return Cgroups.detect(os.environ["NOVA_CGROUP_ROOT"])


def in_cgroup(pid: int, container_id: str) -> bool:
    """/proc/PID/cgroup names the container's cgroup in every hierarchy."""
    where = proc_cgroup(pid)
    want = f"/{os.environ['NOVA_CGROUP_ROOT']}/containers/{container_id}"
    return all(where.get(controller) == want for controller in CONTROLLERS)


def stored_records() -> list[dict[str, Any]]:
    """Container records in the local state, as daemonless runs write them."""

    async def read() -> list[dict[str, Any]]:
        async with open_store(str(paths.store_path())) as store:
            entries = await store.list(keys.containers_on(socket.gethostname()))
            return [entry.json() for entry in entries]

    return asyncio.run(read())


def usage(record: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = record["status"]["extra"]["usage"]
    return found


def container_cpu(record: dict[str, Any]) -> float:
    """CPU seconds the container used: its cgroup's, minus the worker's own warm-up."""
    extra = record["status"]["extra"]
    return float(extra["usage"]["cpu_seconds"]) - float(extra.get("idle_cpu_seconds", 0.0))


# --- limits hold ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["agent", "daemonless"])
def test_cpu_quota_holds_cpu_spin_to_its_share(
    mode: str, start_agent: StartAgent, examples: Path
) -> None:
    """--cpu 200m on a 1 s busy loop gives about 0.2 CPU-seconds, read back from the
    container's cgroup into its record; no quota gives much more.

    The ceiling must hold on every try; other load on a shared 2-core VM can only
    lower both numbers, so the floors get up to three tries (as in test_cgroups).
    """
    if mode == "agent":
        start_agent()

    def spin(*flags: str) -> float:
        before = {r["id"] for r in stored_records()}
        result = nova("run", *flags, examples / "cpu-spin.wasm", "1")
        assert result.returncode == 0, result.stderr
        [record] = [r for r in stored_records() if r["id"] not in before]
        assert record["spec"]["isolation"] == "cgroup"
        assert record["id"] not in owned_cgroups(os.environ["NOVA_CGROUP_ROOT"])
        return container_cpu(record)

    tries = []
    for _ in range(3):
        limited, free = spin("--cpu", "200m"), spin()
        tries.append((limited, free))
        print(f"\n{mode}: 200m -> {limited:.3f} cpu-s, unlimited -> {free:.3f}")
        assert limited <= 0.35, tries  # 1.0 s spans at most 12 periods of 20 ms, plus slack
        if limited >= 0.1 and free >= 0.6 and free > 2.5 * limited:
            break
    else:
        pytest.fail(f"the host was too busy to tell quota from no quota: {tries}")


def test_oom_kill_through_the_agent_is_reported_as_oomkilled(
    agent: AgentProcess, table_grow: Path
) -> None:
    """A guest growing host memory past its cgroup limit (--memory 16Mi + 64Mi for the
    worker) is killed by the kernel: OOMKilled, exit 137, the limit named."""
    result = nova("run", "--name", "hog", "--memory", "16Mi", table_grow)
    assert result.returncode == 137, result.stderr
    assert result.stderr == (
        "nova: container hog oomkilled: exceeded its memory limit of 80Mi "
        "(--memory 16Mi plus 64Mi for the worker process) and was killed by the kernel\n"
    )
    record = container("hog")
    assert (record["status"]["reason"], record["status"]["exit_code"]) == ("OOMKilled", 137)
    assert usage(record)["oom_kills"] >= 1
    assert usage(record)["memory_peak_bytes"] <= 80 * MiB
    assert record["id"] not in owned_cgroups(os.environ["NOVA_CGROUP_ROOT"])


def test_oom_kill_daemonless_is_reported_as_oomkilled(table_grow: Path) -> None:
    """Daemonless, the worker is a child of `nova run`, which stays outside the cgroup,
    sees the kernel's SIGKILL, reports OOMKilled, exits 137 and removes the cgroup."""
    result = nova("run", "--no-agent", "--name", "hog", "--memory", "16Mi", table_grow)
    assert result.returncode == 137, result.stderr
    assert "nova: container hog oomkilled: exceeded its memory limit of 80Mi" in result.stderr
    [record] = stored_records()
    assert (record["state"], record["status"]["reason"]) == ("exited", "OOMKilled")
    assert usage(record)["oom_kills"] >= 1


@pytest.mark.parametrize("mode", ["agent", "daemonless"])
def test_linear_memory_past_its_cap_still_reports_through_wasm(
    mode: str, start_agent: StartAgent, examples: Path
) -> None:
    """mem-grow beyond --memory fails inside the guest (the wasm cap is lower than the
    cgroup's): exit 3 and 'reached its memory limit', not an OOM kill."""
    if mode == "agent":
        start_agent()
    result = nova("run", "--memory", "32Mi", examples / "mem-grow.wasm", "256")
    assert result.returncode == 3, result.stderr
    assert "(the container reached its memory limit)" in result.stderr
    [record] = stored_records()
    assert record["status"]["reason"] == "Exited"
    assert usage(record)["oom_kills"] == 0


def test_pids_limit_holds_for_everything_in_the_container(
    agent: AgentProcess, examples: Path
) -> None:
    """--pids 6 caps the worker's threads plus anything else in its cgroup: a process
    put in there forks until the kernel says EAGAIN at 6 tasks in all."""
    result = nova("run", "-d", "--name", "capped", "--pids", "6", examples / "sleep.wasm", "60")
    assert result.returncode == 0, result.stderr
    record = container("capped")
    box = cgroups().container(record["id"])
    assert box.read_limits().pids_max == 6
    assert record["limits"]["pids_max"] == 6
    child = subprocess.Popen(
        [sys.executable, "-c", FORKS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        box.attach(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        code, forked = (int(word) for word in child.stdout.readline().split())
        assert code == errno.EAGAIN
        threads = len(os.listdir(f"/proc/{record['pid']}/task"))
        assert threads + 1 + forked == 6  # the worker's threads, the child, its forks
        assert box.usage().pids == 6
    finally:
        stop = nova("stop", "capped")  # destroys the cgroup: the child and its forks die
        assert stop.returncode == 0, stop.stderr
        child.kill()
        child.wait()
    assert not box.exists()


# --- the worker is inside; the cgroup lives exactly as long as the container ------------------


def test_worker_runs_in_its_cgroup_with_its_limits_and_it_goes_at_stop(
    agent: AgentProcess, examples: Path
) -> None:
    result = nova(
        "run", "-d", "--name", "boxed", "--memory", "32Mi", "--cpu", "500m",
        examples / "sleep.wasm", "60",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = container("boxed")
    assert record["isolation"] == "cgroup"
    assert in_cgroup(record["pid"], record["id"])
    assert not in_cgroup(agent.proc.pid, record["id"])
    box = cgroups().container(record["id"])
    assert box.read_limits() == Limits(memory_bytes=96 * MiB, cpu_millicores=500, pids_max=64)
    assert box.pids() == [record["pid"]]

    stop = nova("stop", "boxed")
    assert stop.returncode == 0, stop.stderr
    assert not box.exists()  # gone by the time `nova stop` returns
    final = container("boxed")
    assert final["status"]["reason"] == "Stopped"
    assert usage(final)["cpu_seconds"] > 0
    assert usage(final)["memory_peak_bytes"] > 0


def test_cgroup_is_gone_when_a_container_exits(agent: AgentProcess, examples: Path) -> None:
    result = nova("run", "--name", "hi", examples / "hello.wasm")
    assert (result.returncode, result.stdout) == (0, "hello from wasm, world\n")
    record = container("hi")
    assert not cgroups().container(record["id"]).exists()
    assert usage(record)["oom_kills"] == 0
    assert record["status"]["extra"]["idle_cpu_seconds"] > 0


def test_daemonless_worker_is_a_child_in_the_cgroup_and_its_parent_is_not(
    examples: Path,
) -> None:
    """`nova run` (no agent) forks the worker into the cgroup and supervises it from outside."""
    run = subprocess.Popen(
        [
            *NOVA_RUN,
            "--no-agent",
            "--memory",
            "32Mi",
            "--cpu",
            "500m",
            examples / "sleep.wasm",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for("the run's record", lambda: bool(stored_records()))
        [record] = stored_records()
        assert record["state"] == "running"
        wait_for("the worker to join", lambda: in_cgroup(record["pid"], record["id"]))
        assert record["pid"] != run.pid
        assert not in_cgroup(run.pid, record["id"])
        box = cgroups().container(record["id"])
        assert box.read_limits() == Limits(memory_bytes=96 * MiB, cpu_millicores=500, pids_max=64)
        out, err = run.communicate(timeout=30)
    finally:
        run.kill()
        run.wait()
    assert (run.returncode, out, err) == (0, "slept 2\n", "")
    assert not box.exists()
    [final] = stored_records()
    assert (final["state"], final["status"]["reason"]) == ("exited", "Exited")
    assert usage(final)["memory_peak_bytes"] > 0


def test_daemonless_timeout_watchdog_removes_the_cgroup(examples: Path) -> None:
    """A guest blocked in a host call past --timeout: the worker's watchdog ends it (124)
    and the supervisor still removes the cgroup."""
    result = nova("run", "--no-agent", "--timeout", "0.5s", examples / "sleep.wasm", "30")
    assert result.returncode == 124, result.stderr
    [record] = stored_records()
    assert record["status"]["reason"] == "Timeout"
    assert record["id"] not in owned_cgroups(os.environ["NOVA_CGROUP_ROOT"])


def test_daemonless_ctrl_c_stops_even_a_spinning_guest(examples: Path) -> None:
    """Ctrl-C (SIGINT to the terminal's process group): the supervisor ends the worker,
    which never sees its own SIGINT while it runs wasm, and removes the cgroup."""
    run = subprocess.Popen(
        [*NOVA_RUN, "--no-agent", "--name", "spin", examples / "cpu-spin.wasm"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for("the worker to start", lambda: bool(stored_records()))
        [record] = stored_records()
        wait_for("the worker to join", lambda: in_cgroup(record["pid"], record["id"]))
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=10)
    finally:
        run.kill()
        run.wait()
    assert (run.returncode, err) == (130, "nova: container spin stopped: interrupted\n")
    assert record["id"] not in owned_cgroups(os.environ["NOVA_CGROUP_ROOT"])


def test_daemonless_run_killed_with_its_supervisor_is_settled_by_the_next_agent(
    start_agent: StartAgent, examples: Path
) -> None:
    """SIGKILL of `nova run` takes its worker along (PR_SET_PDEATHSIG); the cgroup it
    could not remove is an orphan the next agent settles from the record."""
    run = subprocess.Popen([*NOVA_RUN, "--no-agent", examples / "sleep.wasm", "60"])
    try:
        wait_for("the worker to start", lambda: bool(stored_records()))
        [record] = stored_records()
        wait_for("the worker to join", lambda: in_cgroup(record["pid"], record["id"]))
    finally:
        run.kill()
        run.wait()
    wait_for("the worker to die with it", lambda: not process_alive(record["pid"]))
    assert record["id"] in owned_cgroups(os.environ["NOVA_CGROUP_ROOT"])
    start_agent()
    assert record["id"] not in owned_cgroups(os.environ["NOVA_CGROUP_ROOT"])
    [settled] = stored_records()
    assert (settled["state"], settled["status"]["reason"]) == ("exited", "Killed")
    assert usage(settled)["oom_kills"] == 0


@pytest.mark.parametrize("mode", ["agent", "daemonless"])
def test_isolation_none_runs_without_limits(
    mode: str, start_agent: StartAgent, examples: Path
) -> None:
    if mode == "agent":
        start_agent()
    result = nova("run", "--isolation", "none", "--name", "bare", examples / "hello.wasm")
    assert result.returncode == 0, result.stderr
    [record] = stored_records()
    assert record["spec"]["isolation"] == "none"
    if mode == "daemonless":  # no cgroup at all, so no usage either
        assert "usage" not in record["status"]["extra"]


def test_cpu_and_pids_with_isolation_none_is_a_usage_error(examples: Path) -> None:
    result = nova("run", "--isolation", "none", "--cpu", "1", examples / "hello.wasm")
    assert result.returncode == 2
    assert "--isolation none" in result.stderr


# --- crash safety -----------------------------------------------------------------------------


def test_restart_after_sigkill_removes_orphans_and_keeps_adopted_cgroups(
    start_agent: StartAgent, examples: Path
) -> None:
    """SIGKILL the agent; while it is down one container is killed and its idle workers
    exit. The restarted agent adopts the survivor (its cgroup stays, it still sits in
    it), settles the dead one (cgroup removed, usage recorded) and removes the cgroups
    no record claims: the dead agent's idle workers', and one holding a process Nova
    never recorded (a start cut short by the crash), whose process it kills."""
    first = start_agent()
    for name in ("keep", "doomed"):
        result = nova("run", "-d", "--name", name, examples / "sleep.wasm", "60")
        assert result.returncode == 0, result.stderr
    keep, doomed = container("keep"), container("doomed")
    idle_before = owned_cgroups(os.environ["NOVA_CGROUP_ROOT"]) - {keep["id"], doomed["id"]}
    assert len(idle_before) == 2  # the pool's workers sit in their future containers' cgroups

    assert first.end(signal.SIGKILL) == -signal.SIGKILL
    os.kill(doomed["pid"], signal.SIGKILL)
    wait_for("the doomed worker to die", lambda: not process_alive(doomed["pid"]))
    unrecorded = cgroups().create("0123456789ab")
    stray = subprocess.Popen(["sleep", "60"])
    unrecorded.attach(stray.pid)

    try:
        start_agent()
        assert stray.wait(timeout=10) == -signal.SIGKILL
    finally:
        stray.kill()
        stray.wait()
    owned = owned_cgroups(os.environ["NOVA_CGROUP_ROOT"])
    assert keep["id"] in owned and in_cgroup(keep["pid"], keep["id"])
    assert doomed["id"] not in owned
    assert not owned & idle_before
    assert not unrecorded.exists()
    settled = container("doomed")
    assert (settled["state"], settled["status"]["reason"]) == ("exited", "Killed")
    assert usage(settled)["oom_kills"] == 0

    stop = nova("stop", "keep")
    assert stop.returncode == 0, stop.stderr
    assert keep["id"] not in owned_cgroups(os.environ["NOVA_CGROUP_ROOT"])


def test_agent_shutdown_removes_its_idle_workers_cgroups(start_agent: StartAgent) -> None:
    agent = start_agent()
    wait_for("the pool's cgroups", lambda: len(owned_cgroups(os.environ["NOVA_CGROUP_ROOT"])) == 2)
    assert agent.end() == 0
    assert owned_cgroups(os.environ["NOVA_CGROUP_ROOT"]) == set()
