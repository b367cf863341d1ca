#!/usr/bin/env bash
# The whole suite, as `make test` and CI run it. pytest's exit code 5 ("no
# tests collected") is a failure here: a suite that runs nothing proves nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ "$(id -u)" -ne 0 ]; then
  echo "run-tests: not root: tests/linux (namespaces, cgroups, BPF) will be skipped" >&2
fi
"$PY" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run-tests: pytest collected no tests; failing" >&2
  exit 1
fi
exit "$rc"
