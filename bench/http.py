"""HTTP: throughput and latency of a WAGI container against a plain aiohttp server.

Both serve `GET /` with the same 16 bytes (`hello from nova\\n`, text/plain) on
127.0.0.1 and are driven by wrk with the same load, in alternating rounds of
the same run, so that machine noise hits both alike:

  nova   examples/build/http-hello.wasm as an HTTP container (RunSpec.http_port)
         started through SandboxRuntime: one worker process, uvloop + aiohttp's
         low-level server, a fresh wasm instance per request
  plain  the peer: aiohttp's low-level server in one process on uvloop whose
         handler returns the same response (no wasm at all)

Per round and server: `wrk -t1 -cC -dDs --latency`, from which requests/s and
the p50/p99 latencies are parsed, and the server process's CPU time (utime +
stime from /proc) divided by the requests served: the server's own cost per
request, which is less sensitive than requests/s to what else the machine
runs. Reported: medians over rounds, and nova/plain ratios (goal: requests/s
ratio >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.sandbox.spec import ExitReason, RunSpec
from bench import common

WASM_APP = common.REPO_ROOT / "examples" / "build" / "http-hello.wasm"
BODY = b"hello from nova\n"
NOVA, PLAIN = "nova", "plain"
GOAL_RPS_RATIO = 0.5
LISTEN_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

_UNITS_US = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}
_LATENCY = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=int, default=10, help="seconds per wrk run (default: %(default)s)"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (default: %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds per server (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="unrecorded seconds of load first (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        help="the container's per-request timeout (epoch ticking on); default: none",
    )
    parser.add_argument("--wasm", type=Path, default=WASM_APP, help="default: %(default)s")


# -- wrk ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_per_s: float
    requests: int
    p50_us: float
    p75_us: float
    p90_us: float
    p99_us: float
    non_2xx: int
    socket_errors: int


def parse_wrk(text: str) -> WrkResult:
    """The numbers of `wrk --latency` output; raises BenchError if any is missing."""
    latencies = {q: float(v) * _UNITS_US[unit] for q, v, unit in _LATENCY.findall(text)}
    rps = _RPS.search(text)
    total = _TOTAL.search(text)
    if rps is None or total is None or set(latencies) != {"50", "75", "90", "99"}:
        raise common.BenchError(f"cannot read wrk's output:\n{text}")
    non_2xx = _NON_2XX.search(text)
    errors = _SOCKET_ERRORS.search(text)
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        requests=int(total.group(1)),
        p50_us=latencies["50"],
        p75_us=latencies["75"],
        p90_us=latencies["90"],
        p99_us=latencies["99"],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


async def wrk(url: str, args: argparse.Namespace, duration: int) -> WrkResult:
    proc = await asyncio.create_subprocess_exec(
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{duration}s",
        "--latency",
        url,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise common.BenchError(f"wrk failed ({proc.returncode}):\n{text}")
    return parse_wrk(text)


# -- the servers --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


async def _wait_listening(port: int, alive: Any) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while not _port_open(port):
        if not alive():
            raise common.BenchError(f"the server for port {port} exited before listening")
        if time.monotonic() > deadline:
            raise common.BenchError(f"nothing listened on port {port} in {LISTEN_TIMEOUT_S}s")
        await asyncio.sleep(0.02)


async def _check_body(port: int) -> None:
    """One request by hand: the exact status and body, before any load."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    await writer.drain()
    reply = await reader.read()
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or body != BODY:
        raise common.BenchError(f"port {port} did not answer {BODY!r}: {reply[:300]!r}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid`."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def serve_plain(port: int) -> None:
    """The peer: aiohttp's low-level server on uvloop, the same 16 bytes as http-hello."""
    import uvloop
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=BODY, content_type="text/plain")

    async def main() -> None:
        server = web.Server(handler, access_log=None)
        runner = web.ServerRunner(server)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        await asyncio.Event().wait()  # until SIGTERM

    uvloop.run(main())


class PlainServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "bench.http", "--serve-plain", str(self.port)],
            stdin=subprocess.DEVNULL,
            cwd=common.REPO_ROOT,
        )
        proc = self.proc
        await _wait_listening(self.port, lambda: proc.poll() is None)

    async def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            await asyncio.to_thread(self.proc.wait, 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        self.proc = None


class NovaServer:
    def __init__(self, wasm: Path, scratch: Path, timeout_s: float | None) -> None:
        from agent.sandbox.runtime import Container, SandboxRuntime

        self.port = free_port()
        self.wasm = wasm
        self.scratch = scratch
        self.timeout_s = timeout_s
        self.runtime = SandboxRuntime(str(scratch / "cache"), pool_size=1)
        self.container: Container | None = None
        self.status: Any = None

    @property
    def pid(self) -> int:
        assert self.container is not None
        return self.container.pid

    async def start(self) -> None:
        await self.runtime.start()
        module = await self.runtime.resolve(str(self.wasm))
        spec = RunSpec(
            id="bench-http",
            name="bench-http-hello",
            digest=module.digest,
            artifact=str(module.artifact),
            module_path=str(self.wasm),
            http_port=self.port,
            timeout_s=self.timeout_s,
        )
        log_fd = os.open(self.scratch / "container.log", os.O_WRONLY | os.O_CREAT, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        try:
            self.container = await self.runtime.launch(spec, (null_fd, log_fd, log_fd))
        finally:
            os.close(null_fd)
            os.close(log_fd)
        pid = self.container.pid
        await _wait_listening(self.port, lambda: os.path.exists(f"/proc/{pid}"))

    async def stop(self) -> None:
        try:
            if self.container is not None:
                self.status = await self.container.stop()
                self.container = None
        finally:
            await self.runtime.close()


# -- the run --------------------------------------------------------------------------


@dataclass(slots=True)
class Round:
    wrk: WrkResult
    cpu_us_per_request: float | None


async def _round(server: PlainServer | NovaServer, args: argparse.Namespace) -> Round:
    url = f"http://127.0.0.1:{server.port}/"
    before = cpu_seconds(server.pid)
    result = await wrk(url, args, args.duration)
    after = cpu_seconds(server.pid)
    if result.non_2xx or result.socket_errors:
        raise common.BenchError(
            f"{url}: {result.non_2xx} non-2xx responses, {result.socket_errors} socket errors"
        )
    per_request = (after - before) * 1e6 / result.requests if result.requests else None
    return Round(result, per_request)


async def _measure(
    args: argparse.Namespace, scratch: Path
) -> tuple[dict[str, list[Round]], dict[str, Any]]:
    nova = NovaServer(args.wasm, scratch, args.timeout_s)
    servers: dict[str, PlainServer | NovaServer] = {NOVA: nova, PLAIN: PlainServer()}
    rounds: dict[str, list[Round]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            await server.start()
            await _check_body(server.port)
        for name, server in servers.items():
            if args.warmup > 0:
                print(f"warming up {name} ({args.warmup}s)", file=sys.stderr, flush=True)
                await wrk(f"http://127.0.0.1:{server.port}/", args, args.warmup)
        for number in range(args.rounds):
            for name in common.rotate(list(servers), number):
                one = await _round(servers[name], args)
                rounds[name].append(one)
                print(
                    f"round {number + 1}/{args.rounds} {name}: "
                    f"{one.wrk.requests_per_s:,.0f} req/s, p50 {one.wrk.p50_us:.0f} µs, "
                    f"p99 {one.wrk.p99_us:.0f} µs",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for server in servers.values():
            await server.stop()
    status = nova.status
    if status is None or status.reason is not ExitReason.EXITED or status.exit_code != 0:
        raise common.BenchError(f"the nova container did not stop cleanly: {status}")
    return rounds, {"nova_exit": status.describe(), "nova_server": status.extra}


def _medians(rounds: list[Round]) -> dict[str, float | None]:
    cpu = [r.cpu_us_per_request for r in rounds if r.cpu_us_per_request is not None]
    return {
        "requests_per_s": round(statistics.median(r.wrk.requests_per_s for r in rounds), 1),
        "p50_us": round(statistics.median(r.wrk.p50_us for r in rounds), 1),
        "p99_us": round(statistics.median(r.wrk.p99_us for r in rounds), 1),
        "cpu_us_per_request": round(statistics.median(cpu), 1) if cpu else None,
    }


def _body(
    rounds: dict[str, list[Round]], facts: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    medians = {name: _medians(each) for name, each in rounds.items()}
    nova, plain = medians[NOVA], medians[PLAIN]

    def ratio(key: str) -> float | None:
        a, b = nova[key], plain[key]
        return common.ratio(a, b) if a is not None and b is not None else None

    rps_ratio = ratio("requests_per_s")
    return {
        "parameters": {
            "duration_s": args.duration,
            "connections": args.connections,
            "threads": args.threads,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "timeout_s": args.timeout_s,
            "wasm": str(args.wasm),
        },
        "measures": {
            "requests_per_s": "wrk's Requests/sec for the round",
            "p50_us/p99_us": "wrk --latency percentiles",
            "cpu_us_per_request": "server process utime+stime during the round / requests",
        },
        "variants": {
            name: {
                "median": medians[name],
                "rounds": [
                    {**asdict(r.wrk), "cpu_us_per_request": r.cpu_us_per_request}
                    for r in rounds[name]
                ],
            }
            for name in rounds
        },
        "ratios": {
            f"{NOVA}/{PLAIN}": {
                "requests_per_s": rps_ratio,
                "p50": ratio("p50_us"),
                "p99": ratio("p99_us"),
                "cpu_per_request": ratio("cpu_us_per_request"),
            }
        },
        "goal": {
            "requests_per_s_ratio": GOAL_RPS_RATIO,
            "met": rps_ratio is not None and rps_ratio >= GOAL_RPS_RATIO,
        },
        "facts": facts,
    }


def _print_report(body: dict[str, Any]) -> None:
    rows = [
        [
            name,
            v["median"]["requests_per_s"],
            v["median"]["p50_us"],
            v["median"]["p99_us"],
            v["median"]["cpu_us_per_request"],
        ]
        for name, v in body["variants"].items()
    ]
    headers = ["server", "req/s", "p50 µs", "p99 µs", "cpu µs/req"]
    print(f"\nhttp: GET / (medians of {body['parameters']['rounds']} rounds)")
    print(common.format_table(headers, rows))
    r = body["ratios"][f"{NOVA}/{PLAIN}"]
    print(
        f"\nnova/plain: req/s {r['requests_per_s']} (goal >= {GOAL_RPS_RATIO}), "
        f"p50 {r['p50']}, p99 {r['p99']}, cpu per request {r['cpu_per_request']}"
    )


def _check_inputs(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        raise common.BenchError("wrk is not installed (Debian: apt-get install wrk)")
    if not args.wasm.is_file():
        raise common.BenchError(f"{args.wasm}: not found (build it: make -C examples)")
    if args.rounds < 1 or args.duration < 1:
        raise common.BenchError("--rounds and --duration must be at least 1")


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check_inputs(args)
    scratch = Path(tempfile.mkdtemp(prefix="nova-bench-http-"))
    try:
        rounds, facts = asyncio.run(_measure(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body = _body(rounds, facts, args)
    _print_report(body)
    return body


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-plain":
        with contextlib.suppress(KeyboardInterrupt):
            serve_plain(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench http [options]  (this module is run by bench)")
