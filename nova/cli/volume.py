"""`nova volume`: create, list and remove encrypted volumes (through the agent)."""

from __future__ import annotations

import argparse
import json
import urllib.parse
from pathlib import Path
from typing import Any

import uvloop

from nova import errors, paths
from nova.cli.client import AgentClient, agent_listening
from nova.units import format_size, parse_size

DESCRIPTION = """\
Manage encrypted volumes: storage that containers of one namespace mount with
`nova run --volume NAME:/data`.

Each volume is an ext4 filesystem in an image file on this host, encrypted at
rest (fscrypt, AES-256-XTS) with its namespace's key. A container can mount
only its own namespace's volumes (`nova run --namespace NS`, default
"default"). Volumes need an agent running as root.
"""

EPILOG = """\
examples:
  nova volume create data --size 64Mi
  nova volume create cache --size 1Gi --namespace team-a
  nova run --namespace team-a --volume cache:/cache app.wasm
  nova volume ls
  nova volume rm cache --namespace team-a

sizes: 64Mi, 1Gi, 500M, 1048576 (bytes); 16Mi at least. The image file is
sparse: it takes host disk space only as data is written.

exit status: 0 on success; 2 usage error; 125 Nova failed (no agent, volume
in use, already exists); 127 no such volume.
"""


def add_parser(commands: Any) -> None:
    """Register `nova volume` and its subcommands on the top-level subparsers."""
    raw = argparse.RawDescriptionHelpFormatter
    volume = commands.add_parser(
        "volume",
        help="create, list and remove encrypted volumes",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=raw,
    )
    actions = volume.add_subparsers(
        dest="action", metavar="ACTION", parser_class=type(volume), required=True
    )
    namespace_help = "the volume's namespace (default: default)"
    create = actions.add_parser(
        "create",
        help="create a volume",
        description="Create an encrypted volume of SIZE in a namespace.",
        epilog="example:\n  nova volume create data --size 64Mi --namespace team-a",
        formatter_class=raw,
    )
    create.add_argument("name", metavar="NAME", help="volume name: lowercase letters, digits, _.-")
    create.add_argument("--size", required=True, metavar="SIZE", help="e.g. 64Mi, 1Gi")
    create.add_argument("--namespace", default="default", metavar="NS", help=namespace_help)
    ls = actions.add_parser(
        "ls", help="list volumes", description="List volumes, of every namespace by default."
    )
    ls.add_argument("--namespace", metavar="NS", help="only this namespace's volumes")
    ls.add_argument("--json", action="store_true", help="print JSON")
    rm = actions.add_parser(
        "rm",
        help="remove a volume and its data",
        description="Remove a volume: its data is gone for good. Refused while a container "
        "uses it.",
    )
    rm.add_argument("name", metavar="NAME", help="volume name")
    rm.add_argument("--namespace", default="default", metavar="NS", help=namespace_help)


class VolumeClient(AgentClient):
    async def create_volume(self, namespace: str, name: str, size: int) -> dict[str, Any]:
        body = {"namespace": namespace, "name": name, "size": size}
        result: dict[str, Any] = await self._json("POST", "/v1/volumes", json=body)
        return result

    async def list_volumes(self, namespace: str | None) -> list[dict[str, Any]]:
        params = {"namespace": namespace} if namespace else {}
        result: list[dict[str, Any]] = await self._json("GET", "/v1/volumes", params=params)
        return result

    async def remove_volume(self, namespace: str, name: str) -> None:
        quote = urllib.parse.quote
        await self._json(
            "DELETE", f"/v1/volumes/{quote(namespace, safe='')}/{quote(name, safe='')}"
        )


def main(args: argparse.Namespace) -> int:
    size = parse_size(args.size, what="--size") if args.action == "create" else 0
    socket_path = Path(args.socket) if args.socket else paths.socket_path()
    if not agent_listening(socket_path):
        raise errors.AgentUnavailable(
            f"no agent answers at {socket_path}; volumes need one: start "
            "`nova-agent --standalone` as root (or pass --socket)"
        )
    return uvloop.run(_main(socket_path, args, size))


async def _main(socket_path: Path, args: argparse.Namespace, size: int) -> int:
    async with VolumeClient(socket_path) as client:
        if args.action == "create":
            volume = await client.create_volume(args.namespace, args.name, size)
            print(f"{volume['namespace']}/{volume['name']}")
        elif args.action == "rm":
            await client.remove_volume(args.namespace, args.name)
        else:
            _print_table(await client.list_volumes(args.namespace), as_json=args.json)
    return 0


def _print_table(volumes: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(volumes, indent=2))
        return
    rows = [("NAMESPACE", "NAME", "SIZE", "USED", "STATE")]
    for v in volumes:
        used = v.get("used_bytes")
        rows.append(
            (
                v["namespace"],
                v["name"],
                format_size(v["size_bytes"]),
                "-" if used is None else format_size(used),
                v["state"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
