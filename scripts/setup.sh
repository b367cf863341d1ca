#!/usr/bin/env bash
# `make setup`: everything Nova needs on a Debian 12 host, idempotent and
# fast when already done (one line per step, details only on failure).
#
#   1. Debian packages (installed only if dpkg-query says one is missing)
#   2. /lib/modules/$(uname -r)/build -> Debian's linux-headers-amd64 (for bcc)
#   3. .venv (with system site packages, for Debian's `import bcc`) and
#      `pip install -e '.[dev]'` when pyproject.toml changed
#   4. the example wasm apps (make -C examples)
#   5. Consul, built once from its Go module (scripts/build-consul.sh)
#
# See docs/setup.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
    clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32 # examples/: C -> wasm32-wasi
    wrk                                                 # bench/: HTTP load generator
    python3-venv python3-bpfcc bpfcc-tools              # .venv; eBPF policy backend (bcc)
    linux-headers-amd64                                 # kernel headers for bcc
    nftables iptables iproute2 iputils-ping             # nftables backend; netns, veth, tc; probes
    e2fsprogs                                           # encrypted volumes: mkfs.ext4 -O encrypt
    build-essential git ca-certificates
)

step() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

# How to run a command as root: directly, or through sudo when we are not root.
AS_ROOT=()
need_root() {
    if ((EUID == 0)); then
        AS_ROOT=()
    elif command -v sudo >/dev/null; then
        AS_ROOT=(sudo --)
    else
        die "need root to $1 (run as root, or install sudo)"
    fi
}

# Run a command with its output captured; on failure show the tail and stop.
quiet() {
    local what=$1 log rc=0
    shift
    log=$(mktemp "${TMPDIR:-/tmp}/nova-setup.XXXXXX")
    "$@" >"$log" 2>&1 || rc=$?
    if ((rc != 0)); then
        tail -n 30 "$log" >&2
        die "$what failed (exit $rc): $* — full output in $log"
    fi
    rm -f "$log"
}

debian_packages() {
    command -v dpkg-query >/dev/null || die "dpkg-query not found: this script supports Debian 12 only"
    local installed missing=() p
    # Installed packages have status "ii"; unknown ones print nothing on stdout.
    installed=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "${PACKAGES[@]}" 2>/dev/null |
        awk '$1 == "ii" { print $2 }' || true)
    for p in "${PACKAGES[@]}"; do
        grep -qxF "$p" <<<"$installed" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        step "debian packages ok (${#PACKAGES[@]})"
        return
    fi
    need_root "install ${missing[*]}"
    step "installing debian packages: ${missing[*]}"
    quiet "apt-get update" "${AS_ROOT[@]}" apt-get update -q
    quiet "apt-get install" "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# bcc compiles its programs against /lib/modules/$(uname -r)/build (and, in
# Debian's split layout, .../source). Our kernels are custom builds with no
# headers package; the network programs only use stable UAPI structs, so
# Debian's generic linux-headers-amd64 work. Link them the way Debian links its
# own kernels: build -> linux-headers-<v>-amd64, source -> linux-headers-<v>-common.
# Never replace an existing link or directory.
kernel_headers() {
    local dir hdr ver common linked=()
    dir=/lib/modules/$(uname -r)
    if [[ ! -e $dir/build && ! -L $dir/build ]]; then
        hdr=$(find /usr/src -maxdepth 1 -name 'linux-headers-*-amd64' -type d 2>/dev/null | sort -V | tail -n 1)
        [[ -n $hdr ]] || die "no /usr/src/linux-headers-*-amd64 to link as $dir/build (is linux-headers-amd64 installed?)"
        need_root "link $dir/build"
        "${AS_ROOT[@]}" mkdir -p "$dir" || die "cannot create $dir"
        "${AS_ROOT[@]}" ln -s "$hdr" "$dir/build" || die "cannot link $dir/build -> $hdr"
        linked+=("$dir/build -> $hdr")
    fi
    if [[ -L $dir/build && ! -e $dir/build ]]; then
        step "warning: $dir/build is a dangling link to $(readlink "$dir/build"); bcc will fail (left as is)"
        return
    fi
    hdr=$(readlink -f "$dir/build")
    ver=${hdr##*/linux-headers-}
    common=/usr/src/linux-headers-${ver%-amd64}-common
    if [[ $hdr == /usr/src/linux-headers-*-amd64 && -d $common && ! -e $dir/source && ! -L $dir/source ]]; then
        need_root "link $dir/source"
        "${AS_ROOT[@]}" ln -s "$common" "$dir/source" || die "cannot link $dir/source -> $common"
        linked+=("$dir/source -> $common")
    fi
    if ((${#linked[@]})); then
        local l
        for l in "${linked[@]}"; do step "kernel headers: linked $l"; done
    else
        step "kernel headers ok ($dir/build)"
    fi
}

python_venv() {
    local stamp=.venv/.nova-pyproject.sha256 want
    if [[ ! -x .venv/bin/python ]]; then
        step "creating .venv"
        quiet "python3 -m venv" /usr/bin/python3 -m venv --system-site-packages .venv
    fi
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
        step ".venv ok"
        return
    fi
    step "pip install -e '.[dev]' (pyproject.toml changed)"
    quiet "pip install" .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
    printf '%s\n' "$want" >"$stamp"
}

examples() {
    quiet "make -C examples" make -s -C examples
    step "examples ok (examples/build)"
}

debian_packages
kernel_headers
python_venv
examples
scripts/build-consul.sh || die "building Consul failed (see above)"
