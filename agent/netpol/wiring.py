"""How the agent turns its flags into a running policy engine (used by agent/main.py).

policy.add_arguments(parser)          --policy-dir, --policy-backend, --policy-log-drops
engine = policy.make_engine(args, store=..., registry=metrics.registry)
await engine.start()                              before recovering containers
engine.add_endpoint(...) per recovered container, then engine.endpoints_synced()
... engine.add_endpoint / remove_endpoint from the container hook ... await engine.close()
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.netpol.backend import BACKEND_NAMES, PolicyBackendError, select_backend
from agent.netpol.engine import PolicyEngine, PolicyMetrics
from agent.netpol.sources import (
    DEFAULT_POLICY_DIR,
    DirectorySource,
    PolicySource,
    StoreSource,
    is_policy_file,
)
from nova.store import Store

log = logging.getLogger("nova.agent.netpol")


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

    Raises PolicyBackendError when the requested backend cannot run on this
    host. With `auto` and no usable backend (not root, no nft and no bcc) the
    agent runs without policy, with a warning, unless the policy directory
    holds policy files: enforcing nothing then would fail open.
    """
    if args.policy_backend == "none":
        return None
    try:
        backend = select_backend(args.policy_backend, drop_log_rate=args.policy_log_drops)
    except PolicyBackendError as exc:
        if args.policy_backend != "auto":
            raise
        waiting = _policy_files(args.policy_dir)
        if waiting:
            raise PolicyBackendError(
                "auto", "select", "this host",
                f"{exc.reason}, and {args.policy_dir} holds policies ({', '.join(waiting)}) "
                "that would not be enforced",
            ) from None  # fmt: skip
        log.warning("network policy is off: %s", exc.reason)
        return None
    sources: list[PolicySource] = [DirectorySource(args.policy_dir)]
    if store is not None:
        sources.append(StoreSource(store))
    return PolicyEngine(
        backend,
        sources=sources,
        metrics=PolicyMetrics(registry),
        endpoints_pending=True,  # the agent calls endpoints_synced() after recovery
    )


def warn_without_network(args: argparse.Namespace) -> None:
    """Containers share the host's network (no netns of their own): nothing to enforce on."""
    waiting = _policy_files(args.policy_dir) if args.policy_backend != "none" else []
    if waiting:
        log.warning(
            "network policy needs per-container networks (--network); the policies in %s "
            "(%s) are not enforced",
            args.policy_dir,
            ", ".join(waiting),
        )


def _policy_files(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in directory.iterdir() if is_policy_file(p.name))
    except OSError:
        return []
