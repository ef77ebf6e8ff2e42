# busd developer targets. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ROOT   ?= .busd
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck unit bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## run: install, create the bus at $(ROOT) and run the daemon in the foreground
run: install
	$(BIN)/busd init $(ROOT)
	$(BIN)/busd run --root $(ROOT)

## test: lint, type-check and run every test
test: lint typecheck unit

lint: install
	$(BIN)/ruff check broker tests clients
	$(BIN)/ruff format --check broker tests clients

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q

## bench: the benchmark against peers (installs what it needs)
bench: install
	$(BIN)/python -m tests.perf.bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
