# Two commands on a fresh machine: `make demo` and `make test` (both create .venv when it is missing).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on the CI machines; elsewhere pip fetches the same release.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv demo example test test-slow test-all lint format reference clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/python -m lightning_optloss.demo

# Regenerates the committed example store mlruns_example/ (four short runs, about a minute on a CPU).
example: venv
	$(BIN)/python -m lightning_optloss.example --output mlruns_example

test: venv
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: venv
	$(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) demo_mlruns .pytest_cache .ruff_cache lightning_logs *.egg-info
