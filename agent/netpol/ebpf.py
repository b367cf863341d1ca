"""eBPF policy backend: tc clsact programs on each container's host veth, loaded with bcc.

`bpf/policy.c` holds the two programs and the maps (names `nova_*_v1`).
`start()` compiles and loads them once per process; `apply()` only writes
maps and attaches the already-loaded programs to new endpoints:

    tc ingress of host veth  nova_from_ctr   the container's egress
    tc egress  of host veth  nova_to_ctr     the container's ingress

Each filter is installed with `tc filter replace` at a fixed preference and
handle (`TC_PREF`, handle 1), so a program is swapped for another in one
netlink request and never absent.

Swap safety: an apply writes new and changed entries first (policy, ipcache,
CIDRs), then the endpoint configs (isolation flags), then deletes entries no
longer wanted. While it runs an isolated endpoint allows at most the union
of the old and new policy, never everything.

Drop logging (`drop_log_rate` > 0): the programs put each drop, at most that
many a second over all CPUs, on the `nova_drops_v1` ring buffer; a thread of
this backend polls it and logs one line per drop on the logger
`nova.agent.netpol.drops` (endpoint, direction, addresses, ports, policy).

Agent restart: maps are not pinned (bpffs is not mounted on every host), so
a new process loads new programs with new, empty maps. The old filters keep
enforcing the old policy (the filter holds the old program and its maps)
until `apply()` has filled the new maps and replaced each endpoint's filter.
Enforcement is never off; tracked flows are forgotten, so a connection the
new policy would not accept as new is cut by the restart. `start()` records
which links carry filters of an earlier run; the first `apply()` removes
them from links that are no longer endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from agent.netpol import backend as api
from agent.netpol.ebpf_keys import (
    DIR_EGRESS,
    DIR_INGRESS,
    PolicyKey,
    cidr_identities,
    policy_entries,
    rule_cidrs,
)
from agent.netpol.tables import CompiledPolicy, EndpointTables

log = logging.getLogger("nova.agent.netpol.ebpf")

SOURCE = Path(__file__).resolve().parent / "bpf" / "policy.c"
TC_PREF = 0x4E  # the filter preference (priority) Nova's programs use; 'N'
TC_HANDLE = 1
PARENT_INGRESS = 0xFFFFFFF2  # TC_H_CLSACT:TC_H_MIN_INGRESS
PARENT_EGRESS = 0xFFFFFFF3  # TC_H_CLSACT:TC_H_MIN_EGRESS
PROG_FROM_CTR = "nova_from_ctr"
PROG_TO_CTR = "nova_to_ctr"
FIRST_POLICY_COUNTER = 16
MAX_COUNTERS = 16384  # MAX_COUNTERS in policy.c
_FIXED_COUNTERS = {
    0: api.COUNTER_UNISOLATED,
    1: api.COUNTER_ESTABLISHED,
    2: api.COUNTER_SPOOFED,
    3: api.COUNTER_NOT_IPV4,
}
_GONE = frozenset({errno.ENOENT, errno.ENODEV, errno.EINVAL})
_PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_SCTP: "sctp"}

drop_log = logging.getLogger("nova.agent.netpol.drops")


class _DropEvent(ctypes.Structure):
    """struct drop_event in policy.c."""

    _fields_ = [
        ("endpoint", ctypes.c_uint32),
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("counter", ctypes.c_uint32),
        ("protocol", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


def _be32(address: IPv4Address | IPv4Network) -> int:
    """An IPv4 address as the u32 the program compares (network byte order in memory)."""
    packed = (address.network_address if isinstance(address, IPv4Network) else address).packed
    return int(struct.unpack("=I", packed)[0])


@dataclass(frozen=True, slots=True)
class _Attached:
    key: str
    ifname: str
    ifindex: int


class EbpfBackend(api.PolicyBackend):
    """Policy in tc programs and bcc maps (see the module docstring)."""

    name = "ebpf"

    def __init__(
        self, *, link_prefix: str = "nvh", netns: str | None = None, drop_log_rate: int = 0
    ) -> None:
        self._drop_log_rate = drop_log_rate  # drops logged per second at most; 0: none
        self._poller: threading.Thread | None = None
        self._polling = threading.Event()
        self._link_prefix = link_prefix  # only links named so are ever adopted or cleaned
        self._netns = netns  # where the host veths live (None: this process's netns)
        self._rtnl: Any = None
        self._bpf: Any = None
        self._progs: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._attached: dict[str, _Attached] = {}  # by endpoint key
        self._policy: dict[PolicyKey, int] = {}
        self._ipcache: dict[int, int] = {}
        self._cidrs: dict[IPv4Network, int] = {}
        self._configs: dict[int, bytes] = {}  # ifindex -> endpoint_config as written
        self._slots: dict[str, int] = {name: slot for slot, name in _FIXED_COUNTERS.items()}
        self._earlier_run: set[int] = set()  # ifindexes with filters from another process

    # -- interface ---------------------------------------------------------------

    async def start(self) -> None:
        async with self._lock:
            if self._bpf is None:
                await asyncio.to_thread(self._load)

    async def apply(self, compiled: CompiledPolicy) -> None:
        async with self._lock:
            if self._bpf is None:
                raise api.PolicyBackendError(self.name, "apply", "maps", "start() was not called")
            await asyncio.to_thread(self._apply, compiled)

    async def counters(self) -> Mapping[str, tuple[int, int]]:
        async with self._lock:
            if self._bpf is None:
                return {}
            return await asyncio.to_thread(self._read_counters)

    async def close(self, *, remove: bool) -> None:
        async with self._lock:
            if remove and self._bpf is not None:
                await asyncio.to_thread(self._detach_all)
            if self._poller is not None:
                self._polling.clear()
                await asyncio.to_thread(self._poller.join)
                self._poller = None
            if self._bpf is not None:
                self._bpf.cleanup()
            if self._rtnl is not None:
                self._rtnl.close()
                self._rtnl = None
            self._bpf = None
            self._progs = {}

    @contextlib.contextmanager
    def _ipr(self) -> Iterator[Any]:
        """The backend's rtnetlink socket, opened once (opening one in another netns
        costs a child process: pyroute2 makes it there, so this process never setns())."""
        if self._rtnl is None:
            self._rtnl = IPRoute() if self._netns is None else IPRoute(netns=self._netns)
        yield self._rtnl

    # -- loading ---------------------------------------------------------------------

    def _load(self) -> None:
        from bcc import BPF  # type: ignore[import-untyped]

        try:
            bpf = BPF(src_file=str(SOURCE), cflags=["-Wno-macro-redefined"])
            progs = {
                name: bpf.load_func(name.encode(), BPF.SCHED_CLS)
                for name in (PROG_FROM_CTR, PROG_TO_CTR)
            }
        except Exception as exc:  # bcc raises bare Exception for compile/verifier errors
            raise api.PolicyBackendError(self.name, "load", str(SOURCE), str(exc)) from exc
        self._bpf, self._progs = bpf, progs
        if self._drop_log_rate > 0:
            self._start_drop_log()
        self._earlier_run = self._links_with_our_filters()
        log.info(
            "eBPF policy programs loaded (%d links carry an earlier run's filters)",
            len(self._earlier_run),
        )

    def _start_drop_log(self) -> None:
        table = self._bpf[b"nova_droplog_v1"]
        config = table.Leaf()
        config.rate = self._drop_log_rate
        table[table.Key(0)] = config
        self._bpf[b"nova_drops_v1"].open_ring_buffer(self._on_drop)
        self._polling.set()
        self._poller = threading.Thread(target=self._poll_drops, name="nova-drop-log", daemon=True)
        self._poller.start()

    def _poll_drops(self) -> None:
        bpf = self._bpf
        while self._polling.is_set():
            bpf.ring_buffer_poll(100)  # ms: how long close() waits at most

    def _on_drop(self, _ctx: Any, data: Any, _size: int) -> None:
        try:  # a bad event must not end the poller
            self._log_drop(ctypes.cast(data, ctypes.POINTER(_DropEvent)).contents)
        except Exception:
            log.exception("cannot log a policy drop")

    def _log_drop(self, ev: _DropEvent) -> None:
        # list() snapshots in one step: apply() changes these dicts from another thread
        attached = list(self._attached.values())
        slots = list(self._slots.items())
        where = next(
            (f"{a.key} ({a.ifname})" for a in attached if a.ifindex == ev.endpoint),
            f"ifindex {ev.endpoint}",
        )
        policy = next((name for name, slot in slots if slot == ev.counter), "?")
        protocol = _PROTOCOLS.get(ev.protocol, f"protocol {ev.protocol}")
        src = str(IPv4Address(struct.pack("=I", ev.saddr)))
        dst = str(IPv4Address(struct.pack("=I", ev.daddr)))
        if ev.protocol in _PROTOCOLS:
            src += f":{socket.ntohs(ev.sport)}"
            dst += f":{socket.ntohs(ev.dport)}"
        direction = "ingress" if ev.direction == DIR_INGRESS else "egress"
        drop_log.info(
            "policy drop at %s %s: %s %s -> %s (%s)", where, direction, protocol, src, dst, policy
        )

    def _links_with_our_filters(self) -> set[int]:
        with self._ipr() as ipr:
            return links_with_filters(ipr, self._link_prefix)

    # -- apply -------------------------------------------------------------------------

    def _apply(self, compiled: CompiledPolicy) -> None:
        failures: list[str] = []
        with self._ipr() as ipr:
            wanted: dict[str, _Attached] = {}
            for key, entry in compiled.endpoints.items():
                ifname = entry.endpoint.host_ifname
                found = ipr.link_lookup(ifname=ifname)
                if not found:
                    failures.append(f"{key}: host veth {ifname} does not exist")
                    continue
                wanted[key] = _Attached(key, ifname, int(found[0]))
            ids = {key: a.ifindex for key, a in wanted.items()}
            cidrs = cidr_identities(rule_cidrs(compiled), self._cidrs)
            policy = policy_entries(compiled, ids, cidrs, self._slot)
            ipcache = {_be32(ip): ident for ip, ident in compiled.ipcache.items()}
            configs = {
                a.ifindex: self._config(compiled.endpoints[key]) for key, a in wanted.items()
            }
            # 1. everything that allows: new entries before any flag isolates
            self._write("nova_ipcache_v1", ipcache, self._ipcache, self._ipcache_kv)
            self._write("nova_cidrs_v1", cidrs, self._cidrs, self._cidr_kv)
            self._write("nova_policy_v1", policy, self._policy, self._policy_kv)
            # 2. endpoint configs, then programs onto endpoints that have none yet
            self._write("nova_endpoints_v1", configs, self._configs, self._config_kv)
            for key, attached in wanted.items():
                if self._attached.get(key) == attached:
                    continue
                try:
                    self._attach(ipr, attached)
                except NetlinkError as exc:
                    failures.append(f"{key}: attach to {attached.ifname}: {exc}")
                    configs.pop(attached.ifindex)
                    del ids[key]
                    continue
                self._attached[key] = attached
            # 3. stale entries, and endpoints that are gone
            for key in set(self._attached) - set(wanted):
                self._detach(ipr, self._attached.pop(key))
            for index in self._earlier_run - {a.ifindex for a in self._attached.values()}:
                self._detach(ipr, _Attached("", f"ifindex {index}", index))
            self._earlier_run = set()
            self._delete_stale("nova_endpoints_v1", configs, self._configs, self._config_kv)
            self._delete_stale("nova_policy_v1", policy, self._policy, self._policy_kv)
            self._delete_stale("nova_cidrs_v1", cidrs, self._cidrs, self._cidr_kv)
            self._delete_stale("nova_ipcache_v1", ipcache, self._ipcache, self._ipcache_kv)
        if failures:
            raise api.PolicyBackendError(self.name, "apply", "endpoints", "; ".join(failures))

    def _slot(self, policy: str) -> int:
        slot = self._slots.get(policy)
        if slot is None:
            slot = FIRST_POLICY_COUNTER + len(self._slots) - len(_FIXED_COUNTERS)
            if slot >= MAX_COUNTERS:
                slot = 0  # counted as unattributed rather than failing the apply
            self._slots[policy] = slot
        return slot

    def _config(self, entry: EndpointTables) -> bytes:
        deny = [0, 0]
        for direction, table in ((DIR_INGRESS, entry.ingress), (DIR_EGRESS, entry.egress)):
            deny[direction] = self._slot(api.deny_counter_name(entry, table))
        return struct.pack(
            "=IBBxxII",
            _be32(entry.endpoint.ip),
            entry.ingress.isolated,
            entry.egress.isolated,
            deny[DIR_INGRESS],
            deny[DIR_EGRESS],
        )

    # Map writes: (table, python key/value) -> ctypes key/leaf.

    def _ipcache_kv(self, table: Any, key: int, value: int) -> tuple[Any, Any]:
        return table.Key(key), table.Leaf(value)

    def _cidr_kv(self, table: Any, key: IPv4Network, value: int) -> tuple[Any, Any]:
        return table.Key(key.prefixlen, _be32(key)), table.Leaf(value)

    def _policy_kv(self, table: Any, key: PolicyKey, value: int) -> tuple[Any, Any]:
        ckey = table.Key(
            key.prefixlen,
            key.endpoint,
            key.identity,
            key.direction,
            key.protocol,
            socket.htons(key.port),
        )
        return ckey, table.Leaf(value)

    def _config_kv(self, table: Any, key: int, value: bytes) -> tuple[Any, Any]:
        leaf = table.Leaf()
        ctypes.memmove(ctypes.addressof(leaf), value, len(value))
        return table.Key(key), leaf

    def _write(self, name: str, new: Mapping[Any, Any], current: dict[Any, Any], kv: Any) -> None:
        table = self._bpf[name.encode()]
        for key, value in new.items():
            if current.get(key) != value:
                k, v = kv(table, key, value)
                try:
                    table[k] = v
                except Exception as exc:  # bcc: map full, bad key
                    raise api.PolicyBackendError(self.name, "write", name, str(exc)) from exc
                current[key] = value

    def _delete_stale(
        self, name: str, new: Mapping[Any, Any], current: dict[Any, Any], kv: Any
    ) -> None:
        table = self._bpf[name.encode()]
        for key in [k for k in current if k not in new]:
            k, _ = kv(table, key, current[key])
            with contextlib.suppress(KeyError):
                del table[k]
            del current[key]

    # -- tc ----------------------------------------------------------------------------

    def _attach(self, ipr: Any, attached: _Attached) -> None:
        try:
            ipr.tc("add", "clsact", attached.ifindex)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        for parent, prog in ((PARENT_INGRESS, PROG_FROM_CTR), (PARENT_EGRESS, PROG_TO_CTR)):
            fn = self._progs[prog]
            ipr.tc(
                "replace-filter",
                "bpf",
                attached.ifindex,
                TC_HANDLE,
                fd=fn.fd,
                name=fn.name,
                parent=parent,
                prio=TC_PREF,
                protocol=0x0003,  # ETH_P_ALL
                direct_action=True,
            )
        log.debug("policy programs attached to %s", attached.ifname)

    def _detach(self, ipr: Any, attached: _Attached) -> None:
        detach(ipr, attached.ifindex)
        log.debug("policy programs detached from %s", attached.ifname)

    def _detach_all(self) -> None:
        with self._ipr() as ipr:
            for attached in list(self._attached.values()):
                self._detach(ipr, attached)
            for index in self._earlier_run:  # never applied: an earlier run's filters go too
                detach(ipr, index)
        self._attached.clear()
        self._earlier_run = set()
        for name, current, kv in (
            ("nova_endpoints_v1", self._configs, self._config_kv),
            ("nova_policy_v1", self._policy, self._policy_kv),
            ("nova_cidrs_v1", self._cidrs, self._cidr_kv),
            ("nova_ipcache_v1", self._ipcache, self._ipcache_kv),
        ):
            self._delete_stale(name, {}, current, kv)

    # -- counters ----------------------------------------------------------------------

    def _read_counters(self) -> dict[str, tuple[int, int]]:
        table = self._bpf[b"nova_counters_v1"]
        out: dict[str, tuple[int, int]] = {}
        for name, slot in self._slots.items():
            per_cpu = table[table.Key(slot)]
            allowed = sum(int(c.allowed) for c in per_cpu)
            denied = sum(int(c.denied) for c in per_cpu)
            a, d = out.get(name, (0, 0))
            out[name] = (a + allowed, d + denied)
        return out

    def attached(self) -> Iterable[str]:
        """Host veth names carrying this backend's programs (for status and tests)."""
        return sorted(a.ifname for a in self._attached.values())


def links_with_filters(ipr: Any, link_prefix: str) -> set[int]:
    """Indexes of links named `link_prefix`* that carry Nova's policy filter (any run's)."""
    found: set[int] = set()
    for link in ipr.get_links():
        index = link["index"]
        if not str(link.get("ifname") or "").startswith(link_prefix):
            continue
        try:
            filters = ipr.get_filters(index=index, parent=PARENT_INGRESS)
        except NetlinkError:
            continue
        for f in filters:
            name = f.get_nested("TCA_OPTIONS", "TCA_BPF_NAME")
            if f.get("kind") == "bpf" and str(name or "").startswith(PROG_FROM_CTR):
                found.add(index)
    return found


def detach(ipr: Any, ifindex: int) -> None:
    """Delete Nova's two filters from a link; anything else on it (and clsact) stays."""
    for parent in (PARENT_INGRESS, PARENT_EGRESS):
        try:  # ours by preference and handle
            ipr.tc(
                "del-filter",
                "bpf",
                ifindex,
                TC_HANDLE,
                parent=parent,
                prio=TC_PREF,
                protocol=0x0003,
            )
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise
