#!/usr/bin/env bash
# Build the pinned Consul release from its official Go module, once, into a
# cache outside the repository, and link .venv/bin/consul to it.
#
# Why build: Debian does not package Consul.
# Why 1.16.1: it is the last Consul release under the MPL-2.0. Later releases
# are under the Business Source License, whose grant excludes products that
# compete with HashiCorp's; Nova competes with Nomad, so it must not depend on
# a BSL Consul. Do not raise this pin past 1.16.1.
#
# Why a throwaway module: `go install github.com/hashicorp/consul@v…` refuses
# because Consul's go.mod has replace directives. Requiring Consul from a
# throwaway module (`go mod init`, `go get consul@v…`, `go build consul`)
# builds the same main package, with the replaces ignored.
#
# Environment:
#   NOVA_CACHE_DIR  cache root (default /var/cache/nova-build); the binary is
#                   $NOVA_CACHE_DIR/consul-v1.16.1/consul.
#   GO              the go command (default: `go` on PATH, else /usr/local/go/bin/go).
#   FORCE=1         rebuild even if the cached binary is good.
set -euo pipefail

CONSUL_VERSION=1.16.1
CONSUL_MODULE=github.com/hashicorp/consul
GO_MIN_MINOR=20 # Consul 1.16 needs Go >= 1.20

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${NOVA_CACHE_DIR:-/var/cache/nova-build}
CACHE_DIR=$CACHE_ROOT/consul-v$CONSUL_VERSION
BIN=$CACHE_DIR/consul
LINK=$ROOT/.venv/bin/consul

say() { printf 'consul: %s\n' "$*"; }
die() {
    printf 'consul: error: %s\n' "$*" >&2
    exit 1
}

# Prints the binary's version line; fails if it is not exactly our pin.
verify() {
    local out
    out=$("$1" version 2>&1 | head -n 1) || true
    [[ $out == "Consul v$CONSUL_VERSION" ]] || {
        printf '%s\n' "${out:-<no output>}"
        return 1
    }
}

find_go() {
    if [[ -n ${GO:-} ]]; then
        command -v "$GO" >/dev/null || die "GO=$GO is not an executable"
    elif command -v go >/dev/null; then
        GO=go
    elif [[ -x /usr/local/go/bin/go ]]; then
        GO=/usr/local/go/bin/go
    else
        die "Go not found (need Go >= 1.$GO_MIN_MINOR on PATH or at /usr/local/go/bin/go) to build Consul v$CONSUL_VERSION"
    fi
    local v
    v=$("$GO" env GOVERSION) || die "'$GO env GOVERSION' failed"
    if ! [[ $v =~ ^go1\.([0-9]+) ]] || ((BASH_REMATCH[1] < GO_MIN_MINOR)); then
        die "$v is too old to build Consul v$CONSUL_VERSION (need Go >= 1.$GO_MIN_MINOR)"
    fi
    GO_VERSION=$v
}

build() {
    find_go
    local work log start
    work=$(mktemp -d "${TMPDIR:-/tmp}/nova-consul-build.XXXXXX")
    # shellcheck disable=SC2064 # expand $work now
    trap "rm -rf '$work'" EXIT
    log=$work/build.log
    start=$SECONDS
    say "building Consul v$CONSUL_VERSION from its Go module with $GO_VERSION (several minutes, once)"
    say "progress: tail -f $log"
    (
        cd "$work"
        # No toolchain downloads: build with the Go that is installed.
        export GOTOOLCHAIN=local GOFLAGS=-mod=mod
        set -x
        "$GO" mod init novaconsulbuild
        "$GO" get "$CONSUL_MODULE@v$CONSUL_VERSION"
        "$GO" build -trimpath -ldflags '-s -w' -o "$BIN.tmp.$$" "$CONSUL_MODULE"
    ) >"$log" 2>&1 || {
        local keep
        keep=$CACHE_ROOT/consul-v$CONSUL_VERSION-build-failed.log
        cp "$log" "$keep" 2>/dev/null || keep=$log
        rm -f "$BIN.tmp.$$"
        tail -n 25 "$log" >&2
        die "go build of Consul v$CONSUL_VERSION failed (full log: $keep)"
    }
    local got
    got=$(verify "$BIN.tmp.$$") || {
        rm -f "$BIN.tmp.$$"
        die "the freshly built binary reports '$got', expected 'Consul v$CONSUL_VERSION'"
    }
    mv -f "$BIN.tmp.$$" "$BIN"
    rm -f "$CACHE_ROOT/consul-v$CONSUL_VERSION-build-failed.log"
    say "built $BIN in $(((SECONDS - start) / 60))m$(((SECONDS - start) % 60))s"
}

mkdir -p "$CACHE_DIR" || die "cannot create $CACHE_DIR (set NOVA_CACHE_DIR to a writable directory)"

# One build at a time: a second caller waits for the first and reuses its result.
exec 9>"$CACHE_DIR/.lock"
if ! flock -n 9; then
    say "another build of Consul v$CONSUL_VERSION is running; waiting for it"
    flock 9
fi

if [[ -e $BIN && ${FORCE:-0} != 1 ]]; then
    if ! got=$(verify "$BIN"); then
        say "cached $BIN reports '$got', not v$CONSUL_VERSION: rebuilding"
        rm -f "$BIN"
    fi
fi
if [[ ! -e $BIN || ${FORCE:-0} == 1 ]]; then
    build
fi

if [[ -d $ROOT/.venv/bin ]]; then
    if [[ $(readlink "$LINK" 2>/dev/null) != "$BIN" ]]; then
        ln -sfn "$BIN" "$LINK" || die "cannot link $LINK -> $BIN"
    fi
    got=$(verify "$LINK") || die "$LINK reports '$got', expected 'Consul v$CONSUL_VERSION'"
    say "v$CONSUL_VERSION ok (.venv/bin/consul -> $BIN)"
else
    say "v$CONSUL_VERSION ok at $BIN (no .venv yet: 'make setup' links .venv/bin/consul)"
fi
