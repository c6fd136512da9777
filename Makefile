# shardex — run `make help` for the targets.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: help up test bench chaos lint clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

up: $(STAMP) ## install into .venv, then start the whole platform in the foreground (Ctrl-C stops it)
	$(VENV)/bin/shardex up

test: $(STAMP) ## install into .venv if needed, then run the whole test suite
	$(PY) -m pytest -q

bench: $(STAMP) ## run the benchmarks (engine, feed, api, durability); each prints a table and a JSON line
	$(VENV)/bin/shardex bench engine --positions 1000000 --json
	$(VENV)/bin/shardex bench feed --json
	$(VENV)/bin/shardex bench api --json
	$(VENV)/bin/shardex bench durability --json

chaos: $(STAMP) ## the long chaos run: 100 kill -9 under load, reports lost/duplicated operations
	$(VENV)/bin/shardex bench chaos --kills 100

lint: $(STAMP) ## ruff and mypy over the code
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean: ## remove the virtual environment and local data
	rm -rf $(VENV) data
