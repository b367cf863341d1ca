"""`nova policy status` and `nova policy test`: network policy as the local agent enforces it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from nova import errors, paths

DESCRIPTION = """\
Show and test the network policy the local agent enforces.

Policies are NetworkPolicy files (apiVersion nova.sh/v1) in the agent's
policy directory (default /etc/nova/policies; written or renamed into place,
they are enforced within 100 ms) and cluster-wide policies in the store. A
file that does not validate is rejected and its last good version stays
enforced: `nova policy status` says which file and why.
"""

EPILOG = """\
commands:
  status   the backend, generation, loaded policies per file, errors
  test     what the policy does with a new connection from A to B, and why

examples:
  nova policy status
  nova policy test --from web --to db --port 5432
  nova policy test --from 10.0.1.5 --to api-1 --port 53 --protocol UDP

See docs/network-policy.md for the policy language.
"""

STATUS_EPILOG = """\
exit status: 0 when every policy source loads and the last apply succeeded;
1 when there are errors (the last good policy stays enforced); 125 when the
agent cannot be reached or has policy disabled.
"""

TEST_EPILOG = """\
A and B are container names, container ids (or a unique prefix of one) or IPv4
addresses. A connection passes when the egress policy of A allows it AND the
ingress policy of B allows it; a side that is not a container of this agent
is not filtered here. Replies of an allowed connection always pass.

exit status: 0 allowed, 1 denied, 2 usage error, 125 agent unreachable.
"""


def add_parser(commands: Any) -> None:
    """Register `nova policy` on the `nova` subcommand parser."""
    raw = argparse.RawDescriptionHelpFormatter
    policy = commands.add_parser(
        "policy",
        help="show and test network policy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=raw,
    )
    actions = policy.add_subparsers(
        dest="policy_command", metavar="COMMAND", parser_class=type(policy), required=True
    )
    status = actions.add_parser(
        "status",
        help="loaded policies, backend, errors",
        description="Show the policy engine's backend, generation, policies per file and errors.",
        epilog=STATUS_EPILOG,
        formatter_class=raw,
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    test = actions.add_parser(
        "test",
        help="what happens to a connection from A to B",
        description="Tell whether a new connection from A to B on PORT passes, and why.",
        epilog=TEST_EPILOG,
        formatter_class=raw,
    )
    test.add_argument("--from", dest="src", required=True, metavar="A", help="the client")
    test.add_argument("--to", dest="dst", required=True, metavar="B", help="the server")
    test.add_argument("--port", required=True, type=_port, metavar="PORT", help="1-65535")
    test.add_argument(
        "--protocol",
        default="TCP",
        type=str.upper,
        choices=["TCP", "UDP", "SCTP"],
        help="TCP (default), UDP or SCTP",
    )
    test.add_argument("--json", action="store_true", help="print JSON")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 1-65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 1-65535")
    return port


def dispatch(args: argparse.Namespace) -> int:
    # The client (aiohttp, uvloop) is imported here: `nova run` never pays for it.
    import uvloop

    from nova.cli.client import agent_listening

    socket_path = Path(args.socket) if args.socket else paths.socket_path()
    if not agent_listening(socket_path):
        raise errors.AgentUnavailable(
            f"no agent answers at {socket_path}; start one with `nova-agent --standalone` "
            "(or pass --socket)"
        )
    return uvloop.run(_run(socket_path, args))


async def _run(socket_path: Path, args: argparse.Namespace) -> int:
    from nova.cli.client import AgentClient

    async with AgentClient(socket_path) as client:
        if args.policy_command == "status":
            status = await client._json("GET", "/v1/policies")
            print(json.dumps(status, indent=2) if args.json else format_status(status))
            return 1 if status.get("errors") else 0
        body = {"from": args.src, "to": args.dst, "port": args.port, "protocol": args.protocol}
        verdict = await client._json("POST", "/v1/policies/test", json=body)
        print(json.dumps(verdict, indent=2) if args.json else format_test(verdict))
        return 0 if verdict.get("allowed") else 1


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def format_status(status: dict[str, Any]) -> str:
    applied = f"applied {_when(status.get('applied_at'))}"
    if status.get("apply_seconds") is not None:
        applied += f" in {status['apply_seconds'] * 1000:.1f} ms"
    if status.get("pending"):
        applied += ", a change is pending"
    lines = [
        f"backend     {status.get('backend')}",
        f"generation  {status.get('generation')} ({applied})",
        f"enforced    {status.get('policies')} policies, {status.get('rules')} rules "
        f"over {status.get('endpoints')} endpoints",
        f"sources     {', '.join(status.get('sources') or []) or 'none'}",
    ]
    origins = status.get("origins") or []
    if origins:
        width = max(len("ORIGIN"), *(len(o["origin"]) for o in origins))
        lines.append("")
        lines.append(f"{'ORIGIN':<{width}}  STATE                       POLICIES")
        for origin in origins:
            state = "ok" if origin.get("error") is None else "error: last good kept"
            names = ", ".join(origin.get("policies") or []) or "-"
            lines.append(f"{origin['origin']:<{width}}  {state:<26}  {names}")
    errors_ = status.get("errors") or []
    if errors_:
        lines.append("")
        lines.append("errors:")
        lines.extend(f"  {e['message']}" for e in errors_)
    return "\n".join(lines)


def format_test(verdict: dict[str, Any]) -> str:
    def side(ref: dict[str, Any], identity: int) -> str:
        name = ref["ref"] if ref["ref"] == ref["ip"] else f"{ref['ref']} ({ref['ip']})"
        return f"{name} [identity {identity}]"

    head = "ALLOWED" if verdict["allowed"] else "DENIED"
    lines = [
        f"{head}  {side(verdict['from'], verdict['src_identity'])} -> "
        f"{side(verdict['to'], verdict['dst_identity'])} "
        f"{verdict['protocol']}/{verdict['port']}",
    ]
    for key, label in (("egress", f"egress of {verdict['from']['ref']}"),
                       ("ingress", f"ingress of {verdict['to']['ref']}")):  # fmt: skip
        part = verdict[key]
        mark = "allow" if part["allowed"] else "DENY "
        lines.append(f"  {mark} {label}: {part['reason']}")
    lines.append(f"  (policy generation {verdict.get('generation')})")
    return "\n".join(lines)
