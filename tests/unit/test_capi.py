"""The wasmtime C API helpers: the C string tables handed to wasi_config_set_env."""

from __future__ import annotations

import ctypes

import pytest

from agent.sandbox import capi


@pytest.mark.parametrize(
    "env",
    [
        {"A": "1", "EMPTY": "", "PATH_INFO": "/x"},
        {"HTTP_X_NAME": "café ☕", "B": "", "ÜNICODE": "v"},  # multi-byte: per-part encoding
        {"BAD": "\udcff"},  # a lone surrogate (undecodable header bytes): replaced, not fatal
        {},
    ],
)
def test_c_strings_point_at_each_name_and_value(env: dict[str, str]) -> None:
    strings = capi.CStrings(env)
    assert strings.count == len(env)

    def table(address: int) -> list[bytes]:  # char*[count] at `address`
        pointers = (ctypes.c_char_p * len(env)).from_address(address)
        return [pointer or b"" for pointer in pointers]

    names, values = table(strings.names), table(strings.values)
    assert names == [name.encode("utf-8", "replace") for name in env]
    assert values == [value.encode("utf-8", "replace") for value in env.values()]
