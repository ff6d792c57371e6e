# Two commands for a fresh machine: `make demo` and `make test`. Both install into .venv first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= token

.PHONY: setup demo test lint bench-mining clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/mel-ray demo --config configs/demo.yaml --output demo_out

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check mel_ray jobs tests benchmarks

bench-mining: setup
	$(BIN)/python benchmarks/bench_mining.py

clean:
	rm -rf demo_out .pytest_cache
