"""nftables policy backend: the compiled tables as nft verdict maps, one transaction per apply.

Used where eBPF is not (see backend.select_backend). The ruleset is built by
`nft_ruleset.transaction()` and handed to `nft -j -f -` as one JSON document:
the kernel swaps the old tables for the new ones atomically, so there is no
moment with a half-applied policy, and a rejected document leaves the last
good tables untouched.

Which hook sees container traffic: containers of one namespace share a
bridge, and this kernel (like many) lacks nf_conntrack_bridge, so the bridge
family cannot match `ct state`. Policy therefore lives in family inet, which
sees bridged IPv4 through br_netfilter. That needs bridge-nf-call-iptables on
the bridge: instead of flipping the host-wide sysctl, the backend turns on
the bridge's own `nf_call_iptables` option on each bridge that carries an
endpoint, and puts back the previous value on `close(remove=True)`. A small
bridge-family table drops frames whose IPv4 source is not the sending
endpoint's address (spoofing) and non-IPv4, non-ARP frames of isolated
endpoints.

Drop logging (`drop_log_rate` > 0): before its drop, each isolated
endpoint's chain logs to the kernel log (prefix `nova drop`), at most that
many packets a second per endpoint and direction (one nft `limit` each). The
kernel only logs from the initial network namespace unless
`net.netfilter.nf_log_all_netns` is 1.

Agent restart: the tables stay in the kernel while the agent is away; the
first apply of the new process replaces them in one transaction (never a gap).
Later applies send only the difference from the previous apply (new and
changed chains, added and removed map elements, objects that are gone; see
nft_objects.update_document), still in one transaction: the cost of a change
follows the size of the change, not of the policy, and the named counter
objects keep counting. Should an update be refused (say, someone edited
Nova's tables by hand), the backend logs it and replaces the tables instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import Mapping
from typing import Any

from agent.netpol import backend as api
from agent.netpol.nft_objects import Ruleset, replace_document, update_document
from agent.netpol.nft_ruleset import ChainNames, Counters, desired
from agent.netpol.tables import CompiledPolicy

log = logging.getLogger("nova.agent.netpol.nft")


class NftBackend(api.PolicyBackend):
    """Policy in nftables tables named `table` (families inet and bridge)."""

    name = "nftables"

    def __init__(
        self, *, table: str = "nova", netns: str | None = None, drop_log_rate: int = 0
    ) -> None:
        self._drop_log_rate = drop_log_rate
        self._table = table
        self._netns = netns
        self._lock = asyncio.Lock()
        self._counters = Counters()
        self._bridges_changed: dict[str, str] = {}  # bridge -> nf_call_iptables before
        self._started = False
        self._names = ChainNames()
        self._applied: Ruleset | None = None  # what the tables hold (the last apply)

    # -- interface ---------------------------------------------------------------

    async def start(self) -> None:
        async with self._lock:
            await self._nft(["--version"], what="start")
            self._started = True

    async def apply(self, compiled: CompiledPolicy) -> None:
        async with self._lock:
            if not self._started:
                raise api.PolicyBackendError(self.name, "apply", self._table, "not started")
            ports, missing = await self._host_ports(compiled)
            await self._enable_bridge_hooks(ports.values())
            wanted = desired(
                compiled,
                table=self._table,
                ports=ports,
                counters=self._counters,
                names=self._names,
                drop_log_rate=self._drop_log_rate,
            )
            await self._change_to(wanted)
            if missing:
                raise api.PolicyBackendError(self.name, "apply", "endpoints", "; ".join(missing))

    async def counters(self) -> Mapping[str, tuple[int, int]]:
        async with self._lock:
            return await self._read_counters()

    async def close(self, *, remove: bool) -> None:
        async with self._lock:
            if not remove:
                return
            for family in ("inet", "bridge"):
                doc = {
                    "nftables": [
                        {"add": {"table": {"family": family, "name": self._table}}},
                        {"delete": {"table": {"family": family, "name": self._table}}},
                    ]
                }
                await self._nft(["-j", "-f", "-"], json.dumps(doc), what="remove")
            for bridge, before in self._bridges_changed.items():
                await self._ip(
                    ["link", "set", "dev", bridge, "type", "bridge", "nf_call_iptables", before],
                    check=False,
                )
            self._bridges_changed.clear()
            self._started = False
            self._applied = None

    # -- internals ---------------------------------------------------------------

    async def _change_to(self, wanted: Ruleset) -> None:
        """Make the tables hold `wanted`: an update when we know what they hold."""
        update = None if self._applied is None else update_document(self._applied, wanted)
        if update is not None and update["nftables"]:
            try:
                await self._nft(["-j", "-f", "-"], json.dumps(update), what="update")
            except api.PolicyBackendError as exc:
                log.warning("%s; replacing the tables instead (counters restart)", exc)
                update = None
        if update is None:
            self._applied = None  # unknown until the replacement is in
            await self._nft(["-j", "-f", "-"], json.dumps(replace_document(wanted)), what="apply")
        self._applied = wanted

    async def _read_counters(self) -> dict[str, tuple[int, int]]:
        """Report name -> (allowed, denied) from the counter objects in the kernel now."""
        by_object: dict[str, int] = {}
        for family in ("inet", "bridge"):
            out = await self._nft(
                ["-j", "list", "counters", "table", family, self._table],
                what="read counters",
                check=False,
            )
            for item in json.loads(out or '{"nftables": []}').get("nftables", []):
                c = item.get("counter")
                if c:
                    by_object[c["name"]] = by_object.get(c["name"], 0) + int(c["packets"])
        result: dict[str, tuple[int, int]] = {}
        for (name, denied), obj in self._counters.by_name.items():
            packets = by_object.get(obj, 0)
            result[name] = _add(result.get(name, (0, 0)), (0, packets) if denied else (packets, 0))
        return result

    async def _host_ports(self, compiled: CompiledPolicy) -> tuple[dict[str, str], list[str]]:
        links = json.loads(await self._ip(["-j", "link", "show"]))
        present = {link["ifname"]: link.get("master") for link in links}
        ports: dict[str, str] = {}
        missing: list[str] = []
        for key, entry in compiled.endpoints.items():
            ifname = entry.endpoint.host_ifname
            if ifname in present:
                ports[key] = ifname
            else:
                missing.append(f"{key}: host veth {ifname} does not exist")
        self._masters = {present[p] for p in ports.values() if present[p]}
        return ports, missing

    async def _enable_bridge_hooks(self, _ports: Any) -> None:
        for bridge in sorted(self._masters - set(self._bridges_changed)):
            info = json.loads(await self._ip(["-j", "-d", "link", "show", "dev", bridge]))
            data = info[0].get("linkinfo", {}).get("info_data", {})
            if data.get("nf_call_iptables") in (1, True):
                continue
            await self._ip(
                ["link", "set", "dev", bridge, "type", "bridge", "nf_call_iptables", "1"]
            )
            self._bridges_changed[bridge] = "0"
            log.info("bridge %s: nf_call_iptables on (IPv4 policy on bridged traffic)", bridge)

    def _prefix(self) -> list[str]:
        return [] if self._netns is None else ["ip", "netns", "exec", self._netns]

    async def _nft(
        self, argv: list[str], stdin: str | None = None, *, what: str, check: bool = True
    ) -> str:
        return await self._run([*self._prefix(), "nft", *argv], stdin, what=what, check=check)

    async def _ip(self, argv: list[str], *, check: bool = True) -> str:
        netns = [] if self._netns is None else ["-n", self._netns]
        return await self._run(["ip", *netns, *argv], None, what="ip", check=check)

    async def _run(self, argv: list[str], stdin: str | None, *, what: str, check: bool) -> str:
        # The document goes in as an unlinked temporary file, not a pipe: `nft -f -`
        # opens /dev/stdin, which fails (ENXIO) on the socketpair uvloop (the agent's
        # loop) gives a child for a pipe.
        with tempfile.TemporaryFile() as document:
            if stdin is not None:
                document.write(stdin.encode())
                document.seek(0)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=document if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
        if check and proc.returncode != 0:
            reason = err.decode(errors="replace").strip().splitlines()
            raise api.PolicyBackendError(
                self.name, what, f"table {self._table}", reason[0] if reason else "failed"
            )
        return out.decode()


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]
