"""The CGI/1.1 (RFC 3875) mapping of HTTP workloads (WAGI): pure, no I/O.

A request becomes the guest's environment (`cgi_env`); what the guest
wrote to stdout becomes the HTTP response (`parse_cgi_response`, and
`http_response` for a guest that failed). agent/sandbox/wagi.py runs the
guest and serves HTTP around these.

The ABI, as the guest sees it (examples/apps/http-hello.c is a handler):

  environment  the container's own env (spec.env), overridden by the CGI
               meta-variables of the request: REQUEST_METHOD, PATH_INFO
               (%-decoded), QUERY_STRING (as sent), SCRIPT_NAME (""),
               SERVER_NAME, SERVER_PORT, SERVER_PROTOCOL, SERVER_SOFTWARE,
               GATEWAY_INTERFACE (CGI/1.1), REMOTE_ADDR, REMOTE_HOST,
               CONTENT_LENGTH, CONTENT_TYPE, X_FULL_URL, and HTTP_<NAME> per
               request header (repeats joined by ", ", Cookie by "; ";
               Content-Type/-Length only as CONTENT_*; headers named other
               than [A-Za-z0-9-] and `Proxy` (httpoxy) are not passed)
  argv         spec.argv, or [spec.name]
  stdin        the request body (CONTENT_LENGTH bytes, then EOF)
  stdout       the response: CGI header lines (`Content-Type`, `Status: NNN
               reason`, `Location`, any other header passed through), each
               ended by "\\n" or "\\r\\n", an empty line, then the body. No
               Status means 200, or 302 with a Location. Hop-by-hop headers
               and Content-Length are dropped: the server frames the body.
  stderr       the worker's fd 2: the container's log

Outcomes: CGI output -> that response (whatever the exit code); output that
is not CGI -> 502; a trap -> 500; a request running past spec.timeout_s
(per request, by epoch interruption) -> 504. A guest blocked in a host call
(a long sleep) cannot be interrupted: past its deadline plus a grace the
worker's watchdog ends the container, as for a run-once container.
"""

from __future__ import annotations

import enum
import http
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

SERVER_SOFTWARE = "Nova-WAGI/1"
MAX_HEADER_BYTES = 64 << 10  # of the guest's CGI header section

# -- the request side: CGI meta-variables ------------------------------------------

_passed_header_name = re.compile(r"[A-Za-z0-9-]+").fullmatch
_NOT_PASSED = frozenset({"content-type", "content-length", "proxy"})
_ABSOLUTE_FORM = ("http://", "https://")


class BadRequest(ValueError):
    """The request cannot be expressed as CGI meta-variables (e.g. NUL in the path)."""


class CgiRequest(NamedTuple):
    """What the env is built from: an HTTP request as the server received it."""

    method: str
    target: str  # the request-target as sent: "/path?query" (or absolute-form)
    headers: Sequence[tuple[str, str]]
    body_length: int
    remote_addr: str
    server_host: str  # the address the server listens on
    server_port: int
    protocol: str = "HTTP/1.1"
    scheme: str = "http"


def split_target(target: str) -> tuple[str, str]:
    """(PATH_INFO, QUERY_STRING) of a request-target: the path %-decoded, the query as sent."""
    if target.startswith(_ABSOLUTE_FORM):  # drop scheme and authority
        rest = target.partition("://")[2]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        target = rest[cut:]
        if not target.startswith("/"):
            target = "/" + target
    raw_path, _, query = target.partition("?")
    path = urllib.parse.unquote(raw_path, errors="replace")
    if "\0" in path:
        raise BadRequest("the path contains a NUL byte (%00)")
    return path, query


def _host_name(host: str) -> str:
    """The name part of a Host header value ("[::1]:8080" -> "[::1]", "a:80" -> "a")."""
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.partition(":")[0]


def cgi_env(
    request: CgiRequest, base_env: Mapping[str, str] | Iterable[tuple[str, str]] = ()
) -> dict[str, str]:
    """The guest's environment: `base_env` overridden by the request's CGI meta-variables."""
    path, query = split_target(request.target)
    passed: dict[str, str] = {}
    content_type = host = ""
    for name, value in request.headers:
        lower = name.lower()
        if lower in _NOT_PASSED or not _passed_header_name(name):
            if lower == "content-type":
                content_type = value
            continue
        if lower == "host":
            host = value
        key = "HTTP_" + name.upper().replace("-", "_")
        if key in passed:
            passed[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value
        else:
            passed[key] = value
    server_host = request.server_host
    port = str(request.server_port)
    if request.target.startswith(_ABSOLUTE_FORM):
        full_url = request.target
    else:
        authority = host or (
            f"[{server_host}]:{port}" if ":" in server_host else f"{server_host}:{port}"
        )
        full_url = f"{request.scheme}://{authority}{request.target}"
    env = dict(base_env)
    env["GATEWAY_INTERFACE"] = "CGI/1.1"
    env["SERVER_SOFTWARE"] = SERVER_SOFTWARE
    env["SERVER_PROTOCOL"] = request.protocol
    env["SERVER_NAME"] = _host_name(host) if host else server_host
    env["SERVER_PORT"] = port
    env["REQUEST_METHOD"] = request.method
    env["SCRIPT_NAME"] = ""
    env["PATH_INFO"] = path
    env["QUERY_STRING"] = query
    env["X_FULL_URL"] = full_url
    env["REMOTE_ADDR"] = env["REMOTE_HOST"] = request.remote_addr
    env["CONTENT_LENGTH"] = str(request.body_length)
    env["CONTENT_TYPE"] = content_type
    env.update(passed)
    return env


# -- the response side: CGI output -> HTTP response ---------------------------------

_field_name = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch  # RFC 9110 token
_STATUS, _LOCATION = b"status", b"location"
_DROPPED = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
        b"trailer", b"upgrade", b"content-length",
    }
)  # fmt: skip
_SPECIAL = _DROPPED | {_STATUS, _LOCATION}
_NO_BODY = frozenset({204, 304})
_PHRASES = {int(s): s.phrase for s in http.HTTPStatus}


class BadCgiOutput(ValueError):
    """The guest's stdout is not a CGI response; the message says why."""


class CgiResponse(NamedTuple):
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _header_end(output: bytes) -> tuple[int, int]:
    """(end of the header lines, start of the body), or raise."""
    if output.startswith((b"\n", b"\r\n")):
        raise BadCgiOutput("no header lines before the blank line")
    lf = output.find(b"\n\n", 0, MAX_HEADER_BYTES)
    crlf = output.find(b"\n\r\n", 0, MAX_HEADER_BYTES)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, crlf + 3
    if lf >= 0:
        return lf, lf + 2
    if not output:
        raise BadCgiOutput("no output")
    where = "in its first 64 KiB" if len(output) >= MAX_HEADER_BYTES else "after the header lines"
    raise BadCgiOutput(f"no blank line {where}")


def _status(value: bytes) -> tuple[int, str]:
    code, _, reason = value.partition(b" ")
    if len(code) != 3 or not code.isdigit() or not 200 <= int(code) <= 599:
        raise BadCgiOutput(f"invalid Status {value[:40]!r}: expected a code 200-599 and a reason")
    status = int(code)
    text = reason.strip().decode("utf-8", "replace")
    if not text:
        text = _PHRASES.get(status, "")
    return status, text


def parse_cgi_response(output: bytes) -> CgiResponse:
    """A CGI response (RFC 3875 §6) from the guest's stdout; raises BadCgiOutput."""
    head_end, body_start = _header_end(output)
    status: tuple[int, str] | None = None
    location = False
    headers: list[tuple[str, str]] = []
    for number, line in enumerate(output[:head_end].split(b"\n"), start=1):
        name, colon, value = line.partition(b":")
        if not colon or not _field_name(name):
            shown = line.rstrip(b"\r")[:40].decode("utf-8", "replace")
            raise BadCgiOutput(f"header line {number} is not 'Name: value': {shown!r}")
        value = value.strip(b" \t\r")
        if b"\r" in value or b"\0" in value:
            raise BadCgiOutput(f"header line {number} has a control character in its value")
        lower = name.lower()
        if lower in _SPECIAL:
            if lower == _STATUS:
                status = _status(value)
                continue
            if lower != _LOCATION:
                continue  # hop-by-hop, or framing: the server's business
            location = True
        headers.append((name.decode(), value.decode("utf-8", "replace")))
    code, reason = status if status else ((302, "Found") if location else (200, "OK"))
    body = b"" if code in _NO_BODY else output[body_start:]
    return CgiResponse(code, reason, tuple(headers), body)


class GuestOutcome(enum.Enum):
    EXITED = "exited"  # returned from _start or called proc_exit
    TRAPPED = "trapped"
    TIMED_OUT = "timed out"
    FAILED = "failed"  # could not be instantiated


class GuestResult(NamedTuple):
    """How one request's instance ended, and what it wrote to stdout."""

    outcome: GuestOutcome
    exit_code: int = 0
    output: bytes = b""
    message: str = ""  # a trap's message; for EXITED, why the output is unusable


def error_response(status: int, detail: str) -> CgiResponse:
    """A short text/plain response for errors the server itself reports."""
    reason = http.HTTPStatus(status).phrase
    body = f"{status} {reason}: {detail}\n".encode()
    return CgiResponse(status, reason, (("Content-Type", "text/plain; charset=utf-8"),), body)


def http_response(result: GuestResult, timeout_s: float | None) -> CgiResponse:
    """The HTTP response for a request's GuestResult (500 / 502 / 504 for failures)."""
    if result.outcome is GuestOutcome.TIMED_OUT:
        return error_response(504, f"the handler ran past its timeout of {timeout_s:g}s")
    if result.outcome is GuestOutcome.TRAPPED:
        return error_response(500, f"the handler trapped ({result.message})")
    if result.outcome is GuestOutcome.FAILED:
        return error_response(500, f"the handler could not start ({result.message})")
    try:
        if result.message:
            raise BadCgiOutput(result.message)
        return parse_cgi_response(result.output)
    except BadCgiOutput as exc:
        exited = f"; it exited with code {result.exit_code}" if result.exit_code else ""
        return error_response(502, f"the handler's output is not a CGI response: {exc}{exited}")
