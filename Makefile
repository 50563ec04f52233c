# torpor: one command each. `make run` and `make test` set up everything they need.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch used where there is no NVIDIA GPU (it lies on disk on the dev hosts;
# elsewhere the PyTorch CPU index serves it).
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STATE_DIR ?= .state
PYTEST_ARGS ?=

.PHONY: install run test test-gpu lint proto proto-check bench-gpu linktree clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "[install] NVIDIA GPU found: keeping the torch that is installed, or a CUDA build"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	  $(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q torch; \
	else \
	  echo "[install] no NVIDIA GPU: CPU build of torch $(TORCH_CPU_VERSION)"; \
	  $(PYTHON) -m venv $(VENV); \
	  $(PY) -c 'import torch' 2>/dev/null || \
	    $(PIP) install -q --no-deps "torch==$(TORCH_CPU_VERSION)+cpu" 2>/dev/null || \
	    $(PIP) install -q --no-deps "torch==$(TORCH_CPU_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PIP) install -q -e '.[test,dev]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@$(PY) -c 'import torch, torpor; print("[install] torch", torch.__version__, "cuda:", torch.cuda.is_available())'
	@touch $@

run: install
	$(VENV)/bin/torpord --state-dir $(STATE_DIR) --demo

# The store's tests run against SQLite and a throwaway PostgreSQL server, which this script
# installs (if missing), starts on loopback, and stops again.
test: install proto-check
	bash tests/postgres/run-with-postgres.sh $(VENV)/bin/pytest -q -m "not gpu" $(PYTEST_ARGS)

test-gpu: install
	$(VENV)/bin/pytest -q -m gpu $(PYTEST_ARGS)

lint: install linktree
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The import package `torpor` as a tree of symlinks in build/pkg (pyproject maps the top-level
# directories into it): for mypy, and for GPU hosts that run from a copy with no pip access.
linktree:
	rm -rf build/pkg && mkdir -p build/pkg/torpor
	ln -s $(CURDIR)/proto/torpor/* build/pkg/torpor/
	for d in scheduler worker store; do ln -s $(CURDIR)/$$d build/pkg/torpor/$$d; done

proto: install
	$(PY) -m torpor.protogen

proto-check: install
	$(PY) -m torpor.protogen --check

# Everything that needs a GPU, in one go: gpu tests and benchmarks (results under $$OUT or .bench/).
bench-gpu:
	bash bench/gpu.sh all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
