# Bastion developer entry points.  Works on a fresh Debian 12 machine as root with only
# python3 (and make) present; every step is skipped when already done, so a second
# `make setup` takes a few seconds.
#
#   make setup     host packages, cgroup fix, .venv, editable install, sandbox agent and image
#   make serve     setup, then run the server (HOST=127.0.0.1 PORT=8080)
#   make test      setup, then the whole test suite (PYTEST_ARGS="-k foo -x" to narrow)
#   make lint      ruff check, ruff format --check, mypy --strict
#   make bench     setup, then the benchmarks (BENCH_ARGS="--quick", CLUSTER=1)
#   make clean     remove the venv and caches (make clean-images: the built images too)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080
PYTEST_ARGS ?=
BENCH_ARGS ?=
IMAGES_DIR ?= $(or $(BASTION_IMAGES_DIR),/var/lib/bastion/images)
export BASTION_IMAGES_DIR := $(IMAGES_DIR)

.PHONY: help setup host-packages prepare-host agent image serve test lint bench clean clean-images

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

setup: host-packages prepare-host $(STAMP) agent image

host-packages:
	@PYTHON=$(PYTHON) bash scripts/install-host-packages.sh

# crun refuses hybrid-cgroup hosts with a stray v2 controller; the server applies the
# same fix at start-up (bastion_server/runtime/host.py), this runs it once for setup.
prepare-host: $(STAMP)
	@$(BIN)/python -m bastion_server.runtime.host

# A venv without pip (python3-venv was missing when it was made) is made again.
$(BIN)/pip: | host-packages
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)

# Editable install: source edits need nothing; a changed pyproject.toml reinstalls.
$(STAMP): pyproject.toml | $(BIN)/pip
	$(BIN)/pip install --disable-pip-version-check --quiet -e '.[dev]'
	touch $@

# The static agent every sandbox runs as PID 1 (gcc, libc6-dev from host-packages), built
# beside its source, where `bastion serve` looks for it; a build of the current source
# (and flags) is reused at once, a changed source is built again.  The server never
# compiles it: without it, it refuses to start and says to run `make setup`.
agent: $(STAMP) | host-packages
	@$(BIN)/python -m bastion_server.runtime.agent_build

# The builder itself decides: an image of the current recipe is reused at once.
image: $(STAMP) | prepare-host
	@$(BIN)/python -m bastion_server.image build

serve: setup
	exec $(BIN)/bastion serve --host $(HOST) --port $(PORT)

test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy --strict
	MYPYPATH=src $(BIN)/mypy --strict bench

# CLUSTER=1: also the cluster benchmarks (a Ray cluster of this machine, a gateway).
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	@if [ -n "$(CLUSTER)" ]; then \
		$(BIN)/python bench/cluster.py && $(BIN)/python bench/cluster_data_plane.py; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

clean-images:
	rm -rf $(IMAGES_DIR)
