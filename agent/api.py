"""The agent's local HTTP API (aiohttp), served on a unix socket.

    GET    /v1/health                          liveness and identity
    GET    /metrics                            Prometheus exposition
    POST   /v1/containers                      create + start   (body: see parse_create)
    GET    /v1/containers[?all=1]              list (running, or all)
    GET    /v1/containers/{ref}                one container
    POST   /v1/containers/{ref}/stop[?grace=S] stop, return the final record
    GET    /v1/containers/{ref}/wait           block until it exits
    GET    /v1/containers/{ref}/logs?stream=stdout|stderr&follow=1
    DELETE /v1/containers/{ref}                forget an exited container

Errors are JSON: {"error": "<one line for users>", "kind": "<class>", "exit_code": N}.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.containers import Conflict, ContainerManager, NotFound
from agent.metrics import AgentMetrics
from agent.sandbox.spec import DirMount, RunSpec
from nova import errors
from nova.store import StoreError
from nova.units import parse_duration, parse_size

MANAGER = web.AppKey("manager", ContainerManager)
METRICS = web.AppKey("metrics", AgentMetrics)
NODE = web.AppKey("node", str)

_CREATE_FIELDS = {
    "module",
    "name",
    "argv",
    "env",
    "dirs",
    "memory",
    "timeout",
    "http_port",
    "http_host",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, exc: errors.NovaError) -> web.Response:
    return web.json_response(
        {"error": exc.message, "kind": type(exc).__name__, "exit_code": exc.exit_code},
        status=status,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except NotFound as exc:
        return _error(404, exc)
    except Conflict as exc:
        return _error(409, exc)
    except errors.ModuleNotFound as exc:
        return _error(404, exc)
    except (errors.UsageError, errors.InvalidModule, errors.UnsupportedImports) as exc:
        return _error(400, exc)
    except StoreError as exc:
        return _error(503, exc)
    except errors.NovaError as exc:
        return _error(500, exc)


def parse_create(body: Any) -> RunSpec:
    """Validate a create request. Sizes and durations accept `64Mi` / `5s` or numbers."""
    if not isinstance(body, dict):
        raise errors.UsageError("request body must be a JSON object")
    unknown = set(body) - _CREATE_FIELDS
    if unknown:
        raise errors.UsageError(f"unknown field(s) in request: {', '.join(sorted(unknown))}")
    module = body.get("module")
    if not isinstance(module, str) or not module:
        raise errors.UsageError("field 'module' (path of a .wasm file) is required")
    env = body.get("env", {})
    env_pairs = tuple(env.items()) if isinstance(env, dict) else tuple(tuple(p) for p in env)
    memory = body.get("memory")
    timeout = body.get("timeout")
    http_port = body.get("http_port")
    if http_port is not None and not (isinstance(http_port, int) and 0 < http_port < 65536):
        raise errors.UsageError(f"invalid http_port {http_port!r}: expected 1-65535")
    argv = body.get("argv") or [os.path.basename(module)]
    return RunSpec(
        id="",
        name=str(body.get("name") or ""),
        digest="",
        artifact="",
        module_path=os.path.abspath(module),
        argv=tuple(str(a) for a in argv),
        env=tuple((str(k), str(v)) for k, v in env_pairs),
        dirs=tuple(DirMount.parse(d) for d in body.get("dirs", [])),
        memory_bytes=parse_size(memory, what="memory") if isinstance(memory, str) else memory,
        timeout_s=parse_duration(timeout, what="timeout") if isinstance(timeout, str) else timeout,
        http_port=http_port,
        http_host=str(body.get("http_host") or "127.0.0.1"),
    )


async def health(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    return web.json_response(
        {"ok": True, "node": request.app[NODE], "pid": os.getpid(), "active": len(manager.list())}
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def create(request: web.Request) -> web.Response:
    request_ns = time.monotonic_ns()
    try:
        body = await request.json()
    except ValueError:
        raise errors.UsageError("request body is not valid JSON") from None
    record = await request.app[MANAGER].create(parse_create(body), request_ns=request_ns)
    return web.json_response(record.summary(), status=201)


async def list_containers(request: web.Request) -> web.Response:
    include_all = request.query.get("all", "") in ("1", "true", "yes")
    records = request.app[MANAGER].list(include_exited=include_all)
    return web.json_response([r.summary() for r in records])


async def get_container(request: web.Request) -> web.Response:
    return web.json_response(request.app[MANAGER].get(request.match_info["ref"]).summary())


async def stop_container(request: web.Request) -> web.Response:
    grace = float(request.query.get("grace", "2"))
    record = await request.app[MANAGER].stop(request.match_info["ref"], grace_s=grace)
    return web.json_response(record.summary())


async def wait_container(request: web.Request) -> web.Response:
    record = await request.app[MANAGER].wait(request.match_info["ref"])
    return web.json_response(record.summary())


async def remove_container(request: web.Request) -> web.Response:
    await request.app[MANAGER].remove(request.match_info["ref"])
    return web.json_response({"removed": request.match_info["ref"]})


async def container_logs(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER]
    ref = request.match_info["ref"]
    manager.get(ref)  # 404 before the stream starts
    follow = request.query.get("follow", "") in ("1", "true", "yes")
    stream = request.query.get("stream", "stdout")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    chunks = manager.logs(ref, stream, follow=follow)
    first = True
    async for chunk in chunks:
        if first:
            await response.prepare(request)
            first = False
        await response.write(chunk)
    if first:
        await response.prepare(request)
    await response.write_eof()
    return response


def make_app(*, manager: ContainerManager, metrics_: AgentMetrics, node: str) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[MANAGER] = manager
    app[METRICS] = metrics_
    app[NODE] = node
    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/containers", create)
    app.router.add_get("/v1/containers", list_containers)
    app.router.add_get("/v1/containers/{ref}", get_container)
    app.router.add_post("/v1/containers/{ref}/stop", stop_container)
    app.router.add_get("/v1/containers/{ref}/wait", wait_container)
    app.router.add_get("/v1/containers/{ref}/logs", container_logs)
    app.router.add_delete("/v1/containers/{ref}", remove_container)
    return app


def make_metrics_app(metrics_: AgentMetrics) -> web.Application:
    """Only /metrics, for a TCP listener Prometheus can scrape."""
    app = web.Application()
    app[METRICS] = metrics_
    app.router.add_get("/metrics", metrics)
    return app
