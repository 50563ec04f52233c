#!/usr/bin/env bash
# Build the service's venv at VENV and install torpor from the checkout SRC into it
# (`make install-service` runs this as $(SERVICE_VENV_INSTALL) VENV).
#
#   deploy/install-venv.sh VENV [SRC]
#
# The install is a copy, not an editable one: the service must not run from a developer's
# checkout (ProtectHome=yes hides /home and /root from it, and a `git pull` there would change
# the running daemon). The venv sees the system's site-packages unless
# SERVICE_VENV_ARGS is set otherwise, so a CUDA build of torch that the host already has is
# kept instead of being downloaded again.
#
# A venv cannot be moved: its scripts' #! lines name its own path. So VENV is always the final
# path, and this refuses a staged install (DESTDIR set): build the venv on the target host.
set -euo pipefail

venv=${1:?usage: install-venv.sh VENV [SRC]}
src=${2:-.}
python=${PYTHON:-python3}
if [[ -z "${SERVICE_VENV_ARGS+set}" ]]; then
    venv_args=--system-site-packages
else
    venv_args=$SERVICE_VENV_ARGS
fi

if [[ -n "${DESTDIR:-}" ]]; then
    echo "install-venv.sh: a venv cannot be staged under DESTDIR=$DESTDIR (its paths would" \
        "name the staging directory); build it on the target host, or pass" \
        "SERVICE_VENV_INSTALL=: to make to skip this step" >&2
    exit 2
fi
if [[ -e "$venv" && ! -x "$venv/bin/python" ]]; then
    echo "install-venv.sh: $venv exists and is not a venv; not touching it" >&2
    exit 2
fi

echo "[install-service] venv $venv (python: $python $venv_args)"
# shellcheck disable=SC2086  # venv_args is zero or more options
"$python" -m venv $venv_args "$venv"
# Upgrading in place keeps the venv (and torch in it); torpor itself is replaced.
"$venv/bin/python" -m pip install --quiet --upgrade "$src"
"$venv/bin/python" -c 'import torpor, torch; print("[install-service] torpor in", torpor.__path__[0], "| torch", torch.__version__, "| cuda:", torch.cuda.is_available())'
