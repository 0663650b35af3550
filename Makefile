# Quick start: `make demo` (a local cluster computes pi), `make test` (the whole suite),
# `make lab` (JupyterLab on notebooks/). Each creates .venv with Python 3.11 if needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test check bench lab install clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "cloudlab needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Modules are compiled to bytecode when first imported rather than all at install: the
# install takes a third of the time, and most installed modules are never imported.
PIP_INSTALL := $(BIN)/python -m pip install -q --no-compile

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

# In one go (one resolution), which installs what .installed stands for too.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e '.[test]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/cloudlab run pi --engines 4 --samples 2e9

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier, in under a minute from a fresh clone: style, types, and the contract suite
# and membership tests on in-process engines (threads of the test process, faults
# scripted). The type check (the slowest part) runs beside the tests, on the other core.
check: $(VENV)/.installed-test
	$(BIN)/python -m ruff check cloudlab tests
	$(BIN)/python -m mypy & types=$$!; \
	$(BIN)/python -m pytest -q tests/fast $(PYTEST_ARGS); tests=$$?; \
	wait $$types && exit $$tests

# cloudlab against raw ipyparallel and raw Dask; BENCH_ARGS=--quick for the 2-minute run.
bench: $(VENV)/.installed
	$(BIN)/cloudlab bench $(BENCH_ARGS)

# JupyterLab refuses to run as root unless told; containers and Binder-like machines often are root.
lab: $(VENV)/.installed
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root,)

clean:
	rm -rf $(VENV) build *.egg-info
