"""HTTP workloads for real: a worker from SandboxRuntime serving WAGI on loopback.

Each test starts a container with `http_port` on a free 127.0.0.1 port,
talks to it with aiohttp's client, stops it, and checks that the port is
closed and the worker process is gone.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import wasmtime

from agent.sandbox.runtime import Container, SandboxRuntime
from agent.sandbox.spec import ExitReason, RunSpec
from tests.conftest import process_alive

LISTEN_TIMEOUT_S = 30.0  # a new HTTP worker imports aiohttp first

HEAD = "Content-Type: text/plain\n\n"
# Counts in linear memory and in a global: a fresh instance per request prints 1 and 1.
COUNTER_TEXT = HEAD + "memory=0 global=0\n"
MEMORY_DIGIT = 16 + COUNTER_TEXT.index("memory=") + len("memory=")
GLOBAL_DIGIT = 16 + COUNTER_TEXT.index("global=") + len("global=")
COUNTER_DATA = COUNTER_TEXT.replace("\n", "\\n")
COUNTER_WAT = f"""
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (data (i32.const 16) "{COUNTER_DATA}")
  (data (i32.const 512) "counter: to the container log\\n")
  (func $write (param $fd i32) (param $at i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $at))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (i32.store8 (i32.const {MEMORY_DIGIT})
      (i32.add (i32.load8_u (i32.const {MEMORY_DIGIT})) (i32.const 1)))
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (i32.store8 (i32.const {GLOBAL_DIGIT}) (i32.add (i32.const 48) (global.get $count)))
    (call $write (i32.const 1) (i32.const 16) (i32.const {len(COUNTER_TEXT)}))
    (call $write (i32.const 2) (i32.const 512) (i32.const 30))))
"""
SPIN_WAT = '(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))'
TRAP_WAT = '(module (memory (export "memory") 1) (func (export "_start") unreachable))'
NOT_CGI_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "just text\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 10))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wat_module(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.wasm"
    path.write_bytes(wasmtime.wat2wasm(text))
    return path


LAUNCHED: list[Container] = []  # running containers; the fixture stops what a test did not


@pytest.fixture
async def runtime(tmp_path: Path, no_leftover_processes: None) -> AsyncIterator[SandboxRuntime]:
    """A runtime whose containers are all stopped at the end, even when a test fails."""
    rt = SandboxRuntime(str(tmp_path / "cache"), pool_size=1)
    await rt.start()
    try:
        yield rt
    finally:
        try:
            while LAUNCHED:
                await LAUNCHED.pop().stop()
        finally:
            await rt.close()


class Served:
    """A running HTTP container and where its log goes."""

    def __init__(self, container: Container, port: int, log_path: Path) -> None:
        self.container = container
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    async def stop_and_check_gone(self) -> None:
        status = await self.container.stop()
        LAUNCHED.remove(self.container)
        assert status.reason is ExitReason.EXITED, status.describe()
        assert status.exit_code == 0
        assert not port_open(self.port), "the port still accepts connections"
        for _ in range(250):  # 5 s
            if not process_alive(self.container.pid):
                break
            await asyncio.sleep(0.02)
        assert not process_alive(self.container.pid), "the worker process is still there"


async def serve(
    runtime: SandboxRuntime, module: Path, tmp_path: Path, **spec_fields: object
) -> Served:
    cached = await runtime.resolve(str(module))
    port = free_port()
    spec = RunSpec(
        id=f"http-{port}",
        name=module.stem,
        digest=cached.digest,
        artifact=str(cached.artifact),
        module_path=str(module),
        http_port=port,
        **spec_fields,  # type: ignore[arg-type]
    )
    log_path = tmp_path / f"{module.stem}.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        container = await runtime.launch(spec, (null_fd, log_fd, log_fd))
    finally:
        os.close(null_fd)
        os.close(log_fd)
    LAUNCHED.append(container)
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while not port_open(port):
        if not process_alive(container.pid):
            status = await container.wait()
            pytest.fail(f"the container ended before listening: {status.describe()}")
        if time.monotonic() > deadline:
            pytest.fail(f"nothing listened on port {port} within {LISTEN_TIMEOUT_S}s")
        await asyncio.sleep(0.02)
    return Served(container, port, log_path)


async def test_http_hello_routes(runtime: SandboxRuntime, examples: Path, tmp_path: Path) -> None:
    served = await serve(
        runtime,
        examples / "http-hello.wasm",
        tmp_path,
        env=(("HTTP_X_TEST", "from-spec"), ("HTTP_X_KEEP", "kept")),
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(served.url + "/") as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"] == "text/plain"
            assert await reply.read() == b"hello from nova\n"
        body = bytes(range(256)) * 100 + b"no newline at the end"
        headers = {"Content-Type": "application/x-test"}
        async with http.post(served.url + "/echo", data=body, headers=headers) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"] == "application/x-test"
            assert await reply.read() == body
        # The previous response ended without a newline: nothing of it may leak into this one.
        async with http.get(served.url + "/") as reply:
            assert await reply.read() == b"hello from nova\n"
        big = os.urandom(3 << 20)  # past the size at which the stdout buffer is shrunk again
        async with http.post(served.url + "/echo", data=big) as reply:
            assert reply.headers["Content-Type"] == "application/octet-stream"
            assert await reply.read() == big
        async with http.get(served.url + "/") as reply:
            assert await reply.read() == b"hello from nova\n"
        headers = {"X-Test": "from-request"}
        async with http.get(served.url + "/env?name=nova&x=%20y", headers=headers) as reply:
            assert reply.status == 200
            lines = (await reply.text()).splitlines()
        assert lines[:3] == [
            "REQUEST_METHOD=GET",
            "PATH_INFO=/env",
            "QUERY_STRING=name=nova&x=%20y",
        ]
        assert "HTTP_X_TEST=from-request" in lines  # the request overrides the container env
        assert "HTTP_X_KEEP=kept" in lines
        assert f"HTTP_HOST=127.0.0.1:{served.port}" in lines
        async with http.get(served.url + "/missing") as reply:
            assert reply.status == 404
            assert reply.reason == "Not Found"
            assert await reply.read() == b"not found\n"
    await served.stop_and_check_gone()


async def test_every_request_gets_a_fresh_instance(runtime: SandboxRuntime, tmp_path: Path) -> None:
    served = await serve(runtime, wat_module(tmp_path, "counter", COUNTER_WAT), tmp_path)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(served.url + "/") as reply:
                assert reply.status == 200
                assert await reply.read() == b"memory=1 global=1\n"
    await served.stop_and_check_gone()
    log = served.log_path.read_text()
    assert log.count("counter: to the container log\n") == 3  # guest stderr -> the log


async def test_a_request_past_its_timeout_gets_504(runtime: SandboxRuntime, tmp_path: Path) -> None:
    served = await serve(runtime, wat_module(tmp_path, "spin", SPIN_WAT), tmp_path, timeout_s=0.3)
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # the server outlives a timed-out request
            started = time.monotonic()
            async with http.get(served.url + "/") as reply:
                assert reply.status == 504
                text = await reply.text()
            elapsed = time.monotonic() - started
            assert text == "504 Gateway Timeout: the handler ran past its timeout of 0.3s\n"
            assert 0.2 <= elapsed < 3.0, elapsed
    await served.stop_and_check_gone()
    assert "504 Gateway Timeout" in served.log_path.read_text()


async def test_the_per_request_timeout_does_not_end_the_server(
    runtime: SandboxRuntime, examples: Path, tmp_path: Path
) -> None:
    served = await serve(runtime, examples / "http-hello.wasm", tmp_path, timeout_s=0.2)
    waiting = asyncio.ensure_future(served.container.wait())  # what `nova run` does
    await asyncio.sleep(0.2 + 2.0 + 0.5)
    assert not waiting.done(), waiting.result().describe()
    async with aiohttp.ClientSession() as http, http.get(served.url + "/") as reply:
        assert await reply.read() == b"hello from nova\n"
    await served.stop_and_check_gone()


async def test_a_trap_is_500_and_bad_output_502(runtime: SandboxRuntime, tmp_path: Path) -> None:
    trap = await serve(runtime, wat_module(tmp_path, "trap", TRAP_WAT), tmp_path)
    not_cgi = await serve(runtime, wat_module(tmp_path, "not-cgi", NOT_CGI_WAT), tmp_path)
    async with aiohttp.ClientSession() as http:
        async with http.get(trap.url + "/") as reply:
            assert reply.status == 500
            text = await reply.text()
            assert text.startswith("500 Internal Server Error: the handler trapped (wasm trap:")
            assert "unreachable" in text
        async with http.get(not_cgi.url + "/") as reply:
            assert reply.status == 502
            assert reply.headers["Content-Type"].startswith("text/plain")
            assert "no blank line" in await reply.text()
    await trap.stop_and_check_gone()
    await not_cgi.stop_and_check_gone()


async def test_a_taken_port_fails_the_container(runtime: SandboxRuntime, examples: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cached = await runtime.resolve(str(examples / "http-hello.wasm"))
        spec = RunSpec(
            id="http-taken",
            name="taken",
            digest=cached.digest,
            artifact=str(cached.artifact),
            http_port=port,
        )
        null_fd = os.open(os.devnull, os.O_RDWR)
        try:
            container = await runtime.launch(spec, (null_fd, null_fd, null_fd))
        finally:
            os.close(null_fd)
        LAUNCHED.append(container)
        status = await asyncio.wait_for(container.wait(), LISTEN_TIMEOUT_S)
        LAUNCHED.remove(container)
    assert status.reason is ExitReason.FAILED
    assert f"cannot listen on 127.0.0.1:{port}" in status.message
