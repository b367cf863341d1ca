"""The agent API's network-policy routes.

    GET  /v1/policies        the engine's status: backend, generation, origins, errors
    POST /v1/policies/test   {"from": A, "to": B, "port": P, "protocol": "TCP"}:
                             the verdict on a new connection from A to B, and why.
                             A and B are container names, ids (or unique id prefixes)
                             or IPv4 addresses.

Errors are the agent's JSON errors: {"error", "kind", "exit_code"}. Without a
policy engine (policy disabled) both routes answer 503 saying so.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agent.netpol.engine import PolicyEngine
from agent.netpol.model import PROTOCOLS
from nova import errors

ENGINE = web.AppKey("policy_engine", PolicyEngine)
_TEST_FIELDS = frozenset({"from", "to", "port", "protocol"})


def register_routes(app: web.Application, engine: PolicyEngine | None) -> None:
    """Add the policy routes to the agent's app (`engine` None: policy is off)."""
    if engine is not None:
        app[ENGINE] = engine
    app.router.add_get("/v1/policies", policy_status)
    app.router.add_post("/v1/policies/test", policy_test)


def _error(status: int, exc: errors.NovaError) -> web.Response:
    return web.json_response(
        {"error": exc.message, "kind": type(exc).__name__, "exit_code": exc.exit_code},
        status=status,
    )


def _engine(request: web.Request) -> PolicyEngine | None:
    return request.app.get(ENGINE)


_DISABLED = errors.NovaError(
    "network policy is not enabled on this agent (it needs per-container networks, see "
    "nova-agent --network, and a --policy-backend other than none)"
)


async def policy_status(request: web.Request) -> web.Response:
    engine = _engine(request)
    if engine is None:
        return _error(503, _DISABLED)
    return web.json_response(engine.status())


async def policy_test(request: web.Request) -> web.Response:
    engine = _engine(request)
    if engine is None:
        return _error(503, _DISABLED)
    try:
        body = await request.json()
    except ValueError:
        return _error(400, errors.UsageError("request body is not valid JSON"))
    try:
        src, dst, protocol_name, port = parse_test(body)
        src_ip, dst_ip = engine.resolve(src), engine.resolve(dst)
        explanation = engine.explain(str(src_ip), str(dst_ip), PROTOCOLS[protocol_name], port)
    except errors.UsageError as exc:
        return _error(400, exc)
    return web.json_response(
        {
            "from": {"ref": src, "ip": str(src_ip)},
            "to": {"ref": dst, "ip": str(dst_ip)},
            "protocol": protocol_name,
            "port": port,
            "generation": engine.status()["generation"],
            **explanation.to_dict(),
        }
    )


def parse_test(body: Any) -> tuple[str, str, str, int]:
    """(from, to, protocol name, port) of a test request; UsageError names the bad field."""
    if not isinstance(body, dict):
        raise errors.UsageError("request body must be a JSON object")
    unknown = set(body) - _TEST_FIELDS
    if unknown:
        raise errors.UsageError(f"unknown field(s) in request: {', '.join(sorted(unknown))}")
    src, dst = body.get("from"), body.get("to")
    if not isinstance(src, str) or not src or not isinstance(dst, str) or not dst:
        raise errors.UsageError("fields 'from' and 'to' (container names, ids or IPs) are required")
    port = body.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise errors.UsageError(f"invalid port {port!r}: expected 1-65535")
    protocol = body.get("protocol", "TCP")
    if not isinstance(protocol, str) or protocol.upper() not in PROTOCOLS:
        raise errors.UsageError(f"invalid protocol {protocol!r}: expected TCP, UDP or SCTP")
    return src, dst, protocol.upper(), port
