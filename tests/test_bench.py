"""`specdec bench` and the engine speed work: table/JSON structure, ratios computed from the measured numbers,
memory probe, argument checks; prepared (oneDNN) models and pre-allocated caches give the same outputs.
No timing assertions: speed goals are checked by running the bench, not by tests."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

import specdec.model.models
from specdec.run import bench, bench_measure as measure
from specdec.model import decoding, kernels
from specdec.model.decoding import DecodeSettings, Trace, baseline_decode
from specdec.measure.metrics import degeneracy, expected_tokens, leviathan_speedup, make_record
from specdec.run.runner import SettingsError, check_settings, decode_models
from tiny import EOS, needs_panels, noisy_copy, prompts, save_tiny_pair, tiny_target


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    models = root / "models.yaml"
    models.write_text(yaml.safe_dump(save_tiny_pair(root)))
    prompt_file = root / "prompts.jsonl"
    rows = [{"id": "qa-1", "category": "qa", "prompt": "what is two plus two? two plus two is"},
            {"id": "rep-1", "category": "repetitive", "prompt": "la la la la la la la la"},
            {"id": "rep-2", "category": "repetitive", "prompt": "one two one two one two"}]
    prompt_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return ["--models", str(models), "--target", "tiny-target", "--prompts", str(prompt_file)]


def run_bench(capsys, argv):
    code = bench.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_tiny_bench_prints_table_then_json_with_ratios_from_its_own_numbers(tiny_setup, capsys):
    code, out, err = run_bench(capsys, tiny_setup + [
        "--draft", "tiny-draft", "--draft", "tiny-target:1", "--max-new-tokens", "8", "--repeats", "2",
        "--ignore-eos", "--memory", "off", "--per-category", "1"])
    assert code == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    cells = ["baseline", "speculative@tiny-draft", "speculative@tiny-target:1", "ngram", "hf-generate",
             "hf-assisted@tiny-draft", "hf-assisted@tiny-target:1", "hf-ngram"]
    assert list(result["tokens_per_s"]) == cells
    assert result["prompts"] == ["qa-1", "rep-1"] and result["repeats"] == 2
    table = "\n".join(lines[:-1])
    for name in cells:
        assert f"\n{name} " in table  # one row per runner
    tps = result["tokens_per_s"]
    assert all(v > 0 for v in tps.values())
    pairs = {"baseline/hf-generate": ("baseline", "hf-generate"),
             "speculative@tiny-draft/hf-assisted@tiny-draft": ("speculative@tiny-draft", "hf-assisted@tiny-draft"),
             "speculative@tiny-target:1/hf-assisted@tiny-target:1": ("speculative@tiny-target:1",
                                                                    "hf-assisted@tiny-target:1"),
             "ngram/hf-ngram": ("ngram", "hf-ngram")}
    assert set(result["ratios"]) == set(pairs)
    for key, (ours, peer) in pairs.items():
        assert result["ratios"][key] == pytest.approx(tps[ours] / tps[peer])
    for name, value in result["speedup"].items():
        base = "hf-generate" if name.startswith("hf-") else "baseline"
        assert value == pytest.approx(tps[name] / tps[base])
    assert set(result["leviathan"]) == set(cells) - {"baseline", "hf-generate"}
    for name, lev in result["leviathan"].items():
        assert 0 <= lev["alpha"] <= 1 and lev["c"] >= 0 and lev["predicted"] > 0
        assert lev["measured"] == pytest.approx(result["speedup"][name])
        assert lev["measured_over_predicted"] == pytest.approx(lev["measured"] / lev["predicted"])
    # greedy: our speculative runners reproduce our baseline token for token
    for name in ("speculative@tiny-draft", "speculative@tiny-target:1", "ngram"):
        assert result["identical_to_baseline"][name] == 1.0
    breakdown = result["step_breakdown_ms"]["speculative@tiny-draft"]
    assert breakdown["draft_ms"] > 0 and breakdown["verify_forward_ms"] > 0
    assert breakdown["step_ms"] == pytest.approx(breakdown["draft_ms"] + breakdown["verify_forward_ms"]
                                                 + breakdown["accept_ms"] + breakdown["rollback_ms"]
                                                 + breakdown["other_ms"])
    assert set(result["goals"]) == {"speculative_over_hf_assisted", "ngram_over_hf_ngram",
                                    "baseline_over_hf_generate", "leviathan_fraction",
                                    "leviathan_fraction_with_verify_cost", "speculative_memory"}
    assert result["goals"]["speculative_memory"] is None  # not measured with --memory off


def test_memory_probe_runs_each_runner_in_its_own_process(tiny_setup, capsys):
    code, out, err = run_bench(capsys, tiny_setup + [
        "--runners", "baseline,speculative", "--draft", "tiny-draft", "--max-new-tokens", "6", "--repeats", "1",
        "--warmup", "0", "--prompt-ids", "qa-1", "--ignore-eos"])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    memory = result["memory"]
    assert set(memory) == {"baseline", "speculative@tiny-draft"}
    target = tiny_target(vocab=99, dtype=torch.float32)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head dim x float32 bytes
    weights = sum(p.numel() * p.element_size() for p in target.parameters())
    base, spec = memory["baseline"], memory["speculative@tiny-draft"]
    assert base["weights_bytes"] == weights and spec["weights_bytes"] == 2 * weights
    assert base["kv_bytes"] == per_token * base["sequence_tokens"]
    assert spec["kv_bytes"] == 2 * per_token * spec["sequence_tokens"]
    for m in (base, spec):
        assert m["peak_bytes"] == m["held_bytes"] + m["run_bytes"] and m["run_bytes"] >= 0
        assert 4096 * 64 <= m["rss_resolution_bytes"] <= 2**30  # at least one batch of pages, never a GiB
        # ours holds pre-packed weights: about the parameter bytes, never a second copy
        assert 0.9 * m["weights_bytes"] <= m["held_bytes"] <= 1.1 * m["weights_bytes"]
        assert m["over_weights_and_kv"] == pytest.approx(m["peak_bytes"] / (m["weights_bytes"] + m["kv_bytes"]))
    assert "peak memory per runner" in out


def test_run_growth_forgives_only_the_counters_resolution():
    assert measure.run_growth(1000, 5096, 4096) == 4096
    assert measure.run_growth(53248 + 4096, 4096, 524288) == 0  # -52 KiB: below the resolution, read as no growth
    with pytest.raises(measure.BenchError, match="resolution"):
        measure.run_growth(10 * 2**20, 2**20, 524288)  # 9 MiB below: not counter noise


def test_weight_formats_are_runners_with_their_own_baseline(tiny_setup, capsys):
    code, out, err = run_bench(capsys, tiny_setup + [
        "--runners", "baseline,ngram", "--weights", "float32,int8", "--max-new-tokens", "8", "--repeats", "1",
        "--ignore-eos", "--memory", "off", "--prompt-ids", "rep-1", "--threads", "1"])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    tps = result["tokens_per_s"]
    assert list(tps) == ["baseline[float32]", "baseline[int8]", "ngram[float32]", "ngram[int8]"]
    assert result["weights"] == {"baseline[float32]": "float32", "baseline[int8]": "int8",
                                 "ngram[float32]": "float32", "ngram[int8]": "int8"}
    for fmt in ("float32", "int8"):
        assert result["speedup"][f"ngram[{fmt}]"] == pytest.approx(tps[f"ngram[{fmt}]"] / tps[f"baseline[{fmt}]"])
        assert result["identical_to_baseline"][f"ngram[{fmt}]"] == 1.0  # own plain decoding, same format
    assert result["identical_to_ours"]["baseline[float32]"] == 1.0
    assert 0 <= result["prefix_agreement_with_ours"]["baseline[int8]"] <= 1
    assert result["threads"] == 1


@pytest.mark.child_process  # llama.cpp runs in this process: a native crash fails this test only (conftest.py)
def test_llamacpp_runners_in_the_bench(capsys, tmp_path, monkeypatch):
    """The embedded GGUF under llama.cpp only (no torch model loads): its own baseline, counted acceptance; a
    runner that crashes natively (simulated: its decoding dies of SIGSEGV) is reported, the others measured."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("SPECDEC_SIMULATE_CRASH", "decode:llamacpp-suffix")
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_text(json.dumps({"id": "rep-1", "category": "repetitive",
                                       "prompt": "Repeat exactly: red green blue, red green blue."}) + "\n")
    code, out, err = run_bench(capsys, [
        "--prompts", str(prompt_file), "--runners",
        "llamacpp-generate,llamacpp-suffix,llamacpp-specdec-ngram,llamacpp-ngram",
        "--max-new-tokens", "12", "--repeats", "1", "--threads", "1", "--memory", "subprocess"])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert list(result["crashed"]) == ["llamacpp-suffix"] and "llamacpp-suffix" not in result["tokens_per_s"]
    assert result["crashed"]["llamacpp-suffix"].startswith("crashed: died of SIGSEGV in engine llamacpp, at File")
    assert "CRASHED llamacpp-suffix: crashed: died of SIGSEGV" in out
    assert out.splitlines()[0].endswith(f"llama.cpp extra buffers: {result['llamacpp_extra_buffers']}")
    assert result["llamacpp_extra_buffers"] in ("on (no AMX)", "amx", "off (probe crashed: SIGSEGV)")
    tps = result["tokens_per_s"]
    assert set(result["engines"].values()) == {"llamacpp"} and set(result["weights"].values()) == {"gguf-Q4_1"}
    for name in ("llamacpp-specdec-ngram", "llamacpp-ngram"):
        assert result["speedup"][name] == pytest.approx(tps[name] / tps["llamacpp-generate"])
        assert len(result["acceptance_by_position"][name]) == result["k_per_runner"][name] == 8  # their default k
        assert result["leviathan"][name]["alpha"] is not None
    assert result["identical_to_ours"]["llamacpp-generate"] is None  # our engine did not run
    assert result["memory"] == {}  # llama.cpp allocates its own buffers: not probed


def test_summary_compares_ours_with_the_same_method_in_llamacpp():
    s = DecodeSettings(k=2)
    cells = [measure.Cell("baseline", weights="int4"), measure.Cell("llamacpp-generate"),
             measure.Cell("ngram", weights="int4"), measure.Cell("llamacpp-specdec-ngram")]
    runs = {"baseline[int4]": [fake_run(0, 0, 10, 1.0)], "llamacpp-generate": [fake_run(0, 0, 10, 2.0)],
            "ngram[int4]": [fake_run(0, 0, 10, 0.5, k=2, proposed=[4, 2], accepted=[3, 1], steps=5)],
            "llamacpp-specdec-ngram": [fake_run(0, 0, 10, 4.0, k=2, proposed=[4, 2], accepted=[3, 1], steps=5)]}
    summary = measure.summarise(cells, runs, s)
    rows = summary["cells"]
    assert rows["ngram[int4]"]["speedup"] == pytest.approx(2.0)  # over baseline[int4]
    assert rows["llamacpp-specdec-ngram"]["speedup"] == pytest.approx(0.5)  # over llamacpp-generate
    assert summary["ratios"] == {"baseline[int4]/llamacpp-generate": pytest.approx(2.0),
                                 "ngram[int4]/llamacpp-specdec-ngram": pytest.approx(8.0)}
    assert rows["llamacpp-generate"]["identical_to_ours"] == 1.0  # fake runs all produce the same tokens
    assert rows["llamacpp-generate"]["prefix_agreement_with_ours"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--runners", "baseline,beam"], "unknown runner(s) ['beam']"),
    (["--k", "0"], "draft length k must be an integer from 1 to 64"),
    (["--draft", "tiny-draft:x"], "must be a number of layers >= 1"),
    (["--draft", "no-such-model"], "unknown model alias 'no-such-model'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--categories", "poetry"], "categories ['poetry'] are not in the prompt file"),
    (["--prompt-ids", "nope"], "prompt id(s) ['nope'] are not in the prompt file"),
    (["--weights", "int3"], "--weights: unknown format(s) ['int3']"),
    (["--runners", "llamacpp-generate"], "not a GGUF file"),
])
def test_bad_arguments_fail_in_one_line_before_any_model_loads(tiny_setup, capsys, monkeypatch, argv, message):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(specdec.model.models, "load_model", no_loading)
    code, out, err = run_bench(capsys, tiny_setup + argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


# --- aggregation, on synthetic runs (exact numbers, no timing) --------------------------------------------------

def fake_run(prompt, repeat, tokens, wall, k=None, proposed=None, accepted=None, steps=0, draft_s=0.0,
             verify_s=0.0, totals_only=False):
    steps = steps if k else tokens - 1  # plain decoding: every token after the first is one step
    trace = Trace(tokens=list(range(3, 3 + tokens)), wall_s=wall, ttft_s=wall / 10, steps=steps,
                  target_passes=steps + 1 if k else tokens, draft_s=draft_s, verify_s=verify_s,
                  proposed_per_position=proposed or [], accepted_per_position=accepted or [],
                  draft_units=sum(proposed or []))
    record = make_record(trace, k, 5, speculative=k is not None)
    record.update(degeneracy(record["token_ids"], [[1, 2, 3, 4, 5]]))
    if totals_only:  # as runner.record_of reports transformers' runners
        record["proposed_per_position"] = record["accepted_per_position"] = None
    return {"prompt": prompt, "repeat": repeat, "record": record, "trace": trace}


def test_summary_uses_medians_over_repeats_and_the_leviathan_model_of_the_steps_taken():
    s = DecodeSettings(k=2)
    cells = [measure.Cell("baseline"), measure.Cell("speculative", "d"), measure.Cell("hf-generate"),
             measure.Cell("hf-assisted", "d")]
    runs = {
        # prompt 0: walls 1, 3, 2 -> median 2; prompt 1: walls 4, 4, 9 -> median 4; 10 tokens each
        "baseline": [fake_run(p, r, 10, w) for p, walls in enumerate([(1, 3, 2), (4, 4, 9)])
                     for r, w in enumerate(walls)],
        "speculative@d": [fake_run(p, r, 10, w, k=2, proposed=[4, 2], accepted=[3, 1], steps=5, draft_s=0.6,
                                   verify_s=1.0) for p, walls in enumerate([(1, 1, 1), (2, 2, 2)])
                          for r, w in enumerate(walls)],
        "hf-generate": [fake_run(p, r, 10, 4.0) for p in range(2) for r in range(3)],
        "hf-assisted@d": [fake_run(p, r, 10, 5.0, k=2, proposed=[8], accepted=[4], steps=5, draft_s=0.5,
                                   verify_s=1.0, totals_only=True) for p in range(2) for r in range(3)],
    }
    summary = measure.summarise(cells, runs, s)
    rows = summary["cells"]
    assert rows["baseline"]["tokens_per_s"] == pytest.approx(20 / 6)
    assert rows["speculative@d"]["tokens_per_s"] == pytest.approx(20 / 3)
    assert rows["speculative@d"]["speedup"] == pytest.approx(2.0)
    assert rows["speculative@d"]["degenerate_share"] == 0  # 10 distinct tokens: neither copied nor looping
    assert summary["ratios"] == {"baseline/hf-generate": pytest.approx((20 / 6) / (20 / 8)),
                                 "speculative@d/hf-assisted@d": pytest.approx((20 / 3) / (20 / 10))}
    spec = rows["speculative@d"]
    assert spec["acceptance_rate"] == pytest.approx(4 / 6)
    assert spec["acceptance_by_position"] == pytest.approx([3 / 4, 1 / 2])
    assert rows["hf-assisted@d"]["acceptance_by_position"] is None  # transformers reports totals only
    c = (0.6 / 6) / (1.0 / 5)  # one draft forward ÷ one verify forward
    assert spec["cost_ratio_c"] == pytest.approx(c)
    # 5 steps: 1 proposed nothing, 2 proposed one draft, 2 proposed two
    alpha = 4 / 6
    expected = ((1 * 1 + 2 * expected_tokens(alpha, 1) + 2 * expected_tokens(alpha, 2))
                / (1 * 1 + 2 * (c + 1) + 2 * (2 * c + 1)))
    assert spec["leviathan_prediction"] == pytest.approx(expected)
    assert summary["leviathan"]["speculative@d"]["measured_over_predicted"] == pytest.approx(2.0 / expected)
    # verify pass 1.0 s / 5 steps vs a plain step of baseline: Σ(wall - ttft) / Σ steps (steps = tokens - 1)
    base_step = sum(w - w / 10 for w in (1, 3, 2, 4, 4, 9)) / (6 * 9)
    v = (1.0 / 5) / base_step
    assert spec["verify_over_step"] == pytest.approx(v)
    assert spec["measured_over_predicted_with_verify_cost"] == pytest.approx(2.0 * v / expected)
    per = measure.by_category(cells, runs, ["chat", "rag"])  # prompt 0 is chat, prompt 1 rag
    assert per["baseline"]["chat"]["tokens_per_s"] == pytest.approx(10 / 2)
    assert per["speculative@d"]["chat"]["speedup"] == pytest.approx((10 / 1) / (10 / 2))
    assert per["speculative@d"]["rag"]["speedup"] == pytest.approx((10 / 2) / (10 / 4))
    assert per["speculative@d"]["rag"]["mean_accepted_tokens"] == pytest.approx(spec["mean_accepted_tokens"])
    assert per["hf-assisted@d"]["rag"]["speedup"] == pytest.approx((10 / 5) / (10 / 4))  # over hf-generate
    hf = rows["hf-assisted@d"]  # totals only: the mean draft length per pass (8 / 5) stands in for k
    n, c_hf = 8 / 5, (0.5 / 8) / (1.0 / 5)
    assert hf["leviathan_prediction"] == pytest.approx(expected_tokens(0.5, n) / (n * c_hf + 1))


def test_leviathan_per_step_model_reduces_to_the_paper_formula_for_a_fixed_k():
    assert leviathan_speedup(0.7, 4, 0.1, [10, 10, 10, 10], 10) == pytest.approx(leviathan_speedup(0.7, 4, 0.1))
    # half the steps propose nothing: they yield one token at cost one
    mixed = leviathan_speedup(0.7, 2, 0.1, [5, 5], 10)
    assert mixed == pytest.approx((5 + 5 * expected_tokens(0.7, 2)) / (5 + 5 * 1.2))


# --- engine speed work keeps outputs --------------------------------------------------------------------------

LINEARS = ["onednn", "mkl", pytest.param("panels", marks=needs_panels)]


@pytest.mark.parametrize("linear", LINEARS)
def test_prepared_float32_model_matches_stock(linear):
    stock = tiny_target(dtype=torch.float32)
    prepared = kernels.prepare_model(copy.deepcopy(stock), linear=linear)
    assert kernels.prepare_model(prepared) is prepared  # idempotent
    kinds = {type(m).__name__ for m in prepared.modules()}
    head = type(prepared.get_output_embeddings()).__name__
    assert head == ("PanelLinear" if linear == "panels" else "DenseOneDNNLinear")
    if linear in ("onednn", "panels"):
        assert {"onednn": "PackedLinear", "panels": "PanelLinear"}[linear] in kinds and "Linear" not in kinds
        packed_bytes = sum(p.numel() for p in prepared.parameters())
        assert packed_bytes < sum(p.numel() for p in stock.parameters()) / 2  # no dense copy of packed layers kept
    else:
        assert "PackedLinear" not in kinds and "PanelLinear" not in kinds and "Linear" in kinds
        assert sum(p.numel() for p in prepared.parameters()) == sum(p.numel() for p in stock.parameters())
    ids = prompts(1, seed=3)[0] + [5, 6, 7]
    torch.testing.assert_close(decoding.forward(prepared, ids, None, 4)[0], decoding.forward(stock, ids, None, 4)[0],
                               rtol=1e-4, atol=1e-4)
    layer = prepared.model.layers[0].mlp.up_proj
    torch.testing.assert_close(layer.weight, stock.model.layers[0].mlp.up_proj.weight)


def test_linear_kernels_are_ours_where_they_run_then_follow_the_cpu_vendor(monkeypatch):
    monkeypatch.delenv("SPECDEC_CPU_LINEAR", raising=False)
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "AuthenticAMD")
    assert kernels.linear_kernels() == ("panels" if kernels.panel_kernel_problem() is None else "onednn")
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "GenuineIntel")  # our kernel there too where it runs
    intel = "mkl" if torch.backends.mkl.is_available() else "onednn"
    assert kernels.linear_kernels() == ("panels" if kernels.panel_kernel_problem() is None else intel)
    monkeypatch.setattr(kernels, "panel_kernel_problem", lambda: "this CPU offers AVX2, not AVX512")
    assert kernels.linear_kernels() == intel
    monkeypatch.setenv("SPECDEC_CPU_LINEAR", "onednn")
    assert kernels.linear_kernels() == "onednn"
    monkeypatch.setenv("SPECDEC_CPU_LINEAR", "fast")
    with pytest.raises(ValueError, match="SPECDEC_CPU_LINEAR must be one of auto, mkl, onednn, panels, got 'fast'"):
        kernels.linear_kernels()
    with pytest.raises(SettingsError, match="SPECDEC_CPU_LINEAR"):  # before any model loads
        check_settings("baseline", None, DecodeSettings())


@pytest.mark.parametrize("linear", LINEARS)
def test_prepared_models_decode_like_stock_ones(linear):
    stock_target = tiny_target(dtype=torch.float32)
    target = kernels.prepare_model(copy.deepcopy(stock_target), linear=linear)
    draft = kernels.prepare_model(noisy_copy(stock_target, 0.3), linear=linear)
    stock_target._specdec_prepared = True  # keep this one on the stock layers, as the reference
    for p in prompts(4, seed=21):
        s = DecodeSettings(max_new_tokens=24, k=3, stop_at_eos=False)
        expected = baseline_decode(stock_target, p, s, {EOS}).tokens
        assert baseline_decode(target, p, s, {EOS}).tokens == expected
        assert decode_models("speculative", target, p, s, {EOS}, draft_model=draft).tokens == expected
        assert decode_models("ngram", target, p, s, {EOS}).tokens == expected


def test_float64_models_are_left_as_they_are():
    model = tiny_target()  # float64: oneDNN linear kernels do not apply
    kernels.prepare_model(model)
    assert any(type(m) is torch.nn.Linear for m in model.modules())


def test_growing_cache_survives_growth_and_rollbacks():
    target = tiny_target()
    history = prompts(1, seed=2)[0]
    cache = decoding.new_cache(target, capacity=4)  # forces several regrowths
    decoding.forward(target, history, cache)
    assert decoding.kv_arena(cache) is not None  # every layer in the one buffer, sized for the prefill
    for fed, keep in (([5, 6, 7], 1), ([8, 9], 2), ([10] * 20, 20), ([11, 12, 13], 0)):
        out = decoding.forward(target, fed, cache, len(fed))[0]
        fresh = decoding.forward(target, history + fed, None, len(fed))[0]
        torch.testing.assert_close(out, fresh, rtol=0, atol=1e-9)
        history = history + fed[:keep]  # as after a verify pass that accepted `keep` tokens
        decoding.rollback(cache, len(history))
        assert cache.get_seq_length() == len(history)
    # grown out of it, each layer into a buffer of its own: the arena lets its memory go
    assert decoding.kv_arena(cache) is None and cache.layers[0].arena.tensor is None


def test_each_runner_takes_its_strategys_k_unless_the_bench_gives_one(tiny_setup, capsys):
    common = tiny_setup + ["--runners", "baseline,ngram,hf-ngram,dynamic-tree,speculative", "--draft", "tiny-target:1",
                           "--max-new-tokens", "6", "--repeats", "1", "--warmup", "0", "--memory", "off",
                           "--prompt-ids", "qa-1"]
    code, out, err = run_bench(capsys, common)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["k"] is None
    assert result["k_per_runner"] == {"ngram": 8, "hf-ngram": 8, "dynamic-tree": 8, "speculative@tiny-target:1": 4}
    assert result["tree_budget_per_runner"] == {"dynamic-tree": 8}
    assert "k per runner (ngram 8, hf-ngram 8, dynamic-tree 8/8, speculative@tiny-target:1 4)" in out
    # the k a runner ran with is the one its acceptance and Leviathan's prediction were computed for (dynamic-tree's
    # first pass drafts and verifies its full budget on this prompt; ngram's first draft is empty here, and the cost
    # policy may verify no draft after it where none pays on a random model, leaving no acceptance to predict from)
    assert result["leviathan"]["dynamic-tree"]["k"] == 8 and result["leviathan"]["hf-ngram"]["k"] == 8
    assert result["leviathan"]["speculative@tiny-target:1"]["k"] == 4
    code, out, err = run_bench(capsys, common + ["--k", "3", "--tree-budget", "5"])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["k"] == 3 and set(result["k_per_runner"].values()) == {3}
    assert result["tree_budget_per_runner"] == {"dynamic-tree": 5}
    assert "k=3," in out
