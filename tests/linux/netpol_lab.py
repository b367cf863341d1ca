"""A lab for network-policy tests with real packets: pods in namespaces x, y, z.

Everything lives in network namespaces this module makes, named with the
prefixes the netpol tests own: a simulated host `npb-h<token>` holding the
bridge `npbbr<token>` and the pods' host veth ends `npb<token><ns><pod>`, and
one netns per pod `npb-<token>-<ns><pod>` with `eth0` (10.77.0.0/24). Deleting
the namespaces removes every link, tc filter and nft table made inside them;
`Lab.close()` does that and kills the pod processes, and `leftovers()` lists
whatever still carries the token.

Each pod runs one helper process (`POD_AGENT`, via `ip netns exec`, so the
test process never enters a namespace): it serves TCP and UDP echo on
`PORTS` and answers probe requests from stdin, many at once, so a whole
reachability matrix costs about one probe timeout.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import IO

import pytest

from agent.netpol.backend import ebpf_unavailable_reason
from agent.netpol.tables import IPPROTO_TCP, IPPROTO_UDP, Endpoint

SUBNET = IPv4Network("10.77.0.0/24")
PORTS = (80, 81, 8080)
NAMESPACES = {"x": 1, "y": 2, "z": 3}  # -> the tens digit of their pods' addresses
PODS = ("a", "b", "c")
NAMESPACE_LABELS: dict[str, dict[str, str]] = {
    "x": {"team": "red", "nova.sh/namespace": "x"},
    "y": {"team": "blue", "nova.sh/namespace": "y"},
    "z": {"team": "blue", "nova.sh/namespace": "z"},
}

POD_AGENT = r"""
import itertools, json, socket, sys, threading
from concurrent.futures import ThreadPoolExecutor
PORTS = json.loads(sys.argv[1])

def tcp_server(port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port)); srv.listen(128)
    while True:
        conn, _ = srv.accept()
        try:
            conn.settimeout(2); data = conn.recv(64); conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

def udp_server(port):
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))
    while True:
        data, peer = srv.recvfrom(64); srv.sendto(data, peer)

# Every probe from its own source port, never reused: a flow allowed by an earlier
# scenario (still tracked by conntrack or the eBPF flow map) must not answer for this one.
SPORTS = itertools.count(20000)
SPORT_LOCK = threading.Lock()

def probe(req):
    proto, ip, port, timeout = req
    with SPORT_LOCK:
        sport = next(SPORTS)
    try:
        if proto == "tcp":
            source = ("0.0.0.0", sport)
            with socket.create_connection((ip, port), timeout, source) as s:
                s.sendall(b"nova"); return s.recv(64) == b"nova"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0", sport)); s.settimeout(timeout); s.sendto(b"nova", (ip, port))
            return s.recvfrom(64)[0] == b"nova"
    except OSError:
        return False

for port in PORTS:
    for target in (tcp_server, udp_server):
        threading.Thread(target=target, args=(port,), daemon=True).start()
pool = ThreadPoolExecutor(64)
print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps(list(pool.map(probe, json.loads(line)))), flush=True)
"""


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@dataclass
class Pod:
    namespace: str
    name: str
    address: IPv4Address
    netns: str
    host_ifname: str
    labels: dict[str, str]
    agent: subprocess.Popen[str] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def endpoint(self) -> Endpoint:
        return Endpoint(self.key, self.address, self.namespace, self.labels, self.host_ifname)

    def probe(self, requests: list[tuple[str, str, int, float]]) -> list[bool]:
        assert self.agent is not None and self.agent.stdin and self.agent.stdout
        self.agent.stdin.write(json.dumps(requests) + "\n")
        self.agent.stdin.flush()
        answer: list[bool] = json.loads(_readline(self.agent.stdout, self.key))
        return answer


def _readline(stream: IO[str], who: str) -> str:
    line = stream.readline()
    if not line:
        raise RuntimeError(f"pod agent of {who} exited")
    return line


@dataclass
class Lab:
    token: str = field(default_factory=lambda: secrets.token_hex(2))
    pods: dict[str, Pod] = field(default_factory=dict)

    @property
    def host_netns(self) -> str:
        return f"npb-h{self.token}"

    @property
    def bridge(self) -> str:
        return f"npbbr{self.token}"

    @property
    def link_prefix(self) -> str:
        return f"npb{self.token}"

    def netns_names(self) -> list[str]:
        return [self.host_netns, *(p.netns for p in self.pods.values())]

    def build(self) -> None:
        ip("netns", "add", self.host_netns)
        ip("-n", self.host_netns, "link", "set", "lo", "up")
        ip("-n", self.host_netns, "link", "add", self.bridge, "type", "bridge")
        ip("-n", self.host_netns, "link", "set", self.bridge, "up")
        for ns, tens in NAMESPACES.items():
            for n, name in enumerate(PODS, start=1):
                pod = Pod(
                    namespace=ns,
                    name=name,
                    address=SUBNET[tens * 10 + n],
                    netns=f"npb-{self.token}-{ns}{name}",
                    host_ifname=f"{self.link_prefix}{ns}{name}",
                    labels={"pod": name},
                )
                self.pods[pod.key] = pod
                self._add_pod(pod)
        for pod in self.pods.values():
            assert pod.agent is not None and pod.agent.stdout
            if _readline(pod.agent.stdout, pod.key).strip() != "ready":
                raise RuntimeError(f"pod agent of {pod.key} did not start")

    def _add_pod(self, pod: Pod) -> None:
        ip("netns", "add", pod.netns)
        h = ("-n", self.host_netns)
        ip(
            *h,
            "link",
            "add",
            pod.host_ifname,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.netns,
        )
        ip(*h, "link", "set", pod.host_ifname, "master", self.bridge, "up")
        ip("-n", pod.netns, "link", "set", "lo", "up")
        ip("-n", pod.netns, "addr", "add", f"{pod.address}/{SUBNET.prefixlen}", "dev", "eth0")
        ip("-n", pod.netns, "link", "set", "eth0", "up")
        pod.agent = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns, sys.executable, "-c", POD_AGENT, json.dumps(PORTS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def close(self) -> None:
        for pod in self.pods.values():
            if pod.agent is not None:
                pod.agent.kill()
                pod.agent.wait()
        for ns in self.netns_names():
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def leftovers(self) -> list[str]:
        """Names of this lab's netns still present (links die with their netns)."""
        present = set(os.listdir("/var/run/netns")) if os.path.isdir("/var/run/netns") else set()
        return sorted(n for n in present if self.token in n and n.startswith("npb-"))

    def endpoints(self) -> list[Endpoint]:
        return [p.endpoint() for p in self.pods.values()]

    # -- reachability ---------------------------------------------------------------

    def matrices(
        self, probes: Iterable[tuple[int, int]], *, timeout: float = 0.25
    ) -> dict[tuple[int, int], dict[tuple[str, str], bool]]:
        """For each (protocol, port): (from, to) -> whether a probe got its echo back,
        for every ordered pair of distinct pods, all probed at once.

        Probes that fail are tried once more with twice the timeout, so a slow
        machine does not turn an allowed pair into a denied one.
        """
        names = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}
        wanted = list(probes)
        result: dict[tuple[int, int, str, str], bool] = {}
        for wait in (timeout, 2 * timeout):
            by_source: dict[str, list[tuple[int, int, str]]] = {}
            for proto, port in wanted:
                for s in self.pods:
                    for d in self.pods:
                        if s != d and not result.get((proto, port, s, d)):
                            by_source.setdefault(s, []).append((proto, port, d))
            # every source at once: write all requests, then read all answers
            for s, targets in by_source.items():
                req = [(names[pr], str(self.pods[d].address), po, wait) for pr, po, d in targets]
                agent = self.pods[s].agent
                assert agent is not None and agent.stdin
                agent.stdin.write(json.dumps(req) + "\n")
                agent.stdin.flush()
            for s, targets in by_source.items():
                agent = self.pods[s].agent
                assert agent is not None and agent.stdout
                answers = json.loads(_readline(agent.stdout, s))
                for (pr, po, d), ok in zip(targets, answers, strict=True):
                    result[pr, po, s, d] = ok
        return {
            (pr, po): {(s, d): ok for (p2, o2, s, d), ok in result.items() if (p2, o2) == (pr, po)}
            for pr, po in wanted
        }


def expected_matrix(lab: Lab, rule: Callable[[Pod, Pod], bool]) -> dict[tuple[str, str], bool]:
    """Every ordered pair of distinct pods -> `rule(src, dst)`."""
    return {
        (s, d): bool(rule(lab.pods[s], lab.pods[d])) for s in lab.pods for d in lab.pods if s != d
    }


def differences(
    got: Mapping[tuple[str, str], bool], want: Mapping[tuple[str, str], bool]
) -> list[str]:
    """Readable lines for each pair where the kernel disagreed with the expectation."""
    return [
        f"{s} -> {d}: expected {'allowed' if want[s, d] else 'denied'}, "
        f"got {'allowed' if got[s, d] else 'denied'}"
        for s, d in sorted(want)
        if got.get((s, d)) != want[s, d]
    ]


def keys(pods: Iterable[Pod]) -> list[str]:
    return [p.key for p in pods]


@contextmanager
def built_lab() -> Iterator[Lab]:
    """A built lab, torn down (and checked for leftovers) afterwards."""
    lab = Lab()
    try:
        lab.build()
        yield lab
    finally:
        lab.close()
        assert lab.leftovers() == []


def backend_params() -> list[object]:
    """Both kernel backends as pytest params, each skipped where this host cannot run it."""
    reason = ebpf_unavailable_reason()
    ebpf = pytest.param("ebpf", marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
    nft = pytest.param(
        "nftables", marks=pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
    )
    return [ebpf, nft]


def nft_ruleset(lab: Lab) -> str:
    """`nft -j list ruleset` in the lab's host netns."""
    return subprocess.run(
        ["ip", "netns", "exec", lab.host_netns, "nft", "-j", "list", "ruleset"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
