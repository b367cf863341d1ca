"""How the agent turns its flags into a running policy engine (used by agent/main.py).

policy.add_arguments(parser)          --policy-dir, --policy-backend, --policy-log-drops
engine = policy.make_engine(args, store=..., registry=metrics.registry)
await engine.start()                              before recovering containers
engine.add_endpoint(...) per recovered container, then engine.endpoints_synced()
... engine.add_endpoint / remove_endpoint from the container hook ... await engine.close()
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.netpol.backend import BACKEND_NAMES, select_backend
from agent.netpol.engine import PolicyEngine, PolicyMetrics
from agent.netpol.sources import DEFAULT_POLICY_DIR, DirectorySource, PolicySource, StoreSource
from nova.store import Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy-dir",
        type=Path,
        default=DEFAULT_POLICY_DIR,
        metavar="DIR",
        help=f"NetworkPolicy files (*.yaml) to enforce, watched for changes "
        f"(default: {DEFAULT_POLICY_DIR}; created if missing)",
    )
    parser.add_argument(
        "--policy-backend",
        default="auto",
        choices=["auto", *BACKEND_NAMES, "none"],
        help="kernel enforcement of network policy: auto = eBPF where this host can load it, "
        "else nftables (default); none = no network policy at all",
    )
    parser.add_argument(
        "--policy-log-drops",
        type=_rate,
        default=0,
        metavar="N",
        help="log packets dropped by network policy, at most N a second (eBPF: this log; "
        "nftables: the kernel log, per container and direction); default 0: off",
    )


def _rate(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of drops per second")
    return int(text)


def make_engine(
    args: argparse.Namespace, *, store: Store | None, registry: CollectorRegistry
) -> PolicyEngine | None:
    """The engine the flags ask for (None with --policy-backend none).

    Raises PolicyBackendError when the requested backend cannot run on this host.
    """
    if args.policy_backend == "none":
        return None
    sources: list[PolicySource] = [DirectorySource(args.policy_dir)]
    if store is not None:
        sources.append(StoreSource(store))
    return PolicyEngine(
        select_backend(args.policy_backend, drop_log_rate=args.policy_log_drops),
        sources=sources,
        metrics=PolicyMetrics(registry),
        endpoints_pending=True,  # the agent calls endpoints_synced() after recovery
    )
