"""The compiled-module cache: compile once, verify always, rebuild what is bad."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wasmtime

from agent.sandbox.cache import ModuleCache
from nova import errors

MINIMAL = '(module (memory (export "memory") 1) (func (export "_start")))'


def write_wat(path: Path, wat: str) -> Path:
    path.write_bytes(wasmtime.wat2wasm(wat))
    return path


def test_compiles_once_then_hits_memory_then_disk(tmp_path: Path) -> None:
    app = write_wat(tmp_path / "app.wasm", MINIMAL)
    cache = ModuleCache(tmp_path / "cache")
    first = cache.resolve(str(app))
    assert cache.stats.misses == 1
    assert first.artifact.exists()
    assert first.digest.startswith("sha256:")

    assert cache.resolve(str(app)) is first
    assert cache.stats.memory_hits == 1 and cache.stats.misses == 1

    # A new process (a new cache object) finds the artifact on disk: no compile.
    again = ModuleCache(tmp_path / "cache")
    assert again.resolve(str(app)).digest == first.digest
    assert again.stats.disk_hits == 1 and again.stats.misses == 0


def test_entries_are_keyed_by_engine_fingerprint(tmp_path: Path) -> None:
    app = write_wat(tmp_path / "app.wasm", MINIMAL)
    cached = ModuleCache(tmp_path / "cache").resolve(str(app))
    fingerprint_dir = cached.artifact.parent.parent
    assert fingerprint_dir.name.startswith(f"wasmtime-{wasmtime_version()}-")
    meta = json.loads(cached.artifact.with_suffix(".meta.json").read_text())
    assert meta["digest"] == cached.digest


def wasmtime_version() -> str:
    from agent.sandbox.engine import wasmtime_version as version

    return version()


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_corrupt_entry_is_rebuilt_not_run(tmp_path: Path, damage: str) -> None:
    app = write_wat(tmp_path / "app.wasm", MINIMAL)
    cached = ModuleCache(tmp_path / "cache").resolve(str(app))
    blob = bytearray(cached.artifact.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
        cached.artifact.write_bytes(bytes(blob))
    elif damage == "truncate":
        cached.artifact.write_bytes(bytes(blob[: len(blob) // 3]))
    else:
        cached.artifact.with_suffix(".meta.json").write_text("{not json")

    damaged = cached.artifact.read_bytes()

    fresh = ModuleCache(tmp_path / "cache")
    rebuilt = fresh.resolve(str(app))
    assert fresh.stats.rebuilds == 1
    assert fresh.stats.misses == 1  # compiled again from the source
    if damage != "meta":
        assert rebuilt.artifact.read_bytes() != damaged
    # ...and the rebuilt entry verifies for the next reader.
    third = ModuleCache(tmp_path / "cache")
    third.resolve(str(app))
    assert third.stats.disk_hits == 1 and third.stats.rebuilds == 0


def test_stale_entry_wasmtime_refuses_is_rebuilt(tmp_path: Path) -> None:
    """An artifact that verifies but that this wasmtime cannot load (another build)."""
    app = write_wat(tmp_path / "app.wasm", MINIMAL)
    cached = ModuleCache(tmp_path / "cache").resolve(str(app))
    bogus = b"\x7fELF not really a wasmtime artifact"
    cached.artifact.write_bytes(bogus)
    meta_path = cached.artifact.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text())
    import hashlib

    meta.update(size=len(bogus), artifact_sha256=hashlib.sha256(bogus).hexdigest())
    meta_path.write_text(json.dumps(meta))
    fresh = ModuleCache(tmp_path / "cache")
    fresh.resolve(str(app))
    assert fresh.stats.rebuilds == 1


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(errors.ModuleNotFound, match=r"nope\.wasm: no such file"):
        ModuleCache(tmp_path / "cache").resolve(str(tmp_path / "nope.wasm"))


def test_not_wasm(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(errors.InvalidModule, match="not a WebAssembly module"):
        ModuleCache(tmp_path / "cache").resolve(str(text))


def test_invalid_wasm(tmp_path: Path) -> None:
    broken = tmp_path / "broken.wasm"
    broken.write_bytes(b"\0asm\x01\0\0\0\xff\xff")
    with pytest.raises(errors.InvalidModule, match="invalid WebAssembly"):
        ModuleCache(tmp_path / "cache").resolve(str(broken))


def test_imports_nova_does_not_provide(tmp_path: Path) -> None:
    app = write_wat(
        tmp_path / "needs.wasm",
        '(module (import "env" "launch_missiles" (func)) (func (export "_start")))',
    )
    with pytest.raises(errors.UnsupportedImports, match=r"env\.launch_missiles"):
        ModuleCache(tmp_path / "cache").resolve(str(app))


def test_unknown_wasi_function_is_refused(tmp_path: Path) -> None:
    app = write_wat(
        tmp_path / "future.wasm",
        '(module (import "wasi_snapshot_preview1" "teleport" (func)) (func (export "_start")))',
    )
    with pytest.raises(errors.UnsupportedImports, match="teleport"):
        ModuleCache(tmp_path / "cache").resolve(str(app))


def test_module_without_start(tmp_path: Path) -> None:
    app = write_wat(tmp_path / "lib.wasm", '(module (func (export "add")))')
    with pytest.raises(errors.InvalidModule, match="_start"):
        ModuleCache(tmp_path / "cache").resolve(str(app))


def test_memory_lru_is_bounded(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache", memory_entries=2)
    for i in range(4):
        app = write_wat(tmp_path / f"a{i}.wasm", MINIMAL.replace("1)", f"{i + 1})"))
        cache.resolve(str(app))
    assert len(cache._hot) == 2


def test_full_disk_is_a_clear_error(tmp_path: Path) -> None:
    """A cache directory that cannot be written: say where and why."""
    app = write_wat(tmp_path / "app.wasm", MINIMAL)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    with pytest.raises(errors.NovaError, match="cannot write the compiled module"):
        ModuleCache(blocked).resolve(str(app))
