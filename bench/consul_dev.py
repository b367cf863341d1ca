"""A throwaway Consul dev agent for benchmarks: free loopback ports, its own data dir.

`session_ttl_min = "1s"` as Nova's docs tell operators to set it. The agent is
stopped (SIGTERM, then SIGKILL) and its directory removed on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from bench import common

START_TIMEOUT_S = 60.0


def find_consul() -> str:
    for candidate in (
        shutil.which("consul"),
        str(common.REPO_ROOT / ".venv" / "bin" / "consul"),
        str(
            Path(os.environ.get("NOVA_CACHE_DIR", "/var/cache/nova-build"))
            / "consul-v1.16.1"
            / "consul"
        ),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise common.BenchError("no consul binary on PATH or in .venv/bin: run `make consul`")


def free_port() -> int:
    """A loopback port free for TCP and UDP (Serf listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


class ConsulDev:
    """`with ConsulDev() as consul:` a running dev agent at `consul.url`."""

    def __init__(self, extra_hcl: tuple[str, ...] = ()) -> None:
        self.binary = find_consul()
        self.extra_hcl = extra_hcl
        self.http_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="nova-bench-consul-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> ConsulDev:
        ports = (
            f"ports {{ http = {self.http_port}, server = {free_port()}, "
            f"serf_lan = {free_port()}, serf_wan = {free_port()}, "
            "dns = -1, grpc = -1, grpc_tls = -1 }"
        )
        command = [self.binary, "agent", "-dev", "-node", f"bench-{self.http_port}",
                   "-bind", "127.0.0.1", "-client", "127.0.0.1",
                   "-data-dir", str(self.dir / "data"),
                   "-log-level", "warn", "-hcl", ports, "-hcl", 'session_ttl_min = "1s"',
                   "-hcl", "disable_update_check = true"]  # fmt: skip
        for hcl in self.extra_hcl:
            command += ["-hcl", hcl]
        with (self.dir / "consul.log").open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise common.BenchError(f"consul exited with {self.process.returncode}")
            checks = self._get("/v1/health/node/" + f"bench-{self.http_port}") or []
            serf = any(c["CheckID"] == "serfHealth" and c["Status"] == "passing" for c in checks)
            if self._get("/v1/status/leader") and serf:
                return
            time.sleep(0.1)
        raise common.BenchError(f"consul not ready after {START_TIMEOUT_S:.0f} s")

    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return json.loads(response.read() or b"null")
        except (OSError, ValueError):
            return None

    def rss_mib(self) -> float | None:
        return proc_mib(self.process.pid) if self.process else None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def proc_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A process's VmRSS (or VmHWM: its peak) in MiB, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None
