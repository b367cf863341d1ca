"""`nova run` without an agent: the container runs in this very process.

This process is the container's worker: it resolves the module through the
same compiled-module cache, records the container in the local SQLite state
(so the run is visible and auditable), and executes it with the sandbox's
limits. Nothing keeps running after it returns.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from agent.records import EXITED, ContainerRecord, pid_start_ticks
from agent.sandbox import worker
from agent.sandbox.cache import ModuleCache
from agent.sandbox.spec import ExitReason, ExitStatus, RunSpec
from nova import errors, paths
from nova.store import StoreError, keys, open_store


def run(body: dict[str, Any]) -> int:
    request_ns = time.monotonic_ns()
    from agent.api import parse_create  # the same validation as the agent's API

    spec = parse_create(body)
    cache = ModuleCache(str(paths.cache_dir()))
    module = cache.resolve(spec.module_path)
    container_id = secrets.token_hex(6)
    spec = replace(
        spec,
        id=container_id,
        name=spec.name
        or f"{os.path.basename(spec.module_path).removesuffix('.wasm')}-{container_id[:6]}",
        digest=module.digest,
        artifact=str(module.artifact),
    )
    record = ContainerRecord(
        id=container_id,
        name=spec.name,
        node=socket.gethostname(),
        spec=spec,
        pid=os.getpid(),
        pid_start_ticks=pid_start_ticks(os.getpid()),
    )
    _save(record)
    table = worker.ModuleTable(cache.engine)
    table.add(module.digest, module.module)

    if spec.http_port is not None:
        from agent.sandbox import wagi

        print(f"nova: serving {spec.module_path} on http://{spec.http_host}:{spec.http_port}/ "
              "(Ctrl-C to stop)", file=sys.stderr)  # fmt: skip
        status = wagi.serve(spec, table)
    else:
        status = _execute(spec, table, lambda status: _finish(record, status, request_ns))
    return _finish(record, status, request_ns)


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
