"""Uninstall: remove the kernel state of network policy, whichever run made it.

`nova-agent --uninstall-policy` runs this with the agent stopped (a running
agent would put it back). It needs neither bcc nor a loaded program, so it
also cleans up after an agent that crashed or was upgraded:

- Nova's tc filters (preference TC_PREF, programs `nova_*`) on links named
  with the host-veth prefix; the kernel frees the programs and their maps
  when the last filter holding them goes;
- the nftables tables `inet <table>` and `bridge <table>`;
- when such a table existed, the `nf_call_iptables` option the nftables
  backend turned on, on the bridges those links hang off.

Everything else on those links and bridges stays.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from agent.netpol.ebpf import detach, links_with_filters


@contextmanager
def _rtnl(netns: str | None) -> Iterator[Any]:
    ipr = IPRoute() if netns is None else IPRoute(netns=netns)
    try:
        yield ipr
    finally:
        ipr.close()


def _run(
    argv: list[str], netns: str | None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = [] if netns is None else ["ip", "netns", "exec", netns]
    return subprocess.run(
        [*prefix, *argv], input=stdin, capture_output=True, text=True, check=False
    )


def uninstall(
    *, table: str = "nova", link_prefix: str = "nvh", netns: str | None = None
) -> list[str]:
    """Remove it all (see the module docstring); one line per thing removed."""
    removed: list[str] = []
    bridges: set[str] = set()
    with _rtnl(netns) as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for index in sorted(links_with_filters(ipr, link_prefix)):
            detach(ipr, index)
            removed.append(f"eBPF policy filters on {names.get(index, index)}")
        for link in ipr.get_links():
            master = link.get_attr("IFLA_MASTER")
            if str(link.get_attr("IFLA_IFNAME") or "").startswith(link_prefix) and master:
                bridges.add(str(names.get(master, master)))
    if shutil.which("nft") is None:
        return removed
    found_table = False
    for family in ("inet", "bridge"):
        if _run(["nft", "-j", "list", "table", family, table], netns).returncode != 0:
            continue  # not there
        doc = {"nftables": [{"delete": {"table": {"family": family, "name": table}}}]}
        done = _run(["nft", "-j", "-f", "-"], netns, json.dumps(doc))
        if done.returncode != 0:
            raise OSError(f"cannot delete nftables table {family} {table}: {done.stderr.strip()}")
        found_table = True
        removed.append(f"nftables table {family} {table}")
    for bridge in sorted(bridges) if found_table else ():
        netns_args = [] if netns is None else ["-n", netns]
        _run(
            [
                "ip",
                *netns_args,
                "link",
                "set",
                "dev",
                bridge,
                "type",
                "bridge",
                "nf_call_iptables",
                "0",
            ],
            None,
        )
        removed.append(f"nf_call_iptables on bridge {bridge}")
    return removed
