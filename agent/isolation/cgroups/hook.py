"""Joining a container's cgroup from the worker, before guest code runs.

`make_prepare_hook` builds a function for `agent.sandbox.worker.PREPARE_HOOKS`.
The worker calls it with the run's RunSpec; it moves the calling process
(all its threads) into the cgroup of `spec.id`. A failure raises CgroupError,
an OSError, so the worker reports the run as Failed instead of running it
outside its limits.

Moving a process is expensive: 6-8 ms on this host's v1 hierarchies when no
migration happened in the last few milliseconds (the kernel's threadgroup
rw-semaphore waits for an RCU grace period), ~70 us back to back. That is
more than a whole warm start, so a pool worker should join its sandbox's
cgroup while idle; then the hook only reads /proc/self/cgroup (~25 us,
`Container.contains`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.isolation.cgroups.base import Cgroups, Limits

if TYPE_CHECKING:
    from agent.sandbox.spec import RunSpec

# The worker process itself (interpreter pages it writes after the fork,
# wasmtime's Store and instance, the guest's stack) on top of linear memory.
WORKER_MEMORY_OVERHEAD = 64 << 20
DEFAULT_PIDS_MAX = 64  # a worker is a handful of threads; this stops fork bombs in host calls


def limits_for_run(
    spec: RunSpec,
    *,
    cpu_millicores: int | None = None,
    pids_max: int | None = DEFAULT_PIDS_MAX,
    memory_overhead_bytes: int = WORKER_MEMORY_OVERHEAD,
) -> Limits:
    """The cgroup limits for a run: its wasm memory limit plus the worker's own
    overhead, the CPU quota the user asked for (`--cpu`), and a pids cap."""
    memory = None
    if spec.memory_bytes is not None:
        memory = spec.memory_bytes + memory_overhead_bytes
    return Limits(memory_bytes=memory, cpu_millicores=cpu_millicores, pids_max=pids_max)


def make_prepare_hook(
    cgroups: Cgroups, *, limits_for: Callable[[RunSpec], Limits] | None = None
) -> Callable[[RunSpec], None]:
    """A worker prepare hook that moves the calling process into `spec.id`'s cgroup.

    Without `limits_for`, the cgroup must exist already (the agent made it and
    set its limits); a missing one fails the run. With it, the hook makes the
    cgroup and applies `limits_for(spec)` first (idempotent): for a worker no
    agent prepared, such as daemonless `nova run`.
    """

    def prepare(spec: RunSpec) -> None:
        container = cgroups.container(spec.id)
        if limits_for is not None:
            container.create(limits_for(spec))
        if not container.contains(0):  # a pool worker may have joined while idle
            container.attach(0)

    return prepare
