"""The netlink helper: a small single-threaded process that does the agent's rtnetlink work.

pyroute2 opens a socket inside a netns by forking a child that enters it.
The agent must not fork: it runs uvloop (which cannot open AF_NETLINK
endpoints either) and threads, and a forked child inherits the loop's
signal wake-up fd, so a signal delivered to that child reads as one sent to
the agent (it shut the agent down, in the first try of this design). So the
agent starts this helper once (`python -m agent.isolation.nlhelper FD`) and
sends it requests over a SOCK_SEQPACKET pair, one at a time:

    {"op": "ensure_net", "spec": {...ContainerNetSpec...}}   -> {"ok": true}
    {"op": "remove_net", "id": ID}                            -> {"ok": true, "removed": B}
    {"op": "segment", "action": "ensure"|"remove"|"set_peers",
     "segment": {"kind": "bridge"|"vxlan", "id": N, "gateway": IP|null,
                 "local": IP, "underlay": IFNAME|null}, "peers": [IP, ...]}
                                                              -> {"ok": true}
Failures come back as {"error": MESSAGE}. The helper exits when the agent
closes its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from agent.isolation.netns import ContainerNetSpec, ensure_container_net, remove_container_net
from agent.isolation.segments import BridgeSegment, Segment, VxlanSegment
from agent.sandbox import channel
from nova.errors import NovaError

log = logging.getLogger("nova.agent.isolation.nlhelper")

START_TIMEOUT_S = 30.0


class NetlinkHelperError(NovaError):
    """The helper reported a failure (its message says what and where) or died."""


# -- the helper process ----------------------------------------------------------


def _segment(data: dict[str, Any]) -> Segment:
    gateway = IPv4Address(data["gateway"]) if data.get("gateway") else None
    if data["kind"] == "bridge":
        return BridgeSegment(int(data["id"]), gateway=gateway)
    return VxlanSegment(
        int(data["id"]),
        local=IPv4Address(data["local"]),
        underlay=data.get("underlay"),
        gateway=gateway,
    )


async def _handle(message: dict[str, Any]) -> dict[str, Any]:
    op = message.get("op")
    if op == "ensure_net":
        spec = message["spec"]
        await ensure_container_net(
            ContainerNetSpec(
                container_id=spec["container_id"],
                address=IPv4Interface(spec["address"]) if spec.get("address") else None,
                gateway=IPv4Address(spec["gateway"]) if spec.get("gateway") else None,
                bridge=spec.get("bridge"),
                mtu=spec.get("mtu"),
                host_route=bool(spec.get("host_route")),
            )
        )
        return {"ok": True}
    if op == "remove_net":
        return {"ok": True, "removed": await remove_container_net(message["id"])}
    if op == "segment":
        segment = _segment(message["segment"])
        action = message["action"]
        if action == "ensure":
            await segment.ensure()
        elif action == "remove":
            await segment.remove()
        elif action == "set_peers":
            await segment.set_peers(IPv4Address(p) for p in message.get("peers", []))
        else:
            return {"error": f"unknown segment action {action!r}"}
        return {"ok": True}
    return {"error": f"unknown request {op!r}"}


async def _serve(sock: socket.socket) -> None:
    while True:
        message, fds = await asyncio.to_thread(channel.recv, sock)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if message is None:
            return
        try:
            reply = await _handle(message)
        except Exception as exc:  # every failure is the agent's to report
            reply = {"error": str(exc) or type(exc).__name__}
        channel.send(sock, reply)


def main(fd: int) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(socket.socket(fileno=fd)))


# -- the agent's side --------------------------------------------------------------


class NetlinkHelper:
    """The agent's handle on the helper process (started on first use, restarted if dead)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # one request in flight

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        reply = await asyncio.to_thread(self._request, message)
        if "error" in reply:
            raise NetlinkHelperError(str(reply["error"]))
        return reply

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            for attempt in (1, 2):  # a dead helper is restarted once
                sock = self._ensure_started()
                try:
                    channel.send(sock, message)
                    reply, _ = channel.recv(sock)
                except OSError:
                    reply = None
                if reply is not None:
                    return reply
                self._reset()
                if attempt == 2:
                    raise NetlinkHelperError("the netlink helper process died twice in a row")
        raise AssertionError("unreachable")

    def _ensure_started(self) -> socket.socket:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        self._reset()
        ours, theirs = channel.pair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agent.isolation.nlhelper", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C is the agent's to handle
        )
        theirs.close()
        ours.settimeout(START_TIMEOUT_S * 4)  # an answer, however slow the kernel is
        self._sock = ours
        return ours

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._reset()  # EOF ends the helper


if __name__ == "__main__":
    main(int(sys.argv[1]))
