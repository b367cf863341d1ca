"""The nftables backend's updates: after any sequence of policy changes, the
tables in the kernel are exactly what a fresh replacement would have made,
counters keep counting, and no update falls back to a replacement.

Each step's kernel state is compared with a twin table that gets the same
Ruleset by `replace_document` (listed with `nft -j`, handles and table name
stripped), so every kind of change the update path knows (new, changed and
gone chains; elements added, removed and re-pointed; endpoints that come and
go) is checked against the kernel's own view.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from agent.netpol.compiler import IdentityAllocator, compile_policy
from agent.netpol.model import parse_policies
from agent.netpol.nft import NftBackend
from agent.netpol.nft_objects import canonical, replace_document
from agent.netpol.tables import CompiledPolicy, Endpoint
from tests.linux.netpol_lab import NAMESPACE_LABELS, Lab, built_lab

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns, veth, nftables"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft"),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
]

POLICIES = {
    "deny-x": ("x", {"podSelector": {}, "policyTypes": ["Ingress"]}),
    "a-from-b": (
        "x",
        {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
        },
    ),
    "blue-to-80": (
        "y",
        {
            "podSelector": {},
            "ingress": [
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}],
                    "ports": [{"protocol": "TCP", "port": 80}],
                }
            ],
        },
    ),
    "cidr-except": (
        "z",
        {
            "podSelector": {"matchLabels": {"pod": "c"}},
            "ingress": [
                {
                    "from": [{"ipBlock": {"cidr": "10.77.0.0/24", "except": ["10.77.0.16/28"]}}],
                    "ports": [{"protocol": "UDP", "port": 80, "endPort": 8080}],
                }
            ],
        },
    ),
    "egress-dns": (
        "z",
        {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [
                {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 81}]}
            ],
        },
    ),
}


def policy_yaml(names: list[str]) -> str:
    docs = []
    for name in names:
        namespace, spec = POLICIES[name]
        body = {
            "apiVersion": "nova.sh/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        docs.append("---\n" + json.dumps(body) + "\n")
    return "".join(docs)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with built_lab() as lab:
        yield lab


@pytest_asyncio.fixture(loop_scope="module")
async def backend(lab: Lab) -> AsyncIterator[NftBackend]:
    nft = NftBackend(table=f"nova_u{os.getpid()}", netns=lab.host_netns)
    await nft.start()
    try:
        yield nft
    finally:
        await nft.close(remove=True)


class Compiler:
    def __init__(self) -> None:
        self.allocator = IdentityAllocator()
        self.generation = 0

    def __call__(self, names: list[str], endpoints: list[Endpoint]) -> CompiledPolicy:
        self.generation += 1
        text = policy_yaml(names)
        policies = parse_policies(text, "update.yaml") if names else []
        return compile_policy(
            policies, endpoints, NAMESPACE_LABELS, self.allocator, self.generation
        )


def nft(lab: Lab, *argv: str, stdin: str | None = None) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", lab.host_netns, "nft", *argv],
        input=stdin, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def listing(lab: Lab, table: str) -> dict[str, Any]:
    """Both families of `table` as the kernel reports them, comparable across tables:
    no handles, no table name, no counts; elements sorted; rules in chain order."""
    objects: set[str] = set()
    rules: dict[str, list[str]] = {}
    for family in ("inet", "bridge"):
        for item in json.loads(nft(lab, "-j", "list", "table", family, table))["nftables"]:
            ((kind, body),) = item.items()
            if kind == "metainfo":
                continue
            body = {
                k: v for k, v in body.items() if k not in {"handle", "table", "packets", "bytes"}
            }
            if kind == "table":
                body.pop("name")
            if "elem" in body:
                body["elem"] = sorted(body["elem"], key=canonical)
            if kind == "rule":
                rules.setdefault(f"{family} {body['chain']}", []).append(canonical(body))
            else:
                objects.add(canonical({kind: body}))
    return {"objects": sorted(objects), "rules": rules}


def describe(got: dict[str, Any], want: dict[str, Any]) -> str:
    extra = sorted(set(got["objects"]) - set(want["objects"]))
    missing = sorted(set(want["objects"]) - set(got["objects"]))
    chains = sorted(k for k in got["rules"].keys() | want["rules"].keys()
                    if got["rules"].get(k) != want["rules"].get(k))  # fmt: skip
    return f"in the kernel but not wanted: {extra}; missing: {missing}; chains differ: {chains}"


def twin_listing(lab: Lab, backend: NftBackend) -> dict[str, Any]:
    """What a replacement with the backend's current Ruleset gives, in a twin table."""
    applied = backend._applied
    assert applied is not None
    twin = dataclasses.replace(applied, table=f"{applied.table}_twin")
    nft(lab, "-j", "-f", "-", stdin=json.dumps(replace_document(twin)))
    try:
        return listing(lab, twin.table)
    finally:
        for family in twin.families:
            nft(lab, "delete", "table", family, twin.table)


async def test_updates_leave_what_a_replacement_would(
    lab: Lab, backend: NftBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nova.agent.netpol.nft")
    compile_ = Compiler()
    everyone = lab.endpoints()
    rng = random.Random(7)
    steps: list[tuple[list[str], list[Endpoint]]] = [
        (["deny-x"], everyone),
        (["deny-x", "a-from-b"], everyone),
        (["a-from-b", "blue-to-80", "cidr-except", "egress-dns"], everyone),
        (["a-from-b", "blue-to-80"], [e for e in everyone if not e.key.endswith("/b")]),
        (["a-from-b", "blue-to-80"], everyone),
        ([], everyone),
    ]
    for _ in range(10):
        names = rng.sample(sorted(POLICIES), rng.randint(0, len(POLICIES)))
        endpoints = rng.sample(everyone, rng.randint(len(everyone) - 3, len(everyone)))
        steps.append((names, endpoints))
    for n, (names, endpoints) in enumerate(steps):
        await backend.apply(compile_(names, endpoints))
        got, want = listing(lab, backend._table), twin_listing(lab, backend)
        assert got == want, f"step {n} {names}: {describe(got, want)}"
    assert "replacing the tables" not in caplog.text


async def test_counters_survive_updates(lab: Lab, backend: NftBackend) -> None:
    compile_ = Compiler()
    everyone = lab.endpoints()
    await backend.apply(compile_(["deny-x", "a-from-b"], everyone))
    a, b = lab.pods["x/a"], lab.pods["x/b"]
    for _ in range(3):
        assert b.probe([("tcp", str(a.address), 80, 1.0)]) == [True]
    allowed_before, _ = (await backend.counters())["x/a-from-b"]
    assert allowed_before >= 3
    await backend.apply(compile_(["deny-x", "a-from-b", "blue-to-80"], everyone))
    allowed_after, _ = (await backend.counters())["x/a-from-b"]
    assert allowed_after >= allowed_before  # an update does not reset the counts


async def test_a_hand_edited_table_is_replaced(
    lab: Lab, backend: NftBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone removed a map the next update changes: the update cannot apply, the
    backend says so and replaces the tables, and enforcement is whole again."""
    compile_ = Compiler()
    everyone = lab.endpoints()
    await backend.apply(compile_(["deny-x", "a-from-b"], everyone))
    chain = backend._names.endpoint("x/a", "ingress")  # a-from-b's elements are in its _any map
    nft(lab, "flush", "table", "inet", backend._table)
    nft(lab, "delete", "map", "inet", backend._table, f"{chain}_any")
    caplog.set_level(logging.WARNING, logger="nova.agent.netpol.nft")
    await backend.apply(compile_(["deny-x"], everyone))
    assert "replacing the tables" in caplog.text
    got, want = listing(lab, backend._table), twin_listing(lab, backend)
    assert got == want, describe(got, want)
    a, b = lab.pods["x/a"], lab.pods["x/b"]
    assert b.probe([("tcp", str(a.address), 80, 0.5)]) == [False]
