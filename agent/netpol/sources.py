"""Where policies come from: a watched directory of YAML files, and the store.

Each source reports per *origin* (one file, or one store key) to a
`PolicySink` (the engine): the origin's policies when it parses, an error
when it does not (the sink keeps that origin's last good policies: never
fail open), or its removal (only its policies go).

`DirectorySource` watches `/etc/nova/policies` (configurable) with inotify.
Only `CLOSE_WRITE` (a writer finished) and `MOVED_TO` (an atomic rename
landed) trigger a parse, so a half-written file is never read; deletion and
renaming away remove the file's policies. Hidden files (`.web.yaml.swp`) and
names not ending in .yaml/.yml (`web.yaml.tmp`, `web.yaml~`) are ignored. A
queue overflow rescans the directory; a rescan only re-parses files whose
bytes changed.

`StoreSource` follows `nova/v1/policies/<ns>/<name>` with blocking watches;
each key holds one policy (YAML or JSON) whose namespace and name are the
key's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Protocol

from inotify_simple import INotify, flags

from agent.netpol.model import NetworkPolicy, parse_policies
from agent.netpol.yamltree import PolicyError
from nova.store import Store, StoreError, keys

log = logging.getLogger("nova.agent.netpol")

DEFAULT_POLICY_DIR = Path("/etc/nova/policies")
SUFFIXES = (".yaml", ".yml")
STORE_ORIGIN_PREFIX = "store:"

_WATCH_MASK = (
    flags.CLOSE_WRITE
    | flags.MOVED_TO
    | flags.MOVED_FROM
    | flags.DELETE
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
)


class PolicySink(Protocol):
    def source_loaded(self, origin: str, policies: list[NetworkPolicy]) -> None: ...
    def source_failed(self, origin: str, error: PolicyError) -> None: ...
    def source_removed(self, origin: str) -> None: ...


class PolicySource(Protocol):
    name: str

    async def start(self, sink: PolicySink) -> None:
        """Begin following; report what exists now before returning when possible."""

    async def wait_synced(self, timeout: float) -> bool:  # noqa: ASYNC109
        """True once everything that existed at start was reported."""

    async def close(self) -> None: ...


def is_policy_file(name: str) -> bool:
    return not name.startswith(".") and name.endswith(SUFFIXES)


class DirectorySource:
    """Policy files in one directory, followed with inotify (see the module docstring)."""

    def __init__(self, directory: Path = DEFAULT_POLICY_DIR, *, retry_s: float = 1.0) -> None:
        self.directory = directory
        self.name = f"directory {directory}"
        self._retry_s = retry_s
        self._sink: PolicySink | None = None
        self._inotify: INotify | None = None
        self._digests: dict[str, bytes] = {}  # origin -> sha256 of the bytes last parsed
        self._rewatch: asyncio.Task[None] | None = None

    async def start(self, sink: PolicySink) -> None:
        self._sink = sink
        self.directory.mkdir(parents=True, exist_ok=True)
        self._watch()

    async def wait_synced(self, timeout: float) -> bool:  # noqa: ASYNC109
        return True  # start() scanned the directory before returning

    async def close(self) -> None:
        if self._rewatch is not None:
            self._rewatch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rewatch
        self._unwatch()

    def _watch(self) -> None:
        inotify = INotify(nonblocking=True)
        try:
            inotify.add_watch(self.directory, _WATCH_MASK)
        except OSError:
            inotify.close()
            raise
        self._inotify = inotify
        asyncio.get_running_loop().add_reader(inotify.fileno(), self._on_events)
        self.rescan()  # after the watch exists, so no change can fall between the two

    def _unwatch(self) -> None:
        if self._inotify is not None:
            asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def _origin(self, name: str) -> str:
        return str(self.directory / name)

    def rescan(self) -> None:
        """Load every policy file now present; forget those gone."""
        try:
            present = {p.name for p in self.directory.iterdir() if is_policy_file(p.name)}
        except OSError as exc:
            log.error("policy directory %s cannot be listed: %s", self.directory, exc)
            return
        for name in sorted(present):
            self._load(name)
        for origin in sorted(set(self._digests) - {self._origin(n) for n in present}):
            self._remove(origin)

    def _on_events(self) -> None:
        assert self._inotify is not None
        rescan = False
        for event in self._inotify.read(timeout=0):
            mask = event.mask
            if mask & (flags.Q_OVERFLOW):
                rescan = True
            elif mask & (flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED):
                self._directory_lost()
                return
            elif event.name.startswith(".") and mask & flags.MOVED_TO:
                rescan = True  # e.g. a `..data` symlink swap: files may resolve elsewhere now
            elif not is_policy_file(event.name) or mask & flags.ISDIR:
                continue
            elif mask & (flags.CLOSE_WRITE | flags.MOVED_TO):
                self._load(event.name)
            elif mask & (flags.DELETE | flags.MOVED_FROM):
                self._remove(self._origin(event.name))
        if rescan:
            self.rescan()

    def _directory_lost(self) -> None:
        """The directory was removed or moved: its files are gone; watch for it to return."""
        log.error("policy directory %s was removed or moved; waiting for it", self.directory)
        self._unwatch()
        for origin in sorted(self._digests):
            self._remove(origin)
        self._rewatch = asyncio.get_running_loop().create_task(self._wait_for_directory())

    async def _wait_for_directory(self) -> None:
        while True:
            await asyncio.sleep(self._retry_s)
            if self.directory.is_dir():
                try:
                    self._watch()
                except OSError as exc:
                    log.error("cannot watch %s: %s", self.directory, exc)
                    continue
                log.info("policy directory %s is back", self.directory)
                return

    def _load(self, name: str) -> None:
        assert self._sink is not None
        origin = self._origin(name)
        try:
            data = (self.directory / name).read_bytes()
        except FileNotFoundError:
            self._remove(origin)  # gone before we read it; its DELETE follows
            return
        except OSError as exc:
            self._sink.source_failed(origin, PolicyError(origin, 0, "", f"cannot read: {exc}"))
            return
        digest = hashlib.sha256(data).digest()
        if self._digests.get(origin) == digest:
            return
        self._digests[origin] = digest
        try:
            text = data.decode("utf-8")
            policies = parse_policies(text, origin)
        except UnicodeDecodeError as exc:
            self._sink.source_failed(origin, PolicyError(origin, 0, "", f"not UTF-8: {exc}"))
        except PolicyError as exc:
            self._sink.source_failed(origin, exc)
        else:
            self._sink.source_loaded(origin, policies)

    def _remove(self, origin: str) -> None:
        assert self._sink is not None
        if self._digests.pop(origin, None) is not None:
            self._sink.source_removed(origin)


class StoreSource:
    """Cluster-wide policies under `nova/v1/policies/<ns>/<name>`, one per key."""

    def __init__(
        self,
        store: Store,
        *,
        prefix: str = keys.POLICIES,
        wait_s: float = 60.0,
        retry_s: float = 1.0,
        max_retry_s: float = 30.0,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.name = f"store {prefix}"
        self._wait_s = wait_s
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._sink: PolicySink | None = None
        self._seen: dict[str, int] = {}  # key -> modify index last reported
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, sink: PolicySink) -> None:
        self._sink = sink
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def wait_synced(self, timeout: float) -> bool:  # noqa: ASYNC109
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._synced.wait()
        return self._synced.is_set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        index, delay = 0, self._retry_s
        while True:
            try:
                current, entries = await self.store.watch(self.prefix, index, self._wait_s)
            except StoreError as exc:
                # Keep every policy as it is: the store being away is no reason to open up.
                log.warning(
                    "policy watch on %s failed (retry in %.1fs): %s", self.prefix, delay, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_retry_s)
                continue
            delay = self._retry_s
            if current < index:
                index = 0  # the store's index went backwards: resync from scratch
                continue
            self._sync({e.key: (e.modify_index, e.value) for e in entries})
            self._synced.set()
            index = current

    def _sync(self, entries: dict[str, tuple[int, bytes]]) -> None:
        assert self._sink is not None
        for key in sorted(set(self._seen) - set(entries)):
            del self._seen[key]
            self._sink.source_removed(STORE_ORIGIN_PREFIX + key)
        for key, (modify_index, value) in sorted(entries.items()):
            if self._seen.get(key) == modify_index:
                continue
            self._seen[key] = modify_index
            origin = STORE_ORIGIN_PREFIX + key
            try:
                self._sink.source_loaded(origin, parse_store_value(key, value, self.prefix))
            except PolicyError as exc:
                self._sink.source_failed(origin, exc)


def parse_store_value(key: str, value: bytes, prefix: str = keys.POLICIES) -> list[NetworkPolicy]:
    """The one policy a store key holds; its namespace and name must be the key's."""
    origin = STORE_ORIGIN_PREFIX + key
    parts = key[len(prefix) :].split("/") if key.startswith(prefix) else []
    if len(parts) != 2 or not all(parts):
        raise PolicyError(origin, 0, "", f"policy keys are {prefix}<namespace>/<name>")
    namespace, name = parts
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(origin, 0, "", f"not UTF-8: {exc}") from None
    policies = parse_policies(text, origin, default_namespace=namespace)
    if len(policies) != 1:
        raise PolicyError(origin, 0, "", f"holds {len(policies)} policies; a key holds one")
    (policy,) = policies
    if (policy.namespace, policy.name) != (namespace, name):
        raise PolicyError(
            origin, policy.line, "metadata",
            f"policy {policy.key} does not match its key (expected {namespace}/{name})",
        )  # fmt: skip
    return policies
