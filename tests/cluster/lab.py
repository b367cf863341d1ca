"""A multi-host Nova lab on one machine: hosts are network namespaces on a bridge.

    lab = Lab.create(hosts=4)     # netns + veth + bridge, a 3-server Consul cluster
    lab.up()                      # Consul servers on hosts 0-2, client agents on the rest
    coord = lab.start_coordinator(lab.hosts[3], "--id", "c3")
    lab.cut(lab.hosts[3])         # the host drops every packet that is not loopback
    lab.heal(lab.hosts[3])
    lab.down()                    # processes, namespaces, links, cgroups, files: all gone

Every object carries the lab's random token (`nvl<token>`), so labs of
several sessions can share a machine and `down()` removes only its own.
Each host has its own IP on a /24 that no route of this machine uses, the
bridge holds `.1` so processes here (tests, benchmarks) reach every host.
Inside a host, its Consul agent answers on 127.0.0.1:8500 and on the host's
IP; Nova processes start inside it (`nsenter --net`, see `Host.exec_argv`)
and talk to that local agent.

The Consul servers run with `session_ttl_min = "1s"` (sub-10 s session TTLs),
`raft_multiplier = 1` (Consul's fastest raft timing, as production should
use). LAN gossip keeps Consul's defaults on purpose: a dead node's
serfHealth fails after 5 s or more, so sessions expire by their own TTL
first, as on a real cluster (faster gossip would make failovers look faster
than they are, and could invalidate a leader's session before its lease ends).

Set NOVA_LAB_LOGS=DIR to keep every process's log under DIR/<token>/ on `down()`.

`python -m tests.cluster.lab up|down|status` is `make lab` / `make lab-down`:
the lab's description lives in `<LAB_DIR>/<token>/lab.json` for `down`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LAB_DIR = Path(os.environ.get("NOVA_LAB_DIR", "/tmp/nova-lab"))
CONSUL_SERVERS = 3
CONSUL_HTTP = 8500
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
CUT_TABLE = "nova_lab_cut"
COORDINATOR_PORT = 8600


def coordinator_id(host: Host) -> str:
    """The `--id` of the coordinator the lab starts on `host`."""
    return f"c-{host.name}"


class LabError(RuntimeError):
    """The lab could not be built or a process in it misbehaved (the message says where)."""


def find_consul() -> str | None:
    """`consul` on PATH, else the one `make consul` links into the .venv (this checkout's
    or the running interpreter's)."""
    found = shutil.which("consul")
    if found:
        return found
    for bin_dir in (ROOT / ".venv" / "bin", Path(sys.executable).parent):
        linked = bin_dir / "consul"
        if linked.is_file() and os.access(linked, os.X_OK):
            return str(linked)
    return None


def _sh(*argv: str, check: bool = True, input_: str | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, input=input_, check=False)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no address or route of this machine overlaps."""
    used: list[ipaddress.IPv4Network] = []
    for route in json.loads(_sh("ip", "-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default" and not dst.startswith(("local", "broadcast")):
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(dst, strict=False))
    for link in json.loads(_sh("ip", "-j", "-4", "addr") or "[]"):
        for addr in link.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise LabError("no free 10.x.y.0/24 for the lab's bridge")


@dataclass
class LabProcess:
    """One process started inside a host (`nsenter` execs it: the pid is its own)."""

    name: str
    host: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        if sig == signal.SIGKILL:
            self.popen.wait()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after `timeout`; idempotent."""
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Host:
    """One host: a network namespace with `eth0` on the lab's bridge."""

    index: int
    name: str  # h0, h1, ... (the Consul node and Nova node name)
    netns: str
    ip: str
    veth: str  # the bridge-side end, in this machine's namespace
    workdir: Path

    @property
    def consul_url(self) -> str:
        """This host's Consul agent, as seen from this machine's namespace."""
        return f"http://{self.ip}:{CONSUL_HTTP}"

    @property
    def local_consul(self) -> str:
        """This host's Consul agent, as seen from inside the host."""
        return f"http://127.0.0.1:{CONSUL_HTTP}"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in this host's network namespace.

        `nsenter --net` rather than `ip netns exec`: the latter remounts /sys for
        the namespace, which hides the cgroup mounts, and the lab's agents would
        then run their containers without cgroups.
        """
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    def run(self, *argv: str, check: bool = True) -> str:
        return _sh(*self.exec_argv(argv), check=check)


@dataclass
class Lab:
    """N hosts on one bridge, their Consul agents, and every process started in them.

    Build with `Lab.create(n)` (or `Lab.load(dir)` for one `make lab` left
    running), `up()` starts Consul, `down()` removes everything.
    """

    token: str
    subnet: ipaddress.IPv4Network
    hosts: list[Host]
    workdir: Path
    consul_binary: str
    persistent: bool = False  # `make lab`: processes outlive the command that started them
    consul: dict[str, LabProcess] = field(default_factory=dict)  # host name -> agent
    processes: list[LabProcess] = field(default_factory=list)
    cgroup_roots: list[str] = field(default_factory=list)
    cut_off: set[str] = field(default_factory=set)  # names of hosts cut off now
    # Container networks (`with_container_network()`): the cluster CIDR, split per host,
    # and the segment ids (VNIs) the agents may give Nova namespaces.
    container_cidr: ipaddress.IPv4Network | None = None
    segment_ids: range | None = None

    @property
    def bridge(self) -> str:
        return f"nvl{self.token}"

    @property
    def servers(self) -> list[Host]:
        return self.hosts[:CONSUL_SERVERS]

    # -- building and removing ---------------------------------------------------------

    @classmethod
    def create(cls, hosts: int = 3, *, persistent: bool = False) -> Lab:
        """The network: bridge, namespaces, veths, addresses. `down()` undoes it."""
        if hosts < CONSUL_SERVERS:
            raise LabError(f"a lab needs at least {CONSUL_SERVERS} hosts (Consul servers)")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces)")
        binary = find_consul()
        if binary is None:
            raise LabError("no consul binary on PATH or in .venv/bin: run `make consul`")
        token = secrets.token_hex(3)
        workdir = LAB_DIR / token
        workdir.mkdir(parents=True, mode=0o700)
        subnet = _free_subnet()
        addresses = list(subnet.hosts())
        lab = cls(token, subnet, [], workdir, binary, persistent)
        for i in range(hosts):
            host_dir = workdir / f"h{i}"
            host_dir.mkdir()
            lab.hosts.append(
                Host(
                    i,
                    f"h{i}",
                    f"nvl{token}-h{i}",
                    str(addresses[10 + i]),
                    f"nvl{token}h{i}",
                    host_dir,
                )
            )
        lab.save()
        try:
            lab._build_network()
        except BaseException:
            lab.down()
            raise
        return lab

    def _build_network(self) -> None:
        gateway = f"{next(self.subnet.hosts())}/{self.subnet.prefixlen}"
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", gateway, "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for host in self.hosts:
            _sh("ip", "netns", "add", host.netns)
            _sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
                "netns", host.netns)  # fmt: skip
            _sh("ip", "link", "set", host.veth, "master", self.bridge, "up")
            _sh("ip", "-n", host.netns, "addr", "add",
                f"{host.ip}/{self.subnet.prefixlen}", "dev", "eth0")  # fmt: skip
            _sh("ip", "-n", host.netns, "link", "set", "lo", "up")
            _sh("ip", "-n", host.netns, "link", "set", "eth0", "up")

    def down(self) -> None:
        """Remove everything this lab made; safe to call twice and after a partial build."""
        for process in [*self.processes, *self.consul.values()]:
            with contextlib.suppress(OSError):
                process.kill()
        self._remove_container_network()  # while the host ends of their veths still exist
        for host in self.hosts:
            # Whatever still runs inside (workers, a `consul lock` child) is ours too.
            pids = _sh("ip", "netns", "pids", host.netns, check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _sh("ip", "netns", "del", host.netns, check=False)  # takes eth0 and its peer
            _sh("ip", "link", "del", host.veth, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        if self.cgroup_roots:
            from tests.conftest import remove_cgroup_root

            for name in self.cgroup_roots:
                remove_cgroup_root(name)
        keep = os.environ.get("NOVA_LAB_LOGS")  # a directory to keep the logs in (debugging)
        if keep:
            for log in self.workdir.glob("*/*.log"):
                target = Path(keep) / self.token / log.parent.name / log.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, target)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def save(self) -> None:
        """Describe the lab in lab.json: `down` of another process removes it from there."""
        state = {
            "token": self.token,
            "subnet": str(self.subnet),
            "consul_binary": self.consul_binary,
            "hosts": [
                {"name": h.name, "netns": h.netns, "ip": h.ip, "veth": h.veth} for h in self.hosts
            ],
            "cgroup_roots": self.cgroup_roots,
            "container_cidr": str(self.container_cidr) if self.container_cidr else None,
            "segment_ids": [self.segment_ids.start, self.segment_ids.stop]
            if self.segment_ids
            else None,
        }
        (self.workdir / "lab.json").write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, workdir: Path) -> Lab:
        state = json.loads((workdir / "lab.json").read_text())
        hosts = [
            Host(i, h["name"], h["netns"], h["ip"], h["veth"], workdir / h["name"])
            for i, h in enumerate(state["hosts"])
        ]
        lab = cls(state["token"], ipaddress.IPv4Network(state["subnet"]), hosts, workdir,
                  state["consul_binary"], persistent=True)  # fmt: skip
        lab.cgroup_roots = list(state["cgroup_roots"])
        if state.get("container_cidr"):
            lab.container_cidr = ipaddress.IPv4Network(state["container_cidr"])
            lab.segment_ids = range(*state["segment_ids"])
        return lab

    # -- processes -----------------------------------------------------------------------

    def spawn(
        self, host: Host, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> LabProcess:
        """Start `argv` inside `host`, output to `<host dir>/<name>.log`."""
        log_path = host.workdir / f"{name}.log"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                host.exec_argv(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=ROOT,
                start_new_session=self.persistent,
                # In tests: nothing outlives the test process, even when it is SIGKILLed.
                preexec_fn=None if self.persistent else _die_with_parent,  # noqa: PLW1509
            )
        process = LabProcess(name, host.name, list(argv), log_path, popen)
        self.processes.append(process)
        return process

    def start_coordinator(self, host: Host, *args: str) -> LabProcess:
        """`nova-coordinator` inside `host`: id `c-<host>`, API on `<host ip>:8600`,
        Consul through the host's own agent; extra `args` are appended."""
        argv = [
            sys.executable, "-m", "coordinator.main", "--consul", host.local_consul,
            "--id", coordinator_id(host), "--listen", f"{host.ip}:{COORDINATOR_PORT}", *args,
        ]  # fmt: skip
        return self.spawn(host, f"coordinator-{coordinator_id(host)}", argv)

    def coordinator_api(self, host: Host) -> str:
        return f"http://{host.ip}:{COORDINATOR_PORT}"

    def start_agent(self, host: Host, *args: str, pool_size: int = 1) -> LabProcess:
        """`nova-agent --consul` inside `host`: node `host.name`, its own dirs and cgroup root."""
        cgroup_root = f"nova-lab-{self.token}-{host.name}"
        if cgroup_root not in self.cgroup_roots:
            self.cgroup_roots.append(cgroup_root)
            self.save()
        base = host.workdir / "agent"
        (base / "policies").mkdir(parents=True, exist_ok=True)  # not this machine's /etc/nova
        argv = [
            sys.executable, "-m", "agent.main", "--consul", host.local_consul,
            "--node", host.name, "--advertise", host.ip,
            "--socket", str(base / "agent.sock"), "--state-dir", str(base / "state"),
            "--cache-dir", str(base / "cache"), "--cgroup-root", cgroup_root,
            "--pool-size", str(pool_size), "--policy-dir", str(base / "policies"),
            *self._network_args(host), *args,
        ]  # fmt: skip
        return self.spawn(host, "agent", argv)

    def with_container_network(self) -> None:
        """Agents started from now on give every container its own netns on its Nova
        namespace's segment (VXLAN between hosts): a free /24 split into one node CIDR
        per host, and a segment-id range of the lab's own. `down()` removes what they made.
        """
        from tests.conftest import unique_test_network

        net = unique_test_network()
        while net.cidr.overlaps(self.subnet):
            net = unique_test_network()
        self.container_cidr, self.segment_ids = net.cidr, net.segments
        self.save()

    def node_cidr(self, host: Host) -> ipaddress.IPv4Network:
        assert self.container_cidr is not None
        bits = max(1, (len(self.hosts) - 1).bit_length())
        return list(self.container_cidr.subnets(prefixlen_diff=bits))[host.index]

    def _network_args(self, host: Host) -> list[str]:
        if self.container_cidr is None or self.segment_ids is None:
            return []
        return [
            "--node-cidr", str(self.node_cidr(host)), "--cluster-cidr", str(self.container_cidr),
            "--segment-ids", f"{self.segment_ids.start}-{self.segment_ids.stop - 1}",
        ]  # fmt: skip

    def _remove_container_network(self) -> None:
        """Container netns (named, so machine-wide) of the lab's agents, and what is in them."""
        if self.container_cidr is None or self.segment_ids is None:
            return
        from tests.conftest import NetworkUnderTest, network_leftovers, remove_test_network

        net = NetworkUnderTest(self.container_cidr, self.segment_ids)
        for netns in network_leftovers(net)["netns"]:
            for pid in _sh("ip", "netns", "pids", netns, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        remove_test_network(net)

    def agent_socket(self, host: Host) -> Path:
        return host.workdir / "agent" / "agent.sock"

    # -- Consul --------------------------------------------------------------------------

    def consul_config(self, host: Host) -> dict[str, Any]:
        server = host in self.servers
        config: dict[str, Any] = {
            "node_name": host.name,
            "datacenter": "lab",
            "data_dir": str(host.workdir / "consul"),
            "bind_addr": host.ip,
            "advertise_addr": host.ip,
            "client_addr": f"127.0.0.1 {host.ip}",
            "retry_join": [h.ip for h in self.servers],
            "retry_interval": "1s",
            "server": server,
            "session_ttl_min": "1s",
            "disable_update_check": True,
            "leave_on_terminate": False,
            "log_level": "info",
            "ports": {"dns": -1, "grpc": -1, "grpc_tls": -1},
            "performance": {"raft_multiplier": 1},
            # A server back from a cut is a voter again after 2 s, not Consul's 10 s:
            # until then the cluster cannot lose another server. A cut is a
            # partition, not a dead server: autopilot must not drop the cut
            # server from the raft configuration (it then refused votes and
            # rejoined only after a minute or more here).
            "autopilot": {"server_stabilization_time": "2s", "cleanup_dead_servers": False},
        }
        if server:
            config["bootstrap_expect"] = CONSUL_SERVERS
        return config

    def start_consul(self, host: Host) -> LabProcess:
        """Start (or restart, with its data) the Consul agent of `host`."""
        old = self.consul.get(host.name)
        if old is not None and old.alive():
            raise LabError(f"consul on {host.name} is already running (pid {old.pid})")
        config = host.workdir / "consul.json"
        config.write_text(json.dumps(self.consul_config(host), indent=2))
        process = self.spawn(
            host, "consul", [self.consul_binary, "agent", "-config-file", str(config)]
        )
        self.processes.remove(process)  # kept apart: `consul` maps hosts to their agent
        self.consul[host.name] = process
        return process

    def up(self, timeout: float = READY_TIMEOUT) -> None:
        """Consul on every host, then wait for a raft leader and every node healthy."""
        for host in self.hosts:
            self.start_consul(host)
        self.wait_consul(timeout)

    def wait_consul(
        self, timeout: float = READY_TIMEOUT, hosts: Sequence[Host] | None = None
    ) -> None:
        """A raft leader, every server a voter, every running agent's serfHealth passing."""
        hosts = list(hosts or [h for h in self.hosts if self.consul_alive(h)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for host in hosts:
                process = self.consul[host.name]
                if not process.alive():
                    raise LabError(f"consul on {host.name} exited:\n{process.log_tail()}")
            if all(self._consul_ready(h, hosts) for h in hosts):
                return
            time.sleep(0.1)
        tails = "\n".join(f"--- {h.name}\n{self.consul[h.name].log_tail(15)}" for h in hosts)
        raise LabError(f"lab Consul not ready after {timeout} s:\n{tails}")

    def _consul_ready(self, host: Host, hosts: Sequence[Host]) -> bool:
        if not self.consul_get(host, "/v1/status/leader"):
            return False
        if host in self.servers:
            # Every server a healthy voter by autopilot's measure (in contact, log caught
            # up, stable for server_stabilization_time), in this server's own copy of the
            # raft configuration too (?stale): a server back from a cut that is not yet
            # a voter cannot vote, and losing another server then leaves no quorum.
            raft = self.consul_get(host, "/v1/operator/raft/configuration?stale") or {}
            voters = {s["Node"] for s in raft.get("Servers") or [] if s.get("Voter")}
            health = self.consul_get(host, "/v1/operator/autopilot/health") or {}
            healthy = {
                s["Name"]
                for s in health.get("Servers") or []
                if s.get("Voter") and s.get("Healthy")
            }
            names = {s.name for s in self.servers}
            if voters != names or healthy != names or not health.get("Healthy"):
                return False
        checks = self.consul_get(host, "/v1/health/state/any") or []
        passing = {
            c["Node"] for c in checks if c["CheckID"] == "serfHealth" and c["Status"] == "passing"
        }
        return all(h.name in passing for h in hosts)

    def consul_alive(self, host: Host) -> bool:
        process = self.consul.get(host.name)
        return process is not None and process.alive()

    def consul_get(self, host: Host, path: str, timeout: float = 2.0) -> Any:
        """GET from `host`'s agent (from this machine), None when it does not answer."""
        try:
            with urllib.request.urlopen(host.consul_url + path, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except (OSError, ValueError):
            return None

    def consul_leader(self, via: Host | None = None) -> Host | None:
        """The host whose Consul server leads raft now (asked of `via` or any answering host)."""
        for host in [via] if via else self.hosts:
            address = self.consul_get(host, "/v1/status/leader") if host else None
            if address:
                ip = address.rsplit(":", 1)[0]
                return next((h for h in self.hosts if h.ip == ip), None)
        return None

    def move_raft_leader(self, to: Host, timeout: float = 15.0) -> None:
        """Make the Consul server on `to` the raft leader (Consul's transfer-leader)."""
        via = self.reachable()[0]
        raft = self.consul_get(via, "/v1/operator/raft/configuration") or {}
        server_id = next(s["ID"] for s in raft.get("Servers", []) if s["Node"] == to.name)
        deadline = time.monotonic() + timeout
        while self.consul_leader() is not to:
            if time.monotonic() > deadline:
                raise LabError(f"raft leadership did not move to {to.name} in {timeout} s")
            request = urllib.request.Request(
                f"{via.consul_url}/v1/operator/raft/transfer-leader?id={server_id}", method="POST"
            )
            with contextlib.suppress(OSError):
                urllib.request.urlopen(request, timeout=5).close()
            time.sleep(0.5)
        self.wait_consul()

    # -- faults ----------------------------------------------------------------------------

    def cut(self, host: Host, how: str = "nft") -> None:
        """Cut `host` off the network; it keeps its loopback (its local agent still answers).

        nft: an nftables table in the host's namespace drops every packet not on
        lo (silent loss, as a dead switch port or a partition); link: eth0 down.
        """
        self.cut_off.add(host.name)
        if how == "link":
            _sh("ip", "-n", host.netns, "link", "set", "eth0", "down")
            return
        if how != "nft":
            raise LabError(f"cut: unknown way {how!r} (nft or link)")
        ruleset = (
            f"table inet {CUT_TABLE} {{\n"
            "  chain in { type filter hook input priority -400; policy accept; "
            'iifname != "lo" drop; }\n'
            "  chain out { type filter hook output priority -400; policy accept; "
            'oifname != "lo" drop; }\n'
            "}\n"
        )
        _sh(*host.exec_argv(["nft", "-f", "-"]), input_=ruleset)

    def heal(self, host: Host) -> None:
        """Undo `cut` (either way)."""
        host.run("nft", "delete", "table", "inet", CUT_TABLE, check=False)
        _sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
        self.cut_off.discard(host.name)

    # -- reading Consul from here ---------------------------------------------------------

    def reachable(self) -> list[Host]:
        """Hosts whose Consul agent runs and is not cut off: where to ask."""
        return [h for h in self.hosts if h.name not in self.cut_off and self.consul_alive(h)]

    def kv(self, prefix: str) -> dict[str, tuple[Any, str | None]]:
        """Every key under `prefix`: its decoded JSON value and the session holding it.

        Asked of the first reachable agent that answers; LabError when none does.
        """
        for host in self.reachable():
            try:
                with urllib.request.urlopen(
                    f"{host.consul_url}/v1/kv/{prefix}?recurse", timeout=3
                ) as response:
                    entries = json.loads(response.read() or b"[]")
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return {}
                continue
            except (OSError, ValueError):
                continue
            return {
                e["Key"]: (
                    json.loads(base64.b64decode(e["Value"])) if e.get("Value") else None,
                    e.get("Session"),
                )
                for e in entries
            }
        raise LabError(f"no Consul agent of lab {self.token} answered for {prefix}")

    def describe(self) -> str:
        lines = [f"Nova lab {self.token}: {len(self.hosts)} hosts on {self.bridge} ({self.subnet})"]
        leader = self.consul_leader()
        for host in self.hosts:
            role = "consul server" if host in self.servers else "consul client"
            if leader is host:
                role += " (raft leader)"
            lines.append(f"  {host.name}  {host.ip:15}  netns {host.netns}  {role}")
        h = self.hosts[0]
        lines += [
            "",
            f"Consul UI/API:   {h.consul_url}/ui/  (any host's IP works)",
            f"Shell in a host: ip netns exec {h.netns} bash",
            f"Coordinator:     ip netns exec {h.netns} nova-coordinator "
            f"--consul {h.local_consul} --listen {h.ip}:{COORDINATOR_PORT} ...",
            f"Agent:           ip netns exec {h.netns} nova-agent --consul {h.local_consul} "
            f"--node {h.name} --advertise {h.ip} ...",
            f"Coordinator API: {self.coordinator_api(h)} (on each Consul server host, if started)",
            f"Logs and data:   {self.workdir}",
            "Remove it:       make lab-down",
        ]
        return "\n".join(lines)


def all_labs() -> list[Lab]:
    """Every lab described under LAB_DIR (built by `make lab` or left by a killed run)."""
    if not LAB_DIR.is_dir():
        return []
    return [Lab.load(d) for d in sorted(LAB_DIR.iterdir()) if (d / "lab.json").is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a lab and leave it running")
    up.add_argument("--hosts", type=int, default=3, help="hosts (the first 3 run Consul servers)")
    up.add_argument(
        "--nova",
        action="store_true",
        help="also start nova-agent on every host and nova-coordinator on the Consul servers",
    )
    up.add_argument(
        "--network",
        action="store_true",
        help="with --nova: a netns per container, one segment per Nova namespace across hosts",
    )
    sub.add_parser("status", help="describe the running labs")
    down = sub.add_parser("down", help="remove labs built by `up`")
    down.add_argument("token", nargs="?", help="only this lab (default: every lab in LAB_DIR)")
    args = parser.parse_args(argv)
    if args.command == "up":
        lab = Lab.create(args.hosts, persistent=True)
        try:
            lab.up()
            if args.nova:
                if args.network:
                    lab.with_container_network()
                for host in lab.hosts:
                    lab.start_agent(host)
                for host in lab.servers:
                    lab.start_coordinator(host)
        except BaseException:
            lab.down()
            raise
        print(lab.describe())
    elif args.command == "status":
        labs = all_labs()
        print("\n\n".join(lab.describe() for lab in labs) if labs else "no lab is running")
    else:
        for lab in all_labs():
            if args.token in (None, lab.token):
                lab.down()
                print(f"removed lab {lab.token}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
