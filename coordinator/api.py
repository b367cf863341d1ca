"""The cluster API every coordinator serves (aiohttp, JSON), leader or standby.

    GET  /v1/status        leader (id, API, epoch = LockIndex), this coordinator's
                           role, nodes (health, capacity, assigned replicas),
                           deployments, and the leader's last placement pass
    GET  /v1/placement     the leader's last placement pass alone (cheap to poll);
                           ?counts=1 adds replicas per node (a standby's status asks
                           the leader for them rather than reading every assignment)
    GET  /v1/deployments   every deployment spec
    POST /v1/deployments   create or update one (body: a deployment without
                           "generation"; without "digest", "image" NAME:TAG is
                           resolved to the digest it names now); 201 created,
                           200 updated or unchanged
    DELETE /v1/deployments/{namespace}/{name}   remove one: its replicas stop

Deployments are desired state, not leader writes: any coordinator stores
them (compare-and-set on the key), and the leader's placement loop sees
them through its watch. Errors: {"error": "<one line>"} with 400/409/503.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from coordinator.leader import LeaderElection
from coordinator.placer import Placer
from coordinator.state import DeploymentSpec, RecordError
from nova import errors
from nova.images import ImageNotFound, ImageRef, resolve
from nova.store import KVEntry, Store, StoreError, keys

log = logging.getLogger("nova.coordinator.api")

STORE = web.AppKey("store", Store)
ELECTION = web.AppKey("election", LeaderElection)
PLACER = web.AppKey("placer", Placer)

LEADER_TIMEOUT = 2.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (RecordError, ValueError) as exc:
        return _error(400, str(exc))
    except ImageNotFound as exc:
        return _error(404, exc.message)
    except errors.NovaError as exc:  # an invalid image reference, a corrupt tag
        return _error(400, exc.message)
    except StoreError as exc:
        return _error(503, f"the store is unavailable: {exc}")


def _count_containers(entry: KVEntry) -> int:
    try:
        containers = entry.json().get("containers", {})
    except (ValueError, AttributeError):
        return 0
    return len(containers) if isinstance(containers, dict) else 0


async def _leader_counts(leader_entry: KVEntry | None) -> dict[str, int] | None:
    """Replicas per node from the leader's memory (None if it does not answer in time)."""
    if leader_entry is None or leader_entry.session is None:
        return None
    try:
        api = leader_entry.json().get("api")
        timeout = aiohttp.ClientTimeout(total=LEADER_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{api}/v1/placement", params={"counts": "1"}) as response,
        ):
            body = await response.json()
        counts = body.get("counts")
        if isinstance(counts, dict):
            return {str(k): int(v) for k, v in counts.items()}
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError, TypeError):
        pass
    return None


async def _stored_counts(store: Store) -> dict[str, int]:
    return {
        keys.split(e.key, keys.ASSIGNMENTS)[0]: _count_containers(e)
        for e in await store.list(keys.ASSIGNMENTS)
    }


async def status(request: web.Request) -> web.Response:
    store, election, placer = request.app[STORE], request.app[ELECTION], request.app[PLACER]
    leader_entry, node_entries, spec_keys = await asyncio.gather(
        store.get(election.key), store.list(keys.NODES), store.list(keys.DEPLOYMENTS)
    )
    if election.acting and placer.last is not None:
        assigned = placer.counts()  # the leader knows; at 1M replicas reading them is costly
    else:
        assigned = await _leader_counts(leader_entry) or await _stored_counts(store)
    nodes = []
    for entry in node_entries:
        name = keys.split(entry.key, keys.NODES)[0]
        try:
            value = entry.json()
        except ValueError:
            value = {}
        value = value if isinstance(value, dict) else {}
        nodes.append(
            {
                "node": name,
                "healthy": entry.session is not None,
                "address": value.get("address"),
                "capacity": value.get("capacity"),
                "labels": value.get("labels", {}),
                "assigned": assigned.get(name, 0),
            }
        )
    leader: dict[str, Any] = {"id": None, "api": None, "epoch": 0}
    if leader_entry is not None:
        leader["epoch"] = leader_entry.lock_index
        if leader_entry.session is not None:
            with_value = leader_entry.json() if leader_entry.value else {}
            leader |= {"id": with_value.get("id"), "api": with_value.get("api")}
    body = {
        "leader": leader,
        "coordinator": election.describe(),
        "nodes": nodes,
        "deployments": len(spec_keys),
        "replicas_assigned": sum(assigned.values()),
        "last_pass": placer.last.to_json() if placer.last and election.acting else None,
    }
    return web.json_response(body)


async def placement(request: web.Request) -> web.Response:
    election, placer = request.app[ELECTION], request.app[PLACER]
    acting = election.acting
    last = placer.last.to_json() if placer.last and acting else None
    body: dict[str, Any] = {"coordinator": election.id, "acting": acting, "last_pass": last}
    if acting and placer.last is not None and request.query.get("counts"):
        body["counts"] = placer.counts()  # standbys answer `nova status` with these
    return web.json_response(body)


async def list_deployments(request: web.Request) -> web.Response:
    entries = await request.app[STORE].list(keys.DEPLOYMENTS)
    specs = []
    for entry in entries:
        try:
            specs.append(DeploymentSpec.from_json(entry.json(), entry.key).to_json())
        except (RecordError, ValueError) as exc:
            log.warning("skipping %s", exc)
    return web.json_response({"deployments": specs})


async def put_deployment(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        return _error(400, f"the request body is not JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object")
    body.pop("generation", None)
    store = request.app[STORE]
    try:  # names first: a bad name is the error to report, whatever the image
        keys.deployment(str(body.get("namespace", "")), str(body.get("name", "")))
    except ValueError as exc:
        raise RecordError(f"deployment: {exc}") from None
    if not body.get("digest"):
        image = body.get("image")
        if not isinstance(image, str) or not image:
            raise RecordError("deployment: give an image (NAME:TAG or sha256:…)")
        body["digest"] = await resolve(store, ImageRef.parse(image))
    spec = DeploymentSpec.from_json(body, "deployment")
    for _ in range(5):  # compare-and-set; retry when another writer got there first
        current = await store.get(spec.key)
        generation = 1
        if current is not None:
            try:
                old = DeploymentSpec.from_json(current.json(), current.key)
            except (RecordError, ValueError):
                old = None
            if old is not None and old.same_spec(spec):
                return web.json_response({"deployment": old.to_json(), "changed": False})
            generation = (old.generation if old else 0) + 1
        new = DeploymentSpec(**(spec.to_json() | {"generation": generation}))
        cas = current.modify_index if current is not None else 0
        if await store.put_json(spec.key, new.to_json(), cas=cas):
            status_code = 201 if current is None else 200
            return web.json_response(
                {"deployment": new.to_json(), "changed": True}, status=status_code
            )
    return _error(409, f"deployment {spec.namespace}/{spec.name} keeps changing; try again")


async def delete_deployment(request: web.Request) -> web.Response:
    key = keys.deployment(request.match_info["namespace"], request.match_info["name"])
    store = request.app[STORE]
    if await store.get(key) is None:
        return _error(404, f"no deployment {key.removeprefix(keys.DEPLOYMENTS)}")
    await store.delete(key)
    return web.json_response({"deleted": key.removeprefix(keys.DEPLOYMENTS)})


def make_app(store: Store, election: LeaderElection, placer: Placer) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=1 << 20)
    app[STORE] = store
    app[ELECTION] = election
    app[PLACER] = placer
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/placement", placement)
    app.router.add_get("/v1/deployments", list_deployments)
    app.router.add_post("/v1/deployments", put_deployment)
    app.router.add_delete("/v1/deployments/{namespace}/{name}", delete_deployment)
    return app
