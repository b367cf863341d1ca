"""Shared by the netpol unit tests: a recording backend, endpoints, policy texts.

`RecordingBackend` is an in-memory PolicyBackend that records what reaches it
(pure-logic tests only).

The real backends (eBPF, nftables) are tested with real packets in
tests/linux; this one lets the engine's logic be tested without root.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from ipaddress import IPv4Address
from pathlib import Path

from agent.netpol.backend import PolicyBackend, PolicyBackendError
from agent.netpol.tables import CompiledPolicy, Endpoint


class RecordingBackend(PolicyBackend):
    name = "recording"

    def __init__(self) -> None:
        self.started = False
        self.closed_with: bool | None = None
        self.applied: list[tuple[float, CompiledPolicy]] = []  # (monotonic time, compiled)
        self.fail_next = 0  # the next N applies raise, as a refusing kernel would
        self.counts: dict[str, tuple[int, int]] = {}
        self.applied_event = asyncio.Event()

    @property
    def current(self) -> CompiledPolicy:
        assert self.applied, "nothing applied yet"
        return self.applied[-1][1]

    async def start(self) -> None:
        self.started = True

    async def apply(self, compiled: CompiledPolicy) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise PolicyBackendError("recording", "apply", "memory", "refused for the test")
        self.applied.append((time.monotonic(), compiled))
        self.applied_event.set()

    async def counters(self) -> Mapping[str, tuple[int, int]]:
        return dict(self.counts)

    async def close(self, *, remove: bool) -> None:
        self.closed_with = remove


A = Endpoint("ep-a", IPv4Address("10.0.1.1"), "x", {"pod": "a"}, "npc-xa")
B = Endpoint("ep-b", IPv4Address("10.0.1.2"), "x", {"pod": "b"}, "npc-xb")
C = Endpoint("ep-c", IPv4Address("10.0.2.3"), "y", {"pod": "c"}, "npc-yc")


def policy_yaml(name: str, spec: str, namespace: str = "x") -> str:
    return (
        "apiVersion: nova.sh/v1\nkind: NetworkPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )


DENY_A = policy_yaml("deny-a", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n")
ALLOW_B_TO_A = policy_yaml(
    "allow-b",
    "  podSelector: {matchLabels: {pod: a}}\n"
    "  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n",
)
DENY_B_EGRESS = policy_yaml(
    "deny-b", "  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Egress]\n"
)
BAD = policy_yaml("bad", "  podSelector: {}\n  ingress:\n    - ports: [{port: 70000}]\n")


def write_atomically(path: Path, text: str) -> None:
    """How editors and config tools replace a file: a hidden temp file, then rename."""
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temp.write_text(text)
    os.rename(temp, path)
