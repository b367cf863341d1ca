"""`parse_create`: what the agent's API (and daemonless `nova run`) accepts.

Pure: no agent, no workers. Every malformed request is refused with a
UsageError that names the field, before anything starts.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from agent.api import parse_create
from agent.sandbox.spec import DirMount, Isolation
from nova import errors
from nova.cli.client import _container, _error_from

MODULE = "/srv/apps/hello.wasm"


def test_minimal_request_gets_defaults() -> None:
    spec = parse_create({"module": "apps/hello.wasm"})
    assert spec.module_path == os.path.abspath("apps/hello.wasm")
    assert spec.argv == ("hello.wasm",)
    assert (spec.name, spec.env, spec.dirs) == ("", (), ())
    assert (spec.memory_bytes, spec.timeout_s, spec.http_port) == (None, None, None)
    assert spec.http_host == "127.0.0.1"
    assert (spec.cpu_millicores, spec.pids_max, spec.isolation) == (None, None, Isolation.AUTO)


def test_full_request() -> None:
    spec = parse_create(
        {
            "module": MODULE,
            "name": "web-1.a_b",
            "argv": ["hello.wasm", "a b", ""],
            "env": {"NAME": "nova", "EMPTY": ""},
            "dirs": ["/srv/data:/data:ro", "/tmp"],
            "memory": "64Mi",
            "timeout": "250ms",
            "http_port": 8080,
            "http_host": "0.0.0.0",
            "cpu": "500m",
            "pids": 16,
            "isolation": "auto",
        }
    )
    assert spec.name == "web-1.a_b"
    assert (spec.cpu_millicores, spec.pids_max, spec.isolation) == (500, 16, Isolation.AUTO)
    assert spec.argv == ("hello.wasm", "a b", "")
    assert spec.env == (("NAME", "nova"), ("EMPTY", ""))
    assert spec.dirs == (DirMount("/srv/data", "/data", True), DirMount("/tmp", "/tmp"))
    assert (spec.memory_bytes, spec.timeout_s) == (64 << 20, 0.25)
    assert (spec.http_port, spec.http_host) == (8080, "0.0.0.0")


def test_numbers_and_env_pairs_as_the_cli_sends_them() -> None:
    spec = parse_create(
        {"module": MODULE, "env": [["A", "1"], ["A", "2"]], "memory": 1 << 20, "timeout": 5}
    )
    assert spec.env == (("A", "1"), ("A", "2"))
    assert (spec.memory_bytes, spec.timeout_s) == (1 << 20, 5.0)


@pytest.mark.parametrize(
    ("cpu", "millicores"), [("500m", 500), ("0.25", 250), ("2", 2000), (0.5, 500), (3, 3000)]
)
def test_cpu_as_kubernetes_writes_it(cpu: Any, millicores: int) -> None:
    """A string is cores or millicores (`500m`); a number is cores."""
    assert parse_create({"module": MODULE, "cpu": cpu}).cpu_millicores == millicores


def test_isolation_none_is_accepted_without_cgroup_limits() -> None:
    spec = parse_create({"module": MODULE, "isolation": "none", "memory": "8Mi"})
    assert (spec.isolation, spec.memory_bytes) == (Isolation.NONE, 8 << 20)
    assert parse_create({"module": MODULE, "isolation": None}).isolation is Isolation.AUTO


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([MODULE], "must be a JSON object"),
        ({"module": MODULE, "image": "x"}, "unknown field(s) in request: image"),
        ({}, "field 'module'"),
        ({"module": ""}, "field 'module'"),
        ({"module": 7}, "field 'module'"),
        ({"module": MODULE, "name": "a/b"}, "invalid name 'a/b'"),
        ({"module": MODULE, "name": "-x"}, "invalid name '-x'"),
        ({"module": MODULE, "name": "a b"}, "invalid name 'a b'"),
        ({"module": MODULE, "name": "x" * 129}, "invalid name"),
        ({"module": MODULE, "name": 5}, "invalid name 5"),
        ({"module": MODULE, "argv": "hello.wasm"}, "field 'argv'"),
        ({"module": MODULE, "argv": ["a", 1]}, "field 'argv'"),
        ({"module": MODULE, "env": "NAME=nova"}, "field 'env'"),
        ({"module": MODULE, "env": [["NAME"]]}, "field 'env'"),
        ({"module": MODULE, "env": {"N": 1}}, "field 'env'"),
        ({"module": MODULE, "env": {"": "x"}}, "invalid environment variable name ''"),
        ({"module": MODULE, "env": [["A=B", "x"]]}, "invalid environment variable name 'A=B'"),
        ({"module": MODULE, "dirs": "/data"}, "field 'dirs'"),
        ({"module": MODULE, "dirs": ["a:b:c:d"]}, "invalid --dir 'a:b:c:d'"),
        ({"module": MODULE, "memory": "12XB"}, "invalid memory '12XB'"),
        ({"module": MODULE, "memory": -5}, "invalid memory -5"),
        ({"module": MODULE, "memory": 0}, "invalid memory 0"),
        ({"module": MODULE, "memory": 1.5}, "invalid memory 1.5"),
        ({"module": MODULE, "memory": True}, "invalid memory True"),
        ({"module": MODULE, "timeout": "0s"}, "invalid timeout '0s'"),
        ({"module": MODULE, "timeout": -1}, "invalid timeout -1"),
        ({"module": MODULE, "timeout": 0}, "invalid timeout 0"),
        ({"module": MODULE, "timeout": [5]}, "invalid timeout [5]"),
        ({"module": MODULE, "http_port": 0}, "invalid http_port 0"),
        ({"module": MODULE, "http_port": 65536}, "invalid http_port 65536"),
        ({"module": MODULE, "http_port": "80"}, "invalid http_port '80'"),
        ({"module": MODULE, "http_port": True}, "invalid http_port True"),
        ({"module": MODULE, "http_host": 1}, "invalid http_host 1"),
        ({"module": MODULE, "cpu": "half"}, "invalid cpu 'half'"),
        ({"module": MODULE, "cpu": "0.0001"}, "invalid cpu '0.0001': must be at least 1m"),
        ({"module": MODULE, "cpu": 0}, "invalid cpu 0"),
        ({"module": MODULE, "cpu": -1}, "invalid cpu -1"),
        ({"module": MODULE, "cpu": True}, "invalid cpu True"),
        ({"module": MODULE, "cpu": [1]}, "invalid cpu [1]"),
        ({"module": MODULE, "pids": 0}, "invalid pids 0"),
        ({"module": MODULE, "pids": "8"}, "invalid pids '8'"),
        ({"module": MODULE, "pids": 2.5}, "invalid pids 2.5"),
        ({"module": MODULE, "pids": True}, "invalid pids True"),
        ({"module": MODULE, "isolation": "cgroup"}, "invalid isolation 'cgroup'"),
        ({"module": MODULE, "isolation": "off"}, "invalid isolation 'off': expected auto or none"),
        ({"module": MODULE, "isolation": ""}, "invalid isolation ''"),
        ({"module": MODULE, "isolation": 0}, "invalid isolation 0"),
        (
            {"module": MODULE, "isolation": "none", "cpu": "500m"},
            "cpu and pids limits need a cgroup, and isolation 'none' has none",
        ),
        (
            {"module": MODULE, "isolation": "none", "pids": 8},
            "cpu and pids limits need a cgroup",
        ),
    ],
)
def test_malformed_requests_are_usage_errors(body: Any, says: str) -> None:
    with pytest.raises(errors.UsageError) as caught:
        parse_create(body)
    assert says in caught.value.message
    assert caught.value.exit_code == errors.EXIT_USAGE


def test_client_quotes_refs_into_one_path_segment() -> None:
    assert _container("web") == "/v1/containers/web"
    assert _container("a/b", "stop") == "/v1/containers/a%2Fb/stop"
    assert _container("x?y#z", "logs") == "/v1/containers/x%3Fy%23z/logs"


def test_client_maps_api_errors_to_exit_codes() -> None:
    not_found = _error_from({"error": "x.wasm: no such file", "kind": "ModuleNotFound"})
    assert isinstance(not_found, errors.ModuleNotFound)
    assert (not_found.message, not_found.exit_code) == ("x.wasm: no such file", 127)
    conflict = _error_from({"error": "taken", "kind": "Conflict", "exit_code": 125})
    assert (conflict.message, conflict.exit_code) == ("taken", errors.EXIT_NOVA)
    assert _error_from("<html>").message == "the agent refused the request"
