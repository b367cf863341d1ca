"""HTTP workloads: the WAGI server a worker runs instead of running its module once.

A container whose RunSpec has `http_port` is an HTTP server: its worker
listens on (`http_host`, `http_port`) inside the container's sandbox and
runs the module once per request, each time in a FRESH Store and instance,
so nothing a request does survives into the next one. The guest speaks
CGI/1.1 over WASI stdio: agent/sandbox/cgi.py has the ABI and the mapping
both ways; agent/sandbox/capi.py has the wasmtime C API calls a request
makes, and what they measured against wasmtime-py's.

Each request gets spec.timeout_s, enforced by epoch interruption (504). A
guest blocked in a host call (a long sleep) cannot be interrupted: past its
deadline plus a grace the worker's watchdog ends the container, as for a
run-once container.

The guest runs on the event loop's thread, one request at a time (the one
core a worker gets is used best that way); responses of requests that
arrived together are written back to back after the last of them ran (see
`WagiServer._end_of_batch`). bench/http.py measures the whole server against
a plain aiohttp one.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import uvloop
import wasmtime
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from wasmtime import _ffi as ffi

from agent.sandbox import worker
from agent.sandbox.capi import (
    EXTERN_FUNC,
    MAX_RESPONSE_BYTES,
    CStrings,
    StdoutCapture,
    address_of,
    byte_vec_new,
    error_at,
    export_get,
    func_call,
    instantiate,
    pooled_engine,
    set_epoch_deadline,
    set_wasi,
    store_context,
    store_delete,
    store_limiter,
    store_new,
    trap_at,
    wasi_argv,
    wasi_delete,
    wasi_env,
    wasi_inherit_stderr,
    wasi_inherit_stdout,
    wasi_new,
    wasi_preopen_dir,
    wasi_stdin_bytes,
)
from agent.sandbox.cgi import (
    BadCgiOutput,
    BadRequest,
    CgiRequest,
    CgiResponse,
    GuestOutcome,
    GuestResult,
    cgi_env,
    error_response,
    http_response,
    parse_cgi_response,
)
from agent.sandbox.engine import EPOCH_TICK_S
from agent.sandbox.spec import ExitReason, ExitStatus, RunSpec
from nova import errors

log = logging.getLogger("nova.agent.sandbox.wagi")

MAX_REQUEST_BODY = 16 << 20  # larger bodies get 413
SHUTDOWN_GRACE_S = 1.0  # in-flight requests get this long after SIGTERM
LISTEN_BACKLOG = 1024
_START = b"_start"

# -- running the guest -------------------------------------------------------------------


class RequestRunner:
    """Runs the module's `_start` for one request in a fresh Store; one at a time."""

    def __init__(
        self,
        spec: RunSpec,
        engine: wasmtime.Engine,
        pre: wasmtime.InstancePre,
        stdout: StdoutCapture,
        *,
        on_watchdog: Callable[[], None],
    ) -> None:
        self.spec = spec
        self.engine = engine  # kept alive: the raw pointers below belong to these
        self.pre = pre
        self._engine = address_of(engine.ptr())
        self._pre = address_of(pre.ptr())
        self._stdout = stdout
        self._on_watchdog = on_watchdog
        self._memory_limit = spec.memory_bytes
        self._timeout = spec.timeout_s
        if self._timeout is None:
            self._deadline_ticks = worker.NO_DEADLINE_TICKS
            self._ticker: worker.EpochTicker | None = None
        else:
            self._deadline_ticks = max(1, round(self._timeout / EPOCH_TICK_S))
            # Ticking all along costs a wakeup per tick; starting and stopping
            # it per request cost a thread handoff per request (measured 40 µs).
            self._ticker = worker.EpochTicker(engine)
            self._ticker.begin(None, None)
        argv = [arg.encode() for arg in (spec.argv or (spec.name,))]
        self._argv = (ctypes.c_char_p * len(argv))(*argv)
        self._argv_count = len(argv)
        self._dirs = [(h.encode(), g.encode(), not ro) for h, g, ro in spec.preopens()]

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.end()

    def check(self) -> None:
        """Instantiate once without running: fails early, and pays first-use page faults."""
        store = store_new(self._engine, None, None)
        try:
            self._instantiate(store, store_context(store), {"NOVA": "check"}, b"")
        finally:
            store_delete(store)

    def run(self, env: Mapping[str, str], body: bytes) -> GuestResult:
        store = store_new(self._engine, None, None)
        try:
            context = store_context(store)
            try:
                func = self._instantiate(store, context, env, body)
            except wasmtime.Trap as exc:
                return GuestResult(GuestOutcome.TRAPPED, message=worker._trap_message(exc))
            except wasmtime.WasmtimeError as exc:
                return GuestResult(GuestOutcome.FAILED, message=worker._first_line(exc))
            return self._call(context, func)
        finally:
            store_delete(store)

    def _instantiate(self, store: int, context: int, env: Mapping[str, str], body: bytes) -> Any:
        set_epoch_deadline(context, self._deadline_ticks)
        if self._memory_limit is not None:
            store_limiter(store, self._memory_limit, -1, -1, -1, -1)
        error = set_wasi(context, self._wasi_config(env, body))  # takes the config
        if error:
            raise error_at(error)
        instance = ffi.wasmtime_instance_t()
        trap = ctypes.c_void_p()
        error = instantiate(self._pre, context, ctypes.byref(instance), ctypes.byref(trap))
        if error:
            raise error_at(error)
        if trap.value:
            raise trap_at(trap.value)
        start: Any = ffi.wasmtime_extern_t()
        if (
            not export_get(context, ctypes.byref(instance), _START, 6, ctypes.byref(start))
            or start.kind != EXTERN_FUNC
        ):
            raise wasmtime.WasmtimeError("the module exports no _start function")
        return start.of.func

    def _wasi_config(self, env: Mapping[str, str], body: bytes) -> int:
        config: int = wasi_new()
        try:
            strings = CStrings(env)
            if not (
                wasi_argv(config, self._argv_count, self._argv)
                and wasi_env(config, strings.count, strings.names, strings.values)
            ):
                raise wasmtime.WasmtimeError("cannot set the guest's argv or environment")
            if body:
                stdin = ffi.wasm_byte_vec_t()
                byte_vec_new(ctypes.byref(stdin), len(body), body)
                wasi_stdin_bytes(config, ctypes.byref(stdin))  # takes the bytes
            wasi_inherit_stdout(config)
            wasi_inherit_stderr(config)
            for host, guest, mutable in self._dirs:
                if not wasi_preopen_dir(config, host, guest, mutable):
                    raise wasmtime.WasmtimeError(f"cannot preopen {host.decode()!r}")
        except BaseException:
            wasi_delete(config)
            raise
        return config

    def _call(self, context: int, func: Any) -> GuestResult:
        trap = ctypes.c_void_p()
        self._stdout.rewind()
        ticker = self._ticker
        if ticker is not None:
            assert self._timeout is not None
            watchdog_at = time.monotonic() + self._timeout + worker.WATCHDOG_GRACE_S
            ticker.begin(watchdog_at, self._on_watchdog)
        try:
            error = func_call(context, ctypes.byref(func), None, 0, None, 0, ctypes.byref(trap))
        finally:
            if ticker is not None:
                ticker.begin(None, None)  # disarm the watchdog, keep ticking
        output = self._stdout.take()
        if trap.value:
            caught = trap_at(trap.value)
            if caught.trap_code == wasmtime.TrapCode.INTERRUPT and self._timeout is not None:
                return GuestResult(GuestOutcome.TIMED_OUT)
            return GuestResult(GuestOutcome.TRAPPED, message=worker._trap_message(caught))
        exit_code = 0
        if error:
            exc = error_at(error)
            if not isinstance(exc, wasmtime.ExitTrap):
                return GuestResult(GuestOutcome.TRAPPED, message=worker._first_line(exc))
            exit_code = exc.code
        if output is None:
            too_large = f"it wrote more than {MAX_RESPONSE_BYTES >> 20} MiB"
            return GuestResult(GuestOutcome.EXITED, exit_code, b"", too_large)
        return GuestResult(GuestOutcome.EXITED, exit_code, output)


def make_runner(
    spec: RunSpec, table: worker.ModuleTable, *, on_watchdog: Callable[[], None]
) -> RequestRunner:
    """A checked runner on a pooled engine (the worker's own if pooling refuses the module)."""
    stdout = StdoutCapture()
    try:
        pooled = worker.ModuleTable(pooled_engine())
        pre = pooled.instance_pre(spec.digest, spec.artifact)
        runner = RequestRunner(spec, pooled.engine, pre, stdout, on_watchdog=on_watchdog)
        runner.check()
        return runner
    except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
        log.warning("wagi: cannot use the pooling allocator (%s); trying the default one", exc)
    pre = table.instance_pre(spec.digest, spec.artifact)
    runner = RequestRunner(spec, table.engine, pre, stdout, on_watchdog=on_watchdog)
    runner.check()
    return runner


# -- the server ------------------------------------------------------------------------


@dataclass(slots=True)
class ServerStats:
    requests: int = 0
    errors: dict[int, int] = field(default_factory=dict)  # the server's own responses


class WagiServer:
    """aiohttp's low-level server in front of a RequestRunner."""

    def __init__(
        self, spec: RunSpec, runner: RequestRunner, listener: socket.socket | None = None
    ) -> None:
        self.spec = spec
        self.runner = runner
        self.listener = listener  # made by the agent in the host's netns (a sandbox in its own)
        self.stats = ServerStats()
        self._base_env = dict(spec.env)
        self._host = spec.http_host
        self._port = spec.http_port or 0
        self._protocols = {(1, 1): "HTTP/1.1", (1, 0): "HTTP/1.0"}
        self._batch: list[asyncio.Future[None]] = []

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.stats.requests += 1
        body = b""
        if request.can_read_body:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return self._error(request, error_response(413, "the request body is too large"))
        response = self._respond(request, body)
        await self._end_of_batch()
        return response

    def _respond(self, request: web.BaseRequest, body: bytes) -> web.Response:
        """Run the guest for `request` and map what it wrote to an HTTP response."""
        version = request.version
        protocol = self._protocols.get(version) or f"HTTP/{version.major}.{version.minor}"
        try:
            env = cgi_env(
                CgiRequest(
                    request.method,
                    request.raw_path,
                    request.headers.items(),  # type: ignore[arg-type]  # a sized view
                    len(body),
                    request.remote or "",
                    self._host,
                    self._port,
                    protocol,
                ),
                self._base_env,
            )
        except BadRequest as exc:
            return self._error(request, error_response(400, str(exc)))
        result = self.runner.run(env, body)
        if result.outcome is GuestOutcome.EXITED and not result.message:
            try:
                reply = parse_cgi_response(result.output)
            except BadCgiOutput:
                pass  # http_response() words it
            else:
                return web.Response(
                    body=reply.body, status=reply.status, reason=reply.reason, headers=reply.headers
                )
        return self._error(request, http_response(result, self.spec.timeout_s))

    async def _end_of_batch(self) -> None:
        """Hold a response until every request that was ready with it has run its guest.

        Requests that arrive together (one epoll wakeup, many connections) run
        one after the other. Writing each response as soon as it is ready
        wakes the client once per response, and on loopback the sender pays
        for that wakeup inside send(); writing the batch's responses back to
        back after its last guest measured 1.3-1.7x the requests/s at 32
        connections and no change at 1 (a plain aiohttp server gains nothing
        from it: its handler is too short for batches to form).
        """
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()  # one per request: cancelling one cancels no other
        if not self._batch:
            loop.call_soon(self._release_batch)  # runs after the handlers queued before it
        self._batch.append(waiter)
        await waiter

    def _release_batch(self) -> None:
        batch, self._batch = self._batch, []
        for waiter in batch:
            if not waiter.done():
                waiter.set_result(None)

    def _error(self, request: web.BaseRequest, reply: CgiResponse) -> web.Response:
        """A response the server made itself; logged to the container's log."""
        self.stats.errors[reply.status] = self.stats.errors.get(reply.status, 0) + 1
        detail = reply.body.decode("utf-8", "replace").strip()
        log.warning("wagi: %s %s -> %s", request.method, request.raw_path, detail)
        return web.Response(
            body=reply.body, status=reply.status, reason=reply.reason, headers=reply.headers
        )

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        loop = asyncio.get_running_loop()
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=MAX_REQUEST_BODY
        )

    async def serve_until_stopped(self) -> str | None:
        """Listen, serve until SIGTERM or SIGINT, shut down; an error message if listening fails."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        server = web.Server(self.handle, request_factory=self._make_request, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        try:
            sites: list[tuple[str, web.BaseSite]] = []
            if self.listener is not None:
                # Sandboxed: the published port (host netns, bound by the agent), and
                # the same port on the container's own address, for its segment peers.
                sites.append((f"{self._host}:{self._port}", web.SockSite(runner, self.listener)))
                host = "0.0.0.0"  # the container's own netns: its eth0 and lo
            else:
                host = self._host
            sites.append(
                (
                    f"{host}:{self._port}",
                    web.TCPSite(
                        runner, host, self._port, backlog=LISTEN_BACKLOG, reuse_address=True
                    ),
                )
            )
            for where, site in sites:
                try:
                    await site.start()
                except OSError as exc:
                    return f"cannot listen on {where}: {exc.strerror or exc}"
            log.warning("wagi: serving %s on http://%s:%d/", self.spec.name, self._host, self._port)
            await stopping.wait()
            return None
        finally:
            await runner.cleanup()


def serve(
    spec: RunSpec,
    table: worker.ModuleTable,
    *,
    on_watchdog: Callable[[], None] | None = None,
    listen_fd: int | None = None,
) -> ExitStatus:
    """Serve HTTP for `spec` until SIGTERM; the container's ExitStatus (EXITED 0 when stopped).

    With `listen_fd` it serves on that listening socket (which the agent
    bound in the host's netns) instead of binding (http_host, http_port).
    Blocking; runs its own uvloop event loop. `on_watchdog` is called (from
    the epoch thread) when a guest stays blocked in a host call past its
    timeout plus a grace; it must end the process.
    """
    try:
        worker.prepare_sandbox(spec)
        runner = make_runner(spec, table, on_watchdog=on_watchdog or _end_on_watchdog(spec))
    except (wasmtime.WasmtimeError, wasmtime.Trap, OSError, KeyError) as exc:
        return ExitStatus.for_reason(
            ExitReason.FAILED, f"cannot start the module: {worker._first_line(exc)}"
        )
    listener = None if listen_fd is None else socket.socket(fileno=listen_fd)
    server = WagiServer(spec, runner, listener)
    entry_ns = time.monotonic_ns()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
            failure = loop_runner.run(server.serve_until_stopped())
    finally:
        runner.close()
    extra: dict[str, Any] = {
        "http_requests": server.stats.requests,
        "http_errors": {str(k): v for k, v in sorted(server.stats.errors.items())},
    }
    if failure is not None:
        return ExitStatus.for_reason(ExitReason.FAILED, failure, entry_ns=entry_ns, extra=extra)
    return ExitStatus(
        reason=ExitReason.EXITED,
        exit_code=0,
        message="the HTTP server stopped",
        entry_ns=entry_ns,
        end_ns=time.monotonic_ns(),
        extra=extra,
    )


def _end_on_watchdog(spec: RunSpec) -> Callable[[], None]:
    def end() -> None:
        os.write(
            2,
            f"wagi: a request stayed blocked in a host call past its timeout of "
            f"{spec.timeout_s:g}s; ending the container\n".encode(),
        )
        os._exit(errors.EXIT_TIMEOUT)

    return end
