"""One workflow cell: models loaded once, every prompt × repeat recorded, failures stored, GPUs claimed."""

from __future__ import annotations

import json

import pytest

from specdec.run import devices
from specdec.run.devices import DeviceError, DeviceInfo, claim_gpus
from specdec.run.job import run_cell, run_job


def job(prompt_file, models, **kw):
    return {"target": "tiny-target", "strategy": "baseline", "prompts_file": str(prompt_file), "models": models,
            "max_new_tokens": 12, "repeats": 2, "warmup": 1, "stop_at_eos": False, **kw}


def test_a_cell_records_every_prompt_and_repeat_with_provenance(prompt_file, tiny_models):
    doc = run_cell(job(prompt_file, tiny_models, draft="tiny-draft", strategy="speculative", k=3))
    run, rows = doc["run"], doc["measurements"]
    assert doc["format"] == "specdec-result/2" and run["status"] == "ok"
    assert [(r["prompt_id"], r["repeat"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert all(r["status"] == "ok" and r["acceptance_rate"] is not None for r in rows)
    assert rows[2]["new_tokens"] == 24  # two turns of 12 tokens each
    for key in ("run_id", "host", "torch_version", "transformers_version", "specdec_version", "cpu_name",
                "git_commit", "started_utc", "finished_utc"):
        assert key in run
    assert run["params"]["k"] == 3 and run["params"]["target_source"].startswith("path:")
    assert run["devices"] == ["cpu"] and run["gpu_count"] == 0


def test_missing_weights_become_failed_rows_not_a_crash(prompt_file, tiny_models, tmp_path):
    models = {**tiny_models, "gone": {"path": str(tmp_path / "nowhere")}}
    out = tmp_path / "r.json"
    assert run_job(job(prompt_file, models, target="gone"), out) == 0
    doc = json.loads(out.read_text())
    assert doc["run"]["status"] == "failed" and "not available" in doc["run"]["error"]
    assert len(doc["measurements"]) == 4 and all(m["status"] == "failed" for m in doc["measurements"])


def test_asking_for_gpus_on_a_cpu_machine_fails_the_cell_clearly(prompt_file, tiny_models, monkeypatch):
    monkeypatch.setattr(devices, "visible_gpus", lambda: [])
    doc = run_cell(job(prompt_file, tiny_models, gpus=2))
    assert doc["run"]["status"] == "failed"
    assert "asks for 2 GPU(s) but this machine has 0" in doc["run"]["error"]


def test_gpu_claims_are_distinct_and_released(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_GPU_LOCK_DIR", str(tmp_path))
    inventory = [DeviceInfo(i, f"uuid-{i}", "A100", 40 << 30) for i in range(4)]
    first = claim_gpus(2, inventory)
    second = claim_gpus(2, inventory)
    assert set(first.indices).isdisjoint(second.indices) and len(first.indices) == 2
    with pytest.raises(DeviceError, match="could not claim 1 free GPU"):
        claim_gpus(1, inventory, timeout_s=0.2, poll_s=0.05)
    first.release()
    assert claim_gpus(2, inventory, timeout_s=1).indices == first.indices
    with pytest.raises(DeviceError, match="asks for 5 GPU"):
        claim_gpus(5, inventory)


@pytest.mark.parametrize("strategy", ["recycling", "suffix", "rest", "lookahead", "dynamic-tree"])
def test_train_free_cells_give_the_baseline_tokens(prompt_file, tiny_models, tmp_path, strategy):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("what is two plus two? la la la la la la again: la la la")
    extra = {"rest_corpus": str(corpus)} if strategy == "rest" else {}
    base = run_cell(job(prompt_file, tiny_models))["measurements"]
    doc = run_cell(job(prompt_file, tiny_models, strategy=strategy, k=4, tree_budget=6, warmup=0, **extra))
    assert doc["run"]["status"] == "ok", doc["run"]["error"]
    assert doc["run"]["params"].get("rest_corpus") == extra.get("rest_corpus")
    rows = doc["measurements"]
    assert [r["token_ids"] for r in rows] == [r["token_ids"] for r in base]
    assert all(r["status"] == "ok" and r["mean_accepted_tokens"] >= 1 for r in rows)
