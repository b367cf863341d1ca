"""Optional drop logging, with real packets: rate-limited, and never a verdict.

eBPF logs each drop (at most N a second) on `nova.agent.netpol.drops`;
nftables logs to the kernel log through a `limit` rule of its own before
the drop. The lab's host is a netns, where the kernel does not log unless
`nf_log_all_netns` is on (a host-wide switch these tests leave alone), so on
nftables the test checks the rule and that drops beyond the limit still drop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator

import pytest

from agent.netpol.backend import select_backend
from agent.netpol.compiler import IdentityAllocator, compile_policy
from agent.netpol.model import parse_policies
from agent.netpol.tables import IPPROTO_UDP
from tests.linux.netpol_lab import NAMESPACE_LABELS, Lab, backend_params, built_lab, nft_ruleset
from tests.linux.test_netpol_restart import ONLY_C_TO_A

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, veth, tc, nftables"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
    pytest.mark.timeout(120),
]

RATE = 5
UDP81 = (IPPROTO_UDP, 81)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab() as lab:
        yield lab


@pytest.mark.parametrize("backend_name", backend_params())
async def test_drops_are_logged_rate_limited(
    lab: Lab, backend_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = select_backend(
        backend_name,
        table=f"nova_l{os.getpid()}",
        link_prefix=lab.link_prefix,
        netns=lab.host_netns,
        drop_log_rate=RATE,
    )
    await backend.start()
    try:
        policies = parse_policies(ONLY_C_TO_A, "only-c.yaml")
        await backend.apply(
            compile_policy(policies, lab.endpoints(), NAMESPACE_LABELS, IdentityAllocator(), 1)
        )
        caplog.set_level(logging.INFO, logger="nova.agent.netpol.drops")
        started = time.monotonic()
        # 8 pods x 2 tries each probe x/a: 7 denied sources, x/c allowed
        for _ in range(3):
            matrix = lab.matrices([UDP81], timeout=0.05)[UDP81]
            assert [s for (s, d), ok in matrix.items() if d == "x/a" and ok] == ["x/c"]
        elapsed = time.monotonic() - started
        if backend_name == "ebpf":
            await asyncio.sleep(0.3)  # the poller's next round
            lines = [r.getMessage() for r in caplog.records if r.name.endswith(".drops")]
            assert 1 <= len(lines) <= RATE * (int(elapsed) + 2), lines
            xa = lab.pods["x/a"]
            assert any(
                line.startswith(f"policy drop at x/a ({xa.host_ifname}) ingress: udp ")
                and f"-> {xa.address}:81 (x/only-c)" in line
                for line in lines
            ), lines
        else:
            ruleset = nft_ruleset(lab)
            logs = [
                r["expr"]
                for item in json.loads(ruleset)["nftables"]
                if (r := item.get("rule")) and any("log" in e for e in r["expr"])
            ]
            assert len(logs) == 1  # x/a's ingress: the one isolated endpoint and direction
            (expr,) = logs
            assert expr[0]["limit"]["rate"] == RATE and expr[0]["limit"]["per"] == "second"
            assert expr[1]["log"]["prefix"] == "nova drop x/a ingress (x/only-c): "
    finally:
        await backend.close(remove=True)
