"""IPAM: container addresses from one per-node CIDR, with a gateway per Nova namespace.

The choice (docs/networking.md has the reasoning): every node owns ONE container
CIDR (e.g. 10.88.7.0/24 out of the cluster's 10.88.0.0/16). All namespaces on
the node draw their container addresses from that one pool, and each namespace
present on the node also gets one address from it as its gateway (put on the
namespace's bridge). Containers see their address with the CLUSTER prefix
length, so every Nova address is on-link: a container reaches same-namespace
peers on any node directly over its L2 segment (VXLAN spans the nodes), and a
container of another namespace simply never answers ARP (it is on another
segment). Everything outside the cluster CIDR goes to the namespace gateway.

`IpamState` is pure allocation logic (no I/O) whose state is plain JSON.
`IpamStore` keeps that state at `nova/v1/ipam/<node>` in any `nova.store.Store`
and applies every change by compare-and-set, so two agents or processes
sharing a store never hand out the same address, and a crashed agent leaks
nothing: allocation is idempotent per owner (retry after a crash returns the
same address) and `retain()` releases what no live container owns.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, TypeVar

from nova.errors import NovaError
from nova.store import Store, keys

log = logging.getLogger("nova.agent.isolation.ipam")

T = TypeVar("T")

IPAM = keys.ROOT + "ipam/"
"""`nova/v1/ipam/<node>`: one key per node holding that node's allocations."""
FORMAT_VERSION = 1
MAX_POOL_ADDRESSES = 4096
"""A node CIDR of at most /20 keeps one node's state under Consul's 512 KiB value limit."""
MAX_OWNER_LENGTH = 64
MAX_NAMESPACE_LENGTH = 63
DEFAULT_CAS_ATTEMPTS = 64


def ipam_key(node: str) -> str:
    """The store key of `node`'s IPAM state."""
    return IPAM + keys.segment(node, what="node name")


class IpamError(NovaError):
    """An allocation could not be made or the stored state is unusable."""


class PoolExhausted(IpamError):
    """Every address of the node CIDR is taken."""


class IpamConflict(IpamError):
    """Compare-and-set kept failing: too many writers at once. Retry later."""


@dataclass(frozen=True, slots=True)
class IpamConfig:
    """`node_cidr`: this node's container CIDR; `cluster_cidr`: the CIDR of all nodes'.

    Without `cluster_cidr` the node CIDR is the whole on-link range (one node).
    """

    node_cidr: IPv4Network
    cluster_cidr: IPv4Network | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.node_cidr, IPv4Network):
            raise ValueError(f"node CIDR must be an IPv4 network, got {self.node_cidr!r}")
        if self.node_cidr.prefixlen > 30:
            raise ValueError(f"node CIDR {self.node_cidr} is too small: use /30 or larger")
        if self.node_cidr.num_addresses > MAX_POOL_ADDRESSES:
            raise ValueError(
                f"node CIDR {self.node_cidr} is too large: at most {MAX_POOL_ADDRESSES} "
                "addresses (/20) per node, so that its state fits one store value"
            )
        if self.cluster_cidr is not None and not self.node_cidr.subnet_of(self.cluster_cidr):
            raise ValueError(
                f"node CIDR {self.node_cidr} is not inside the cluster CIDR {self.cluster_cidr}"
            )

    @classmethod
    def parse(cls, node_cidr: str, cluster_cidr: str | None = None) -> IpamConfig:
        """From strings such as '10.88.7.0/24'; ValueError says which one is wrong."""
        cluster = None if cluster_cidr is None else _network(cluster_cidr, "cluster CIDR")
        return cls(_network(node_cidr, "node CIDR"), cluster)

    @property
    def link_network(self) -> IPv4Network:
        """The on-link range containers see: the cluster CIDR, else the node CIDR."""
        return self.cluster_cidr if self.cluster_cidr is not None else self.node_cidr

    def contains(self, address: IPv4Address) -> bool:
        """Whether `address` may be handed out (node CIDR minus its network/broadcast)."""
        net = self.node_cidr
        return address in net and address not in (net.network_address, net.broadcast_address)

    @property
    def capacity(self) -> int:
        return self.node_cidr.num_addresses - 2


def _network(value: str, what: str) -> IPv4Network:
    try:
        return IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValueError(
            f"{what} {value!r} is not an IPv4 network such as 10.88.0.0/16: {exc}"
        ) from None


@dataclass(frozen=True, slots=True)
class Lease:
    """One container's address: put `address` on its eth0, default route via `gateway`."""

    owner: str
    namespace: str
    address: IPv4Interface  # with the on-link (cluster) prefix length
    gateway: IPv4Address


@dataclass(slots=True)
class _Namespace:
    gateway: IPv4Address
    leases: dict[str, IPv4Address]  # owner -> address


class IpamState:
    """One node's allocations. Pure: every method only changes this object.

    Guarantees: an address is held by at most one owner or gateway; an owner
    holds at most one address; `allocate` for an owner that already holds an
    address returns that address; `release` of an unknown owner is a no-op.
    Addresses are handed out round-robin after the last one handed out, so a
    just-released address is the last to be reused (stale ARP entries and
    connections of its former owner age out first).
    """

    def __init__(self, config: IpamConfig) -> None:
        self.config = config
        self._namespaces: dict[str, _Namespace] = {}
        self._owner_ns: dict[str, str] = {}
        self._taken: set[IPv4Address] = set()
        self._cursor: IPv4Address | None = None

    # -- queries ---------------------------------------------------------------

    def lease(self, owner: str) -> Lease | None:
        ns_name = self._owner_ns.get(owner)
        if ns_name is None:
            return None
        return self._lease(owner, ns_name)

    def leases(self) -> list[Lease]:
        """Every lease, sorted by address."""
        found = [self._lease(owner, ns) for owner, ns in self._owner_ns.items()]
        return sorted(found, key=lambda lease: lease.address.ip)

    def gateways(self) -> dict[str, IPv4Address]:
        return {name: ns.gateway for name, ns in sorted(self._namespaces.items())}

    @property
    def free(self) -> int:
        return self.config.capacity - len(self._taken)

    # -- changes ---------------------------------------------------------------

    def allocate(self, owner: str, namespace: str) -> Lease:
        """The lease of `owner` in `namespace`, allocating address (and gateway) if needed.

        IpamError if `owner` already holds an address in another namespace;
        PoolExhausted if the node CIDR has no free address left.
        """
        _check_name(owner, "owner", MAX_OWNER_LENGTH)
        _check_name(namespace, "namespace", MAX_NAMESPACE_LENGTH)
        held = self._owner_ns.get(owner)
        if held is not None:
            if held != namespace:
                raise IpamError(
                    f"{owner!r} already holds an address in namespace {held!r}; "
                    f"release it before allocating in {namespace!r}"
                )
            return self._lease(owner, held)
        needed = 1 if namespace in self._namespaces else 2
        if self.free < needed:
            raise PoolExhausted(
                f"no free address in node CIDR {self.config.node_cidr} for {owner!r} "
                f"({len(self._taken)} of {self.config.capacity} taken): release stopped "
                "containers or give the node a larger CIDR"
            )
        self._ensure_namespace(namespace)
        address = self._next_free()
        self._namespaces[namespace].leases[owner] = address
        self._owner_ns[owner] = namespace
        return self._lease(owner, namespace)

    def gateway(self, namespace: str) -> IPv4Address:
        """The gateway of `namespace` on this node, allocated on first use."""
        _check_name(namespace, "namespace", MAX_NAMESPACE_LENGTH)
        if namespace not in self._namespaces and self.free < 1:
            raise PoolExhausted(
                f"no free address in node CIDR {self.config.node_cidr} for the gateway "
                f"of namespace {namespace!r}"
            )
        return self._ensure_namespace(namespace).gateway

    def release(self, owner: str) -> Lease | None:
        """Free `owner`'s address; the lease it had, or None if it had none.

        The namespace keeps its gateway (its bridge usually outlives the
        container): free that with `release_gateway`.
        """
        lease = self.lease(owner)
        if lease is None:
            return None
        ns = self._namespaces[lease.namespace]
        del ns.leases[owner]
        del self._owner_ns[owner]
        self._taken.discard(lease.address.ip)
        return lease

    def release_gateway(self, namespace: str) -> bool:
        """Free the namespace's gateway. IpamError while it still has leases."""
        ns = self._namespaces.get(namespace)
        if ns is None:
            return False
        if ns.leases:
            raise IpamError(
                f"namespace {namespace!r} still has {len(ns.leases)} address(es) on this "
                "node; release them before its gateway"
            )
        del self._namespaces[namespace]
        self._taken.discard(ns.gateway)
        return True

    def retain(self, owners: Collection[str]) -> list[Lease]:
        """Release every lease whose owner is not in `owners`; the leases released.

        After a restart the agent calls this with the containers it recovered:
        whatever a crash left allocated but unused is freed.
        """
        keep = set(owners)
        stale = [owner for owner in self._owner_ns if owner not in keep]
        released = [self.release(owner) for owner in sorted(stale)]
        return [lease for lease in released if lease is not None]

    # -- JSON ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Plain JSON, readable in the Consul UI; `from_json` reads it back."""
        return {
            "version": FORMAT_VERSION,
            "node_cidr": str(self.config.node_cidr),
            "cluster_cidr": None
            if self.config.cluster_cidr is None
            else str(self.config.cluster_cidr),
            "cursor": None if self._cursor is None else str(self._cursor),
            "namespaces": {
                name: {
                    "gateway": str(ns.gateway),
                    "leases": {owner: str(addr) for owner, addr in sorted(ns.leases.items())},
                }
                for name, ns in sorted(self._namespaces.items())
            },
        }

    @classmethod
    def from_json(cls, config: IpamConfig, obj: Any) -> IpamState:
        """The state in `obj`, checked against `config`.

        IpamError if it is malformed, from a newer Nova, for another CIDR
        (re-addressing a node with live containers is not supported), or
        holds an address twice.
        """
        if not isinstance(obj, dict):
            raise IpamError(f"IPAM state must be a JSON object, got {type(obj).__name__}")
        version = obj.get("version")
        if version != FORMAT_VERSION:
            raise IpamError(
                f"IPAM state has format version {version!r}; this Nova reads {FORMAT_VERSION}"
            )
        for field, want in (("node_cidr", config.node_cidr), ("cluster_cidr", config.cluster_cidr)):
            have = obj.get(field)
            if have != (None if want is None else str(want)):
                raise IpamError(
                    f"IPAM state is for {field} {have!r} but this node is configured with "
                    f"{None if want is None else str(want)!r}: changing a node's CIDRs while "
                    "it has allocations is not supported (drain the node and delete its state)"
                )
        state = cls(config)
        try:
            cursor = obj.get("cursor")
            state._cursor = None if cursor is None else state._address(cursor, "cursor")
            namespaces = obj["namespaces"]
            if not isinstance(namespaces, dict):
                raise TypeError("namespaces must be an object")
            for name, entry in namespaces.items():
                _check_name(name, "namespace", MAX_NAMESPACE_LENGTH)
                gateway = state._take(state._address(entry["gateway"], f"gateway of {name!r}"))
                ns = state._namespaces[name] = _Namespace(gateway, {})
                for owner, text in entry["leases"].items():
                    _check_name(owner, "owner", MAX_OWNER_LENGTH)
                    if owner in state._owner_ns:
                        raise IpamError(f"owner {owner!r} holds two addresses")
                    ns.leases[owner] = state._take(state._address(text, f"lease of {owner!r}"))
                    state._owner_ns[owner] = name
        except IpamError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise IpamError(f"IPAM state is malformed: {exc!r}") from exc
        return state

    # -- internals -------------------------------------------------------------

    def _lease(self, owner: str, namespace: str) -> Lease:
        ns = self._namespaces[namespace]
        address = IPv4Interface((ns.leases[owner], self.config.link_network.prefixlen))
        return Lease(owner, namespace, address, ns.gateway)

    def _ensure_namespace(self, namespace: str) -> _Namespace:
        ns = self._namespaces.get(namespace)
        if ns is None:
            ns = self._namespaces[namespace] = _Namespace(self._next_free(), {})
        return ns

    def _next_free(self) -> IPv4Address:
        net = self.config.node_cidr
        first = int(net.network_address) + 1
        count = self.config.capacity
        start = 0 if self._cursor is None else int(self._cursor) - first + 1
        for step in range(count):
            candidate = IPv4Address(first + (start + step) % count)
            if candidate not in self._taken:
                self._taken.add(candidate)
                self._cursor = candidate
                return candidate
        raise PoolExhausted(f"no free address in node CIDR {net}")  # callers check first

    def _take(self, address: IPv4Address) -> IPv4Address:
        if address in self._taken:
            raise IpamError(f"address {address} is held twice")
        self._taken.add(address)
        return address

    def _address(self, text: Any, what: str) -> IPv4Address:
        address = ipaddress.IPv4Address(text)
        if not self.config.contains(address):
            raise IpamError(f"{what} {address} is outside node CIDR {self.config.node_cidr}")
        return address


def _check_name(value: str, what: str, limit: int) -> None:
    keys.segment(value, what=what)
    if len(value) > limit:
        raise ValueError(f"{what} {value!r} is longer than {limit} characters")


class IpamStore:
    """`IpamState` of one node kept in a store; every change is a compare-and-set.

    Each call reads the state, applies the change and writes it back only if
    nobody wrote in between (`put(..., cas=modify_index)`); otherwise it
    re-reads and re-applies, up to `attempts` times (IpamConflict after that).
    A call that changes nothing writes nothing. Store errors propagate as
    StoreError; a cancelled call may or may not have been applied, which is
    safe because `allocate` is idempotent per owner and `release` per owner.
    """

    def __init__(
        self,
        store: Store,
        node: str,
        config: IpamConfig,
        *,
        attempts: int = DEFAULT_CAS_ATTEMPTS,
    ) -> None:
        self.store = store
        self.node = node
        self.key = ipam_key(node)
        self.config = config
        self.attempts = attempts

    async def load(self) -> IpamState:
        """The current state (a copy: changing it changes nothing stored)."""
        return (await self._read())[0]

    async def allocate(self, owner: str, namespace: str) -> Lease:
        return await self._update(lambda state: state.allocate(owner, namespace))

    async def gateway(self, namespace: str) -> IPv4Address:
        return await self._update(lambda state: state.gateway(namespace))

    async def release(self, owner: str) -> Lease | None:
        return await self._update(lambda state: state.release(owner))

    async def release_gateway(self, namespace: str) -> bool:
        return await self._update(lambda state: state.release_gateway(namespace))

    async def retain(self, owners: Collection[str]) -> list[Lease]:
        return await self._update(lambda state: state.retain(owners))

    async def _read(self) -> tuple[IpamState, int]:
        entry = await self.store.get(self.key)
        if entry is None:
            return IpamState(self.config), 0
        try:
            return IpamState.from_json(self.config, entry.json()), entry.modify_index
        except (IpamError, ValueError) as exc:
            raise IpamError(f"store key {self.key!r}: {exc}") from exc

    async def _update(self, change: Callable[[IpamState], T]) -> T:
        for attempt in range(self.attempts):
            state, index = await self._read()
            before = state.to_json()
            result = change(state)
            after = state.to_json()
            if after == before or await self.store.put_json(self.key, after, cas=index):
                return result
            log.debug("ipam %s: CAS conflict at index %d (attempt %d)", self.key, index, attempt)
            # Jittered, growing pause so that colliding writers spread out.
            await asyncio.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 6)))
        raise IpamConflict(
            f"IPAM state {self.key!r} changed under us {self.attempts} times in a row; "
            "too many concurrent writers, retry later"
        )
