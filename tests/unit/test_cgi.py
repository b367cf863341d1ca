"""The CGI mapping: request -> CGI environment, CGI output -> HTTP response."""

from __future__ import annotations

import pytest

from agent.sandbox import cgi
from agent.sandbox.cgi import (
    BadCgiOutput,
    BadRequest,
    CgiRequest,
    GuestOutcome,
    GuestResult,
    cgi_env,
    http_response,
    parse_cgi_response,
    split_target,
)


def request(
    target: str = "/", headers: tuple[tuple[str, str], ...] = (), **kw: object
) -> CgiRequest:
    fields: dict[str, object] = {
        "method": "GET",
        "target": target,
        "headers": headers,
        "body_length": 0,
        "remote_addr": "10.0.0.7",
        "server_host": "127.0.0.1",
        "server_port": 8080,
    }
    fields.update(kw)
    return CgiRequest(**fields)  # type: ignore[arg-type]


# -- split_target -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/", "/", ""),
        ("/echo", "/echo", ""),
        ("/a%20b/c?x=1%202&y", "/a b/c", "x=1%202&y"),  # path decoded, query as sent
        ("/a+b?", "/a+b", ""),  # '+' is not a space in a path
        ("/caf%C3%A9", "/café", ""),
        ("/bad%FF", "/bad\ufffd", ""),  # not UTF-8: replaced, not rejected
        ("http://example.com/p?q=1", "/p", "q=1"),  # absolute-form (proxies)
        ("http://example.com", "/", ""),
        ("https://example.com:8443?q=1", "/", "q=1"),
        ("*", "*", ""),  # OPTIONS *
    ],
)
def test_split_target(target: str, path: str, query: str) -> None:
    assert split_target(target) == (path, query)


def test_split_target_rejects_nul_in_the_path() -> None:
    with pytest.raises(BadRequest, match="NUL"):
        split_target("/a%00b")


# -- cgi_env ------------------------------------------------------------------------


def test_cgi_env_has_every_meta_variable() -> None:
    env = cgi_env(
        request(
            "/env?a=1",
            (("Host", "app.example:8080"), ("User-Agent", "t")),
            method="POST",
            body_length=3,
        )
    )
    assert env == {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": cgi.SERVER_SOFTWARE,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "app.example",
        "SERVER_PORT": "8080",
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/env",
        "QUERY_STRING": "a=1",
        "X_FULL_URL": "http://app.example:8080/env?a=1",
        "REMOTE_ADDR": "10.0.0.7",
        "REMOTE_HOST": "10.0.0.7",
        "CONTENT_LENGTH": "3",
        "CONTENT_TYPE": "",
        "HTTP_HOST": "app.example:8080",
        "HTTP_USER_AGENT": "t",
    }


def test_cgi_env_without_host_header_uses_the_listening_address() -> None:
    env = cgi_env(request("/x", protocol="HTTP/1.0"))
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["X_FULL_URL"] == "http://127.0.0.1:8080/x"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert "HTTP_HOST" not in env


def test_cgi_env_ipv6_listening_address_and_host() -> None:
    assert cgi_env(request("/", server_host="::1"))["X_FULL_URL"] == "http://[::1]:8080/"
    env = cgi_env(request("/", (("Host", "[::1]:9000"),)))
    assert env["SERVER_NAME"] == "[::1]"
    assert env["X_FULL_URL"] == "http://[::1]:9000/"


def test_cgi_env_absolute_form_target_is_the_full_url() -> None:
    env = cgi_env(request("http://example.com/p?q", (("Host", "example.com"),)))
    assert env["X_FULL_URL"] == "http://example.com/p?q"
    assert (env["PATH_INFO"], env["QUERY_STRING"]) == ("/p", "q")


def test_cgi_env_content_headers_become_content_variables_only() -> None:
    env = cgi_env(
        request(
            "/echo",
            (("Content-Type", "application/json"), ("Content-Length", "999")),
            body_length=2,
        )
    )
    assert env["CONTENT_TYPE"] == "application/json"
    assert env["CONTENT_LENGTH"] == "2"  # the body's real length, not the header
    assert "HTTP_CONTENT_TYPE" not in env
    assert "HTTP_CONTENT_LENGTH" not in env


def test_cgi_env_repeated_headers_are_joined() -> None:
    env = cgi_env(
        request(
            "/",
            (
                ("Accept", "a/b"),
                ("accept", "c/d"),
                ("Cookie", "x=1"),
                ("Cookie", "y=2"),
                ("X-Trace-Id", "7"),
            ),
        )
    )
    assert env["HTTP_ACCEPT"] == "a/b, c/d"
    assert env["HTTP_COOKIE"] == "x=1; y=2"
    assert env["HTTP_X_TRACE_ID"] == "7"


def test_cgi_env_drops_headers_that_could_alias_or_inject() -> None:
    env = cgi_env(
        request(
            "/",
            (
                ("Proxy", "http://evil:1"),  # httpoxy: would become HTTP_PROXY
                ("X_Forwarded_For", "spoof"),  # would alias X-Forwarded-For
                ("X.Dot", "x"),
                ("X-Forwarded-For", "real"),
            ),
        )
    )
    assert "HTTP_PROXY" not in env
    assert env["HTTP_X_FORWARDED_FOR"] == "real"
    assert not any(name.startswith("HTTP_X.") for name in env)


def test_cgi_env_request_values_override_the_container_env() -> None:
    base = (("HTTP_X_TEST", "from-spec"), ("PATH_INFO", "/spec"), ("APP_MODE", "prod"))
    env = cgi_env(request("/real", (("X-Test", "from-request"),)), base)
    assert env["HTTP_X_TEST"] == "from-request"
    assert env["PATH_INFO"] == "/real"
    assert env["APP_MODE"] == "prod"
    assert next(iter(env)) == "HTTP_X_TEST"  # the container's entries keep their place


# -- parse_cgi_response ---------------------------------------------------------------


def test_parse_minimal_response() -> None:
    reply = parse_cgi_response(b"Content-Type: text/plain\n\nhello from nova\n")
    assert (reply.status, reply.reason) == (200, "OK")
    assert reply.headers == (("Content-Type", "text/plain"),)
    assert reply.body == b"hello from nova\n"


def test_parse_crlf_lines_and_a_body_with_blank_lines() -> None:
    reply = parse_cgi_response(b"Content-Type: text/plain\r\nX-A:  1 \r\n\r\nline\n\nmore\r\n\r\n")
    assert reply.headers == (("Content-Type", "text/plain"), ("X-A", "1"))
    assert reply.body == b"line\n\nmore\r\n\r\n"


def test_parse_status_with_and_without_reason() -> None:
    reply = parse_cgi_response(b"Status: 404 Not Found\nContent-Type: text/plain\n\nnot found\n")
    assert (reply.status, reply.reason, reply.body) == (404, "Not Found", b"not found\n")
    assert ("Status", "404 Not Found") not in reply.headers
    assert parse_cgi_response(b"Status: 418\n\n").reason == "I'm a Teapot"
    assert parse_cgi_response(b"status: 299\n\n").reason == ""  # no standard phrase
    assert parse_cgi_response(b"Status: 503 Try Later\n\n").reason == "Try Later"


def test_parse_location_redirects() -> None:
    reply = parse_cgi_response(b"Location: https://example.com/\n\n")
    assert (reply.status, reply.reason) == (302, "Found")
    assert reply.headers == (("Location", "https://example.com/"),)
    assert parse_cgi_response(b"Location: /x\nStatus: 301 Moved\n\n").status == 301


def test_parse_keeps_repeated_headers_and_drops_framing_ones() -> None:
    reply = parse_cgi_response(
        b"Content-Type: text/html; charset=utf-8\n"
        b"Set-Cookie: a=1\n"
        b"Set-Cookie: b=2\n"
        b"Content-Length: 999\n"
        b"Transfer-Encoding: chunked\n"
        b"Connection: close\n"
        b"X-Unicode: caf\xc3\xa9\n"
        b"\n<p>hi</p>"
    )
    assert reply.headers == (
        ("Content-Type", "text/html; charset=utf-8"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Unicode", "café"),
    )
    assert reply.body == b"<p>hi</p>"


def test_parse_drops_the_body_of_no_content_statuses() -> None:
    assert parse_cgi_response(b"Status: 204\n\nignored").body == b""
    assert parse_cgi_response(b"Status: 304 Not Modified\n\nignored").body == b""


@pytest.mark.parametrize(
    ("output", "why"),
    [
        (b"", "no output"),
        (b"hello from nova\n", "no blank line"),
        (b"Content-Type: text/plain\nhello", "no blank line"),
        (b"\nbody", "no header lines"),
        (b"\r\nbody", "no header lines"),
        (b"Content-Type text/plain\n\nbody", "header line 1 is not 'Name: value'"),
        (b"Content-Type: a\n continued\n\n", "header line 2"),  # obsolete line folding
        (b"Bad Name: x\n\n", "header line 1"),
        (b"X: a\rb\n\n", "control character"),
        (b"Status: abc\n\n", "invalid Status"),
        (b"Status: 99 Low\n\n", "invalid Status"),
        (b"Status: 100 Continue\n\n", "invalid Status"),  # not a final status
        (b"Status: 600 High\n\n", "invalid Status"),
        (b"Status: 2000 OK\n\n", "invalid Status"),
    ],
)
def test_parse_rejects_what_is_not_cgi(output: bytes, why: str) -> None:
    with pytest.raises(BadCgiOutput, match=why):
        parse_cgi_response(output)


def test_parse_limits_the_header_section() -> None:
    huge = b"X-Big: " + b"a" * cgi.MAX_HEADER_BYTES + b"\n\nbody"
    with pytest.raises(BadCgiOutput, match="first 64 KiB"):
        parse_cgi_response(huge)


# -- http_response ----------------------------------------------------------------------


def test_http_response_passes_cgi_output_whatever_the_exit_code() -> None:
    output = b"Content-Type: text/plain\n\npartial"
    reply = http_response(GuestResult(GuestOutcome.EXITED, 1, output), None)
    assert (reply.status, reply.body) == (200, b"partial")


def test_http_response_bad_output_is_502() -> None:
    reply = http_response(GuestResult(GuestOutcome.EXITED, 3, b"oops\n"), None)
    assert reply.status == 502
    assert reply.headers == (("Content-Type", "text/plain; charset=utf-8"),)
    assert reply.body.startswith(b"502 Bad Gateway: the handler's output is not a CGI response")
    assert b"exited with code 3" in reply.body
    oversized = GuestResult(GuestOutcome.EXITED, 0, b"", "it wrote more than 256 MiB")
    assert b"256 MiB" in http_response(oversized, None).body


def test_http_response_trap_is_500_and_timeout_504() -> None:
    trapped = http_response(GuestResult(GuestOutcome.TRAPPED, message="wasm trap: unreachable"), 1)
    assert trapped.status == 500
    assert b"wasm trap: unreachable" in trapped.body
    failed = http_response(GuestResult(GuestOutcome.FAILED, message="out of slots"), 1)
    assert failed.status == 500
    timed_out = http_response(GuestResult(GuestOutcome.TIMED_OUT), 0.25)
    assert timed_out.status == 504
    assert timed_out.body == b"504 Gateway Timeout: the handler ran past its timeout of 0.25s\n"
