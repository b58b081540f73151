# Commands for a fresh machine (only Python 3.11 needed); each creates .venv and installs on first use:
#   make run        -> `kedro run` on the bundled default
#   make test       -> the fast tests (not `slow`: no whole pipeline, subprocess, server, notebook
#                      or several processes), ~3 min on 2 cores
#   make test-all   -> every test (CI)
#   make reproduce  -> the default run on a fresh copy, compared with benchmarks/results/default_metrics.json
#   make docs       -> the documentation site, mkdocs build --strict (site/)
#   make gpu-check  -> the GPU paths on one CUDA device (scripts/gpu_check.py)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export KEDRO_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-all reproduce gpu-check lint docs viz mlflow-ui clean-data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# torch first, pinned: pip takes the CPU wheel when one is available locally
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/kedro run $(ARGS)

test: setup
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-all: setup
	$(BIN)/python -m pytest $(ARGS)

reproduce: setup
	$(BIN)/python scripts/reproduce.py $(ARGS)

gpu-check: setup
	$(BIN)/python scripts/gpu_check.py $(ARGS)

lint: setup
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/lint-imports

# the documentation site (docs/ -> site/); --strict: a broken link or a missing page fails
docs: setup
	$(BIN)/mkdocs build --strict

# the UIs shell out to the venv's executables, so put it on PATH
viz: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/kedro viz run $(ARGS)

mlflow-ui: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/kedro mlflow ui $(ARGS)

clean-data:
	find data/0[2-8]_* -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
