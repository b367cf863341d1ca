"""nova-coordinator: leader election, the cluster API and placement for a Nova cluster."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys

import uvloop
from aiohttp import web

from coordinator.api import make_app
from coordinator.leader import LeaderElection, NotLeader
from coordinator.lease import LeaseTiming, TimingError
from coordinator.placement import Strategy
from coordinator.placer import Placer, cancel
from nova import errors
from nova.store import StoreError, StoreUnavailable, keys
from nova.store.consul import ConsulStore
from nova.units import parse_duration

log = logging.getLogger("nova.coordinator")

DESCRIPTION = """\
Run a Nova coordinator.

Run one on each of several hosts. They elect one leader through a Consul
session lock on nova/v1/coordinator/leader; the others stand by, waiting on
a blocking query, and take over within seconds when the leader dies or is
cut off (its session is bound to a service TTL check that it passes every
--heartbeat). The leader's epoch is the key's LockIndex.

Every coordinator serves the cluster API on --listen (`nova status`,
`nova deploy`). Only the leader runs the control loops: placement of every
deployment's replicas on the healthy nodes (nova/v1/assignments/<node>),
and rescheduling of the replicas of nodes that fail. The leader acts only
while it can prove its session alive, and every one of its writes is a
Consul transaction fenced by a check-session on the leader key.
"""

EPILOG = """\
the Consul servers must allow the short session TTL:
  session_ttl_min = "1s"      (Consul's default floor is 10s; see docs/operations.md)

timing (defaults): --session-ttl 1s, --check-ttl 1.5s, --heartbeat 300ms.
A SIGKILLed leader is replaced after about --check-ttl; a leader cut off from
the servers stops acting after min(session TTL, check TTL) - 150ms, before
its session can expire on the servers.

examples:
  nova-coordinator --consul http://127.0.0.1:8500 --listen 127.0.0.1:8600 --id coord-a
  nova-coordinator --consul http://127.0.0.1:8500 --listen 0.0.0.0:8600 --strategy bin-pack

environment:
  CONSUL_HTTP_TOKEN   the ACL token (see docs/operations.md for its policy)

exit status:
  0 on a clean shutdown (SIGTERM, SIGINT: the lock is released at once),
  2 on a usage error, 125 when the coordinator cannot start.
"""


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except errors.UsageError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:8600")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nova-coordinator",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--consul",
        default="http://127.0.0.1:8500",
        metavar="URL",
        help="this host's Consul agent (default: %(default)s)",
    )
    parser.add_argument(
        "--listen",
        type=_listen,
        default=("127.0.0.1", 8600),
        metavar="HOST:PORT",
        help="where the cluster API listens (default: 127.0.0.1:8600)",
    )
    parser.add_argument(
        "--advertise",
        metavar="URL",
        help="the API URL written into the leader key (default: http://<listen address>)",
    )
    parser.add_argument(
        "--id",
        default=socket.gethostname(),
        help="this coordinator's name, unique in the cluster (default: the hostname)",
    )
    parser.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        default=Strategy.LEAST_LOADED.value,
        help="which node a replica prefers (default: %(default)s)",
    )
    parser.add_argument(
        "--overcommit",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="how far requests may exceed node capacity, >= 1.0 (default: 1.0: not at all)",
    )
    parser.add_argument("--session-ttl", type=_duration, default=1.0, metavar="DURATION")
    parser.add_argument("--check-ttl", type=_duration, default=1.5, metavar="DURATION")
    parser.add_argument("--heartbeat", type=_duration, default=0.3, metavar="DURATION")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


async def check_session_ttl(store: ConsulStore, ttl: float) -> None:
    """Fail at start, naming the setting, if the Consul servers refuse our session TTL."""
    try:
        session = await store.create_session(ttl=ttl, name="nova-coordinator TTL probe")
    except StoreUnavailable:
        raise
    except StoreError as exc:
        if "ttl" not in exc.reason.lower():
            raise
        raise StoreError(
            "create a session",
            store.url,
            f"the Consul servers refuse a {ttl:g} s session TTL ({exc.reason}); set "
            f'session_ttl_min = "{ttl:g}s" (or lower) on every Consul server, or raise '
            "--session-ttl (docs/operations.md)",
        ) from None
    await store.destroy_session(session)


async def serve(args: argparse.Namespace, timing: LeaseTiming) -> None:
    host, port = args.listen
    advertise = args.advertise or f"http://{host}:{port}"
    # Heartbeats get a client of their own, with a timeout short enough to matter.
    election_store = ConsulStore(args.consul, timeout=timing.request_timeout)
    store = ConsulStore(args.consul, timeout=30.0)
    try:
        await store.open()
        await check_session_ttl(store, timing.session_ttl)
    except BaseException:
        await store.close()
        await election_store.close()
        raise
    election = LeaderElection(election_store, args.id, api=advertise, address=host, timing=timing)
    placer = Placer(store, election, strategy=args.strategy, overcommit=args.overcommit)
    runner = web.AppRunner(make_app(store, election, placer), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("%s: API on %s, Consul at %s", args.id, advertise, args.consul)
    election_task = asyncio.create_task(election.run(), name="election")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stopping = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            acting = asyncio.create_task(election.wait_acting())
            await asyncio.wait(
                {acting, stopping, election_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if election_task.done():
                election_task.result()  # an error in the election ends the coordinator
            if not acting.done():
                acting.cancel()
                break
            epoch = acting.result()
            loops = asyncio.create_task(placer.run(epoch), name="placement")
            deposed = asyncio.create_task(election.wait_not_acting())
            await asyncio.wait({deposed, stopping, loops}, return_when=asyncio.FIRST_COMPLETED)
            deposed.cancel()
            await cancel(loops)
            failure = loops.exception() if loops.done() and not loops.cancelled() else None
            if failure is not None and not isinstance(failure, NotLeader):
                log.warning("placement loop ended (restarting in 1 s): %r", failure)
                await asyncio.sleep(1.0)  # a fault that repeats must not spin
    finally:
        await cancel(election_task)  # resigns: the standby takes over at once
        await runner.cleanup()
        await store.close()
        await election_store.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        keys.segment(args.id, what="--id")
        timing = LeaseTiming(args.session_ttl, args.check_ttl, args.heartbeat)
        ConsulStore(args.consul)  # checks the URL before anything starts
    except (TimingError, ValueError) as exc:
        parser.exit(errors.EXIT_USAGE, f"nova-coordinator: {exc}\n")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        uvloop.run(serve(args, timing))
    except StoreError as exc:
        print(f"nova-coordinator: {exc}", file=sys.stderr)
        return errors.EXIT_NOVA
    except OSError as exc:
        print(f"nova-coordinator: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return errors.EXIT_NOVA
    with contextlib.suppress(Exception):
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
