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
    machine.PROBE_BYTES, machine.FMA_ITERATIONS, machine.VNNI_ITERATIONS = 16 << 20, 100_000, 100_000
    yield
    machine.PROBE_BYTES, machine.FMA_ITERATIONS, machine.VNNI_ITERATIONS = saved[1:]
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
