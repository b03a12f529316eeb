# rayrack: `make lab` builds the podman lab and converges site.yml on it; `make test` runs every check.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Tools call each other by name (molecule runs ansible-playbook): put the venv first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)
LAB ?= lab
WORKERS ?= 2
# The nodes' Debian release (lab.py --dist: bookworm or trixie); empty: lab.py's default.
DIST ?=
# LAB_PACKAGES='REQ ...': the Ray venvs' extra packages instead of lab.py's (PyTorch's CPU build); empty for none.
LAB_UP_OPTIONS := $(if $(DIST),--dist $(DIST)) \
	$(if $(filter-out undefined,$(origin LAB_PACKAGES)),--python-packages '$(LAB_PACKAGES)')
# Each lab keeps its own fact cache, removed with it.
LAB_ANSIBLE := ANSIBLE_CACHE_PLUGIN_CONNECTION=$(CURDIR)/inventories/$(LAB)/.facts $(BIN)/ansible-playbook

.PHONY: help venv host-deps lab lab-status lab-down test lint unit integration integration-trixie bench bench-cluster bench-scale bench-agent bench-idle bench-gateway nvml-sim clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## Controller tools (pinned in requirements.txt), the rayrack CLI and the agent it uses in .venv

$(VENV)/.installed: requirements.txt pyproject.toml packaging/ray-agent/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt \
	  -e packaging/ray-agent -e .
	touch $@

host-deps: venv ## Host packages the lab and tests use (podman, debootstrap, promtool, valgrind), installed when missing
	$(BIN)/python tests/lab/lab.py host-deps

lab: host-deps ## Build lab nodes, converge site.yml, show the Ray cluster and metrics
	$(BIN)/python tests/lab/lab.py up --name $(LAB) --workers $(WORKERS) $(LAB_UP_OPTIONS)
	$(LAB_ANSIBLE) -i inventories/$(LAB) site.yml
	$(BIN)/python tests/lab/lab.py status --name $(LAB)

lab-status: venv ## Show the lab's Ray cluster and where to reach it
	$(BIN)/python tests/lab/lab.py status --name $(LAB)

lab-down: venv ## Remove what `make lab` created (the node image stays cached)
	$(BIN)/python tests/lab/lab.py down --name $(LAB)

test: lint unit integration ## Everything CI runs: lint, unit tests, the molecule scenarios and lab tests

lint: venv ## yamllint, ansible-lint (production profile), ruff, dashboards in sync with their generator
	$(BIN)/yamllint --strict .
	$(BIN)/ansible-lint --offline
	$(BIN)/ruff check .
	$(BIN)/python -m monitoring.grafana.generate --check

unit: host-deps ## pytest: everything that needs no lab nodes
	$(BIN)/pytest -m "not lab"

# Scenario `gpu` runs whole. For `cluster`, start from no nodes (`--destroy=never` also skips the first
# destroy); keep them for the lab tests, then remove them whatever happened. The day-2 tests change the lab
# for good (membership, Ray version, teardown), so they run last.
integration: host-deps nvml-sim ## molecule scenarios `gpu` and `cluster` (converge, idempotence, check, verify), lab tests
	$(BIN)/molecule test -s gpu
	$(BIN)/molecule destroy -s cluster >/dev/null; \
	$(BIN)/molecule test -s cluster --destroy=never; rc=$$?; \
	if [ $$rc -eq 0 ]; then $(BIN)/pytest --durations=0 -m "lab and not day2" && $(BIN)/pytest --durations=0 -m day2; rc=$$?; fi; \
	$(BIN)/molecule destroy -s cluster >/dev/null; exit $$rc

integration-trixie: host-deps ## molecule scenario `trixie`: converge and verify on Debian 13 nodes
	$(BIN)/molecule test -s trixie

bench: bench-cluster bench-scale bench-agent bench-idle bench-gateway ## All benchmarks

bench-cluster: host-deps ## site.yml cold and re-run times, tuned vs stock Ansible; cluster-ready vs plain `ray start`
	$(BIN)/python tests/bench/bench_cluster.py

bench-scale: host-deps ## site.yml cold and re-run on 2, 4 and 8 workers: cost per node, 100/500-node projection, super-linear tasks, config sizes
	$(BIN)/python tests/bench/bench_scale.py

# sim: the peers read the simulated demo-8gpu node; real: this machine's GPUs, through its own libnvidia-ml.so.1.
BENCH_AGENT_NVML ?= sim
bench-agent: venv nvml-sim ## ray_agent: CPU per scrape, RSS, /metrics latency; vs nvitop-exporter and Ray on simulated GPUs
	$(BIN)/python tests/bench/bench_agent.py --nvml $(BENCH_AGENT_NVML)

NVML_SIM_SRC := ray_agent/gpu/nvml_sim
# The scenario the library reads when RAYRACK_NVML_SCENARIO is not set. The nvml_sim role passes its own
# (under rayrack_config_dir) with a library path of its own; this is the one of rayrack_config_dir's default.
NVML_SIM_CONFIG ?= /etc/rayrack/nvml-sim.conf
NVML_SIM_LIB ?= build/nvml-sim/libnvidia-ml.so.1
nvml-sim: $(NVML_SIM_LIB) ## The simulated libnvidia-ml.so.1 (GPUs from a scenario), built with this machine's gcc

$(NVML_SIM_LIB): $(NVML_SIM_SRC)/nvml_sim.c $(NVML_SIM_SRC)/nvml_sim_unsupported.h
	@mkdir -p $(@D)
	$(CC) -std=gnu11 -O2 -g -fPIC -fvisibility=hidden -Wall -Wextra -Werror -shared \
	  -DSCENARIO_DEFAULT='"$(NVML_SIM_CONFIG)"' \
	  -Wl,-soname,libnvidia-ml.so.1 -Wl,--no-undefined -o $@.tmp $< -lm -lpthread
	mv $@.tmp $@

bench-idle: venv ## Idle guard: detection latency vs window + interval, false positives on gap traces
	$(BIN)/python tests/bench/bench_idle.py

bench-gateway: venv ## rayrack-gateway: GET /api/jobs/ and submit latency through it (TLS) vs direct to Ray, its RSS
	$(BIN)/python tests/bench/bench_gateway.py

clean: lab-down ## Remove the lab, caches and the venv
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
