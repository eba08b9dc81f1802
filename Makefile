# gatewayd: the README's two commands, plus checks and benchmarks.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: run test lint typecheck check system-deps clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(TSTAMP): $(STAMP) setup.py
	$(PIP) install --quiet -e '.[test]'
	touch $@

## make run: create .venv, install, start the built-in demo on https://localhost:8443
run: $(STAMP)
	$(VENV)/bin/gatewayd --demo

## make test: install the test dependencies and run the whole suite (lint and types too)
test: $(TSTAMP) system-deps
	$(VENV)/bin/ruff check gatewayd workers tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: $(TSTAMP)
	$(VENV)/bin/ruff check gatewayd workers tests

typecheck: $(TSTAMP)
	$(VENV)/bin/mypy

## Debian tools the live tests use as independent clients: curl, openssl s_client.
system-deps:
	@command -v curl >/dev/null && command -v openssl >/dev/null || { \
	  echo "installing curl and openssl (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl openssl; }

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
