# shardex — run `make help` for the targets.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: help up test browser wrk bench chaos lint clean bytecode

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The project's own modules compiled ahead (pip compiles what it installs, but not an editable
# install's sources): Ray starts a Python process per actor, and again after every restart, and
# where PYTHONDONTWRITEBYTECODE is set each of them would compile the modules it imports anew.
# Up-to-date files are skipped.
bytecode: $(STAMP)
	@$(PY) -m compileall -q engine cluster feed bench

# Headless Chromium and its driver for tests/browser, from the distribution's packages: installed
# only when one of them is missing (as root, or through passwordless sudo).
CHROMIUM     ?= chromium
CHROMEDRIVER ?= chromedriver
APT_GET      ?= apt-get

browser: ## install chromium and chromium-driver (Debian packages) if either is missing
	@if command -v $(CHROMIUM) >/dev/null 2>&1 && command -v $(CHROMEDRIVER) >/dev/null 2>&1; then \
		exit 0; \
	fi; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else \
		echo "chromium or chromedriver is missing: install the packages chromium and" \
			"chromium-driver, or run make as root or with passwordless sudo" >&2; \
		exit 1; \
	fi; \
	echo "installing chromium and chromium-driver"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive $(APT_GET) update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -q chromium chromium-driver

# wrk drives the load of `shardex bench api` (without it, a Python client does, sharing the
# cores with what it measures): installed from the distribution when missing and possible.
wrk: ## install wrk (Debian package) if it is missing, for the benchmarks
	@command -v wrk >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "wrk is missing (package wrk): bench api falls back to its Python client" >&2; \
		exit 0; fi; \
	apt="$$sudo env DEBIAN_FRONTEND=noninteractive $(APT_GET)"; \
	$$apt install -y -q wrk || { $$apt update -q && $$apt install -y -q wrk; } || \
		echo "wrk could not be installed: bench api falls back to its Python client" >&2

up: bytecode ## install into .venv, then start the whole platform in the foreground (Ctrl-C stops it)
	$(VENV)/bin/shardex up

# Four runs, so that what wants the cores to itself has them. The unit tests start no process
# and share nothing: on every core (at most 4 workers; four on two cores filled the quarter of
# the CPU that tests waiting on timers leave idle, but in a fresh clone each worker first
# rewrites every test module, and the run took longer). The rest but the `slow` tests: two
# workers, a file each at a time, so that the browser tests, which mostly wait on the page's
# timers and the network, go on beside the others. Then the `slow` tests (each starts a whole
# platform, a chaos run or a Ray cluster of three nodes, about half of two cores on average):
# two files at a time, but those marked `alone`, which hold a start or a restart to a time
# measured on an idle machine: they come last, one at a time. The glob keeps pyproject's
# testpaths the one list (a plain --ignore does not apply to the directories testpaths names).
# A failing part does not keep the rest from running: one run reports every failure, and the
# exit status is the first failing part's. pytest keeps the assertion-rewritten form of a test
# module (and of its plugins' modules) only where bytecode may be written: with
# PYTHONDONTWRITEBYTECODE set, every worker of each of the four runs rewrote them all anew.
PYTEST := PYTHONDONTWRITEBYTECODE= $(PY) -m pytest
test: bytecode browser ## install into .venv and chromium if needed, then run the whole test suite
	@status=0; \
	$(PYTEST) -q --durations=10 -n logical --maxprocesses 4 tests/unit || status=$$?; \
	$(PYTEST) -q --durations=15 -n 2 --dist loadfile -m 'not slow' \
		--ignore-glob='tests/unit/*' || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	$(PYTEST) -q --durations=10 -n 2 --dist loadfile -m 'slow and not alone' \
		--ignore-glob='tests/unit/*' || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	$(PYTEST) -q --durations=10 -m 'slow and alone' --ignore-glob='tests/unit/*' || \
		{ rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	exit $$status

bench: bytecode wrk ## run the benchmarks (engine, feed, api, durability, live); each prints a table and a JSON line
	$(VENV)/bin/shardex bench engine --positions 1000000 --json
	$(VENV)/bin/shardex bench feed --json
	$(VENV)/bin/shardex bench api --json
	$(VENV)/bin/shardex bench durability --slices 20 --json
	$(VENV)/bin/shardex bench live --json

chaos: bytecode ## the long chaos run: 100 kill -9 under load, reports lost/duplicated operations
	$(VENV)/bin/shardex bench chaos --kills 100

lint: $(STAMP) ## ruff and mypy over the code
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean: ## remove the virtual environment and local data
	rm -rf $(VENV) data
