"""The compiled-module cache: compile once per (digest, engine fingerprint).

Layout under the cache directory (default /var/lib/nova/cache):

    <fingerprint>/<dd>/<digest>.cwasm       the serialized compiled module
    <fingerprint>/<dd>/<digest>.meta.json   digest, size and sha256 of the .cwasm

The meta file is written last, so its presence marks a complete entry. An
entry is verified (size and sha256 of the artifact) before wasmtime ever sees
it; a corrupt, truncated or stale entry is deleted and rebuilt, never run.
Hot entries stay in memory (a bounded LRU of verified modules).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import wasmtime

from agent.sandbox import engine as engine_mod
from agent.sandbox import wasi
from nova import errors
from nova.files import atomic_write

log = logging.getLogger("nova.agent.sandbox.cache")

WASM_MAGIC = b"\0asm"


@dataclass(frozen=True, slots=True)
class CachedModule:
    digest: str  # "sha256:<hex>" of the .wasm bytes
    artifact: Path
    module: wasmtime.Module
    # A start section runs guest code at instantiation; such modules are never
    # instantiated ahead of a run (see worker.Standby).
    has_start_section: bool = True


@dataclass(slots=True)
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0  # compiled from source
    rebuilds: int = 0  # corrupt or stale entries replaced
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ModuleCache:
    """Thread-safe. `resolve()` turns a .wasm path into a verified compiled module."""

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        engine: wasmtime.Engine | None = None,
        memory_entries: int = 64,
    ) -> None:
        self.engine = engine or engine_mod.make_engine()
        self.root = Path(cache_dir) / engine_mod.engine_fingerprint()
        self.memory_entries = memory_entries
        self.stats = CacheStats()
        self._hot: collections.OrderedDict[str, CachedModule] = collections.OrderedDict()
        self._digests: dict[tuple[int, int, int, int], str] = {}
        self._lock = threading.Lock()

    # -- public -----------------------------------------------------------

    def resolve(self, path: str) -> CachedModule:
        """Read, validate and compile (or fetch from cache) the module at `path`.

        Raises ModuleNotFound, InvalidModule or UnsupportedImports with a
        message that names the file.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise errors.ModuleNotFound(f"{path}: no such file") from None
        except OSError as exc:
            raise errors.ModuleNotFound(f"{path}: {exc.strerror}") from None
        if not os.path.isfile(path):
            raise errors.InvalidModule(f"{path}: not a regular file")
        memo_key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        digest = self._digests.get(memo_key)
        if digest is not None:
            hot = self._hot_get(digest)
            if hot is not None:
                return hot
        data = _read(path)
        digest = digest_of(data)
        self._digests[memo_key] = digest
        return self.put(data, source=path, digest=digest)

    def lookup(self, path: str) -> CachedModule | None:
        """The hot entry for `path` if its file is unchanged since it was resolved.

        Cheap (a stat and two dict lookups): callers on the start path try it
        before `resolve()`, which may read, hash and compile.
        """
        try:
            st = os.stat(path)
        except OSError:
            return None
        digest = self._digests.get((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return self._hot_get(digest) if digest else None

    def put(self, data: bytes, *, source: str, digest: str | None = None) -> CachedModule:
        """Cache the module given as bytes (an image layer, a file's contents)."""
        digest = digest or digest_of(data)
        hot = self._hot_get(digest)
        if hot is not None:
            return hot
        cached = self._load_from_disk(digest)
        if cached is not None:
            self._count("disk_hits")
        else:
            cached = self._compile(data, source, digest)
            self._count("misses")
        wasi.check_imports(cached.module, source)
        wasi.check_entry(cached.module, source)
        self._hot_put(cached)
        return cached

    def get(self, digest: str) -> CachedModule | None:
        """A verified module by digest, from memory or disk; None if absent."""
        hot = self._hot_get(digest)
        if hot is not None:
            return hot
        cached = self._load_from_disk(digest)
        if cached is not None:
            self._count("disk_hits")
            self._hot_put(cached)
        return cached

    def artifact_path(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return self.root / hexdigest[:2] / f"{hexdigest}.cwasm"

    def clear_memory(self) -> None:
        with self._lock:
            self._hot.clear()
            self._digests.clear()

    # -- internals ----------------------------------------------------------

    def _count(self, name: str) -> None:
        with self.stats.lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _hot_get(self, digest: str) -> CachedModule | None:
        with self._lock:
            cached = self._hot.get(digest)
            if cached is not None:
                self._hot.move_to_end(digest)
        if cached is not None:
            self._count("memory_hits")
        return cached

    def _hot_put(self, cached: CachedModule) -> None:
        with self._lock:
            self._hot[cached.digest] = cached
            self._hot.move_to_end(cached.digest)
            while len(self._hot) > self.memory_entries:
                self._hot.popitem(last=False)

    def _meta_path(self, artifact: Path) -> Path:
        return artifact.with_suffix(".meta.json")

    def _load_from_disk(self, digest: str) -> CachedModule | None:
        artifact = self.artifact_path(digest)
        meta_path = self._meta_path(artifact)
        try:
            meta = json.loads(meta_path.read_bytes())
            blob = artifact.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as exc:
            self._discard(digest, f"unreadable entry ({exc})")
            return None
        if meta.get("digest") != digest or meta.get("size") != len(blob):
            self._discard(digest, "size or digest mismatch")
            return None
        if meta.get("artifact_sha256") != hashlib.sha256(blob).hexdigest():
            self._discard(digest, "artifact checksum mismatch")
            return None
        try:
            module = wasmtime.Module.deserialize(self.engine, blob)
        except wasmtime.WasmtimeError as exc:
            # e.g. written by another wasmtime build: stale, not dangerous.
            self._discard(digest, f"wasmtime refused it ({exc})")
            return None
        return CachedModule(
            digest=digest,
            artifact=artifact,
            module=module,
            has_start_section=bool(meta.get("has_start_section", True)),
        )

    def _discard(self, digest: str, why: str) -> None:
        artifact = self.artifact_path(digest)
        log.warning("module cache: discarding %s: %s; rebuilding", artifact, why)
        self._count("rebuilds")
        for path in (self._meta_path(artifact), artifact):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _compile(self, data: bytes, source: str, digest: str) -> CachedModule:
        if not data.startswith(WASM_MAGIC):
            raise errors.InvalidModule(
                f"{source}: not a WebAssembly module (no \\0asm magic at the start)"
            )
        try:
            module = wasmtime.Module(self.engine, data)
        except wasmtime.WasmtimeError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise errors.InvalidModule(f"{source}: invalid WebAssembly: {first_line}") from None
        blob = module.serialize()
        artifact = self.artifact_path(digest)
        meta = {
            "digest": digest,
            "size": len(blob),
            "artifact_sha256": hashlib.sha256(blob).hexdigest(),
            "wasmtime": engine_mod.wasmtime_version(),
            "fingerprint": engine_mod.engine_fingerprint(),
            "source": source,
            "has_start_section": has_start_section(data),
        }
        try:
            artifact.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(artifact, bytes(blob))
            atomic_write(self._meta_path(artifact), json.dumps(meta, indent=1).encode())
        except OSError as exc:
            # A full or read-only disk costs speed, not correctness: run from memory.
            log.warning("module cache: cannot write %s: %s", artifact, exc.strerror)
            raise errors.NovaError(
                f"cannot write the compiled module to {artifact}: {exc.strerror}"
            ) from None
        return CachedModule(
            digest=digest,
            artifact=artifact,
            module=module,
            has_start_section=bool(meta["has_start_section"]),
        )


def has_start_section(wasm: bytes) -> bool:
    """Whether a (validated) module has a start section (section id 8)."""
    pos = 8  # magic + version
    while pos < len(wasm):
        section_id = wasm[pos]
        size, pos = _leb128(wasm, pos + 1)
        if section_id == 8:
            return True
        pos += size
    return False


def _leb128(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except PermissionError:
        raise errors.ModuleNotFound(f"{path}: permission denied") from None
    except OSError as exc:
        raise errors.ModuleNotFound(f"{path}: {exc.strerror}") from None
