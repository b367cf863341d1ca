"""The zygote: a single-threaded process that forks pre-warmed workers.

It imports wasmtime, builds the engine and the WASI linker, and deserializes
hot modules once; every worker it forks shares those pages copy-on-write, so
a new worker costs a fork, not an interpreter start and a module load.
It never compiles and never starts threads (forking a threaded process is
unsafe), and it exits when its parent closes the control channel.

Started with a cgroup root name (`zygote.py FD ROOT`), it registers the
cgroup prepare hook in `worker.PREPARE_HOOKS` before forking, so every
worker inherits it, and a worker spawned with `join` moves into its
container's cgroup (made by the agent) right after the fork, while idle.
A worker spawned with a netns fd joins that network namespace first (the
agent made it, with its veth and address: agent/sandbox/network.py).

Requests on the control channel (one reply each):
    {"op": "spawn", "sandbox": ID, "join": B, "netns": B}
        + 1 fd (the worker's end of its channel) [+ 1 fd of the netns to join]
                                                         -> {"pid": N}
    {"op": "preload", "digest": D, "artifact": PATH, "standby": B}
                                                         -> {"ok": bool, "error": str}
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import wasmtime

from agent.isolation.cgroups import Cgroups
from agent.isolation.nsjoin import join_netns
from agent.sandbox import channel, engine, worker
from agent.sandbox import wagi as _wagi  # noqa: F401 (loaded once here, shared by HTTP workers)
from agent.sandbox.cgroups import PrepareHook


def _spawn(
    control: socket.socket,
    worker_sock_fd: int,
    table: worker.ModuleTable,
    join: tuple[Cgroups, PrepareHook, str] | None,
    netns_fd: int | None = None,
) -> int:
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            control.close()
            sock = socket.socket(fileno=worker_sock_fd)
            os.setsid()  # a terminal's Ctrl-C or an agent restart must not reach containers
            worker.reset_signals()
            if netns_fd is not None:
                try:  # first: nothing the worker opens may belong to the host's network
                    join_netns(netns_fd)
                    os.close(netns_fd)
                except OSError as exc:
                    channel.send(sock, {"op": "error", "error": f"cannot join netns: {exc}"})
                    os._exit(71)
            joined = None
            if join is not None:
                cgroups, hook, sandbox_id = join
                try:  # before warming up: the pages it copies are charged to the container
                    cgroups.container(sandbox_id).attach(0)
                except OSError as exc:
                    channel.send(sock, {"op": "error", "error": str(exc)})
                    os._exit(71)
                joined = hook.joined = sandbox_id  # its run needs no membership check
            worker.serve(sock, table, joined=joined)
        finally:
            os._exit(70)
    os.close(worker_sock_fd)
    if netns_fd is not None:
        os.close(netns_fd)
    return pid


def main(control_fd: int, cgroup_root: str | None = None) -> None:
    control = socket.socket(fileno=control_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps workers for us
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    cgroups = hook = None
    if cgroup_root is not None:
        cgroups = Cgroups.detect(cgroup_root)
        hook = PrepareHook(cgroups)
        worker.PREPARE_HOOKS.append(hook)  # inherited by every worker
    table = worker.ModuleTable(engine.make_engine(parallel_compilation=False))
    channel.send(control, {"op": "ready", "pid": os.getpid()})
    while True:
        message, fds = channel.recv(control)
        if message is None:
            return
        op = message.get("op")
        if op == "spawn" and len(fds) == (2 if message.get("netns") else 1):
            join = None
            if message.get("join"):
                if cgroups is None or hook is None:
                    for fd in fds:
                        os.close(fd)
                    channel.send(control, {"error": "the zygote was started without cgroups"})
                    continue
                join = (cgroups, hook, str(message["sandbox"]))
            netns_fd = fds[1] if len(fds) == 2 else None
            channel.send(control, {"pid": _spawn(control, fds[0], table, join, netns_fd)})
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
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
