"""Images in a real Consul: `nova image push|ls|inspect`, chunked storage, fetch and verify.

What users rely on: a pushed module comes back byte for byte on any agent,
a module above Consul's value limit is split and reassembled, and a corrupted
chunk is refused with a message naming it, never run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nova import errors
from nova.images import (
    CHUNK_SIZE,
    ImageCache,
    ImageCorrupt,
    ImageNotFound,
    ImageRef,
    fetch,
    push,
    resolve,
)
from nova.store import keys
from nova.store.consul import ConsulStore
from tests.cluster.conftest import ConsulAgent
from tests.unit.test_cli import nova, one_error_line

pytestmark = pytest.mark.consul


@pytest.fixture
async def store(consul_agent: ConsulAgent) -> AsyncIterator[ConsulStore]:
    async with ConsulStore(consul_agent.url) as opened:
        yield opened


def unique_name() -> str:
    return f"img-{uuid.uuid4().hex[:10]}"


def big_module(examples: Path, size: int) -> bytes:
    """A valid module of about `size` bytes: hello.wasm plus a custom section of filler."""
    base = (examples / "hello.wasm").read_bytes()
    name = b"nova-filler"
    payload = bytes([len(name)]) + name + uuid.uuid4().bytes * ((size - len(base)) // 16)
    return base + b"\x00" + _leb128(len(payload)) + payload


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_push_ls_inspect_through_the_cli(consul_agent: ConsulAgent, examples: Path) -> None:
    name = unique_name()
    env_flags = ["--consul", consul_agent.url]
    pushed = nova("image", "push", f"{name}:1.0", examples / "hello.wasm", *env_flags)
    assert pushed.returncode == 0, pushed.stderr
    digest = pushed.stdout.strip()
    assert digest == ImageRef.parse(digest).digest  # sha256:<64 hex>

    listed = nova("image", "ls", "--json", *env_flags)
    assert listed.returncode == 0, listed.stderr
    mine = [t for t in json.loads(listed.stdout) if t["name"] == name]
    assert [(t["tag"], t["digest"]) for t in mine] == [("1.0", digest)]

    for ref in (f"{name}:1.0", digest):
        shown = nova("image", "inspect", ref, *env_flags)
        assert shown.returncode == 0, shown.stderr
        meta = json.loads(shown.stdout)
        assert (meta["digest"], meta["chunks"]) == (digest, 1)
        assert meta["size"] == (examples / "hello.wasm").stat().st_size

    missing, not_wasm, bad_ref = (
        nova("image", "inspect", f"{name}:2.0", *env_flags),
        nova("image", "push", f"{name}:x", Path(__file__), *env_flags),
        nova("image", "push", "a/b:1", examples / "hello.wasm", *env_flags),
    )
    assert missing.returncode == errors.EXIT_NOT_FOUND
    assert f"no image {name}:2.0 in the cluster" in one_error_line(missing)
    assert not_wasm.returncode == errors.EXIT_CANNOT_RUN
    assert "not a WebAssembly module" in one_error_line(not_wasm)
    assert bad_ref.returncode == errors.EXIT_USAGE
    assert "image name 'a/b' must not contain '/'" in one_error_line(bad_ref)


def test_push_without_consul_says_so(examples: Path) -> None:
    result = nova("image", "push", "x:1", examples / "hello.wasm", "--consul", "http://127.0.0.1:9")
    assert result.returncode == errors.EXIT_NOVA
    assert "cannot connect" in one_error_line(result)
    assert "is Consul running?" in one_error_line(result)


async def test_large_module_is_chunked_and_fetched_verified(
    store: ConsulStore, examples: Path, tmp_path: Path
) -> None:
    data = big_module(examples, 2 * CHUNK_SIZE + 1000)
    ref = ImageRef.parse(f"{unique_name()}:big")
    meta = await push(store, ref, data)
    assert meta.chunks == 3
    for i in range(3):  # every chunk is under the value limit, the last holds the rest
        entry = await store.get(keys.image(meta.digest, "chunk", str(i)))
        assert entry is not None
        assert len(entry.value) == (CHUNK_SIZE if i < 2 else len(data) - 2 * CHUNK_SIZE)

    assert await resolve(store, ref) == meta.digest
    assert await fetch(store, meta.digest) == data
    cache = ImageCache(tmp_path, store)
    path = await cache.get(meta.digest)
    assert path.read_bytes() == data
    path.write_bytes(b"\0asm damaged on disk")  # fetched again, never used damaged
    assert (await cache.get(meta.digest)).read_bytes() == data

    # Pushing the same bytes under another tag stores nothing new.
    chunk0 = await store.get(keys.image(meta.digest, "chunk", "0"))
    again = await push(store, ImageRef.parse(f"{ref.name}:other"), data)
    assert again.digest == meta.digest
    assert await store.get(keys.image(meta.digest, "chunk", "0")) == chunk0


async def test_a_corrupted_chunk_is_refused_naming_it(
    store: ConsulStore, examples: Path, tmp_path: Path
) -> None:
    data = big_module(examples, CHUNK_SIZE + 5000)
    meta = await push(store, ImageRef.parse(f"{unique_name()}:1"), data)
    chunk = keys.image(meta.digest, "chunk", "1")
    entry = await store.get(chunk)
    assert entry is not None
    await store.put(chunk, entry.value[:-1] + bytes([entry.value[-1] ^ 0xFF]))

    with pytest.raises(ImageCorrupt, match=r"chunk 1 of 2 does not match its sha256"):
        await fetch(store, meta.digest)
    cache = ImageCache(tmp_path, store)
    with pytest.raises(ImageCorrupt):
        await cache.get(meta.digest)
    assert not cache.path_of(meta.digest).exists()  # nothing a later start could run

    await store.delete(chunk)
    with pytest.raises(ImageCorrupt, match=r"chunk 1 of 2 is missing"):
        await fetch(store, meta.digest)


async def test_unknown_references(store: ConsulStore) -> None:
    with pytest.raises(ImageNotFound, match="no image"):
        await resolve(store, ImageRef.parse(f"{unique_name()}:1"))
    with pytest.raises(ImageNotFound, match="no image"):
        await resolve(store, ImageRef.parse("sha256:" + "0" * 64))
    for bad in ("sha256:xyz", "name:", ":tag", "a b:1"):
        with pytest.raises(errors.UsageError):
            ImageRef.parse(bad)
    assert ImageRef.parse("web") == ImageRef(name="web", tag="latest")
