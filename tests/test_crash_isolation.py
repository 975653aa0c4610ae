"""Issue 29: llama.cpp's AMX extra buffers crash some Intel Xeons. The per-machine decision (probe in a child,
cached; forced by $SPECDEC_LLAMACPP_EXTRA_BUFFERS), and a native crash taking down one cell, not the workflow.

The machines this suite runs on may have no AMX, so crashes are simulated ($SPECDEC_SIMULATE_CRASH: a process
kills itself with SIGSEGV where the real crash would happen)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from specdec import CRASH_ENV
from specdec.run import isolate

pytestmark = pytest.mark.child_process  # the llama.cpp loads here run in a child pytest (conftest.py)


@pytest.fixture
def llama(monkeypatch, tmp_path):
    """llamacpp with a fresh probe cache under tmp_path and no verdict remembered in this process."""
    pytest.importorskip("llama_cpp")
    from specdec.engines import llamacpp

    monkeypatch.setenv(llamacpp.PROBE_DIR_ENV, str(tmp_path / "probe"))
    monkeypatch.delenv(llamacpp.EXTRA_BUFFERS_ENV, raising=False)
    monkeypatch.delenv(CRASH_ENV, raising=False)
    monkeypatch.setattr(llamacpp, "_VERDICTS", {})
    return llamacpp


@pytest.fixture(scope="module")
def gguf():
    from specdec.engines import llamacpp
    from specdec.model.models import load_registry

    pytest.importorskip("llama_cpp")
    return llamacpp.gguf_file(load_registry()["smollm2-135m"])


def no_probe(*args):
    raise AssertionError("the probe ran")


def test_bad_setting_is_one_line_before_loading(llama, monkeypatch):
    from specdec.model.decoding import DecodeSettings
    from specdec.run.runner import SettingsError, check_settings

    monkeypatch.setenv(llama.EXTRA_BUFFERS_ENV, "amx")
    with pytest.raises(SettingsError, match=r"^SPECDEC_LLAMACPP_EXTRA_BUFFERS must be one of auto, on, off, "
                                            r"got 'amx'$"):
        check_settings("llamacpp-generate", None, DecodeSettings(), None, "smollm2-135m")


def test_no_amx_means_nothing_to_probe_and_settings_force(llama, monkeypatch, gguf):
    monkeypatch.setattr(llama, "probe", no_probe)
    monkeypatch.setattr(llama, "cpuinfo_field", lambda name: "fpu avx2 avx512f" if name == "flags" else "CPU")
    assert llama.extra_buffers(gguf, 1) == "on (no AMX)"
    monkeypatch.setenv(CRASH_ENV, "amx")  # an AMX machine: a setting still decides without a probe
    for value in ("on", "off", " OFF "):
        monkeypatch.setenv(llama.EXTRA_BUFFERS_ENV, value)
        assert llama.extra_buffers(gguf, 1) == f"{value.strip().lower()} (forced)"
    off = llama.load(gguf, threads=1, n_ctx=64)  # and off loads without them (on would crash: simulated AMX)
    assert off.model_params.use_extra_bufts is False and llama.extra_buffers_of(off) == "off (forced)"


def test_a_crashing_probe_turns_extra_buffers_off_and_is_cached(llama, monkeypatch, gguf, tmp_path):
    monkeypatch.setenv(CRASH_ENV, "amx")  # this CPU passes for one with AMX whose extra buffers crash
    assert llama.extra_buffers(gguf, 1) == "off (probe crashed: SIGSEGV)"
    cached = json.loads(llama.probe_file().read_text())
    assert cached["verdict"] == "off (probe crashed: SIGSEGV)" and cached["llama_cpp_python"]
    assert llama.probe_file().parent == tmp_path / "probe"
    monkeypatch.setattr(llama, "probe", no_probe)  # a new process reads the verdict from the cache
    monkeypatch.setattr(llama, "_VERDICTS", {})
    llm = llama.load(gguf, threads=1, n_ctx=64)
    assert llm.model_params.use_extra_bufts is False
    assert llama.extra_buffers_of(llm) == "off (probe crashed: SIGSEGV)"
    llm.eval(llm.tokenize(b"Hello there, how are you"))  # it evaluates (the simulated crash needs the buffers)


def test_a_passing_probe_keeps_them(llama, monkeypatch, gguf):
    """Where the real probe cannot pass (an AMX CPU whose llama.cpp crashes, as some Xeons of this project's CI
    do), a passing one is stood in for: what is under test is what specdec does with the verdict."""
    real_amx = llama.has_amx()
    monkeypatch.setattr(llama, "has_amx", lambda: True)
    if real_amx:
        monkeypatch.setattr(llama, "probe", lambda path, threads: "amx")
    assert llama.extra_buffers(gguf, 1) == "amx"
    assert json.loads(llama.probe_file().read_text())["verdict"] == "amx"
    llm = llama.load(gguf, threads=1, n_ctx=64)  # loads with them (nothing evaluated: that is where AMX crashes)
    assert llm.model_params.use_extra_bufts is True and llama.extra_buffers_of(llm) == "amx"


def test_the_real_probe_gives_a_clear_verdict(llama, gguf):
    """The probe's child with llama.cpp's default buffers on this machine: 'amx' where they work (every CPU without
    AMX, where they are llama.cpp's plain kernels), 'off (probe crashed: SIG...)' where they crash; either way
    this process lives on."""
    verdict = llama.probe(gguf, 1)
    if not llama.has_amx():
        assert verdict == "amx"
    else:
        assert verdict == "amx" or verdict.startswith("off (probe crashed: SIG"), verdict


def test_the_cell_records_how_llamacpp_ran(llama, monkeypatch, prompt_file):
    import torch

    from specdec.run.job import run_cell

    monkeypatch.setenv(CRASH_ENV, "amx")
    threads = torch.get_num_threads()
    try:
        doc = run_cell({"target": "smollm2-135m", "strategy": "llamacpp-generate", "threads": 1, "warmup": 0,
                        "prompts_file": str(prompt_file), "prompt_ids": ["a"], "max_new_tokens": 4})
    finally:
        torch.set_num_threads(threads)
    assert doc["run"]["status"] == "ok", doc["run"]["error"]
    assert doc["run"]["params"]["llamacpp_extra_buffers"] == "off (probe crashed: SIGSEGV)"


def test_crashing_frame_and_signal_name():
    dump = ('Fatal Python error: Segmentation fault\n\nThread 0x1 (most recent call first):\n'
            '  File "/a/other.py", line 3 in wait\n\nCurrent thread 0x2 (most recent call first):\n'
            '  File "/x/llama_cpp/llama.py", line 650 in eval\n  File "/x/specdec/engines/llamacpp.py", line 9 in d\n')
    assert isolate.crashing_frame(dump) == 'File "/x/llama_cpp/llama.py", line 650 in eval'
    assert isolate.crashing_frame(dump.replace("Current thread", "Thread")) == 'File "/a/other.py", line 3 in wait'
    assert isolate.crashing_frame("") is None
    assert isolate.signal_name(-11) == "SIGSEGV" and isolate.signal_name(-9) == "SIGKILL"


def test_run_job_writes_the_failure_of_a_crashed_cell(llama, tmp_path, prompt_file):
    """`specdec run-job` with llama.cpp's extra buffers forced on where they crash (simulated): the job exits 0
    and its result file holds every row failed, naming the signal, the engine and the frame."""
    out = tmp_path / "cell.json"
    job = {"target": "smollm2-135m", "strategy": "llamacpp-generate", "prompts_file": str(prompt_file),
           "max_new_tokens": 4, "warmup": 0, "threads": 1, "cell": "c1"}
    env = {**os.environ, CRASH_ENV: "amx", llama.EXTRA_BUFFERS_ENV: "on"}
    result = subprocess.run([sys.executable, "-m", "specdec.cli", "run-job", "--job", json.dumps(job), "--out",
                             str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CRASHED" in result.stderr and "Fatal Python error: Segmentation fault" in result.stderr
    doc = json.loads(out.read_text())
    run = doc["run"]
    assert run["status"] == "failed" and run["crash"]["signal"] == "SIGSEGV"
    assert run["error"].startswith("NativeCrash: the cell's process died of SIGSEGV in engine llamacpp "
                                   "(llamacpp-generate), at File ")
    assert "in crash" in run["crash"]["frame"]  # the simulated crash's own frame: specdec.crash
    assert [(m["prompt_id"], m["status"], m["error"]) for m in doc["measurements"]] == [
        ("a", "failed", run["error"]), ("b", "failed", run["error"])]
    assert run["params"]["cell"] == "c1" and run["params"]["engine"] == "llamacpp" and run["host"]
