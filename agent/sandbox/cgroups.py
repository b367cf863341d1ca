"""Each container's cgroup, as the sandbox runtime uses it (agent and daemonless).

The kernel side is `agent.isolation.cgroups`; this module decides when a
worker's cgroup is made, labelled, read and removed:

    spawn   the pool names the worker's future container id and makes
            `containers/<id>` with IDLE_LIMITS; the forked worker joins it at
            once, while idle. A move into a cgroup costs 6-30 ms on this
            host's v1 hierarchies (an RCU grace period; docs/isolation.md),
            which is many warm starts, so a start never moves a process.
            Idle workers' cgroups then carry the latest run's limits (the
            pool's standby limits, as it keeps the latest module on standby).
    claim   `label()`: the runtime writes the run's limits (`run_limits`) in
            a thread before the spec reaches the worker, unless the cgroup
            has them already; the worker's prepare hook knows it joined that
            cgroup at its fork, so guest code never runs outside it.
    end     `settle()`: once the worker is gone, read usage (CPU seconds,
            memory peak, OOM kills) into the ExitStatus, tell an OOM kill
            from another death, and destroy the cgroup.

Every call here blocks on cgroupfs: from asyncio, call it in a thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

from agent.isolation.cgroups import (
    CgroupError,
    Cgroups,
    Limits,
    NoCgroupFilesystem,
    Usage,
    limits_for_run,
    make_prepare_hook,
)
from agent.isolation.cgroups.hook import DEFAULT_PIDS_MAX
from agent.sandbox.spec import ExitReason, ExitStatus, Isolation, RunSpec
from nova.units import format_size

log = logging.getLogger("nova.agent.sandbox.cgroups")

# What an idle worker's cgroup allows before a run relabels it: no fork bombs.
IDLE_LIMITS = Limits(pids_max=DEFAULT_PIDS_MAX)


def new_sandbox_id() -> str:
    """A container id, chosen when its worker is forked (it names the cgroup too)."""
    return secrets.token_hex(6)


def run_limits(spec: RunSpec) -> Limits:
    """The cgroup limits of a run: wasm memory + worker overhead, --cpu, --pids.

    A run with isolation `none` gets no limits at all (its worker may still
    sit in a cgroup, which then only accounts).
    """
    if spec.isolation is not Isolation.CGROUP:
        return Limits()
    return limits_for_run(
        spec, cpu_millicores=spec.cpu_millicores, pids_max=spec.pids_max or DEFAULT_PIDS_MAX
    )


def oom_message(spec: RunSpec) -> str:
    """Why an OOM-killed container ended, for `nova ps` and `nova run`."""
    limit = run_limits(spec).memory_bytes
    if limit is None or spec.memory_bytes is None:
        return "was killed by the kernel's OOM killer (the host ran out of memory)"
    return (
        f"exceeded its memory limit of {format_size(limit)} "
        f"(--memory {format_size(spec.memory_bytes)} plus "
        f"{format_size(limit - spec.memory_bytes)} for the worker process) "
        "and was killed by the kernel"
    )


def usage_json(usage: Usage) -> dict[str, Any]:
    """What a container used, as stored in ExitStatus.extra["usage"] (metrics, billing)."""
    return {
        "cpu_seconds": usage.cpu_seconds,
        "cpu_throttled_seconds": usage.cpu_throttled_seconds,
        "memory_peak_bytes": usage.memory_peak_bytes,
        "oom_kills": usage.oom_kills,
    }


def settle_status(spec: RunSpec, status: ExitStatus, usage: Usage | None) -> ExitStatus:
    """The final status: usage attached, and a worker that died unreported
    (KILLED) in a cgroup that counted an OOM kill reported as OOMKilled."""
    if usage is None:
        return status
    extra = {**status.extra, "usage": usage_json(usage)}
    if status.reason is ExitReason.KILLED and usage.oom_kills:
        return ExitStatus.for_reason(
            ExitReason.OOM_KILLED,
            oom_message(spec),
            entry_ns=status.entry_ns,
            end_ns=status.end_ns,
            memory_bytes=status.memory_bytes,
            extra=extra,
        )
    return dataclasses.replace(status, extra=extra)


class PrepareHook:
    """A hook for `worker.PREPARE_HOOKS`: join the run's cgroup before guest code runs.

    Only runs whose isolation is `cgroup` join. With `create` the hook makes
    the cgroup with `run_limits` first (daemonless `nova run`, where no
    agent made it); otherwise a missing cgroup fails the run, closed.

    `joined` is the container cgroup this worker moved into at its fork (the
    zygote sets it in the child after a successful attach): a run for that
    container needs no check. The check (`/proc/self/cgroup`, `contains`)
    costs ~25 us in a busy process but 150-250 us in a worker that sat idle,
    more than a third of a warm start.
    """

    def __init__(self, cgroups: Cgroups, *, create: bool = False) -> None:
        self.joined: str | None = None
        self._join: Callable[[RunSpec], None] = make_prepare_hook(
            cgroups, limits_for=run_limits if create else None
        )

    def __call__(self, spec: RunSpec) -> None:
        if spec.isolation is Isolation.CGROUP and spec.id != self.joined:
            self._join(spec)


class SandboxCgroups:
    """Nova's container cgroups on this host, as the runtime and the agent use them.

    Methods block (cgroupfs I/O, and `destroy` waits for processes to die).
    `label` raises CgroupError (the start fails, closed); `settle` and
    `discard` never raise: they log what they could not do.
    """

    def __init__(self, cgroups: Cgroups) -> None:
        self.cgroups = cgroups

    @property
    def root_name(self) -> str:
        return self.cgroups.root_name

    @classmethod
    def for_host(cls, root_name: str) -> SandboxCgroups | None:
        """Cgroups when this process may use them (root, a cgroup filesystem), else None.

        A host that has cgroups but where Nova's root cannot be made (a
        missing parent of a delegated `root_name`) raises CgroupError.
        """
        if os.geteuid() != 0:
            return None
        try:
            cgroups = Cgroups.detect(root_name)
        except NoCgroupFilesystem as exc:
            log.warning("containers run without cgroups: %s", exc)
            return None
        cgroups.setup()
        return cls(cgroups)

    def describe(self) -> str:
        roots = ", ".join(self.cgroups.root_paths)
        return f"cgroup v{self.cgroups.version} at {roots}"

    def prepare_idle(self, sandbox_id: str) -> None:
        """Make the cgroup a new worker joins while idle (IDLE_LIMITS)."""
        self.cgroups.create(sandbox_id, IDLE_LIMITS)

    def label(self, spec: RunSpec, current: Limits | None = None) -> Limits:
        """Give `spec.id`'s cgroup the run's limits; returns them.

        `current` is what the existing cgroup has (the pool made it with
        IDLE_LIMITS): equal limits are left alone, others are rewritten. With
        `current` None the cgroup is made if needed (a worker forked without one).
        """
        limits = run_limits(spec)
        if current is None:
            self.cgroups.create(spec.id, limits)
        elif limits != current:
            self.cgroups.container(spec.id).set_limits(limits)
        return limits

    def relabel(self, sandbox_id: str, limits: Limits) -> None:
        """Rewrite an existing cgroup's limits (an idle worker's, ahead of its run)."""
        self.cgroups.container(sandbox_id).set_limits(limits)

    def settle(self, spec: RunSpec, status: ExitStatus) -> ExitStatus:
        """After the worker is gone: read usage into `status`, then destroy the cgroup."""
        box = self.cgroups.container(spec.id)
        usage = None
        try:
            usage = box.usage()
        except CgroupError as exc:
            log.warning("container %s: cannot read its cgroup usage: %s", spec.id, exc)
        self.discard(spec.id)
        return settle_status(spec, status, usage)

    def discard(self, sandbox_id: str) -> None:
        """Destroy a cgroup (killing what is left in it); logs instead of raising."""
        try:
            self.cgroups.container(sandbox_id).destroy()
        except CgroupError as exc:
            log.error("cannot remove the cgroup of %s: %s", sandbox_id, exc)

    def owned(self) -> list[str]:
        """Ids of every container cgroup under Nova's root."""
        return self.cgroups.list_owned()

    def pids(self, sandbox_id: str) -> list[int]:
        return self.cgroups.container(sandbox_id).pids()
