"""Placement planning and the memory check, on fake device inventories (no GPU needed)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from specdec.run import devices
from specdec.run.devices import GiB, Claim, DeviceError, DeviceInfo, plan_placement
from specdec.run.job import run_cell
from specdec.model.models import ModelSpec
from specdec.run.devices import tensor_parallel_problem
from specdec.run.parallel import child_visible_devices
from tiny import tiny_config

A100_40GB = 40 * GiB


def a100s(n: int, free: list[int] | None = None) -> list[DeviceInfo]:
    return [DeviceInfo(i, f"uuid-{i}", "NVIDIA A100-SXM4-40GB", A100_40GB, free[i] if free else None)
            for i in range(n)]


def claim(indices) -> Claim:
    return Claim(list(indices), ["NVIDIA A100-SXM4-40GB"] * len(indices))


def test_a_30b_target_does_not_fit_one_a100_and_the_message_says_by_how_much():
    with pytest.raises(DeviceError) as err:
        plan_placement("pipeline", claim([0]), a100s(1), target_bytes=60 * 10**9, draft_bytes=10**9)
    message = str(err.value)
    assert "the models need an estimated 56.8 GiB" in message and "1 claimed GPU(s)" in message and "35.5 GiB usable" in message


def test_pipeline_splits_the_target_over_two_a100s_and_keeps_room_for_the_draft_on_the_first():
    plan = plan_placement("pipeline", claim([0, 1]), a100s(2), target_bytes=60 * 10**9, draft_bytes=2 * 10**9)
    usable = devices.usable_bytes(a100s(1)[0])
    assert plan.mode == "pipeline" and plan.devices == ["cuda:0", "cuda:1"]
    assert plan.max_memory == {0: usable - 2 * 10**9, 1: usable}  # accelerate's budget for the target's layers
    assert abs(sum(plan.need_bytes) - 62 * 10**9) < 10 and all(n <= u for n, u in zip(plan.need_bytes, plan.usable_bytes))
    assert plan.need_bytes[0] - 2 * 10**9 < plan.need_bytes[1]  # the first device takes fewer target layers


def test_pipeline_budgets_use_only_the_claimed_devices_and_their_free_memory():
    inventory = a100s(4, free=[A100_40GB, 10 * GiB, A100_40GB, A100_40GB])
    plan = plan_placement("pipeline", claim([1, 3]), inventory, target_bytes=30 * GiB)
    assert set(plan.max_memory) == {1, 3} and plan.max_memory[1] < plan.max_memory[3] / 3


def test_tensor_parallel_puts_a_share_of_the_target_on_each_device_and_the_draft_on_the_first():
    plan = plan_placement("tensor", claim([0, 1]), a100s(2), target_bytes=60 * GiB, draft_bytes=GiB)
    assert plan.mode == "tensor" and plan.need_bytes == [31 * GiB, 30 * GiB]
    with pytest.raises(DeviceError, match=r"puts an estimated 31.0 GiB on cuda:0 \(1/2 of the target \+ the draft\)"):
        plan_placement("tensor", claim([0, 1]), a100s(2, free=[20 * GiB, A100_40GB]), 60 * GiB, GiB)


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_a_70b_target_needs_four_a100s_in_either_mode(mode):
    target = 140 * 10**9  # 70B parameters in bfloat16
    with pytest.raises(DeviceError, match="estimated"):
        plan_placement(mode, claim([0, 1]), a100s(2), target, GiB)
    assert plan_placement(mode, claim(range(4)), a100s(4), target, GiB).mode == mode


def test_a_draft_too_big_for_the_first_device_and_an_unknown_mode_are_refused():
    with pytest.raises(DeviceError, match="the draft needs an estimated 39.0 GiB on cuda:0"):
        plan_placement("pipeline", claim([0, 1]), a100s(2), 10 * GiB, 39 * GiB)
    with pytest.raises(DeviceError, match="gpu_mode must be one of pipeline, tensor"):
        plan_placement("zigzag", claim([0, 1]), a100s(2), GiB)


def test_cpu_cells_are_checked_against_the_hosts_available_memory(monkeypatch):
    monkeypatch.setattr(devices, "host_available_bytes", lambda: 8 * GiB)
    assert plan_placement("pipeline", Claim([], []), [], 6 * GiB, GiB).need_bytes == [7 * GiB]
    with pytest.raises(DeviceError, match="need an estimated 9.0 GiB but the host has 8.0 GiB"):
        plan_placement("pipeline", Claim([], []), [], 8 * GiB, GiB)


def test_weight_bytes_come_from_the_config_at_the_configured_dtype():
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)  # Llama-2-7B's shape
    spec = ModelSpec(alias="llama-7b", hub="x/y", dtype="float16")
    assert devices.weight_bytes(spec, config) == 6_738_415_616 * 2
    assert devices.kv_cache_bytes(config, 4096, 2) == 2 * 32 * 4096 * 4096 * 2  # 2 GiB for 4k tokens in fp16
    tiny = tiny_config(layers=2)
    with torch.device("meta"):
        real = sum(p.numel() for p in AutoModelForCausalLM.from_config(tiny).parameters())
    assert devices.weight_bytes(ModelSpec(alias="t", path="/x", dtype="bfloat16"), tiny) == real * 2


def test_tensor_parallel_needs_a_plan_and_heads_that_divide():
    from transformers import GPT2Config

    assert tensor_parallel_problem(tiny_config(), 2) is None
    assert "heads (4) and key/value heads (2) to divide by 4" in tensor_parallel_problem(tiny_config(), 4)
    assert "GPT2Config has no tensor-parallel plan" in tensor_parallel_problem(GPT2Config(), 2)


def test_workers_see_the_claimed_gpus_through_the_parents_mask(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert child_visible_devices([1, 3]) == "1,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert child_visible_devices([1, 3]) == "5,7"


# ---------------------------------------------------------------------------------------------- whole cells

@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "a", "category": "qa", "prompt": "two plus two?"}) + "\n")
    return path


@pytest.fixture
def fake_gpus(monkeypatch, tmp_path):
    """Two tiny 'GPUs' (8 MiB each) for the claim and the memory check; no model loads in these tests."""
    monkeypatch.setenv("SPECDEC_GPU_LOCK_DIR", str(tmp_path / "locks"))
    inventory = [DeviceInfo(i, f"fake-{i}", "FakeGPU", 8 << 20) for i in range(2)]
    monkeypatch.setattr(devices, "visible_gpus", lambda: inventory)
    monkeypatch.setattr(devices, "CUDA_OVERHEAD", 0)
    return inventory


def cell(prompt_file, models, **kw):
    return {"target": "tiny-target", "strategy": "baseline", "prompts_file": str(prompt_file), "models": models,
            "max_new_tokens": 4, "warmup": 0, **kw}


def test_a_cell_that_cannot_fit_fails_before_loading_with_estimate_and_available(prompt_file, tiny_models,
                                                                              fake_gpus, monkeypatch):
    monkeypatch.setattr("specdec.run.job.load_pair", lambda *a, **k: pytest.fail("must not load weights"))
    doc = run_cell(cell(prompt_file, tiny_models, gpus=1, max_new_tokens=32_768))  # the largest KV cache allowed
    assert doc["run"]["status"] == "failed" and doc["run"]["gpu_names"] == ["FakeGPU"]
    # keys and values x 2 layers x 2 kv heads x 16 dims x (2048 + 32769) tokens x 4 bytes + 0.3 MiB weights
    assert "the models (target 'tiny-target') need an estimated 17.3 MiB but the 1 claimed GPU(s) (FakeGPU, 7.2 MiB usable" in \
        doc["run"]["error"]
    assert doc["measurements"][0]["status"] == "failed"


def test_multi_gpu_settings_that_cannot_work_are_refused_with_the_fix(prompt_file, tiny_models, fake_gpus):
    gguf = run_cell(cell(prompt_file, tiny_models, target="smollm2-135m", gpus=2))
    assert "is a GGUF file, which loads on one device only" in gguf["run"]["error"]
    assisted = run_cell(cell(prompt_file, tiny_models, strategy="hf-assisted", draft="tiny-draft", k=2, gpus=2,
                             gpu_mode="tensor"))
    assert "not 'hf-assisted' with draft 'tiny-draft': use gpu_mode: pipeline" in assisted["run"]["error"]
    mode = run_cell(cell(prompt_file, tiny_models, gpu_mode="sideways"))
    assert "gpu_mode must be one of pipeline, tensor" in mode["run"]["error"]


def test_cpu_cells_record_mode_devices_weights_and_peak_memory(prompt_file, tiny_models):
    run = run_cell(cell(prompt_file, tiny_models, strategy="speculative", draft="tiny-draft", k=2))["run"]
    assert run["status"] == "ok" and run["placement"]["mode"] == "cpu" and run["devices"] == ["cpu"]
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_models["tiny-target"]["path"])
                 .parameters())
    assert run["device_weight_bytes"] == [2 * params * 4]  # target + draft, float32
    assert run["device_peak_memory_bytes"][0] > run["device_weight_bytes"][0]
