"""WASI preview1: what Nova provides to guests, and the per-run WASI context."""

from __future__ import annotations

from collections.abc import Iterable

import wasmtime

from nova import errors

WASI_MODULE = "wasi_snapshot_preview1"

# The functions of wasi_snapshot_preview1 (the spec's witx, stable since 2020);
# wasmtime's `define_wasi` provides each of them.
WASI_PREVIEW1_FUNCTIONS = frozenset(
    {
        "args_get", "args_sizes_get", "environ_get", "environ_sizes_get",
        "clock_res_get", "clock_time_get",
        "fd_advise", "fd_allocate", "fd_close", "fd_datasync", "fd_fdstat_get",
        "fd_fdstat_set_flags", "fd_fdstat_set_rights", "fd_filestat_get",
        "fd_filestat_set_size", "fd_filestat_set_times", "fd_pread", "fd_prestat_get",
        "fd_prestat_dir_name", "fd_pwrite", "fd_read", "fd_readdir", "fd_renumber",
        "fd_seek", "fd_sync", "fd_tell", "fd_write",
        "path_create_directory", "path_filestat_get", "path_filestat_set_times",
        "path_link", "path_open", "path_readlink", "path_remove_directory",
        "path_rename", "path_symlink", "path_unlink_file",
        "poll_oneoff", "proc_exit", "proc_raise", "sched_yield", "random_get",
        "sock_accept", "sock_recv", "sock_send", "sock_shutdown",
    }
)  # fmt: skip


def check_imports(module: wasmtime.Module, source: str) -> None:
    """Raise UnsupportedImports naming every import Nova cannot satisfy."""
    missing = [
        f"{imp.module}.{imp.name}"
        for imp in module.imports
        if imp.module != WASI_MODULE or imp.name not in WASI_PREVIEW1_FUNCTIONS
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise errors.UnsupportedImports(
            f"{source}: imports {shown}, which Nova does not provide "
            f"(Nova provides WASI preview1, module {WASI_MODULE!r})"
        )


def check_entry(module: wasmtime.Module, source: str) -> None:
    """A command module must export `_start` (WASI's entry point)."""
    if not any(export.name == "_start" for export in module.exports):
        raise errors.InvalidModule(
            f"{source}: exports no _start function; Nova runs WASI command modules "
            "(build with a wasm32-wasi toolchain and a main function)"
        )


def new_wasi_config() -> wasmtime.WasiConfig:
    """A WASI context using the process's stdio, which a worker has made the container's.

    The stdio handles resolve when the context is attached to a store, so a
    worker builds this while idle and only adds the run's arguments later.
    """
    config = wasmtime.WasiConfig()
    config.inherit_stdin()
    config.inherit_stdout()
    config.inherit_stderr()
    return config


def configure_run(
    config: wasmtime.WasiConfig,
    argv: Iterable[str],
    env: Iterable[tuple[str, str]],
    dirs: Iterable[tuple[str, str, bool]],
) -> wasmtime.WasiConfig:
    config.argv = list(argv)
    config.env = [list(pair) for pair in env]
    for host, guest, read_only in dirs:
        config.preopen_dir(host, guest, fs_mutable=not read_only)
    return config


def build_wasi_config(
    argv: Iterable[str],
    env: Iterable[tuple[str, str]],
    dirs: Iterable[tuple[str, str, bool]],
) -> wasmtime.WasiConfig:
    """A complete WASI context for one run, with the process's stdio."""
    return configure_run(new_wasi_config(), argv, env, dirs)
