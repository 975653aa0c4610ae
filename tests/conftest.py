import json
import os
import sys
from pathlib import Path

import pytest

# tests/tiny.py (tiny random models) is imported by several test modules
sys.path.insert(0, str(Path(__file__).parent))

from tiny import DEVICE, noisy_copy, save_tiny_pair, tiny_target  # noqa: E402


def pytest_configure(config):
    """$SPECDEC_TEST_DEVICE names a device this machine has, or the run stops before any test (one line)."""
    import torch

    try:
        kind = torch.device(DEVICE).type
    except RuntimeError:
        raise pytest.UsageError(f"SPECDEC_TEST_DEVICE={DEVICE!r} is not a device name; use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"SPECDEC_TEST_DEVICE={DEVICE!r} but no CUDA GPU is visible; unset it or use cpu")
    if kind not in ("cpu", "cuda"):
        raise pytest.UsageError(f"SPECDEC_TEST_DEVICE={DEVICE!r}: the tests run on cpu or cuda[:N] only")


@pytest.fixture(autouse=True, scope="session")
def datastores_outside_the_checkout(tmp_path_factory):
    """What strategies cache per target (REST's datastore, the dynamic tree's context-free rows) goes to a
    temporary folder, never into the checkout's results/."""
    from specdec.methods.datastore import ROOT_ENV

    before = os.environ.get(ROOT_ENV)
    os.environ[ROOT_ENV] = str(tmp_path_factory.mktemp("datastores"))
    yield
    if before is None:
        os.environ.pop(ROOT_ENV, None)
    else:
        os.environ[ROOT_ENV] = before


@pytest.fixture(autouse=True, scope="session")
def machine_probe_small_and_outside_home(tmp_path_factory):
    """`specdec bench` probes the machine (measure.machine): in tests a short probe, cached in a temporary
    folder, never in ~/.cache."""
    from specdec.measure import machine

    saved = os.environ.get("SPECDEC_CACHE_DIR"), machine.PROBE_BYTES, machine.FMA_ITERATIONS, machine.VNNI_ITERATIONS
    os.environ["SPECDEC_CACHE_DIR"] = str(tmp_path_factory.mktemp("specdec-cache"))
    # workflow cells store the probe with their runs (machine.run_record, a full-size probe in a child process):
    # off in the suite, on in the test of that record
    probe_setting = os.environ.get("SPECDEC_MACHINE_PROBE")
    os.environ["SPECDEC_MACHINE_PROBE"] = "off"
    machine.PROBE_BYTES, machine.FMA_ITERATIONS, machine.VNNI_ITERATIONS = 16 << 20, 100_000, 100_000
    yield
    machine.PROBE_BYTES, machine.FMA_ITERATIONS, machine.VNNI_ITERATIONS = saved[1:]
    if probe_setting is None:
        os.environ.pop("SPECDEC_MACHINE_PROBE", None)
    else:
        os.environ["SPECDEC_MACHINE_PROBE"] = probe_setting
    if saved[0] is None:
        os.environ.pop("SPECDEC_CACHE_DIR", None)
    else:
        os.environ["SPECDEC_CACHE_DIR"] = saved[0]


@pytest.fixture(scope="module")
def target():
    """A tiny random Llama target on $SPECDEC_TEST_DEVICE (rebuilt per module: decoding prepares models in place)."""
    return tiny_target().to(DEVICE)


@pytest.fixture(scope="module")
def draft(target):
    """A draft that often disagrees with `target`: its weights with 30 % noise."""
    return noisy_copy(target, 0.3)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The tiny target and draft saved to disk, as a `models:` mapping of aliases to folders."""
    return save_tiny_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture
def prompt_file(tmp_path):
    """Two prompts, the second with a follow-up turn."""
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": "a", "category": "qa", "prompt": "what is two plus two?"},
            {"id": "b", "category": "repetitive", "prompt": "la la la la la la", "turns": ["again: la la la"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# --- tests that may crash natively run in a child pytest ------------------------------------------------------
# A segfault inside llama.cpp (issue 29: its AMX kernels on some Intel Xeons) would kill pytest itself. Tests marked
# `child_process` run instead, all the marked tests of a module at once (module-scoped fixtures load once), in a
# child `python -m pytest` that reports every result back here as pytest's own serialised reports. A child that
# dies of a signal fails the test it was in, naming the signal and the Python frame faulthandler saw; the tests
# after it get a new child (at most CHILD_CRASHES crashes per module, then they fail unrun).

CHILD_REPORTS_ENV = "SPECDEC_PYTEST_REPORTS"
CHILD_CRASHES = 3
_config = None


def pytest_configure(config):
    global _config
    _config = config


def _write_child_line(entry: dict) -> None:
    with open(os.environ[CHILD_REPORTS_ENV], "a") as f:
        f.write(json.dumps(entry) + "\n")


def pytest_runtest_logstart(nodeid, location):
    if os.environ.get(CHILD_REPORTS_ENV):
        _write_child_line({"start": nodeid})


def pytest_runtest_logreport(report):
    if os.environ.get(CHILD_REPORTS_ENV):
        _write_child_line({"report": _config.hook.pytest_report_to_serializable(config=_config, report=report)})


def _crash_reports(item, text: str) -> list:
    from _pytest.reports import TestReport

    def report(when, outcome, longrepr=None):
        return TestReport(item.nodeid, item.location, {}, outcome, longrepr, when)

    return [report("setup", "passed"), report("call", "failed", text), report("teardown", "passed")]


def _run_in_child(item, nodeids: list[str]) -> dict:
    """nodeid -> its reports, from child pytest runs of `nodeids` (rerun after a crash for those not started)."""
    import subprocess
    import tempfile

    from specdec.run.isolate import crashing_frame, signal_name

    items = {i.nodeid: i for i in item.session.items}
    results: dict = {}
    crashes = 0
    while nodeids:
        fd, path = tempfile.mkstemp(prefix="specdec-pytest-", suffix=".jsonl")
        os.close(fd)
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids],
                                  cwd=item.config.rootpath, env={**os.environ, CHILD_REPORTS_ENV: path},
                                  capture_output=True, text=True)
            lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
        finally:
            os.unlink(path)
        started = [e["start"] for e in lines if "start" in e]
        for entry in lines:
            if "report" in entry:
                rep = item.config.hook.pytest_report_from_serializable(config=item.config, data=entry["report"])
                results.setdefault(rep.nodeid, []).append(rep)
        unfinished = [n for n in started if not any(r.when == "teardown" for r in results.get(n, []))]
        if proc.returncode >= 0 or not unfinished:
            for nodeid in nodeids:
                if nodeid not in results:
                    last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
                    results[nodeid] = _crash_reports(items[nodeid], f"not run by the child pytest: {last[0]}")
            break
        crashes += 1
        crashed = unfinished[0]
        frame = crashing_frame(proc.stderr) or "no Python frame"
        results[crashed] = _crash_reports(items[crashed], f"crashed: the child pytest died of "
                                          f"{signal_name(proc.returncode)} in this test, at {frame}\n{proc.stderr[-3000:]}")
        nodeids = [n for n in nodeids if n not in started]
        if crashes >= CHILD_CRASHES:
            for nodeid in nodeids:
                results[nodeid] = _crash_reports(items[nodeid], f"not run: the child pytest crashed {crashes} times")
            break
    return results


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if os.environ.get(CHILD_REPORTS_ENV) or item.get_closest_marker("child_process") is None:
        return None
    done = item.session.stash.setdefault(_CHILD_RESULTS, {})
    if item.nodeid not in done:
        group = [i.nodeid for i in item.session.items if i.path == item.path and i.nodeid not in done
                 and i.get_closest_marker("child_process") is not None]
        done.update(_run_in_child(item, group))
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in done[item.nodeid]:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


_CHILD_RESULTS = pytest.StashKey[dict]()
