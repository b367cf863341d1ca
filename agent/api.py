"""The agent's local HTTP API (aiohttp), served on a unix socket.

    GET    /v1/health                          liveness and identity
    GET    /metrics                            Prometheus exposition
    POST   /v1/containers                      create + start   (body: see parse_create;
                                               {"image": REF} instead of "module" in a cluster)
    GET    /v1/containers[?all=1]              list (running, or all)
    GET    /v1/containers/{ref}                one container
    POST   /v1/containers/{ref}/stop[?grace=S] stop, return the final record
    GET    /v1/containers/{ref}/wait           block until it exits
    GET    /v1/containers/{ref}/logs?stream=stdout|stderr&follow=1
    DELETE /v1/containers/{ref}                forget an exited container
    /v1/volumes...                             encrypted volumes (agent/volumes_api.py)
    GET    /v1/policies, POST /v1/policies/test network policy (agent/netpol/api.py)

Errors are JSON: {"error": "<one line for users>", "kind": "<class>", "exit_code": N}.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import volumes_api
from agent.containers import Conflict, ContainerManager, NotFound
from agent.isolation.cgroups import parse_millicores
from agent.isolation.volumes import VolumeManager
from agent.metrics import AgentMetrics
from agent.netpol.api import register_routes as register_policy_routes
from agent.netpol.engine import PolicyEngine
from agent.netpol.selectors import label_key_problem, label_value_problem
from agent.sandbox.spec import DirMount, Isolation, RunSpec
from nova import errors
from nova.store import StoreError
from nova.units import parse_duration, parse_size

log = logging.getLogger("nova.agent.api")


class ClusterHooks(Protocol):
    """What the API needs of an agent in a cluster (`nova-agent --consul`)."""

    def describe(self) -> dict[str, Any]: ...
    async def image_path(self, ref: str) -> str: ...


MANAGER = web.AppKey("manager", ContainerManager)
METRICS = web.AppKey("metrics", AgentMetrics)
NODE = web.AppKey("node", str)
CLUSTER = web.AppKey("cluster", ClusterHooks)

_CREATE_FIELDS = {
    "labels",
    "module",
    "name",
    "argv",
    "env",
    "dirs",
    "memory",
    "timeout",
    "http_port",
    "http_host",
    "cpu",
    "pids",
    "isolation",
    "namespace",
    "volumes",
}

# Names travel in API paths and appear in `nova ps`: keep them to a safe alphabet.
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")

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
    except web.HTTPException:
        raise  # aiohttp's own answers (unknown route, wrong method)
    except Exception as exc:  # a bug: log it whole, answer in the API's format
        log.exception("internal error serving %s %s", request.method, request.path)
        return _error(500, errors.NovaError(f"internal error in the agent: {exc!r}; see its log"))


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
    name = body.get("name") or ""
    if not isinstance(name, str) or (name and not _NAME.fullmatch(name)):
        raise errors.UsageError(
            f"invalid name {name!r}: use up to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    argv = body.get("argv") or [os.path.basename(module)]
    if not _is_str_list(argv):
        raise errors.UsageError("field 'argv' must be a list of strings")
    env = body.get("env", {})
    env_pairs = list(env.items()) if isinstance(env, dict) else env
    if not isinstance(env_pairs, list) or not all(
        isinstance(p, list | tuple) and len(p) == 2 and _is_str_list(list(p)) for p in env_pairs
    ):
        raise errors.UsageError(
            "field 'env' must map names to string values, or be a list of [name, value]"
        )
    for env_name, _ in env_pairs:
        if not env_name or "=" in env_name or "\0" in env_name:
            raise errors.UsageError(f"invalid environment variable name {env_name!r}")
    dirs = body.get("dirs", [])
    if not _is_str_list(dirs):
        raise errors.UsageError("field 'dirs' must be a list of HOST[:GUEST][:ro] strings")
    http_port = body.get("http_port")
    if http_port is not None and not (_is_number(http_port, int) and 0 < http_port < 65536):
        raise errors.UsageError(f"invalid http_port {http_port!r}: expected 1-65535")
    http_host = body.get("http_host") or "127.0.0.1"
    if not isinstance(http_host, str):
        raise errors.UsageError(f"invalid http_host {http_host!r}: expected an address")
    cpu = _cpu_field(body.get("cpu"))
    pids = body.get("pids")
    if pids is not None and not (_is_number(pids, int) and pids >= 1):
        raise errors.UsageError(f"invalid pids {pids!r}: expected a whole number of at least 1")
    isolation_text = body.get("isolation")
    if isolation_text is None:
        isolation_text = Isolation.AUTO.value
    if not isinstance(isolation_text, str):
        raise errors.UsageError(f"invalid isolation {isolation_text!r}: expected auto or none")
    isolation = Isolation.parse(isolation_text)
    namespace, volumes = volumes_api.parse_run_fields(body)
    labels = _labels_field(body.get("labels", {}))
    if isolation is Isolation.NONE and (cpu is not None or pids is not None):
        raise errors.UsageError(
            "cpu and pids limits need a cgroup, and isolation 'none' has none: "
            "drop one or the other"
        )
    return RunSpec(
        id="",
        name=name,
        digest="",
        artifact="",
        module_path=os.path.abspath(module),
        argv=tuple(argv),
        env=tuple((k, v) for k, v in env_pairs),
        dirs=tuple(DirMount.parse(d) for d in dirs),
        memory_bytes=_size_field(body.get("memory")),
        timeout_s=_duration_field(body.get("timeout")),
        http_port=http_port,
        http_host=http_host,
        cpu_millicores=cpu,
        pids_max=pids,
        isolation=isolation,
        namespace=namespace,
        volumes=volumes,
        labels=labels,
    )


def _labels_field(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise errors.UsageError("field 'labels' must map label keys to string values")
    for key, label in value.items():
        problem = label_key_problem(key) or label_value_problem(label)
        if problem is not None:
            raise errors.UsageError(problem)
    return tuple(sorted(value.items()))


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_number(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _size_field(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_size(value, what="memory")
    if not _is_number(value, int) or value < 1:
        raise errors.UsageError(f"invalid memory {value!r}: expected bytes (>= 1) or e.g. '64Mi'")
    return int(value)


def _cpu_field(value: Any) -> int | None:
    """CPU as Kubernetes writes it: '500m' or '0.5' (a string), or a number of cores."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_millicores(value)
    if not _is_number(value, (int, float)) or not 0.001 <= value < 1e6:
        raise errors.UsageError(
            f"invalid cpu {value!r}: expected cores (at least 0.001) or e.g. '500m'"
        )
    return round(float(value) * 1000)


def _duration_field(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_duration(value, what="timeout")
    if not _is_number(value, (int, float)) or not 0 < value < float("inf"):
        raise errors.UsageError(f"invalid timeout {value!r}: expected seconds (> 0) or e.g. '5s'")
    return float(value)


async def health(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    body: dict[str, Any] = {
        "ok": True, "node": request.app[NODE], "pid": os.getpid(), "active": len(manager.list())
    }  # fmt: skip
    if CLUSTER in request.app:
        body["cluster"] = request.app[CLUSTER].describe()
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def create(request: web.Request) -> web.Response:
    request_ns = time.monotonic_ns()
    try:
        body = await request.json()
    except ValueError:
        raise errors.UsageError("request body is not valid JSON") from None
    if isinstance(body, dict) and "image" in body:
        body = await _image_to_module(request.app, body)
    spec = await volumes_api.resolve_run(request.app, parse_create(body))
    record = await request.app[MANAGER].create(spec, request_ns=request_ns)
    return web.json_response(record.summary(), status=201)


async def _image_to_module(app: web.Application, body: dict[str, Any]) -> dict[str, Any]:
    """`{"image": REF}` -> `{"module": <the fetched, verified file>}`; needs --consul."""
    ref = body.pop("image")
    if "module" in body:
        raise errors.UsageError("give either 'module' or 'image', not both")
    if not isinstance(ref, str):
        raise errors.UsageError(f"invalid image {ref!r}: expected NAME:TAG or sha256:…")
    if CLUSTER not in app:
        raise errors.UsageError(
            "images live in the cluster: this agent runs --standalone; "
            "start it with --consul URL (or run a .wasm file)"
        )
    body["module"] = await app[CLUSTER].image_path(ref)
    stem = "app" if ref.startswith("sha256:") else ref.partition(":")[0]
    body.setdefault("argv", [stem])
    if not body.get("name"):
        body["name"] = f"{stem}-{secrets.token_hex(3)}"
    return body


async def list_containers(request: web.Request) -> web.Response:
    include_all = request.query.get("all", "") in ("1", "true", "yes")
    records = request.app[MANAGER].list(include_exited=include_all)
    return web.json_response([r.summary() for r in records])


async def get_container(request: web.Request) -> web.Response:
    return web.json_response(request.app[MANAGER].get(request.match_info["ref"]).summary())


async def stop_container(request: web.Request) -> web.Response:
    try:
        grace = float(request.query.get("grace", "2"))
    except ValueError:
        raise errors.UsageError("invalid grace: expected seconds, e.g. 2.5") from None
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


def make_app(
    *,
    manager: ContainerManager,
    metrics_: AgentMetrics,
    node: str,
    cluster: ClusterHooks | None = None,
    volumes: VolumeManager | None = None,
    policy_engine: PolicyEngine | None = None,
) -> web.Application:
    app = web.Application(middlewares=[error_middleware, volumes_api.error_middleware])
    if cluster is not None:
        app[CLUSTER] = cluster
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
    volumes_api.register(app, volumes)
    register_policy_routes(app, policy_engine)  # /v1/policies, /v1/policies/test
    return app


def make_metrics_app(metrics_: AgentMetrics) -> web.Application:
    """Only /metrics, for a TCP listener Prometheus can scrape."""
    app = web.Application()
    app[METRICS] = metrics_
    app.router.add_get("/metrics", metrics)
    return app
