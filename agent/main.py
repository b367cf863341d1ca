"""nova-agent: the per-host daemon.

In standalone mode (one host, no Consul) it keeps its state in SQLite, runs
containers from a warm pool of sandboxed workers, and serves the local API on
a unix socket for the `nova` CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from aiohttp import web

from agent import network_flags
from agent.api import make_app, make_metrics_app
from agent.cluster.agent import ClusterAgent
from agent.cluster.node import check_cluster_args, describe_host, parse_labels, route_source
from agent.containers import ContainerManager
from agent.isolation.cgroups.base import check_root_name
from agent.metrics import AgentMetrics
from agent.netpol import wiring as policy_wiring
from agent.netpol.agent_hook import PolicyListener
from agent.netpol.engine import PolicyEngine
from agent.sandbox.cgroups import SandboxCgroups
from agent.sandbox.network import SandboxNetwork
from agent.sandbox.runtime import SandboxRuntime
from agent.volumes_api import open_volumes
from nova import errors, paths
from nova.store import Store, open_store
from nova.store.consul import ConsulStore

log = logging.getLogger("nova.agent")

DESCRIPTION = """\
Run the Nova agent on this host.

The agent runs WebAssembly containers, each in its own worker process taken
from a warm pool, and serves the local API that `nova run`, `nova ps`,
`nova logs` and `nova stop` use. Containers keep running across agent
restarts: a restarted agent adopts them.

With --consul URL it joins a cluster: it registers the node in Consul
(service nova-agent, a TTL check, a session holding nova/v1/nodes/NODE),
runs exactly the replicas the coordinator assigns it, reports their status,
and fetches images by digest. When Consul does not answer it keeps running
what it runs and retries (see docs/cluster-agent.md).

Run as root, it gives every container a cgroup of its own (memory, CPU and
pids limits; usage recorded when it ends) under --cgroup-root, and a network
namespace of its own on its Nova namespace's segment (--network), and when it
starts it removes the cgroups and networks a crash left behind.
"""

EPILOG = """\
files:
  /run/nova/agent.sock      the API socket (NOVA_SOCKET)
  /var/lib/nova/state.db    containers and local state, SQLite (NOVA_STATE_DIR)
  /var/lib/nova/containers  per-container logs and results
  /var/lib/nova/cache       compiled modules (NOVA_CACHE_DIR)
  /sys/fs/cgroup/.../nova   container cgroups, root only (NOVA_CGROUP_ROOT)
  /var/lib/nova/volumes     encrypted volumes and their wrapped keys, root only
  (non-root users get XDG directories instead; see docs/cli.md)

examples:
  nova-agent --standalone
  nova-agent --standalone --pool-size 16 --metrics-address 0.0.0.0:9464
  nova-agent --standalone --cgroup-root system.slice/nova-agent.service/payload
  nova-agent --consul http://127.0.0.1:8500 --labels zone=a,disk=ssd --advertise 10.0.0.5
  nova-agent --uninstall-policy

exit status:
  0 on a clean shutdown (SIGTERM, SIGINT), 2 on a usage error,
  125 when the agent cannot start (socket in use, state unreadable).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nova-agent",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--standalone",
        action="store_true",
        help="single host: local SQLite state, no Consul",
    )
    mode.add_argument(
        "--consul",
        metavar="URL",
        help="cluster mode through the Consul agent at URL, e.g. http://127.0.0.1:8500",
    )
    parser.add_argument(
        "--labels",
        metavar="K=V,...",
        default="",
        help="node labels placement constraints match, e.g. zone=a,disk=ssd (--consul)",
    )
    parser.add_argument(
        "--advertise",
        metavar="IP",
        default=None,
        help="IPv4 address of this node for the cluster and the VXLAN underlay "
        "(--consul; default: the address the route to Consul leaves from)",
    )
    mode.add_argument(
        "--uninstall-policy",
        action="store_true",
        help="remove network-policy enforcement from the kernel (eBPF filters, nftables "
        "tables) whatever run made it, then exit; stop the agent first",
    )
    parser.add_argument(
        "--node", default=socket.gethostname(), help="node name (default: hostname)"
    )
    parser.add_argument(
        "--socket", type=Path, default=None, help=f"API socket (default: {paths.socket_path()})"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"state directory (default: {paths.state_dir()})",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"compiled-module cache (default: {paths.cache_dir()})",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=4,
        metavar="N",
        help="warm workers kept ready (default: 4; 0 disables the pool)",
    )
    parser.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        default=None,
        help="also serve /metrics over TCP here, e.g. 127.0.0.1:9464 (it is always on the socket)",
    )
    parser.add_argument(
        "--cgroup-root",
        default=None,
        metavar="NAME",
        help="container cgroups go under NAME/containers/ in each hierarchy "
        f"(default: $NOVA_CGROUP_ROOT or nova; currently {paths.cgroup_root()}); one agent "
        "per root: it removes every cgroup there that its records do not claim",
    )
    parser.add_argument(
        "--isolation",
        default="auto",
        choices=["auto", "none"],
        help="auto: a cgroup per container when running as root (default); "
        "none: no cgroups at all (unsafe: only the wasm limits hold)",
    )
    policy_wiring.add_arguments(parser)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    network_flags.add_arguments(parser)
    return parser


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        if args.state_dir:
            os.environ["NOVA_STATE_DIR"] = str(args.state_dir)
        self.args = args
        self.state_dir = paths.state_dir()
        self.socket_path: Path = args.socket or paths.socket_path()
        self.cache_dir: Path = args.cache_dir or paths.cache_dir()
        self._lock_file: int | None = None
        self._runners: list[web.AppRunner] = []
        self._socket_bound = False
        self._closers: list[Callable[[], Awaitable[None]]] = []

    async def run(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_lock()
        if paths.socket_answers(self.socket_path):  # fail before starting anything
            raise errors.NovaError(f"{self.socket_path} is in use by a running agent")
        cgroups = await asyncio.to_thread(self._cgroups)
        volumes = await asyncio.to_thread(open_volumes, self.state_dir)
        store = open_store(str(self.state_dir / "state.db"))
        await store.open()
        network = None
        if network_flags.wants_network(self.args, cgroups_on=cgroups is not None):
            advertise = None
            if self.args.consul:
                advertise = self.args.advertise or route_source(self.args.consul)
            segment_store = None
            if self.args.consul:  # segment ids must agree across hosts
                segment_store = ConsulStore(self.args.consul, timeout=5.0)
                self._closers.append(segment_store.close)
            network = network_flags.make_network(
                self.args, store=store, advertise=advertise, segment_store=segment_store
            )
            await network.start()
            peers = network_flags.static_peers(self.args)
            if peers:
                await network.set_peers(peers)
        runtime = SandboxRuntime(
            str(self.cache_dir),
            pool_size=self.args.pool_size,
            cgroups=cgroups,
            network=network,
            namespace_pool_size=self.args.namespace_pool_size,
            namespace_pool_idle_s=network_flags.pool_idle_seconds(self.args),
        )
        metrics = AgentMetrics(runtime)
        manager = ContainerManager(
            node=self.args.node,
            store=store,
            runtime=runtime,
            containers_dir=self.state_dir / "containers",
            metrics=metrics,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        cluster = self._cluster(manager, store, metrics, network) if self.args.consul else None
        policy = None
        if network is not None:  # policy acts on containers' own netns and veths
            # Cluster-wide policies come from the cluster's store; a single host's from its own.
            policy = policy_wiring.make_engine(
                self.args, store=cluster.store if cluster else store, registry=metrics.registry
            )
        else:
            policy_wiring.warn_without_network(self.args)
        policy_started: asyncio.Task[None] | None = None
        try:
            if policy is not None:
                # Loading the programs (bcc compiles them) runs beside recovery; the first
                # apply waits for endpoints_synced(): until then the kernel keeps what the
                # previous agent enforced, so a restart never opens a window.
                policy_started = loop.create_task(policy.start())
            await manager.recover()  # first: orphaned cgroups go before the pool makes new ones
            if policy is not None and policy_started is not None:
                # Announces every adopted container now, then each one as it starts and ends.
                manager.add_network_listener(PolicyListener(policy))
                policy.endpoints_synced()
                await policy_started  # a backend that cannot load stops the agent here
            await runtime.start()
            if cluster is not None:
                await cluster.start()
            await self._serve_socket(
                make_app(
                    manager=manager,
                    metrics_=metrics,
                    node=self.args.node,
                    cluster=cluster,
                    volumes=volumes,
                    policy_engine=policy,
                )
            )
            if self.args.metrics_address:
                await self._serve_tcp(make_metrics_app(metrics), self.args.metrics_address)
            log.info(
                "agent ready: node=%s socket=%s pool=%d state=%s isolation=%s network=%s policy=%s",
                self.args.node,
                self.socket_path,
                self.args.pool_size,
                self.state_dir,
                cgroups.describe() if cgroups else "none (no cgroups)",
                network.describe() if network else "host (shared)",
                _describe_policy(policy),
            )
            await stop.wait()
            log.info("shutting down; running containers keep running")
        finally:
            for runner in self._runners:
                await runner.cleanup()
            if policy_started is not None and not policy_started.done():
                policy_started.cancel()
                with contextlib.suppress(asyncio.CancelledError, errors.NovaError):
                    await policy_started
            if policy is not None:  # enforcement stays in the kernel for the next agent
                await policy.close()  # before the cluster closes the store it follows
            if cluster is not None:
                await cluster.close()
            if self._socket_bound:  # only our own socket: never another agent's
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()
            await manager.close()
            await runtime.close()
            if network is not None:
                await network.close()  # segments no container uses any more
            for close in self._closers:
                await close()
            await store.close()

    def _cluster(
        self,
        manager: ContainerManager,
        store: Store,
        metrics: AgentMetrics,
        network: SandboxNetwork | None,
    ) -> ClusterAgent:
        address = self.args.advertise or route_source(self.args.consul)
        info = describe_host(self.args.node, address, parse_labels(self.args.labels))
        return ClusterAgent(
            consul_url=self.args.consul,
            info=info,
            manager=manager,
            local=store,
            cache_dir=self.cache_dir,
            registry=metrics.registry,
            network=network,
        )

    def _cgroups(self) -> SandboxCgroups | None:
        """Container cgroups, unless --isolation none or the host cannot (not root)."""
        if self.args.isolation == "none":
            log.warning("--isolation none: containers run without cgroup limits")
            return None
        root_name = self.args.cgroup_root or paths.cgroup_root()
        try:
            cgroups = SandboxCgroups.for_host(root_name)
        except ValueError as exc:  # a malformed --cgroup-root
            raise errors.UsageError(f"invalid --cgroup-root {root_name!r}: {exc}") from None
        except OSError as exc:
            raise errors.NovaError(f"cannot set up container cgroups: {exc}") from None
        if cgroups is None:
            log.warning("not running as root: containers run without cgroups")
        return cgroups

    def _take_lock(self) -> None:
        lock_path = self.state_dir / "agent.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise errors.NovaError(
                f"another nova-agent already uses {self.state_dir} (lock {lock_path} is held)"
            ) from None
        self._lock_file = fd

    async def _serve_socket(self, app: web.Application) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists():
            if paths.socket_answers(path):
                raise errors.NovaError(f"{path} is in use by a running agent")
            path.unlink()  # left behind by an agent that died
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        try:
            await web.UnixSite(runner, str(path)).start()
        except OSError as exc:
            raise errors.NovaError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        self._socket_bound = True
        os.chmod(path, 0o660)

    async def _serve_tcp(self, app: web.Application, address: str) -> None:
        host, port = parse_address(address)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise errors.NovaError(
                f"cannot serve /metrics on {address}: {exc.strerror or exc}"
            ) from None


def _describe_policy(policy: PolicyEngine | None) -> str:
    if policy is None:
        return "off"
    return f"{policy.backend.name} ({', '.join(source.name for source in policy.sources)})"


def parse_address(address: str) -> tuple[str, int]:
    """`127.0.0.1:9464` -> ("127.0.0.1", 9464); UsageError when malformed."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.UsageError(f"invalid --metrics-address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def uninstall_policy(args: argparse.Namespace) -> int:
    """`--uninstall-policy`: refuse while an agent runs (it would enforce again), else remove."""
    from agent.netpol.uninstall import uninstall  # pyroute2 only when asked

    socket_path = args.socket or paths.socket_path()
    if paths.socket_answers(socket_path):
        print(f"nova-agent: an agent is running on {socket_path}; stop it first", file=sys.stderr)
        return errors.EXIT_NOVA
    if os.geteuid() != 0:
        print("nova-agent: --uninstall-policy needs root", file=sys.stderr)
        return errors.EXIT_NOVA
    try:
        removed = uninstall()
    except OSError as exc:
        print(f"nova-agent: uninstall failed: {exc}", file=sys.stderr)
        return errors.EXIT_NOVA
    for line in removed:
        print(f"removed {line}")
    print(f"network policy uninstalled ({len(removed)} objects removed)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.uninstall_policy:
        return uninstall_policy(args)
    try:
        check_cluster_args(args)
    except errors.UsageError as exc:
        print(f"nova-agent: {exc.message}", file=sys.stderr)
        return errors.EXIT_USAGE
    if args.pool_size < 0:
        print("nova-agent: --pool-size must be 0 or more", file=sys.stderr)
        return errors.EXIT_USAGE
    if args.cgroup_root is not None:
        try:
            check_root_name(args.cgroup_root)
        except ValueError as exc:
            print(f"nova-agent: invalid --cgroup-root: {exc}", file=sys.stderr)
            return errors.EXIT_USAGE
    try:
        if args.metrics_address:
            parse_address(args.metrics_address)  # a typo fails before anything starts
        uvloop.run(Agent(args).run())
    except errors.NovaError as exc:
        print(f"nova-agent: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # e.g. a state directory it may not create or write
        print(f"nova-agent: cannot start: {exc}", file=sys.stderr)
        return errors.EXIT_NOVA
    return 0


if __name__ == "__main__":
    sys.exit(main())
