"""scripts/setup.sh, run against a stand-in .venv whose `python` only records what it is asked to do: each step
says what it does first, and the slow llama-cpp-python build is a step of its own that shows pip's progress."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$SETUP_LOG"
if [ -n "${CMAKE_ARGS:-}" ]; then echo "  with CMAKE_ARGS=$CMAKE_ARGS" >> "$SETUP_LOG"; fi
case "$*" in
  "-c import torch") exit 0 ;;
  "-c import llama_cpp") exit "$LLAMA_CPP_MISSING" ;;
esac
"""


def run_setup(tmp_path: Path, llama_cpp_missing: bool, path: str | None = None,
              cmake_args: str | None = None) -> tuple[str, list[str]]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    log = tmp_path / "calls.log"
    env = {**os.environ, "SETUP_LOG": str(log), "LLAMA_CPP_MISSING": "1" if llama_cpp_missing else "0",
           "PATH": path or os.environ["PATH"]}
    env.pop("CMAKE_ARGS", None)
    if cmake_args is not None:
        env["CMAKE_ARGS"] = cmake_args
    result = subprocess.run(["/bin/bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stderr, log.read_text().splitlines()


def test_llama_cpp_python_is_built_in_its_own_step_with_progress(tmp_path):
    err, calls = run_setup(tmp_path, llama_cpp_missing=True)
    installs = [c for c in calls if " pip install" in c]
    assert installs[-2] == "python -m pip install llama-cpp-python"  # no --quiet: pip shows the build going on
    assert installs[-1] == "python -m pip install --quiet -e .[test]"
    said = err.splitlines()
    assert any("compiles llama.cpp from C++ source: 5-25 min on 2 CPU cores" in line for line in said)
    assert said.index(next(s for s in said if "installing llama-cpp-python" in s)) < said.index(
        next(s for s in said if "installing specdec" in s))
    assert "warning: no C++ compiler" not in err  # this machine has one
    # the build skips llama.cpp's multimodal library (unused), and each step says how long it took
    assert calls[calls.index("python -m pip install llama-cpp-python") + 1] == "  with CMAKE_ARGS=-DLLAVA_BUILD=OFF"
    assert any(line.startswith("setup: ... llama-cpp-python took ") for line in said)
    assert any(line.startswith("setup: ... specdec and its dependencies took ") for line in said)


def test_a_cmake_args_of_your_own_replaces_the_default(tmp_path):
    _, calls = run_setup(tmp_path, llama_cpp_missing=True, cmake_args="-DGGML_NATIVE=OFF")
    assert calls[calls.index("python -m pip install llama-cpp-python") + 1] == "  with CMAKE_ARGS=-DGGML_NATIVE=OFF"


def test_no_build_step_once_llama_cpp_is_installed(tmp_path):
    err, calls = run_setup(tmp_path, llama_cpp_missing=False)
    assert "python -m pip install llama-cpp-python" not in calls and "llama-cpp-python" not in err


def test_a_missing_compiler_is_said_before_the_build(tmp_path):
    tools = tmp_path / "tools"  # a PATH with what setup.sh needs but no C++ compiler
    tools.mkdir()
    for name in ("dirname", "bash"):
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"no {name} here")
        (tools / name).symlink_to(found)
    (tmp_path / "repo").mkdir()
    err, _ = run_setup(tmp_path / "repo", llama_cpp_missing=True, path=str(tools))
    assert "warning: no C++ compiler on PATH (c++, g++, clang++)" in err
