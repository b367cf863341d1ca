"""A policy engine in a process of its own, so a test can kill it as an agent dies.

    python -m tests.linux.netpol_engine_child BACKEND TABLE LINK_PREFIX NETNS POLICY_DIR \
        ENDPOINTS_JSON RECOVERY_S

It starts the engine the way the agent does (endpoints_pending), waits
RECOVERY_S as an agent recovering its containers would, reports the
endpoints, prints `ready` once that is enforced, then follows POLICY_DIR
until killed. Nothing is cleaned up on exit: a killed agent leaves the
kernel state as it is.
"""

from __future__ import annotations

import asyncio
import json
import sys
from ipaddress import IPv4Address
from pathlib import Path

import uvloop

from agent.netpol.backend import select_backend
from agent.netpol.engine import PolicyEngine
from agent.netpol.sources import DirectorySource
from agent.netpol.tables import Endpoint


async def main(argv: list[str]) -> None:
    backend_name, table, link_prefix, netns, policy_dir, endpoints_json, recovery_s = argv
    backend = select_backend(backend_name, table=table, link_prefix=link_prefix, netns=netns)
    engine = PolicyEngine(
        backend, sources=[DirectorySource(Path(policy_dir))], endpoints_pending=True
    )
    await engine.start()
    await asyncio.sleep(float(recovery_s))
    for key, ip, namespace, labels, host_ifname in json.loads(endpoints_json):
        engine.add_endpoint(Endpoint(key, IPv4Address(ip), namespace, labels, host_ifname))
    engine.endpoints_synced()
    await engine.wait_applied(timeout=30)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1:]))  # the agent's loop (its subprocess pipes are socketpairs)
