# Nova — the README's commands. Every target that runs code starts with the
# idempotent setup, so `make run` or `make test` alone works on a fresh host.
SHELL := /bin/bash
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup run test test-unit test-linux test-cluster bench lint doctor examples consul clean help lab lab-down

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

setup:  ## install Debian packages, .venv, example apps and Consul (idempotent)
	@scripts/setup.sh

examples:  ## build the example wasm apps (examples/build/*.wasm)
	@$(MAKE) -s -C examples

consul:  ## build the pinned Consul release from its Go module if absent
	@scripts/build-consul.sh

run: setup  ## run examples/build/hello.wasm on an embedded single-host Nova
	$(PY) -m nova.cli.main run examples/build/hello.wasm --env NAME=nova -- from make run

test: setup  ## the whole suite: unit, linux (root) and cluster (real Consul)
	scripts/run-tests.sh

test-unit: setup  ## only the tests that need neither root nor Consul
	$(PY) -m pytest tests/unit

bench: setup  ## every benchmark; JSON lands in bench/results/
	$(PY) -m bench all

lint: setup  ## ruff and mypy, both must be clean
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

doctor: setup  ## what this host can do: cgroups, BPF, tc, VXLAN, 8021q, nftables, bcc, Consul
	@$(PY) -m nova.cli.main doctor

LAB_HOSTS ?= 3
LAB_FLAGS ?= --nova --network
lab: setup  ## a multi-host lab here: LAB_HOSTS netns hosts, Consul, agents, coordinators (root)
	$(PY) -m tests.cluster.lab up --hosts $(LAB_HOSTS) $(LAB_FLAGS)

lab-down:  ## remove every lab `make lab` built
	$(PY) -m tests.cluster.lab down

clean:  ## remove build outputs (not .venv, not the Consul build cache)
	rm -rf examples/build .pytest_cache .mypy_cache .ruff_cache
