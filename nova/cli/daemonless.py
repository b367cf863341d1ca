"""`nova run` without an agent: the container runs in this very process.

This process is the container's worker: it resolves the module through the
same compiled-module cache, records the container in the local SQLite state
(so the run is visible and auditable), and executes it with the sandbox's
limits. Nothing keeps running after it returns.

As root (isolation `auto`), the container gets a cgroup of its own. A
process cannot remove the cgroup it sits in, nor report its own OOM kill,
so `nova run` then forks first, before it has any threads: the child is the
worker (its prepare hook makes the cgroup with the run's limits and joins it
before guest code runs), and the parent stays outside as its supervisor. The
child first enters the container's own netns (made by the parent before the
fork, on its namespace's segment, as the agent does: daemonless_network.py).
The parent waits, reads the cgroup's usage, tells an OOM kill from other deaths,
records how the container ended, removes the cgroup and exits with the
container's code. The worker dies with its supervisor (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from agent.isolation.nsjoin import join_netns
from agent.records import EXITED, ContainerRecord, pid_start_ticks
from agent.sandbox import worker
from agent.sandbox.cache import ModuleCache
from agent.sandbox.cgroups import PrepareHook, SandboxCgroups, new_sandbox_id
from agent.sandbox.spec import ExitReason, ExitStatus, Isolation, RunSpec
from nova import errors, paths
from nova.cli import daemonless_network
from nova.store import StoreError, keys, open_store

PR_SET_PDEATHSIG = 1
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def run(body: dict[str, Any]) -> int:
    request_ns = time.monotonic_ns()
    from agent.api import parse_create  # the same validation as the agent's API

    spec = parse_create(body)
    spec = replace(spec, id=new_sandbox_id())
    cgroups = _host_cgroups(spec)
    if cgroups is None:
        return _run(replace(spec, isolation=Isolation.NONE), _FinishHere(request_ns))
    return _supervise(replace(spec, isolation=Isolation.CGROUP), cgroups, request_ns)


def _host_cgroups(spec: RunSpec) -> SandboxCgroups | None:
    """This run's cgroups, or None (isolation none, or not root: one notice if it matters)."""
    if spec.isolation is Isolation.NONE:
        return None
    try:
        cgroups = SandboxCgroups.for_host(paths.cgroup_root())
    except ValueError as exc:
        raise errors.UsageError(
            f"invalid NOVA_CGROUP_ROOT {paths.cgroup_root()!r}: {exc}"
        ) from None
    except OSError as exc:
        raise errors.SandboxError(f"cannot set up the container's cgroup: {exc}") from None
    if cgroups is None and (spec.cpu_millicores is not None or spec.pids_max is not None):
        asked = [
            flag
            for flag, value in (("--cpu", spec.cpu_millicores), ("--pids", spec.pids_max))
            if value is not None
        ]
        verb = "needs" if len(asked) == 1 else "need"
        print(
            f"nova: {' and '.join(asked)} {verb} cgroups, which need root: running without them "
            "(--isolation none; only the wasm limits hold)",
            file=sys.stderr,
        )
    return cgroups


class Finisher(Protocol):
    """Where a run reports: this process's own records, or its supervisor."""

    def started(self, record: ContainerRecord) -> None: ...
    def ended(self, record: ContainerRecord, status: ExitStatus) -> int: ...


def _run(
    spec: RunSpec,
    finisher: Finisher,
    *,
    listen_fd: int | None = None,
    network: dict[str, Any] | None = None,
) -> int:
    """Resolve, record and execute the container in this process (the worker)."""
    cache = ModuleCache(str(paths.cache_dir()))
    module = cache.resolve(spec.module_path)
    spec = replace(
        spec,
        name=spec.name
        or f"{os.path.basename(spec.module_path).removesuffix('.wasm')}-{spec.id[:6]}",
        digest=module.digest,
        artifact=str(module.artifact),
    )
    record = ContainerRecord(
        id=spec.id,
        name=spec.name,
        node=socket.gethostname(),
        spec=spec,
        pid=os.getpid(),
        pid_start_ticks=pid_start_ticks(os.getpid()),
        network=network,
    )
    _save(record)
    finisher.started(record)
    table = worker.ModuleTable(cache.engine)
    table.add(module.digest, module.module)

    if spec.http_port is not None:
        from agent.sandbox import wagi

        print(f"nova: serving {spec.module_path} on http://{spec.http_host}:{spec.http_port}/ "
              "(Ctrl-C to stop)", file=sys.stderr)  # fmt: skip
        status = wagi.serve(spec, table, listen_fd=listen_fd)
    else:
        status = _execute(spec, table, lambda status: finisher.ended(record, status))
    return finisher.ended(record, status)


class _FinishHere:
    """The plain daemonless run: record the end and report it from this process."""

    def __init__(self, request_ns: int) -> None:
        self.request_ns = request_ns

    def started(self, record: ContainerRecord) -> None:
        pass

    def ended(self, record: ContainerRecord, status: ExitStatus) -> int:
        return _finish(record, status, self.request_ns)


class _ReportToSupervisor:
    """The worker child: hand the record and the end to the parent, which finishes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, message: dict[str, Any]) -> None:
        data = memoryview(json.dumps(message).encode() + b"\n")
        with contextlib.suppress(OSError):  # the supervisor is gone: we die with it anyway
            while data:
                data = data[os.write(self.fd, data) :]

    def started(self, record: ContainerRecord) -> None:
        self.send({"record": record.to_json()})

    def ended(self, record: ContainerRecord, status: ExitStatus) -> int:
        self.send({"status": status.to_json()})
        return status.exit_code


def _supervise(spec: RunSpec, cgroups: SandboxCgroups, request_ns: int) -> int:
    """Fork the worker into the container's cgroup and netns; wait outside; finish the run."""
    network = daemonless_network.attach(spec)  # before the fork: it leaves no thread behind
    try:
        return _supervise_in(spec, cgroups, request_ns, network)
    finally:
        network.close_fds()
        daemonless_network.detach(spec.id)


def _supervise_in(
    spec: RunSpec,
    cgroups: SandboxCgroups,
    request_ns: int,
    network: daemonless_network.DaemonlessNetwork,
) -> int:
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os._exit(_worker_child(spec, cgroups, write_end, parent, network))
    os.close(write_end)
    pidfd = os.pidfd_open(pid)
    interrupted = False

    def interrupt(_sig: int, _frame: object) -> None:
        # A guest blocked in a host call or spinning in wasm never sees its own
        # SIGINT (Python runs handlers between bytecodes): end it with SIGTERM.
        nonlocal interrupted
        interrupted = True
        _forward(pidfd, signal.SIGTERM)

    previous = {sig: signal.getsignal(sig) for sig in (*FORWARDED_SIGNALS, signal.SIGINT)}
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda sig, _frame: _forward(pidfd, sig))
    signal.signal(signal.SIGINT, interrupt)
    try:
        with os.fdopen(read_end, "rb") as reports:
            lines = reports.read().splitlines()  # EOF: the worker exited (or closed it)
        _, wait_status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(pidfd)
    messages = [message for line in lines if (message := _message(line)) is not None]
    record_json = next((m["record"] for m in messages if "record" in m), None)
    status_json = next((m["status"] for m in messages if "status" in m), None)
    error = next((m["error"] for m in messages if "error" in m), None)
    if record_json is None:  # it ended before the container started: nothing to record
        cgroups.discard(spec.id)
        if error is not None:
            failure = errors.NovaError(error["message"])
            failure.exit_code = int(error["exit_code"])
            raise failure
        return _status_of(wait_status, status_json, interrupted=interrupted).exit_code
    if status_json is None and error is not None:
        status = ExitStatus(
            reason=ExitReason.FAILED, exit_code=int(error["exit_code"]), message=error["message"]
        )
    else:
        status = _status_of(wait_status, status_json, interrupted=interrupted)
    record = ContainerRecord.from_json(record_json)
    return _finish(record, cgroups.settle(record.spec, status), request_ns)


def _message(line: bytes) -> dict[str, Any] | None:
    """One report from the worker; None for a line cut short by its death."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _forward(pidfd: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, sig)


def _status_of(
    wait_status: int, reported: dict[str, Any] | None, *, interrupted: bool = False
) -> ExitStatus:
    """How the worker ended: what it reported, or what its exit tells."""
    if reported is not None:
        return ExitStatus.from_json(reported)
    code = os.waitstatus_to_exitcode(wait_status)
    if interrupted and code == -signal.SIGTERM:
        return ExitStatus(
            reason=ExitReason.STOPPED, exit_code=EXIT_INTERRUPTED, message="interrupted"
        )
    if code >= 0:
        return ExitStatus(
            reason=ExitReason.FAILED,
            exit_code=code,
            message=f"the worker exited with {code} without reporting how the container ended",
        )
    sig = signal.Signals(-code)
    return ExitStatus(
        reason=ExitReason.KILLED,
        exit_code=128 + sig.value,
        message=f"the worker process was killed by {sig.name}",
    )


def _worker_child(
    spec: RunSpec,
    cgroups: SandboxCgroups,
    report_fd: int,
    parent: int,
    network: daemonless_network.DaemonlessNetwork,
) -> int:
    """The forked worker: dies with its supervisor, enters its netns, joins the cgroup
    in its prepare hook."""
    report = _ReportToSupervisor(report_fd)
    try:
        _die_with_parent(parent)
        join_netns(network.netns_fd)
        worker.PREPARE_HOOKS.append(PrepareHook(cgroups.cgroups, create=True))
        listen_fd = network.listener.fileno() if network.listener is not None else None
        code = _run(spec, report, listen_fd=listen_fd, network=network.attachment.to_json())
    except errors.NovaError as exc:
        report.send({"error": {"message": exc.message, "exit_code": exc.exit_code}})
        code = exc.exit_code
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        status = ExitStatus(reason=ExitReason.STOPPED, exit_code=code, message="interrupted")
        report.send({"status": status.to_json()})
    except BaseException:
        traceback.print_exc()
        code = errors.EXIT_NOVA
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    return code & 0xFF


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the supervisor died before the prctl
        os._exit(errors.EXIT_KILLED)


def _finish(record: ContainerRecord, status: ExitStatus, request_ns: int) -> int:
    record.state = EXITED
    record.status = status
    record.finished_at = time.time()
    if status.entry_ns:
        record.startup_us = (status.entry_ns - request_ns) / 1000
    _save(record)
    if status.reason is not ExitReason.EXITED or status.memory_limit_hit:
        print(f"nova: container {record.name} {status.describe()}", file=sys.stderr)
    return status.exit_code


def _execute(
    spec: RunSpec, table: worker.ModuleTable, finish: Callable[[ExitStatus], int]
) -> ExitStatus:
    ticker = worker.EpochTicker(table.engine)

    def watchdog() -> None:
        # The guest is blocked in a host call past its deadline: end the process.
        status = ExitStatus.for_reason(
            ExitReason.TIMEOUT, f"ran past its timeout of {spec.timeout_s:g}s"
        )
        os._exit(finish(status))

    sys.stdout.flush()
    return worker.execute(spec, table, ticker, on_watchdog=watchdog)


def _save(record: ContainerRecord) -> None:
    """Best effort: a read-only or full state disk must not stop the run."""

    async def put() -> None:
        store = open_store(str(paths.store_path()))
        await store.open()
        try:
            await store.put_json(keys.container(record.node, record.id), record.to_json())
        finally:
            await store.close()

    try:
        asyncio.run(put())
    except (StoreError, OSError) as exc:
        message = exc.message if isinstance(exc, errors.NovaError) else str(exc)
        print(
            f"nova: warning: cannot record the container in local state: {message}", file=sys.stderr
        )
