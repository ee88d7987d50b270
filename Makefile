# `make demo` runs a local swarm generating text with SmolLM2; `make test` runs the test suite.
# Both create and reuse a virtual environment in .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv lint test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch 2.13 that this machine carries; a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# ruff (format check and lint) and mypy, configured in pyproject.toml
lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	mkdir -p .cache/typecheck/petal
	for p in protocol kernels daemon ctl; do ln -sfn ../../../$$p .cache/typecheck/petal/$$p; done
	$(VENV)/bin/mypy

test: venv lint
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/petald pull smollm2
	$(PY) -m petal.daemon.demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
