"""`nova-agent --standalone` with the real `nova` CLI: socket, warm pool, workers.

Every test starts real agents as subprocesses on dirs under tmp_path, talks to
them through the `nova` console script (and the raw socket for /metrics), and
ends them; `no_leftover_processes` proves no zygote, worker or agent remains.
The restart tests are the promise operators rely on: stopping or killing the
agent never kills a container, and a new agent adopts it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.main import parse_address
from nova import errors, paths
from tests.conftest import process_alive
from tests.unit.test_cli import NOVA, console_script, nova, nova_many, one_error_line

pytestmark = pytest.mark.usefixtures("nova_dirs", "shared_module_cache", "no_leftover_processes")

NOVA_AGENT = console_script("nova-agent", "agent.main")
READY_TIMEOUT_S = 30.0
# Agents here share the host's network namespace, where the kernel's policy state (the
# `nova` tables, filters on nvh* links) is one per host; tests/linux runs policy-enabled
# agents in a namespace of their own.
POLICY_OFF = ("--policy-backend", "none")
EXIT_TIMEOUT_S = 15.0


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


class AgentProcess:
    """One `nova-agent --standalone` subprocess; its log is kept in a file."""

    def __init__(self, dirs: Path, *extra: str) -> None:
        self.socket = dirs / "agent.sock"
        self.log = dirs / f"agent-{time.monotonic_ns()}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*NOVA_AGENT, "--standalone", "--pool-size", "2", *POLICY_OFF, *extra],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> AgentProcess:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not paths.socket_answers(self.socket):
            if self.proc.poll() is not None:
                pytest.fail(f"nova-agent exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"nova-agent not ready after {READY_TIMEOUT_S:g}s:\n{self.output()}")
            time.sleep(0.02)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def end(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig`, wait for the agent to exit (SIGKILL past a deadline); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"nova-agent ignored signal {sig} for {EXIT_TIMEOUT_S:g}s")
        return self.proc.returncode


StartAgent = Callable[..., AgentProcess]


@pytest.fixture
def start_agent(nova_dirs: Path, no_leftover_processes: None) -> Iterator[StartAgent]:
    """Start agents on this test's dirs (ready when the socket answers); all end after it."""
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


def ps(*flags: str) -> list[dict[str, Any]]:
    result = nova("ps", "--json", *flags)
    assert result.returncode == 0, result.stderr
    records: list[dict[str, Any]] = json.loads(result.stdout)
    return records


async def api(method: str, path: str, **kw: Any) -> tuple[int, str]:
    """One raw request to the agent's API on its unix socket."""
    connector = aiohttp.UnixConnector(path=str(paths.socket_path()))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, f"http://nova-agent{path}", **kw) as response,
    ):
        return response.status, await response.text()


def listing() -> list[dict[str, Any]]:
    """Every record, straight from the API (what `nova ps -a --json` prints; cheap to poll)."""
    status, body = asyncio.run(api("GET", "/v1/containers?all=1"))
    assert status == 200, body
    records: list[dict[str, Any]] = json.loads(body)
    return records


def container(name: str) -> dict[str, Any]:
    """The newest record named `name` (exited ones included)."""
    matches = [r for r in listing() if r["name"] == name]
    assert matches, f"no container {name!r} in {listing()}"
    return max(matches, key=lambda r: float(r["created_at"]))


def detach(name: str, app: Path, *args: str) -> int:
    """`nova run -d --name NAME APP ARGS`; the container's pid."""
    result = nova("run", "-d", "--name", name, app, *args)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{name}\n", "")
    return int(container(name)["pid"])


# -- nova run through the agent -------------------------------------------------


@pytest.mark.usefixtures("agent")
def test_run_through_the_agent_prints_output_and_exit_code(examples: Path) -> None:
    hello, code, trap, spin = nova_many(
        ["run", "--name", "hi", examples / "hello.wasm", "-e", "NAME=nova", "--", "a b"],
        ["run", examples / "exit.wasm", "7"],
        ["run", examples / "trap.wasm"],
        ["run", "--timeout", "300ms", examples / "cpu-spin.wasm"],
    )
    assert (hello.returncode, hello.stderr) == (0, "")
    assert hello.stdout == "hello from wasm, nova\narg[1]=a b\n"
    assert (code.returncode, code.stdout, code.stderr) == (7, "", "")
    assert trap.returncode == errors.EXIT_TRAP
    assert trap.stdout == "trap: about to abort\n"
    assert "trapped: wasm trap: wasm `unreachable`" in one_error_line(trap)
    assert spin.returncode == errors.EXIT_TIMEOUT
    assert "timeout: ran past its timeout of 0.3s" in one_error_line(spin)

    # They ran under the agent, not daemonless: it recorded each one.
    assert container("hi")["describe"] == "exited with code 0"
    reasons = sorted(r["status"]["reason"] for r in ps("-a"))
    assert reasons == ["Exited", "Exited", "Timeout", "Trapped"]


@pytest.mark.usefixtures("agent")
def test_api_errors_are_clear(examples: Path) -> None:
    *lookups, bad_name, not_wasm = nova_many(
        ["stop", "a/b"],
        ["logs", "x?y"],
        ["rm", "../v1"],
        ["run", "-d", "--name", "a/b", examples / "hello.wasm"],
        ["run", "-d", Path(__file__)],
    )
    for result in lookups:
        assert result.returncode == errors.EXIT_NOVA, result.args
        assert f"no container named {result.args[1]!r}" in one_error_line(result)
    assert bad_name.returncode == errors.EXIT_USAGE
    assert "invalid name 'a/b'" in one_error_line(bad_name)
    assert not_wasm.returncode == errors.EXIT_CANNOT_RUN
    assert "not a WebAssembly module" in one_error_line(not_wasm)
    assert listing() == []

    # The raw API answers malformed requests with a JSON error, never a 500 page.
    status, body = asyncio.run(
        api("POST", "/v1/containers", json={"module": str(examples / "hello.wasm"), "env": "x"})
    )
    assert status == 400
    assert json.loads(body)["kind"] == "UsageError"
    assert "field 'env'" in json.loads(body)["error"]
    status, body = asyncio.run(api("POST", "/v1/containers/x/stop?grace=soon"))
    assert status == 400
    assert json.loads(body)["kind"] == "UsageError"


@pytest.mark.usefixtures("agent")
def test_a_signal_to_an_attached_run_stops_its_container(examples: Path) -> None:
    """Ctrl-C (SIGINT) or SIGTERM (`timeout`, a supervisor) must not orphan the container."""
    signals = {"fg-int": signal.SIGINT, "fg-term": signal.SIGTERM}
    runs = {
        name: subprocess.Popen(
            [*NOVA, "run", "--name", name, examples / "cpu-spin.wasm"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in signals
    }
    try:
        wait_for("both containers to run", lambda: {r["name"] for r in listing()} == set(runs))
        pids = [int(r["pid"]) for r in listing()]
        for name, run in runs.items():
            run.send_signal(signals[name])
        stderr = {name: run.communicate(timeout=15)[1] for name, run in runs.items()}
    finally:
        for run in runs.values():
            run.kill()
            run.wait()
    for name, run in runs.items():
        assert run.returncode == errors.EXIT_STOPPED, stderr[name]
        assert stderr[name] == f"nova: container {name} stopped: stopped on request\n"
        assert container(name)["state"] == "exited"
    wait_for("the workers to end", lambda: not any(process_alive(pid) for pid in pids))


# -- detached containers: ps, logs, stop, rm ---------------------------------------


@pytest.mark.usefixtures("agent")
def test_detached_container_lifecycle(examples: Path) -> None:
    # Three users race for one name: exactly one container gets it.
    race: list[str | Path] = ["run", "-d", "--name", "spin", examples / "cpu-spin.wasm"]
    racers = nova_many(race, race, race)
    [winner] = [r for r in racers if r.returncode == 0]
    assert (winner.stdout, winner.stderr) == ("spin\n", "")
    for loser in (r for r in racers if r is not winner):
        assert loser.returncode == errors.EXIT_NOVA
        assert "a container named 'spin' is already running" in one_error_line(loser)
    [record] = listing()
    pid = int(record["pid"])
    assert process_alive(pid)
    wait_for("the startup time", lambda: container("spin")["startup_us"] is not None)

    table, duplicate, busy = nova_many(
        ["ps"],
        ["run", "-d", "--name", "spin", examples / "hello.wasm"],
        ["rm", "spin"],
    )
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "STATE", "STARTUP", "AGE", "MODULE", "STATUS"]
    [(name, cid, state, startup, _age, module, status)] = [row.split() for row in rows]
    assert (name, cid, state) == ("spin", container("spin")["id"], "running")
    assert (module, status) == ("cpu-spin.wasm", "running")
    assert re.fullmatch(r"\d+us", startup), startup
    assert duplicate.returncode == errors.EXIT_NOVA
    assert "a container named 'spin' is already running" in one_error_line(duplicate)
    assert busy.returncode == errors.EXIT_NOVA
    assert "container spin is running; stop it first" in one_error_line(busy)

    stop = nova("stop", "spin")
    assert (stop.returncode, stop.stdout) == (0, "spin: stopped: stopped on request\n")
    wait_for("the stopped worker to end", lambda: not process_alive(pid))
    running, everything = nova_many(["ps"], ["ps", "-a"])
    assert running.stdout.splitlines()[1:] == []
    assert everything.stdout.splitlines()[1].split()[2:3] == ["exited"]
    assert everything.stdout.splitlines()[1].endswith("stopped: stopped on request")
    assert container("spin")["status"]["exit_code"] == errors.EXIT_STOPPED

    assert nova("rm", "spin").returncode == 0
    assert listing() == []
    gone = nova("rm", "spin")
    assert gone.returncode == errors.EXIT_NOVA
    assert "no container named 'spin'" in one_error_line(gone)


@pytest.mark.usefixtures("agent")
def test_logs_follow_and_name_reuse(examples: Path) -> None:
    for result in nova_many(
        ["run", "-d", "--name", "nap", examples / "sleep.wasm", "1"],
        ["run", "-d", "--name", "grow", examples / "mem-grow.wasm", "--memory", "16Mi"],
    ):
        assert (result.returncode, result.stderr) == (0, ""), result.args
    started = time.monotonic()
    follow = nova("logs", "-f", "nap")  # returns once the container has exited
    assert (follow.returncode, follow.stdout, follow.stderr) == (0, "slept 1\n", "")
    assert time.monotonic() - started < 10
    assert container("nap")["describe"] == "exited with code 0"

    wait_for("mem-grow to exit", lambda: container("grow")["state"] == "exited")
    logs = nova("logs", "grow")
    assert logs.stdout == ""
    assert logs.stderr.startswith("mem-grow: allocation failed after")  # stderr stays stderr
    assert container("grow")["status"]["memory_limit_hit"] is True

    missing = nova("logs", "nosuch")
    assert missing.returncode == errors.EXIT_NOVA
    assert one_error_line(missing) == "nova logs: no container named 'nosuch' (see `nova ps -a`)"

    # The name of an exited container may be reused; the running one is then meant.
    pid = detach("nap", examples / "cpu-spin.wasm")
    stop = nova("stop", "nap")
    assert (stop.returncode, stop.stdout) == (0, "nap: stopped: stopped on request\n")
    wait_for("the second nap to end", lambda: not process_alive(pid))
    naps = sorted(r["describe"] for r in ps("-a") if r["name"] == "nap")
    assert naps == ["exited with code 0", "stopped: stopped on request"]


# -- metrics ------------------------------------------------------------------------


def scrape(text: str) -> dict[str, float]:
    """Sample name{labels} -> value, e.g. 'nova_module_cache_hits_total{tier=memory}'."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def http_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def test_metrics_on_the_socket_and_over_tcp(
    start_agent: StartAgent, examples: Path, nova_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOVA_CACHE_DIR", str(nova_dirs / "cache"))  # empty: compiles count
    port = free_port()
    start_agent("--metrics-address", f"127.0.0.1:{port}")

    def metrics() -> dict[str, float]:
        status, text = asyncio.run(api("GET", "/metrics"))
        assert status == 200
        return scrape(text)

    status, text = asyncio.run(api("GET", "/metrics"))
    assert status == 200
    assert "# TYPE nova_container_starts_total counter" in text
    assert "# TYPE nova_startup_duration_microseconds histogram" in text
    before = scrape(text)
    for name in (
        "nova_startup_duration_microseconds_bucket{le=240.0}",
        "nova_startup_duration_microseconds_bucket{le=+Inf}",
        "nova_active_containers",
        "nova_module_cache_hits_total{tier=memory}",
        "nova_module_cache_hits_total{tier=disk}",
        "nova_module_cache_misses_total",
    ):
        assert name in before, name
    assert before["nova_active_containers"] == 0
    assert before["nova_startup_duration_microseconds_count"] == 0

    for _ in range(2):
        assert nova("run", examples / "hello.wasm").returncode == 0
    pid = detach("spin", examples / "cpu-spin.wasm")
    observed = "nova_startup_duration_microseconds_count"
    wait_for("three observed starts", lambda: metrics()[observed] == 3)
    during = metrics()
    starts = sum(v for k, v in during.items() if k.startswith("nova_container_starts_total"))
    assert starts == 3
    assert during["nova_active_containers"] == 1
    pool_starts = sum(
        v
        for k, v in during.items()
        if k.startswith(("nova_pool_hits_total", "nova_pool_misses_total"))
    )
    assert pool_starts == 3
    assert during["nova_module_cache_misses_total"] == 2  # hello and cpu-spin, compiled once
    assert during["nova_module_cache_hits_total{tier=memory}"] >= 1  # the second hello
    assert during["nova_startup_duration_microseconds_bucket{le=+Inf}"] == 3
    assert during["nova_startup_duration_microseconds_sum"] > 0

    status, text = asyncio.run(http_get(f"http://127.0.0.1:{port}/metrics"))
    assert status == 200
    assert scrape(text)["nova_active_containers"] == 1
    status, _ = asyncio.run(http_get(f"http://127.0.0.1:{port}/v1/containers"))
    assert status == 404  # TCP serves metrics only, never the control API

    assert nova("stop", "spin").returncode == 0
    wait_for("the worker to end", lambda: not process_alive(pid))
    after = metrics()
    assert after["nova_active_containers"] == 0
    assert after["nova_container_exits_total{reason=Stopped}"] == 1
    assert after["nova_container_exits_total{reason=Exited}"] == 2


# -- agent restarts never kill containers -------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_agent_restart_never_kills_containers(
    sig: int, start_agent: StartAgent, examples: Path
) -> None:
    """Stopped (SIGTERM) or crashed (SIGKILL), the agent leaves its containers running.

    A new agent adopts the one still running (and can stop it), and reports the
    real exit status of the one that ended meanwhile, from its result.json.
    """
    first = start_agent()
    for result in nova_many(
        ["run", "-d", "--name", "spin", examples / "cpu-spin.wasm"],
        ["run", "-d", "--name", "nap", examples / "sleep.wasm", "5"],
    ):
        assert (result.returncode, result.stderr) == (0, ""), result.args
    pids = {r["name"]: int(r["pid"]) for r in ps()}
    wait_for("the startup time", lambda: container("spin")["startup_us"] is not None)
    assert container("nap")["state"] == "running"  # it must end while no agent runs

    assert first.end(sig) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    agent_gone = time.time()
    assert process_alive(pids["spin"]), "the container died with the agent"
    wait_for("nap to end on its own", lambda: not process_alive(pids["nap"]))

    start_agent()
    assert process_alive(pids["spin"]), "the container died while no agent ran"
    running, table, logs = nova_many(["ps", "--json"], ["ps", "-a"], ["logs", "nap"])
    [adopted] = json.loads(running.stdout)
    assert (adopted["name"], adopted["state"], adopted["pid"]) == ("spin", "running", pids["spin"])
    assert adopted["startup_us"] is not None  # the record survived whole
    assert sorted(row.split()[:3:2] for row in table.stdout.splitlines()[1:]) == [
        ["nap", "exited"],
        ["spin", "running"],
    ]
    assert logs.stdout == "slept 5\n"
    nap = container("nap")
    assert nap["describe"] == "exited with code 0"
    assert (nap["status"]["reason"], nap["status"]["exit_code"]) == ("Exited", 0)
    assert nap["finished_at"] > agent_gone  # settled by the new agent, from result.json

    stop = nova("stop", "spin")
    assert (stop.returncode, stop.stdout) == (0, "spin: stopped: stopped on request\n")
    wait_for("the adopted worker to end", lambda: not process_alive(pids["spin"]))
    assert container("spin")["state"] == "exited"
    assert container("spin")["status"]["reason"] == "Stopped"


# -- one agent per state directory --------------------------------------------------


def test_a_second_agent_fails_fast_and_leaves_the_first_alone(
    agent: AgentProcess, nova_dirs: Path
) -> None:
    def second(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*NOVA_AGENT, "--standalone"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
            check=False,
        )

    started = time.monotonic()
    same_state = second()
    assert same_state.returncode == errors.EXIT_NOVA
    assert "another nova-agent already uses" in one_error_line(same_state)
    assert "is held" in same_state.stderr

    same_socket = second(NOVA_STATE_DIR=str(nova_dirs / "other-state"))
    assert same_socket.returncode == errors.EXIT_NOVA
    assert "is in use by a running agent" in one_error_line(same_socket)
    assert time.monotonic() - started < 10, "a refused agent should fail fast"

    assert agent.proc.poll() is None
    assert paths.socket_answers(agent.socket), "the refused agent removed the live agent's socket"
    assert nova("ps").returncode == 0


def test_limits_an_agent_without_cgroups_cannot_enforce_get_a_notice(
    start_agent: StartAgent, examples: Path
) -> None:
    """`nova-agent --isolation none` (or an agent that is not root) runs containers without
    cgroups: a run that asked for --cpu or --pids says, in one line, that they do not hold."""
    start_agent("--isolation", "none")
    result = nova("run", "--cpu", "500m", "--name", "bare", examples / "hello.wasm")
    assert (result.returncode, result.stdout) == (0, "hello from wasm, world\n")
    assert one_error_line(result) == (
        "nova: --cpu needs cgroups, and the agent runs without them (not root?): "
        "not enforced (--isolation none; only the wasm limits hold)"
    )
    record = container("bare")
    assert (record["isolation"], record["limits"]["cpu_millicores"]) == ("none", 500)
    assert "usage" not in record["status"]["extra"]
    quiet = nova("run", "--memory", "8Mi", examples / "hello.wasm")
    assert (quiet.returncode, quiet.stderr) == (0, "")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "one of the arguments --standalone --consul --uninstall-policy is required"),
        (["--standalone", "--pool-size", "-1"], "--pool-size must be 0 or more"),
        (["--standalone", "--metrics-address", "9464"], "invalid --metrics-address '9464'"),
        (["--standalone", "--cgroup-root", "../x"], "invalid --cgroup-root: invalid cgroup root"),
        (["--standalone", "--isolation", "off"], "argument --isolation: invalid choice: 'off'"),
    ],
)
def test_agent_usage_errors_exit_2(argv: list[str], says: str) -> None:
    result = subprocess.run(
        [*NOVA_AGENT, *argv], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == errors.EXIT_USAGE
    assert says in result.stderr


def test_uninstall_policy_refuses_while_an_agent_runs(tmp_path: Path) -> None:
    """A running agent would enforce again at its next change: uninstall is for a stopped one."""
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        result = subprocess.run(
            [*NOVA_AGENT, "--uninstall-policy", "--socket", str(path)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert result.returncode == errors.EXIT_NOVA
    assert f"an agent is running on {path}; stop it first" in result.stderr


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("9464", ":9464", "host:", "host:http", "host:0", "host:70000"):
        with pytest.raises(errors.UsageError):
            parse_address(bad)
