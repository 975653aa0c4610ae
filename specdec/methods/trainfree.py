"""Data structures of the train-free proposers (proposers.py): Token Recycling's adjacency matrix and static tree
template, suffix matching over token histories (SuffixDecoding / SAMD), REST's suffix-array datastore, Lookahead's
Jacobi window and n-gram pool, and the rule that keeps what a proposer remembers across generations honest.

Pure numpy over token ids: no model, no torch, so every structure is tested on scripted histories.

Memory rule (every proposer that learns across a job's generations follows it): what one generation teaches is
stored under its prompt, and a generation draws only on what *other conversations* taught. Two prompts belong to
the same conversation when one is a prefix of the other (a follow-up turn's prompt starts with the first turn and
its answer), so neither a repeat of a prompt (warm-up, measured repeats) nor a later turn of the same conversation
drafts from its own earlier output; the job's other prompts are fair game, as in a server that has seen them.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from specdec.methods.tree import Tree, chain

SEPARATOR = -1               # between documents in a corpus: never matched, never proposed
MEMORY_TOKENS = 1 << 20      # suffix memory keeps at most this many earlier output tokens (8 MiB of int64)
MEMORY_PROMPTS = 4096        # and at most this many generations (oldest dropped first)


# --- memory across generations --------------------------------------------------------------------------------

def same_conversation(a: tuple, b: tuple) -> bool:
    """One prompt is a prefix of the other (equal prompts included)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def remember(memory: dict, key: str, prompt_ids: list[int], value) -> list:
    """Store `value` as what this generation of `prompt_ids` teaches (replacing an earlier generation of the same
    prompt) and return the values of every other conversation, oldest first."""
    entries: dict = memory.setdefault(key, {})
    prompt = tuple(prompt_ids)
    entries.pop(prompt, None)
    others = [v for p, v in entries.items() if not same_conversation(p, prompt)]
    entries[prompt] = value
    while len(entries) > MEMORY_PROMPTS:
        entries.pop(next(iter(entries)))
    return others


# --- Token Recycling --------------------------------------------------------------------------------------------

# Assumed chance that the target's next token is the candidate of rank r in a matrix row. Only the order of
# products matters: it fixes the static template (which (rank, rank, ...) paths a draft tree holds).
RANK_PRIOR = (0.55, 0.15, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015)


@functools.cache
def recycling_template(budget: int, depth: int, topk: int) -> tuple[tuple[int, int], ...]:
    """The static draft-tree template: `budget` nodes as (parent template node or -1, candidate rank), parents
    first. Nodes are the `budget` most likely rank paths of length <= depth under RANK_PRIOR (a path's score is
    the product of its ranks' priors, so every kept node's parent is kept). With topk 8, budget 15 and depth 8 it
    is a chain of rank-0 candidates 5 deep, the root's 2nd-4th candidates and rank-1/rank-2 side branches near
    the top: wide where a guess is likely to fail, deep along the best guess."""
    prior = [RANK_PRIOR[r] if r < len(RANK_PRIOR) else RANK_PRIOR[-1] / (r - len(RANK_PRIOR) + 2)
             for r in range(topk)]
    nodes: list[tuple[int, int]] = []
    heap = [(-math.log(prior[r]), 0, -1, r, 1) for r in range(topk)]  # (cost, order, parent, rank, depth)
    order = 1
    while heap and len(nodes) < budget:
        cost, _, parent, rank, d = heapq.heappop(heap)
        nodes.append((parent, rank))
        if d < depth:
            for r in range(topk):
                heapq.heappush(heap, (cost - math.log(prior[r]), order, len(nodes) - 1, r, d + 1))
                order += 1
    return tuple(nodes)


class RecycledRows:
    """Token Recycling's adjacency matrix, stored sparse: row t = the target's top-k next tokens the last time it
    scored token t (and, `scored`, their scores); -1 where t was not scored yet. Only tokens seen have a row
    (a conversation meets a few thousand of a vocabulary's 49152), so a generation's matrix costs 4·vocab bytes of
    index plus 4·topk (8·topk scored) bytes per token seen instead of 4·vocab·topk (3 MiB scored at topk 8):
    at batch size 16 the conversations in flight hold 16 of them. Indexed like the dense matrix it replaces:
    `rows[t]`, `rows[t, rank]`; `scored_row(t)` gives the scores too (storage row 0 is the unseen row: -1s,
    scores 0)."""

    def __init__(self, vocab: int, topk: int, scored: bool = False):
        self.vocab, self.topk = vocab, topk
        self.slot = np.zeros(vocab, dtype=np.int32)  # token -> its row in the storage; 0: unseen
        self.rows = np.full((64, topk), -1, dtype=np.int32)
        self.scores = np.zeros((64, topk), dtype=np.float32) if scored else None
        self.used = 1  # storage rows taken, the unseen row included

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return self.rows[(self.slot[index[0]],) + index[1:]]
        return self.rows[self.slot[index]]

    def scored_row(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        """Token t's row and its scores (scored rows only)."""
        where = self.slot[token]
        return self.rows[where], self.scores[where]

    def seen(self) -> int:
        """How many tokens have a row."""
        return self.used - 1

    def update(self, tokens: np.ndarray, rows: np.ndarray, scores: np.ndarray | None = None) -> None:
        """Overwrite the rows of `tokens` (the newest row of a repeated token wins; rows and scores alike)."""
        keep = latest(tokens)
        tokens = tokens[keep]
        new = tokens[self.slot[tokens] == 0]  # distinct already (latest() kept one of each)
        if len(new):
            need = self.used + len(new)
            if need > len(self.rows):  # grow by doubling: a generation's updates stay amortised O(rows)
                size = max(need, 2 * len(self.rows))
                self.rows = np.concatenate([self.rows, np.full((size - len(self.rows), self.topk), -1, np.int32)])
                if self.scores is not None:
                    self.scores = np.concatenate([self.scores, np.zeros((size - len(self.scores), self.topk),
                                                                        np.float32)])
            self.slot[new] = np.arange(self.used, need, dtype=np.int32)
            self.used = need
        where = self.slot[tokens]
        self.rows[where] = rows[keep]
        if self.scores is not None and scores is not None:
            self.scores[where] = scores[keep]


def latest(keys: np.ndarray) -> np.ndarray:
    """Indices of the last occurrence of each distinct key (numpy leaves the winner of a repeated index in one
    fancy assignment unspecified, so repeats are dropped before assigning)."""
    _, first_from_end = np.unique(keys[::-1], return_index=True)
    return len(keys) - 1 - first_from_end


def recycled_tree(matrix: RecycledRows, root: int, template, depth: int, stop_tokens=()) -> Tree:
    """Grow the template from `root`: a node's token is its parent's matrix row at the node's rank; nodes whose
    parent is missing (unseen row, end of sequence, beyond `depth`) are left out."""
    tree = Tree()
    placed: list[int] = []  # template node -> tree node (-1: left out)
    for parent, rank in template:
        if parent >= 0 and placed[parent] < 0:
            placed.append(-1)
            continue
        node_parent = placed[parent] if parent >= 0 else -1
        source = tree.tokens[node_parent] if node_parent >= 0 else root
        d = tree.depths[node_parent] + 1 if node_parent >= 0 else 1
        token = int(matrix[source, rank]) if source not in stop_tokens and d <= depth else -1
        if token < 0:
            placed.append(-1)
            continue
        placed.append(len(tree))
        tree.tokens.append(token)
        tree.parents.append(node_parent)
        tree.depths.append(d)
    return tree


CONTEXT_CAPACITY = 1 << 17  # a context table keeps at most this many contexts (the latest): 9 MiB at topk 8
CONTEXT_RECENT = 4096       # contexts learned one pass at a time are kept in a dict until there are this many


class ContextTable:
    """Token Recycling with more than one token of context: (the `order` − 1 tokens before a token, the token) ->
    the target's top-k next tokens the last time it scored that context, and their scores. Two or three tokens
    tell more than one (after "of the" vs after "the"), so where a context has been seen its row is the better
    guess. Exact and sized to what it holds: the contexts sorted by key (a lookup is a binary search), each
    verify pass's few new ones in a dict merged into them now and then; at most `capacity` contexts, the latest
    (4·(2 + 2·topk) + 8 bytes each: a generation of a 16-prompt queue holds about 10 000, 0.7 MiB, where a hashed
    table of 2^17 slots took 9 MiB per conversation whatever it held, and lost a row wherever two contexts met
    on a slot)."""

    def __init__(self, vocab: int, topk: int, order: int, capacity: int = CONTEXT_CAPACITY,
                 recent: int = CONTEXT_RECENT):
        self.vocab, self.topk, self.order, self.capacity, self.recent_max = vocab, topk, order, capacity, recent
        self.keys = np.zeros(0, dtype=np.int64)  # sorted
        self.stamps = np.zeros(0, dtype=np.int64)  # when each was learned: the oldest go first past capacity
        self.tokens = np.zeros((0, topk), dtype=np.int32)
        self.probs = np.zeros((0, topk), dtype=np.float32)
        self.recent: dict[int, tuple[list[int], list[float]]] = {}  # newer than everything in the arrays
        self.clock = 0

    def key(self, before, token) -> np.ndarray:
        """The contexts' keys: token + before[-1]·vocab + before[-2]·vocab² ... (row() computes one the same way)."""
        keys = np.asarray(token).astype(np.int64)
        for i in range(1, self.order):  # vocab^order < 2^63 for vocabularies up to 2^21 at order 3
            keys = keys + np.asarray(before)[..., -i].astype(np.int64) * self.vocab ** i
        return keys

    def update(self, before: np.ndarray, tokens: np.ndarray, rows: np.ndarray, probs: np.ndarray) -> None:
        """Learn each (before[i, -(order-1):], tokens[i]) -> rows[i], probs[i]; before: [n, >= order − 1] token ids,
        -1 where there is no token (such contexts are skipped); a later row of a context replaces an earlier one."""
        before = before[:, before.shape[1] - (self.order - 1):]
        known = (before >= 0).all(axis=1)
        keys, rows, probs = self.key(before[known], tokens[known]), rows[known], probs[known]
        if len(keys) + len(self.recent) <= self.recent_max:  # a verify pass's rows: a few dict writes
            for key, row, prob in zip(keys.tolist(), rows.tolist(), probs.tolist()):
                self.recent.pop(key, None)  # re-inserted last: the dict's order is the learning order
                self.recent[key] = (row, prob)
            return
        self.merge(keys, rows, probs)

    def merge(self, keys: np.ndarray, rows: np.ndarray, probs: np.ndarray) -> None:
        """Fold the dict and then `keys` (in learning order) into the sorted arrays; the latest row of a key wins,
        and past capacity the oldest contexts are dropped."""
        if self.recent:
            keys = np.concatenate([np.fromiter(self.recent, np.int64, len(self.recent)), keys])
            rows = np.concatenate([np.array([r for r, _ in self.recent.values()], np.int32).reshape(-1, self.topk),
                                   rows.astype(np.int32)])
            probs = np.concatenate([np.array([p for _, p in self.recent.values()], np.float32
                                             ).reshape(-1, self.topk), probs.astype(np.float32)])
            self.recent = {}
        stamps = self.clock + np.arange(len(keys), dtype=np.int64)
        self.clock += len(keys)
        keys, stamps = np.concatenate([self.keys, keys]), np.concatenate([self.stamps, stamps])
        rows, probs = np.concatenate([self.tokens, rows]), np.concatenate([self.probs, probs])
        order = np.lexsort((stamps, keys))  # by key, then by time: the last of each run of a key is its latest
        last = np.ones(len(order), dtype=bool)
        last[:-1] = keys[order[1:]] != keys[order[:-1]]
        keep = order[last]
        if len(keep) > self.capacity:
            keep = keep[np.argsort(stamps[keep])[-self.capacity:]]
            keep = keep[np.argsort(keys[keep])]
        self.keys, self.stamps, self.tokens, self.probs = keys[keep], stamps[keep], rows[keep], probs[keep]

    def find(self, key: int) -> int:
        """The key's index in the sorted arrays, or -1."""
        i = int(self.keys.searchsorted(key))
        return i if i < len(self.keys) and self.keys[i] == key else -1

    def row(self, before: tuple, token: int) -> tuple[list[int], list[float]]:
        """The context's (top-k tokens, scores), or two empty lists when it was not seen (or was dropped)."""
        key = token
        for i in range(1, self.order):
            if before[-i] < 0:
                return [], []
            key += before[-i] * self.vocab ** i
        found = self.recent.get(key)
        if found is not None:
            return found
        i = self.find(key)
        if i < 0:
            return [], []
        return self.tokens[i].tolist(), self.probs[i].tolist()


# --- suffix matching (SuffixDecoding / SAMD, REST) ------------------------------------------------------------

def match_ends(seq: np.ndarray, context: np.ndarray, max_match: int, before: int | None = None
               ) -> tuple[int, np.ndarray]:
    """Longest suffix match of `context` in `seq`: (its length L, the positions in seq where such a match ends).
    Only matches ending before `before` count (default: anywhere); L = 0 when the last token never occurs."""
    limit = len(seq) if before is None else before
    ends = np.flatnonzero(seq[:limit] == context[-1])
    length = 0
    while ends.size:
        length += 1
        if length == max_match or length == len(context):
            break
        ok = ends >= length
        nxt = ends[ok]
        nxt = nxt[seq[nxt - length] == context[-1 - length]]
        if not nxt.size:
            break
        ends = nxt
    return length, ends


def continuations(seq: np.ndarray, ends: np.ndarray, depth: int, stop: int | None = None) -> list[list[int]]:
    """The (up to) `depth` tokens after each match end, cut at a separator and before `stop` (exclusive)."""
    out = []
    limit = len(seq) if stop is None else stop
    for end in ends.tolist():
        cont = seq[end + 1:min(end + 1 + depth, limit)].tolist()
        if SEPARATOR in cont:
            cont = cont[:cont.index(SEPARATOR)]
        if cont:
            out.append(cont)
    return out


@dataclass
class Trie:
    """The trie of token continuations: node i holds tokens[i] under parents[i] (-1 = the root) at depths[i];
    count[i] = how many continuations pass through it; children[i + 1] maps a token to its node (children[0]: the
    root's). Nodes are numbered in order of first sight, so a parent comes before its children."""
    total: int = 0
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    children: list[dict[int, int]] = field(default_factory=lambda: [{}])


def build_trie(conts: list[list[int]], stop_tokens=()) -> Trie:
    """The continuations' trie; a continuation ends at its first end-of-sequence (nothing is drafted past one)."""
    trie = Trie(total=len(conts))
    for cont in conts:
        node = -1
        for token in cont:
            kids = trie.children[node + 1]
            if token not in kids:
                kids[token] = len(trie.tokens)
                trie.tokens.append(token)
                trie.parents.append(node)
                trie.depths.append(trie.depths[node] + 1 if node >= 0 else 1)
                trie.count.append(0)
                trie.children.append({})
            node = kids[token]
            trie.count[node] += 1
            if token in stop_tokens:
                break
    return trie


def frequency_tree(conts: list[list[int]], budget: int, stop_tokens=()) -> Tree:
    """The trie of the continuations, cut to the `budget` nodes with the highest frequency (the share of
    continuations that pass through a node, SuffixDecoding's score); ties go to the earlier-seen node, so a node's
    parent (at least as frequent, seen earlier) is always kept. Nodes come best first (that order puts a parent
    before its children), so every prefix of the tree is the tree of a smaller budget (DraftLength 'cost' reads
    that). Nothing is drafted past an end-of-sequence."""
    trie = build_trie(conts, stop_tokens)
    kept = sorted(range(len(trie.tokens)), key=lambda i: (-trie.count[i], i))[:budget]
    renumber = {old: new for new, old in enumerate(kept)}
    return Tree([trie.tokens[i] for i in kept],
                [renumber[trie.parents[i]] if trie.parents[i] >= 0 else -1 for i in kept],
                [trie.depths[i] for i in kept])


def frequency_chain(conts: list[list[int]], depth: int, stop_tokens=()) -> Tree:
    """The most frequent path of the continuations' trie, up to `depth` tokens, for engines that verify one
    sequence: at each step the next token shared by most continuations that agree so far (ties go to the
    earlier-seen token, as in frequency_tree). Nothing is drafted past an end-of-sequence."""
    path: list[int] = []
    alive = [c for c in conts if c]
    while alive and len(path) < depth:
        counts: dict[int, int] = {}
        for cont in alive:
            counts[cont[len(path)]] = counts.get(cont[len(path)], 0) + 1
        token = max(counts, key=counts.get)  # the first of the most frequent, in order of first sight
        path.append(token)
        if token in stop_tokens:
            break
        alive = [c for c in alive if c[len(path) - 1] == token and len(c) > len(path)]
    return chain(path)


def concatenate(documents: list[np.ndarray]) -> np.ndarray:
    """Documents joined with SEPARATOR (also one at the end), as one int64 array."""
    if not documents:
        return np.zeros(0, dtype=np.int64)
    parts = []
    for doc in documents:
        parts += [np.asarray(doc, dtype=np.int64), np.array([SEPARATOR], dtype=np.int64)]
    return np.concatenate(parts)


# --- dynamic trees: candidates from several sources, scored by how often such candidates were accepted ----------

SCORE_BINS = 10     # a source's raw scores (in [0, 1]) are counted in this many equal bins
SCORE_PRIOR = 4.0   # a bin starts as this many pseudo-observations accepted at its raw score


class Acceptance:
    """Observed acceptance of drafted nodes per (source, raw-score bin): of the nodes a verify pass checked, how
    many were the target's token after their parent (greedy acceptance given the parent). It puts the sources'
    raw scores (a recycled candidate's share of the target's top-k, SuffixDecoding's frequency share) on one
    scale, the chance a candidate is accepted once its parent is, so a dynamic tree can rank them against each
    other. Counts only, 2 × sources × SCORE_BINS floats."""

    def __init__(self, sources: int):
        self.hits = np.zeros((sources, SCORE_BINS))
        self.seen = np.zeros((sources, SCORE_BINS))

    def add(self, other: "Acceptance") -> None:
        self.hits += other.hits
        self.seen += other.seen

    @staticmethod
    def bin(raw: float) -> int:
        return min(int(raw * SCORE_BINS), SCORE_BINS - 1)

    def record(self, source: int, raw: float, accepted: bool) -> None:
        b = Acceptance.bin(raw)
        self.seen[source, b] += 1
        self.hits[source, b] += accepted

    def estimator(self, base: "Acceptance | None" = None):
        """estimate(source, raw): the chance a candidate of this source and raw score is accepted given its parent
        is — its bin's observed rate (here and in `base`), pulled towards the raw score by SCORE_PRIOR
        pseudo-observations. Reads the counts once (a tree asks for a hundred or so estimates)."""
        hits, seen = self.hits, self.seen
        if base is not None:
            hits, seen = hits + base.hits, seen + base.seen
        hits, seen = hits.tolist(), seen.tolist()

        def estimate(source: int, raw: float) -> float:
            b = Acceptance.bin(raw)
            return (hits[source][b] + SCORE_PRIOR * raw) / (seen[source][b] + SCORE_PRIOR)
        return estimate


def scored_tree(candidates, root: int, budget: int, depth: int, stop_tokens=(), chain_only: bool = False,
                root_key=None) -> tuple[Tree, list, list[float]]:
    """Best-first dynamic tree (EAGLE-2's rule over model-free candidates): the `budget` nodes with the highest
    path probability (the product of the conditional acceptance probabilities along the path), at most `depth`
    deep. candidates(token, key) -> [(token, probability, key, info)]: the children a node holding `token` may
    have (`key`: the sources' own state for that node, e.g. a trie node; root_key the root's; `info`: carried to
    the caller; probabilities <= 1, so a child never outranks its parent). Nodes come out in the order they were
    chosen, which is best first, so every prefix of the tree is a tree.
    chain_only: one child per node (the best), for engines that verify one sequence.
    Returns (tree, each node's info, each node's path probability)."""
    tree, infos, path_probs = Tree(), [], []
    heap = [(-p, order, -1, token, key, info) for order, (token, p, key, info) in enumerate(candidates(root, root_key))]
    heapq.heapify(heap)
    order = len(heap)
    while heap and len(tree) < budget:
        neg_p, _, parent, token, key, info = heapq.heappop(heap)
        node = len(tree)
        tree.tokens.append(token)
        tree.parents.append(parent)
        tree.depths.append(tree.depths[parent] + 1 if parent >= 0 else 1)
        infos.append(info)
        path_probs.append(-neg_p)
        if chain_only:
            heap = []
        if tree.depths[node] < depth and token not in stop_tokens:
            for child, p, child_key, child_info in candidates(token, key):
                heapq.heappush(heap, (neg_p * p, order, node, child, child_key, child_info))
                order += 1
    return tree, infos, path_probs


# --- REST datastore: a suffix array over a token corpus --------------------------------------------------------

SUFFIX_KEY = 32  # suffixes are ordered by their first SUFFIX_KEY tokens: matches longer than that are not needed


class Datastore:
    """A corpus of token ids (documents joined by SEPARATOR) and its suffix array, ordered by the big-endian
    bytes of each suffix's first SUFFIX_KEY tokens, so all suffixes that start with a pattern are one contiguous
    run found by binary search. Memory: 12 B per corpus token + 8 B per suffix array entry."""

    def __init__(self, corpus: np.ndarray):
        self.tokens = np.asarray(corpus, dtype=np.int64)
        self.corpus = self.tokens.astype(">i4")  # SEPARATOR is 0xFFFFFFFF: sorts after every token
        n = len(self.corpus)
        self.suffixes = np.array(sorted(range(n), key=self.key_at), dtype=np.int64) if n else np.zeros(0, np.int64)

    def key_at(self, i: int, n: int = SUFFIX_KEY) -> bytes:
        return self.corpus[i:i + n].tobytes()

    def occurrences(self, pattern: list[int]) -> np.ndarray:
        """Positions where `pattern` occurs (at most SUFFIX_KEY tokens of it are used)."""
        target = np.asarray(pattern[-SUFFIX_KEY:], dtype=">i4").tobytes()
        n = len(target) // 4
        key = functools.partial(self.key_at, n=n)
        lo = bisect.bisect_left(self.suffixes, target, key=lambda i: key(int(i)))
        hi = bisect.bisect_right(self.suffixes, target, lo=lo, key=lambda i: key(int(i)))
        return self.suffixes[lo:hi]

    def retrieve(self, context: list[int], depth: int, max_match: int, min_match: int = 1,
                 max_hits: int = 256) -> tuple[int, list[list[int]]]:
        """Continuations (up to `depth` tokens) of the longest suffix of `context` (at most max_match tokens,
        tried longest first) found in the corpus: (match length, up to max_hits continuations)."""
        for n in range(min(max_match, len(context)), min_match - 1, -1):
            hits = self.occurrences(context[-n:])
            if hits.size:
                ends = np.sort(hits)[:max_hits] + n - 1
                return n, continuations(self.tokens, ends, depth)
        return 0, []


# --- Lookahead decoding: the Jacobi window and the n-gram pool ----------------------------------------------------

def window_rows(levels: list[list[int]]) -> tuple[list[int], list[int], np.ndarray]:
    """The Jacobi window's rows for a verify pass after the root: (tokens, depths, attend).

    levels[0] is the first level without the root (level 0 = [root] + levels[0], e tokens); levels[1:] are the
    upper levels, e tokens each. Level l's column j sits at depth j + l and sees level 0's columns 0..j and levels
    1..l at column j: the Jacobi iterates that lead to it, at consecutive positions (the Lookahead paper's mask).
    Rows: level 0 from column 1, then each upper level; attend is bool [rows, 1 + rows] (column 0 = the root),
    level l's column j being attend column l·e + j."""
    e = len(levels[0]) + 1
    if any(len(level) != e for level in levels[1:]):
        raise ValueError(f"every upper window level needs {e} tokens, got {[len(level) for level in levels[1:]]}")
    tokens = list(levels[0]) + [token for level in levels[1:] for token in level]
    depths = list(range(1, e)) + [j + l for l in range(1, len(levels)) for j in range(e)]
    attend = np.zeros((len(tokens), 1 + len(tokens)), dtype=bool)
    for l in range(len(levels)):
        for j in range(1 if l == 0 else 0, e):
            row = attend[l * e + j - 1]
            row[:j + 1] = True                                  # level 0, columns 0..j (the root is column 0)
            row[[r * e + j for r in range(1, l + 1)]] = True    # levels 1..l at column j (itself included)
    return tokens, depths, attend


def advance_window(root: int, levels: list[list[int]], preds: list[int], n: int
                   ) -> tuple[list[list[int]], list[tuple[int, tuple[int, ...]]]]:
    """One Jacobi step of the window (LADE's rule: the window moves one position on, whatever the pass accepted).

    preds: the target's argmax at the root and at each window row, in window_rows order. While the window has
    fewer than n − 2 upper levels, every level drops its first column and the top level's predictions from column
    1 on become a new level (a window of W + n − 3 first-level tokens is full after n − 2 steps, W columns wide).
    Once full, each column j gives the n-gram (level 0, levels 1..n−2, the top's prediction) at column j, keyed by
    its first token, and the levels move down one: level 0 = level 1 from column 1, the top = the predictions.
    Returns (the new levels, the n-grams as (first token, the n − 1 tokens after it))."""
    grid = [[root] + list(levels[0])] + [list(level) for level in levels[1:]]
    e, top = len(grid[0]), len(grid) - 1
    if len(preds) != e * len(grid):
        raise ValueError(f"the window needs {e * len(grid)} predictions (the root's and one per row), got {len(preds)}")
    new = list(preds[top * e:(top + 1) * e])
    if top < n - 2:
        return [grid[0][2:]] + [level[1:] for level in grid[1:]] + [new[1:]], []
    grams = [(grid[0][j], tuple(level[j] for level in grid[1:]) + (new[j],)) for j in range(e)]
    return [grid[1][1:]] + grid[2:] + [new], grams


def add_ngram(pool: dict, key: int, gram: tuple[int, ...], capacity: int) -> None:
    """Lookahead's n-gram pool: per first token, the latest `capacity` distinct continuations, the most recently
    seen last (LADE's GUESS_SET_SIZE, least recently seen dropped first)."""
    grams = pool.setdefault(key, [])
    if gram in grams:
        grams.remove(gram)
    elif len(grams) >= capacity:
        grams.pop(0)
    grams.append(gram)
