# Two commands on a fresh machine: `make demo` and `make test` (both create .venv when it is missing).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on the CI machines; elsewhere pip fetches the same release.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# Debian's chromium, driven by Playwright for Python (Playwright's own browser download cannot work here).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo example test test-slow test-all test-browser docs lint format reference clean

venv: $(VENV)/.installed

# The tf extra (tensorflow-cpu) gives TFCheckpoint's tests TF's checkpoint reader.
# DeepSpeed (for its CPU tests) is built against the torch above: without build isolation, which would fetch
# another torch (a CUDA build of several GB) into the build environment, and without its compiled ops.
DEEPSPEED ?= deepspeed>=0.19.8

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,tf]"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation "$(DEEPSPEED)"
	touch $@

demo: venv
	$(BIN)/python -m lightning_optloss.demo

# Regenerates the committed example store mlruns_example/ (four short runs, about a minute on a CPU).
example: venv
	$(BIN)/python -m lightning_optloss.example --output mlruns_example

test: venv
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: venv
	$(BIN)/python -m pytest -m "slow and not gpu and not browser" $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest -m "not gpu and not browser" $(PYTEST_ARGS)

# Headless Chromium through the MLflow UI on mlruns_example/ and through the documentation site (built with
# --strict into a temporary folder); about two minutes, plus the chromium install the first time; screenshots
# in tests/artifacts/.
test-browser: $(VENV)/.docs-installed
	@test -x "$(CHROMIUM)" || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install --quiet "playwright>=1.45"
	CHROMIUM=$(CHROMIUM) LIGHTNING_OPTLOSS_BROWSER=required $(BIN)/python -m pytest -m browser $(PYTEST_ARGS)

# The documentation site (MkDocs Material, API pages from the docstrings by mkdocstrings) into site/. --strict: a
# broken link, anchor or ::: reference fails the build. The docs extra is installed into .venv the first time.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) site demo_mlruns .pytest_cache .ruff_cache lightning_logs *.egg-info tests/artifacts
