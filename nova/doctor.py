"""`nova doctor`: what this host can do, as a table (or JSON).

Each check is a small function that probes the real host, read-only: it reads
/proc, /sys and the kernel config, runs `--version` style commands, and tries
a BPF map create (closed at once). The only thing it ever creates is a
throwaway network namespace `nova-doctor-<pid>` (deleted again), and only when
the kernel config cannot say whether tc clsact and cls_bpf exist.

It is a report: features that are missing are rows, not errors, and `main`
returns 0 either way. A probe that itself breaks becomes a `warn` row saying
so; it never hides the other rows.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import gzip
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

Status = Literal["ok", "missing", "warn"]

# The Consul release Nova pins (see scripts/build-consul.sh: the last MPL-2.0 release).
CONSUL_VERSION = "1.16.1"
# The controllers a container's cgroup needs.
CGROUP_CONTROLLERS = ("cpu", "memory", "pids")


@dataclass(frozen=True)
class Check:
    """One row of the report."""

    feature: str
    status: Status
    detail: str
    data: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "feature": self.feature,
            "status": self.status,
            "detail": self.detail,
            "data": self.data,
        }


class Outcome(NamedTuple):
    """What a check function finds; `collect` adds the feature name."""

    status: Status
    detail: str
    data: dict[str, object] | None = None


CheckFn = Callable[[], Check]
CHECKS: list[CheckFn] = []


def _check(feature: str) -> Callable[[Callable[[], Outcome]], CheckFn]:
    """Register a check; an exception inside it becomes a `warn` row."""

    def register(fn: Callable[[], Outcome]) -> CheckFn:
        @functools.wraps(fn)
        def run() -> Check:
            try:
                out = fn()
            except Exception as exc:  # a broken probe is reported, not raised
                return Check(feature, "warn", f"probe failed: {type(exc).__name__}: {exc}")
            return Check(feature, out.status, out.detail, dict(out.data or {}))

        CHECKS.append(run)
        return run

    return register


# --------------------------------------------------------------------------
# helpers


class Cmd(NamedTuple):
    """A finished command: rc is -1 when it could not be run at all."""

    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def first_line(self) -> str:
        text = self.out.strip() or self.err.strip()
        return text.splitlines()[0] if text else ""

    def why(self) -> str:
        """The last line of stderr (or stdout): the usual place for the reason."""
        text = self.err.strip() or self.out.strip()
        return text.splitlines()[-1] if text else f"exit {self.rc}"


def _run(argv: Sequence[str], timeout: float = 15.0) -> Cmd:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        return Cmd(-1, "", f"{argv[0]}: not found")
    except subprocess.TimeoutExpired:
        return Cmd(-1, "", f"{argv[0]}: timed out after {timeout:g} s")
    except OSError as exc:
        return Cmd(-1, "", f"{argv[0]}: {exc.strerror or exc}")
    return Cmd(proc.returncode, proc.stdout, proc.stderr)


def _which(name: str) -> str | None:
    """`name` on PATH, else in this interpreter's bin (the .venv, for consul)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.prefix) / "bin" / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class KernelConfig:
    source: str
    values: dict[str, str]  # CONFIG_X -> "y" / "m" / "n" / a value


@functools.cache
def kernel_config() -> KernelConfig | None:
    """The running kernel's build config, from /proc/config.gz or /boot."""
    candidates = [Path("/proc/config.gz"), Path(f"/boot/config-{platform.release()}")]
    for path in candidates:
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode(errors="replace")
        values: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_"):
                key, _, value = line.partition("=")
                values[key] = value.strip('"')
            elif m := re.match(r"# (CONFIG_\w+) is not set", line):
                values[m.group(1)] = "n"
        return KernelConfig(str(path), values)
    return None


def _module_name(name: str) -> str:
    return name.replace("-", "_")


def _module_present(module: str) -> str | None:
    """How a kernel module can be had without loading it: None if it cannot."""
    mod = _module_name(module)
    if Path(f"/sys/module/{mod}").exists():
        return "loaded"
    modules = _read("/proc/modules")
    if modules and any(line.split(" ", 1)[0] == mod for line in modules.splitlines()):
        return "loaded"
    if shutil.which("modprobe") and _run(["modprobe", "-n", "-q", module], timeout=5).ok:
        return "loadable (modprobe -n)"
    base = Path("/lib/modules") / platform.release()
    pattern = re.compile(rf"/{re.escape(mod)}\.ko(\.[a-z]+)?\b".replace("_", "[_-]"))
    for index, how in (("modules.builtin", "built in"), ("modules.dep", "loadable")):
        text = _read(base / index)
        if text and pattern.search(text):
            return f"{how} ({index})"
    return None


class KernelFeature(NamedTuple):
    available: bool | None  # None: cannot tell
    how: str


def kernel_feature(symbol: str, module: str | None = None) -> KernelFeature:
    """Whether the kernel has CONFIG_`symbol` (built in or as a usable module)."""
    config = kernel_config()
    value = config.values.get(f"CONFIG_{symbol}") if config else None
    if value == "y":
        return KernelFeature(True, f"CONFIG_{symbol}=y")
    if value == "m":
        how = _module_present(module) if module else None
        if how:
            return KernelFeature(True, f"CONFIG_{symbol}=m, module {module} {how}")
        return KernelFeature(False, f"CONFIG_{symbol}=m but module {module} is not installed")
    if config is not None:
        reason = "is not set" if value == "n" else "is not in the kernel config"
        return KernelFeature(False, f"CONFIG_{symbol} {reason}")
    # No config: only what modules tell.
    how = _module_present(module) if module else None
    if how:
        return KernelFeature(True, f"module {module} {how}")
    return KernelFeature(None, f"no kernel config to check CONFIG_{symbol}")


def _feature_outcome(what: str, feature: KernelFeature, *, absent: str = "") -> Outcome:
    data: dict[str, object] = {"available": feature.available}
    if feature.available:
        return Outcome("ok", feature.how, data)
    if feature.available is None:
        return Outcome("warn", f"{what}: unknown ({feature.how})", data)
    return Outcome("missing", feature.how + (f": {absent}" if absent else ""), data)


# --------------------------------------------------------------------------
# checks, in report order


@_check("kernel")
def check_kernel() -> Outcome:
    config = kernel_config()
    src = config.source if config else None
    detail = f"Linux {platform.release()} {platform.machine()}; config: {src or 'not found'}"
    data: dict[str, object] = {
        "release": platform.release(),
        "machine": platform.machine(),
        "config": src,
    }
    return Outcome("ok" if config else "warn", detail, data)


_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}


@_check("root")
def check_root() -> Outcome:
    euid = os.geteuid()
    status = _read("/proc/self/status") or ""
    m = re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.MULTILINE)
    eff = int(m.group(1), 16) if m else 0
    lacking = [name for name, bit in _CAPS.items() if not eff >> bit & 1]
    data: dict[str, object] = {"euid": euid, "cap_eff": f"{eff:x}", "lacking": lacking}
    if euid == 0 and not lacking:
        return Outcome("ok", f"uid 0, CapEff {eff:x}", data)
    if euid == 0:
        return Outcome("warn", f"uid 0 but lacking {', '.join(lacking)}", data)
    return Outcome(
        "warn",
        f"uid {euid}: netns, cgroups, BPF and tc need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)",
        data,
    )


class Mount(NamedTuple):
    mount_point: str
    fstype: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(path: str = "/proc/self/mountinfo") -> list[Mount]:
    """Parse mountinfo (proc(5)): fields before ' - ' are per mount, after are per fs."""
    out: list[Mount] = []
    for line in (_read(path) or "").splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        fs = right.split()
        if len(fields) < 5 or len(fs) < 3:
            continue
        out.append(Mount(_unescape(fields[4]), fs[0], tuple(fs[2].split(","))))
    return out


def _v1_controller_names() -> set[str]:
    names = {"cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer", "blkio"}
    for line in (_read("/proc/cgroups") or "").splitlines():
        if line and not line.startswith("#"):
            names.add(line.split()[0])
    return names


@_check("cgroups")
def check_cgroups() -> Outcome:
    known = _v1_controller_names()
    v1: dict[str, str] = {}
    v2_mount: str | None = None
    for mnt in mounts():
        if mnt.fstype == "cgroup":
            for opt in mnt.super_options:
                if opt in known:
                    v1.setdefault(opt, mnt.mount_point)
        elif mnt.fstype == "cgroup2" and v2_mount is None:
            v2_mount = mnt.mount_point
    v2_controllers: list[str] = []
    if v2_mount:
        v2_controllers = (_read(Path(v2_mount) / "cgroup.controllers") or "").split()
    layout = ("hybrid" if v2_mount else "v1") if v1 else ("v2" if v2_mount else "none")
    data: dict[str, object] = {
        "layout": layout,
        "v1": v1,
        "cgroup2_mount": v2_mount,
        "cgroup2_controllers": v2_controllers,
    }
    if layout == "none":
        return Outcome("missing", "no cgroup filesystem mounted", data)

    where: dict[str, str] = {}
    for ctrl in CGROUP_CONTROLLERS:
        if ctrl in v1:
            where[ctrl] = f"v1 {v1[ctrl]}"
        elif ctrl in v2_controllers:
            where[ctrl] = "v2"
    missing = [c for c in CGROUP_CONTROLLERS if c not in where]
    data["controllers"] = where

    if layout == "v2":
        detail = f"v2 unified at {v2_mount}, controllers: {' '.join(v2_controllers) or 'none'}"
    else:
        on_v1 = ", ".join(f"{c}={v1[c]}" for c in CGROUP_CONTROLLERS if c in v1) or "none of ours"
        detail = f"{layout}: on v1 {on_v1}"
        if v2_mount:
            detail += f"; cgroup2 at {v2_mount} (controllers: {' '.join(v2_controllers) or 'none'})"
    if missing:
        return Outcome("warn", f"{detail}; no {', '.join(missing)} controller", data)
    return Outcome("ok", detail, data)


# bpf(2) syscall numbers per architecture.
_BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_MAP_CREATE = 0
_BPF_MAP_TYPE_ARRAY = 2


class _BpfMapCreateAttr(ctypes.Structure):
    _fields_ = (
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    )


def bpf_map_create_probe() -> tuple[int, str]:
    """Create (and close) a 1-entry BPF array map: (0, "") or (errno, message)."""
    nr = _BPF_SYSCALL_NR.get(platform.machine())
    if nr is None:
        return errno.ENOSYS, f"no bpf(2) syscall number known for {platform.machine()}"
    attr = _BpfMapCreateAttr(_BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = int(
        libc.syscall(
            ctypes.c_long(nr),
            ctypes.c_int(_BPF_MAP_CREATE),
            ctypes.byref(attr),
            ctypes.c_uint(ctypes.sizeof(attr)),
        )
    )
    if fd < 0:
        err = ctypes.get_errno()
        return err, f"{errno.errorcode.get(err, str(err))}: {os.strerror(err)}"
    os.close(fd)
    return 0, ""


@_check("bpf syscall")
def check_bpf() -> Outcome:
    err, msg = bpf_map_create_probe()
    data: dict[str, object] = {"errno": err}
    if err == 0:
        return Outcome("ok", "created and closed a BPF array map", data)
    if err == errno.ENOSYS:
        return Outcome("missing", f"bpf(2) unavailable ({msg})", data)
    if err == errno.EPERM and os.geteuid() != 0:
        return Outcome("warn", f"map create refused ({msg}): needs root or CAP_BPF", data)
    return Outcome("missing", f"map create failed ({msg})", data)


@_check("bpf jit")
def check_bpf_jit() -> Outcome:
    raw = _read("/proc/sys/net/core/bpf_jit_enable")
    if raw is None:
        return Outcome("warn", "/proc/sys/net/core/bpf_jit_enable not readable")
    value = raw.strip()
    data: dict[str, object] = {"bpf_jit_enable": value}
    meaning = {"0": "off (interpreter)", "1": "on", "2": "on, debug"}.get(value, value)
    return Outcome(
        "ok" if value in ("1", "2") else "warn", f"bpf_jit_enable={value}: {meaning}", data
    )


@_check("btf")
def check_btf() -> Outcome:
    path = Path("/sys/kernel/btf/vmlinux")
    try:
        size = path.stat().st_size
    except OSError:
        return Outcome("missing", f"{path} absent (kernel without CONFIG_DEBUG_INFO_BTF)")
    return Outcome("ok", f"{path} ({size // 1024} KiB)", {"path": str(path), "bytes": size})


def _probe_clsact_in_netns() -> tuple[bool, str]:
    """Attach clsact + a classic-BPF cls_bpf filter to lo in a throwaway netns."""
    ns = f"nova-doctor-{os.getpid()}"
    add = _run(["ip", "netns", "add", ns])
    if not add.ok:
        return False, f"ip netns add {ns}: {add.why()}"
    try:
        steps = (
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["tc", "-n", ns, "qdisc", "add", "dev", "lo", "clsact"],
            [
                "tc",
                "-n",
                ns,
                "filter",
                "add",
                "dev",
                "lo",
                "ingress",
                "bpf",
                "bytecode",
                "1,6 0 0 4294967295",
            ],
        )
        for argv in steps:
            res = _run(argv)
            if not res.ok:
                return False, f"{' '.join(argv[3:])}: {res.why()}"
        return True, f"probed in netns {ns}"
    finally:
        _run(["ip", "netns", "delete", ns])


@_check("tc clsact + cls_bpf")
def check_tc_clsact() -> Outcome:
    tc = shutil.which("tc")
    if tc is None:
        return Outcome("missing", "tc not found (Debian: iproute2)")
    version = _run([tc, "-V"]).first_line()
    clsact = kernel_feature("NET_SCH_INGRESS", "sch_ingress")  # clsact lives in sch_ingress
    cls_bpf = kernel_feature("NET_CLS_BPF", "cls_bpf")
    data: dict[str, object] = {
        "tc": version,
        "clsact": clsact.available,
        "cls_bpf": cls_bpf.available,
    }
    kernel = f"clsact: {clsact.how}; cls_bpf: {cls_bpf.how}"
    if clsact.available is False or cls_bpf.available is False:
        return Outcome("missing", f"{version}; {kernel}", data)
    if clsact.available and cls_bpf.available:
        return Outcome("ok", f"{version}; {kernel}", data)
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return Outcome("warn", f"{version}; {kernel}; cannot probe (needs root and ip)", data)
    ok, how = _probe_clsact_in_netns()
    data["probe"] = how
    return Outcome("ok" if ok else "missing", f"{version}; {how}", data)


@_check("vxlan")
def check_vxlan() -> Outcome:
    return _feature_outcome("vxlan", kernel_feature("VXLAN", "vxlan"), absent="no VXLAN segments")


@_check("8021q")
def check_8021q() -> Outcome:
    return _feature_outcome(
        "8021q",
        kernel_feature("VLAN_8021Q", "8021q"),
        absent="802.1Q uplink mode unavailable (VXLAN mode only)",
    )


@_check("bridge vlan filtering")
def check_bridge_vlan_filtering() -> Outcome:
    bridge = kernel_feature("BRIDGE", "bridge")
    if bridge.available is False:
        return _feature_outcome("bridge", bridge, absent="no bridges at all")
    filtering = kernel_feature("BRIDGE_VLAN_FILTERING")
    return _feature_outcome(
        "bridge vlan filtering", filtering, absent="802.1Q uplink mode unavailable"
    )


@_check("nftables")
def check_nftables() -> Outcome:
    kernel = kernel_feature("NF_TABLES", "nf_tables")
    nft = shutil.which("nft")
    data: dict[str, object] = {"kernel": kernel.available, "nft": nft}
    if nft is None:
        return Outcome("missing", f"nft not found (Debian: nftables); kernel: {kernel.how}", data)
    res = _run([nft, "--version"])
    if not res.ok:
        return Outcome("warn", f"nft --version failed: {res.why()}", data)
    version = res.first_line()
    data["version"] = version
    if kernel.available is False:
        return Outcome("missing", f"{version}; kernel: {kernel.how}", data)
    return Outcome("ok", f"{version}; kernel: {kernel.how}", data)


# Run in a child process: libbcc is large, and a broken install must not take
# the report down. As root it also compiles and loads a tc (SCHED_CLS)
# program, which is what the eBPF policy backend needs from bcc.
_BCC_PROBE = """
import os, bcc
print(getattr(bcc, "__version__", "unknown version"))
if os.geteuid() == 0:
    b = bcc.BPF(text="int f(struct __sk_buff *skb) { return 0; }")
    b.load_func("f", bcc.BPF.SCHED_CLS)
    print("loaded")
"""


def _bcc_failure(res: Cmd) -> str:
    """The most telling line of a failed bcc probe (a compiler error if any)."""
    lines = [ln.strip() for ln in res.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln or "Unable to find kernel headers" in ln]
    return (errors or lines or [f"exit {res.rc}"])[0 if errors else -1]


@_check("bcc")
def check_bcc() -> Outcome:
    kdir = Path("/lib/modules") / platform.release()
    headers = [kdir / "build", kdir / "source"]
    have_kconfig = any((d / "include/linux/kconfig.h").exists() for d in headers)
    data: dict[str, object] = {"headers": str(kdir / "build"), "headers_complete": have_kconfig}
    res = _run([sys.executable, "-c", _BCC_PROBE], timeout=120)
    out = res.out.split()
    if not out:
        why = _bcc_failure(res)
        return Outcome(
            "missing", f"import bcc failed: {why} (Debian: python3-bpfcc; make setup)", data
        )
    version = out[0]
    data["version"] = version
    if not have_kconfig:
        return Outcome(
            "warn",
            f"bcc {version}, but no kernel headers under {kdir} (make setup links them)",
            data,
        )
    target = f" -> {os.path.realpath(kdir / 'build')}" if (kdir / "build").is_symlink() else ""
    where = f"headers {kdir / 'build'}{target}"
    if not res.ok:
        data["loaded"] = False
        return Outcome(
            "missing", f"bcc {version} cannot build a tc program: {_bcc_failure(res)}", data
        )
    data["loaded"] = "loaded" in out
    if not data["loaded"]:
        return Outcome("ok", f"bcc {version} (not root: no test load); {where}", data)
    return Outcome("ok", f"bcc {version}, compiled+loaded a tc program; {where}", data)


@_check("wasmtime")
def check_wasmtime() -> Outcome:
    try:
        version = importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        return Outcome("missing", "wasmtime (Python package) not installed: make setup")
    wasmtime = importlib.import_module("wasmtime")
    wasmtime.Engine()  # loads the native library
    return Outcome("ok", f"wasmtime-py {version}", {"version": version})


@_check("consul")
def check_consul() -> Outcome:
    consul = _which("consul")
    if consul is None:
        return Outcome("missing", f"consul not on PATH: make setup builds v{CONSUL_VERSION}")
    res = _run([consul, "version"])
    line = res.first_line()
    data: dict[str, object] = {"path": consul, "version": line}
    if not res.ok:
        return Outcome("warn", f"{consul} version failed: {res.why()}", data)
    if line != f"Consul v{CONSUL_VERSION}":
        return Outcome("warn", f"{line} at {consul}; Nova pins v{CONSUL_VERSION}", data)
    return Outcome("ok", f"{line} ({os.path.realpath(consul)})", data)


@_check("wasm toolchain")
def check_wasm_toolchain() -> Outcome:
    clang = shutil.which("clang-14")
    wasm_ld = shutil.which("wasm-ld-14") or shutil.which("wasm-ld")
    parts = {
        "clang-14": clang,
        "wasm-ld": wasm_ld,
        "wasi-libc": "/usr/include/wasm32-wasi"
        if Path("/usr/include/wasm32-wasi/stdio.h").exists()
        else None,
        "compiler-rt wasm32": next(
            (str(p) for p in Path("/usr/lib/llvm-14/lib/clang").glob("*/lib/wasi/*wasm32.a")),
            None,
        ),
    }
    missing = [name for name, where in parts.items() if where is None]
    data: dict[str, object] = dict(parts)
    if not missing:
        version = _run(["clang-14", "--version"]).first_line()
        return Outcome("ok", f"{version}; sysroot /usr (wasm32-wasi)", data)
    status: Status = "missing" if clang is None else "warn"
    return Outcome(
        status,
        f"missing {', '.join(missing)} (Debian: clang-14 lld-14 wasi-libc "
        "libclang-rt-14-dev-wasm32; make setup)",
        data,
    )


# --------------------------------------------------------------------------
# report


def collect() -> list[Check]:
    """Run every check against this host, in report order."""
    return [check() for check in CHECKS]


def format_table(checks: Sequence[Check]) -> str:
    header = ("feature", "status", "detail")
    rows = [header, *((c.feature, c.status, c.detail) for c in checks)]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * len(header[2])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nova doctor",
        description="Report what this host can do for Nova (kernel, cgroups, BPF, tools).",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)
    checks = collect()
    if args.json:
        print(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        print(format_table(checks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
