"""Network policy enforcement cost: eBPF and nftables backends against legacy iptables.

Two pods (network namespaces with veths into one bridge, inside a simulated
host netns this benchmark makes and removes) talk TCP through the bridge:

- request/response: N transactions, each a NEW connection (connect, 64-byte
  request, echo, close with RST), so every transaction's first packet is
  checked against the whole policy; p50/p99 latency and transactions/s;
- stream: one connection sending 64 KiB writes for a few seconds (MB/s);

with the server selected by a policy of 0, 100, 1,000 or 10,000 rules: every
rule allows one other /32 on TCP 80 (ten rules per policy), the last one allows
the client. 0 rules means the backend is installed but the server is not
isolated. Engines:
`none` (nothing installed), `ebpf`, `nftables`, and `iptables` (legacy
iptables in the simulated host: `-m conntrack ESTABLISHED -j ACCEPT` first,
then one rule per line, the client's last, then DROP: the layout
kube-proxy/Calico-iptables users know).

Policy update latency: the server's 1,000-rule policy without the client is in
force; a prober in the client sends a UDP probe every 0.5 ms (one socket per
sample, on a source port no other sample used); one sample is the time to its
first echo from either `apply(new policy)` on the backend (`<engine>`), or
(`<engine>/file`) from writing a policy file that allows the client (temp
file + rename) into the directory a PolicyEngine watches, the 1,000 rules
being 100 other files of 10 rules: inotify, parse, compile and apply included.

Engines run in alternating blocks (`--rounds`, the order rotating each round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import IO, Any

from agent.netpol.backend import PolicyBackend, ebpf_unavailable_reason, select_backend
from agent.netpol.engine import PolicyEngine
from agent.netpol.sources import DirectorySource
from agent.netpol.tables import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    CompiledPolicy,
    DirectionTable,
    Endpoint,
    EndpointTables,
    PortMatch,
    Rule,
)
from bench import common

RULE_COUNTS = (0, 100, 1000, 10000)
ENGINES = ("ebpf", "nftables", "iptables")
CLIENT_IP, SERVER_IP = IPv4Address("10.78.0.2"), IPv4Address("10.78.0.3")
CLIENT_ID, SERVER_ID = 256, 257
UPDATE_RULES = 1000
UPDATE_SPORTS = range(20000, 32768)  # below the ephemeral range; one per sample
GOAL_UPDATE_P99_US = 100_000
GOAL_EBPF_RATIO = 1.05

SERVER = r"""
import socket, threading
def rr():
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 80)); srv.listen(1024)
    while True:
        c, _ = srv.accept()
        try:
            d = c.recv(64); c.sendall(d); c.recv(64)
        except OSError:
            pass
        c.close()
def sink():
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 81)); srv.listen(8)
    while True:
        c, _ = srv.accept()
        while c.recv(1 << 20):
            pass
        c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 80))
    while True:
        d, p = s.recvfrom(64); s.sendto(d, p)
for f in (rr, sink, udp):
    threading.Thread(target=f, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = r"""
import json, socket, struct, sys, time
SRV = sys.argv[1]
LINGER = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, ports never run out
def rr(n):
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        s = socket.create_connection((SRV, 80), timeout=2)
        s.sendall(b"x" * 64); s.recv(64)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER); s.close()
        out.append(time.perf_counter_ns() - t)
    return out
def stream(seconds):
    s = socket.create_connection((SRV, 81), timeout=5)
    buf = b"x" * 65536; sent = 0; end = time.monotonic() + seconds; t0 = time.monotonic()
    while time.monotonic() < end:
        s.sendall(buf); sent += len(buf)
    s.close()
    return sent / (time.monotonic() - t0)
def wait_udp(arg):
    # One socket, on a source port no earlier sample used: a flow tracked in an earlier
    # sample (conntrack, the eBPF flow map) would let its datagrams pass before the change.
    limit, sport = arg.split(",")
    end = time.monotonic() + float(limit)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", int(sport))); s.settimeout(0.0005)
        while time.monotonic() < end:
            s.sendto(b"u", (SRV, 80))
            try:
                s.recvfrom(8); return time.monotonic_ns()
            except OSError:
                pass
    return -1
def probe():
    try:
        return len(rr(1)) == 1
    except OSError:
        return False
print("ready", flush=True)
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "rr": out = rr(int(arg))
    elif cmd == "stream": out = stream(float(arg))
    elif cmd == "wait_udp": out = wait_udp(arg)
    else: out = probe()
    print(json.dumps(out), flush=True)
"""


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@dataclass
class Net:
    """Simulated host `npb-bh<t>` with bridge `npbbrb<t>`; pods `npb-b<t>-c` and `-s`."""

    token: str = field(default_factory=lambda: secrets.token_hex(2))
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"npb-bh{self.token}"

    def pod_netns(self, role: str) -> str:
        return f"npb-b{self.token}-{role}"

    def host_ifname(self, role: str) -> str:
        return f"npb{self.token}b{role}"

    def build(self) -> None:
        bridge = f"npbbrb{self.token}"
        _ip("netns", "add", self.host)
        _ip("-n", self.host, "link", "set", "lo", "up")
        _ip("-n", self.host, "link", "add", bridge, "type", "bridge")
        _ip("-n", self.host, "link", "set", bridge, "up")
        for role, address in (("c", CLIENT_IP), ("s", SERVER_IP)):
            ns, hif = self.pod_netns(role), self.host_ifname(role)
            _ip("netns", "add", ns)
            _ip(
                "-n",
                self.host,
                "link",
                "add",
                hif,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            _ip("-n", self.host, "link", "set", hif, "master", bridge, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        self.server = self._spawn("s", SERVER)
        self.client = self._spawn("c", CLIENT, str(SERVER_IP))

    def _spawn(self, role: str, script: str, *argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.pod_netns(role), sys.executable, "-c", script, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise common.BenchError(f"the {role} helper in {self.pod_netns(role)} did not start")
        return proc

    def ask(self, cmd: str, arg: object) -> Any:
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(f"{cmd} {arg}\n")
        self.client.stdin.flush()
        line = self.client.stdout.readline()
        if not line:
            raise common.BenchError("the client helper died (a transaction timed out?)")
        return json.loads(line)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for ns in (self.pod_netns("c"), self.pod_netns("s"), self.host):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def endpoints(self) -> tuple[Endpoint, Endpoint]:
        return (
            Endpoint("c", CLIENT_IP, "bench", {"role": "client"}, self.host_ifname("c")),
            Endpoint("s", SERVER_IP, "bench", {"role": "server"}, self.host_ifname("s")),
        )


def filler(i: int) -> IPv4Network:
    return IPv4Network((int(IPv4Address("10.200.0.0")) + i, 32))


def compiled_policy(
    net: Net, rules: int, *, client_allowed: bool = True, gen: int = 1
) -> CompiledPolicy:
    """The server isolated for ingress by `rules` rules (0: not isolated), the client's last."""
    client, server = net.endpoints()
    ports = (PortMatch(IPPROTO_TCP, 80, 81), PortMatch(IPPROTO_UDP, 80, 80))
    table: list[Rule] = [
        Rule(f"bench/p{i // 10}", frozenset(), (filler(i),), (PortMatch(IPPROTO_TCP, 80, 80),))
        for i in range(max(rules - 1, 0))
    ]
    if client_allowed and rules:
        table.append(Rule("bench/client", frozenset({CLIENT_ID}), (), ports))
    open_ = DirectionTable(False, ())
    return CompiledPolicy(
        generation=gen,
        ipcache={CLIENT_IP: CLIENT_ID, SERVER_IP: SERVER_ID},
        endpoints={
            "c": EndpointTables(client, CLIENT_ID, open_, open_),
            "s": EndpointTables(
                server, SERVER_ID, DirectionTable(rules > 0, tuple(table), ("bench/p",)), open_
            ),
        },
    )


class Iptables:
    """Legacy iptables in the simulated host: a chain of one rule per line."""

    def __init__(self, net: Net) -> None:
        self.net = net

    def install(self, rules: int) -> None:
        self.remove()
        if rules == 0:
            return
        lines = [
            "*filter",
            ":NPBENCH - [0:0]",
            "-A FORWARD -j NPBENCH",
            "-A NPBENCH -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        ]
        lines += [
            f"-A NPBENCH -s {filler(i)} -d {SERVER_IP}/32 -p tcp --dport 80 -j ACCEPT"
            for i in range(rules - 1)
        ]
        lines += [
            f"-A NPBENCH -s {CLIENT_IP}/32 -d {SERVER_IP}/32 -p tcp -m multiport "
            "--dports 80,81 -j ACCEPT",
            f"-A NPBENCH -d {SERVER_IP}/32 -j DROP",
            "COMMIT",
            "",
        ]
        subprocess.run(
            ["ip", "netns", "exec", self.net.host, "iptables-legacy-restore", "--noflush"],
            input="\n".join(lines),
            text=True,
            check=True,
        )

    def remove(self) -> None:
        for argv in (["-D", "FORWARD", "-j", "NPBENCH"], ["-F", "NPBENCH"], ["-X", "NPBENCH"]):
            subprocess.run(
                ["ip", "netns", "exec", self.net.host, "iptables-legacy", *argv],
                check=False,
                capture_output=True,
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rules",
        type=int,
        nargs="+",
        default=list(RULE_COUNTS),
        help="policy sizes to measure (default: %(default)s)",
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=list(ENGINES),
        choices=ENGINES,
        help="enforcement engines besides `none` (default: all)",
    )
    parser.add_argument(
        "--transactions",
        type=int,
        default=1500,
        help="request/response transactions per engine, size and round",
    )
    parser.add_argument(
        "--stream-seconds",
        type=float,
        default=1.0,
        help="length of each throughput stream (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument(
        "--updates",
        type=int,
        default=40,
        help="policy update latency samples per backend (default: %(default)s)",
    )


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0


async def _measure(args: argparse.Namespace) -> tuple[dict[str, Samples], dict[str, list[float]]]:
    net = Net()
    results: dict[str, Samples] = {}
    updates: dict[str, list[float]] = {}
    try:
        net.build()
        if not net.ask("probe", 0):
            raise common.BenchError("client cannot reach the server with no policy")
        for r in range(args.rounds):
            for engine in common.rotate(["none", *args.engines], r):
                await _engine_block(net, engine, args, results)
        sports = iter(UPDATE_SPORTS)
        for engine in [e for e in args.engines if e != "iptables"]:
            updates[engine] = await _update_latency(net, engine, args.updates, sports)
            updates[f"{engine}/file"] = await _file_update_latency(
                net, engine, args.updates, sports
            )
    finally:
        net.close()
    return results, updates


def _backend(net: Net, engine: str) -> PolicyBackend:
    return select_backend(
        engine, table=f"nova_b{os.getpid()}", link_prefix=f"npb{net.token}", netns=net.host
    )


async def _engine_block(
    net: Net, engine: str, args: argparse.Namespace, results: dict[str, Samples]
) -> None:
    sizes = [0] if engine == "none" else args.rules
    backend = _backend(net, engine) if engine in ("ebpf", "nftables") else None
    iptables = Iptables(net) if engine == "iptables" else None
    if backend:
        await backend.start()
    try:
        for n in sizes:
            if backend:
                await backend.apply(compiled_policy(net, n))
            if iptables:
                iptables.install(n)
            if not net.ask("probe", 0):
                raise common.BenchError(f"{engine} with {n} rules blocks the allowed client")
            s = results.setdefault("none" if engine == "none" else f"{engine}/{n}", Samples())
            s.latencies += net.ask("rr", args.transactions)
            s.throughput.append(net.ask("stream", args.stream_seconds))
            print(
                f"  {engine:9} {n:6} rules: p50 {common.percentile(s.latencies, 50) / 1000:.0f} µs",
                flush=True,
            )
    finally:
        if backend:
            await backend.close(remove=True)
        if iptables:
            iptables.remove()


async def _start_prober(net: Net, sports: Iterator[int]) -> IO[str]:
    """Let the denying state settle, then start the client's UDP prober on a fresh port;
    its answer (the time of the first echo) comes on the stream returned."""
    await asyncio.sleep(0.01)
    assert net.client.stdin is not None and net.client.stdout is not None
    sport = next(sports, None)
    if sport is None:
        raise common.BenchError(f"--updates: at most {len(UPDATE_SPORTS)} samples in all")
    net.client.stdin.write(f"wait_udp 3,{sport}\n")
    net.client.stdin.flush()
    await asyncio.sleep(0.005)  # the prober is polling (and being refused)
    return net.client.stdout


async def _update_latency(net: Net, engine: str, count: int, sports: Iterator[int]) -> list[float]:
    backend = _backend(net, engine)
    await backend.start()
    samples: list[float] = []
    try:
        gen = 1
        for _ in range(count):
            gen += 2
            await backend.apply(compiled_policy(net, UPDATE_RULES, client_allowed=False, gen=gen))
            answer = await _start_prober(net, sports)
            allowing = compiled_policy(net, UPDATE_RULES, gen=gen + 1)  # compiled beforehand
            t0 = time.monotonic_ns()
            await backend.apply(allowing)
            t1 = json.loads(await asyncio.to_thread(answer.readline))
            if t1 < 0:
                raise common.BenchError(f"{engine}: the allowing policy never took effect")
            samples.append(t1 - t0)
    finally:
        await backend.close(remove=True)
    return samples


def _policy_file(name: str, peers: list[dict[str, Any]], ports: list[dict[str, Any]]) -> str:
    """A policy selecting the server, allowing `peers` on `ports` (JSON is YAML)."""
    return json.dumps(
        {
            "apiVersion": "nova.sh/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {
                "podSelector": {"matchLabels": {"role": "server"}},
                "ingress": [{"from": [peer], "ports": ports} for peer in peers],
            },
        }
    )


CLIENT_FILE = _policy_file(
    "client",
    [{"podSelector": {"matchLabels": {"role": "client"}}}],
    [{"port": 80, "endPort": 81}, {"protocol": "UDP", "port": 80}],
)


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.rename(temp, path)


def _write_fillers(directory: Path) -> None:
    for j in range(UPDATE_RULES // 10):
        peers = [{"ipBlock": {"cidr": str(filler(j * 10 + i))}} for i in range(10)]
        (directory / f"fill-{j:03}.yaml").write_text(_policy_file(f"p{j}", peers, [{"port": 80}]))


async def _file_update_latency(
    net: Net, engine: str, count: int, sports: Iterator[int]
) -> list[float]:
    samples: list[float] = []
    with tempfile.TemporaryDirectory(prefix="nova-bench-policies-") as tmp:
        directory = Path(tmp)
        client_file = directory / "client.yaml"
        _write_fillers(directory)
        policy = PolicyEngine(_backend(net, engine), sources=[DirectorySource(directory)])
        policy.set_endpoints(net.endpoints())
        await policy.start()
        try:
            await policy.wait_applied(30)
            for _ in range(count):
                answer = await _start_prober(net, sports)
                t0 = time.monotonic_ns()
                _write_atomically(client_file, CLIENT_FILE)
                t1 = json.loads(await asyncio.to_thread(answer.readline))
                if t1 < 0:
                    raise common.BenchError(f"{engine}: the policy file never took effect")
                samples.append(t1 - t0)
                os.unlink(client_file)
                # the watcher saw it go (the engine has no event for it: poll)
                while len(policy.policies) != UPDATE_RULES // 10:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
                await policy.wait_applied(5)
        finally:
            await policy.close(remove=True)
    return samples


def _body(
    results: dict[str, Samples], updates: dict[str, list[float]], args: argparse.Namespace
) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for name, s in results.items():
        summary = common.summarize(s.latencies)
        tput = sorted(s.throughput)
        variants[name] = {
            **summary.to_json(),
            "transactions_per_s": round(1e9 / (sum(s.latencies) / len(s.latencies)), 1),
            "stream_mb_per_s": round(tput[len(tput) // 2] / 1e6, 1),
        }
    summaries = {n: common.summarize(s.latencies) for n, s in results.items()}
    pairs = [(n, "none") for n in results if n != "none"]
    ratios = common.ratios(summaries, pairs)
    for a, _ in pairs:
        ratios[f"{a}/none"]["stream"] = common.ratio(
            variants[a]["stream_mb_per_s"], variants["none"]["stream_mb_per_s"]
        )
    update = {e: common.summarize(v).to_json() for e, v in updates.items() if v}
    notes = [
        "latency: one new TCP connection per transaction (connect, 64 B echo, RST close), "
        "measured in the client pod with a Python client (its overhead is in every variant)",
        "stream: one TCP connection, 64 KiB writes; established packets never walk the rules",
        f"update: {UPDATE_RULES}-rule policy; <engine>: apply(new CompiledPolicy) -> first UDP "
        "echo (prober polls every 0.5 ms); <engine>/file: policy file renamed into the watched "
        "directory (100 other files of 10 rules) -> first UDP echo",
    ]
    ebpf_big = ratios.get(f"ebpf/{max(args.rules)}/none")
    return {
        "variants": variants,
        "ratios": ratios,
        "update_latency": update,
        "notes": notes,
        "goals": {
            "ebpf_max_rules_p50_ratio_to_none": GOAL_EBPF_RATIO,
            "update_p99_us": GOAL_UPDATE_P99_US,
            "ebpf_met": None if not ebpf_big else ebpf_big["p50"] <= GOAL_EBPF_RATIO,
        },
    }


def _print_report(body: dict[str, Any]) -> None:
    rows = [
        [
            name,
            v["transactions_per_s"],
            v["p50_us"],
            v["p99_us"],
            v["stream_mb_per_s"],
            body["ratios"].get(f"{name}/none", {}).get("p50"),
        ]
        for name, v in body["variants"].items()
    ]
    print("\nnetpol: new TCP connection per transaction, and one stream")
    print(
        common.format_table(
            ["engine/rules", "tx/s", "p50 µs", "p99 µs", "stream MB/s", "p50 vs none"], rows
        )
    )
    if body["update_latency"]:
        print("\npolicy update -> verdict change")
        print(
            common.format_table(
                ["backend", "p50 µs", "p99 µs", "max µs"],
                [
                    [e, u["p50_us"], u["p99_us"], u["max_us"]]
                    for e, u in body["update_latency"].items()
                ],
            )
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise common.BenchError("needs root: creates network namespaces, tc programs, nft tables")
    if "ebpf" in args.engines and (reason := ebpf_unavailable_reason()):
        raise common.BenchError(f"eBPF is unavailable: {reason} (use --engines nftables iptables)")
    if "iptables" in args.engines and shutil.which("iptables-legacy-restore") is None:
        raise common.BenchError("iptables-legacy-restore is not installed")
    results, updates = asyncio.run(_measure(args))
    body = _body(results, updates, args)
    _print_report(body)
    return body
