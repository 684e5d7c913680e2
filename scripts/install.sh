#!/bin/sh
# The one install recipe, used by the Makefile, CI and the Dockerfile.
# Creates $VENV (unless VENV is empty: then installs into the current Python)
# and installs hardneg with its test extras. torch is pinned to a CPU build
# through constraints.txt; where no local CPU wheel exists, set TORCH_INDEX_URL
# to PyTorch's CPU wheel index (the Dockerfile does) so pip never picks a CUDA build.
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
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PYTHON" -m pip install --quiet --index-url "$TORCH_INDEX_URL" -c constraints.txt "torch==2.13.0"
else
    "$PYTHON" -m pip install --quiet -c constraints.txt "torch==2.13.0"
fi
TARGET=.
[ -n "$EXTRAS" ] && TARGET=".[$EXTRAS]"
if [ "$EDITABLE" = 1 ]; then
    "$PYTHON" -m pip install --quiet -c constraints.txt -e "$TARGET"
else
    "$PYTHON" -m pip install --quiet -c constraints.txt "$TARGET"
fi
