# gatewayd: the README's two commands, plus checks and benchmarks.
## The interpreter .venv is built on: the distribution's own /usr/bin/python3 when it is 3.11+
## and has venv (Debian builds it with PGO and LTO; it runs gatewayd's per-request path about
## 17 % cheaper than a plain source build such as pyenv's default, see bench/README.md),
## otherwise python3 from PATH.  `make PYTHON=/path/to/python3 ...` overrides.
SYSTEM_PYTHON := $(shell /usr/bin/python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && echo /usr/bin/python3)
PYTHON ?= $(or $(SYSTEM_PYTHON),python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: run test lint typecheck check system-deps bench clean fuzz

# The per-request modules are compiled with mypyc (gatewayd/native.py): the install is
# redone whenever one of their sources changes, so a checkout never runs a stale build
# (gatewayd also refuses to start on one).
COMPILED_SOURCES := $(shell $(PYTHON) gatewayd/native.py)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): setup.py pyproject.toml gatewayd/native.py $(COMPILED_SOURCES) | $(PY)
	$(PIP) install --quiet -e .
	@$(PY) -c 'from gatewayd.native import describe; print("gatewayd:", describe())'
	touch $@

# Installing the test extras builds the package too: that build is the install stamp's.
$(TSTAMP): setup.py pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[test]'
	@$(PY) -c 'from gatewayd.native import describe; print("gatewayd:", describe())'
	touch $@ $(STAMP)

## make run: create .venv, install, start the built-in demo on https://localhost:8443
run: $(STAMP)
	$(VENV)/bin/gatewayd --demo

## make test: install the test dependencies and run the whole suite (lint and types too),
## on the compiled build; then the parser, forwarding and TLS tests again on the Python
## sources (GATEWAYD_PURE_PYTHON=1), the build a machine without a compiler gets.
PURE_TESTS := tests/test_http1.py tests/test_forwarding.py tests/test_fuzz.py \
              tests/test_tlsio.py tests/test_smuggling.py tests/test_hostile_responses.py \
              tests/test_live_proxy.py
test: system-deps $(TSTAMP) $(STAMP)
	$(VENV)/bin/ruff check gatewayd workers tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q
	GATEWAYD_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider $(PURE_TESTS)

lint: $(TSTAMP)
	$(VENV)/bin/ruff check gatewayd workers tests

typecheck: $(TSTAMP)
	$(VENV)/bin/mypy

## Debian tools the live tests use: curl and openssl s_client as independent clients, wrk
## (reload soak), systemd-analyze (unit files), prometheus + promtool (metrics), testssl.sh
## (TLS scan) and slowhttptest (slow-HTTP attacks); gcc and Python's headers so that the
## suite tests the compiled build (tests/test_native.py checks it is).
DEBIAN_TEST_PACKAGES := curl openssl wrk systemd prometheus testssl.sh slowhttptest gcc python3-dev
HAVE_PYTHON_H := $(shell $(PYTHON) -c 'import os, sysconfig; print(int(os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))))')
system-deps:
	@missing="$(filter 0,$(HAVE_PYTHON_H))"; \
	for tool in curl openssl wrk systemd-analyze promtool prometheus testssl slowhttptest gcc; do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $(DEBIAN_TEST_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    $(DEBIAN_TEST_PACKAGES) >/dev/null; \
	fi

## make fuzz: the property tests of tests/test_fuzz.py with many more examples (fuzz/README.md)
FUZZ_EXAMPLES ?= 200000
fuzz: $(TSTAMP)
	GATEWAYD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
	  --hypothesis-show-statistics tests/test_fuzz.py

## make bench: gatewayd vs nginx vs HAProxy (and the backend alone) on this machine; writes
## bench/RESULTS.md (raw JSON in bench/out/).  BENCH_ARGS=--quick for a short development run.
## Not part of `make test`: timings belong here only.  See bench/README.md.
DEBIAN_BENCH_PACKAGES := nginx-light haproxy wrk openssl util-linux
bench: $(TSTAMP) $(STAMP)
	@missing=""; \
	for tool in nginx haproxy wrk openssl taskset; do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $(DEBIAN_BENCH_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    $(DEBIAN_BENCH_PACKAGES) >/dev/null; \
	fi
	@[ -x bench/.venv/bin/mitmdump ] || { $(PYTHON) -m venv bench/.venv && \
	  bench/.venv/bin/pip install --quiet mitmproxy; } || \
	  echo "bench: mitmproxy could not be installed; its comparison is skipped"
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find gatewayd workers -name '*.so' -delete
