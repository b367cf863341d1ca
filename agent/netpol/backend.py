"""The kernel side of network policy: one interface, two implementations.

`PolicyBackend` turns a `CompiledPolicy` (tables.py) into enforcement in the
kernel. The implementations are `EbpfBackend` (ebpf.py: tc clsact programs
on each container's host veth, maps only change on a policy change) and
`NftBackend` (nft.py: one nftables table, changed in one atomic transaction
per apply). `select_backend()` picks eBPF when this host can run it.

Guarantees every backend gives (and the conformance tests in
tests/linux/test_netpol_matrix.py check with real packets on both):

- `start()` makes the fixed parts once (programs, table, chains) and adopts
  what an earlier run left, without a moment in which an endpoint that was
  enforced is not.
- `apply(compiled)` converges the kernel to `compiled`: it enforces new
  endpoints, forgets gone ones, and updates rules. It never opens a window in
  which an isolated endpoint accepts what neither the old nor the new policy
  allows. On failure it raises `PolicyBackendError` naming what failed; what
  was enforced before stays enforced (never fail open).
- `counters()` gives, per policy name, (allowed, denied) packet counts since
  `start()`. Packets allowed because an endpoint is not isolated, or as
  replies of tracked flows, are under the reserved names in `RESERVED_COUNTERS`.
- `close(remove=True)` removes everything the backend made; `remove=False`
  leaves enforcement in place (an agent restart adopts it).
"""

from __future__ import annotations

import abc
import os
import shutil
from collections.abc import Mapping

from agent.netpol.tables import CompiledPolicy, DirectionTable, EndpointTables
from nova.errors import NovaError

COUNTER_UNISOLATED = "(not isolated)"
COUNTER_ESTABLISHED = "(established)"
COUNTER_SPOOFED = "(spoofed source)"
COUNTER_NOT_IPV4 = "(not IPv4)"
RESERVED_COUNTERS = (COUNTER_UNISOLATED, COUNTER_ESTABLISHED, COUNTER_SPOOFED, COUNTER_NOT_IPV4)
BACKEND_NAMES = ("ebpf", "nftables")


class PolicyBackendError(NovaError):
    """The kernel refused a policy change; `what` failed on `where` because `reason`."""

    def __init__(self, backend: str, what: str, where: str, reason: str) -> None:
        super().__init__(f"{backend} policy backend: {what} on {where} failed: {reason}")
        self.backend = backend
        self.what = what
        self.where = where
        self.reason = reason


class PolicyBackend(abc.ABC):
    """Enforces compiled network policy in the kernel (see the module docstring)."""

    name: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Make the fixed parts once; adopt an earlier run's state."""

    @abc.abstractmethod
    async def apply(self, compiled: CompiledPolicy) -> None:
        """Converge the kernel to `compiled`; PolicyBackendError leaves the last state."""

    @abc.abstractmethod
    async def counters(self) -> Mapping[str, tuple[int, int]]:
        """Policy name -> (allowed, denied) packets."""

    @abc.abstractmethod
    async def close(self, *, remove: bool) -> None:
        """Release this process's handles; with `remove`, uninstall everything made."""


def deny_counter_name(entry: EndpointTables, table: DirectionTable) -> str:
    """The counter a packet dropped by `table` of `entry` is charged to.

    The first policy that isolates the endpoint in that direction if the
    compiler says which (`DirectionTable.policies`), else the first policy with
    a rule there, else `<namespace>/(default-deny)`.
    """
    policies = table.policies
    if policies:
        return policies[0]
    if table.rules:
        return table.rules[0].policy
    return f"{entry.endpoint.namespace}/(default-deny)"


def ebpf_unavailable_reason() -> str | None:
    """None if the eBPF backend can run here, else why not (one line)."""
    if os.geteuid() != 0:
        return "needs root (CAP_BPF and CAP_NET_ADMIN) to load tc programs"
    try:
        import bcc  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "the bcc Python module is not installed (Debian: python3-bpfcc)"
    build = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(build) and not os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return f"no kernel headers for bcc ({build} is missing)"
    return None


def nft_unavailable_reason() -> str | None:
    """None if the nftables backend can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to change nftables"
    if shutil.which("nft") is None:
        return "the nft command is not installed (Debian: nftables)"
    return None


def select_backend(
    preferred: str = "auto",
    *,
    table: str = "nova",
    link_prefix: str = "nvh",
    netns: str | None = None,
    drop_log_rate: int = 0,
) -> PolicyBackend:
    """The backend to use: `preferred` ("ebpf", "nftables"), or with "auto" eBPF if usable.

    `table` names the nftables table (tests use their own); `link_prefix`
    is how the host veths are named (an eBPF backend only ever adopts or
    cleans links named so); `netns` is where the host veths and the bridge
    live (None: this process's netns); `drop_log_rate` > 0 logs at most that many
    dropped packets a second (eBPF: the agent's log; nftables: the kernel log). Raises
    PolicyBackendError when the requested backend cannot run here.
    """
    if preferred not in (*BACKEND_NAMES, "auto"):
        raise PolicyBackendError(
            "select", "backend", repr(preferred), f"use one of auto, {', '.join(BACKEND_NAMES)}"
        )
    if preferred in ("auto", "ebpf"):
        reason = ebpf_unavailable_reason()
        if reason is None:
            from agent.netpol.ebpf import EbpfBackend

            return EbpfBackend(link_prefix=link_prefix, netns=netns, drop_log_rate=drop_log_rate)
        if preferred == "ebpf":
            raise PolicyBackendError("ebpf", "select", "this host", reason)
    reason = nft_unavailable_reason()
    if reason is not None:
        raise PolicyBackendError("nftables", "select", "this host", reason)
    from agent.netpol.nft import NftBackend

    return NftBackend(table=table, netns=netns, drop_log_rate=drop_log_rate)
