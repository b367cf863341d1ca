"""wasmtime's C API, called directly: the per-request path of HTTP workloads.

agent/sandbox/wagi.py instantiates and runs the module once per request,
below wasmtime-py: our own ctypes handles on the C functions it calls,
wasmtime-py's exceptions for the raw error and trap pointers they return,
the environment tables handed to WASI, the capture of the guests' stdout,
and an engine with the pooling instance allocator.

Measured on the 2-core dev VM (one process, the same request alternating
between variants; medians of the fresh-instance path, http-hello `GET /`),
each choice against its alternative:

  wasmtime's C API called directly   47 us   wasmtime-py objects   129 us
  pooling allocator, 1 MiB resident  67 us   pooling 125, on-demand 149 us
  stdout = fd 1, a memfd (inherited) 42 us   stdout_file 75, stdout_custom 155 us
  stdin = in-memory bytes (a POST)   49 us   stdin_file (a memfd)  219 us
"""

from __future__ import annotations

import array
import ctypes
import itertools
import operator
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

from agent.sandbox import engine as engine_mod

MAX_RESPONSE_BYTES = 256 << 20  # larger guest output gets 502
SHRINK_STDOUT_ABOVE = 1 << 20  # give the memfd's pages back after a response this big
POOL_SLOTS = 4  # instances alive at once: one request at a time, plus slack
POOL_KEEP_RESIDENT = 1 << 20  # bytes of a memory slot reset by memset, not page faults

# -- handles on the C functions ---------------------------------------------------------


def _c_function(name: str, restype: Any, *argtypes: Any) -> Any:
    """Our own handle on a C API function: pointers as plain ints, no wrapper frame.

    `dll[name]` makes a new function object, so wasmtime-py's stay untouched.
    """
    function = ffi.dll[name]
    function.restype = restype
    function.argtypes = argtypes
    return function


_P, _I64, _SIZE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
store_new = _c_function("wasmtime_store_new", _P, _P, _P, _P)
store_context = _c_function("wasmtime_store_context", _P, _P)
store_delete = _c_function("wasmtime_store_delete", None, _P)
store_limiter = _c_function("wasmtime_store_limiter", None, _P, _I64, _I64, _I64, _I64, _I64)
set_epoch_deadline = _c_function("wasmtime_context_set_epoch_deadline", None, _P, ctypes.c_uint64)
wasi_new = _c_function("wasi_config_new", _P)
wasi_delete = _c_function("wasi_config_delete", None, _P)
wasi_argv = _c_function("wasi_config_set_argv", ctypes.c_bool, _P, _SIZE, _P)
wasi_env = _c_function("wasi_config_set_env", ctypes.c_bool, _P, _SIZE, _P, _P)
wasi_stdin_bytes = _c_function("wasi_config_set_stdin_bytes", None, _P, _P)
wasi_inherit_stdout = _c_function("wasi_config_inherit_stdout", None, _P)
wasi_inherit_stderr = _c_function("wasi_config_inherit_stderr", None, _P)
wasi_preopen_dir = _c_function(
    "wasi_config_preopen_dir", ctypes.c_bool, _P, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_bool
)
set_wasi = _c_function("wasmtime_context_set_wasi", _P, _P, _P)
byte_vec_new = _c_function("wasm_byte_vec_new", None, _P, _SIZE, ctypes.c_char_p)
instantiate = _c_function("wasmtime_instance_pre_instantiate", _P, _P, _P, _P, _P)
export_get = _c_function("wasmtime_instance_export_get", ctypes.c_bool, _P, _P, _P, _SIZE, _P)
func_call = _c_function("wasmtime_func_call", _P, _P, _P, _P, _SIZE, _P, _SIZE, _P)
EXTERN_FUNC = ffi.WASMTIME_EXTERN_FUNC.value

# -- raw pointers, WASI's environment, stdout, the engine --------------------------------


def address_of(pointer: Any) -> int:
    """The address a ctypes pointer (or wasmtime-py's `.ptr()`) holds; 0 for NULL."""
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def error_at(address: int) -> wasmtime.WasmtimeError:
    """wasmtime-py's exception for a wasmtime_error_t* (ExitTrap for proc_exit)."""
    return wasmtime.WasmtimeError._from_ptr(
        ctypes.cast(address, ctypes.POINTER(ffi.wasmtime_error_t))
    )


def trap_at(address: int) -> wasmtime.Trap:
    """wasmtime-py's Trap for a wasm_trap_t*."""
    return wasmtime.Trap._from_ptr(ctypes.cast(address, ctypes.POINTER(ffi.wasm_trap_t)))


class CStrings:
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
