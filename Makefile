# The README's two commands: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8080
DATA   ?= ./data
# The interpreter .venv is built with: see scripts/pick-python (`make clean` to rebuild).
PYTHON ?= $(shell scripts/pick-python)

.PHONY: run test lint typecheck pytest deps dev-deps bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.deps: requirements.txt pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.dev-deps: requirements-dev.txt $(VENV)/.deps
	$(PIP) install -q -r requirements-dev.txt
	touch $@

deps: $(VENV)/.deps
dev-deps: $(VENV)/.dev-deps

## Serve with embedded defaults (SQLite under $(DATA), in-process bus) on http://$(HOST):$(PORT)/
run: deps
	$(VENV)/bin/talkbridge serve --host $(HOST) --port $(PORT) --data-dir $(DATA)

lint: dev-deps
	$(VENV)/bin/ruff check .

typecheck: dev-deps
	$(VENV)/bin/mypy .

## Unit and integration tests on the host network (real SQLite, PostgreSQL, Redis), then the
## WebRTC and browser tests inside a loopback-only network namespace.
pytest: dev-deps
	$(PY) -m pytest -m "not netns" -q -p no:cacheprovider
	scripts/netns-run $(PY) -m pytest -m netns -q -p no:cacheprovider

test: dev-deps
	scripts/system-deps
	$(MAKE) lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
