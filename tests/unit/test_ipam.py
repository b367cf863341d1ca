"""IPAM: pure allocation rules, and persistence through a real SqliteStore (CAS, restarts)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import textwrap
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from agent.isolation.ipam import (
    MAX_NAMESPACE_LENGTH,
    MAX_OWNER_LENGTH,
    IpamConfig,
    IpamConflict,
    IpamError,
    IpamState,
    IpamStore,
    PoolExhausted,
    ipam_key,
)
from nova.store import MAX_VALUE_SIZE, SqliteStore, encode_json

ROOT = Path(__file__).resolve().parents[2]
NODE = "node-a"
CONFIG = IpamConfig.parse("10.88.1.0/24", "10.88.0.0/16")


def addresses(state: IpamState) -> list[IPv4Address]:
    """Every address held, gateways included."""
    return [lease.address.ip for lease in state.leases()] + list(state.gateways().values())


# -- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "cluster", "message"),
    [
        ("10.88.1.0/31", None, "too small"),
        ("10.80.0.0/19", None, "too large"),
        ("10.89.1.0/24", "10.88.0.0/16", "not inside the cluster CIDR"),
        ("10.88.1.1/24", None, "not an IPv4 network"),
        ("fd00::/64", None, "not an IPv4 network"),
        ("10.88.1.0/24", "nonsense", "cluster CIDR 'nonsense'"),
    ],
)
def test_config_rejects_unusable_cidrs(node: str, cluster: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IpamConfig.parse(node, cluster)


def test_link_network_is_the_cluster_cidr_else_the_node_cidr() -> None:
    assert CONFIG.link_network == IPv4Network("10.88.0.0/16")
    assert IpamConfig.parse("10.9.0.0/24").link_network == IPv4Network("10.9.0.0/24")


# -- allocation ----------------------------------------------------------------


def test_lease_has_cluster_prefix_and_an_on_link_namespace_gateway() -> None:
    state = IpamState(CONFIG)
    lease = state.allocate("c1", "shop")
    assert lease.address.network == IPv4Network("10.88.0.0/16")
    assert lease.address.ip in CONFIG.node_cidr
    assert lease.gateway in lease.address.network
    assert lease.gateway != lease.address.ip
    assert state.gateways() == {"shop": lease.gateway}


def test_each_namespace_gets_its_own_gateway_and_no_address_is_shared() -> None:
    state = IpamState(CONFIG)
    leases = [state.allocate(f"c{i}", f"ns{i % 3}") for i in range(30)]
    gateways = state.gateways()
    assert len(set(gateways.values())) == 3
    held = addresses(state)
    assert len(held) == len(set(held)) == 33
    for lease in leases:
        assert lease.gateway == gateways[lease.namespace]
        assert CONFIG.contains(lease.address.ip)


def test_allocate_is_idempotent_per_owner() -> None:
    state = IpamState(CONFIG)
    first = state.allocate("c1", "shop")
    assert state.allocate("c1", "shop") == first
    assert state.free == CONFIG.capacity - 2
    with pytest.raises(IpamError, match="already holds an address in namespace 'shop'"):
        state.allocate("c1", "bank")


def test_released_addresses_are_reused_last() -> None:
    state = IpamState(CONFIG)
    a = state.allocate("a", "ns").address.ip
    state.release("a")
    b = state.allocate("b", "ns").address.ip
    assert b != a and b > a  # round robin after the last handed out, not lowest free
    assert state.release("a") is None  # releasing twice is a no-op


def test_round_robin_wraps_and_skips_network_and_broadcast() -> None:
    state = IpamState(IpamConfig.parse("10.0.0.0/29"))  # .1 .. .6 usable
    held = [state.allocate(f"c{i}", "ns").address.ip for i in range(5)]
    assert state.gateways()["ns"] == IPv4Address("10.0.0.1")
    assert held == [IPv4Address(f"10.0.0.{i}") for i in range(2, 7)]
    state.release("c1")  # frees 10.0.0.3
    assert state.allocate("again", "ns").address.ip == IPv4Address("10.0.0.3")


def test_exhaustion_raises_and_changes_nothing() -> None:
    state = IpamState(IpamConfig.parse("10.0.0.0/29"))
    for i in range(5):
        state.allocate(f"c{i}", "ns")
    before = state.to_json()
    with pytest.raises(PoolExhausted, match=r"10\.0\.0\.0/29"):
        state.allocate("one-more", "ns")
    with pytest.raises(PoolExhausted):
        state.gateway("other")
    assert state.to_json() == before


def test_new_namespace_needs_room_for_its_gateway_too() -> None:
    state = IpamState(IpamConfig.parse("10.0.0.0/29"))
    for i in range(4):
        state.allocate(f"c{i}", "ns")  # gateway + 4 leases: one address left
    with pytest.raises(PoolExhausted):
        state.allocate("x", "other")  # would need a gateway and an address
    assert state.allocate("c4", "ns").address.ip == IPv4Address("10.0.0.6")


def test_gateway_is_released_only_when_the_namespace_is_empty() -> None:
    state = IpamState(CONFIG)
    state.allocate("c1", "shop")
    with pytest.raises(IpamError, match="still has 1 address"):
        state.release_gateway("shop")
    state.release("c1")
    assert state.gateways() != {}  # the bridge usually outlives the container
    assert state.release_gateway("shop") is True
    assert state.release_gateway("shop") is False
    assert state.free == CONFIG.capacity


def test_retain_releases_what_no_live_container_owns() -> None:
    state = IpamState(CONFIG)
    for owner in ("a", "b", "c", "d"):
        state.allocate(owner, "ns")
    released = state.retain({"b", "d", "never-allocated"})
    assert sorted(lease.owner for lease in released) == ["a", "c"]
    assert sorted(lease.owner for lease in state.leases()) == ["b", "d"]


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "x" * (MAX_OWNER_LENGTH + 1)])
def test_bad_owner_names_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        IpamState(CONFIG).allocate(bad, "ns")


# -- JSON ----------------------------------------------------------------------


def test_json_round_trip_keeps_leases_gateways_and_cursor() -> None:
    state = IpamState(CONFIG)
    for i in range(10):
        state.allocate(f"c{i}", f"ns{i % 2}")
    state.release("c3")
    obj = json.loads(encode_json(state.to_json()))
    again = IpamState.from_json(CONFIG, obj)
    assert again.to_json() == state.to_json()
    assert again.leases() == state.leases()
    # the cursor survived: both hand out the same next address
    assert again.allocate("next", "ns0") == state.allocate("next", "ns0")


def test_state_json_is_readable() -> None:
    state = IpamState(IpamConfig.parse("10.0.0.0/29", "10.0.0.0/16"))
    state.allocate("c0ffee", "shop")
    assert state.to_json() == {
        "version": 1,
        "node_cidr": "10.0.0.0/29",
        "cluster_cidr": "10.0.0.0/16",
        "cursor": "10.0.0.2",
        "namespaces": {"shop": {"gateway": "10.0.0.1", "leases": {"c0ffee": "10.0.0.2"}}},
    }


def _valid() -> dict[str, Any]:
    state = IpamState(CONFIG)
    state.allocate("a", "ns")
    state.allocate("b", "ns")
    return state.to_json()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o.update(version=2), "format version 2"),
        (lambda o: o.update(node_cidr="10.88.2.0/24"), "changing a node's CIDRs"),
        (lambda o: o.update(cluster_cidr=None), "changing a node's CIDRs"),
        (lambda o: o["namespaces"]["ns"]["leases"].update(b="10.88.1.2"), "held twice"),
        (lambda o: o["namespaces"]["ns"]["leases"].update(b="10.88.2.9"), "outside node CIDR"),
        (lambda o: o["namespaces"]["ns"]["leases"].update(b="10.88.1.255"), "outside"),
        (lambda o: o["namespaces"].update(x={"gateway": "10.88.1.9", "leases": {"a": "10.88.1.8"}}),
         "'a' holds two addresses"),
        (lambda o: o["namespaces"]["ns"].pop("gateway"), "malformed"),
        (lambda o: o.update(namespaces=[]), "malformed"),
        (lambda o: o["namespaces"]["ns"]["leases"].update(b="nonsense"), "malformed"),
    ],
)  # fmt: skip
def test_from_json_rejects_corrupt_state(mutate: Any, message: str) -> None:
    obj = _valid()
    mutate(obj)
    with pytest.raises(IpamError, match=message):
        IpamState.from_json(CONFIG, obj)


def test_a_full_pool_with_longest_names_fits_one_store_value() -> None:
    config = IpamConfig.parse("10.80.0.0/20")
    state = IpamState(config)
    for i in range(config.capacity // 2):  # every second address a gateway: the worst mix
        state.allocate(f"{i:0{MAX_OWNER_LENGTH}d}", f"{i:0{MAX_NAMESPACE_LENGTH}d}")
    assert state.free == 0
    assert len(encode_json(state.to_json())) < MAX_VALUE_SIZE


# -- persisted in a real store ---------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "nova.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(db_path, poll_interval=0.02) as opened:
        yield opened


async def test_store_persists_state_under_the_node_key(store: SqliteStore) -> None:
    ipam = IpamStore(store, NODE, CONFIG)
    lease = await ipam.allocate("c1", "shop")
    stored = await store.get_json(ipam_key(NODE))
    assert ipam.key == "nova/v1/ipam/node-a"
    assert stored["namespaces"]["shop"]["leases"] == {"c1": str(lease.address.ip)}
    assert (await ipam.load()).lease("c1") == lease


async def test_a_call_that_changes_nothing_writes_nothing(store: SqliteStore) -> None:
    ipam = IpamStore(store, NODE, CONFIG)
    await ipam.allocate("c1", "shop")
    entry = await store.get(ipam.key)
    await ipam.allocate("c1", "shop")
    await ipam.release("nobody")
    assert (await store.get(ipam.key)) == entry


async def test_allocations_survive_a_restart_without_leaks_or_duplicates(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        ipam = IpamStore(store, NODE, CONFIG)
        before = {f"c{i}": await ipam.allocate(f"c{i}", "shop") for i in range(10)}
        await ipam.release("c0")
    # The agent restarts: a new store object over the same file, a new IpamStore.
    async with SqliteStore(db_path) as store:
        ipam = IpamStore(store, NODE, CONFIG)
        # A container created before the restart asks again: the same address.
        assert await ipam.allocate("c5", "shop") == before["c5"]
        after = [await ipam.allocate(f"n{i}", "shop") for i in range(10)]
        state = await ipam.load()
        held = addresses(state)
        assert len(held) == len(set(held)) == 1 + 9 + 10
        assert {lease.address.ip for lease in after}.isdisjoint(
            lease.address.ip for owner, lease in before.items() if owner != "c0"
        )
        # Recovery found only some containers alive: the rest is released.
        alive = {"c1", "c2", "n0"}
        released = await ipam.retain(alive)
        assert {lease.owner for lease in released} == {
            lease.owner for lease in state.leases()
        } - alive
    async with SqliteStore(db_path) as store:
        state = await IpamStore(store, NODE, CONFIG).load()
        assert {lease.owner for lease in state.leases()} == alive
        assert state.free == CONFIG.capacity - 1 - len(alive)


async def test_two_agents_on_one_store_never_hand_out_the_same_address(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="nova.agent.isolation.ipam")
    async with SqliteStore(db_path) as one, SqliteStore(db_path) as two:
        ipam_one = IpamStore(one, NODE, CONFIG)
        ipam_two = IpamStore(two, NODE, CONFIG)
        leases = await asyncio.gather(
            *(ipam_one.allocate(f"one-{i}", f"ns{i % 2}") for i in range(25)),
            *(ipam_two.allocate(f"two-{i}", f"ns{i % 2}") for i in range(25)),
        )
        state = await ipam_one.load()
    assert len({lease.address.ip for lease in leases}) == 50
    assert sorted(state.leases(), key=lambda lease: lease.owner) == sorted(
        leases, key=lambda lease: lease.owner
    )
    held = addresses(state)
    assert len(held) == len(set(held)) == 52
    assert "CAS conflict" in caplog.text  # the writers really collided


_OTHER_PROCESS = textwrap.dedent(
    """
    import asyncio, json, sys
    from agent.isolation.ipam import IpamConfig, IpamStore
    from nova.store import SqliteStore

    async def main() -> None:
        async with SqliteStore(sys.argv[1]) as store:
            ipam = IpamStore(store, "node-a", IpamConfig.parse("10.88.1.0/24", "10.88.0.0/16"))
            await ipam.load()
            print("ready", flush=True)
            sys.stdin.readline()  # both processes start allocating at once
            leases = [await ipam.allocate(f"proc-{i}", "shop") for i in range(40)]
        print(json.dumps([str(lease.address.ip) for lease in leases]))

    asyncio.run(main())
    """
)


async def test_two_processes_never_hand_out_the_same_address(db_path: Path) -> None:
    async with SqliteStore(db_path) as store:
        ipam = IpamStore(store, NODE, CONFIG)
        await ipam.gateway("shop")  # the file exists before the other process opens it
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _OTHER_PROCESS,
            str(db_path),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        assert await proc.stdout.readline() == b"ready\n"
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        mine = [await ipam.allocate(f"mine-{i}", "shop") for i in range(40)]
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        state = await ipam.load()
    theirs = [IPv4Address(text) for text in json.loads(out)]
    ours = [lease.address.ip for lease in mine]
    assert len(set(theirs) | set(ours)) == 80
    assert {lease.address.ip for lease in state.leases()} == set(theirs) | set(ours)


async def test_corrupt_stored_state_names_the_key(store: SqliteStore) -> None:
    await store.put_json(ipam_key(NODE), {"version": 1, "node_cidr": "10.1.0.0/24"})
    with pytest.raises(IpamError, match="nova/v1/ipam/node-a"):
        await IpamStore(store, NODE, CONFIG).allocate("c1", "shop")


async def test_cas_that_keeps_failing_raises_conflict(store: SqliteStore) -> None:
    ipam = IpamStore(store, NODE, CONFIG, attempts=3)

    async def always_lose(*_: Any, **__: Any) -> bool:
        return False

    store.put_json = always_lose  # type: ignore[method-assign]
    with pytest.raises(IpamConflict, match="3 times"):
        await ipam.allocate("c1", "shop")
    assert await store.get(ipam.key) is None


def test_lease_address_is_an_interface() -> None:
    lease = IpamState(CONFIG).allocate("c1", "shop")
    assert isinstance(lease.address, IPv4Interface)
    assert str(lease.address).endswith("/16")
