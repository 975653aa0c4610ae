"""Train-free proposers (Token Recycling, suffix matching, REST): their structures on scripted histories, greedy
token identity with the baseline on tiny models, and the memory rule across generations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specdec.methods import datastore
from specdec.methods.datastore import DEFAULT_PROMPTS, load_context_free_rows, load_datastore
from specdec.model.decoding import DecodeSettings, Trace, baseline_decode, forward, new_cache
from specdec.methods.proposers import (DynamicTreeProposer, Proposal, RecyclingProposer, RestProposer, Shape, SuffixProposer,
                               SuffixRecyclingProposer)
from specdec.run.runner import decode_models, next_token_logits
from specdec.methods.trainfree import (SCORE_BINS, SCORE_PRIOR, SEPARATOR, Acceptance, ContextTable, Datastore,
                                       RecycledRows, build_trie, concatenate, continuations, frequency_chain,
                                       frequency_tree, match_ends, recycled_tree, recycling_template, remember,
                                       scored_tree)
from specdec.methods.tree import Tree, is_chain, merge
from tiny import EOS, VOCAB, context_free_memory, paths, prompts

MODEL_FREE_TREES = ("recycling", "suffix", "rest", "suffix-recycling", "dynamic-tree")


# --- structures -------------------------------------------------------------------------------------------------

def test_template_keeps_parents_first_and_respects_budget_and_depth():
    for budget, depth, topk in ((15, 8, 8), (15, 3, 8), (5, 5, 2), (40, 6, 8)):
        template = recycling_template(budget, depth, topk)
        assert len(template) == budget
        depths = []
        for i, (parent, rank) in enumerate(template):
            assert parent < i and 0 <= rank < topk
            depths.append(depths[parent] + 1 if parent >= 0 else 1)
        assert max(depths) <= depth
        assert len(set(template)) == budget  # no node twice
    # the best guess first, then its own best guess: a deep rank-0 chain
    assert recycling_template(15, 8, 8)[:3] == ((-1, 0), (0, 0), (1, 0))


def test_recycled_tree_follows_the_matrix_and_skips_unseen_rows():
    matrix = RecycledRows(10, 2)
    matrix.update(np.array([1, 5, 6]), np.array([[5, 7], [6, 8], [9, 3]]))
    template = ((-1, 0), (0, 0), (-1, 1), (1, 0), (0, 1), (2, 0))
    tree = recycled_tree(matrix, 1, template, depth=8)
    # 1 -> 5 (rank 0) -> 6 -> 9; 1 -> 7 (rank 1, row of 7 unseen: no children); 5 -> 8 (rank 1)
    assert paths(tree) == {(5,), (5, 6), (7,), (5, 6, 9), (5, 8)}
    assert paths(recycled_tree(matrix, 1, template, depth=2)) == {(5,), (5, 6), (7,), (5, 8)}
    assert paths(recycled_tree(matrix, 1, template, depth=8, stop_tokens={5})) == {(5,), (7,)}
    assert len(recycled_tree(matrix, 4, template, depth=8)) == 0  # unseen root


def test_recycling_matrix_learns_from_prompt_and_verify_logits():
    vocab, topk = 12, 3
    proposer = RecyclingProposer(DecodeSettings(recycle_topk=topk), {})
    logits = torch.zeros(3, vocab)
    logits[0, [4, 5, 6]] = torch.tensor([3.0, 2.0, 1.0])   # after token 7: 4, 5, 6
    logits[1, [8, 9, 10]] = torch.tensor([3.0, 2.0, 1.0])  # after token 4: 8, 9, 10
    logits[2, [1, 2, 3]] = torch.tensor([3.0, 2.0, 1.0])   # after token 8: 1, 2, 3
    proposer.start([7, 4, 8], None, logits)
    assert proposer.matrix[7].tolist() == [4, 5, 6] and proposer.matrix[4].tolist() == [8, 9, 10]
    assert (proposer.matrix[0] == -1).all()
    shape = Shape(depth=3, budget=4, width=8)
    tree = proposer.propose([7, 4, 8, 1], None, shape, Trace()).tree
    assert len(tree) == 0  # token 1 was never scored
    tree = proposer.propose([7, 4, 8, 7], None, shape, Trace()).tree
    assert (4, 8, 1) in paths(tree) and (5,) in paths(tree) and len(tree) == 4
    # a verify pass scores the root (7) and its nodes: their rows are overwritten, accepted or not
    verify = torch.zeros(len(tree) + 1, vocab)
    verify[:, 11] = 5.0
    proposer.seen = 4
    proposer.observe([7, 4, 8, 7, 11], type("P", (), {"tree": tree})(), verify)
    assert all(proposer.matrix[t][0] == 11 for t in [7] + tree.tokens)
    # a chain (width 1, llama.cpp's hook): the rank-0 path only, as deep as the matrix knows
    chain_ = proposer.propose([7, 4, 8, 7], None, Shape(depth=3, budget=3), Trace()).tree
    assert is_chain(chain_) and chain_.tokens == [11]  # 7 -> 11, and the row of 11 is unseen
    proposer.start([7, 4, 8], None, logits)
    assert proposer.propose([7, 4, 8, 7], None, Shape(depth=3, budget=3), Trace()).tree.tokens == [4, 8, 1]


def test_the_latest_row_of_a_token_wins_across_updates_and_generations():
    matrix = RecycledRows(10, 1, scored=True)
    tokens = np.array([3, 4, 3] * 500 + [4])  # many repeats in one update: the last row of each token wins
    matrix.update(tokens, np.arange(len(tokens), dtype=np.int32)[:, None],
                  np.arange(len(tokens), dtype=np.float32)[:, None])
    assert matrix[3, 0] == len(tokens) - 2 and matrix[4, 0] == len(tokens) - 1
    # the same rows won in the scores
    assert matrix.scored_row(3)[1][0] == len(tokens) - 2 and matrix.scored_row(4)[1][0] == len(tokens) - 1
    memory: dict = {}
    for prompt, said in (([1], 5), ([2], 6)):  # two other conversations both scored token 9: the later one wins
        proposer = RecyclingProposer(DecodeSettings(recycle_topk=1), memory)
        logits = torch.zeros(1, 10)
        logits[0, said] = 1.0
        proposer.start(prompt, None, torch.zeros(1, 10))
        proposer.observe(prompt + [9, 0], Proposal(Tree()), logits)  # the target scored the root 9: `said` next
    third = RecyclingProposer(DecodeSettings(recycle_topk=1), memory)
    third.start([7], None, torch.zeros(1, 10))
    assert third.matrix[9, 0] == 6


def test_match_ends_finds_the_longest_suffix_match():
    seq = np.array([1, 2, 3, 9, 2, 3, 4, 1, 2, 3])
    length, ends = match_ends(seq, seq, 8, before=len(seq) - 1)
    assert length == 3 and ends.tolist() == [2]
    assert continuations(seq, ends, 4) == [[9, 2, 3, 4]]
    length, ends = match_ends(seq, np.array([7, 2, 3]), 8)
    assert length == 2 and ends.tolist() == [2, 5, 9]
    assert match_ends(seq, np.array([5]), 8)[0] == 0
    assert match_ends(seq, seq, 2, before=len(seq) - 1)[0] == 2  # capped at max_match
    corpus = concatenate([np.array([4, 5, 6]), np.array([4, 5])])
    assert corpus.tolist() == [4, 5, 6, SEPARATOR, 4, 5, SEPARATOR]
    length, ends = match_ends(corpus, np.array([4]), 8)
    assert continuations(corpus, ends, 3) == [[5, 6], [5]]  # cut at the separator


def test_frequency_tree_keeps_the_most_frequent_nodes_and_their_parents():
    conts = [[1, 2, 3], [1, 2, 4], [1, 5], [6, 7], [1, 2, 3]]
    tree = frequency_tree(conts, budget=4)
    # counts: 1:4, 1-2:3, 1-2-3:2, then ties at 1 (first seen wins: 1-2-4)
    assert paths(tree) == {(1,), (1, 2), (1, 2, 3), (1, 2, 4)}
    assert paths(frequency_tree(conts, budget=2, stop_tokens={1})) == {(1,), (6,)}
    assert len(frequency_tree([], 5)) == 0


def test_frequency_tree_comes_best_first_so_each_prefix_is_a_smaller_budgets_tree():
    conts = [[1, 2, 3], [1, 2, 4], [1, 5], [6, 7], [1, 2, 3], [6, 8, 9], [1, 2, 3, 10]]
    full = frequency_tree(conts, budget=20)
    for budget in range(1, len(full) + 1):
        smaller = frequency_tree(conts, budget)
        assert smaller.tokens == full.tokens[:budget] and smaller.parents == full.parents[:budget]
        assert all(parent < node for node, parent in enumerate(smaller.parents))


def test_frequency_chain_follows_the_most_frequent_path():
    conts = [[1, 2, 3], [1, 2, 4], [1, 5], [6, 7], [1, 2, 3]]
    assert frequency_chain(conts, 3).tokens == [1, 2, 3] and is_chain(frequency_chain(conts, 3))
    assert frequency_chain(conts, 2).tokens == [1, 2]
    assert frequency_chain(conts, 3, stop_tokens={2}).tokens == [1, 2]  # nothing past an end of sequence
    # where the budget-cut trie branches (1 and 4 both kept), the chain takes the most frequent child each step
    branching = [[1, 2], [1, 3], [1, 2], [1, 3], [4], [4], [4]]
    assert paths(frequency_tree(branching, budget=2)) == {(1,), (4,)}
    assert frequency_chain(branching, 2).tokens == [1, 2]  # 2 and 3 tie: the first seen
    assert frequency_chain([], 4).tokens == [] and frequency_chain([[5, 6]], 0).tokens == []


def test_suffix_and_rest_propose_chains_for_width_one():
    s = DecodeSettings(k=4, max_new_tokens=20)
    prompt = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 4]
    suffix = SuffixProposer(s, {})
    suffix.start(prompt, None, None)
    tree = suffix.propose(prompt + [7, 1, 2], None, Shape(depth=4, budget=4), Trace()).tree
    # [1, 2] (not [7, 1, 2]) occurs three times, followed by 3 9 1 2, 3 8 1 2, 4 7 1 2: 3 twice, then 9 and 8
    # once each (the first seen wins)
    assert is_chain(tree) and tree.tokens == [3, 9, 1, 2]
    docs = [[5, 6, 7, 8], [5, 6, 7, 8, 1], [5, 6, 9], [5, 6, 7, 0]]
    rest = RestProposer(s, {"datastore": Datastore(concatenate([np.array(d) for d in docs]))})
    tree = rest.propose([3, 5, 6], None, Shape(depth=3, budget=3), Trace()).tree
    assert is_chain(tree) and tree.tokens == [7, 8, 1]  # 7 three times, then 8 twice, then 1


def test_datastore_retrieves_continuations_of_the_longest_match():
    docs = [np.array([1, 2, 3, 4, 5]), np.array([9, 2, 3, 7]), np.array([2, 3, 4, 6])]
    store = Datastore(concatenate(docs))
    assert sorted(store.occurrences([2, 3]).tolist()) == [1, 7, 11]
    assert store.occurrences([3, 8]).size == 0
    n, conts = store.retrieve([8, 2, 3, 4], depth=3, max_match=16)
    assert n == 3 and sorted(conts) == [[5], [6]]
    n, conts = store.retrieve([0, 3], depth=2, max_match=16)
    assert n == 1 and sorted(conts) == [[4, 5], [4, 6], [7]]
    assert store.retrieve([0], depth=2, max_match=16) == (0, [])


def test_remember_hides_the_same_conversation():
    memory: dict = {}
    assert remember(memory, "x", [1, 2], "a") == []
    assert remember(memory, "x", [3, 4], "b") == ["a"]
    assert remember(memory, "x", [1, 2], "a2") == ["b"]                  # a repeat sees only other prompts
    assert remember(memory, "x", [1, 2, 9, 9], "turn2") == ["b"]         # a follow-up turn: not its first turn
    assert remember(memory, "x", [3, 4], "b2") == ["a2", "turn2"]


def test_suffix_proposer_drafts_from_other_prompts_outputs_only():
    s = DecodeSettings(k=6, max_new_tokens=20)
    memory: dict = {}
    shape = Shape(depth=6, budget=6, width=4)
    first = SuffixProposer(s, memory)
    first.start([10, 11], None, None)
    first.propose([10, 11, 20, 21, 22, 23, 24], None, shape, Trace())  # its output so far: 20..24
    other = SuffixProposer(s, memory)
    other.start([30, 31], None, None)
    tree = other.propose([30, 31, 20, 21], None, shape, Trace()).tree
    # match [20, 21] (2 tokens): up to 2 x 2 = 4 tokens deep from the first prompt's output
    assert paths(tree) == {(22,), (22, 23), (22, 23, 24)}
    again = SuffixProposer(s, memory)
    again.start([10, 11], None, None)  # a repeat: its own earlier output (22 after 20, 21) is not visible
    assert len(again.propose([10, 11, 20, 21], None, shape, Trace()).tree) == 0


def test_merge_unites_trees_as_one_trie_within_the_budget():
    first = Tree([5, 6, 7], [-1, 0, 1], [1, 2, 3])                  # 5 6 7
    second = Tree([5, 8, 9, 6, 4], [-1, -1, 0, 0, 1], [1, 1, 2, 2, 2])  # 5 (9, 6), 8 (4)
    merged = merge([first, second], budget=10)
    assert paths(merged) == paths(first) | paths(second)
    assert len(merged) == 6  # 5, 6 and (5, 6) proposed twice, placed once: 5 6 7 8 9 4
    assert all(p < i for i, p in enumerate(merged.parents))  # parents first
    cut = merge([first, second], budget=4)
    assert paths(cut) == {(5,), (5, 6), (5, 6, 7), (8,)}      # the first tree whole, then the second's first new node
    assert merge([Tree(), second], budget=3).tokens == [5, 8, 9]
    assert len(merge([first, Tree()], budget=2)) == 2


def test_suffix_recycling_proposes_the_suffix_tree_then_fills_with_recycled_nodes():
    s = DecodeSettings(k=4, max_new_tokens=20, recycle_topk=2)
    vocab = 50
    shape = Shape(depth=4, budget=6, width=8)
    hybrid = SuffixRecyclingProposer(s, {})
    logits = torch.zeros(3, vocab)
    logits[0, [40, 41]] = torch.tensor([2.0, 1.0])  # after 10: 40 then 41
    logits[1, [42, 43]] = torch.tensor([2.0, 1.0])  # after 11: 42 then 43
    logits[2, [44, 45]] = torch.tensor([2.0, 1.0])  # after 12: 44 then 45
    hybrid.start([10, 11, 12], None, logits)
    history = [10, 11, 12, 20, 21, 22, 11, 12]      # the context ends in [11, 12], seen before: 20 21 22 follow
    trace = Trace()
    tree = hybrid.propose(history, None, shape, trace).tree
    suffix_paths = paths(hybrid.suffix.draft(history, shape))
    recycled = paths(hybrid.recycling.draft(history, shape))
    assert suffix_paths == {(20,), (20, 21), (20, 21, 22), (20, 21, 22, 11)}
    assert suffix_paths < paths(tree) and paths(tree) - suffix_paths <= recycled and len(tree) == 6
    assert trace.draft_units == len(tree)
    rows = torch.zeros(1 + len(tree), vocab)
    rows[:, 7] = 1.0
    committed = history + [20]
    root = committed[hybrid.recycling.seen - 1]
    hybrid.observe(committed, Proposal(tree), rows)  # recycling learns every row of the merged tree
    assert all(hybrid.recycling.matrix[t, 0] == 7 for t in [root] + tree.tokens)


# --- the dynamic tree ---------------------------------------------------------------------------------------------

def test_build_trie_counts_the_continuations_through_each_node():
    trie = build_trie([[1, 2, 3], [1, 2, 4], [1, 5], [6]], stop_tokens={5})
    assert trie.total == 4
    assert [(trie.tokens[i], trie.count[i]) for i in range(len(trie.tokens))] == [(1, 3), (2, 2), (3, 1), (4, 1),
                                                                                    (5, 1), (6, 1)]
    assert trie.children[0] == {1: 0, 6: 5} and trie.children[1 + 0] == {2: 1, 5: 4}
    assert build_trie([[5, 7]], stop_tokens={5}).tokens == [5]  # nothing past an end of sequence


def test_scored_tree_keeps_the_most_likely_paths_best_first():
    # a scripted candidate graph: token -> [(child, probability)]
    graph = {0: [(1, 0.9), (2, 0.3)], 1: [(3, 0.8), (4, 0.1)], 2: [(5, 0.9)], 3: [(6, 0.5)], 6: [(7, 0.9)]}

    def candidates(token, key):
        assert key == ("root" if token == 0 else token)  # each node's key is handed to its children's call
        return [(child, p, child, f"info{child}") for child, p in graph.get(token, [])]

    tree, infos, probs = scored_tree(candidates, 0, budget=5, depth=8, root_key="root")
    # path probabilities: 1 .9, 1-3 .72, 1-3-6 .36, 1-3-6-7 .324, 2 .3, 2-5 .27, 1-4 .09
    assert tree.tokens == [1, 3, 6, 7, 2] and tree.parents == [-1, 0, 1, 2, -1] and tree.depths == [1, 2, 3, 4, 1]
    assert infos == ["info1", "info3", "info6", "info7", "info2"]
    assert probs == pytest.approx([0.9, 0.72, 0.36, 0.324, 0.3])
    assert all(a >= b for a, b in zip(probs, probs[1:]))  # best first: every prefix is the best smaller tree
    assert scored_tree(candidates, 0, budget=5, depth=2, root_key="root")[0].tokens == [1, 3, 2, 5, 4]
    assert scored_tree(candidates, 0, budget=5, depth=8, stop_tokens={3}, root_key="root")[0].tokens == [1, 3, 2, 5, 4]
    chain_ = scored_tree(candidates, 0, budget=3, depth=3, chain_only=True, root_key="root")[0]
    assert is_chain(chain_) and chain_.tokens == [1, 3, 6]
    assert len(scored_tree(lambda token, key: [], 0, budget=5, depth=4)[0]) == 0


def test_acceptance_estimates_start_at_the_raw_score_and_follow_observations():
    acceptance = Acceptance(2)
    estimate = acceptance.estimator()
    assert estimate(0, 0.85) == pytest.approx(0.85) and estimate(1, 0.05) == pytest.approx(0.05)
    for _ in range(96):
        acceptance.record(0, 0.85, False)  # raw 0.85 was never accepted...
    for accepted in [True] * 30 + [False] * 70:
        acceptance.record(1, 0.81, accepted)  # ...the other source's 0.81 three times in ten
    estimate = acceptance.estimator()
    assert estimate(0, 0.85) == pytest.approx(SCORE_PRIOR * 0.85 / (96 + SCORE_PRIOR))
    assert estimate(1, 0.85) == pytest.approx((30 + SCORE_PRIOR * 0.85) / (100 + SCORE_PRIOR))
    assert estimate(0, 0.15) == pytest.approx(0.15)  # another bin: nothing seen there yet
    other = Acceptance(2)
    for _ in range(100):
        other.record(0, 0.85, True)
    both = acceptance.estimator(other)  # the job's other conversations' counts add to this generation's
    assert both(0, 0.85) == pytest.approx((100 + SCORE_PRIOR * 0.85) / (196 + SCORE_PRIOR))
    assert Acceptance.bin(1.0) == SCORE_BINS - 1 and Acceptance.bin(0.0) == 0


def test_context_table_keys_rows_by_the_tokens_before():
    table = ContextTable(vocab=50, topk=2, order=2)
    before = np.array([[-1, 7], [-1, 8], [-1, -1], [3, 7]])
    table.update(before, np.array([9, 9, 9, 9]), np.array([[1, 2], [3, 4], [5, 6], [10, 11]]),
                 np.array([[.6, .4], [.7, .3], [.5, .5], [.9, .1]], dtype=np.float32))
    assert table.row((0, 7), 9)[0] == [10, 11]  # (7, 9) twice: the later row wins; the token before 7 is ignored
    assert table.row((0, 8), 9) == ([3, 4], pytest.approx([.7, .3]))
    assert table.row((0, 6), 9) == ([], []) and table.row((0, -1), 9) == ([], [])  # unseen, no context
    triple = ContextTable(vocab=50, topk=2, order=3)
    triple.update(before, np.array([9, 9, 9, 9]), np.array([[1, 2], [3, 4], [5, 6], [10, 11]]),
                  np.zeros((4, 2), dtype=np.float32))
    assert triple.row((3, 7), 9)[0] == [10, 11] and triple.row((4, 7), 9) == ([], [])  # rows 0-2 lack a context
    full = ContextTable(vocab=50, topk=2, order=2, capacity=1, recent=0)  # room for one: the latest stays
    full.update(np.array([[-1, 1], [-1, 2]]), np.array([5, 5]), np.array([[1, 1], [2, 2]]),
                np.zeros((2, 2), dtype=np.float32))
    assert full.row((0, 2), 5)[0] == [2, 2] and full.row((0, 1), 5) == ([], [])


@pytest.mark.parametrize("recent", [0, 7, 4096])
def test_context_table_keeps_every_context_exactly(recent):
    """Against a dict of the latest row per context, over updates of every size (the dict of recent contexts,
    merges into the sorted arrays, both mixed): no context is lost to another (a hashed table lost those that met
    on a slot), a later row replaces an earlier one, and past capacity the oldest contexts go first."""
    rng = np.random.default_rng(0)
    vocab, topk = 1000, 3
    table, reference = ContextTable(vocab, topk, order=2, recent=recent), {}
    small = ContextTable(vocab, topk, order=2, capacity=50, recent=recent)
    learned = []  # every context in learning order, for the capacity check
    for n in [1, 3, 2000, 5, 1, 400, 9, 3000, 2]:
        before = rng.integers(-1, 40, size=(n, 2))  # few distinct contexts: many repeats, some without context
        tokens = rng.integers(0, 40, size=n)
        rows = rng.integers(0, vocab, size=(n, topk))
        probs = rng.random((n, topk)).astype(np.float32)
        table.update(before, tokens, rows, probs)
        small.update(before, tokens, rows, probs)
        for b, t, r, p in zip(before.tolist(), tokens.tolist(), rows.tolist(), probs.tolist()):
            if b[1] >= 0:
                reference[(b[1], t)] = (r, p)
                learned.append((b[1], t))
    assert len(reference) > 1000
    for (b, t), (r, p) in reference.items():
        assert table.row((0, b), t) == (r, pytest.approx(p))
    assert table.row((0, 41), 5) == ([], [])
    small.merge(np.zeros(0, np.int64), np.zeros((0, topk), np.int32), np.zeros((0, topk), np.float32))
    newest = list(dict.fromkeys(reversed(learned)))[:50]  # the 50 contexts learned last
    assert len(small.keys) == 50
    for b, t in newest:
        assert small.row((0, b), t) == (reference[(b, t)][0], pytest.approx(reference[(b, t)][1]))
    assert sum(small.row((0, b), t) != ([], []) for b, t in reference) == 50


def test_recycled_rows_are_stored_for_the_tokens_seen_only():
    rows = RecycledRows(vocab=49152, topk=8, scored=True)
    assert rows[123].tolist() == [-1] * 8 and rows.scored_row(123)[1].tolist() == [0.0] * 8
    rng = np.random.default_rng(1)
    for _ in range(50):  # 50 passes of 16 rows over a few hundred distinct tokens
        tokens = rng.integers(0, 300, size=16)
        rows.update(tokens, np.repeat(tokens[:, None], 8, axis=1).astype(np.int32),
                    np.ones((16, 8), np.float32))
    seen = rows.seen()
    assert 200 < seen <= 300
    assert all(rows[t, 0] in (-1, t) for t in range(300)) and sum(rows[t, 0] == t for t in range(300)) == seen
    held = rows.slot.nbytes + rows.rows.nbytes + rows.scores.nbytes
    assert held < 0.1 * (49152 * 8 * 8)  # the dense matrix and scores: 3 MiB


def scripted_dynamic_tree(memory=None) -> DynamicTreeProposer:
    """A dynamic tree proposer that has read a 3-token prompt: after 10 the target gave 40 then 41, after 11 42 43,
    after 12 44 45 (the second candidate with a quarter of the first's share)."""
    proposer = DynamicTreeProposer(DecodeSettings(k=4, max_new_tokens=20, recycle_topk=2), {} if memory is None else memory)
    logits = torch.full((3, 50), -30.0)
    for row, (a, b) in enumerate(((40, 41), (42, 43), (44, 45))):
        logits[row, [a, b]] = torch.tensor([math.log(4.0), 0.0])
    proposer.start([10, 11, 12], None, logits)
    return proposer


def test_dynamic_tree_scores_suffix_and_recycled_candidates_on_one_scale():
    proposer = scripted_dynamic_tree()
    history = [10, 11, 12, 20, 21, 22, 11, 12]  # the context ends in [11, 12], seen before: 20 21 22 11 follow
    trace = Trace()
    tree = proposer.propose(history, None, Shape(depth=4, budget=6, width=8), trace).tree
    # before any observation an estimate is its raw score: the suffix's continuation (share 1, a 2-token match
    # reaches 4 deep) first, then the root's recycled candidates 44 (.8) and 45 (.2), which the matrix and the pair
    # table (11, 12 was seen in the prompt) both propose
    assert tree.tokens == [20, 21, 22, 11, 44, 45] and tree.parents == [-1, 0, 1, 2, -1, -1]
    assert trace.draft_units == 6
    suffix_source = DynamicTreeProposer.CONTEXT_FREE + 2  # the class of 2-token matches
    assert [sorted(source for source, _ in info) for info in proposer.infos] == [[suffix_source]] * 4 + [[0, 1]] * 2
    assert scripted_dynamic_tree().propose(history, None, Shape(depth=4, budget=3, width=8), Trace()).tree.tokens \
        == [20, 21, 22]
    # the verify pass: the target takes 20 and 21, then says 30; the nodes whose parent it accepted are counted
    # (20, 21, 22 and the root's 44 and 45, each of those under both its sources), 11 (parent 22 rejected) is not
    rows = torch.zeros(1 + len(tree), 50)
    rows[0, 20] = rows[1, 21] = rows[2, 30] = rows[3:, 7] = 9.0
    proposer.observe(history + [20, 21, 30], Proposal(tree), rows)
    counts = proposer.acceptance
    assert counts.seen[suffix_source].sum() == 3 and counts.hits[suffix_source].sum() == 2
    assert counts.seen[0].sum() == counts.seen[1].sum() == 2 and counts.hits[:2].sum() == 0
    assert proposer.infos == []
    # the matrix and the pair table learned every row: after 20 the target gave 21, after (20, 21) 30
    assert proposer.recycling.matrix[20, 0] == 21 and proposer.recycling.contexts[0].row((0, 20), 21)[0][0] == 30
    # the next proposal reads the counts: a suffix continuation after a 2-token match is now an estimate below 1
    estimate = counts.estimator()
    assert estimate(suffix_source, 1.0) == pytest.approx((2 + SCORE_PRIOR) / (3 + SCORE_PRIOR))
    # a chain for width one: the best child at every depth
    chain_ = scripted_dynamic_tree().propose(history, None, Shape(depth=3, budget=3), Trace()).tree
    assert is_chain(chain_) and chain_.tokens == [20, 21, 22]


def test_dynamic_tree_learns_only_from_other_conversations():
    memory: dict = {}
    first = scripted_dynamic_tree(memory)
    tree = first.propose([10, 11, 12, 7], None, Shape(depth=2, budget=4, width=8), Trace()).tree
    assert len(tree) == 0  # 7 was never scored, never seen: nothing to propose
    rows = torch.zeros(1, 50)
    rows[0, 33] = 9.0
    first.observe([10, 11, 12, 7, 33], Proposal(tree), rows)  # the target said 33 after 7
    other = DynamicTreeProposer(DecodeSettings(k=4, max_new_tokens=20, recycle_topk=2), memory)
    other.start([5, 6], None, torch.zeros(2, 50))  # another conversation drafts from what the first learned
    assert other.propose([5, 6, 7], None, Shape(depth=1, budget=4, width=8), Trace()).tree.tokens[0] == 33
    assert other.others.seen.sum() == 0  # the first verified nothing: no acceptance counts to share
    again = scripted_dynamic_tree(memory)  # the same prompt again (a repeat): its own rows are not visible
    assert len(again.propose([10, 11, 12, 7], None, Shape(depth=2, budget=4, width=8), Trace()).tree) == 0


def test_dynamic_tree_drafts_a_token_never_scored_from_its_context_free_row():
    rows = np.tile(np.array([[47, 46]], dtype=np.int32), (50, 1))
    rows[7] = [33, 34]
    scores = np.tile(np.array([[.75, .25]], dtype=np.float32), (50, 1))
    proposer = scripted_dynamic_tree({"context_free": (rows, scores)})
    tree = proposer.propose([10, 11, 12, 7], None, Shape(depth=2, budget=4, width=8), Trace()).tree
    # 7 has no matrix row: its context-free candidates (a share of .75 and .25), then theirs (33, 34 were never
    # scored either)
    assert tree.tokens[:2] == [33, 47] and tree.parents[:2] == [-1, 0]
    assert set(tree.tokens) <= {33, 34, 46, 47}
    assert {source for info in proposer.infos for source, _ in info} == {DynamicTreeProposer.CONTEXT_FREE}
    # a token the target has scored keeps its matrix row: after 12 the prompt's logits said 44, 45
    scored = proposer.propose([10, 11, 12], None, Shape(depth=1, budget=4, width=8), Trace()).tree
    assert sorted(scored.tokens) == [44, 45]
    # the verify pass counts the context-free candidates under their own source
    rows_ = torch.zeros(1 + len(tree), 50)
    rows_[0, 33] = 9.0
    proposer.propose([10, 11, 12, 7], None, Shape(depth=2, budget=4, width=8), Trace())
    proposer.observe([10, 11, 12, 7, 33, 5], Proposal(tree), rows_)
    assert proposer.acceptance.hits[DynamicTreeProposer.CONTEXT_FREE].sum() == 1
    assert proposer.acceptance.seen[DynamicTreeProposer.CONTEXT_FREE].sum() >= 2
    assert proposer.recycling.matrix[7, 0] == 33  # and 7 now has a row of its own


def test_context_free_rows_are_the_targets_top_tokens_after_each_token_alone(target, tmp_path, monkeypatch):
    monkeypatch.setattr(datastore, "CONTEXT_FREE_CHUNK", 20)  # three chunks for the tiny vocabulary
    calls = []

    def score(tokens):
        calls.append(len(tokens))
        return next_token_logits(target, [1, 5], tokens)

    rows, scores = load_context_free_rows("tiny", [1, 5], VOCAB, 4, score, root=tmp_path, log=lambda *a: None)
    assert calls == [20, 20, 8] and rows.shape == scores.shape == (VOCAB, 4)
    for token in (0, 3, 19, 20, 47):  # as one plain forward of [1, 5, token] says
        logits, _ = forward(target, [1, 5, token], new_cache(target, 4))
        assert rows[token].tolist() == torch.topk(logits[0], 4).indices.tolist()
    assert np.allclose(scores.sum(axis=1), 1) and (np.diff(scores, axis=1) <= 0).all()
    again = load_context_free_rows("tiny", [1, 5], VOCAB, 4, None, root=tmp_path)  # cached: no scoring
    assert (again[0] == rows).all() and (again[1] == scores).all()
    assert len(list(tmp_path.glob("tiny-context-free-*.npz"))) == 1
    load_context_free_rows("tiny", [1], VOCAB, 4, score, root=tmp_path, log=lambda *a: None)  # another prefix
    assert len(list(tmp_path.glob("tiny-context-free-*.npz"))) == 2


# --- engine: greedy identity --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def datastore_memory(target):
    """REST's datastore for the tiny target: its own greedy outputs on a few other prompts."""
    s = DecodeSettings(max_new_tokens=40)
    outputs = [np.array(baseline_decode(target, p, s, {EOS}).tokens) for p in prompts(6, seed=11)]
    return {"datastore": Datastore(concatenate(outputs))}


def strategy_memory(strategy, target, datastore_memory) -> dict:
    """What runner.prepare gives a strategy before its first generation: REST's datastore, the dynamic tree's
    context-free rows."""
    return {"rest": datastore_memory, "dynamic-tree": context_free_memory(target)}.get(strategy, {})


@pytest.mark.parametrize("strategy", MODEL_FREE_TREES)
def test_greedy_train_free_trees_match_baseline(target, datastore_memory, strategy):
    memory = strategy_memory(strategy, target, datastore_memory)
    accepted = proposed = 0
    for p in prompts(6, seed=3):
        base = baseline_decode(target, p, DecodeSettings(max_new_tokens=30), {EOS}).tokens
        for k, budget in ((1, None), (3, 5), (6, 15)):
            s = DecodeSettings(max_new_tokens=30, k=k, tree_budget=budget)
            trace = decode_models(strategy, target, p, s, {EOS}, memory=memory)
            assert trace.tokens == base, f"{strategy} k={k} budget={budget} prompt={p}"
            assert trace.target_passes == 1 + trace.steps
            assert len(trace.proposed_per_position) == k
            accepted += trace.accepted_per_position[0]
            proposed += trace.proposed_per_position[0]
    assert proposed > accepted > 20  # drafts were made, some accepted, some rejected


@pytest.mark.parametrize("strategy", MODEL_FREE_TREES)
def test_train_free_trees_stop_exactly_at_eos_and_max_tokens(target, datastore_memory, strategy):
    memory = strategy_memory(strategy, target, datastore_memory)
    for p in prompts(3, seed=5):
        free = baseline_decode(target, p, DecodeSettings(max_new_tokens=30, stop_at_eos=False), set()).tokens
        eos = {free[7]}
        s = DecodeSettings(max_new_tokens=30, k=6, tree_budget=10)
        assert decode_models(strategy, target, p, s, eos, memory=memory).tokens == free[:free.index(free[7]) + 1]
        for n in (1, 2, 5):
            s = DecodeSettings(max_new_tokens=n, k=6, tree_budget=10, stop_at_eos=False)
            assert decode_models(strategy, target, p, s, set(), memory=memory).tokens == free[:n]


def test_default_datastore_is_built_once_and_cached(tmp_path):
    asked = []

    def answer(prompt):
        asked.append(prompt)
        return [len(asked), 1000, 1001]

    first = load_datastore("tiny", None, None, answer, root=tmp_path, log=lambda *a: None)
    assert len(asked) == DEFAULT_PROMPTS and len(list(tmp_path.glob("tiny-*.npy"))) == 1
    again = load_datastore("tiny", None, None, answer, root=tmp_path, log=lambda *a: None)
    assert len(asked) == DEFAULT_PROMPTS  # read from disk, not generated again
    assert again.tokens.tolist() == first.tokens.tolist()
    assert again.retrieve([1000], 2, 4)[1] == [[1001]] * DEFAULT_PROMPTS


def test_corpus_file_is_tokenised_and_bad_files_are_named(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "abc"}\n{"text": "abd"}\n')
    store = load_datastore("tiny", str(corpus), lambda text: [ord(c) for c in text], None)
    assert sorted(store.retrieve([ord("b")], 1, 4)[1]) == [[ord("c")], [ord("d")]]
    corpus.write_text('{"words": "abc"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:1: each line must be a JSON object with a \"text\""):
        load_datastore("tiny", str(corpus), list, None)
    with pytest.raises(ValueError, match="rest corpus '.*missing.txt' does not exist"):
        load_datastore("tiny", str(tmp_path / "missing.txt"), list, None)
