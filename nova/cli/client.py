"""A small client for the agent's local API over its unix socket."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

from nova import errors, paths

# Creating or waiting on a container may take long (a first compile, a long run).
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5)


def agent_listening(path: Path) -> bool:
    """True when an agent accepts connections on the socket (cheap, synchronous)."""
    return paths.socket_answers(path)


class AgentClient:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=_TIMEOUT, base_url="http://nova-agent"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use AgentClient as an async context manager"
        return self._session

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        try:
            async with self.session.request(method, path, **kw) as response:
                data = await _body(response)
                if response.status >= 400:
                    raise _error_from(data)
                return data
        except aiohttp.ClientConnectionError as exc:
            raise errors.AgentUnavailable(
                f"cannot reach the agent at {self.socket_path}: {exc}"
            ) from None

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", "/v1/health")
        return result

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("POST", "/v1/containers", json=body)
        return result

    async def list(self, *, include_all: bool) -> list[dict[str, Any]]:
        params = {"all": "1"} if include_all else {}
        result: list[dict[str, Any]] = await self._json("GET", "/v1/containers", params=params)
        return result

    async def get(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", _container(ref))
        return result

    async def stop(self, ref: str, grace_s: float) -> dict[str, Any]:
        result: dict[str, Any] = await self._json(
            "POST", _container(ref, "stop"), params={"grace": str(grace_s)}
        )
        return result

    async def wait(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", _container(ref, "wait"))
        return result

    async def remove(self, ref: str) -> None:
        await self._json("DELETE", _container(ref))

    async def logs(self, ref: str, stream: str, *, follow: bool) -> AsyncIterator[bytes]:
        params = {"stream": stream, "follow": "1" if follow else "0"}
        try:
            async with self.session.get(_container(ref, "logs"), params=params) as response:
                if response.status >= 400:
                    raise _error_from(await _body(response))
                async for chunk in response.content.iter_any():
                    yield chunk
        except aiohttp.ClientConnectionError as exc:
            raise errors.AgentUnavailable(f"lost the agent at {self.socket_path}: {exc}") from None


def _container(ref: str, action: str = "") -> str:
    """The API path of a container; `ref` is quoted, whatever the user typed."""
    path = f"/v1/containers/{urllib.parse.quote(ref, safe='')}"
    return f"{path}/{action}" if action else path


async def _body(response: aiohttp.ClientResponse) -> Any:
    """The JSON body; for anything else (a proxy, a crash page) an error dict."""
    try:
        return await response.json(content_type=None)
    except ValueError:
        return {"error": f"the agent answered {response.status} {response.reason}"}


def _error_from(data: Any) -> errors.NovaError:
    message = data.get("error", "the agent refused the request") if isinstance(data, dict) else ""
    kind = data.get("kind", "") if isinstance(data, dict) else ""
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.NovaError):
        return cls(message)
    error = errors.NovaError(message or "the agent refused the request")
    if isinstance(data, dict) and isinstance(data.get("exit_code"), int):
        error.exit_code = data["exit_code"]
    return error
