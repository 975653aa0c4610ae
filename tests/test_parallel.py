"""Tensor-parallel cells on the CPU: two torchrun ranks with the gloo backend, transformers' tensor-parallel plan
for the tiny Llama, and the draft on rank 0 only. Each test launches real worker processes (~10-20 s each here).

The parent process sees two fake 'GPUs' (monkeypatched inventory) so the claim, the memory check and the
re-launch under torch.distributed.run take the same path as on a GPU node; the workers find no CUDA and run on
the CPU with gloo instead of NCCL.
"""

from __future__ import annotations

import shutil

import pytest

from specdec.run import devices
from specdec.run.devices import DeviceInfo
from specdec.run.job import run_cell

pytestmark = pytest.mark.slow


@pytest.fixture
def two_fake_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on a 2-core machine
    monkeypatch.setattr(devices, "visible_gpus", lambda: [DeviceInfo(i, f"fake-{i}", "FakeGPU", 1 << 30)
                                                          for i in range(2)])


def cell(prompt_file, models, **kw):
    return {"target": "tiny-target", "prompts_file": str(prompt_file), "models": models, "max_new_tokens": 12,
            "repeats": 1, "warmup": 1, "stop_at_eos": False, **kw}


@pytest.mark.parametrize("strategy", ["speculative", "tree"])  # chains and trees: one loop, one RankZeroDraft
def test_two_gloo_ranks_produce_the_greedy_tokens_of_one_process(prompt_file, tiny_models, two_fake_gpus, strategy):
    one = run_cell(cell(prompt_file, tiny_models, strategy="baseline"))
    tp = run_cell(cell(prompt_file, tiny_models, strategy=strategy, draft="tiny-draft", k=3, gpus=2,
                       gpu_mode="tensor"))
    run = tp["run"]
    assert run["status"] == "ok", run["error"]
    assert [m["token_hash"] for m in tp["measurements"]] == [m["token_hash"] for m in one["measurements"]]
    assert all(m["acceptance_rate"] is not None for m in tp["measurements"])  # the broadcast draft was used
    assert run["placement"]["mode"] == "tensor" and run["gpu_names"] == ["FakeGPU", "FakeGPU"]
    assert run["devices"] == ["cpu", "cpu"] and len(run["device_peak_memory_bytes"]) == 2
    # the ranks decoded the paired baseline too, linked to the parent's run id; the parent sampled the noise
    paired = tp["paired_baseline"]
    assert paired["run"]["paired_with"] == run["run_id"] and paired["run"]["gpu_names"] == ["FakeGPU", "FakeGPU"]
    assert [m["token_hash"] for m in paired["measurements"]] == [m["token_hash"] for m in one["measurements"]]
    assert run["noise_samples"] >= 2 and run["other_cpu_cores"] is not None
    # the target really is split: rank 1 holds about half of it, rank 0 its half plus the whole draft (the tiny
    # draft is a noisy copy of the target, so the same size)
    whole = one["run"]["device_weight_bytes"][0]
    rank0, rank1 = run["device_weight_bytes"]
    assert 0.4 * whole < rank1 < 0.6 * whole and 1.4 * whole < rank0 < 1.6 * whole


def test_a_failure_on_one_rank_stops_all_ranks_and_is_stored(prompt_file, tiny_models, two_fake_gpus, tmp_path):
    # A draft whose config is fine (so the parent's memory check passes) but whose weights are missing: only
    # rank 0 loads the draft, so only rank 0 fails; the others must not wait for it forever.
    broken = tmp_path / "broken-draft"
    broken.mkdir()
    source = tiny_models["tiny-draft"]["path"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{source}/{name}", broken / name)
    models = {**tiny_models, "broken": {"path": str(broken), "dtype": "float32", "chat": False}}
    doc = run_cell(cell(prompt_file, models, strategy="speculative", draft="broken", k=2, gpus=2,
                        gpu_mode="tensor"))
    assert doc["run"]["status"] == "failed"
    assert doc["run"]["error"].startswith("ParallelError: tensor-parallel workers failed (torchrun exit 1): rank 0:")
    assert "broken" in doc["run"]["error"] and len(doc["measurements"]) == 2
