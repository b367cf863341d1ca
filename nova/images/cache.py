"""An agent's local copy of images, by digest: fetched once, verified every time.

    <cache>/images/sha256/<hex>.wasm

A file is written to a temporary name and renamed, so a crash never leaves
a partial module under a digest's name; it is hashed again before each use,
so a file damaged on disk is fetched anew rather than run.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from nova.files import atomic_write
from nova.images import registry
from nova.store import Store, keys

log = logging.getLogger("nova.images.cache")


class ImageCache:
    def __init__(self, cache_dir: Path, store: Store) -> None:
        self.root = cache_dir / "images" / "sha256"
        self.store = store
        self._locks: dict[str, asyncio.Lock] = {}

    def path_of(self, digest: str) -> Path:
        return self.root / f"{keys.digest(digest).removeprefix('sha256:')}.wasm"

    async def get(self, digest: str) -> Path:
        """The verified module file for `digest`, fetched from the store if needed.

        ImageNotFound / ImageCorrupt from the store; StoreError when it cannot answer.
        """
        path = self.path_of(digest)
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:  # one fetch per digest, however many replicas start at once
            if await asyncio.to_thread(_matches, path, digest):
                return path
            data = await registry.fetch(self.store, digest)
            await asyncio.to_thread(_write_atomically, path, data)
            log.info("fetched image %s (%d bytes)", digest, len(data))
            return path


def _matches(path: Path, digest: str) -> bool:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    if registry.digest_of(data) == digest:
        return True
    log.warning("cached image %s is damaged; fetching it again", path)
    return False


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, data)
