"""The sandbox end to end: real worker processes from the zygote, real wasmtime.

No root needed. Each test runs example apps (examples/apps/*.c built for
wasm32-wasi) and checks what a user would see: output, exit codes, limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.sandbox import channel
from agent.sandbox.process import WorkerHandle
from agent.sandbox.runtime import Container, SandboxRuntime
from agent.sandbox.spec import DirMount, ExitReason, ExitStatus, RunSpec
from tests.conftest import process_alive

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[SandboxRuntime]:
    rt = SandboxRuntime(str(tmp_path / "cache"), pool_size=2)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


class Run:
    """One container's outcome, with its captured stdout and stderr."""

    def __init__(self, status: ExitStatus, stdout: str, stderr: str, container: Container):
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.container = container


async def run(
    rt: SandboxRuntime,
    app: Path,
    tmp_path: Path,
    *args: str,
    stdin: bytes = b"",
    **spec_fields: object,
) -> Run:
    module = await rt.resolve(str(app))
    out, err, inp = tmp_path / "out", tmp_path / "err", tmp_path / "in"
    inp.write_bytes(stdin)
    spec = RunSpec(
        id="t",
        name="t",
        digest=module.digest,
        artifact=str(module.artifact),
        argv=(app.name, *args),
        **spec_fields,  # type: ignore[arg-type]
    )
    fds = (
        os.open(inp, os.O_RDONLY),
        os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    )
    try:
        container = await rt.launch(spec, fds)
    finally:
        for fd in fds:
            os.close(fd)
    status = await container.wait()
    return Run(status, out.read_text(), err.read_text(), container)


async def test_args_env_and_stdout(runtime: SandboxRuntime, examples: Path, tmp_path: Path) -> None:
    result = await run(
        runtime, examples / "hello.wasm", tmp_path, "one", "two words", env=(("NAME", "nova"),)
    )
    assert result.status.reason is ExitReason.EXITED and result.status.exit_code == 0
    assert result.stdout == "hello from wasm, nova\narg[1]=one\narg[2]=two words\n"


async def test_runs_in_its_own_process(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    result = await run(runtime, examples / "hello.wasm", tmp_path)
    assert result.container.pid != os.getpid()
    assert result.container.pid != runtime.zygote.pid  # type: ignore[union-attr]
    await result.container.worker.exited()
    assert not process_alive(result.container.pid)  # one container per worker, then gone


async def test_stdin_reaches_the_guest(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    result = await run(runtime, examples / "cat.wasm", tmp_path, stdin=b"piped in\n")
    assert result.stdout == "piped in\n"


async def test_exit_code_passes_through(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    result = await run(runtime, examples / "exit.wasm", tmp_path, "42")
    assert (result.status.reason, result.status.exit_code) == (ExitReason.EXITED, 42)


async def test_trap_is_reported_as_trap(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    result = await run(runtime, examples / "trap.wasm", tmp_path)
    assert result.status.reason is ExitReason.TRAPPED
    assert result.status.exit_code == 134
    assert "unreachable" in result.status.message


async def test_preopened_dir_read_and_read_only(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("from the host\n")
    rw = (DirMount(str(data), "/data"),)
    ro = (DirMount(str(data), "/data", read_only=True),)

    read = await run(runtime, examples / "cat.wasm", tmp_path, "/data/notes.txt", dirs=ro)
    assert read.stdout == "from the host\n"

    denied = await run(
        runtime, examples / "cat.wasm", tmp_path, "--write", "/data/new.txt", "x", dirs=ro
    )
    assert denied.status.exit_code == 1
    assert not (data / "new.txt").exists()

    wrote = await run(
        runtime, examples / "cat.wasm", tmp_path, "--write", "/data/new.txt", "x", dirs=rw
    )
    assert wrote.status.exit_code == 0
    assert (data / "new.txt").read_text() == "x"

    outside = await run(runtime, examples / "cat.wasm", tmp_path, "/etc/hostname", dirs=ro)
    assert outside.status.exit_code != 0  # nothing outside the preopen is reachable


async def test_clocks_and_random(runtime: SandboxRuntime, examples: Path, tmp_path: Path) -> None:
    first = await run(runtime, examples / "clock-random.wasm", tmp_path)
    second = await run(runtime, examples / "clock-random.wasm", tmp_path)
    values = [dict(line.split("=", 1) for line in r.stdout.split()) for r in (first, second)]
    assert abs(float(values[0]["realtime"]) - time.time()) < 60
    assert values[0]["monotonic_ok"] == "1"
    assert len(values[0]["random"]) == 32
    assert values[0]["random"] != values[1]["random"]


async def test_runaway_cpu_is_stopped_on_time(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    result = await run(runtime, examples / "cpu-spin.wasm", tmp_path, timeout_s=0.3)
    elapsed = time.monotonic() - started
    assert result.status.reason is ExitReason.TIMEOUT
    assert result.status.exit_code == 124
    assert elapsed < 2.0


async def test_guest_blocked_in_sleep_is_stopped_by_the_watchdog(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    result = await run(runtime, examples / "sleep.wasm", tmp_path, "30", timeout_s=0.3)
    assert result.status.reason is ExitReason.TIMEOUT
    assert time.monotonic() - started < 3.0


async def test_memory_cap_holds(runtime: SandboxRuntime, examples: Path, tmp_path: Path) -> None:
    capped = await run(runtime, examples / "mem-grow.wasm", tmp_path, "64", memory_bytes=16 << 20)
    assert capped.status.exit_code == 3
    assert "allocation failed" in capped.stderr
    assert capped.status.memory_bytes <= 16 << 20
    assert capped.status.memory_limit_hit

    free = await run(runtime, examples / "mem-grow.wasm", tmp_path, "32", memory_bytes=64 << 20)
    assert free.status.exit_code == 0
    assert free.status.memory_bytes >= 32 << 20
    assert not free.status.memory_limit_hit


async def test_stop_ends_a_running_container(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    module = await runtime.resolve(str(examples / "cpu-spin.wasm"))
    spec = RunSpec(
        id="s", name="s", digest=module.digest, artifact=str(module.artifact), argv=("spin",)
    )
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        container = await runtime.launch(spec, (devnull, devnull, devnull))
    finally:
        os.close(devnull)
    try:
        await asyncio.wait_for(container.wait_started(), 5)
        assert process_alive(container.pid)
        status = await container.stop(grace_s=1.0)
        assert status.reason is ExitReason.STOPPED
        assert not process_alive(container.pid)
    finally:
        container.worker.kill()  # a spinning guest must never outlive a failed test


async def test_pool_refills_in_the_background(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    pool = runtime.pool
    assert pool is not None and pool.idle == 2
    result = await run(runtime, examples / "hello.wasm", tmp_path)
    assert result.container.pooled
    deadline = time.monotonic() + 5
    while pool.idle < 2 and time.monotonic() < deadline:  # noqa: ASYNC110 (polling a counter)
        await asyncio.sleep(0.01)
    assert pool.idle == 2
    assert pool.stats.hits >= 1


async def test_startup_is_recorded(runtime: SandboxRuntime, examples: Path, tmp_path: Path) -> None:
    result = await run(runtime, examples / "hello.wasm", tmp_path)
    assert result.container.request_ns < result.status.entry_ns < result.status.end_ns


async def test_cold_path_without_zygote(examples: Path, tmp_path: Path) -> None:
    rt = SandboxRuntime(str(tmp_path / "cache"), use_zygote=False)
    await rt.start()
    try:
        result = await run(rt, examples / "hello.wasm", tmp_path, env=(("NAME", "cold"),))
    finally:
        await rt.close()
    assert result.stdout.startswith("hello from wasm, cold")
    assert not result.container.pooled


START_SECTION_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "init\\n")
  (data (i32.const 200) "main\\n")
  (func $say (param $ptr i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 20))))
  (func $init (call $say (i32.const 100)))
  (start $init)
  (func (export "_start") (call $say (i32.const 200))))
"""


async def test_start_section_runs_inside_the_container_not_ahead(
    runtime: SandboxRuntime, tmp_path: Path
) -> None:
    """Idle workers instantiate hot modules ahead of time, but never ones whose
    start section would run guest code before the container exists."""
    import wasmtime

    app = tmp_path / "init.wasm"
    app.write_bytes(wasmtime.wat2wasm(START_SECTION_WAT))
    for _ in range(3):  # the first run makes it hot; later ones take fresh workers
        result = await run(runtime, app, tmp_path)
        assert result.stdout == "init\nmain\n"


async def test_alternating_modules_each_get_their_own(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    """Workers keep the latest module on standby; another module still runs right."""
    for _ in range(3):
        hello = await run(runtime, examples / "hello.wasm", tmp_path, env=(("NAME", "a"),))
        assert hello.stdout == "hello from wasm, a\n"
        code = await run(runtime, examples / "exit.wasm", tmp_path, "9")
        assert code.status.exit_code == 9


async def test_cancelling_a_wait_for_ready_is_never_lost() -> None:
    """A worker's "ready" and a cancellation (the pool closing) can arrive in the
    same loop iteration; the wait must end cancelled, or the pool's close waits
    forever on a refill task that went on (Python 3.11's wait_for lost these)."""
    lost = []
    for yields in range(8):
        ours, theirs = channel.pair()
        handle = WorkerHandle(os.getpid(), ours, sandbox_id=f"ready-{yields}")
        waiting = asyncio.ensure_future(handle.wait_ready())
        await asyncio.sleep(0)
        channel.send(theirs, {"op": "ready", "pid": os.getpid()})
        for _ in range(yields):
            await asyncio.sleep(0)
        cancelled = waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        if cancelled and not waiting.cancelled():
            lost.append(yields)
        handle.close_channel()
        theirs.close()
    assert not lost, f"cancellation lost after {lost} loop iterations"
