"""The `nova` commands: through the agent's API, or daemonless."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from agent.isolation.cgroups.parse import parse_millicores
from nova import errors, paths
from nova.cli.client import AgentClient, agent_listening
from nova.units import parse_duration, parse_size


def dispatch(args: argparse.Namespace) -> int:
    socket_path = Path(args.socket) if args.socket else paths.socket_path()
    if args.command == "run":
        body = _create_body(args)
        if args.no_agent or not agent_listening(socket_path):
            if args.image:
                raise errors.AgentUnavailable(
                    f"--image needs an agent started with --consul, and none answers at "
                    f"{socket_path}"
                )
            if body.get("volumes"):
                raise errors.AgentUnavailable(
                    f"--volume needs a running agent (it keeps the volumes and their keys), "
                    f"and none answers at {socket_path}; start one with "
                    "`nova-agent --standalone` as root"
                )
            if args.detach:
                raise errors.AgentUnavailable(
                    f"--detach needs a running agent, and none answers at {socket_path}; "
                    "start one with `nova-agent --standalone`"
                )
            from nova.cli import daemonless

            return daemonless.run(body)
        return uvloop.run(_run_via_agent(socket_path, body, detach=args.detach))
    if not agent_listening(socket_path):
        raise errors.AgentUnavailable(
            f"no agent answers at {socket_path}; start one with `nova-agent --standalone` "
            "(or pass --socket)"
        )
    handlers = {"ps": _ps, "logs": _logs, "stop": _stop, "rm": _rm}
    return uvloop.run(handlers[args.command](socket_path, args))


def _create_body(args: argparse.Namespace) -> dict[str, Any]:
    """Validate what the user typed before anything starts; UsageError on bad input."""
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise errors.UsageError(f"invalid --env {item!r}: expected NAME=VALUE")
        env[name] = value
    body: dict[str, Any]
    if args.image:
        from nova.cli.image import image_body

        body = image_body(args)
    else:
        if not args.module:
            raise errors.UsageError("MODULE (a .wasm file) or --image NAME:TAG is required")
        body = {
            "module": os.path.abspath(args.module),
            "argv": [os.path.basename(args.module), *args.args],
        }
    body["env"] = env
    body["dirs"] = [_check_dir(d) for d in args.dir]
    if args.volume or args.namespace != "default":
        body["namespace"] = args.namespace
        body["volumes"] = [_check_volume(v) for v in args.volume]
    if args.label:
        body["labels"] = _parse_labels(args.label)
    if args.name:
        body["name"] = args.name
    if args.memory is not None:
        body["memory"] = parse_size(args.memory, what="--memory")
    if args.timeout is not None:
        body["timeout"] = parse_duration(args.timeout, what="--timeout")
    if args.cpu is not None:
        try:
            body["cpu"] = f"{parse_millicores(args.cpu)}m"
        except errors.UsageError as exc:
            raise errors.UsageError(exc.message.replace("cpu", "--cpu", 1)) from None
    if args.pids is not None:
        body["pids"] = _parse_pids(args.pids)
    body["isolation"] = args.isolation
    if args.isolation == "none" and (args.cpu is not None or args.pids is not None):
        raise errors.UsageError(
            "--cpu and --pids need a cgroup, and --isolation none has none: drop one or the other"
        )
    if args.port is not None:
        if not 0 < args.port < 65536:
            raise errors.UsageError(f"invalid --port {args.port}: expected 1-65535")
        body["http_port"] = args.port
        body["http_host"] = args.host
    if not args.image and not os.path.exists(args.module):
        raise errors.ModuleNotFound(f"{args.module}: no such file")
    return body


def _parse_pids(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise errors.UsageError(f"invalid --pids {text!r}: expected a whole number of at least 1")
    return int(text)


def _cgroup_notice(body: dict[str, Any], record: dict[str, Any]) -> None:
    """One line when limits that need a cgroup were asked for but the agent has none."""
    asked = [flag for flag, field in (("--cpu", "cpu"), ("--pids", "pids")) if field in body]
    if asked and record.get("isolation") == "none":
        verb = "needs" if len(asked) == 1 else "need"
        print(
            f"nova: {' and '.join(asked)} {verb} cgroups, and the agent runs without them "
            "(not root?): not enforced (--isolation none; only the wasm limits hold)",
            file=sys.stderr,
        )


def _check_dir(text: str) -> str:
    from agent.sandbox.spec import DirMount

    mount = DirMount.parse(text)
    if not os.path.isdir(mount.host):
        raise errors.UsageError(f"invalid --dir {text!r}: {mount.host} is not a directory")
    return f"{os.path.abspath(mount.host)}:{mount.guest}{':ro' if mount.read_only else ''}"


def _check_volume(text: str) -> str:
    from agent.sandbox.spec import VolumeMount

    VolumeMount.parse(text)  # the syntax here; the agent checks that the volume exists
    return text


async def _run_via_agent(socket_path: Path, body: dict[str, Any], *, detach: bool) -> int:
    async with AgentClient(socket_path) as client:
        if detach:
            record = await client.create(body)
            _cgroup_notice(body, record)
            print(record["name"])
            return 0
        # Attached, the container lives as long as this command: Ctrl-C or SIGTERM
        # (`timeout`, a supervisor) stops it instead of orphaning it. The handlers go
        # in before the create request, so a signal that arrives while the agent is
        # starting the container stops it as soon as its name is known.
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupted.set)
        try:
            record = await client.create(body)
            name = record["name"]
            _cgroup_notice(body, record)
            following = asyncio.ensure_future(_follow(client, name))
            signalled = asyncio.ensure_future(interrupted.wait())
            await asyncio.wait({following, signalled}, return_when=asyncio.FIRST_COMPLETED)
            signalled.cancel()
            if following.done():
                return _report_exit(name, following.result())
            following.cancel()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)  # a second signal ends this command at once
        return _report_exit(name, await client.stop(name, 2.0))


async def _follow(client: AgentClient, name: str) -> dict[str, Any]:
    """Copy the container's output here until it ends; its final record."""
    await asyncio.gather(
        _copy(client.logs(name, "stdout", follow=True), sys.stdout.buffer),
        _copy(client.logs(name, "stderr", follow=True), sys.stderr.buffer),
    )
    final: dict[str, Any] = await client.wait(name)
    return final


async def _copy(chunks: Any, out: Any) -> None:
    async for chunk in chunks:
        out.write(chunk)
        out.flush()


def _report_exit(name: str, record: dict[str, Any]) -> int:
    status = record.get("status") or {}
    code = int(status.get("exit_code", errors.EXIT_NOVA))
    if status.get("reason") != "Exited" or status.get("memory_limit_hit"):
        print(f"nova: container {name} {record.get('describe', 'ended')}", file=sys.stderr)
    return code


async def _ps(socket_path: Path, args: argparse.Namespace) -> int:
    async with AgentClient(socket_path) as client:
        records = await client.list(include_all=args.all)
        _cluster_notice(await client.health())
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    rows = [("NAME", "ID", "STATE", "STARTUP", "AGE", "MODULE", "STATUS")]
    now = time.time()
    for r in records:
        startup = f"{r['startup_us']:.0f}us" if r.get("startup_us") else "-"
        rows.append(
            (
                r["name"],
                r["id"],
                r["state"],
                startup,
                _age(now - r["created_at"]),
                os.path.basename(r["module"]),
                r["describe"]
                if r["state"] != "running"
                else ("http :" + str(r["http_port"]) if r.get("http_port") else "running"),
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )
    return 0


def _cluster_notice(health: dict[str, Any]) -> None:
    """One line on stderr while the agent's cluster store does not answer."""
    cluster = health.get("cluster") or {}
    since = cluster.get("unavailable_since")
    if since:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        print(
            f"nova: cluster store {cluster.get('consul')} unavailable since {at} "
            f"({cluster.get('last_error')}); containers keep running",
            file=sys.stderr,
        )


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


async def _logs(socket_path: Path, args: argparse.Namespace) -> int:
    async with AgentClient(socket_path) as client:
        await client.get(args.name)  # a clear "no container named" before streaming
        await asyncio.gather(
            _copy(client.logs(args.name, "stdout", follow=args.follow), sys.stdout.buffer),
            _copy(client.logs(args.name, "stderr", follow=args.follow), sys.stderr.buffer),
        )
    return 0


async def _stop(socket_path: Path, args: argparse.Namespace) -> int:
    grace = parse_duration(args.grace, what="--grace")
    async with AgentClient(socket_path) as client:
        record = await client.stop(args.name, grace)
    print(f"{record['name']}: {record['describe']}")
    return 0


async def _rm(socket_path: Path, args: argparse.Namespace) -> int:
    async with AgentClient(socket_path) as client:
        await client.remove(args.name)
    return 0


def _parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise errors.UsageError(f"invalid --label {item!r}: expected KEY=VALUE")
        labels[key] = value
    return labels
