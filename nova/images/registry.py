"""Push, resolve and fetch images in the store (any `Store`: Consul in a cluster).

Layout (the values operators see in the Consul UI):

    nova/v1/images/<digest>/chunk/<i>   raw bytes, at most CHUNK_SIZE each
    nova/v1/images/<digest>/meta        {"name", "tag", "size", "chunks", "sha256",
                                         "chunk_sha256": [...], "pushed_at"}
    nova/v1/imagetags/<name>/<tag>      {"digest", "pushed_at"}

The meta key is written after every chunk and the tag after the meta, so a
reader that finds a tag finds a complete image, and a push interrupted
half-way leaves nothing a reader would take for an image. Pushing the same
bytes again rewrites nothing but the tag: identical writes are no-ops.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from nova import errors
from nova.images.reference import ImageRef
from nova.store import Store, keys

CHUNK_SIZE = 400 * 1024
"""Bytes per chunk: below Consul's 512 KiB `kv_max_value_size`, with room to spare."""
WASM_MAGIC = b"\0asm"


class ImageNotFound(errors.ModuleNotFound):
    """No image under that tag or digest."""


class ImageCorrupt(errors.NovaError):
    """The stored bytes do not match their digest: never run them."""

    exit_code = errors.EXIT_CANNOT_RUN


@dataclass(frozen=True, slots=True)
class ImageMeta:
    digest: str
    name: str
    tag: str
    size: int
    chunks: int
    sha256: str  # hex, as in the digest
    chunk_sha256: tuple[str, ...]
    pushed_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tag": self.tag,
            "size": self.size,
            "chunks": self.chunks,
            "sha256": self.sha256,
            "chunk_sha256": list(self.chunk_sha256),
            "pushed_at": self.pushed_at,
        }

    @classmethod
    def from_json(cls, digest: str, data: Any) -> ImageMeta:
        """ImageCorrupt naming the digest when the meta is not what `push` writes."""
        try:
            meta = cls(
                digest=digest,
                name=str(data["name"]),
                tag=str(data["tag"]),
                size=int(data["size"]),
                chunks=int(data["chunks"]),
                sha256=str(data["sha256"]),
                chunk_sha256=tuple(str(h) for h in data.get("chunk_sha256", ())),
                pushed_at=float(data.get("pushed_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageCorrupt(f"image {digest}: unreadable meta ({exc!r})") from None
        if f"sha256:{meta.sha256}" != digest or meta.chunks < 1 or meta.size < 0:
            raise ImageCorrupt(f"image {digest}: its meta names another digest or no chunks")
        return meta


@dataclass(frozen=True, slots=True)
class ImageTag:
    name: str
    tag: str
    digest: str
    pushed_at: float


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push(store: Store, ref: ImageRef, data: bytes) -> ImageMeta:
    """Store `data` under its digest and point `ref`'s tag at it; the image's meta.

    InvalidModule if `data` is not WebAssembly (checked before anything is written).
    """
    if ref.is_digest:
        raise errors.UsageError(f"push needs NAME:TAG, not a digest ({ref})")
    if not data.startswith(WASM_MAGIC):
        raise errors.InvalidModule("not a WebAssembly module (no \\0asm header)")
    digest = digest_of(data)
    now = time.time()
    existing = await _read_meta(store, digest)
    if existing is None:
        chunks = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)] or [b""]
        for i, chunk in enumerate(chunks):
            await store.put(keys.image(digest, "chunk", str(i)), chunk)
        existing = ImageMeta(
            digest=digest,
            name=ref.name,
            tag=ref.tag,
            size=len(data),
            chunks=len(chunks),
            sha256=digest.removeprefix("sha256:"),
            chunk_sha256=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
            pushed_at=now,
        )
        await store.put_json(keys.image(digest, "meta"), existing.to_json())
    await store.put_json(keys.image_tag(ref.name, ref.tag), {"digest": digest, "pushed_at": now})
    return existing


async def resolve(store: Store, ref: ImageRef) -> str:
    """The digest `ref` names; ImageNotFound if its tag (or digest) is not stored."""
    if ref.is_digest:
        if await store.get(keys.image(ref.digest, "meta")) is None:
            raise ImageNotFound(f"no image {ref.digest} in the cluster (push it first)")
        return ref.digest
    entry = await store.get(keys.image_tag(ref.name, ref.tag))
    if entry is None:
        raise ImageNotFound(f"no image {ref} in the cluster (`nova image push {ref} app.wasm`)")
    try:
        return keys.digest(str(entry.json()["digest"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ImageCorrupt(f"tag {ref} is unreadable: {exc}") from None


async def inspect(store: Store, digest: str) -> ImageMeta:
    meta = await _read_meta(store, digest)
    if meta is None:
        raise ImageNotFound(f"no image {digest} in the cluster")
    return meta


async def fetch(store: Store, digest: str) -> bytes:
    """The image's bytes, verified against `digest`; ImageCorrupt says which chunk is bad."""
    meta = await inspect(store, digest)
    prefix = keys.image(digest, "chunk") + "/"
    found = {entry.key.removeprefix(prefix): entry.value for entry in await store.list(prefix)}
    parts: list[bytes] = []
    for i in range(meta.chunks):
        chunk = found.get(str(i))
        if chunk is None:
            raise ImageCorrupt(f"image {digest}: chunk {i} of {meta.chunks} is missing")
        if i < len(meta.chunk_sha256) and hashlib.sha256(chunk).hexdigest() != meta.chunk_sha256[i]:
            raise ImageCorrupt(
                f"image {digest}: chunk {i} of {meta.chunks} does not match its sha256 "
                "(corrupted in the store); push the image again"
            )
        parts.append(chunk)
    data = b"".join(parts)
    if len(data) != meta.size or digest_of(data) != digest:
        raise ImageCorrupt(
            f"image {digest}: the stored bytes ({len(data)} of {meta.size}) do not match "
            "the digest; push the image again"
        )
    return data


async def list_tags(store: Store) -> list[ImageTag]:
    """Every tag, sorted by name then tag; unreadable tags are left out."""
    tags: list[ImageTag] = []
    for entry in await store.list(keys.IMAGE_TAGS):
        try:
            name, tag = keys.split(entry.key, keys.IMAGE_TAGS)
            data = entry.json()
            tags.append(ImageTag(name, tag, str(data["digest"]), float(data.get("pushed_at", 0))))
        except (KeyError, TypeError, ValueError):
            continue
    return tags


async def _read_meta(store: Store, digest: str) -> ImageMeta | None:
    entry = await store.get(keys.image(digest, "meta"))
    if entry is None:
        return None
    try:
        data = entry.json()
    except ValueError as exc:
        raise ImageCorrupt(f"image {digest}: {exc}") from None
    return ImageMeta.from_json(digest, data)
