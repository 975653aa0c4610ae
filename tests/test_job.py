"""One workflow cell: models loaded once, every prompt × repeat recorded, failures stored, GPUs claimed."""

from __future__ import annotations

import json

import pytest

from specdec.measure import machine
from specdec.run import devices
from specdec.run.devices import DeviceError, DeviceInfo, claim_gpus
from specdec.run.job import run_cell, run_job
from tiny import needs_panels


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


@needs_panels
def test_a_cpu_cell_stores_the_machines_limits_probed_once_per_host(prompt_file, tiny_models, monkeypatch):
    monkeypatch.setenv("SPECDEC_MACHINE_PROBE", "on")
    monkeypatch.setattr(machine, "busy", lambda load: False)  # a busy suite must not make the cached probe stale
    first = run_cell(job(prompt_file, tiny_models, repeats=1))["run"]
    record = first["machine"]
    assert record["bandwidth_gb_s"] > 0 and record["float32_gflop_s"] > 0
    assert record["threads"] == first["params"]["threads_used"] and record["host"] == first["host"]
    monkeypatch.setattr(machine, "probe_in_child", lambda *a: pytest.fail("probed again instead of the cache"))
    assert run_cell(job(prompt_file, tiny_models, repeats=1))["run"]["machine"] == record
    monkeypatch.setenv("SPECDEC_MACHINE_PROBE", "off")
    assert run_cell(job(prompt_file, tiny_models, repeats=1))["run"]["machine"] is None


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


@pytest.mark.parametrize("strategy", ["speculative", "ngram"])
def test_a_batched_cell_pairs_its_baseline_at_the_same_batch_size(prompt_file, tiny_models, strategy):
    """batch_size 2: both prompts in flight at once (the second a two-turn conversation), the paired baseline at
    the same batch size in the same job, every row's tokens those of the one-at-a-time cell."""
    draft = "tiny-draft" if strategy == "speculative" else None
    one = run_cell(job(prompt_file, tiny_models, draft=draft, strategy=strategy, k=3))["measurements"]
    doc = run_cell(job(prompt_file, tiny_models, draft=draft, strategy=strategy, k=3, batch_size=2))
    run, rows = doc["run"], doc["measurements"]
    assert run["status"] == "ok", run["error"]
    assert run["params"]["batch_size"] == 2

    def tokens(measurements):
        return {(r["prompt_id"], r["repeat"]): r["token_ids"] for r in measurements}

    assert tokens(rows) == tokens(one)
    assert [(r["prompt_id"], r["repeat"]) for r in rows] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    base = doc["paired_baseline"]
    assert base["run"]["params"]["batch_size"] == 2 and base["run"]["params"]["strategy"] == "baseline"
    assert tokens(base["measurements"]) == tokens(one)
    sides = [(b["repeat"], b["side"]) for b in run["batches"]]
    assert sides == [(0, "cell"), (0, "baseline"), (1, "baseline"), (1, "cell")]  # ABBA over repeats
    for b in run["batches"]:
        assert b["sequences"] == 2 and b["new_tokens"] == 12 + 24
        assert b["tokens_per_s"] == pytest.approx(b["new_tokens"] / b["wall_s"])


def test_a_batch_larger_than_the_prompts_fails_the_cell_in_one_line(prompt_file, tiny_models):
    doc = run_cell(job(prompt_file, tiny_models, batch_size=3))
    assert doc["run"]["status"] == "failed"
    assert "batch_size 3 is more than the job's 2 prompt(s)" in doc["run"]["error"]
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        run_cell(job(prompt_file, tiny_models, batch_size=0))


def test_transformers_refuses_assisted_generation_in_a_batch_and_the_cell_says_so(prompt_file, tiny_models):
    doc = run_cell(job(prompt_file, tiny_models, draft="tiny-draft", strategy="hf-assisted", k=3, batch_size=2,
                       warmup=0))
    rows = doc["measurements"]
    assert all(r["status"] == "failed" for r in rows)
    assert "batch_size = 1" in rows[0]["error"] or "batch size" in rows[0]["error"].lower()


def test_a_jobs_result_file_passes_ingest_validation(prompt_file, tiny_models, tmp_path):
    """The workflow's own result files always pass the store's checks (db/result.schema.json and the invariants):
    a cell with a paired baseline and a multi-turn prompt, whose new tokens exceed max_new_tokens (two turns)."""
    from specdec.db.store import load_result_file

    out = tmp_path / "r.json"
    assert run_job(job(prompt_file, tiny_models, draft="tiny-draft", strategy="speculative", k=3,
                       baseline_mode="paired"), out) == 0
    doc = load_result_file(out)
    assert doc["paired_baseline"] is not None
    rows = doc["measurements"] + doc["paired_baseline"]["measurements"]
    assert [r["turns"] for r in doc["measurements"]] == [1, 1, 2, 2]
    assert max(r["new_tokens"] for r in rows) == 24 > doc["run"]["params"]["max_new_tokens"]
    batched = tmp_path / "batched.json"  # a batched cell's rows too
    assert run_job(job(prompt_file, tiny_models, strategy="ngram", k=3, batch_size=2, baseline_mode="paired"),
                   batched) == 0
    assert [r["turns"] for r in load_result_file(batched)["measurements"]] == [1, 2, 1, 2]
