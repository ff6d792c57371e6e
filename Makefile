# Two commands for a fresh machine: `make demo` and `make test`. Both install into .venv first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= token

.PHONY: setup demo test lint bench-mining clean

# pip's and the build backend's output goes to .venv/setup.log (pip -q still prints the backend's notices);
# on failure its last lines are shown
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing mel-ray and its dependencies into $(VENV) (log: $(VENV)/setup.log)"
	@{ $(BIN)/python -m pip install --upgrade pip && \
	   $(BIN)/python -m pip install -c constraints.txt -e ".[dev]"; } > $(VENV)/setup.log 2>&1 || \
	 { tail -n 40 $(VENV)/setup.log; echo "setup failed; the whole log: $(VENV)/setup.log"; exit 1; }
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	@$(BIN)/mel-ray demo --config configs/demo.yaml --output demo_out

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check mel_ray jobs tests benchmarks

bench-mining: setup
	$(BIN)/python benchmarks/bench_mining.py

clean:
	rm -rf demo_out logs .pytest_cache
