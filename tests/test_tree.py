"""Tree verification and dynamic draft length: tree attention against a sequential reference, KV compaction,
best-first tree building, exact sampling, greedy losslessness, and the draft-length policies' k trajectories."""

from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
from scipy.stats import chisquare

from specdec.model.decoding import DecodeSettings, baseline_decode, forward, kv_arena, make_generator, new_cache
from specdec.methods.proposers import DraftLength, DraftModelProposer, Proposal
from specdec.run.runner import decode_models
from specdec.methods.speculative import speculative_decode
from specdec.methods.tree import Tree, ancestor_mask, build_tree, chain, forward_tree, keep_path
from specdec.methods.verify import tree_rule
from tiny import EOS, prompts


def random_tree(n: int, seed: int, vocab: int = 48) -> Tree:
    gen = torch.Generator().manual_seed(seed)
    parents, depths, tokens = [], [], []
    for i in range(n):
        parent = int(torch.randint(-1, i, (1,), generator=gen)) if i else -1
        parents.append(parent)
        depths.append(1 if parent < 0 else depths[parent] + 1)
        tokens.append(int(torch.randint(3, vocab, (1,), generator=gen)))
    return Tree(tokens, parents, depths)


def path_tokens(tree: Tree, node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(tree.tokens[node])
        node = tree.parents[node]
    return out[::-1]


def prefilled(model, ids):
    cache = new_cache(model)
    forward(model, ids, cache)
    return cache


def test_ancestor_mask_small_tree():
    # root → a, b; a → c; c → d
    mask = ancestor_mask([-1, -1, 0, 2])
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 0, 1, 0, 0],
                             [1, 1, 0, 1, 0],
                             [1, 1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_forward_matches_sequential_forwards(target, seed):
    """Every node's logits from one tree-masked forward equal a plain forward over root + its path."""
    prompt = prompts(1, seed=seed)[0]
    tree = random_tree(12, seed)
    assert tree.depth >= 3 and len(set(tree.parents)) > 2  # branching and depth, not a chain
    cache = prefilled(target, prompt[:-1])
    logits, hidden = forward_tree(target, prompt[-1], tree, cache)
    assert cache.get_seq_length() == len(prompt) + len(tree)
    reference = forward(target, [prompt[-1]], prefilled(target, prompt[:-1]))[0][0]
    torch.testing.assert_close(logits[0], reference, rtol=0, atol=1e-9)
    for node in range(len(tree)):
        ids = [prompt[-1]] + path_tokens(tree, node)
        reference = forward(target, ids, prefilled(target, prompt[:-1]))[0][0]
        torch.testing.assert_close(logits[node + 1], reference, rtol=0, atol=1e-9)


@pytest.mark.parametrize("capacity", [256, None])
def test_keep_path_leaves_the_cache_of_the_accepted_path(target, capacity):
    """With room (256) every layer stays in the cache's one KV buffer and the path moves in one copy; with none
    (the prefill's length) the tree pass grows each layer into its own buffer and the path moves layer by layer."""
    prompt = prompts(1, seed=4)[0]
    tree = random_tree(12, 5)
    deepest = max(range(len(tree)), key=lambda i: tree.depths[i])
    path = []
    node = deepest
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    path = path[::-1]
    assert path != list(range(len(path)))  # entries must move, not just be cropped
    cache = new_cache(target, capacity or len(prompt) - 1)
    forward(target, prompt[:-1], cache)
    forward_tree(target, prompt[-1], tree, cache)
    assert (kv_arena(cache) is not None) == (capacity is not None)
    keep_path(cache, len(prompt) - 1, path)
    ids = [prompt[-1]] + [tree.tokens[i] for i in path]
    assert cache.get_seq_length() == len(prompt) - 1 + len(ids)
    reference_cache = prefilled(target, prompt[:-1] + ids)
    nxt = [7, 9, 11]
    torch.testing.assert_close(forward(target, nxt, cache, 3)[0], forward(target, nxt, reference_cache, 3)[0],
                               rtol=0, atol=1e-9)


def scripted_expand(children: dict[int, tuple[list[int], list[float]]]):
    """expand() for build_tree: a node's children depend on its token only."""
    calls = []

    def expand(frontier, partial):
        calls.append(list(frontier))
        return [children[partial.tokens[f]] for f in frontier]
    return expand, calls


def test_build_tree_keeps_the_best_paths_and_their_ancestors():
    lp = math.log
    children = {1: ([3, 4], [lp(0.9), lp(0.1)]), 2: ([5, 6], [lp(0.5), lp(0.5)]),
                3: ([7, 8], [lp(0.8), lp(0.2)]), 4: ([9, 10], [lp(0.6), lp(0.4)]),
                5: ([11, 12], [lp(0.5), lp(0.5)]), 6: ([13, 14], [lp(0.5), lp(0.5)]),
                7: ([15, 16], [lp(0.99), lp(0.01)])}
    for i in range(8, 17):
        children.setdefault(i, ([20, 21], [lp(0.5), lp(0.5)]))
    expand, _ = scripted_expand(children)
    tree, _ = build_tree(([1, 2], [lp(0.7), lp(0.3)]), expand, budget=5, width=2, max_depth=4)
    # path probabilities: 1 .7, 1-3 .63, 1-3-7 .504, 1-3-7-15 .499, 2 .3, 1-3-8 .126 ...
    paths = sorted(tuple(path_tokens(tree, i)) for i in range(len(tree)))
    assert paths == sorted([(1,), (1, 3), (1, 3, 7), (1, 3, 7, 15), (2,)])
    for i, parent in enumerate(tree.parents):
        assert parent < i and (parent < 0 or tree.depths[i] == tree.depths[parent] + 1)


def test_build_tree_width_one_is_a_chain_and_stops_early():
    lp = math.log
    children = {t: ([t + 1], [lp(0.9)]) for t in range(1, 20)}
    expand, calls = scripted_expand(children)
    tree, expansions = build_tree(([1], [lp(0.9)]), expand, budget=5, width=1, max_depth=5)
    assert tree == chain([1, 2, 3, 4, 5]) and expansions == 4
    # a second branch that cannot place a child among the best `budget` nodes is not expanded
    expand, calls = scripted_expand({1: ([3], [lp(0.9)]), 2: ([4], [lp(0.9)]), 3: ([5], [lp(0.9)])})
    tree, expansions = build_tree(([1, 2], [lp(0.99), lp(0.01)]), expand, budget=2, width=2, max_depth=4)
    assert [path_tokens(tree, i) for i in range(len(tree))] == [[1], [1, 3]]
    assert calls == [[0]]  # node 2 (p = .01) never expanded; after node 3 nothing can beat the kept two


def test_confidence_stop_ends_the_chain_after_an_unsure_token():
    lp = math.log
    probs = {1: 0.9, 2: 0.8, 3: 0.3, 4: 0.9, 5: 0.9}
    children = {t: ([t + 1], [lp(probs[t + 1])]) for t in range(1, 5)}
    expand, _ = scripted_expand(children)
    tree, _ = build_tree(([1], [lp(0.9)]), expand, budget=5, width=1, max_depth=5, min_prob=0.4)
    assert tree.tokens == [1, 2, 3]  # the unsure token is still proposed (transformers' rule), then drafting stops
    tree, _ = build_tree(([1], [lp(0.9)]), expand, budget=5, width=1, max_depth=5, stop_tokens={2})
    assert tree.tokens == [1, 2]  # end of sequence is never expanded


def test_heuristic_schedule():
    length, trajectory = DraftLength(DecodeSettings(k=4), "heuristic"), []
    length.k_max = 14
    for accepted, proposed in [(4, 4), (6, 6), (3, 8), (0, 7), (6, 6), (8, 8), (10, 10), (12, 12), (1, 14)]:
        length.observe(accepted, proposed)
        trajectory.append(length.k)
    assert trajectory == [6, 8, 7, 6, 8, 10, 12, 14, 13]
    length.k = 1
    length.observe(0, 1)
    assert length.k == 1
    fixed = DraftLength(DecodeSettings(k=4), "fixed")
    fixed.observe(4, 4)
    assert fixed.k == 4 and fixed.shape(2).depth == 2  # never drafts past the room left


class ScriptedProposer:
    """Proposes the target's own continuation for the scripted number of tokens, then a wrong token: the
    accepted count of each step is known in advance."""

    needs_features = reads_prompt_logits = False

    def __init__(self, reference: list[int], script: list[int], vocab: int = 48):
        self.reference, self.script, self.vocab, self.budgets = reference, list(script), vocab, []

    def start(self, prompt_ids, generator=None, prompt_logits=None):
        self.n_prompt = len(prompt_ids)

    def propose(self, committed, feats, shape, trace):
        budget = shape.depth
        self.budgets.append(budget)
        done = len(committed) - self.n_prompt
        right = self.reference[done:done + budget]
        good = min(self.script.pop(0) if self.script else budget, budget, len(right))
        tokens = right[:good] + [(t + 1) % self.vocab for t in right[good:good + 1]]
        return Proposal(chain(tokens[:budget]))

    def observe(self, committed, proposal, logits):
        pass


def test_heuristic_policy_k_trajectory_on_a_scripted_accept_pattern(target):
    p = prompts(1, seed=8)[0]
    s = DecodeSettings(max_new_tokens=200, k=3, stop_at_eos=False)
    reference = baseline_decode(target, p, s, set()).tokens
    script = [3, 5, 7, 2, 0, 0, 6, 9]  # full, full, full, partial, none, none, full, full
    proposer = ScriptedProposer(reference, script)
    trace = speculative_decode(target, p, s, set(), proposer, DraftLength(s, "heuristic"))
    assert trace.tokens == reference
    assert proposer.budgets[:9] == [3, 5, 7, 9, 8, 7, 6, 8, 10]
    proposer = ScriptedProposer(reference, script)
    speculative_decode(target, p, s, set(), proposer, DraftLength(s, "fixed"))
    assert set(proposer.budgets[:-1]) == {3}


@pytest.mark.parametrize("strategy", ["speculative", "tree", "speculative-heuristic", "speculative-confidence"])
def test_greedy_draft_model_strategies_match_baseline(target, draft, strategy):
    accepted = rejected = 0
    for p in prompts(5, seed=3):
        for k in (1, 3, 6):
            s = DecodeSettings(max_new_tokens=30, k=k)
            base = baseline_decode(target, p, s, {EOS}).tokens
            trace = decode_models(strategy, target, p, s, {EOS}, draft_model=draft)
            assert trace.tokens == base, f"{strategy} k={k}"
            assert trace.target_passes == 1 + trace.steps
            acc = sum(trace.accepted_per_position)
            accepted, rejected = accepted + acc, rejected + trace.steps - (trace.steps if acc else 0)
    assert accepted > 50


def test_trees_keep_to_their_depth_and_node_budget(target, draft):
    """k is the depth and tree_budget the node count: a k = 6 tree with a budget of 20 uses up to 20 verify rows
    but at most 6 draft positions; a k = 10 chain drafts 10 deep. Both stay token-identical to the baseline. The
    draft is made overconfident (its logits scaled up), so best-first trees would grow deep without the bound."""
    confident = copy.deepcopy(draft)
    with torch.no_grad():
        confident.get_output_embeddings().weight.mul_(50.0)
    for width, k, budget in ((4, 6, 20), (1, 10, None)):
        s = DecodeSettings(max_new_tokens=30, k=k, tree_budget=budget, stop_at_eos=False)
        proposer = DraftModelProposer(confident, s)
        trees = []
        drafting = proposer.drafting

        def recording(*a, drafting=drafting):  # decode_slots drafts through the generator (draft_together)
            proposal = yield from drafting(*a)
            trees.append(proposal.tree)
            return proposal

        proposer.drafting = recording
        for p in prompts(3, seed=8):
            assert speculative_decode(target, p, s, set(), proposer, DraftLength(s, width=width)).tokens == \
                baseline_decode(target, p, s, set()).tokens
        assert max(t.depth for t in trees) == k
        assert max(len(t) for t in trees) == (budget or k)


def test_greedy_tree_stops_exactly_at_eos_and_max_tokens(target, draft):
    for p in prompts(3, seed=5):
        free = baseline_decode(target, p, DecodeSettings(max_new_tokens=30, stop_at_eos=False), set()).tokens
        eos = {free[6]}
        expected = free[:free.index(free[6]) + 1]
        s = DecodeSettings(max_new_tokens=30, k=5)
        assert decode_models("tree", target, p, s, eos, draft_model=draft).tokens == expected
        for n in (1, 2, 7):
            s = DecodeSettings(max_new_tokens=n, k=6, stop_at_eos=False)
            assert decode_models("tree", target, p, s, set(), draft_model=draft).tokens == free[:n]


def test_tree_sampling_is_exact():
    """The walk emits exactly the target's distribution: first token ~ p(root), second ~ p(child) after it."""
    vocab = 6
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=gen, dtype=torch.float64) * 1.5
    tree = Tree([0, 1, 2], [-1, -1, 0], [1, 1, 2])  # root children 0 and 1; node 0 has child 2
    s = DecodeSettings(temperature=1.0)
    generator = make_generator(s, "cpu")
    first, second = collections.Counter(), collections.Counter()
    trials = 20000
    for _ in range(trials):
        path, token = tree_rule(logits, tree, s, generator)
        emitted = [tree.tokens[i] for i in path] + [token]
        first[emitted[0]] += 1
        if emitted[0] == 0:
            second[emitted[1]] += 1
    p_root = torch.softmax(logits[0], -1)
    p_node0 = torch.softmax(logits[1], -1)
    for counts, probs in ((first, p_root), (second, p_node0)):
        total = sum(counts.values())
        observed = [counts[t] for t in range(vocab)]
        assert chisquare(observed, (probs * total).tolist()).pvalue > 1e-3
