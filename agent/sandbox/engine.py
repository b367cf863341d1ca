"""One wasmtime engine configuration for every Nova process.

Compiled artifacts are only valid for the engine configuration, wasmtime
version and host CPU features that produced them, so all three go into
`engine_fingerprint()`, which names the cache directory.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform

import wasmtime

# Epoch interruption is how timeouts stop runaway guests: a ticker bumps the
# engine's epoch and a store past its deadline traps. It is far cheaper than fuel.
_ENGINE_SETTINGS: dict[str, object] = {
    "epoch_interruption": True,
    "cranelift_opt_level": "speed",
}
EPOCH_TICK_S = 0.010


def wasmtime_version() -> str:
    return importlib.metadata.version("wasmtime")


@functools.cache
def cpu_features() -> str:
    """The host CPU's feature flags (x86 'flags' line, or the ISA name elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine()


@functools.cache
def engine_fingerprint() -> str:
    """Short stable id of (wasmtime version, engine settings, CPU features)."""
    material = "|".join(
        [
            wasmtime_version(),
            platform.machine(),
            repr(sorted(_ENGINE_SETTINGS.items())),
            cpu_features(),
        ]
    )
    return f"wasmtime-{wasmtime_version()}-{hashlib.sha256(material.encode()).hexdigest()[:16]}"


def make_config(*, parallel_compilation: bool = True) -> wasmtime.Config:
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.cranelift_opt_level = "speed"
    # Compilation threads must not exist in a process that forks workers.
    config.parallel_compilation = parallel_compilation
    return config


def make_engine(*, parallel_compilation: bool = True) -> wasmtime.Engine:
    return wasmtime.Engine(make_config(parallel_compilation=parallel_compilation))
