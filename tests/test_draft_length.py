"""The cost-aware draft length (proposers.DraftLength 'cost'): what one pass tells it about smaller budgets, the
budget it then chooses against the target's pass times (budget 0, with drafts scored in the shadow, among them),
when it keeps the full budget, and that it stays lossless; prompt lookup's n-gram index against a scan."""

from __future__ import annotations

import random

import pytest

from specdec.methods.proposers import COST_EXPLORE_EVERY, COST_PRIOR_PASSES, DraftLength, NgramProposer
from specdec.methods.speculative import Request, decode_slots
from specdec.methods.tree import Tree, chain, first_nodes, follow
from specdec.model import decoding
from specdec.model.decoding import DecodeSettings, baseline_decode
from specdec.run.runner import decode_models, drafting
from tiny import EOS, prompts, tiny_target


def policy(k: int = 8, width: int = 1, budget: int | None = None) -> DraftLength:
    return DraftLength(DecodeSettings(k=k, tree_budget=budget), "cost", width)


def step(length: DraftLength, path: list[int], nodes: int, room: int = 100, overhead_s: float = 0.0) -> int:
    """One pass as the loop runs it: the shape, then what the target accepted. Returns the shape's budget."""
    budget = length.shape(room).budget
    length.observe(len(path), nodes, path=path, overhead_s=overhead_s)
    return budget


def test_one_pass_answers_for_every_smaller_budget():
    length = policy()
    assert step(length, [0, 1, 2], nodes=8) == 8  # no pass times bound: the full budget
    assert length.answered == [0] + [1] * 8
    assert length.yielded == [0, 2, 3, 4, 4, 4, 4, 4, 4]  # 1 + the accepted drafts among the first b
    length.bind([1.0 + 0.1 * r for r in range(9)])
    assert step(length, [0], nodes=2) == 3  # rows cost a tenth of a pass each: the fewest drafts that yielded most
    # a proposal smaller than allowed answers for no larger budget: short proposals are the unpromising ones
    assert length.answered == [0] + [2] * 3 + [1] * 5 and length.yielded[:5] == [0, 4, 5, 6, 4]


def test_a_pass_cut_short_by_the_room_left_answers_only_for_what_it_could_hold():
    length = policy()
    assert step(length, [0, 1], nodes=2, room=2) == 2
    assert length.answered == [0, 1, 1, 0, 0, 0, 0, 0, 0]
    tree = policy(k=6, width=4, budget=10)
    assert tree.shape(room=3).depth == 3
    tree.observe(1, 3, path=[0])  # a shallower tree orders its nodes otherwise: no budget answered
    assert tree.answered == [0] * 11


def test_trees_read_node_order_and_keep_their_depth():
    length = policy(k=6, width=4, budget=10)
    shape = length.shape(room=100)
    assert (shape.depth, shape.budget) == (6, 10)
    length.observe(2, 3, path=[1, 4])  # node 1, then node 4: a budget of 4 keeps only the first
    assert length.yielded[1:] == [1, 2, 2, 2, 3, 3, 3, 3, 3, 3]


def test_the_budget_weighs_expected_tokens_against_pass_times():
    length = policy()
    for _ in range(6):  # the first draft accepted half the time, deeper ones never
        step(length, [0], nodes=8)
        step(length, [], nodes=8)
    length.bind([1.0 + 0.1 * r for r in range(9)])
    length.passes = 1
    assert length.shape(room=100).depth == 1  # deeper drafts were never accepted: one yields as much, cheaper
    length.bind([1.0] * 9)
    assert length.shape(room=100).depth == 8  # rows cost nothing: the prior's hope in deeper drafts is free
    length.bind([1.0 + r for r in range(9)])
    assert length.shape(room=100).depth == 1
    length = policy()
    for _ in range(6):
        step(length, list(range(8)), nodes=8)  # everything accepted
    length.bind([1.0] * 9)
    length.passes = 1
    assert length.shape(room=100).depth == 8
    length.bind([1.0 + 100 * r for r in range(9)])  # every row costs 100 plain steps: the fewest rows
    assert length.shape(room=100).depth == 8  # ... except right after a pass that accepted everything
    length.streak = False
    assert length.shape(room=100).depth == 1
    length.passes = COST_EXPLORE_EVERY  # every few passes the full budget, so its estimate stays current
    assert length.shape(room=100).depth == 8


def test_overhead_every_budget_pays_favours_larger_budgets():
    length = policy(k=2)
    for _ in range(4):
        step(length, [0], nodes=2)
        step(length, [0, 1], nodes=2)
    length.bind([1.0, 1.0, 1.6])  # 2 and 2.5 tokens per pass for budgets 1 and 2
    length.passes, length.streak = 1, False
    assert length.shape(room=100).depth == 1  # 2 / 1.0 > 2.5 / 1.6
    length.observe(2, 2, path=[0, 1], overhead_s=2.0)
    length.passes = 1
    assert length.shape(room=100).depth == 2  # 2 / 3.0 < 2.5 / 3.6: with 2 s a pass, rows weigh less


def test_one_early_miss_does_not_settle_the_budget_the_prior_fades_as_passes_answer():
    length = policy()
    length.bind([1.0 + 0.02 * r for r in range(9)], shadows=True)  # float32-like: a row costs 2 % of a pass
    verified = []
    for start in range(40):  # passes whose whole proposal misses at its first draft
        length.shape(room=100)
        verified.append(length.verify)
        length.watch(chain(list(range(1, 9))), start=start)
        length.observe(0, length.verify, path=[])
        length.settle([0] * (start + 1))
    assert length.answered == [0] + [40] * 8 and length.yielded == [0] + [40] * 8
    misses = verified.index(0)
    assert verified[:misses] == [8] * misses and set(verified[misses:]) == {0}
    assert misses > 1  # one miss does not settle it: deeper drafts are still worth a try
    # until budget 8's 1 + 8 * prior / (misses + prior) tokens a pass no longer pay for its 16 % dearer pass
    prior = COST_PRIOR_PASSES
    assert 8 * prior / (misses + prior) <= 0.16 < 8 * prior / (misses - 1 + prior)


def test_pass_costs_never_fall_with_more_rows():
    assert decoding.monotone_costs([3.0, 1.0, 2.0, 5.0, 4.0]) == [2.0, 2.0, 2.0, 4.5, 4.5]  # violators pooled
    assert decoding.monotone_costs([1.0, 1.5, 1.5, 2.0]) == [1.0, 1.5, 1.5, 2.0]
    rng = random.Random(0)
    for _ in range(50):
        noisy = [1.0 + 0.05 * r + rng.uniform(-0.2, 0.2) for r in range(9)]
        fitted = decoding.monotone_costs(noisy)
        assert all(a <= b for a, b in zip(fitted, fitted[1:]))
        assert sum(fitted) == pytest.approx(sum(noisy))  # least squares keeps each pooled run's mean


def test_pass_costs_are_measured_once_per_model_and_row_count(monkeypatch):
    target = tiny_target()
    costs = decoding.pass_costs(target, 5)
    assert len(costs) == 5 and all(c > 0 for c in costs)
    monkeypatch.setattr(decoding, "forward", lambda *a, **kw: pytest.fail("measured twice"))
    assert decoding.pass_costs(target, 5) is costs


@pytest.mark.parametrize("strategy", ["ngram", "suffix", "dynamic-tree"])
def test_cost_policy_methods_stay_lossless_and_bind_pass_times_alone_only(strategy):
    target = tiny_target()
    s = DecodeSettings(max_new_tokens=24, k=6)
    ps = prompts(3, seed=4)
    for p in ps:
        assert decode_models(strategy, target, p, s, {EOS}).tokens == baseline_decode(target, p, s, {EOS}).tokens
    bound, verified = [], []
    real_bind, real_watch = DraftLength.bind, DraftLength.watch

    def spy(self, costs, shadows=False):
        bound.append((len(costs), shadows))
        real_bind(self, costs, shadows)

    def watch(self, tree, start):
        verified.append(self.verify)  # how many of the watched proposal this pass verifies
        real_watch(self, tree, start)

    try:
        DraftLength.bind, DraftLength.watch = spy, watch
        requests = [Request(p, *drafting(strategy, s, {EOS})) for p in ps]
        assert all(r.length.policy == "cost" for r in requests)
        batched = decode_slots(target, requests, s, {EOS}, slots=2)
        assert bound == [] and verified == []  # a batch's passes share rows: full budgets, no pass times
        alone = [decode_slots(target, [Request(p, *drafting(strategy, s, {EOS}))], s, {EOS}, slots=1)[0]
                 for p in ps]
        assert bound == [(7, True)] * 3  # k 6 (or its budget) + the root; model-free drafts: shadows
    finally:
        DraftLength.bind, DraftLength.watch = real_bind, real_watch
    assert 0 in verified  # the random target accepts little: some passes verified no draft
    assert [t.tokens for t in batched] == [baseline_decode(target, p, s, {EOS}).tokens for p in ps]
    assert [t.tokens for t in alone] == [t.tokens for t in batched]


def test_a_pass_that_accepted_every_draft_is_followed_by_the_full_budget():
    length = policy()
    for _ in range(4):
        step(length, [], nodes=8)  # nothing accepted: one draft is as good as eight
    length.bind([1.0 + r for r in range(9)])
    length.passes = 1
    assert step(length, [0], nodes=1) == 1  # its only draft accepted: copying has begun
    assert length.shape(room=100).budget == 8
    length.observe(2, 8, path=[0, 1])  # the copy broke off after two
    assert length.shape(room=100).budget == 1


def test_with_shadows_every_pass_drafts_in_full_verifies_the_chosen_prefix_and_answers_for_every_budget():
    length = policy(k=4)
    for _ in range(4):
        step(length, [], nodes=4)  # nothing accepted
    length.bind([1.0, 1.5, 2.0, 2.5, 3.0])
    length.passes = 1
    assert length.shape(room=100).depth == 1 and length.verify is None  # without shadows: the fewest drafts
    length.bind([1.0, 1.5, 2.0, 2.5, 3.0], shadows=True)
    shape = length.shape(room=100)
    assert shape.depth == 4 and length.verify == 0  # drafts 4, verifies none: the last token alone
    length.watch(chain([7, 8, 9, 10]), start=20)
    length.observe(0, 0, path=[])
    assert length.answered == [0, 4, 4, 4, 4]  # the verified part answers for nothing itself
    committed = [0] * 20 + [7, 8]
    length.settle(committed)
    assert length.pending  # 7, 8 followed so far: the third draft's fate is still open
    length.settle(committed + [9, 3])
    assert not length.pending
    assert length.answered == [0, 5, 5, 5, 5] and length.yielded == [0, 6, 7, 8, 8]  # as verifying it would have
    length.watch(chain([1, 2, 3, 4]), start=100)
    length.settle([0] * 100 + [1, 2, 3, 4])  # accepted whole: copying has begun, the next pass verifies in full
    assert length.shape(room=100).depth == 4 and length.verify == 4
    length.observe(4, 4, path=[0, 1, 2, 3])
    assert length.answered == [0, 6, 6, 6, 6]  # verified passes, too, answer only through settle
    for start in range(4):  # the text turns predictable: drafts accepted whole
        length.watch(chain([1, 2, 3, 4]), start=100 * start)
        length.settle([0] * 100 * start + [1, 2, 3, 4])
    length.passes, length.streak = COST_EXPLORE_EVERY, False
    assert length.shape(room=100).depth == 4 and length.verify == 3  # no exploration pass: 2.8 tokens / 2.5 s
    tree = policy(k=3, width=4, budget=6)
    tree.bind([1.0] * 7, shadows=True)
    assert (tree.shape(room=100).budget, tree.verify) == (6, 6)  # the first pass: all of it
    assert tree.shape(room=2).depth == 2 and tree.answers == 0  # cut short by the room: watched for nothing
    tree.watch(Tree([1, 2], [-1, 0], [1, 2]), start=0)
    assert not tree.pending


def test_first_nodes_of_a_best_first_tree_are_a_tree():
    tree = Tree([5, 6, 7, 8], [-1, -1, 0, 2], [1, 1, 2, 3])
    assert first_nodes(tree, 3) == Tree([5, 6, 7], [-1, -1, 0], [1, 1, 2])
    assert first_nodes(tree, 0) == Tree() and first_nodes(tree, 9) is tree


def test_follow_walks_the_tree_along_the_tokens_and_says_when_the_path_is_decided():
    tree = Tree([5, 6, 7, 8, 6], [-1, 0, 0, 1, -1], [1, 2, 2, 3, 1])  # 5 -> (6 -> 8, 7); 6
    assert follow(tree, [5, 6, 8]) == ([0, 1, 3], True)  # a leaf
    assert follow(tree, [5, 7, 1]) == ([0, 2], True)
    assert follow(tree, [5, 9]) == ([0], True)  # no child holds 9
    assert follow(tree, [5, 6]) == ([0, 1], False)  # 8 may come next
    assert follow(tree, [6]) == ([4], True)
    assert follow(tree, []) == ([], False)
    assert follow(Tree(), [1]) == ([], True) and follow(Tree(), []) == ([], True)


def scan_ngram(seq: list[int], k: int, n_max: int, n_min: int, stop_tokens=()) -> list[int]:
    """Prompt lookup by scanning: the k tokens after the latest earlier occurrence of the last n tokens."""
    for n in range(min(n_max, len(seq) - 1), n_min - 1, -1):
        starts = [i for i in range(len(seq) - n) if seq[i:i + n] == seq[len(seq) - n:]]
        if starts:
            drafts = seq[starts[-1] + n:starts[-1] + n + k]
            stop = next((i for i, t in enumerate(drafts) if t in stop_tokens), None)
            return drafts if stop is None else drafts[:stop + 1]
    return []


@pytest.mark.parametrize("n_min,n_max", [(1, 3), (2, 4), (1, 1)])
def test_ngram_index_finds_what_a_scan_of_the_context_finds(n_min, n_max):
    rng = random.Random(n_min * 10 + n_max)
    for trial in range(20):
        proposer = NgramProposer(DecodeSettings(ngram_min=n_min, ngram_max=n_max))
        committed = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
        proposer.start(committed)
        while len(committed) < 80:  # grown a few tokens at a time, as verify passes commit them
            k, stops = rng.randrange(1, 9), {3} if trial % 2 else set()
            assert proposer.lookup(committed, k, stops) == scan_ngram(committed, k, n_max, n_min, stops)
            committed = committed + [rng.randrange(4) for _ in range(rng.randrange(1, 4))]
