"""Lookahead decoding: the Jacobi window and n-gram pool on scripted histories, the verify pass with extra
(unverified) rows against plain forwards, and greedy token identity with the baseline on tiny models."""

from __future__ import annotations

import pytest
import torch

from specdec.model.decoding import DecodeSettings, Trace, baseline_decode, forward, new_cache
from specdec.methods.proposers import LookaheadProposer, Proposal, Shape
from specdec.run.runner import SettingsError, check_settings, decode_models
from specdec.strategies import STRATEGIES
from specdec.methods.trainfree import add_ngram, advance_window, window_rows
from specdec.methods.tree import ExtraRows, Tree, forward_tree, keep_path, pass_mask
from tiny import EOS, paths, prompts


# --- the window and the pool ------------------------------------------------------------------------------------

def test_window_rows_follow_the_lookahead_mask():
    root = 10
    levels = [[11, 12], [20, 21, 22], [30, 31, 32]]  # level 0 = root, 11, 12; two upper levels of 3 columns
    tokens, depths, attend = window_rows(levels)
    assert tokens == [11, 12, 20, 21, 22, 30, 31, 32]
    assert depths == [1, 2, 1, 2, 3, 2, 3, 4]  # level l, column j: j + l positions after the root
    assert attend.shape == (8, 9) and attend[:, 0].all()
    pass_tokens = [root] + tokens

    def seen(token):
        row = attend[tokens.index(token)]
        return [pass_tokens[c] for c in range(9) if row[c]]

    assert seen(12) == [10, 11, 12]            # level 0 is causal
    assert seen(20) == [10, 20]                # level 1, column 0: the root, then itself
    assert seen(31) == [10, 11, 21, 31]        # level 2, column 1: level 0 up to column 1, then the column's levels
    assert seen(32) == [10, 11, 12, 22, 32]
    # every row sees exactly one token at each position from the root to its own: a consistent sequence
    all_depths = [0] + depths
    for r, depth in enumerate(depths):
        visible = sorted(all_depths[c] for c in range(9) if attend[r, c])
        assert visible == list(range(depth + 1))
    with pytest.raises(ValueError, match="every upper window level needs 3 tokens"):
        window_rows([[11, 12], [20, 21]])


def test_window_fills_in_n_minus_2_passes_then_yields_one_ngram_per_column():
    n = 4  # W = 2: the window starts with W + N - 3 = 3 first-level tokens
    levels = [[1, 2, 3]]
    # pass 1 (no upper level yet): preds = the argmax at the root, 1, 2, 3
    levels, grams = advance_window(100, levels, [101, 41, 42, 43], n)
    assert grams == [] and levels == [[2, 3], [41, 42, 43]]
    # pass 2: root 200; preds at the root, level 0 (2, 3) and level 1 (41, 42, 43)
    levels, grams = advance_window(200, levels, [201, 0, 0, 51, 52, 53], n)
    assert grams == [] and levels == [[3], [42, 43], [52, 53]]  # full: W = 2 columns, N - 1 = 3 levels
    # pass 3: root 300; top level (52, 53) predicts 61, 62: column j's 4-gram is (level 0, 1, 2 at j, prediction)
    levels, grams = advance_window(300, levels, [301, 0, 0, 0, 61, 62], n)
    assert grams == [(300, (42, 52, 61)), (3, (43, 53, 62))]
    assert levels == [[43], [52, 53], [61, 62]]  # one level down: level 0 = level 1 from column 1
    tokens, depths, _ = window_rows(levels)
    assert len(tokens) == 2 * (n - 1) - 1  # W(N - 1) - 1 rows once full
    with pytest.raises(ValueError, match="6 predictions"):
        advance_window(400, levels, [0] * 5, n)


def test_pool_keeps_the_latest_g_ngrams_per_first_token():
    pool: dict = {}
    for gram in [(1, 2), (3, 4), (1, 2), (5, 6), (7, 8)]:
        add_ngram(pool, 9, gram, capacity=3)
    assert pool[9] == [(1, 2), (5, 6), (7, 8)]  # (1, 2) seen again moved to the end, (3, 4) the oldest dropped
    add_ngram(pool, 4, (1, 1), capacity=3)
    assert pool[4] == [(1, 1)] and len(pool[9]) == 3


def test_proposer_guesses_the_pooled_ngrams_of_the_last_token_as_a_trie():
    s = DecodeSettings(lookahead_window=3, lookahead_ngram=4, lookahead_guesses=3)
    proposer = LookaheadProposer(s)
    proposer.start([5, 6, 7, 8], None, None)
    assert len(proposer.levels[0]) == 3 + 4 - 3 and set(proposer.levels[0]) <= {5, 6, 7, 8}
    proposer.pool = {9: [(1, 2, 3), (1, 2, 4), (6, 7, 8)], 1: [(2, 2, 2)]}
    proposal = proposer.propose([5, 6, 9], None, Shape(depth=8, budget=15, width=4), Trace())
    assert paths(proposal.tree) == {(1,), (1, 2), (1, 2, 3), (1, 2, 4), (6,), (6, 7), (6, 7, 8)}
    assert len(proposal.extra) == len(proposer.levels[0])  # still filling: level 0 only
    cut = proposer.propose([5, 6, 9], None, Shape(depth=2, budget=3, width=4), Trace()).tree
    assert paths(cut) == {(1,), (1, 2), (6,)}  # two levels deep, the 3 most frequent nodes (ties: most recent)
    assert len(proposer.propose([5, 6, 7], None, Shape(depth=8, budget=15, width=4), Trace()).tree) == 0


# --- the verify pass with extra rows ----------------------------------------------------------------------------

def prefilled(model, ids):
    cache = new_cache(model)
    forward(model, ids, cache)
    return cache


def test_pass_mask_keeps_tree_and_window_apart():
    extra = ExtraRows([7, 8], [1, 2], torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    mask = pass_mask([-1, 0], extra)  # rows: root, a, b (a's child), then the two window rows
    assert [row.nonzero().flatten().tolist() for row in mask] == [[0], [0, 1], [0, 1, 2], [0, 3], [0, 3, 4]]


def test_verify_pass_with_window_rows_matches_plain_forwards_and_drops_them(target):
    prompt = prompts(1, seed=6)[0]
    root, cached = prompt[-1], prompt[:-1]
    tree = Tree([5, 6, 7, 8], [-1, 0, -1, 2], [1, 2, 1, 2])
    levels = [[11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]
    tokens, depths, attend = window_rows(levels)
    extra = ExtraRows(tokens, depths, torch.from_numpy(attend))
    cache = prefilled(target, cached)
    logits, _ = forward_tree(target, root, tree, cache, extra=extra)
    assert logits.shape[0] == 1 + len(tree) + len(tokens)
    for node, path in enumerate([[5], [5, 6], [7], [7, 8]]):  # tree rows: as if the window were not there
        reference = forward(target, [root] + path, prefilled(target, cached))[0][0]
        torch.testing.assert_close(logits[node + 1], reference, rtol=0, atol=1e-9)
    pass_tokens = [root] + tokens
    for r in range(len(tokens)):  # window rows: a plain forward over what each row sees, in position order
        seen = [pass_tokens[c] for c in range(1 + len(tokens)) if attend[r, c]]
        reference = forward(target, seen, prefilled(target, cached))[0][0]
        torch.testing.assert_close(logits[1 + len(tree) + r], reference, rtol=0, atol=1e-9)
    keep_path(cache, len(cached), [2, 3])  # accept 7, 8: the rest of the tree and the window are dropped
    assert cache.get_seq_length() == len(cached) + 3
    nxt = [9, 10]
    torch.testing.assert_close(forward(target, nxt, cache, 2)[0],
                               forward(target, nxt, prefilled(target, cached + [root, 7, 8]), 2)[0], rtol=0, atol=1e-9)


# --- engine: greedy identity ------------------------------------------------------------------------------------

SETTINGS = [  # (W, N, G, k, tree budget)
    (5, 3, 3, 4, None), (5, 3, 3, 8, 15), (3, 4, 2, 6, 10), (2, 5, 4, 3, 6), (1, 3, 1, 1, None), (4, 3, 5, 2, 3)]


def test_greedy_lookahead_matches_baseline(target):
    accepted = proposed = 0
    for p in prompts(6, seed=13):
        base = baseline_decode(target, p, DecodeSettings(max_new_tokens=32), {EOS}).tokens
        for w, n, g, k, budget in SETTINGS:
            s = DecodeSettings(max_new_tokens=32, k=k, tree_budget=budget, lookahead_window=w, lookahead_ngram=n,
                               lookahead_guesses=g)
            trace = decode_models("lookahead", target, p, s, {EOS})
            assert trace.tokens == base, f"W={w} N={n} G={g} k={k} budget={budget} prompt={p}"
            assert trace.target_passes == 1 + trace.steps
            assert len(trace.proposed_per_position) == k
            assert not any(trace.proposed_per_position[n - 1:])  # guesses are N - 1 deep at most
            accepted += trace.accepted_per_position[0]
            proposed += trace.proposed_per_position[0]
    assert proposed > accepted > 100  # guesses were verified, some accepted, some rejected


def test_lookahead_stops_exactly_at_eos_and_max_tokens(target):
    for p in prompts(3, seed=5):
        free = baseline_decode(target, p, DecodeSettings(max_new_tokens=30, stop_at_eos=False), set()).tokens
        eos = {free[9]}
        s = DecodeSettings(max_new_tokens=30, k=4, tree_budget=6)
        assert decode_models("lookahead", target, p, s, eos).tokens == free[:free.index(free[9]) + 1]
        for n in (1, 2, 5):
            s = DecodeSettings(max_new_tokens=n, k=4, stop_at_eos=False)
            assert decode_models("lookahead", target, p, s, set()).tokens == free[:n]


def test_lookahead_is_registered_and_bad_settings_are_named():
    st = STRATEGIES["lookahead"]
    assert st.proposer == "lookahead" and st.tree and not st.needs_draft
    check_settings("lookahead", None, DecodeSettings(k=8, tree_budget=15))
    for key, bad in (("lookahead_window", 0), ("lookahead_ngram", 2), ("lookahead_guesses", 0)):
        with pytest.raises(SettingsError, match=f"{key} must be an integer >= "):
            check_settings("lookahead", None, DecodeSettings(**{key: bad}))


def test_observe_without_a_window_changes_nothing():
    """The loop's last step may verify without a proposal (no room to draft): the window stays as it was."""
    proposer = LookaheadProposer(DecodeSettings())
    proposer.start([5, 6, 7], None, None)
    before = [list(level) for level in proposer.levels]
    proposer.observe([5, 6, 7, 8], Proposal(Tree()), torch.zeros(1, 48))
    assert proposer.levels == before and proposer.pool == {}
