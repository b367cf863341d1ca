"""A worker process: runs exactly one container, then exits.

A worker is forked from the zygote with wasmtime imported and hot modules
already loaded, waits in the warm pool, and on a `run` message:

1. takes the container's stdio (fds sent with the message) as its own 0/1/2,
2. prepares the sandbox (`prepare_sandbox`: the isolation layer joins the
   container's cgroup and netns here, before any guest code runs),
3. instantiates the module in a fresh Store with the run's limits, and
4. calls `_start`, then reports an ExitStatus over the channel and, in agent
   mode, in `<run_dir>/result.json` so a restarted agent can still learn it.

Workers never outlive a lost parent while idle (EOF on the channel ends
them), but a running container keeps running if the agent restarts.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime._extern import wrap_extern

from agent.sandbox import channel, wasi
from agent.sandbox.engine import EPOCH_TICK_S
from agent.sandbox.spec import ExitReason, ExitStatus, Isolation, RunSpec

# A guest blocked in a host call (a long sleep) never reaches an epoch check;
# past its deadline plus this grace, the watchdog ends the worker itself.
WATCHDOG_GRACE_S = 0.5
NO_DEADLINE_TICKS = 1 << 62
WARM_MODULES = 4  # how many of the most recently loaded modules a new worker warms
WASM_PAGE = 65536
LIMIT_SLACK = 32 * WASM_PAGE  # 2 MiB: a typical allocator growth step

PrepareHook = Callable[[RunSpec], None]

REHEARSAL_WAT = '(module (memory (export "memory") 1) (func (export "_start")))'
REHEARSAL_DIGEST = "sha256:rehearsal"
_REHEARSAL_SPEC = RunSpec(
    id="rehearsal",
    name="rehearsal",
    digest=REHEARSAL_DIGEST,
    artifact="",
    argv=("rehearsal", "arg"),
    env=(("NOVA", "rehearsal"),),
    memory_bytes=1 << 20,
    timeout_s=60.0,
    isolation=Isolation.NONE,
)


def _noop() -> None:
    pass


def _noop_start(_entry_ns: int) -> None:
    pass


class Standby:
    """What an idle worker builds ahead of its run: a Store, a WASI context,
    and, for the module it expects, the instance itself.

    Nothing here has run guest code: modules with a start section are never
    instantiated ahead (see ModuleTable.expect), and the run attaches its own
    WASI context (arguments, environment, directories) and limits before
    `_start`. wasmtime looks the WASI context up at call time, so attaching it
    after instantiation is sound.
    """

    def __init__(self, table: ModuleTable, digest: str | None = None) -> None:
        self.store = wasmtime.Store(table.engine)
        self.store.set_epoch_deadline(NO_DEADLINE_TICKS)
        self.wasi = wasi.new_wasi_config()
        self.digest = digest
        self.instance: wasmtime.Instance | None = None
        self.start: object = None
        if digest is not None:
            self.store.set_wasi(wasmtime.WasiConfig())  # a placeholder: no args, no stdio
            self.instance = table.instance_pre(digest, "").instantiate(self.store)
            self.start = export(self.store, self.instance, "_start")


def export(store: wasmtime.Store, instance: wasmtime.Instance, name: str) -> object:
    """One export by name: a single C call instead of wrapping every export.

    wasmtime-py's `instance.exports(store)` builds a Python object for each
    export; on the start path only `_start` is needed.
    """
    item = ffi.wasmtime_extern_t()
    raw = name.encode()
    found = ffi.wasmtime_instance_export_get(
        store._context(), ctypes.byref(instance._instance), raw, len(raw), ctypes.byref(item)
    )
    if not found:
        raise KeyError(name)
    return wrap_extern(item)


class ModuleTable:
    """Per-process: digest -> InstancePre (module + WASI linker, ready to instantiate)."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self.engine = engine
        self.linker = wasmtime.Linker(engine)
        self.linker.define_wasi()
        self._pres: dict[str, wasmtime.InstancePre] = {}
        self._expected: str | None = None

    @property
    def expected(self) -> str | None:
        """The module idle workers instantiate ahead of their run, if any."""
        return self._expected

    def expect(self, digest: str | None) -> None:
        """Instantiate `digest` ahead of runs; the caller vouches it has no start section."""
        self._expected = digest if digest in self._pres else None

    def preload(self, digest: str, artifact: str) -> None:
        if digest not in self._pres:
            module = wasmtime.Module.deserialize_file(self.engine, artifact)
            self._pres[digest] = self.linker.instantiate_pre(module)

    def add(self, digest: str, module: wasmtime.Module) -> None:
        """Use an already loaded module (in-process runs share the cache's)."""
        if digest not in self._pres:
            self._pres[digest] = self.linker.instantiate_pre(module)

    def instance_pre(self, digest: str, artifact: str) -> wasmtime.InstancePre:
        self.preload(digest, artifact)
        return self._pres[digest]

    def __contains__(self, digest: str) -> bool:
        return digest in self._pres

    def warm(self, digest: str | None = None) -> None:
        """Instantiate hot modules once, without running them.

        A freshly forked worker shares the zygote's pages copy-on-write; its
        first instantiation pays for the page faults (about 1.5 ms here).
        Paying them before the worker reports ready keeps them off the start
        path.
        """
        digests = [digest] if digest else list(self._pres)[-WARM_MODULES:]
        for each in digests:
            store = wasmtime.Store(self.engine)
            store.set_limits(memory_size=1 << 30)
            store.set_epoch_deadline(NO_DEADLINE_TICKS)
            store.set_wasi(wasi.build_wasi_config(["warm"], [("NOVA", "warm")], []))
            instance = self._pres[each].instantiate(store)
            export(store, instance, "_start")

    def rehearse(self, ticker: EpochTicker | None, joined: str | None = None) -> None:
        """Go through the whole start path once with a no-op module.

        Python's first pass over code in a forked worker writes to pages it
        shares with the zygote (reference counts, the interpreter's inline
        caches), and each first write copies a page. Rehearsing the exact
        path a run takes (decode the message, build the spec, execute) pays
        for those copies before the worker reports ready: it halved the
        worker's share of a warm start here. A worker that `joined` its
        container's cgroup rehearses as that container, so the prepare hook's
        check (already inside: no move) is rehearsed too.
        """
        if REHEARSAL_DIGEST not in self._pres:
            module = wasmtime.Module(self.engine, bytes(wasmtime.wat2wasm(REHEARSAL_WAT)))
            self.add(REHEARSAL_DIGEST, module)
        rehearsal = _REHEARSAL_SPEC
        if joined is not None:
            rehearsal = dataclasses.replace(rehearsal, id=joined, isolation=Isolation.CGROUP)
        message = json.loads(json.dumps({"op": "run", "spec": rehearsal.to_json()}))
        spec = RunSpec.from_json(message["spec"])
        execute(spec, self, ticker, on_watchdog=_noop, on_start=_noop_start)


class EpochTicker:
    """Advances the engine epoch while a guest runs; idle workers do not tick.

    It also runs the small jobs that must not delay `_start`: announcing the
    start to the parent, and the watchdog for guests blocked in host calls.
    """

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._running = threading.Event()
        self._watchdog_at: float | None = None
        self._on_watchdog: Callable[[], None] | None = None
        self._on_start: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="nova-epoch", daemon=True)
        self._thread.start()

    def begin(
        self,
        watchdog_at: float | None,
        on_watchdog: Callable[[], None] | None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self._watchdog_at = watchdog_at
        self._on_watchdog = on_watchdog
        self._on_start = on_start
        self._running.set()

    def end(self) -> None:
        self._running.clear()

    def _loop(self) -> None:
        while True:
            self._running.wait()
            if self._on_start is not None:
                on_start, self._on_start = self._on_start, None
                on_start()
            time.sleep(EPOCH_TICK_S)
            self._engine.increment_epoch()
            deadline = self._watchdog_at
            if deadline is not None and time.monotonic() > deadline and self._on_watchdog:
                self._on_watchdog()


def prepare_sandbox(spec: RunSpec) -> None:
    """Enter the container's isolation before guest code runs.

    The plain sandbox needs nothing here; the isolation layer (cgroups, netns)
    registers its steps in `PREPARE_HOOKS`.
    """
    for hook in PREPARE_HOOKS:
        hook(spec)


PREPARE_HOOKS: list[PrepareHook] = []


def execute(
    spec: RunSpec,
    table: ModuleTable,
    ticker: EpochTicker | None,
    *,
    on_watchdog: Callable[[], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    standby: Standby | None = None,
) -> ExitStatus:
    """Run the container's `_start` in this process; never raises for guest faults."""
    try:
        prepare_sandbox(spec)
        standby = standby or Standby(table)
        store = standby.store
        if spec.memory_bytes is not None:
            store.set_limits(memory_size=spec.memory_bytes)
        if spec.timeout_s is not None:
            store.set_epoch_deadline(max(1, round(spec.timeout_s / EPOCH_TICK_S)))
        else:
            store.set_epoch_deadline(NO_DEADLINE_TICKS)
        store.set_wasi(wasi.configure_run(standby.wasi, spec.argv, spec.env, spec.preopens()))
        if standby.digest == spec.digest and standby.instance is not None:
            instance, start = standby.instance, standby.start
            if spec.memory_bytes is not None and _memory_size(store, instance) > spec.memory_bytes:
                return ExitStatus.for_reason(
                    ExitReason.FAILED,
                    "cannot start the module: its initial memory exceeds the memory limit",
                )
        else:
            instance = table.instance_pre(spec.digest, spec.artifact).instantiate(store)
            start = export(store, instance, "_start")
    except (wasmtime.WasmtimeError, wasmtime.Trap, OSError, KeyError) as exc:
        return ExitStatus.for_reason(
            ExitReason.FAILED, f"cannot start the module: {_first_line(exc)}"
        )

    entry_ns = 0
    if ticker is not None:
        deadline = None
        if spec.timeout_s is not None:
            deadline = time.monotonic() + spec.timeout_s + WATCHDOG_GRACE_S
        announce = (lambda: on_start(entry_ns or time.monotonic_ns())) if on_start else None
        ticker.begin(deadline, on_watchdog, announce)
    entry_ns = time.monotonic_ns()
    try:
        assert isinstance(start, wasmtime.Func)
        start(store)
        status = ExitStatus(reason=ExitReason.EXITED, exit_code=0)
    except wasmtime.ExitTrap as exc:
        status = ExitStatus(reason=ExitReason.EXITED, exit_code=exc.code)
    except wasmtime.Trap as exc:
        if exc.trap_code == wasmtime.TrapCode.INTERRUPT and spec.timeout_s is not None:
            status = ExitStatus.for_reason(
                ExitReason.TIMEOUT, f"ran past its timeout of {spec.timeout_s:g}s"
            )
        else:
            status = ExitStatus.for_reason(ExitReason.TRAPPED, _trap_message(exc))
    except wasmtime.WasmtimeError as exc:
        status = ExitStatus.for_reason(ExitReason.TRAPPED, _first_line(exc))
    finally:
        if ticker is not None:
            ticker.end()
    memory_bytes = _memory_size(store, instance)
    # wasmtime reports a refused memory.grow to the guest, not to us: a failed run
    # whose memory ended within a few pages of the cap is reported as hitting it.
    limit_hit = spec.memory_bytes is not None and memory_bytes + LIMIT_SLACK > spec.memory_bytes
    return ExitStatus(
        reason=status.reason,
        exit_code=status.exit_code,
        message=status.message,
        entry_ns=entry_ns,
        end_ns=time.monotonic_ns(),
        memory_bytes=memory_bytes,
        memory_limit_hit=limit_hit and status.exit_code != 0,
    )


def _memory_size(store: wasmtime.Store, instance: wasmtime.Instance) -> int:
    try:
        memory = export(store, instance, "memory")
    except KeyError:
        return 0
    return memory.data_len(store) if isinstance(memory, wasmtime.Memory) else 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _trap_message(exc: wasmtime.Trap) -> str:
    # wasmtime's message is "error while executing ...\n\nCaused by:\n    wasm trap: unreachable"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("wasm trap:"):
            return line
    return lines[-1] if lines else "wasm trap"


def write_result(run_dir: str | None, status: ExitStatus) -> None:
    """Persist the result for an agent that may have restarted meanwhile."""
    if not run_dir:
        return
    path = Path(run_dir) / "result.json"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(status.to_json()))
        os.replace(tmp, path)
    except OSError:
        pass  # the channel still carries the result; nothing else to do


def serve(sock: socket.socket, table: ModuleTable, *, joined: str | None = None) -> None:
    """The pooled worker's life: announce readiness, wait for one run, exit.

    `joined` is the container cgroup this worker already sits in, if any.
    """
    ticker = EpochTicker(table.engine)
    table.warm()
    table.rehearse(ticker, joined)
    standby = Standby(table, table.expected)
    channel.send(sock, {"op": "ready", "pid": os.getpid()})
    while True:
        message, fds = channel.recv(sock)
        if message is None:
            os._exit(0)  # the pool is gone and we were never claimed
        if message["op"] == "preload":
            try:
                table.preload(message["digest"], message["artifact"])
                table.warm(message["digest"])
                if message.get("standby"):
                    table.expect(message["digest"])
                    standby = Standby(table, table.expected)
            except (wasmtime.WasmtimeError, wasmtime.Trap, OSError):
                pass  # the run that needs it will report the failure
            continue
        if message["op"] == "run":
            break
    received_ns = time.monotonic_ns()
    idle_cpu_s = time.process_time()  # the worker's own preparation, not the container's
    spec = RunSpec.from_json(message["spec"])
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
        os.close(fd)
    listen_fd = fds[3] if len(fds) > 3 else None  # a published port, bound by the agent

    def watchdog() -> None:
        status = ExitStatus.for_reason(
            ExitReason.TIMEOUT,
            f"ran past its timeout of {spec.timeout_s:g}s (blocked in a host call)",
            end_ns=time.monotonic_ns(),
        )
        _report(sock, spec, status)
        os._exit(status.exit_code)

    def announce_start(entry_ns: int) -> None:
        with contextlib.suppress(OSError):
            channel.send(sock, {"op": "started", "entry_ns": entry_ns})

    if spec.http_port is not None:
        from agent.sandbox import wagi  # only HTTP workers need aiohttp

        announce_start(time.monotonic_ns())
        status = wagi.serve(spec, table, on_watchdog=watchdog, listen_fd=listen_fd)
    else:
        status = execute(
            spec, table, ticker, on_watchdog=watchdog, on_start=announce_start, standby=standby
        )
    status.extra["received_ns"] = received_ns
    status.extra["idle_cpu_seconds"] = idle_cpu_s
    _report(sock, spec, status)
    os._exit(status.exit_code & 0xFF)


def _report(sock: socket.socket, spec: RunSpec, status: ExitStatus) -> None:
    write_result(spec.run_dir, status)
    with contextlib.suppress(OSError):  # the agent restarted; it reads result.json instead
        channel.send(sock, {"op": "result", "status": status.to_json()})


def reset_signals() -> None:
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)


def main(channel_fd: int, cgroup_root: str | None = None) -> None:
    """A worker started as its own interpreter (the cold path: no zygote, no pool).

    With `cgroup_root`, its run joins the container's cgroup in the prepare hook.
    """
    from agent.sandbox.engine import make_engine

    reset_signals()
    os.setsid()
    if cgroup_root is not None:
        from agent.isolation.cgroups import Cgroups
        from agent.sandbox.cgroups import PrepareHook

        PREPARE_HOOKS.append(PrepareHook(Cgroups.detect(cgroup_root)))
    serve(socket.socket(fileno=channel_fd), ModuleTable(make_engine(parallel_compilation=False)))


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
