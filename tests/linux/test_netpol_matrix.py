"""Network policy enforced by the kernel backends, proved with real packets.

Nine pods (namespaces x, y, z; pods a, b, c; see netpol_lab.py) probe each
other over TCP and UDP; for every scenario the whole reachability matrix is
compared with the one Kubernetes NetworkPolicy semantics give. Scenarios are
policy YAML, compiled by the real compiler and applied to a backend that
stays loaded for the whole module: a scenario only changes maps/sets, which
is exactly what a policy change does in production. Every test runs on both
backends (eBPF and nftables).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import IPv4Network

import pytest
import pytest_asyncio

from agent.netpol.backend import (
    COUNTER_SPOOFED,
    PolicyBackend,
    select_backend,
)
from agent.netpol.compiler import IdentityAllocator, compile_policy
from agent.netpol.model import parse_policies
from agent.netpol.tables import IPPROTO_TCP, IPPROTO_UDP, CompiledPolicy
from tests.linux.netpol_lab import (
    NAMESPACE_LABELS,
    Lab,
    Pod,
    backend_params,
    built_lab,
    differences,
    expected_matrix,
    nft_ruleset,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, veth, tc, nftables"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip"),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(120),
]

TCP80, UDP80 = (IPPROTO_TCP, 80), (IPPROTO_UDP, 80)
Rule = Callable[[Pod, Pod], bool]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab() as lab:
        yield lab


class Enforcer:
    """A started backend plus the compile step: YAML in, kernel state out."""

    def __init__(self, lab: Lab, backend: PolicyBackend) -> None:
        self.lab = lab
        self.backend = backend
        self.allocator = IdentityAllocator()
        self.generation = 0

    def compile(self, yaml_text: str) -> CompiledPolicy:
        self.generation += 1
        policies = parse_policies(yaml_text, "scenario.yaml") if yaml_text.strip() else []
        return compile_policy(
            policies, self.lab.endpoints(), NAMESPACE_LABELS, self.allocator, self.generation
        )

    async def enforce(self, yaml_text: str) -> CompiledPolicy:
        compiled = self.compile(yaml_text)
        await self.backend.apply(compiled)
        return compiled

    def check(self, rule: Rule, probes: tuple[tuple[int, int], ...] = (TCP80, UDP80)) -> None:
        want = expected_matrix(self.lab, rule)
        problems = []
        for (proto, port), got in self.lab.matrices(probes).items():
            name = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}[proto]
            problems += [f"{name}/{port}: {line}" for line in differences(got, want)]
        assert not problems, "\n".join(problems)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=backend_params())
async def enforcer(lab: Lab, request: pytest.FixtureRequest) -> AsyncIterator[Enforcer]:
    backend = select_backend(
        request.param,
        table=f"nova_t{os.getpid()}",
        link_prefix=lab.link_prefix,
        netns=lab.host_netns,
    )
    await backend.start()
    try:
        yield Enforcer(lab, backend)
    finally:
        await backend.close(remove=True)


@pytest_asyncio.fixture(loop_scope="module")
async def policy(enforcer: Enforcer) -> AsyncIterator[Enforcer]:
    """The enforcer, with no policy in force before and after the test."""
    await enforcer.enforce("")
    yield enforcer
    await enforcer.enforce("")


def doc(namespace: str, name: str, spec: dict[str, object]) -> str:
    body = {
        "apiVersion": "nova.sh/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return "---\n" + json.dumps(body) + "\n"  # JSON is YAML


POD_A = {"matchLabels": {"pod": "a"}}


# -- scenarios ---------------------------------------------------------------------------


async def test_no_policy_allows_everything(policy: Enforcer) -> None:
    policy.check(lambda s, d: True)


async def test_default_deny_ingress(policy: Enforcer) -> None:
    await policy.enforce(doc("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    policy.check(lambda s, d: d.namespace != "x")


async def test_default_deny_egress(policy: Enforcer) -> None:
    await policy.enforce(doc("x", "deny", {"podSelector": {}, "policyTypes": ["Egress"]}))
    policy.check(lambda s, d: s.namespace != "x")


async def test_allow_by_pod_label(policy: Enforcer) -> None:
    await policy.enforce(
        doc(
            "x",
            "from-b",
            {
                "podSelector": POD_A,
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
            },
        )
    )
    # a podSelector peer means pods of the policy's own namespace only (not y/b, z/b)
    policy.check(lambda s, d: d.key != "x/a" or s.key == "x/b")


async def test_allow_by_namespace_label(policy: Enforcer) -> None:
    await policy.enforce(
        doc(
            "x",
            "from-blue",
            {
                "podSelector": POD_A,
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}],
            },
        )
    )
    policy.check(lambda s, d: d.key != "x/a" or s.namespace in ("y", "z"))


async def test_allow_by_namespace_and_pod_label_in_one_peer(policy: Enforcer) -> None:
    await policy.enforce(
        doc(
            "x",
            "from-blue-c",
            {
                "podSelector": POD_A,
                "ingress": [
                    {
                        "from": [
                            {
                                "namespaceSelector": {"matchLabels": {"team": "blue"}},
                                "podSelector": {"matchLabels": {"pod": "c"}},
                            }
                        ]
                    }
                ],
            },
        )
    )
    policy.check(lambda s, d: d.key != "x/a" or s.key in ("y/c", "z/c"))


async def test_allow_by_cidr_with_except(policy: Enforcer) -> None:
    await policy.enforce(
        doc(
            "x",
            "cidr",
            {
                "podSelector": POD_A,
                "ingress": [
                    {"from": [{"ipBlock": {"cidr": "10.77.0.0/24", "except": ["10.77.0.16/28"]}}]}
                ],
            },
        )
    )
    hole = IPv4Network("10.77.0.16/28")  # y/a, y/b, y/c (.21-.23) and z/a (.31)
    policy.check(lambda s, d: d.key != "x/a" or s.address not in hole)


async def test_allow_by_port_and_port_range(policy: Enforcer) -> None:
    await policy.enforce(
        doc(
            "x",
            "ports",
            {
                "podSelector": POD_A,
                "ingress": [
                    {"ports": [{"protocol": "TCP", "port": 80}]},
                    {
                        "from": [
                            {"namespaceSelector": {"matchLabels": {"nova.sh/namespace": "y"}}}
                        ],
                        "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100}],
                    },
                ],
            },
        )
    )
    lab = policy.lab
    got = lab.matrices([TCP80, (IPPROTO_TCP, 81), (IPPROTO_TCP, 8080), UDP80])
    expect: dict[tuple[int, int], Rule] = {
        TCP80: lambda s, d: True,
        (IPPROTO_TCP, 81): lambda s, d: d.key != "x/a",
        (IPPROTO_TCP, 8080): lambda s, d: d.key != "x/a" or s.namespace == "y",
        UDP80: lambda s, d: d.key != "x/a",  # the rule names TCP only
    }
    problems = [
        f"{probe}: {line}"
        for probe, rule in expect.items()
        for line in differences(got[probe], expected_matrix(lab, rule))
    ]
    assert not problems, "\n".join(problems)


async def test_egress_only(policy: Enforcer) -> None:
    await policy.enforce(
        doc(
            "x",
            "to-y",
            {
                "podSelector": POD_A,
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [{"namespaceSelector": {"matchLabels": {"nova.sh/namespace": "y"}}}],
                        "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 80}],
                    }
                ],
            },
        )
    )
    # x/a may only reach y; anyone may still reach x/a (its ingress is not isolated)
    policy.check(lambda s, d: s.key != "x/a" or d.namespace == "y")


async def test_multiple_policies_are_unioned(policy: Enforcer) -> None:
    await policy.enforce(
        doc(
            "x",
            "from-b",
            {
                "podSelector": POD_A,
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
            },
        )
        + doc(
            "x",
            "from-z",
            {
                "podSelector": POD_A,
                "ingress": [
                    {"from": [{"namespaceSelector": {"matchLabels": {"nova.sh/namespace": "z"}}}]}
                ],
            },
        )
    )
    policy.check(lambda s, d: d.key != "x/a" or s.key == "x/b" or s.namespace == "z")


async def test_policy_deletion_restores_access(policy: Enforcer) -> None:
    deny_all = "".join(
        doc(ns, "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
        for ns in ("x", "y", "z")
    )
    await policy.enforce(deny_all)
    policy.check(lambda s, d: False)
    await policy.enforce("")
    policy.check(lambda s, d: True)


async def test_established_replies_pass(policy: Enforcer) -> None:
    # x/a: ingress denies everything, egress allows y/b:80 only. Its probes to y/b still
    # get their answers (SYN-ACK, echoed data): replies of an allowed flow pass x/a's
    # isolated ingress. The same packets started by y/b are refused.
    await policy.enforce(
        doc(
            "x",
            "client-only",
            {
                "podSelector": POD_A,
                "policyTypes": ["Ingress", "Egress"],
                "egress": [
                    {
                        "to": [
                            {
                                "namespaceSelector": {"matchLabels": {"nova.sh/namespace": "y"}},
                                "podSelector": {"matchLabels": {"pod": "b"}},
                            }
                        ],
                        "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 80}],
                    }
                ],
            },
        )
    )
    policy.check(lambda s, d: (s.key == "x/a" and d.key == "y/b") or "x/a" not in (s.key, d.key))


async def test_counters_attribute_packets_to_policies(policy: Enforcer) -> None:
    await policy.enforce(
        doc(
            "x",
            "from-b",
            {
                "podSelector": POD_A,
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
            },
        )
    )
    before = dict(await policy.backend.counters())
    policy.lab.matrices([TCP80])
    after = await policy.backend.counters()
    allowed = after["x/from-b"][0] - before.get("x/from-b", (0, 0))[0]
    denied = after["x/from-b"][1] - before.get("x/from-b", (0, 0))[1]
    assert allowed >= 1, after  # x/b's SYN (later packets are established)
    assert denied >= 7, after  # a SYN from each of the 7 other pods (plus retries)


async def test_policy_change_keeps_programs_and_tables(policy: Enforcer) -> None:
    """A policy change rewrites maps (eBPF) or swaps the table in one transaction
    (nftables); the eBPF programs attached to the veths stay the same programs."""
    if policy.backend.name != "ebpf":
        pytest.skip("programs exist on the eBPF backend only")
    await policy.enforce(doc("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    ids = tc_program_ids(policy.lab)
    await policy.enforce(doc("y", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    assert tc_program_ids(policy.lab) == ids
    assert len(ids) == 2 * len(policy.lab.pods)
    policy.check(lambda s, d: d.namespace != "y")


async def test_a_removed_container_leaves_nothing_behind(policy: Enforcer) -> None:
    """Container removal: its filters (eBPF), map entries and set elements go; the
    remaining containers stay enforced."""
    lab = policy.lab
    gone = lab.pods["x/a"]
    policies = parse_policies(doc("x", "deny", {"podSelector": {}}), "deny.yaml")
    for endpoints in (lab.endpoints(), [e for e in lab.endpoints() if e.key != gone.key]):
        policy.generation += 1
        compiled = compile_policy(
            policies, endpoints, NAMESPACE_LABELS, policy.allocator, policy.generation
        )
        await policy.backend.apply(compiled)
    assert gone.key not in compiled.endpoints
    policy.check(lambda s, d: d.namespace != "x" or d.key == gone.key)
    if policy.backend.name == "ebpf":
        assert not any(link == gone.host_ifname for link, _ in tc_program_ids(lab))
        bpf = policy.backend._bpf  # type: ignore[attr-defined]
        addresses = {int(k.value) for k in bpf[b"nova_ipcache_v1"].keys()}  # noqa: SIM118
        assert len(addresses) == len(lab.pods) - 1
        assert len(bpf[b"nova_endpoints_v1"]) == len(lab.pods) - 1
    else:
        ruleset = nft_ruleset(lab)
        assert str(gone.address) not in ruleset and gone.host_ifname not in ruleset
        assert str(lab.pods["x/b"].address) in ruleset


def tc_program_ids(lab: Lab) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for pod in lab.pods.values():
        for hook in ("ingress", "egress"):
            shown = subprocess.run(
                ["tc", "-n", lab.host_netns, "-j", "filter", "show", "dev", pod.host_ifname, hook],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            for f in json.loads(shown or "[]"):
                prog = f.get("options", {}).get("prog", {}).get("id")
                if prog:
                    out[pod.host_ifname, hook] = int(prog)
    return out


async def test_spoofed_source_gains_no_access(policy: Enforcer) -> None:
    pytest.importorskip("scapy")
    await policy.enforce(
        doc(
            "x",
            "from-b",
            {
                "podSelector": POD_A,
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
            },
        )
    )
    lab = policy.lab
    xa, xb, yb = lab.pods["x/a"], lab.pods["x/b"], lab.pods["y/b"]
    # control: a crafted SYN from x/b itself (allowed) reaches x/a's eth0
    assert await syn_arrives(lab, sender=xb, source=str(xb.address), target=xa, sport=40001)
    # y/b forging x/b's address: dropped before it reaches x/a
    assert not await syn_arrives(lab, sender=yb, source=str(xb.address), target=xa, sport=40002)
    counts = await policy.backend.counters()
    assert counts[COUNTER_SPOOFED][1] >= 1, counts


SNIFF = """
import sys
from scapy.all import sniff
got = sniff(iface="eth0", timeout=float(sys.argv[2]), count=1,
            lfilter=lambda p: p.haslayer("TCP") and p["TCP"].sport == int(sys.argv[1])
            and p["TCP"].flags == "S",
            started_callback=lambda: print("sniffing", flush=True))
print(len(got), flush=True)
"""

SEND = """
import sys
from scapy.all import IP, TCP, send
for _ in range(3):
    send(IP(src=sys.argv[1], dst=sys.argv[2]) / TCP(sport=int(sys.argv[3]), dport=80,
         flags="S"), verbose=0)
"""


async def syn_arrives(lab: Lab, *, sender: Pod, source: str, target: Pod, sport: int) -> bool:
    """Whether a TCP SYN sent by `sender` with source address `source` reaches `target`."""
    sniffer = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        target.netns,
        sys.executable,
        "-c",
        SNIFF,
        str(sport),
        "4",
        stdout=asyncio.subprocess.PIPE,
    )
    assert sniffer.stdout is not None
    assert (await asyncio.wait_for(sniffer.stdout.readline(), 30)).strip() == b"sniffing"
    sent = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        sender.netns,
        sys.executable,
        "-c",
        SEND,
        source,
        str(target.address),
        str(sport),
    )
    assert await sent.wait() == 0
    out, _ = await asyncio.wait_for(sniffer.communicate(), 30)
    return int(out.split()[-1]) > 0
