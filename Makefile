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

## Debian tools the live tests use: curl and openssl s_client as independent clients, wrk as
## the load generator of the reload tests, systemd-analyze to verify the unit files.
DEBIAN_TEST_PACKAGES := curl openssl wrk systemd prometheus
system-deps:
	@missing=""; \
	for tool in curl openssl wrk systemd-analyze promtool prometheus; do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $(DEBIAN_TEST_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    $(DEBIAN_TEST_PACKAGES) >/dev/null; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
