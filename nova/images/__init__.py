"""Content-addressed images: WebAssembly modules stored in the cluster store by sha256.

An image is the module's bytes under `nova/v1/images/<digest>/`, split into
chunks below Consul's value limit, with a meta key written last (so its
presence marks a complete image). Tags are names users type (`web:1.2`) and
point at digests (`nova/v1/imagetags/<name>/<tag>`). Every Consul server
holds the whole KV, so there is no single image server to lose; agents fetch
by digest, verify the sha256, and keep a local copy (`ImageCache`).
"""

from __future__ import annotations

from nova.images.cache import ImageCache
from nova.images.reference import ImageRef
from nova.images.registry import (
    CHUNK_SIZE,
    ImageCorrupt,
    ImageMeta,
    ImageNotFound,
    ImageTag,
    fetch,
    inspect,
    list_tags,
    push,
    resolve,
)

__all__ = [
    "CHUNK_SIZE",
    "ImageCache",
    "ImageCorrupt",
    "ImageMeta",
    "ImageNotFound",
    "ImageRef",
    "ImageTag",
    "fetch",
    "inspect",
    "list_tags",
    "push",
    "resolve",
]
