"""Token trees: best-first draft trees, tree attention masks, one-forward verification, KV compaction.

A tree's root is the last committed token (the target has not seen it yet); its nodes are draft tokens, numbered
so that a parent always comes before its children. Verifying a tree is one target forward over [root] + nodes:
node i sits at position `cached + depth(i)` and attends to the cached prefix, the root, its ancestors and itself
(tree attention as in SpecInfer and Medusa). A chain of k drafts is the tree in which node i's parent is i − 1.

Verification walks down from the root: at each visited node the target picks its next token (argmax when greedy,
a sample from its processed distribution otherwise); if a child carries that token the walk descends into it,
else the token is emitted and the walk ends. Every emitted token is therefore exactly what the target would have
produced after the accepted prefix — greedy output is token-identical to the baseline, and with temperature > 0
each token is a sample from the target's distribution. This is SpecInfer's multi-step speculative sampling
(Miao et al. 2023, arXiv:2305.09781) for deterministic proposals: accepting child x_i after rejecting siblings
x_1..x_{i-1} has probability p(x_i) / (1 − Σ_{j<i} p(x_j)), i.e. one draw from p. Trees are therefore built from
the draft's top-k tokens only (never sampled drafts), which keeps them exact at any temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from specdec.decoding import DecodeSettings, logits_to_probs, rollback, sample


@dataclass
class Tree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)   # parent node index; -1 = the root
    depths: list[int] = field(default_factory=list)    # 1 for the root's children

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)


def chain(tokens: list[int]) -> Tree:
    return Tree(list(tokens), list(range(-1, len(tokens) - 1)), list(range(1, len(tokens) + 1)))


def is_chain(tree: Tree) -> bool:
    return tree.parents == list(range(-1, len(tree) - 1))


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[n + 1, n + 1] bool: row r (0 = root, i + 1 = node i) may attend to column c (itself and its ancestors)."""
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[0, 0] = True
    for i, parent in enumerate(parents):
        mask[i + 1] = mask[parent + 1]
        mask[i + 1, i + 1] = True
    return mask


def additive_mask(attend: torch.Tensor, dtype, device) -> torch.Tensor:
    """A bool [q, kv] "may attend" matrix as the 4-D additive float mask transformers passes through unchanged."""
    mask = torch.zeros(attend.shape, dtype=dtype, device=device)
    mask.masked_fill_(~attend.to(device), torch.finfo(dtype).min)
    return mask[None, None]


@torch.inference_mode()
def forward_masked(model, ids: list[int], positions: list[int], cache, attend: torch.Tensor | None = None,
                   logit_rows: list[int] | None = None, vocab: int | None = None):
    """One forward of a transformers causal LM over `ids` at `positions`, extending `cache`.

    attend: bool [len(ids), cached + len(ids)] or None for plain causal attention. Returns (logits of
    `logit_rows` (default: all) as float32, final hidden states [len(ids), hidden] — the LM head's input).
    """
    device = model.device
    mask = None if attend is None else additive_mask(attend, model.dtype, device)
    keep = torch.tensor(logit_rows if logit_rows is not None else range(len(ids)), device=device)
    out = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=keep,
                output_hidden_states=True)
    logits = out.logits[0]
    if vocab is not None:
        logits = logits[:, :vocab]
    return logits.float(), out.hidden_states[-1][0]


def forward_tree(model, root: int, tree: Tree, cache, vocab: int | None = None):
    """Verify pass: logits and hidden states for [root] + tree nodes (row 0 = root, row i + 1 = node i)."""
    cached = cache.get_seq_length()
    positions = [cached] + [cached + d for d in tree.depths]
    attend = None
    if not is_chain(tree):  # a chain's tree mask is the causal mask
        visible = torch.ones(len(tree) + 1, cached, dtype=torch.bool)
        attend = torch.cat([visible, ancestor_mask(tree.parents)], dim=1)
    return forward_masked(model, [root] + tree.tokens, positions, cache, attend, vocab=vocab)


def verify_tree(logits: torch.Tensor, tree: Tree, s: DecodeSettings, generator) -> tuple[list[int], int]:
    """Walk the tree with the target's choices (see module docstring). logits: [len(tree) + 1, V], row 0 = root.
    Returns (accepted node indices from depth 1 down, the next token after them)."""
    children: list[dict[int, int]] = [{} for _ in range(len(tree) + 1)]
    for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
        children[parent + 1].setdefault(token, i)
    path, row = [], 0
    while True:
        if s.greedy:
            token = int(logits[row].argmax())
        else:
            token = sample(logits_to_probs(logits[row:row + 1], s)[0], generator)
        node = children[row].get(token)
        if node is None:
            return path, token
        path.append(node)
        row = node + 1


@torch.inference_mode()
def keep_path(cache, start: int, path: list[int]) -> None:
    """After a verify pass that began at cache length `start` (the root's slot), keep the root and the accepted
    nodes' KV entries, in order, and drop the rest of the tree."""
    keep = start + 1 + len(path)
    if path != list(range(len(path))):  # not already contiguous: move the path's entries into place
        src = torch.tensor([start + 1 + i for i in path], device=cache.layers[0].keys.device)
        for layer in cache.layers:
            layer.keys[..., start + 1:keep, :] = layer.keys.index_select(-2, src)
            layer.values[..., start + 1:keep, :] = layer.values.index_select(-2, src)
    rollback(cache, keep)


def build_tree(root_children: tuple[list[int], list[float]], expand, budget: int, width: int, max_depth: int,
               stop_tokens=(), min_prob: float = 0.0) -> tuple[Tree, int]:
    """Best-first draft tree (the EAGLE-2 recipe): score = the draft's cumulative log-probability of a node's path.

    root_children: (top tokens, their log-probs) for depth 1. expand(frontier, partial) gets frontier node indices
    into `partial` (the tree so far: all candidates, unpruned) and returns, for each, (top tokens, log-probs) of
    its children. At every depth the `width` best new nodes are
    expanded, until max_depth, or until no frontier node could still place a child among the `budget` best
    (a child scores at most its parent). The `budget` best nodes are kept; ties go to the earlier (shallower) node,
    so a kept node's parent is always kept. `stop_tokens` (end of sequence) are never expanded; with min_prob > 0 a
    node whose own probability is below min_prob is kept but not expanded (the confidence stop).
    Returns (tree, number of expand calls).
    """
    partial = Tree()
    tokens, parents, depths = partial.tokens, partial.parents, partial.depths
    scores: list[float] = []
    own: list[float] = []

    def add(parent: int, depth: int, top: tuple[list[int], list[float]]) -> list[int]:
        base = scores[parent] if parent >= 0 else 0.0
        new = []
        for token, logp in zip(*top):
            new.append(len(tokens))
            tokens.append(int(token))
            parents.append(parent)
            depths.append(depth)
            scores.append(base + float(logp))
            own.append(float(logp))
        return new

    level = add(-1, 1, root_children)
    min_logp = math.log(min_prob) if min_prob > 0 else -math.inf
    expansions = 0
    for depth in range(1, max_depth):
        kth = sorted(scores, reverse=True)[budget - 1] if len(scores) >= budget else -math.inf
        frontier = sorted((i for i in level if scores[i] > kth and tokens[i] not in stop_tokens
                           and own[i] >= min_logp), key=lambda i: -scores[i])[:width]
        if not frontier:
            break
        tops = expand(frontier, partial)
        expansions += 1
        level = [j for node, top in zip(frontier, tops) for j in add(node, depth + 1, top)]
    kept = sorted(sorted(range(len(tokens)), key=lambda i: (-scores[i], i))[:budget])
    renumber = {old: new for new, old in enumerate(kept)}
    tree = Tree([tokens[i] for i in kept], [renumber[parents[i]] if parents[i] >= 0 else -1 for i in kept],
                [depths[i] for i in kept])
    return tree, expansions
