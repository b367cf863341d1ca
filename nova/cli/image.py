"""`nova image push|ls|inspect`: images in the cluster store, straight through Consul."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import uvloop

from nova import errors
from nova.images import ImageRef, inspect, list_tags, push, resolve
from nova.store import Store, StoreError, open_store

DEFAULT_CONSUL = "http://127.0.0.1:8500"

DESCRIPTION = """\
Manage images: WebAssembly modules stored in the cluster by their sha256
digest. `push` uploads a module (in chunks below Consul's value limit) and
points NAME:TAG at it; every Consul server holds a copy, and agents fetch an
image by digest and verify it before running it.
"""

EPILOG = """\
examples:
  nova image push web:1.0 build/web.wasm
  nova image ls
  nova image inspect web:1.0
  nova run --image web:1.0          (through an agent started with --consul)

references: NAME:TAG, NAME (tag latest) or sha256:<64 hex digits>.
consul: --consul URL, else $NOVA_CONSUL, else http://127.0.0.1:8500.
"""


def add_parser(commands: Any) -> None:
    """Register `nova image` under the top-level subparsers `commands`."""
    raw = argparse.RawDescriptionHelpFormatter
    image = commands.add_parser(
        "image", help="push and list images", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=raw,
    )  # fmt: skip
    verbs = image.add_subparsers(dest="verb", metavar="VERB", required=True)
    consul = argparse.ArgumentParser(add_help=False)
    consul.add_argument(
        "--consul",
        metavar="URL",
        help=f"the Consul agent (default: $NOVA_CONSUL or {DEFAULT_CONSUL})",
    )
    push_ = verbs.add_parser(
        "push", parents=[consul], help="store a module as NAME:TAG",
        description="Store FILE (a .wasm module) by its digest and tag it NAME:TAG; "
        "prints the digest.",
    )  # fmt: skip
    push_.add_argument("ref", metavar="NAME:TAG")
    push_.add_argument("file", metavar="FILE", type=Path)
    ls = verbs.add_parser("ls", parents=[consul], help="list tags", description="List image tags.")
    ls.add_argument("--json", action="store_true", help="print JSON")
    insp = verbs.add_parser(
        "inspect", parents=[consul], help="show an image's meta",
        description="Show the digest, size and chunks of an image (JSON).",
    )  # fmt: skip
    insp.add_argument("ref", metavar="NAME:TAG|sha256:…")


def main(args: argparse.Namespace) -> int:
    url = args.consul or os.environ.get("NOVA_CONSUL") or DEFAULT_CONSUL
    try:
        store = open_store(url)
    except ValueError as exc:
        raise errors.UsageError(f"invalid --consul: {exc}") from None
    handlers = {"push": _push, "ls": _ls, "inspect": _inspect}
    try:
        return uvloop.run(_with_store(store, handlers[args.verb], args))
    except StoreError as exc:
        raise errors.NovaError(
            f"{exc.message} (is Consul running? --consul / NOVA_CONSUL)"
        ) from None


async def _with_store(store: Store, handler: Any, args: argparse.Namespace) -> int:
    try:  # not `async with`: a store that fails to open must still close its client
        await store.open()
        result: int = await handler(store, args)
        return result
    finally:
        await store.close()


async def _push(store: Store, args: argparse.Namespace) -> int:
    ref = ImageRef.parse(args.ref)
    try:
        data = args.file.read_bytes()
    except FileNotFoundError:
        raise errors.ModuleNotFound(f"{args.file}: no such file") from None
    except OSError as exc:
        raise errors.NovaError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    try:
        meta = await push(store, ref, data)
    except errors.InvalidModule as exc:
        raise errors.InvalidModule(f"{args.file}: {exc.message}") from None
    print(meta.digest)
    return 0


async def _ls(store: Store, args: argparse.Namespace) -> int:
    tags = await list_tags(store)
    if args.json:
        print(json.dumps([vars_of(t) for t in tags], indent=2))
        return 0
    rows = [("NAME", "TAG", "DIGEST", "PUSHED")]
    rows += [
        (
            t.name,
            t.tag,
            t.digest[:19],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.pushed_at)),
        )
        for t in tags
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


async def _inspect(store: Store, args: argparse.Namespace) -> int:
    digest = await resolve(store, ImageRef.parse(args.ref))
    meta = await inspect(store, digest)
    print(json.dumps({"digest": meta.digest, **meta.to_json()}, indent=2))
    return 0


def image_body(args: argparse.Namespace) -> dict[str, Any]:
    """The create request of `nova run --image REF [ARGS]` (the agent fetches REF)."""
    ref = ImageRef.parse(args.image, what="--image")
    guest = [args.module, *args.args] if args.module else list(args.args)
    return {"image": str(ref), "argv": [ref.name or "app", *guest]}


def vars_of(tag: Any) -> dict[str, Any]:
    return {"name": tag.name, "tag": tag.tag, "digest": tag.digest, "pushed_at": tag.pushed_at}
