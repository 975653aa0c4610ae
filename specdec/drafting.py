"""Speculative decoding with trees, trained drafters and dynamic draft length.

One loop (`draft_decode`) serves every strategy here; what differs is the proposer and the draft-length policy:

* proposers — a draft model (its own KV cache), an EAGLE-style drafter (one layer on the target's features, its
  own KV cache), or Medusa heads (no cache: all heads read the last verified feature). Each builds a tree of draft
  tokens with tree.build_tree; width 1 gives a chain (top-1 drafting).
* policies — fixed k; the transformers "heuristic" schedule (k += 2 after a fully accepted block, else k −= 1,
  never below 1); a confidence stop (drafting ends after a token whose draft probability is below a threshold,
  transformers' assistant_confidence_threshold rule).

Verification is tree.verify_tree in one target forward (tree attention for trees, plain causal for chains), then
tree.keep_path keeps the accepted KV entries. Proposals are always the draft's top tokens, so greedy output is
token-identical to the baseline and sampling is exact (see tree.py). Draft-side caches are cropped back to the
verified prefix after every proposal and catch up on the accepted tokens at the next one.

The target's final hidden states come out of the same verify forward that checks the drafts, so EAGLE and Medusa
cost no extra target pass.
"""

from __future__ import annotations

import torch

from specdec.decoding import (Clock, DecodeSettings, Trace, hit_eos, make_generator, new_cache, prepare_model,
                               rollback, select_token)
from specdec.drafters import Drafter
from specdec.tree import Tree, build_tree, forward_masked, forward_tree, keep_path, verify_tree

STRATEGIES = ("tree", "speculative-heuristic", "speculative-confidence")
TREE_WIDTH = 4              # tree strategy: children per expanded node, and nodes expanded per depth
TREE_MAX_DEPTH = 6          # tree strategy: k is the node budget (verify rows); depth stops at EAGLE's default of 6
                            # draft passes, so a GPU can verify EAGLE-2-sized trees (k = 60) without 60 passes
HEURISTIC_K_MAX = 16        # heuristic schedule: k never grows past max(this, the starting k)
CONFIDENCE_THRESHOLD = 0.4  # confidence stop: transformers' default assistant_confidence_threshold


def next_k_heuristic(k: int, accepted: int, proposed: int, k_max: int) -> int:
    """transformers' "heuristic" schedule: +2 after a block the target accepted whole, −1 (floor 1) otherwise."""
    return min(k + 2, k_max) if accepted == proposed else max(1, k - 1)


def max_depth(budget: int, width: int) -> int:
    """How deep a proposal may go: a chain (width 1) as deep as its budget, a tree at most TREE_MAX_DEPTH."""
    return budget if width == 1 else min(budget, TREE_MAX_DEPTH)


def top(logits: torch.Tensor, width: int, ids: torch.Tensor | None = None) -> list[tuple[list[int], list[float]]]:
    """Per row: the `width` most likely tokens (mapped through `ids` for a reduced head) and their log-probs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, index = torch.topk(logp, min(width, logp.shape[-1]), dim=-1)
    if ids is not None:
        index = ids[index]
    return list(zip(index.tolist(), values.tolist()))


def path_attend(frontier: list[int], parents: list[int], slots: dict[int, int], visible: int,
                cached: int) -> torch.Tensor:
    """bool [len(frontier), cached + len(frontier)] for feeding frontier nodes to a draft whose cache holds
    `visible` verified positions then earlier-fed tree nodes (at `slots`): each node sees the verified prefix,
    its fed ancestors and itself. Records the new nodes' slots."""
    attend = torch.zeros(len(frontier), cached + len(frontier), dtype=torch.bool)
    attend[:, :visible] = True
    for row, node in enumerate(frontier):
        parent = parents[node]
        while parent >= 0:
            attend[row, slots[parent]] = True
            parent = parents[parent]
        attend[row, cached + row] = True
        slots[node] = cached + row
    return attend


class DraftModelProposer:
    """A same-vocabulary draft LM. Tree nodes are fed to it with a tree mask, one depth per forward."""

    def __init__(self, model, vocab: int | None = None):
        self.model, self.vocab = prepare_model(model), vocab

    def reset(self, prompt_ids: list[int]) -> None:
        self.cache, self.cached = new_cache(self.model), 0

    def propose(self, committed, feats, budget, width, stop_tokens, min_prob, trace) -> Tree:
        n = len(committed)
        logits, _ = forward_masked(self.model, committed[self.cached:], list(range(self.cached, n)), self.cache,
                                   logit_rows=[n - 1 - self.cached], vocab=self.vocab)
        self.cached = n
        slots: dict[int, int] = {}

        def expand(frontier, partial):
            cached = self.cache.get_seq_length()
            attend = None if width == 1 else path_attend(frontier, partial.parents, slots, n, cached)
            positions = [n - 1 + partial.depths[f] for f in frontier]
            out, _ = forward_masked(self.model, [partial.tokens[f] for f in frontier], positions, self.cache,
                                    attend, vocab=self.vocab)
            return top(out, width)

        tree, expansions = build_tree(top(logits, width)[0], expand, budget, width, max_depth(budget, width),
                                      stop_tokens, min_prob)
        rollback(self.cache, n)
        trace.draft_passes += 1 + expansions
        trace.draft_units += 1 + expansions
        return tree


class EagleProposer:
    """EAGLE-style drafting. Draft position j holds the pair (feature F_j, token x_{j+1}); pairs built from the
    target's verified features are kept, pairs built from the draft's own predictions are dropped after each
    proposal (the next proposal feeds the verified ones)."""

    def __init__(self, drafter: Drafter):
        self.drafter, self.module = drafter, drafter.module
        self.device = drafter.lm_weight.device

    def reset(self, prompt_ids: list[int]) -> None:
        m = self.module
        empty = torch.zeros(1, m.heads, 0, m.head_dim, device=self.device)
        self.keys, self.values, self.cached = empty, empty.clone(), 0
        self.ids, self.head_w = self.drafter.head(prompt_ids)

    def step(self, tokens: list[int], feat: torch.Tensor, positions: list[int], attend=None) -> torch.Tensor:
        emb = self.drafter.embed(torch.tensor([tokens], device=self.device)).float()
        out, k, v = self.module(emb, feat[None].float(), torch.tensor(positions, device=self.device),
                                (self.keys, self.values), attend)
        self.keys, self.values = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        return out[0]

    @torch.inference_mode()
    def propose(self, committed, feats, budget, width, stop_tokens, min_prob, trace) -> Tree:
        n = len(committed) - 1  # verified features F_0 .. F_{n-1}; the last committed token x_n has none yet
        start = self.cached
        root = self.step(committed[start + 1:n + 1], feats[start:n], list(range(start, n)))[-1]
        self.cached = n
        predicted: dict[int, torch.Tensor] = {}  # node → its predicted feature (input of its children)
        slots: dict[int, int] = {}

        def expand(frontier, partial):
            cached = self.keys.shape[2]
            attend = None if width == 1 else path_attend(frontier, partial.parents, slots, n, cached)
            inputs = torch.stack([predicted[partial.parents[f]] if partial.parents[f] >= 0 else root
                                  for f in frontier])
            out = self.step([partial.tokens[f] for f in frontier], inputs,
                            [n - 1 + partial.depths[f] for f in frontier], attend)
            for row, node in enumerate(frontier):
                predicted[node] = out[row]
            return top(out @ self.head_w.T, width, self.ids)

        tree, expansions = build_tree(top(root[None] @ self.head_w.T, width, self.ids)[0], expand, budget, width,
                                      max_depth(budget, width), stop_tokens, min_prob)
        self.keys, self.values = self.keys[:, :, :n], self.values[:, :, :n]
        trace.draft_passes += 1 + expansions
        trace.draft_units += 1 + expansions
        return tree


class MedusaProposer:
    """Medusa: head i scores depth i from the last verified feature; one pass of all heads per proposal."""

    def __init__(self, drafter: Drafter):
        self.drafter, self.module = drafter, drafter.module

    def reset(self, prompt_ids: list[int]) -> None:
        self.ids, self.head_w = self.drafter.head(prompt_ids)

    @torch.inference_mode()
    def propose(self, committed, feats, budget, width, stop_tokens, min_prob, trace) -> Tree:
        per_depth = top(self.module(feats[len(committed) - 2].float()) @ self.head_w.T, width, self.ids)
        tree, _ = build_tree(per_depth[0], lambda frontier, partial: [per_depth[partial.depths[f]] for f in frontier],
                             budget, width, min(max_depth(budget, width), self.module.heads), stop_tokens, min_prob)
        trace.draft_passes += 1
        trace.draft_units += 1
        return tree


def make_proposer(draft_model=None, drafter: Drafter | None = None, vocab: int | None = None):
    if drafter is not None:
        return EagleProposer(drafter) if drafter.kind == "eagle" else MedusaProposer(drafter)
    if draft_model is None:
        raise ValueError("a proposer needs a draft model or a trained drafter")
    return DraftModelProposer(draft_model, vocab)


@torch.inference_mode()
def draft_decode(target, prompt_ids: list[int], s: DecodeSettings, eos_ids: set[int], proposer, width: int = 1,
                 policy: str = "fixed", vocab: int | None = None) -> Trace:
    """Speculative decoding with a proposer. policy: 'fixed' (k per step), 'heuristic' or 'confidence'.

    Per-position counts are by depth: a step "proposes" position d when its tree reaches depth d and "accepts" it
    when the accepted path does, so for chains they are the usual counts and for trees α is the chance the path
    goes one level deeper.
    """
    if policy not in ("fixed", "heuristic", "confidence"):
        raise ValueError(f"unknown draft-length policy '{policy}'")
    clock, generator = Clock(target.device), make_generator(s, target.device)
    k_max = max(s.k, HEURISTIC_K_MAX) if policy == "heuristic" else s.k
    trace = Trace(proposed_per_position=[0] * k_max, accepted_per_position=[0] * k_max)
    min_prob = CONFIDENCE_THRESHOLD if policy == "confidence" else 0.0
    stop_tokens = eos_ids if s.stop_at_eos else set()
    prepare_model(target)
    start = clock()
    n_prompt = len(prompt_ids)
    cache = new_cache(target, n_prompt + s.max_new_tokens + k_max + 1)  # + room for one tree's rejected nodes
    logits, hidden = forward_masked(target, prompt_ids, list(range(n_prompt)), cache, logit_rows=[n_prompt - 1],
                                    vocab=vocab)
    token = select_token(logits[0], s, generator)
    trace.ttft_s = clock() - start
    trace.target_passes = 1
    committed = list(prompt_ids) + [token]
    feats = hidden.new_empty(n_prompt + s.max_new_tokens + k_max + 2, hidden.shape[-1])
    feats[:n_prompt] = hidden  # feats[i] = the target's final hidden state at committed[i]
    proposer.reset(prompt_ids)
    k = s.k
    done = s.stop_at_eos and token in eos_ids
    if done:
        trace.stop_reason = "eos"
    while not done and len(committed) - n_prompt < s.max_new_tokens:
        budget = min(k, s.max_new_tokens - (len(committed) - n_prompt) - 1)
        t0 = clock()
        tree = proposer.propose(committed, feats, budget, width, stop_tokens, min_prob, trace) if budget > 0 \
            else Tree()
        t1 = clock()
        before = len(committed) - 1  # the target's cache holds committed[:-1]; the root goes in slot `before`
        logits, hidden = forward_tree(target, committed[-1], tree, cache, vocab)
        t_forward = clock()
        path, token = verify_tree(logits, tree, s, generator)
        t2 = clock()
        keep_path(cache, before, path)
        rows = torch.tensor([0] + [i + 1 for i in path], device=hidden.device)
        feats[before:before + len(rows)] = hidden.index_select(0, rows)
        trace.draft_s += t1 - t0
        trace.verify_s += t2 - t1
        trace.accept_s += t2 - t_forward
        trace.target_passes += 1
        trace.steps += 1
        for d in range(tree.depth):
            trace.proposed_per_position[d] += 1
        for d in range(len(path)):
            trace.accepted_per_position[d] += 1
        new = [tree.tokens[i] for i in path] + [token]
        eos_at = hit_eos(new, eos_ids) if s.stop_at_eos else None
        if eos_at is not None:
            new, done, trace.stop_reason = new[:eos_at + 1], True, "eos"
        committed.extend(new)
        if policy == "heuristic":
            k = next_k_heuristic(k, len(path), tree.depth, k_max)
        trace.rollback_s += clock() - t2  # KV compaction and bookkeeping, as in decoding.speculative_decode
    trace.wall_s = clock() - start
    trace.tokens = committed[n_prompt:]
    return trace


def decode(strategy: str, target, prompt_ids: list[int], s: DecodeSettings, eos_ids: set[int], draft_model=None,
           drafter: Drafter | None = None, vocab: int | None = None) -> Trace:
    """`speculative` with a trained drafter (chain, fixed k), `tree`, `speculative-heuristic`,
    `speculative-confidence` — each with a draft model or a trained drafter."""
    proposer = make_proposer(draft_model, drafter, vocab)
    width = TREE_WIDTH if strategy == "tree" else 1
    policy = {"speculative-heuristic": "heuristic", "speculative-confidence": "confidence"}.get(strategy, "fixed")
    return draft_decode(target, prompt_ids, s, eos_ids, proposer, width, policy, vocab)
