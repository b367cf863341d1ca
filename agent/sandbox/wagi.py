"""HTTP workloads: WAGI, i.e. CGI/1.1 (RFC 3875) over WASI stdio.

A container whose RunSpec has `http_port` is an HTTP server: its worker
listens on (`http_host`, `http_port`) inside the container's sandbox and
runs the module once per request, each time in a FRESH Store and instance,
so nothing a request does survives into the next one.

The ABI, as the guest sees it (examples/apps/http-hello.c is a handler):

  environment  the container's own env (spec.env), overridden by the CGI
               meta-variables of the request: REQUEST_METHOD, PATH_INFO
               (%-decoded), QUERY_STRING (as sent), SCRIPT_NAME (""),
               SERVER_NAME, SERVER_PORT, SERVER_PROTOCOL, SERVER_SOFTWARE,
               GATEWAY_INTERFACE (CGI/1.1), REMOTE_ADDR, REMOTE_HOST,
               CONTENT_LENGTH, CONTENT_TYPE, X_FULL_URL, and HTTP_<NAME> per
               request header (repeats joined by ", ", Cookie by "; ";
               Content-Type/-Length only as CONTENT_*; headers named other
               than [A-Za-z0-9-] and `Proxy` (httpoxy) are not passed)
  argv         spec.argv, or [spec.name]
  stdin        the request body (CONTENT_LENGTH bytes, then EOF)
  stdout       the response: CGI header lines (`Content-Type`, `Status: NNN
               reason`, `Location`, any other header passed through), each
               ended by "\\n" or "\\r\\n", an empty line, then the body. No
               Status means 200, or 302 with a Location. Hop-by-hop headers
               and Content-Length are dropped: the server frames the body.
  stderr       the worker's fd 2: the container's log

Outcomes: CGI output -> that response (whatever the exit code); output that
is not CGI -> 502; a trap -> 500; a request running past spec.timeout_s
(per request, by epoch interruption) -> 504. A guest blocked in a host call
(a long sleep) cannot be interrupted: past its deadline plus a grace the
worker's watchdog ends the container, as for a run-once container.

How a request runs. Measured on the 2-core dev VM (one process, the same
request alternating between variants; medians of the fresh-instance path,
http-hello `GET /`), each choice against its alternative:

  wasmtime's C API called directly   47 us   wasmtime-py objects   129 us
  pooling allocator, 1 MiB resident  67 us   pooling 125, on-demand 149 us
  stdout = fd 1, a memfd (inherited) 42 us   stdout_file 75, stdout_custom 155 us
  stdin = in-memory bytes (a POST)   49 us   stdin_file (a memfd)  219 us

The guest runs on the event loop's thread, one request at a time (the one
core a worker gets is used best that way); responses of requests that
arrived together are written back to back after the last of them ran (see
`WagiServer._end_of_batch`). bench/http.py measures the whole server against
a plain aiohttp one.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import enum
import http
import itertools
import logging
import operator
import os
import re
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import uvloop
import wasmtime
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from wasmtime import _ffi as ffi

from agent.sandbox import engine as engine_mod
from agent.sandbox import worker
from agent.sandbox.engine import EPOCH_TICK_S
from agent.sandbox.spec import ExitReason, ExitStatus, RunSpec
from nova import errors

log = logging.getLogger("nova.agent.sandbox.wagi")

SERVER_SOFTWARE = "Nova-WAGI/1"
MAX_REQUEST_BODY = 16 << 20  # larger bodies get 413
MAX_HEADER_BYTES = 64 << 10  # of the guest's CGI header section
MAX_RESPONSE_BYTES = 256 << 20  # larger guest output gets 502
SHRINK_STDOUT_ABOVE = 1 << 20  # give the memfd's pages back after a response this big
SHUTDOWN_GRACE_S = 1.0  # in-flight requests get this long after SIGTERM
LISTEN_BACKLOG = 1024
POOL_SLOTS = 4  # instances alive at once: one request at a time, plus slack
POOL_KEEP_RESIDENT = 1 << 20  # bytes of a memory slot reset by memset, not page faults

# -- the request side: CGI meta-variables ------------------------------------------

_passed_header_name = re.compile(r"[A-Za-z0-9-]+").fullmatch
_NOT_PASSED = frozenset({"content-type", "content-length", "proxy"})
_ABSOLUTE_FORM = ("http://", "https://")


class BadRequest(ValueError):
    """The request cannot be expressed as CGI meta-variables (e.g. NUL in the path)."""


class CgiRequest(NamedTuple):
    """What the env is built from: an HTTP request as the server received it."""

    method: str
    target: str  # the request-target as sent: "/path?query" (or absolute-form)
    headers: Sequence[tuple[str, str]]
    body_length: int
    remote_addr: str
    server_host: str  # the address the server listens on
    server_port: int
    protocol: str = "HTTP/1.1"
    scheme: str = "http"


def split_target(target: str) -> tuple[str, str]:
    """(PATH_INFO, QUERY_STRING) of a request-target: the path %-decoded, the query as sent."""
    if target.startswith(_ABSOLUTE_FORM):  # drop scheme and authority
        rest = target.partition("://")[2]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        target = rest[cut:]
        if not target.startswith("/"):
            target = "/" + target
    raw_path, _, query = target.partition("?")
    path = urllib.parse.unquote(raw_path, errors="replace")
    if "\0" in path:
        raise BadRequest("the path contains a NUL byte (%00)")
    return path, query


def _host_name(host: str) -> str:
    """The name part of a Host header value ("[::1]:8080" -> "[::1]", "a:80" -> "a")."""
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.partition(":")[0]


def cgi_env(
    request: CgiRequest, base_env: Mapping[str, str] | Iterable[tuple[str, str]] = ()
) -> dict[str, str]:
    """The guest's environment: `base_env` overridden by the request's CGI meta-variables."""
    path, query = split_target(request.target)
    passed: dict[str, str] = {}
    content_type = host = ""
    for name, value in request.headers:
        lower = name.lower()
        if lower in _NOT_PASSED or not _passed_header_name(name):
            if lower == "content-type":
                content_type = value
            continue
        if lower == "host":
            host = value
        key = "HTTP_" + name.upper().replace("-", "_")
        if key in passed:
            passed[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value
        else:
            passed[key] = value
    server_host = request.server_host
    port = str(request.server_port)
    if request.target.startswith(_ABSOLUTE_FORM):
        full_url = request.target
    else:
        authority = host or (
            f"[{server_host}]:{port}" if ":" in server_host else f"{server_host}:{port}"
        )
        full_url = f"{request.scheme}://{authority}{request.target}"
    env = dict(base_env)
    env["GATEWAY_INTERFACE"] = "CGI/1.1"
    env["SERVER_SOFTWARE"] = SERVER_SOFTWARE
    env["SERVER_PROTOCOL"] = request.protocol
    env["SERVER_NAME"] = _host_name(host) if host else server_host
    env["SERVER_PORT"] = port
    env["REQUEST_METHOD"] = request.method
    env["SCRIPT_NAME"] = ""
    env["PATH_INFO"] = path
    env["QUERY_STRING"] = query
    env["X_FULL_URL"] = full_url
    env["REMOTE_ADDR"] = env["REMOTE_HOST"] = request.remote_addr
    env["CONTENT_LENGTH"] = str(request.body_length)
    env["CONTENT_TYPE"] = content_type
    env.update(passed)
    return env


# -- the response side: CGI output -> HTTP response ---------------------------------

_field_name = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch  # RFC 9110 token
_STATUS, _LOCATION = b"status", b"location"
_DROPPED = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
        b"trailer", b"upgrade", b"content-length",
    }
)  # fmt: skip
_SPECIAL = _DROPPED | {_STATUS, _LOCATION}
_NO_BODY = frozenset({204, 304})
_PHRASES = {int(s): s.phrase for s in http.HTTPStatus}


class BadCgiOutput(ValueError):
    """The guest's stdout is not a CGI response; the message says why."""


class CgiResponse(NamedTuple):
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _header_end(output: bytes) -> tuple[int, int]:
    """(end of the header lines, start of the body), or raise."""
    if output.startswith((b"\n", b"\r\n")):
        raise BadCgiOutput("no header lines before the blank line")
    lf = output.find(b"\n\n", 0, MAX_HEADER_BYTES)
    crlf = output.find(b"\n\r\n", 0, MAX_HEADER_BYTES)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, crlf + 3
    if lf >= 0:
        return lf, lf + 2
    if not output:
        raise BadCgiOutput("no output")
    where = "in its first 64 KiB" if len(output) >= MAX_HEADER_BYTES else "after the header lines"
    raise BadCgiOutput(f"no blank line {where}")


def _status(value: bytes) -> tuple[int, str]:
    code, _, reason = value.partition(b" ")
    if len(code) != 3 or not code.isdigit() or not 200 <= int(code) <= 599:
        raise BadCgiOutput(f"invalid Status {value[:40]!r}: expected a code 200-599 and a reason")
    status = int(code)
    text = reason.strip().decode("utf-8", "replace")
    if not text:
        text = _PHRASES.get(status, "")
    return status, text


def parse_cgi_response(output: bytes) -> CgiResponse:
    """A CGI response (RFC 3875 §6) from the guest's stdout; raises BadCgiOutput."""
    head_end, body_start = _header_end(output)
    status: tuple[int, str] | None = None
    location = False
    headers: list[tuple[str, str]] = []
    for number, line in enumerate(output[:head_end].split(b"\n"), start=1):
        name, colon, value = line.partition(b":")
        if not colon or not _field_name(name):
            shown = line.rstrip(b"\r")[:40].decode("utf-8", "replace")
            raise BadCgiOutput(f"header line {number} is not 'Name: value': {shown!r}")
        value = value.strip(b" \t\r")
        if b"\r" in value or b"\0" in value:
            raise BadCgiOutput(f"header line {number} has a control character in its value")
        lower = name.lower()
        if lower in _SPECIAL:
            if lower == _STATUS:
                status = _status(value)
                continue
            if lower != _LOCATION:
                continue  # hop-by-hop, or framing: the server's business
            location = True
        headers.append((name.decode(), value.decode("utf-8", "replace")))
    code, reason = status if status else ((302, "Found") if location else (200, "OK"))
    body = b"" if code in _NO_BODY else output[body_start:]
    return CgiResponse(code, reason, tuple(headers), body)


class GuestOutcome(enum.Enum):
    EXITED = "exited"  # returned from _start or called proc_exit
    TRAPPED = "trapped"
    TIMED_OUT = "timed out"
    FAILED = "failed"  # could not be instantiated


class GuestResult(NamedTuple):
    """How one request's instance ended, and what it wrote to stdout."""

    outcome: GuestOutcome
    exit_code: int = 0
    output: bytes = b""
    message: str = ""  # a trap's message; for EXITED, why the output is unusable


def error_response(status: int, detail: str) -> CgiResponse:
    """A short text/plain response for errors the server itself reports."""
    reason = http.HTTPStatus(status).phrase
    body = f"{status} {reason}: {detail}\n".encode()
    return CgiResponse(status, reason, (("Content-Type", "text/plain; charset=utf-8"),), body)


def http_response(result: GuestResult, timeout_s: float | None) -> CgiResponse:
    """The HTTP response for a request's GuestResult (500 / 502 / 504 for failures)."""
    if result.outcome is GuestOutcome.TIMED_OUT:
        return error_response(504, f"the handler ran past its timeout of {timeout_s:g}s")
    if result.outcome is GuestOutcome.TRAPPED:
        return error_response(500, f"the handler trapped ({result.message})")
    if result.outcome is GuestOutcome.FAILED:
        return error_response(500, f"the handler could not start ({result.message})")
    try:
        if result.message:
            raise BadCgiOutput(result.message)
        return parse_cgi_response(result.output)
    except BadCgiOutput as exc:
        exited = f"; it exited with code {result.exit_code}" if result.exit_code else ""
        return error_response(502, f"the handler's output is not a CGI response: {exc}{exited}")


# -- wasmtime's C API, for the per-request path --------------------------------------


def _c_function(name: str, restype: Any, *argtypes: Any) -> Any:
    """Our own handle on a C API function: pointers as plain ints, no wrapper frame.

    `dll[name]` makes a new function object, so wasmtime-py's stay untouched.
    """
    function = ffi.dll[name]
    function.restype = restype
    function.argtypes = argtypes
    return function


_P, _I64, _SIZE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
_store_new = _c_function("wasmtime_store_new", _P, _P, _P, _P)
_store_context = _c_function("wasmtime_store_context", _P, _P)
_store_delete = _c_function("wasmtime_store_delete", None, _P)
_store_limiter = _c_function("wasmtime_store_limiter", None, _P, _I64, _I64, _I64, _I64, _I64)
_set_epoch_deadline = _c_function("wasmtime_context_set_epoch_deadline", None, _P, ctypes.c_uint64)
_wasi_new = _c_function("wasi_config_new", _P)
_wasi_delete = _c_function("wasi_config_delete", None, _P)
_wasi_argv = _c_function("wasi_config_set_argv", ctypes.c_bool, _P, _SIZE, _P)
_wasi_env = _c_function("wasi_config_set_env", ctypes.c_bool, _P, _SIZE, _P, _P)
_wasi_stdin_bytes = _c_function("wasi_config_set_stdin_bytes", None, _P, _P)
_wasi_inherit_stdout = _c_function("wasi_config_inherit_stdout", None, _P)
_wasi_inherit_stderr = _c_function("wasi_config_inherit_stderr", None, _P)
_wasi_preopen_dir = _c_function(
    "wasi_config_preopen_dir", ctypes.c_bool, _P, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_bool
)
_set_wasi = _c_function("wasmtime_context_set_wasi", _P, _P, _P)
_byte_vec_new = _c_function("wasm_byte_vec_new", None, _P, _SIZE, ctypes.c_char_p)
_instantiate = _c_function("wasmtime_instance_pre_instantiate", _P, _P, _P, _P, _P)
_export_get = _c_function("wasmtime_instance_export_get", ctypes.c_bool, _P, _P, _P, _SIZE, _P)
_func_call = _c_function("wasmtime_func_call", _P, _P, _P, _P, _SIZE, _P, _SIZE, _P)
_FUNC = ffi.WASMTIME_EXTERN_FUNC.value
_START = b"_start"


def _address(pointer: Any) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def _error(address: int) -> wasmtime.WasmtimeError:
    """wasmtime-py's exception for a wasmtime_error_t* (ExitTrap for proc_exit)."""
    return wasmtime.WasmtimeError._from_ptr(
        ctypes.cast(address, ctypes.POINTER(ffi.wasmtime_error_t))
    )


def _trap(address: int) -> wasmtime.Trap:
    return wasmtime.Trap._from_ptr(ctypes.cast(address, ctypes.POINTER(ffi.wasm_trap_t)))


class _CStrings:
    """Two char* tables (names, values) over one buffer, for wasi_config_set_env.

    One join, one encode and one C-level pointer table: a ctypes array of
    c_char_p costs a conversion per string, several times more.
    """

    __slots__ = ("_buffer", "_starts", "count", "names", "values")

    def __init__(self, env: Mapping[str, str]) -> None:
        parts = [*env, *env.values()]
        text = "\0".join(parts)
        if text.isascii():
            sizes: Iterable[int] = map(len, parts)
            data = text.encode()
        else:
            encoded = [part.encode("utf-8", "replace") for part in parts]
            sizes = map(len, encoded)
            data = b"\0".join(encoded)
        self._buffer = ctypes.create_string_buffer(data)  # NUL-terminated, stable address
        base = ctypes.addressof(self._buffer)
        # each part starts one NUL after the end of the one before it
        starts = itertools.accumulate(map(operator.add, sizes, itertools.repeat(1)), initial=base)
        self._starts = array.array("Q", list(starts))  # from a list: twice as fast
        self.count = len(env)
        self.names = self._starts.buffer_info()[0]
        self.values = self.names + 8 * self.count


class StdoutCapture:
    """The guests' stdout: fd 1 of this process becomes a memfd.

    Guests inherit fd 1 (wasmtime writes and flushes each fd_write to it), so
    capturing a response costs an lseek before and an lseek + pread after,
    where `stdout_file` costs an open with truncation and `stdout_custom` a
    Python callback per write (both measured slower). The memfd is never
    truncated between requests: only the bytes before the offset count.
    """

    def __init__(self) -> None:
        self._fd = os.memfd_create("nova-wagi-stdout", os.MFD_CLOEXEC)
        os.dup2(self._fd, 1)
        sys.stdout = sys.stderr  # a stray print() must not end up in a response

    def rewind(self) -> None:
        os.lseek(1, 0, os.SEEK_SET)

    def take(self) -> bytes | None:
        """What was written since `rewind`; None if that is over MAX_RESPONSE_BYTES."""
        size = os.lseek(1, 0, os.SEEK_CUR)
        if size > SHRINK_STDOUT_ABOVE:
            data = os.pread(self._fd, size, 0) if size <= MAX_RESPONSE_BYTES else None
            os.ftruncate(self._fd, 0)
            return data
        return os.pread(self._fd, size, 0) if size else b""


def pooled_engine() -> wasmtime.Engine:
    """Nova's engine configuration with the pooling instance allocator.

    Same compilation settings as every Nova engine (so the module cache's
    artifacts load into it); instances take pre-reserved slots instead of
    mapping and unmapping their memory on every request.
    """
    config = engine_mod.make_config(parallel_compilation=False)
    pooling = ffi.wasmtime_pooling_allocation_config_new()
    try:
        ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pooling, POOL_SLOTS)
        ffi.wasmtime_pooling_allocation_config_total_memories_set(pooling, POOL_SLOTS)
        ffi.wasmtime_pooling_allocation_config_total_tables_set(pooling, POOL_SLOTS)
        ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(
            pooling, POOL_KEEP_RESIDENT
        )
        ffi.wasmtime_pooling_allocation_config_table_keep_resident_set(pooling, POOL_KEEP_RESIDENT)
        ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pooling)
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pooling)
    return wasmtime.Engine(config)


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
        self._engine = _address(engine.ptr())
        self._pre = _address(pre.ptr())
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
        self._dirs = [(d.host.encode(), d.guest.encode(), not d.read_only) for d in spec.dirs]

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.end()

    def check(self) -> None:
        """Instantiate once without running: fails early, and pays first-use page faults."""
        store = _store_new(self._engine, None, None)
        try:
            self._instantiate(store, _store_context(store), {"NOVA": "check"}, b"")
        finally:
            _store_delete(store)

    def run(self, env: Mapping[str, str], body: bytes) -> GuestResult:
        store = _store_new(self._engine, None, None)
        try:
            context = _store_context(store)
            try:
                func = self._instantiate(store, context, env, body)
            except wasmtime.Trap as exc:
                return GuestResult(GuestOutcome.TRAPPED, message=worker._trap_message(exc))
            except wasmtime.WasmtimeError as exc:
                return GuestResult(GuestOutcome.FAILED, message=worker._first_line(exc))
            return self._call(context, func)
        finally:
            _store_delete(store)

    def _instantiate(self, store: int, context: int, env: Mapping[str, str], body: bytes) -> Any:
        _set_epoch_deadline(context, self._deadline_ticks)
        if self._memory_limit is not None:
            _store_limiter(store, self._memory_limit, -1, -1, -1, -1)
        error = _set_wasi(context, self._wasi_config(env, body))  # takes the config
        if error:
            raise _error(error)
        instance = ffi.wasmtime_instance_t()
        trap = ctypes.c_void_p()
        error = _instantiate(self._pre, context, ctypes.byref(instance), ctypes.byref(trap))
        if error:
            raise _error(error)
        if trap.value:
            raise _trap(trap.value)
        start: Any = ffi.wasmtime_extern_t()
        if (
            not _export_get(context, ctypes.byref(instance), _START, 6, ctypes.byref(start))
            or start.kind != _FUNC
        ):
            raise wasmtime.WasmtimeError("the module exports no _start function")
        return start.of.func

    def _wasi_config(self, env: Mapping[str, str], body: bytes) -> int:
        config: int = _wasi_new()
        try:
            strings = _CStrings(env)
            if not (
                _wasi_argv(config, self._argv_count, self._argv)
                and _wasi_env(config, strings.count, strings.names, strings.values)
            ):
                raise wasmtime.WasmtimeError("cannot set the guest's argv or environment")
            if body:
                stdin = ffi.wasm_byte_vec_t()
                _byte_vec_new(ctypes.byref(stdin), len(body), body)
                _wasi_stdin_bytes(config, ctypes.byref(stdin))  # takes the bytes
            _wasi_inherit_stdout(config)
            _wasi_inherit_stderr(config)
            for host, guest, mutable in self._dirs:
                if not _wasi_preopen_dir(config, host, guest, mutable):
                    raise wasmtime.WasmtimeError(f"cannot preopen {host.decode()!r}")
        except BaseException:
            _wasi_delete(config)
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
            error = _func_call(context, ctypes.byref(func), None, 0, None, 0, ctypes.byref(trap))
        finally:
            if ticker is not None:
                ticker.begin(None, None)  # disarm the watchdog, keep ticking
        output = self._stdout.take()
        if trap.value:
            caught = _trap(trap.value)
            if caught.trap_code == wasmtime.TrapCode.INTERRUPT and self._timeout is not None:
                return GuestResult(GuestOutcome.TIMED_OUT)
            return GuestResult(GuestOutcome.TRAPPED, message=worker._trap_message(caught))
        exit_code = 0
        if error:
            exc = _error(error)
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

    def __init__(self, spec: RunSpec, runner: RequestRunner) -> None:
        self.spec = spec
        self.runner = runner
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
            site = web.TCPSite(
                runner, self._host, self._port, backlog=LISTEN_BACKLOG, reuse_address=True
            )
            try:
                await site.start()
            except OSError as exc:
                return f"cannot listen on {self._host}:{self._port}: {exc.strerror or exc}"
            log.warning("wagi: serving %s on http://%s:%d/", self.spec.name, self._host, self._port)
            await stopping.wait()
            return None
        finally:
            await runner.cleanup()


def serve(
    spec: RunSpec, table: worker.ModuleTable, *, on_watchdog: Callable[[], None] | None = None
) -> ExitStatus:
    """Serve HTTP for `spec` until SIGTERM; the container's ExitStatus (EXITED 0 when stopped).

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
    server = WagiServer(spec, runner)
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
