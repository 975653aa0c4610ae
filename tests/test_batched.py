"""Batched decoding (speculative.decode_slots): several sequences per target pass, each with its own cache,
proposal and acceptance; slots refilled as sequences end. Every sequence's output must be the one it gets alone."""

from __future__ import annotations

import pytest
import torch

from specdec.methods.proposers import DraftLength, Proposal, make_proposer
from specdec.methods import speculative
from specdec.methods.speculative import Request, decode_slots
from specdec.methods.tree import Tree, chain
from specdec.model.decoding import DecodeSettings, baseline_decode, forward, new_cache
from specdec.model.kernels import prepare_model
from specdec.run.runner import decode_models
from specdec.strategies import STRATEGIES
from tiny import DEVICE, EOS, context_free_memory, prompts, tiny_target

STRATEGY_NAMES = ["baseline", "speculative", "ngram", "suffix", "recycling", "dynamic-tree", "lookahead"]


def requests(strategy: str, ps, s, draft, memory) -> list[Request]:
    st = STRATEGIES[strategy]
    if st.proposer is None:
        return [Request(p) for p in ps]
    return [Request(p, make_proposer(st.proposer, s, draft, None, None, memory), DraftLength(s, st.length, st.width,
                                                                                          {EOS}))
            for p in ps]


def ragged_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts of different lengths (ragged prefills and caches in one pass)."""
    return [p[: 5 + (i * 3) % 9] for i, p in enumerate(prompts(n, length=14, seed=seed))]


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_sequence_gets_its_batch_one_output(target, draft, strategy):
    s = DecodeSettings(max_new_tokens=16, k=4, tree_budget=6)
    ps = ragged_prompts(8, seed=21)
    memory = context_free_memory(target) if strategy == "dynamic-tree" else {}
    alone = [decode_models(strategy, target, p, s, {EOS}, draft_model=draft, memory=dict(memory)).tokens for p in ps]
    assert len({tuple(t) for t in alone}) > 4  # different outputs: not a vacuous comparison
    for slots in (3, 8):  # one slot is every other test's decoding (speculative_decode is decode_slots with one)
        rows = []
        traces = decode_slots(target, requests(strategy, ps, s, draft, dict(memory)), s, {EOS}, slots=slots,
                              on_pass=rows.append)
        assert [t.tokens for t in traces] == alone, f"slots={slots}"
        assert max(len(r) for r in rows) == min(slots, len(ps))  # the passes really held several sequences
        assert all(t.wall_s >= t.ttft_s > 0 for t in traces)


def test_plain_slots_match_baseline_decode_and_count_passes(target):
    s = DecodeSettings(max_new_tokens=12)
    ps = ragged_prompts(5, seed=2)
    traces = decode_slots(target, [Request(p) for p in ps], s, {EOS}, slots=4)
    for p, trace in zip(ps, traces):
        alone = baseline_decode(target, p, s, {EOS})
        assert trace.tokens == alone.tokens
        assert (trace.target_passes, trace.steps) == (alone.target_passes, alone.steps)


class Scripted:
    """A proposer that drafts a scripted tree per step (ragged across sequences: chains, trees, nothing)."""
    needs_features = reads_prompt_logits = False

    def __init__(self, trees):
        self.trees, self.step = trees, 0

    def start(self, prompt_ids, generator=None, prompt_logits=None):
        self.step = 0

    def propose(self, committed, feats, shape, trace):
        tree = self.trees[self.step % len(self.trees)]
        self.step += 1
        return Proposal(tree)

    def observe(self, committed, proposal=None, logits=None):
        pass


def test_ragged_proposals_in_one_pass_keep_exact_caches(target):
    """Chains, trees and empty drafts side by side; after every pass each sequence's cache holds exactly its
    committed tokens but the last (what a fresh prefill of them computes)."""
    prepare_model(target)
    s = DecodeSettings(max_new_tokens=16, k=3, tree_budget=4)
    star = Tree([5, 6, 7], [-1, -1, 0], [1, 1, 2])
    scripts = [[chain([9, 10, 11])], [star], [Tree()], [chain([4]), Tree(), star]]
    ps = ragged_prompts(4, seed=5)
    reqs = [Request(p, Scripted(tr), DraftLength(s, "fixed", 2, {EOS})) for p, tr in zip(ps, scripts)]
    sizes = []
    traces = decode_slots(target, reqs, s, {EOS}, slots=4, on_pass=sizes.append)
    assert sizes[1] == [4, 4, 1, 2]  # root + 3 chain nodes, root + 3 tree nodes, root alone, root + 1
    for p, trace in zip(ps, traces):
        assert trace.tokens == baseline_decode(target, p, s, {EOS}).tokens
    # the caches: decode again keeping the generations, then compare each cache with a fresh forward
    kept = []
    real = speculative.Generation.take

    def take(self, logits, hidden, forward_s):
        real(self, logits, hidden, forward_s)
        if self.done:
            kept.append(self)

    speculative.Generation.take = take
    try:
        decode_slots(target, [Request(p, Scripted(tr), DraftLength(s, "fixed", 2, {EOS}))
                              for p, tr in zip(ps, scripts)], s, {EOS}, slots=4)
    finally:
        speculative.Generation.take = real
    assert len(kept) == 4
    for g in kept:
        held = g.committed[:-1]
        assert g.cache.get_seq_length() == len(held)
        fresh = new_cache(target, len(held))
        forward(target, held, fresh)
        for mine, ref in zip(g.cache.layers, fresh.layers):
            torch.testing.assert_close(mine.keys, ref.keys, rtol=0, atol=1e-9)


def test_a_queue_holds_only_the_requests_in_flight(target):
    """Given a generator, decode_slots takes a request when a slot opens and drops it when it ends: a finished
    sequence's proposer (a dynamic tree's tables: 12 MiB per conversation) is freed before the queue is done, so
    a queue's memory is that of its slots, not of all its prompts."""
    import gc
    import weakref

    s = DecodeSettings(max_new_tokens=8, k=4, tree_budget=6, stop_at_eos=False)
    memory = context_free_memory(target)
    st = STRATEGIES["dynamic-tree"]
    proposers, alive_at_admission = [], []

    def queue():
        for p in ragged_prompts(5, seed=3):
            gc.collect()
            alive_at_admission.append(sum(ref() is not None for ref in proposers))
            proposer = make_proposer(st.proposer, s, None, None, None, memory)
            proposers.append(weakref.ref(proposer))
            yield Request(p, proposer, DraftLength(s, st.length, st.width, {EOS}))
            del proposer  # this generator's own reference

    traces = decode_slots(target, queue(), s, {EOS}, slots=2)
    assert [len(t.tokens) for t in traces] == [8] * 5
    # the first two fill the slots; every later admission finds only the other slot's proposer alive
    assert alive_at_admission == [0, 1, 1, 1, 1]
    gc.collect()
    assert all(ref() is None for ref in proposers)


def test_a_finished_sequence_gives_its_slot_to_the_next_prompt(target):
    """Sequences end at different times; the next prompt takes a freed slot in the very next pass, so no pass runs
    with an idle slot while prompts wait, and passes = tokens / slots up to the last sequence's tail."""
    s = DecodeSettings(max_new_tokens=24)
    ps = ragged_prompts(6, seed=8)
    rows = []
    traces = decode_slots(target, [Request(p) for p in ps], s, {EOS}, slots=2, on_pass=rows.append)
    assert len({len(t.tokens) for t in traces}) > 1  # the sequences do end at different times
    first_idle = next(i for i, r in enumerate(rows) if len(r) < 2)
    prefills = [r for r in rows[:first_idle + 1] if any(n > 1 for n in r)]
    assert sum(sum(n > 1 for n in r) for r in prefills) == len(ps)  # every prompt admitted before a slot idled
    assert all(len(r) == 1 for r in rows[first_idle:])  # from then on only the last sequence's tail
    tail = len(rows) - first_idle
    assert len(rows) == (sum(len(t.tokens) for t in traces) - tail + 1) // 2 + tail


def test_sampled_sequences_match_their_batch_one_samples(target, draft):
    """With temperature > 0 each sequence draws from its own generator, seeded as alone: the same tokens."""
    s = DecodeSettings(max_new_tokens=16, temperature=0.8, k=3, draft_sampling="sample", seed=3)
    ps = ragged_prompts(5, seed=13)
    for strategy in ("baseline", "speculative", "ngram"):
        alone = [decode_models(strategy, target, p, s, {EOS}, draft_model=draft).tokens for p in ps]
        batched = decode_slots(target, requests(strategy, ps, s, draft, {}), s, {EOS}, slots=3)
        assert [t.tokens for t in batched] == alone, strategy


def test_slots_must_be_positive(target):
    with pytest.raises(ValueError, match="slots must be >= 1"):
        decode_slots(target, [Request([3, 4])], DecodeSettings(max_new_tokens=2), {EOS}, slots=0)


@pytest.mark.parametrize("strategy", ["speculative", "tree", "speculative-heuristic"])
def test_draft_models_draft_for_all_live_sequences_in_one_pass(target, draft, strategy, monkeypatch):
    """A draft model runs one draft pass per draft position for every live sequence (draft_together), not one per
    sequence: chains, trees (one depth per pass) and heuristic lengths that differ across sequences; outputs stay
    each sequence's batch-1 output."""
    s = DecodeSettings(max_new_tokens=16, k=4, tree_budget=6)
    ps = ragged_prompts(6, seed=5)
    alone = [decode_models(strategy, target, p, s, {EOS}, draft_model=draft).tokens for p in ps]
    calls = []
    real = speculative.forward_passes

    def counting(model, passes, vocab=None):
        calls.append((model is draft, len(passes)))
        return real(model, passes, vocab)

    monkeypatch.setattr(speculative, "forward_passes", counting)
    traces = decode_slots(target, requests(strategy, ps, s, draft, {}), s, {EOS}, slots=3)
    assert [t.tokens for t in traces] == alone
    draft_calls = [n for is_draft, n in calls if is_draft]
    assert max(draft_calls) == 3  # three live sequences' draft rows in one draft pass
    assert sum(draft_calls) == sum(t.draft_passes for t in traces)  # every draft forward went through a shared pass
    assert len(draft_calls) < sum(t.draft_passes for t in traces)


@pytest.mark.parametrize("own", [True, False])
def test_a_prefill_can_hand_each_rows_top_k_instead_of_its_logits(own, monkeypatch):
    """Pass.topk: the rows' top-k from the final hidden states, the head in chunks (decoding.RowsTop): the same
    values, indices and last row as the full [rows, vocab] logits give, in our forward and in transformers'."""
    from specdec.model import decoding

    monkeypatch.setattr(decoding, "TOP_ROWS_CHUNK", 4)  # several chunks for a 11-row prompt
    model = prepare_model(tiny_target().to(DEVICE)) if own else tiny_target().to(DEVICE)
    assert (getattr(model, "_specdec_own_forward", None) is not None) == own
    prompt = prompts(1, length=11, seed=3)[0]
    (full, _), = decoding.forward_passes(model, [decoding.Pass(prompt, new_cache(model), len(prompt))])
    (top, _), = decoding.forward_passes(model, [decoding.Pass(prompt, new_cache(model), len(prompt), topk=5)])
    values, indices = decoding.top_k_rows(full.contiguous(), 5)
    assert isinstance(top, decoding.RowsTop) and top.values.shape == (len(prompt), 5)
    torch.testing.assert_close(top.values, values, rtol=0, atol=0)
    assert torch.equal(top.indices, indices) and torch.equal(top.last, full[-1:])
