"""The agent API's volume routes, and how a container run gets its volumes.

    POST   /v1/volumes                     create   (body: {"name", "size", "namespace"?})
    GET    /v1/volumes[?namespace=NS]      list
    GET    /v1/volumes/{namespace}/{name}  one volume
    DELETE /v1/volumes/{namespace}/{name}  remove (409 while a container uses it)

A run names volumes as `NAME:GUEST[:ro]` in its own namespace (field
`namespace`, default "default"); `resolve_run` turns each into the volume's
host directory before the spec reaches a worker, and refuses another
namespace's volume (403) and a plain `dirs` entry that reaches into the
volume store. Errors use the API's JSON error format.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.isolation import loopdev
from agent.isolation.volume_keys import VolumeKeyError
from agent.isolation.volumes import (
    DEFAULT_NAMESPACE,
    VolumeBusy,
    VolumeError,
    VolumeExists,
    VolumeForbidden,
    VolumeManager,
    VolumeNotFound,
    check_name,
)
from agent.sandbox.spec import RunSpec, VolumeMount
from nova import errors
from nova.units import parse_size

log = logging.getLogger("nova.agent.api")

VOLUMES = web.AppKey("volumes", VolumeManager)

_STATUS: list[tuple[type[errors.NovaError], int]] = [
    (VolumeNotFound, 404),
    (VolumeForbidden, 403),
    (VolumeExists, 409),
    (VolumeBusy, 409),
    (VolumeError, 500),
    (VolumeKeyError, 500),
    (loopdev.LoopError, 500),
]


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Volume errors with their own status; everything else goes on to the API's handler."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except (VolumeError, VolumeKeyError, loopdev.LoopError) as exc:
        status = next(code for kind, code in _STATUS if isinstance(exc, kind))
        return web.json_response(
            {"error": exc.message, "kind": type(exc).__name__, "exit_code": exc.exit_code},
            status=status,
        )


def parse_run_fields(body: dict[str, Any]) -> tuple[str, tuple[VolumeMount, ...]]:
    """The `namespace` and `volumes` fields of a create request."""
    namespace = body.get("namespace") or DEFAULT_NAMESPACE
    if not isinstance(namespace, str):
        raise errors.UsageError(f"invalid namespace {namespace!r}: expected a name")
    check_name(namespace, "namespace")
    volumes = body.get("volumes", [])
    if not isinstance(volumes, list) or not all(isinstance(v, str) for v in volumes):
        raise errors.UsageError("field 'volumes' must be a list of NAME:GUEST[:ro] strings")
    return namespace, tuple(VolumeMount.parse(v) for v in volumes)


async def resolve_run(app: web.Application, spec: RunSpec) -> RunSpec:
    """The spec with each volume's host directory filled in, or a clear refusal."""
    volumes = app.get(VOLUMES)
    if volumes is not None:
        for dir_mount in spec.dirs:
            volumes.refuse_host_dir(dir_mount.host)
    if not spec.volumes:
        return spec
    volumes = _require(app)
    resolved = []
    for mount in spec.volumes:
        volume = await asyncio.to_thread(volumes.resolve, spec.namespace, mount.name)
        resolved.append(dataclasses.replace(mount, host=str(volume.data_path)))
    return dataclasses.replace(spec, volumes=tuple(resolved))


def open_volumes(state_dir: Path) -> VolumeManager | None:
    """The agent's volumes, opened (mounted, unlocked) after a start or a crash; None if not root.

    Blocks: call it in a thread. A volume that cannot be opened is logged and
    left alone; the others open.
    """
    if os.geteuid() != 0:
        log.warning("not running as root: no volumes (they need loop devices and mounts)")
        return None
    volumes = VolumeManager(state_dir)
    report = volumes.recover()
    if report.opened or report.unmounted or report.detached or report.deleted:
        log.info(
            "volumes: opened %d; removed leftovers: %d mounts, %d loop devices, %d files",
            len(report.opened),
            len(report.unmounted),
            len(report.detached),
            len(report.deleted),
        )
    return volumes


def _manager(request: web.Request) -> VolumeManager:
    return _require(request.app)


def _require(app: web.Application) -> VolumeManager:
    volumes = app.get(VOLUMES)
    if volumes is None:
        raise errors.UsageError(
            "this agent has no volumes (they need root: loop devices, mounts); "
            "run nova-agent as root"
        )
    return volumes


async def create_volume(request: web.Request) -> web.Response:
    volumes = _manager(request)
    try:
        body = await request.json()
    except ValueError:
        raise errors.UsageError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise errors.UsageError("request body must be a JSON object")
    unknown = set(body) - {"name", "size", "namespace"}
    if unknown:
        raise errors.UsageError(f"unknown field(s) in request: {', '.join(sorted(unknown))}")
    name, size = body.get("name"), body.get("size")
    if not isinstance(name, str):
        raise errors.UsageError("field 'name' (the volume's name) is required")
    namespace = body.get("namespace") or DEFAULT_NAMESPACE
    if not isinstance(namespace, str):
        raise errors.UsageError(f"invalid namespace {namespace!r}: expected a name")
    if isinstance(size, str):
        size = parse_size(size, what="size")
    if not isinstance(size, int) or isinstance(size, bool):
        raise errors.UsageError(f"invalid size {size!r}: expected bytes or e.g. '64Mi'")
    volume = await asyncio.to_thread(volumes.create, namespace, name, size)
    return web.json_response(volume.to_json(), status=201)


async def list_volumes(request: web.Request) -> web.Response:
    volumes = _manager(request)
    namespace = request.query.get("namespace") or None
    if namespace is not None:
        check_name(namespace, "namespace")
    found = await asyncio.to_thread(volumes.list, namespace)
    return web.json_response([v.to_json() for v in found])


def _ref(request: web.Request) -> tuple[str, str]:
    namespace = check_name(request.match_info["namespace"], "namespace")
    return namespace, check_name(request.match_info["name"], "volume name")


async def get_volume(request: web.Request) -> web.Response:
    volume = await asyncio.to_thread(_manager(request).get, *_ref(request))
    return web.json_response(volume.to_json())


async def remove_volume(request: web.Request) -> web.Response:
    namespace, name = _ref(request)
    await asyncio.to_thread(_manager(request).remove, namespace, name)
    return web.json_response({"removed": f"{namespace}/{name}"})


def register(app: web.Application, volumes: VolumeManager | None) -> None:
    if volumes is not None:
        app[VOLUMES] = volumes
    app.router.add_post("/v1/volumes", create_volume)
    app.router.add_get("/v1/volumes", list_volumes)
    app.router.add_get("/v1/volumes/{namespace}/{name}", get_volume)
    app.router.add_delete("/v1/volumes/{namespace}/{name}", remove_volume)
