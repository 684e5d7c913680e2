#!/bin/sh
# The one install recipe, used by the Makefile, CI and the Dockerfile.
# Creates $VENV (unless VENV is empty: then installs into the current Python)
# and installs hardneg with its test extras. torch is pinned to a CPU build
# through constraints.txt; set PIP_EXTRA_INDEX_URL to PyTorch's CPU index
# where no local CPU wheel exists (the Dockerfile does).
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
EDITABLE=${EDITABLE:-1}
if [ -n "${VENV-.venv}" ]; then
    VENV=${VENV:-.venv}
    "$PYTHON" -m venv "$VENV"
    PYTHON="$VENV/bin/python"
fi
"$PYTHON" -m pip install --quiet --upgrade pip
"$PYTHON" -m pip install --quiet -c constraints.txt "torch==2.13.0"
if [ "$EDITABLE" = 1 ]; then
    "$PYTHON" -m pip install --quiet -c constraints.txt -e ".[$EXTRAS]"
else
    "$PYTHON" -m pip install --quiet -c constraints.txt ".[$EXTRAS]"
fi
