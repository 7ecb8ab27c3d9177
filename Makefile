# Two commands a newcomer needs:  `make demo`  and  `make test`  (each sets everything up first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STORE  ?= var/models

.PHONY: setup browser models demo test lint openapi bench clean

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to the exact CPU build (pyproject.toml); see README "The two commands".
	$(PY) -m pip install -q -e '.[dev]'
	# The customer's client and CLI (its own package, httpx + rich only); the tests drive it.
	$(PY) -m pip install -q -e clients/python
	touch $@

setup: $(VENV)/.installed

$(STORE)/.provisioned: $(VENV)/.installed ml_core/registry.py
	$(PY) -m ml_core provision --store $(STORE)
	touch $@

models: $(STORE)/.provisioned

demo: setup models
	$(PY) -m app.demo

# The console's browser tests drive Debian's Chromium. Best effort: installed with apt-get where
# this user may (root, or password-less sudo); elsewhere those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && \
	    $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "chromium not installed: the console's browser tests will skip"; }

test: setup browser
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check app worker ml_core tests bench clients

openapi: setup
	$(PY) -m app.cli openapi > openapi.yaml

bench: setup models
	$(PY) -m bench.quality

clean:
	rm -rf var/demo var/work
