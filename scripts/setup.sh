#!/usr/bin/env bash
# Create .venv and install specdec with its test extras. Sourced by run-matrix.sh and test.sh.
# CPU machines get torch's CPU build first, so nothing later pulls a multi-GB CUDA build; machines with an
# NVIDIA driver get the regular (CUDA) build through the normal dependency resolution.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
TORCH_VERSION=${SPECDEC_TORCH_VERSION:-2.13.0}
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        python -m pip install --quiet "torch==${TORCH_VERSION}"
    else
        # CPU build: set SPECDEC_TORCH_INDEX to a CPU-only wheel index where the default one serves CUDA builds
        python -m pip install --quiet "torch==${TORCH_VERSION}" ${SPECDEC_TORCH_INDEX:+--index-url "$SPECDEC_TORCH_INDEX"}
    fi
fi
python -m pip install --quiet -e ".[test]"
