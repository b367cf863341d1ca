"""Where Nova keeps things on a host, with the environment overrides.

root (a real deployment):          another user (a developer's laptop):
  state   /var/lib/nova              $XDG_STATE_HOME/nova (~/.local/state/nova)
  cache   /var/lib/nova/cache        $XDG_CACHE_HOME/nova (~/.cache/nova)
  socket  /run/nova/agent.sock       $XDG_RUNTIME_DIR/nova/agent.sock (or /tmp/nova-$UID/)

NOVA_STATE_DIR, NOVA_CACHE_DIR and NOVA_SOCKET override each one.

Container cgroups (root only) live under `<hierarchy>/nova/containers/<id>`;
NOVA_CGROUP_ROOT (or `nova-agent --cgroup-root`) names another root.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _is_root() -> bool:
    return os.geteuid() == 0


def state_dir() -> Path:
    if env := os.environ.get("NOVA_STATE_DIR"):
        return Path(env)
    if _is_root():
        return Path("/var/lib/nova")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "nova"


def cache_dir() -> Path:
    if env := os.environ.get("NOVA_CACHE_DIR"):
        return Path(env)
    if _is_root():
        return state_dir() / "cache"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nova"


def socket_path() -> Path:
    if env := os.environ.get("NOVA_SOCKET"):
        return Path(env)
    if _is_root():
        return Path("/run/nova/agent.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/nova-{os.getuid()}"
    return Path(runtime) / "nova" / "agent.sock"


def cgroup_root() -> str:
    """The name of Nova's cgroup root in each hierarchy (a relative path)."""
    return os.environ.get("NOVA_CGROUP_ROOT") or "nova"


def store_path() -> Path:
    return state_dir() / "state.db"


def containers_dir() -> Path:
    return state_dir() / "containers"


def socket_answers(path: Path) -> bool:
    """True when something accepts connections on the unix socket at `path`."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False
