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
# `make run`'s runtime directory (its socket, its workers' and keepers' sockets, the instance
# lock): inside the checkout, so that it never touches the /run/torpor of a torpord that
# systemd runs on the same host (issue 12).
RUN_DIR ?= $(STATE_DIR)/run
PYTEST_ARGS ?=

.PHONY: install run test test-reliability test-gpu lint proto proto-check bench-gpu linktree clean

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
	@echo "[run] socket $(abspath $(RUN_DIR))/torpord.sock; in another terminal: export TORPOR_SOCKET=$(abspath $(RUN_DIR))/torpord.sock"
	@echo "[run] the OpenAI HTTP API: http://127.0.0.1:8080/v1 (daemon.http_listen)"
	TORPOR_DAEMON_RUNTIME_DIR=$(RUN_DIR) $(VENV)/bin/torpord --state-dir $(STATE_DIR) --socket $(RUN_DIR)/torpord.sock --demo

# The store's tests run against SQLite and a throwaway PostgreSQL server, which this script
# installs (if missing), starts on loopback, and stops again.
test: install proto-check
	bash tests/postgres/run-with-postgres.sh $(VENV)/bin/pytest -q -m "not gpu" $(PYTEST_ARGS)

# The full forms of issue 12's standing suites (docs/RELIABILITY.md): faults (20 kills per
# phase), load (1,000 concurrent streams), the second-user security checks and the edge fuzz.
# `make test` runs their short forms. The gpu-marked faults run where torch sees a GPU.
RELIABILITY_TESTS = tests/reliability $(wildcard tests/daemon/test_edge_fuzz.py)
test-reliability: install
	TORPOR_RELIABILITY_FULL=1 bash tests/postgres/run-with-postgres.sh \
	  $(VENV)/bin/pytest -q -rxX $(RELIABILITY_TESTS) $(PYTEST_ARGS)

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

# ---- install-service: torpord as a systemd service on a GPU host (docs/DEPLOY.md) ----------
# Run as root on the host: `sudo make install-service`. The layout:
#   $(SERVICE_VENV)                       torpor, installed (not editable) from this checkout
#   $(SERVICE_BINDIR)/torpor, torpord     links into the venv
#   $(SYSTEMD_UNIT_DIR)/torpord.service   deploy/torpord.service, ExecStart in $(SERVICE_VENV)
#   $(SYSUSERS_DIR), $(TMPFILES_DIR)      the torpor user; /var/lib/torpor and its directories
#   /etc/torpor/torpord.toml              deploy/torpord.toml, only if there is none yet
# The unit and the sysusers/tmpfiles files go under /usr/local/lib, the place for locally
# installed ones; /etc stays the administrator's (the config, `systemctl edit` drop-ins).
#
# DESTDIR=DIR stages every file under DIR and skips what only the target host can do (creating
# the user, the directories, daemon-reload). A venv cannot be staged (its #! lines name its
# path): the default SERVICE_VENV_INSTALL refuses under DESTDIR, so pass a command of your own
# (it gets the venv's path under DESTDIR) or SERVICE_VENV_INSTALL=: to skip it.
SERVICE_PREFIX ?= /opt/torpor
SERVICE_VENV ?= $(SERVICE_PREFIX)/venv
# --system-site-packages keeps a CUDA torch that the host already has; set it empty to isolate.
SERVICE_VENV_ARGS ?= --system-site-packages
SERVICE_VENV_INSTALL ?= bash deploy/install-venv.sh
SERVICE_BINDIR ?= /usr/local/bin
SYSTEMD_UNIT_DIR ?= /usr/local/lib/systemd/system
SYSUSERS_DIR ?= /usr/local/lib/sysusers.d
TMPFILES_DIR ?= /usr/local/lib/tmpfiles.d
SYSTEMCTL ?= systemctl
SYSTEMD_SYSUSERS ?= systemd-sysusers
SYSTEMD_TMPFILES ?= systemd-tmpfiles
# torpord reads this path by default and the unit names it: not a variable.
SERVICE_CONFIG_DIR := /etc/torpor
SERVICE_CONFIG := $(SERVICE_CONFIG_DIR)/torpord.toml
# $(call on_host,COMMAND): COMMAND on a real install; under DESTDIR only a note (no commas in it).
on_host = $(if $(DESTDIR),@echo "[install-service] staged so not run: $(1)",$(1))

.PHONY: install-service
install-service:
	$(if $(DESTDIR),,@[[ $$(id -u) == 0 ]] || { echo "install-service: run it as root (sudo make install-service)" >&2; exit 1; })
	DESTDIR='$(DESTDIR)' PYTHON='$(PYTHON)' SERVICE_VENV_ARGS='$(SERVICE_VENV_ARGS)' $(SERVICE_VENV_INSTALL) $(DESTDIR)$(SERVICE_VENV)
	install -d -m 0755 $(DESTDIR)$(SERVICE_BINDIR)
	ln -sfn $(SERVICE_VENV)/bin/torpor $(DESTDIR)$(SERVICE_BINDIR)/torpor
	ln -sfn $(SERVICE_VENV)/bin/torpord $(DESTDIR)$(SERVICE_BINDIR)/torpord
	install -D -m 0644 deploy/sysusers.d/torpor.conf $(DESTDIR)$(SYSUSERS_DIR)/torpor.conf
	install -D -m 0644 deploy/tmpfiles.d/torpor.conf $(DESTDIR)$(TMPFILES_DIR)/torpor.conf
	install -d -m 0755 $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	sed 's|/opt/torpor/venv|$(SERVICE_VENV)|g' deploy/torpord.service > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/torpord.service
	chmod 0644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/torpord.service
	$(call on_host,$(SYSTEMD_SYSUSERS) $(SYSUSERS_DIR)/torpor.conf)
	install -d -m 0755 $(DESTDIR)$(SERVICE_CONFIG_DIR)
	if [[ -e $(DESTDIR)$(SERVICE_CONFIG) ]]; then \
	  echo "[install-service] kept $(DESTDIR)$(SERVICE_CONFIG); the shipped one is deploy/torpord.toml"; \
	else \
	  install -m 0640 $(if $(DESTDIR),,-g torpor) deploy/torpord.toml $(DESTDIR)$(SERVICE_CONFIG); \
	fi
	$(call on_host,$(SYSTEMD_TMPFILES) --create $(TMPFILES_DIR)/torpor.conf)
	$(call on_host,$(SYSTEMCTL) daemon-reload)
	@echo "[install-service] $(if $(DESTDIR),staged under $(DESTDIR). On the target host run systemd-sysusers and systemd-tmpfiles --create and systemctl daemon-reload. Then:,installed. Next:)"
	@echo "  systemctl enable --now torpord       # start now and at boot"
	@echo "  usermod -aG torpor USER              # lets USER run the torpor CLI (after a new login)"
	@echo "  torpor status                        # as a member of group torpor"
	@echo "  journalctl -u torpord -f             # its log, JSON lines"
