# Two commands a newcomer needs:  `make demo`  and  `make test`  (each sets everything up first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STORE  ?= var/models

.PHONY: setup models demo test lint openapi bench clean

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

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check app worker ml_core tests bench clients

openapi: setup
	$(PY) -m app.cli openapi > openapi.yaml

bench: setup models
	$(PY) -m bench.quality

clean:
	rm -rf var/demo var/work
