"""Parent-side handles on the zygote and on worker processes (asyncio)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.isolation.cgroups import Limits
from agent.sandbox import channel
from agent.sandbox.spec import ExitReason, ExitStatus, RunSpec
from nova import errors

if TYPE_CHECKING:
    from agent.sandbox.network import NetAttachment

READY_TIMEOUT_S = 30.0


async def recv_async(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Await the next message on a non-blocking channel socket."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return channel.recv(sock)
        except BlockingIOError:
            pass
        readable = loop.create_future()
        loop.add_reader(sock.fileno(), _resolve, readable)
        try:
            await readable
        finally:
            loop.remove_reader(sock.fileno())


def _resolve(future: asyncio.Future[None]) -> None:
    """A reader callback: the fd is readable. The waiter may be cancelled already,
    in the same loop iteration, before its `finally` removes the reader."""
    if not future.done():
        future.set_result(None)


def pidfd_signal(pidfd: int, sig: int) -> bool:
    """Signal a process through its pidfd (0 probes it); False once it is gone."""
    if pidfd < 0:
        return False
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False


def read_result(run_dir: Path) -> ExitStatus | None:
    """The status a worker wrote to `<run_dir>/result.json` before exiting, if any."""
    try:
        return ExitStatus.from_json(json.loads((run_dir / "result.json").read_text()))
    except (OSError, ValueError, KeyError):
        return None


class WorkerHandle:
    """One worker process: waits ready, runs one spec, reports one ExitStatus.

    `sandbox_id` is the id of the container it will run, chosen when it was
    forked: it names the worker's cgroup, which a pooled worker joins while idle.
    """

    def __init__(
        self,
        pid: int,
        sock: socket.socket,
        popen: subprocess.Popen[bytes] | None = None,
        *,
        sandbox_id: str,
    ):
        self.pid = pid
        self.sandbox_id = sandbox_id
        self.in_cgroup = False  # joined its container's cgroup while idle
        self.cgroup_limits: Limits | None = None  # what that cgroup allows now (None: unknown)
        self.relabel: asyncio.Future[None] | None = None  # a change of cgroup_limits in flight
        self.pooled = False  # claimed warm from the pool
        self.network: NetAttachment | None = None  # its netns and address, if it has one
        self.sock = sock
        self.sock.setblocking(False)
        self._popen = popen  # set when we started the interpreter ourselves (cold path)
        self.pidfd = os.pidfd_open(pid)
        self.spec: RunSpec | None = None
        self.stop_requested = False
        self.timed_out = False
        self.entry_ns = 0  # when the guest's _start was entered, once known
        self.started = asyncio.Event()
        self._reaper: asyncio.Future[None] | None = None

    async def wait_ready(self) -> None:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                message, _ = await recv_async(self.sock)
        except TimeoutError:
            self.kill()
            raise errors.SandboxError(f"worker {self.pid} did not become ready") from None
        if not message or message.get("op") != "ready":
            reason = (message or {}).get("error") or "it died while starting"
            raise errors.SandboxError(f"worker {self.pid} did not become ready: {reason}")

    def preload(self, digest: str, artifact: str, *, standby: bool) -> None:
        """Load a module and, if `standby`, instantiate it ahead of the run."""
        message = {"op": "preload", "digest": digest, "artifact": artifact, "standby": standby}
        with contextlib.suppress(OSError):
            channel.send(self.sock, message)

    def run(
        self, spec: RunSpec, stdio: tuple[int, int, int], *, extra_fds: list[int] | None = None
    ) -> None:
        """Hand the worker its spec, stdio and (`extra_fds`) a published port's listener."""
        self.spec = spec
        try:
            channel.send(
                self.sock, {"op": "run", "spec": spec.to_json()}, [*stdio, *(extra_fds or [])]
            )
        except OSError as exc:
            raise errors.SandboxError(f"worker {self.pid} is gone: {exc.strerror}") from None

    async def result(self) -> ExitStatus:
        """The container's ExitStatus, however the worker ended.

        A worker that reported its result is only exiting: the status is
        returned at once and `exited()` tells when the process is gone.
        Without a report (killed, crashed) it returns after the exit.
        """
        try:
            while True:
                message, _ = await recv_async(self.sock)
                if message is None or message.get("op") != "started":
                    break
                self.entry_ns = int(message["entry_ns"])
                self.started.set()
        finally:
            self.close_channel()
        if message and message.get("op") == "result":
            status = ExitStatus.from_json(message["status"])
        else:
            status = self._status_without_report()
        self.entry_ns = self.entry_ns or status.entry_ns
        self.started.set()
        if message and message.get("op") == "result":
            self._reaper = asyncio.ensure_future(self._reap())
        else:
            await self._reap()
        return status

    async def exited(self) -> None:
        """Return once the worker process is gone."""
        if self._reaper is not None:
            await asyncio.shield(self._reaper)
        elif self.pidfd >= 0 or self._popen is not None:
            await self._reap()

    def _status_without_report(self) -> ExitStatus:
        if self.spec is not None and self.spec.run_dir:
            reported = read_result(Path(self.spec.run_dir))
            if reported is not None:
                return reported
        if self.timed_out:
            timeout = self.spec.timeout_s if self.spec else None
            return ExitStatus.for_reason(ExitReason.TIMEOUT, f"ran past its timeout of {timeout}s")
        if self.stop_requested:
            return ExitStatus.for_reason(ExitReason.STOPPED, "stopped on request")
        return ExitStatus.for_reason(ExitReason.KILLED, "the worker process died")

    def signal(self, sig: int) -> bool:
        """Signal the worker (0 probes it); False once it is gone."""
        return pidfd_signal(self.pidfd, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def close_channel(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    async def _reap(self) -> None:
        """Return only once the worker process has exited (its pidfd is readable)."""
        if self._popen is not None:
            await asyncio.to_thread(self._popen.wait)
        elif self.pidfd >= 0:
            loop = asyncio.get_running_loop()
            exited = loop.create_future()
            loop.add_reader(self.pidfd, _resolve, exited)
            try:
                await exited
            finally:
                loop.remove_reader(self.pidfd)
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
            self.pidfd = -1

    def __del__(self) -> None:
        if getattr(self, "pidfd", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)


class Zygote:
    """The parent's end of the zygote: spawn workers, preload modules into it.

    With `cgroup_root` (the agent's cgroup root name), workers can be spawned
    straight into a container cgroup the caller made, and the zygote registers
    the prepare hook that makes each run check it is inside before guest code.
    """

    def __init__(self, *, cgroup_root: str | None = None) -> None:
        self.cgroup_root = cgroup_root
        self._control: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one request in flight on the control channel

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        await asyncio.to_thread(self._start_blocking)

    def _start_blocking(self) -> None:
        ours, theirs = channel.pair()
        argv = [sys.executable, "-m", "agent.sandbox.zygote", str(theirs.fileno())]
        if self.cgroup_root is not None:
            argv.append(self.cgroup_root)
        self._proc = subprocess.Popen(
            argv,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._control = ours
        ours.settimeout(READY_TIMEOUT_S)
        message, _ = channel.recv(ours)
        if not message or message.get("op") != "ready":
            raise errors.SandboxError("the zygote process failed to start")

    def _request(self, message: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        if self._control is None:
            raise errors.SandboxError("the zygote is not running")
        with self._lock:
            try:
                channel.send(self._control, message, fds)
                reply, _ = channel.recv(self._control)
            except OSError as exc:
                raise errors.SandboxError(f"the zygote is gone: {exc}") from None
        if reply is None:
            raise errors.SandboxError("the zygote exited")
        return reply

    async def spawn(
        self, sandbox_id: str, *, join: bool = False, netns_fd: int | None = None
    ) -> WorkerHandle:
        """Fork a worker for container `sandbox_id` and wait until it is ready to run.

        With `join`, the worker moves into that container's cgroup (which the
        caller made) right after the fork, before it warms up. With `netns_fd`
        it first joins that network namespace (the caller keeps its fd).
        """
        ours, theirs = channel.pair()
        message = {
            "op": "spawn",
            "sandbox": sandbox_id,
            "join": join,
            "netns": netns_fd is not None,
        }
        fds = [theirs.fileno()] if netns_fd is None else [theirs.fileno(), netns_fd]
        try:
            reply = await asyncio.to_thread(self._request, message, fds)
        finally:
            theirs.close()
        if "pid" not in reply:
            ours.close()
            raise errors.SandboxError(f"the zygote could not fork a worker: {reply.get('error')}")
        handle = WorkerHandle(int(reply["pid"]), ours, sandbox_id=sandbox_id)
        handle.in_cgroup = join
        await handle.wait_ready()
        return handle

    async def preload(self, digest: str, artifact: str, *, standby: bool) -> None:
        message = {"op": "preload", "digest": digest, "artifact": artifact, "standby": standby}
        reply = await asyncio.to_thread(self._request, message)
        if not reply.get("ok"):
            raise errors.SandboxError(f"the zygote could not load {artifact}: {reply.get('error')}")

    async def close(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._proc is not None:
            proc, self._proc = self._proc, None
            try:
                async with asyncio.timeout(5):
                    await asyncio.to_thread(proc.wait)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)


async def spawn_cold_worker(sandbox_id: str, *, cgroup_root: str | None = None) -> WorkerHandle:
    """A worker in a brand-new interpreter: the slow path, no zygote involved.

    With `cgroup_root` it registers the prepare hook and joins its container's
    cgroup when the run arrives (a move on the start path; cold starts are slow anyway).
    """
    ours, theirs = channel.pair()
    argv = [sys.executable, "-m", "agent.sandbox.worker", str(theirs.fileno())]
    if cgroup_root is not None:
        argv.append(cgroup_root)
    proc = await asyncio.to_thread(
        subprocess.Popen, argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL
    )
    theirs.close()
    handle = WorkerHandle(proc.pid, ours, popen=proc, sandbox_id=sandbox_id)
    await handle.wait_ready()
    return handle
