# enrichd — developer and operator entry points.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint fmt bench bench-ratelimit install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Start the daemon on its embedded defaults (embedded NATS, emulator, ./inbox).
run: $(STAMP)
	$(BIN)/enrichd run

## The whole test suite (unit + integration against real nats-server and the emulator).
test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy service handlers
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Benchmarks: the nine ratio benchmarks (bench/results.json, docs/benchmarks.md), then the
## 100,000-line JSONL drop's peak RSS (docs/folders.md). About 8 minutes on 2 cores. The
## three-replica rate-limit run (about 3 minutes) is `make bench-ratelimit`.
bench: $(STAMP)
	$(BIN)/python -m bench.ratios
	$(BIN)/python -m bench.folder_rss --lines 100000 --max-items 10000 || echo "bench: folder RSS above its limit (figure above)"

bench-ratelimit: $(STAMP)
	$(BIN)/python -m bench.ratelimit

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
