"""The zygote: a single-threaded process that forks pre-warmed workers.

It imports wasmtime, builds the engine and the WASI linker, and deserializes
hot modules once; every worker it forks shares those pages copy-on-write, so
a new worker costs a fork, not an interpreter start and a module load.
It never compiles and never starts threads (forking a threaded process is
unsafe), and it exits when its parent closes the control channel.

Requests on the control channel (one reply each):
    {"op": "spawn"} + 1 fd (the worker's end of its channel) -> {"pid": N}
    {"op": "preload", "digest": D, "artifact": PATH, "standby": B}
                                                         -> {"ok": bool, "error": str}
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import wasmtime

from agent.sandbox import channel, engine, worker
from agent.sandbox import wagi as _wagi  # noqa: F401 (loaded once here, shared by HTTP workers)


def _spawn(control: socket.socket, worker_sock_fd: int, table: worker.ModuleTable) -> int:
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            control.close()
            os.setsid()  # a terminal's Ctrl-C or an agent restart must not reach containers
            worker.reset_signals()
            worker.serve(socket.socket(fileno=worker_sock_fd), table)
        finally:
            os._exit(70)
    os.close(worker_sock_fd)
    return pid


def main(control_fd: int) -> None:
    control = socket.socket(fileno=control_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps workers for us
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    table = worker.ModuleTable(engine.make_engine(parallel_compilation=False))
    channel.send(control, {"op": "ready", "pid": os.getpid()})
    while True:
        message, fds = channel.recv(control)
        if message is None:
            return
        op = message.get("op")
        if op == "spawn" and len(fds) == 1:
            channel.send(control, {"pid": _spawn(control, fds[0], table)})
        elif op == "preload":
            try:
                table.preload(message["digest"], message["artifact"])
                table.expect(message["digest"] if message.get("standby") else None)
                channel.send(control, {"ok": True})
            except (wasmtime.WasmtimeError, OSError) as exc:
                channel.send(control, {"ok": False, "error": str(exc).strip()[:500]})
        else:
            for fd in fds:
                os.close(fd)
            channel.send(control, {"error": f"unknown request {op!r}"})


if __name__ == "__main__":
    main(int(sys.argv[1]))
