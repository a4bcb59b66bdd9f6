# Two commands do all set-up on a fresh clone: `make train` and `make test`.
# TORCH picks the torch build: the default installs a CPU build on a CPU-only machine and a CUDA
# build on a GPU box; override with e.g. `make test TORCH="torch==2.14.1"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
TRAIN_ARGS ?=
# The default model is small (hidden 128): one intra-op thread per process trains it as fast as more threads
# on a 2-core machine and, unlike them, does not slow down when anything else runs beside it (measurements:
# benchmarks/RESULTS.md).
# Raise it on a quiet machine with more cores: `make train OMP_NUM_THREADS=4`.
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS
# Test processes (pytest-xdist; each test file stays in one process, so module fixtures run once). Most tests are
# single-threaded or wait on subprocesses, so two workers keep both cores of the 2-core CI machine busy; raise it
# on a machine with more cores. The files go out longest first (the order tests/conftest.py sets, which
# --no-loadscope-reorder keeps), so that no long file starts last.
TEST_WORKERS ?= 2
PYTEST_XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: train test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

train: $(VENV)/.runtime
	$(BIN)/python -m llm.training.train --task lm $(TRAIN_ARGS)

test: $(VENV)/.dev
	$(BIN)/ruff check llm tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_XDIST)

# The fast tier: everything but the tests marked `slow` (multi-process jobs, signal loops, torch.compile, whole
# training runs through real processes); the edit-test loop, a few minutes.
test-fast: $(VENV)/.dev
	$(BIN)/ruff check llm tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_XDIST) -m "not slow"

lint: $(VENV)/.dev
	$(BIN)/ruff check llm tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
