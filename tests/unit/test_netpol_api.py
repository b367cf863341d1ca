"""The policy routes of the agent API on a real aiohttp server, and `nova policy` against it."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.netpol.api import register_routes
from agent.netpol.engine import PolicyEngine
from agent.netpol.sources import DirectorySource
from tests.unit.netpol_helpers import BAD, DENY_A, A, B, C, RecordingBackend, write_atomically

ROOT = Path(__file__).resolve().parents[2]


async def serve(app: web.Application, socket_path: Path) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(socket_path)).start()
    return runner


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Path, Path, PolicyEngine]]:
    """(socket, policy dir, engine): an API server with a policy engine behind it."""
    policy_dir = tmp_path / "policies"
    os.mkdir(policy_dir)
    write_atomically(policy_dir / "deny.yaml", DENY_A)
    engine = PolicyEngine(RecordingBackend(), sources=[DirectorySource(policy_dir)])
    engine.set_endpoints([A, B, C], names={"web": A.key, "db": C.key})
    await engine.start()
    await engine.wait_applied()
    app = web.Application()
    register_routes(app, engine)
    socket_path = tmp_path / "agent.sock"
    runner = await serve(app, socket_path)
    yield socket_path, policy_dir, engine
    await runner.cleanup()
    await engine.close()


async def call(socket_path: Path, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, f"http://agent{path}", **kw) as response,
    ):
        return response.status, await response.json()


async def nova(socket_path: Path, *args: str) -> tuple[int, str, str]:
    """Run the real `nova` CLI against the server (its own process, its own loop)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nova.cli.main", "--socket", str(socket_path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_status_route(agent: tuple[Path, Path, PolicyEngine]) -> None:
    socket_path, policy_dir, _ = agent
    status, body = await call(socket_path, "GET", "/v1/policies")
    assert status == 200
    assert body["backend"] == "recording" and body["generation"] >= 1
    assert body["origins"] == [
        {
            "origin": str(policy_dir / "deny.yaml"),
            "policies": ["x/deny-a"],
            "loaded_at": body["origins"][0]["loaded_at"],
            "error": None,
        }
    ]


async def test_test_route_gives_verdict_and_reason(agent: tuple[Path, Path, PolicyEngine]) -> None:
    socket_path, _, engine = agent
    status, body = await call(
        socket_path, "POST", "/v1/policies/test", json={"from": "ep-b", "to": "web", "port": 80}
    )
    assert status == 200
    assert body["allowed"] is False
    assert body["from"] == {"ref": "ep-b", "ip": "10.0.1.2"}
    assert body["to"] == {"ref": "web", "ip": "10.0.1.1"}
    assert body["protocol"] == "TCP" and body["port"] == 80
    assert body["ingress"]["reason"].startswith("ep-a is isolated for ingress by x/deny-a")
    assert body["egress"]["reason"] == "no policy selects ep-b for egress: all allowed"
    assert body["generation"] == engine.status()["generation"]

    status, body = await call(
        socket_path,
        "POST",
        "/v1/policies/test",
        json={"from": "web", "to": "10.0.2.3", "port": 53, "protocol": "udp"},
    )
    assert (status, body["allowed"], body["protocol"]) == (200, True, "UDP")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"from": "web", "to": "db", "port": 0}, "invalid port 0: expected 1-65535"),
        ({"from": "web", "to": "db", "port": "80"}, "invalid port '80'"),
        ({"from": "web", "port": 80}, "fields 'from' and 'to'"),
        ({"from": "web", "to": "db", "port": 80, "protocol": "ICMP"}, "invalid protocol 'ICMP'"),
        ({"from": "web", "to": "db", "port": 80, "verbose": True}, "unknown field(s) in request"),
        ({"from": "ghost", "to": "db", "port": 80}, "'ghost' is neither an IPv4 address"),
        ([], "request body must be a JSON object"),
    ],
)
async def test_test_route_refuses_bad_requests(
    agent: tuple[Path, Path, PolicyEngine], body: Any, message: str
) -> None:
    status, answer = await call(agent[0], "POST", "/v1/policies/test", json=body)
    assert status == 400
    assert message in answer["error"] and answer["kind"] == "UsageError"
    assert answer["exit_code"] == 2


async def test_routes_without_an_engine_say_policy_is_off(tmp_path: Path) -> None:
    app = web.Application()
    register_routes(app, None)
    runner = await serve(app, tmp_path / "agent.sock")
    try:
        status, body = await call(tmp_path / "agent.sock", "GET", "/v1/policies")
        assert status == 503 and "network policy is not enabled" in body["error"]
        status, body = await call(
            tmp_path / "agent.sock", "POST", "/v1/policies/test", json={"from": "a"}
        )
        assert status == 503
    finally:
        await runner.cleanup()


async def test_nova_policy_status_and_test_commands(
    agent: tuple[Path, Path, PolicyEngine],
) -> None:
    socket_path, policy_dir, engine = agent
    code, out, _ = await nova(socket_path, "policy", "status")
    assert code == 0
    assert "backend     recording" in out
    assert f"{policy_dir / 'deny.yaml'}  ok" in out and "x/deny-a" in out

    write_atomically(policy_dir / "deny.yaml", BAD)
    for _ in range(200):
        if engine.status()["errors"]:
            break
        await asyncio.sleep(0.005)
    code, out, _ = await nova(socket_path, "policy", "status")
    assert code == 1
    assert "error: last good kept" in out
    assert (
        f"{policy_dir / 'deny.yaml'}:9: spec.ingress[0].ports[0].port: 70000 is not a port" in out
    )

    code, out, _ = await nova(socket_path, "policy", "test", "--from", "ep-b", "--to", "web",
                              "--port", "80")  # fmt: skip
    assert code == 1
    assert out.startswith("DENIED  ep-b (10.0.1.2) [identity")
    assert "DENY  ingress of web: ep-a is isolated for ingress by x/deny-a" in out

    code, out, _ = await nova(socket_path, "policy", "test", "--from", "web", "--to", "db",
                              "--port", "5432", "--json")  # fmt: skip
    assert code == 0
    assert '"allowed": true' in out

    code, _, err = await nova(socket_path, "policy", "test", "--from", "nope", "--to", "db",
                              "--port", "1")  # fmt: skip
    assert code == 2 and "'nope' is neither an IPv4 address nor a container" in err
