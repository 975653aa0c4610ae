"""Engine correctness on tiny random models: greedy token identity, exact sampling, cache rollback, edge cases."""

from __future__ import annotations

import collections
import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

import specdec.model.decoding as decoding
from specdec.model import kernels
import specdec.methods.speculative
import specdec.methods.verify
from specdec.model.decoding import DecodeSettings, baseline_decode, rollback
from specdec.engines.hf_reference import hf_decode
from specdec.measure.metrics import leviathan_speedup, make_record
from specdec.run.runner import decode_models
from tiny import DEVICE, EOS, context_free_memory, noisy_copy, prompts, tiny_config

from transformers import LlamaForCausalLM


def spec(target, draft, p, s, eos=frozenset({EOS})):
    return decode_models("speculative", target, p, s, eos, draft_model=draft)


def lookup(target, p, s, eos=frozenset({EOS})):
    return decode_models("ngram", target, p, s, eos)


def test_greedy_speculative_and_ngram_match_baseline(target, draft):
    accepted = rejected = 0
    for p in prompts(12, seed=3):
        s0 = DecodeSettings(max_new_tokens=40)
        base = baseline_decode(target, p, s0, {EOS}).tokens
        for k in range(1, 9):
            s = DecodeSettings(max_new_tokens=40, k=k)
            for trace in (spec(target, draft, p, s), lookup(target, p, s)):
                assert trace.tokens == base, f"k={k} prompt={p}"
                acc, prop = sum(trace.accepted_per_position), sum(trace.proposed_per_position)
                accepted += acc
                rejected += prop - acc
                # every target pass but the prefill verifies a block and yields accepted + 1 tokens
                assert trace.target_passes == 1 + trace.steps
    assert accepted > 500 and rejected > 500  # both paths exercised, not a vacuous comparison


@pytest.mark.parametrize("k", [1, 3, 8])
def test_eos_inside_accepted_run_stops_exactly(target, draft, k):
    for p in prompts(6, seed=5):
        free = baseline_decode(target, p, DecodeSettings(max_new_tokens=30, stop_at_eos=False), set()).tokens
        for j in (0, 4, 11):  # declare the token emitted at position j to be end-of-sequence
            eos = {free[j]}
            expected = free[: free.index(free[j]) + 1]
            s = DecodeSettings(max_new_tokens=30, k=k)
            base = baseline_decode(target, p, s, eos)
            assert base.tokens == expected and base.stop_reason == "eos"
            for trace in (spec(target, draft, p, s, eos), lookup(target, p, s, eos)):
                assert trace.tokens == expected and trace.stop_reason == "eos"


def test_ignoring_eos_generates_the_full_length(target, draft):
    p = prompts(1)[0]
    free = baseline_decode(target, p, DecodeSettings(max_new_tokens=20, stop_at_eos=False), set()).tokens
    s = DecodeSettings(max_new_tokens=20, k=4, stop_at_eos=False)
    assert spec(target, draft, p, s, {free[2]}).tokens == free


def test_max_new_tokens_inside_a_draft_block(target, draft):
    for p in prompts(4, seed=7):
        for n in range(1, 12):
            s = DecodeSettings(max_new_tokens=n, k=8)
            base = baseline_decode(target, p, s, {EOS}).tokens
            assert len(base) == n
            a, b = spec(target, draft, p, s), lookup(target, p, s)
            assert a.tokens == base and b.tokens == base
            # no draft position is ever proposed past the budget
            assert sum(a.proposed_per_position) <= max(0, n - 1) * 8


def test_baseline_without_cache_matches_cached(target):
    for p in prompts(3, seed=11):
        s = DecodeSettings(max_new_tokens=16)
        assert baseline_decode(target, p, s, {EOS}).tokens == \
            baseline_decode(target, p, DecodeSettings(max_new_tokens=16, use_cache=False), {EOS}).tokens


def test_rollback_leaves_cache_equal_to_a_fresh_forward(target):
    p = prompts(1, seed=2)[0]
    extra = [5, 9, 13, 17, 21]
    cache = decoding.new_cache(target)
    decoding.forward(target, p + extra, cache, 1)
    rollback(cache, len(p) + 2)
    assert cache.get_seq_length() == len(p) + 2
    after = decoding.forward(target, [30, 31], cache, 2)[0]
    fresh = decoding.forward(target, p + extra[:2] + [30, 31], None, 2)[0]
    torch.testing.assert_close(after, fresh, rtol=0, atol=1e-9)


def test_every_verify_pass_after_rejections_sees_a_correct_cache(target, draft, monkeypatch):
    """Wrap the target's forward: at each verify pass compare its logits with a from-scratch forward of the
    sequence the cache should hold (the committed prefix) plus the pass's input."""
    p = prompts(1, seed=4)[0]
    calls = []
    real_forward, real_passes = decoding.forward, decoding.forward_passes

    def recording_passes(model, passes, vocab=None):  # the verify passes (speculative.decode_slots)
        if model is not target:  # the draft's passes (speculative.draft_together)
            return real_passes(model, passes, vocab)
        before = [p.cache.get_seq_length() for p in passes]
        outs = real_passes(model, passes, vocab)
        calls.extend((cached, list(p.ids), logits.clone()) for cached, p, (logits, _) in zip(before, passes, outs))
        return outs

    monkeypatch.setattr(specdec.methods.speculative, "forward_passes", recording_passes)
    trace = spec(target, draft, p, DecodeSettings(max_new_tokens=40, k=5))
    monkeypatch.setattr(specdec.methods.speculative, "forward_passes", real_passes)
    calls = calls[1:]  # the prefill
    full = p + trace.tokens
    rejections = sum(trace.proposed_per_position) - sum(trace.accepted_per_position)
    assert rejections > 0 and len(calls) > 3
    for cached, ids, logits in calls:
        assert ids[0] == full[cached]  # the pass starts right after the cached prefix
        fresh = real_forward(target, full[:cached] + ids, None, len(ids))[0]
        torch.testing.assert_close(logits, fresh, rtol=0, atol=1e-9)


# --- exact speculative sampling -------------------------------------------------------------------------------

def empirical_vs_expected(counts: dict, expected: dict, n: int) -> float:
    """Chi-square p-value of observed counts against exact probabilities (bins with expectation < 5 pooled)."""
    obs, exp = [], []
    pool_o = pool_e = 0.0
    for key, prob in expected.items():
        if prob * n < 5:
            pool_o += counts.get(key, 0)
            pool_e += prob * n
        else:
            obs.append(counts.get(key, 0))
            exp.append(prob * n)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    scale = sum(obs) / sum(exp)
    return chisquare(obs, [e * scale for e in exp]).pvalue


def test_verify_rule_reproduces_the_target_distribution():
    """One position, synthetic p and q: the emitted token (accepted draft or residual sample) must follow p."""
    gen = torch.Generator().manual_seed(0)
    s = DecodeSettings(temperature=1.0)
    p_logits = torch.tensor([[2.0, 1.0, 0.2, -1.0, 0.5, 0.0]])
    q = torch.softmax(torch.tensor([0.1, 2.5, 0.3, 1.0, -0.5, 0.0]), dim=-1)
    p = torch.softmax(p_logits[0], dim=-1)
    n = 20000
    counts = collections.Counter()
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=gen))
        accepted, correction = specdec.methods.verify.chain_rule(torch.cat([p_logits, p_logits]), [x], q[None], s, gen)
        counts[x if accepted else correction] += 1
    pvalue = empirical_vs_expected(counts, {i: float(p[i]) for i in range(6)}, n)
    assert pvalue > 1e-3, f"speculative sampling does not reproduce p (chi-square p={pvalue:.2e})"


def tiny_sampling_models():
    torch.manual_seed(0)
    config = tiny_config(vocab=4, layers=1, hidden=16)
    target = LlamaForCausalLM(config).double().eval().requires_grad_(False).to(DEVICE)
    with torch.no_grad():
        target.lm_head.weight.mul_(6.0)
    return target, noisy_copy(target, 1.5, seed=3)


def exact_sequence_distribution(model, prompt, length, s):
    """P(x1..xL | prompt) under the target's processed distribution, by enumerating every sequence."""
    probs = {}
    for seq in itertools.product(range(4), repeat=length):
        logits = decoding.forward(model, prompt + list(seq[:-1]), None, length)[0]
        rows = decoding.logits_to_probs(logits, s)
        probs[seq] = math.prod(float(rows[i, t]) for i, t in enumerate(seq))
    return probs


def run_sampling(decode, n):
    return collections.Counter(tuple(decode(seed).tokens) for seed in range(n))


@pytest.mark.parametrize("draft_sampling", ["sample", "greedy"])
def test_speculative_sampling_matches_target_sequence_distribution(draft_sampling):
    target, draft = tiny_sampling_models()
    prompt, length, n = [1, 3, 0, 3], 4, 2500
    s = DecodeSettings(max_new_tokens=length, temperature=1.0, k=3, draft_sampling=draft_sampling,
                       stop_at_eos=False)
    exact = exact_sequence_distribution(target, prompt, length, s)
    counts = run_sampling(lambda seed: spec(target, draft, prompt, DecodeSettings(**{**vars(s), "seed": seed}),
                                            set()), n)
    pvalue = empirical_vs_expected(counts, exact, n)
    assert pvalue > 1e-3, f"distribution differs from the target's (chi-square p={pvalue:.2e})"


@pytest.mark.parametrize("strategy, length, per_sequence", [("recycling", 4, 1.0), ("dynamic-tree", 4, 1.0),
                                                            ("lookahead", 6, 0.33)])
def test_train_free_trees_sampling_matches_target_sequence_distribution(strategy, length, per_sequence):
    """Token Recycling's, the dynamic tree's and Lookahead's one-hot draft trees (no q: the tree rule) keep sampling
    exact (Lookahead's window rows are computed in the same passes and are not verified; its pool has guesses from
    the third pass)."""
    target, _ = tiny_sampling_models()
    prompt, n = [1, 3, 0, 3], 1500
    s = DecodeSettings(max_new_tokens=length, temperature=1.0, k=3, tree_budget=6, stop_at_eos=False,
                       lookahead_window=2)
    exact = exact_sequence_distribution(target, prompt, length, s)
    accepted = []

    memory = context_free_memory(target) if strategy == "dynamic-tree" else None  # what runner.prepare adds

    def run(seed):
        trace = decode_models(strategy, target, prompt, DecodeSettings(**{**vars(s), "seed": seed}), set(),
                              memory=memory)
        accepted.append(sum(trace.accepted_per_position))
        return trace

    pvalue = empirical_vs_expected(run_sampling(run, n), exact, n)
    assert sum(accepted) > per_sequence * n  # the trees were used: drafts accepted, on average per sequence
    assert pvalue > 1e-3, f"distribution differs from the target's (chi-square p={pvalue:.2e})"


def test_a_wrong_acceptance_rule_fails_the_same_test(monkeypatch):
    """Sanity check of the statistical test: accepting every draft (ignoring p/q) must be caught."""
    target, draft = tiny_sampling_models()
    prompt, length, n = [1, 3, 0, 3], 4, 2500
    s = DecodeSettings(max_new_tokens=length, temperature=1.0, k=3, draft_sampling="sample", stop_at_eos=False)
    exact = exact_sequence_distribution(target, prompt, length, s)

    def accept_everything(target_logits, drafts, draft_probs, s, generator):
        return len(drafts), decoding.sample(decoding.logits_to_probs(target_logits[-1], s), generator)

    monkeypatch.setattr(specdec.methods.verify, "chain_rule", accept_everything)
    counts = run_sampling(lambda seed: spec(target, draft, prompt, DecodeSettings(**{**vars(s), "seed": seed}),
                                            set()), n)
    assert empirical_vs_expected(counts, exact, n) < 1e-6


def test_top_p_and_top_k_keep_the_right_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    kept = decoding.logits_to_probs(logits, DecodeSettings(temperature=1.0, top_k=2)) > 0
    assert kept.tolist() == [[True, True, False, False, False]]
    probs = torch.softmax(logits, -1)[0]  # 0.64, 0.24, 0.09, ...: top-p 0.8 keeps the first two (0.88 >= 0.8)
    kept = decoding.logits_to_probs(logits, DecodeSettings(temperature=1.0, top_p=0.8)) > 0
    assert kept.tolist() == [[True, True, False, False, False]] and probs[0] < 0.8


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "blockwise"])
@pytest.mark.parametrize("seed", range(6))
def test_top_k_rows_are_torch_topk(seed, kernel, monkeypatch):
    """top_k_rows (our extension's scan where it runs, else the blockwise torch form) has torch.topk's values in its
    order, at indices holding them, all distinct: with ties everywhere (rounded logits), winners in the short last
    block and in the first, any k and vocabulary size."""
    if kernel and kernels.panel_kernel_problem() is not None:
        pytest.skip(kernels.panel_kernel_problem())
    if not kernel:
        monkeypatch.setattr(kernels, "row_select_fits", lambda x: False)
    gen = torch.Generator().manual_seed(seed)
    for trial in range(40):
        rows, k = int(torch.randint(1, 20, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
        vocab = int(torch.randint(1, 40_000, (1,), generator=gen))
        logits = torch.randn(rows, vocab, generator=gen) * 4
        if trial % 2:
            logits = logits.round()
        if trial % 5 == 0:
            logits[:, -min(3, vocab):] = 50.0
        if trial % 7 == 0:
            logits[:, :min(5, vocab)] = 60.0
        k = min(k, vocab)
        values, indices = decoding.top_k_rows(logits, k)
        assert torch.equal(values, torch.topk(logits, k).values)
        assert torch.equal(logits.gather(1, indices), values)
        assert all(len(set(row)) == k for row in indices.tolist())


@pytest.mark.parametrize("strategy", ["baseline", "speculative", "ngram"])
def test_same_seed_same_output_for_every_strategy(target, draft, strategy):
    p = prompts(1, seed=9)[0]

    def run(seed):
        s = DecodeSettings(max_new_tokens=24, temperature=0.9, top_p=0.95, k=4, draft_sampling="sample", seed=seed)
        return decode_models(strategy, target, p, s, {EOS}, draft_model=draft).tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("strategy", ["hf-generate", "hf-assisted", "hf-ngram"])
def test_transformers_peers_agree_with_our_greedy_baseline(target, draft, strategy):
    for p in prompts(3, seed=13):
        s = DecodeSettings(max_new_tokens=20, k=4)
        base = baseline_decode(target, p, s, {EOS}).tokens
        trace = hf_decode(strategy, target, p, s, [EOS], draft=draft if strategy == "hf-assisted" else None)
        assert trace.tokens == base
        assert trace.target_passes >= 1 and trace.ttft_s <= trace.wall_s
        if strategy == "hf-generate":
            assert trace.target_passes == len(base)
        else:
            assert trace.target_passes <= len(base)


def test_records_follow_the_spec_bench_and_vllm_conventions(target, draft):
    p = prompts(1, seed=1)[0]
    s = DecodeSettings(max_new_tokens=30, k=4, stop_at_eos=False)
    base = make_record(baseline_decode(target, p, s, {EOS}), None, len(p))
    assert base["mean_accepted_tokens"] == 1.0 and base["acceptance_rate"] is None
    trace = spec(target, draft, p, s)
    rec = make_record(trace, 4, len(p), speculative=True)
    assert rec["new_tokens"] == 30
    assert rec["accepted_tokens"] == sum(rec["accepted_per_position"])
    assert rec["acceptance_rate"] == pytest.approx(rec["accepted_tokens"] / rec["proposed_tokens"])
    # per-position acceptance can only fall: a position is reached only if every earlier one was accepted
    assert all(a >= b for a, b in zip(rec["accepted_per_position"], rec["accepted_per_position"][1:]))
    assert rec["mean_accepted_tokens"] == pytest.approx(30 / rec["target_forward_passes"])
    assert rec["cost_ratio_c"] > 0 and rec["leviathan_speedup"] > 0
    assert rec["tokens_per_s"] == pytest.approx(30 / rec["wall_s"])
    assert 0 < rec["ttft_s"] < rec["wall_s"]


def test_leviathan_formula():
    assert leviathan_speedup(0.0, 4, 0.0) == pytest.approx(1.0)
    assert leviathan_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    assert leviathan_speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8 ** 5) / (0.2 * 1.2))
    assert leviathan_speedup(None, 4, 0.1) is None
