"""Token trees: best-first draft trees, tree attention masks, the verify forward, KV compaction.

A tree's root is the last committed token (the target has not seen it yet); its nodes are draft tokens, numbered
so that a parent always comes before its children. Verifying a tree is one target forward over [root] + nodes:
node i sits at position `cached + depth(i)` and attends to the cached prefix, the root, its ancestors and itself
(tree attention as in SpecInfer and Medusa). A chain of k drafts is the tree in which node i's parent is i − 1.
The acceptance rules are in verify.py.

A pass may also compute rows that are not verified (`ExtraRows`: Lookahead's Jacobi window), after the tree nodes.
Tree rows never see them and they never see tree nodes, so verification is unchanged; their KV entries sit after
the tree's, so keep_path drops them with the rejected nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from specdec.model.decoding import Pass, forward_passes, kv_arena, rollback


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


def first_nodes(tree: Tree, n: int) -> Tree:
    """The tree's first n nodes (a tree: parents come before their children); of a best-first tree, the tree a
    budget of n would have proposed."""
    return tree if n >= len(tree) else Tree(tree.tokens[:n], tree.parents[:n], tree.depths[:n])


def children(tree: Tree) -> list[dict[int, int]]:
    """Per row of a verify pass (0: the root, i + 1: node i): its children's node index by token (the first such
    child where two hold the same token)."""
    kids: list[dict[int, int]] = [{} for _ in range(len(tree) + 1)]
    for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
        kids[parent + 1].setdefault(token, i)
    return kids


def follow(tree: Tree, tokens: list[int]) -> tuple[list[int], bool]:
    """The nodes a tree holds along `tokens` (the tokens after its root), root first: the path greedy acceptance
    takes when the target's tokens are `tokens`; and whether that path is decided (a token no child holds, or a
    leaf reached) rather than waiting on tokens not yet known."""
    kids, path, row = children(tree), [], 0
    for token in tokens:
        node = kids[row].get(token)
        if node is None:
            return path, True
        path.append(node)
        row = node + 1
    return path, not kids[row]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[n + 1, n + 1] bool: row r (0 = root, i + 1 = node i) may attend to column c (itself and its ancestors)."""
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[0, 0] = True
    for i, parent in enumerate(parents):
        mask[i + 1] = mask[parent + 1]
        mask[i + 1, i + 1] = True
    return mask


@dataclass
class ExtraRows:
    """Rows a verify pass computes but does not verify, appended after the tree nodes: row j holds tokens[j] at
    position `cached + depths[j]` and sees the cached prefix plus the pass rows `attend[j]` marks (column 0 = the
    root, column i + 1 = extra row i)."""
    tokens: list[int]
    depths: list[int]
    attend: torch.Tensor  # bool [len(tokens), 1 + len(tokens)]

    def __len__(self) -> int:
        return len(self.tokens)


def pass_mask(parents: list[int], extra: ExtraRows | None = None) -> torch.Tensor:
    """bool over a pass's rows ([root] + tree nodes + extra rows): the tree's ancestor mask, and the extra rows'
    own mask over the root and each other (no tree row sees an extra row, no extra row sees a tree node)."""
    n, m = len(parents) + 1, len(extra) if extra is not None else 0
    mask = torch.zeros(n + m, n + m, dtype=torch.bool)
    mask[:n, :n] = ancestor_mask(parents)
    if m:
        mask[n:, 0] = extra.attend[:, 0]
        mask[n:, n:] = extra.attend[:, 1:]
    return mask


def merge(trees: list[Tree], budget: int) -> Tree:
    """The union of draft trees from one root as one trie: a path several trees propose is one set of nodes.
    Nodes are taken tree by tree, each in its own order (parents first), until `budget` nodes are placed; a node
    whose parent was left out is left out too."""
    out = Tree()
    placed_at: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    for tree in trees:
        placed: list[int | None] = []
        for token, parent, depth in zip(tree.tokens, tree.parents, tree.depths):
            where = placed[parent] if parent >= 0 else -1
            if where is not None and (where, token) not in placed_at and len(out) < budget:
                placed_at[(where, token)] = len(out)
                out.tokens.append(token)
                out.parents.append(where)
                out.depths.append(depth)
            placed.append(placed_at.get((where, token)) if where is not None else None)
    return out


def forward_tree(model, root: int, tree: Tree, cache, vocab: int | None = None, hidden: bool = False,
                 extra: ExtraRows | None = None):
    """Verify pass: logits (and hidden states) for [root] + tree nodes (row 0 = root, row i + 1 = node i), then
    the extra rows (row len(tree) + 1 + j = extra row j)."""
    return forward_passes(model, [tree_pass(root, tree, cache, hidden, extra)], vocab)[0]


def tree_pass(root: int, tree: Tree, cache, hidden: bool = False, extra: ExtraRows | None = None) -> Pass:
    """The verify pass of forward_tree as one sequence's share of a (batched) target pass."""
    cached = cache.get_seq_length()
    ids = [root] + tree.tokens
    positions = [cached] + [cached + d for d in tree.depths]
    if extra is not None:
        ids += extra.tokens
        positions += [cached + d for d in extra.depths]
    attend = None
    if not is_chain(tree) or extra:  # a chain alone is the causal mask
        visible = torch.ones(len(ids), cached, dtype=torch.bool)
        attend = torch.cat([visible, pass_mask(tree.parents, extra)], dim=1)
    return Pass(ids, cache, len(ids), positions, attend, hidden)


@torch.inference_mode()
def keep_path(cache, start: int, path: list[int]) -> None:
    """After a verify pass that began at cache length `start` (the root's slot), keep the root and the accepted
    nodes' KV entries, in order, and drop the rest of the tree (and the pass's extra rows after it)."""
    keep = start + 1 + len(path)
    if path != list(range(len(path))):  # not already contiguous: move the path's entries into place
        src = torch.tensor([start + 1 + i for i in path], device=cache.layers[0].keys.device)
        arena = kv_arena(cache)
        if arena is not None:  # every layer's keys and values in one buffer: one gather, one copy
            arena[..., start + 1:keep, :] = arena.index_select(-2, src)
        else:
            for layer in cache.layers:
                layer.keys[..., start + 1:keep, :] = layer.keys.index_select(-2, src)
                layer.values[..., start + 1:keep, :] = layer.values.index_select(-2, src)
    rollback(cache, keep)


def build_tree(root_children: tuple[list[int], list[float]], expand, budget: int, width: int, max_depth: int,
               stop_tokens=(), min_prob: float = 0.0) -> tuple[Tree, int]:
    """Best-first draft tree (the EAGLE-2 recipe): score = the draft's cumulative log-probability of a node's path.

    root_children: (top tokens, their log-probs) for depth 1. expand(frontier, partial) gets frontier node indices
    into `partial` (the tree so far: all candidates, unpruned) and returns, for each, (top tokens, log-probs) of
    its children. grow_tree is the same as a generator (it yields (frontier, partial) and receives expand's answer),
    for drafters whose expansions run batched across sequences. Returns (tree, number of expand calls)."""
    return answer_steps(grow_tree(root_children, budget, width, max_depth, stop_tokens, min_prob),
                        lambda request: expand(*request))


def answer_steps(steps, answer):
    """Run a generator that yields requests and receives answers (grow_tree, DraftModelProposer.drafting) one
    request at a time, each answered by answer(request); its return value."""
    try:
        request = next(steps)
        while True:
            request = steps.send(answer(request))
    except StopIteration as done:
        return done.value


def grow_tree(root_children: tuple[list[int], list[float]], budget: int, width: int, max_depth: int,
              stop_tokens=(), min_prob: float = 0.0):
    """build_tree's search. At every depth the `width` best new nodes are
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
        tops = yield frontier, partial
        expansions += 1
        level = [j for node, top in zip(frontier, tops) for j in add(node, depth + 1, top)]
    kept = sorted(sorted(range(len(tokens)), key=lambda i: (-scores[i], i))[:budget])
    renumber = {old: new for new, old in enumerate(kept)}
    tree = Tree([tokens[i] for i in kept], [renumber[parents[i]] if parents[i] >= 0 else -1 for i in kept],
                [depths[i] for i in kept])
    return tree, expansions
