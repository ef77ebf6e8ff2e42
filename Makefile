# busd developer targets. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ROOT   ?= .busd
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck unit bench chaos soak fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,mcp,bridge,web]'
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
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q

## bench: the benchmark against peers (installs what it needs)
bench: install
	$(BIN)/python -m tests.perf.bench

## chaos: the crash, bad-input, resource, security and fuzz suite at full size
##        (CHAOS_LONG=1: 300 SIGKILLs, 100,000 waiting files, 20,000 fuzz examples a target)
chaos: install
	CHAOS_LONG=1 $(BIN)/pytest -q -s -rxXs tests/chaos

## soak: busd at a steady rate with consumers for SOAK_MINUTES (60); prints RSS, open files
##       and bus size every 30 s, fails if they do not stay flat, plots docs/soak.png
SOAK_MINUTES ?= 60
SOAK_RATE    ?= 40
soak: install
	$(BIN)/python tests/chaos/soak.py --minutes $(SOAK_MINUTES) --rate $(SOAK_RATE) \
	  --png docs/soak.png

## fuzz: hypothesis fuzzing at full size, then atheris for FUZZ_SECONDS if it installs here
FUZZ_SECONDS ?= 600
fuzz: install
	CHAOS_LONG=1 $(BIN)/pytest -q -rxX tests/chaos/test_fuzz.py
	@if $(BIN)/pip install -q atheris; then \
	  $(BIN)/python tests/chaos/fuzz_atheris.py -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=$${TMPDIR:-/tmp}/busd-fuzz-; \
	else echo "atheris does not install here: hypothesis fuzzing only"; fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
