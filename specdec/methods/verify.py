"""The acceptance rules: which drafts the target keeps after its verify forward, and the token that follows.

* Tree rule (SpecInfer's multi-step speculative sampling for deterministic proposals, Miao et al. 2023,
  arXiv:2305.09781): walk down from the root; at each visited node the target picks its next token (argmax when
  greedy, a sample from its processed distribution otherwise); if a child carries that token the walk descends
  into it, else the token is emitted and the walk ends. Every emitted token is exactly what the target would have
  produced after the accepted prefix: greedy output is token-identical to the baseline, and with temperature > 0
  each token is one draw from the target's distribution (accepting child x_i after rejecting siblings x_1..x_{i-1}
  has probability p(x_i) / (1 − Σ_{j<i} p(x_j))). It serves every proposal whose tokens are a deterministic
  function of the context: top-k draft trees, greedy draft chains, n-gram lookups — a chain is a tree of width 1.
* Chain rule (Leviathan et al. 2022 / Chen et al. 2023) for drafts *sampled* from a draft distribution q: accept
  draft x with probability min(1, p(x)/q(x)), otherwise sample from normalise(max(0, p − q)); when all drafts are
  accepted sample a bonus token from p.
"""

from __future__ import annotations

import torch

from specdec.model.decoding import DecodeSettings, argmax_rows, logits_to_probs, sample
from specdec.methods.tree import Tree, children


def tree_rule(logits: torch.Tensor, tree: Tree, s: DecodeSettings, generator) -> tuple[list[int], int]:
    """logits: [len(tree) + 1, V], row 0 = root. Returns (accepted node indices from depth 1 down, next token)."""
    kids, path, row = children(tree), [], 0
    while True:
        if s.greedy:
            token = int(argmax_rows(logits[row:row + 1])[0])
        else:
            token = sample(logits_to_probs(logits[row:row + 1], s)[0], generator)
        node = kids[row].get(token)
        if node is None:
            return path, token
        path.append(node)
        row = node + 1


def chain_rule(logits: torch.Tensor, drafts: list[int], q: torch.Tensor, s: DecodeSettings,
               generator) -> tuple[int, int]:
    """logits: [len(drafts) + 1, V], row i scores the position of drafts[i]; q: [len(drafts), V] the draft
    distributions the drafts were sampled from. Returns (number accepted, the residual sample or bonus token)."""
    p = logits_to_probs(logits, s)
    n = len(drafts)
    if n:
        idx = torch.tensor(drafts, device=p.device)
        rows = torch.arange(n, device=p.device)
        p_x, q_x = p[rows, idx], q[rows, idx]
        u = torch.rand(n, generator=generator, device=generator.device).to(p.device)
        rejected = (u * q_x >= p_x).tolist()  # accept iff u < p(x)/q(x), without dividing by q(x)
        for i, is_rejected in enumerate(rejected):
            if is_rejected:
                residual = (p[i] - q[i]).clamp_min(0)
                total = residual.sum()
                # total == 0 only when p == q, where rejection has probability 0; guard against rounding.
                return i, sample(residual / total if total > 0 else p[i], generator)
    return n, sample(p[n], generator)


def accept(logits: torch.Tensor, tree: Tree, q: torch.Tensor | None, s: DecodeSettings,
           generator) -> tuple[list[int], int]:
    """The accepted path (node indices) and the next token: the chain rule for a sampled chain (q given), the
    tree rule for everything deterministic."""
    if q is None or s.greedy:
        return tree_rule(logits, tree, s, generator)
    accepted, token = chain_rule(logits, tree.tokens, q, s, generator)
    return list(range(accepted)), token
