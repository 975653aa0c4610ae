"""Proposers: what drafts the tokens that speculative.speculative_decode verifies, and how many.

A proposer is any object with
  needs_features: bool    — wants the target's final hidden states (EAGLE, Medusa read them)
  reads_prompt_logits: bool — wants the target's logits at every prompt position (else start gets None)
  prompt_topk: int        — optional, with reads_prompt_logits: start gets only each prompt row's top-k and the
                            last row (decoding.RowsTop), not the [prompt, vocab] logits
  start(prompt_ids, generator, prompt_logits)
                          — a new generation begins (generator: the loop's random stream)
  propose(committed, feats, shape, trace) -> Proposal
                          — draft after `committed` (prompt + generated; the target has not seen the last token)
                            within `shape`; count its own draft forwards in trace.draft_passes / draft_units
  observe(committed, proposal, logits)
                          — after verification: `committed` holds the accepted drafts and the target's next token;
                            `logits` are the verify pass's rows ([root] + tree nodes + the proposal's extra rows);
                            drop what was drafted past the accepted prefix, update any state
  max_extra_rows: int     — optional: the most extra rows a proposal of this proposer holds (sizes the KV cache)
  drafts_in_shadow: bool  — optional: propose only reads tables (no draft model, no state that observe must see
                            verified), so the cost policy may verify only a prefix of a proposal (none of it
                            included) and score the rest against the tokens that follow
Proposals are token trees (a chain is a tree of width 1) with, for sampled draft chains only, the draft
distributions q (verify.accept then uses the chain rule; everything else is checked with the tree rule), and
optionally extra rows (tree.ExtraRows) the verify pass computes but does not verify: Lookahead's Jacobi window.

`DraftLength` is the draft-length policy (fixed, heuristic, confidence, cost); it composes with any proposer.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from specdec.model.decoding import (DecodeSettings, Pass, RowsTop, Trace, argmax_rows, forward, forward_passes,
                                    hit_eos, logits_to_probs, new_cache, rollback, sample, top_k_rows)
from specdec.methods.drafters import Drafter
from specdec.model.kernels import prepare_model
from specdec.methods.trainfree import (MEMORY_TOKENS, Acceptance, ContextTable, RecycledRows, add_ngram, advance_window,
                                       build_trie, concatenate, continuations, frequency_chain, frequency_tree,
                                       match_ends, recycled_tree, recycling_template, remember, scored_tree,
                                       window_rows)
from specdec.methods.tree import ExtraRows, Tree, answer_steps, build_tree, chain, follow, grow_tree, merge

HEURISTIC_K_MAX = 16        # heuristic schedule: k never grows past max(this, the starting k)
# scored recycling (the dynamic tree's): context tables keyed by this many tokens (the token and the ones before
# it). Three as well was tried: 2.06 accepted tokens per pass against 2.11 with two alone (16 suite prompts)
CONTEXT_ORDERS = (2,)
CONFIDENCE_THRESHOLD = 0.4  # confidence stop: transformers' default assistant_confidence_threshold
POLICIES = ("fixed", "heuristic", "confidence", "cost")
COST_EXPLORE_EVERY = 8      # cost policy: every this many passes the full budget, so larger budgets stay measured
COST_PRIOR_PASSES = 0.25    # cost policy: each budget's expected tokens start as this much of a pass accepting all


@dataclass
class Proposal:
    tree: Tree
    q: torch.Tensor | None = None  # [len(tree), V]: distributions a sampled chain was drawn from; None = deterministic
    extra: ExtraRows | None = None  # rows the verify pass computes after the tree but does not verify


@dataclass(frozen=True)
class Shape:
    """How much one proposal may hold."""
    depth: int                 # draft positions (chains: tokens)
    budget: int                # nodes (chains: = depth)
    width: int = 1             # children per expanded node
    min_prob: float = 0.0      # confidence stop: a node whose own probability is below this is not expanded
    stop_tokens: frozenset = frozenset()  # never expanded (end of sequence)


class DraftLength:
    """Draft-length policy: 'fixed' (k every step); 'heuristic' (transformers' schedule: k += 2 after a block the
    target accepted whole, k −= 1 (floor 1) otherwise); 'confidence' (drafting stops after a token the draft gives
    probability < CONFIDENCE_THRESHOLD, transformers' assistant_confidence_threshold rule); 'cost' (each pass the
    budget — a chain's depth, a tree's nodes, at most k or tree_budget — that maximises the tokens a pass is
    expected to yield per second of the pass, from this generation's passes so far, the target's measured forward
    times by row count (`bind`, decoding.pass_costs) and the generation's mean time per pass outside the forward).

    The cost policy needs proposals that are best-first (every prefix of the proposed tree is what a smaller budget
    would have proposed: chains, frequency and scored trees), so that one pass answers for every smaller budget:
    the tokens it would have yielded are 1 + the accepted path's leading nodes among the first b. The first pass
    and every COST_EXPLORE_EVERY-th take the full budget, so every budget's estimate rests on passes picked by
    their place in the generation, not by their content.

    Where the proposer drafts in the shadow (drafts_in_shadow: model-free proposers, whose drafting costs
    little), every pass drafts the full budget and verifies only its first b nodes (`verify`; a best-first prefix
    is what budget b would have proposed), b = 0 included: a pass of the last token alone, one token for a
    one-row pass, where no draft is expected to pay for its rows. `watch` keeps the whole proposal and `settle`
    scores it against the tokens the generation goes on to commit (tree.follow: the path the tree rule would have
    taken, exactly for greedy decoding), so every pass answers for every budget and none is spent exploring.
    (Budget 0 with exploration passes alone held a generation at 0 after one early miss until the next of them:
    multi-turn's ngram 2.31x -> 2.03x.)

    Each budget's expected tokens start from a prior: COST_PRIOR_PASSES of a pass that accepted every draft, which
    the answering passes outweigh within a few. Without it one early miss settled a short generation: where rows
    cost little (float32: a 9-row pass ~1.15 plain ones), the first pass's miss put every budget at 1 token a
    pass, budget 0 won by the pass times' noise, and the default matrix's ngram cell came out 1.04x or 1.56x
    from run to run (its 13-token list prompt: 2 or 9 drafts accepted). Where rows are dear the prior fades
    after ~4 misses (int4 here: a 9-row pass ~1.5 plain ones), with little cost (A/B on the suite, int4: within
    noise).

    The pass after one whose every draft was accepted takes the full budget, too: the text is then being copied
    (a quote, a loop, a list), and the next pass likely goes on copying, which averages over the generation miss
    (the default matrix's ngram: 1.25x with them alone against ~1.5x fixed at k 8, the difference all in outputs
    that loop). (Counting a proposal that came out smaller than allowed as the answer for every larger budget, as
    it is, biased those budgets low: the short proposals are the ones without a good match. Measured, ngram in
    int4 on the suite: 1.32-1.40 tokens per pass and 1.12-1.17x with it, 1.44 and 1.17-1.18x without.)"""

    def __init__(self, s: DecodeSettings, policy: str = "fixed", width: int = 1, stop_tokens=()):
        if policy not in POLICIES:
            raise ValueError(f"unknown draft-length policy '{policy}'; choose one of {', '.join(POLICIES)}")
        self.policy, self.k, self.width = policy, s.k, width
        self.k_max = max(s.k, HEURISTIC_K_MAX) if policy == "heuristic" else s.k
        self.budget = (s.tree_budget or s.k) if width > 1 else None
        self.min_prob = CONFIDENCE_THRESHOLD if policy == "confidence" else 0.0
        self.stop_tokens = frozenset(stop_tokens)
        # cost policy: per budget b (index b), the passes that answer for it and the tokens they would have yielded
        self.most = self.budget or self.k
        self.answered, self.yielded = [0] * (self.most + 1), [0] * (self.most + 1)
        self.costs: list[float] | None = None
        self.passes, self.answers, self.overhead = 0, 0, 0.0  # answers: the budgets the next pass answers for
        self.streak = False  # the last pass accepted every draft it verified
        self.shadows = False  # the proposer drafts in the shadow (bind)
        self.verify: int | None = None  # with shadows: how many of this pass's proposal's nodes it verifies
        self.pending: list[tuple[Tree, int, int]] = []  # whole proposals: (tree, its first token's index, answers)

    @property
    def max_nodes(self) -> int:
        return max(self.k_max, self.budget or 0)

    def bind(self, costs: list[float], shadows: bool = False) -> None:
        """The target's pass seconds by row count (costs[r - 1]: r rows) for the cost policy; shadows: the proposer
        drafts in the shadow (every pass drafts the full budget and verifies the chosen prefix, budget 0 included)."""
        self.costs, self.shadows = costs, shadows

    def chosen_budget(self) -> int:
        """The cost policy's budget for the next pass: the full one at first, after a pass that accepted every draft
        and every COST_EXPLORE_EVERY-th pass, else the b maximising (expected tokens with budget b: the prior and
        the passes that answered for b) / (seconds of a pass of b + 1 rows + the time a pass spends outside the
        forward); with shadows, b = 0 among them and no exploration passes (every pass answers for every budget)."""
        explore = self.passes == 0 or (not self.shadows and self.passes % COST_EXPLORE_EVERY == 0)
        if self.costs is None or self.streak or explore:
            return self.most
        best, best_rate = self.most, 0.0
        if self.shadows:  # budget 0: the last token alone, one token a pass
            best, best_rate = 0, 1.0 / (self.costs[0] + self.overhead)
        for b in range(1, self.most + 1):
            tokens = (self.yielded[b] + COST_PRIOR_PASSES * (1 + b)) / (self.answered[b] + COST_PRIOR_PASSES)
            rate = tokens / (self.costs[min(b, len(self.costs) - 1)] + self.overhead)
            if rate > best_rate:
                best, best_rate = b, rate
        return best

    def shape(self, room: int) -> Shape:
        """This step's shape when at most `room` more tokens may be drafted (the verify pass adds one)."""
        if self.policy == "cost":
            allowed = self.chosen_budget()
            drafted = self.most if self.shadows else allowed
            if self.width > 1:
                depth = min(self.k, room)
                budget = drafted if depth else 0
                # a tree cut short by the room left answers for no budget: its best-first order changes with depth
                self.answers = budget if depth == self.k else 0
            else:
                depth = budget = min(drafted, room)
                self.answers = depth
            self.verify = min(allowed, budget) if self.shadows else None
            return Shape(depth, budget, self.width, 0.0, self.stop_tokens)
        depth = min(self.k, room)
        budget = depth if self.budget is None or not depth else self.budget
        return Shape(depth, budget, self.width, self.min_prob, self.stop_tokens)

    def observe(self, accepted: int, proposed_depth: int, path: list[int] | None = None,
                overhead_s: float = 0.0) -> None:
        """One verify pass: `accepted` drafts of a proposal `proposed_depth` deep; the cost policy also reads the
        accepted node indices (`path`) and the seconds a pass spends outside the target's forward (drafting,
        acceptance, bookkeeping: the generation's mean so far), which every budget pays alike."""
        if self.policy == "heuristic":
            self.k = min(self.k + 2, self.k_max) if accepted == proposed_depth else max(1, self.k - 1)
        elif self.policy == "cost" and path is not None:
            self.passes += 1
            self.streak = 0 < accepted == proposed_depth
            self.overhead = overhead_s
            if self.verify is None:  # (with shadows the whole proposal answers, in settle)
                self.count(path, self.answers)

    def count(self, path: list[int], answers: int) -> None:
        """A proposal whose accepted path was `path` (node indices) answers for every budget up to `answers`: with
        budget b it would have yielded 1 + the path's leading nodes among the first b."""
        for b in range(1, answers + 1):
            lead = 0
            while lead < len(path) and path[lead] < b:
                lead += 1
            self.answered[b] += 1
            self.yielded[b] += 1 + lead

    def watch(self, tree: Tree, start: int) -> None:
        """This pass's whole proposal (of which it verifies the first `verify` nodes), its first token at
        committed[start]."""
        if self.answers:
            self.pending.append((tree, start, self.answers))

    def settle(self, committed: list[int]) -> None:
        """Score the watched proposals whose fate the committed tokens now decide: the path the tree rule would
        have taken through the whole proposal (tree.follow)."""
        waiting = []
        for tree, start, answers in self.pending:
            path, decided = follow(tree, committed[start:])
            if decided:
                self.count(path, answers)
                self.streak |= 0 < len(path) == tree.depth  # accepted whole: copying began, as after a pass
            else:
                waiting.append((tree, start, answers))
        self.pending = waiting


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


def count_draft(trace: Trace, forwards: int) -> None:
    trace.draft_passes += forwards
    trace.draft_units += forwards


class DraftModelProposer:
    """A same-vocabulary draft LM with its own KV cache. Chains keep the drafts they fed in the cache (the accepted
    ones are valid next step); tree nodes are fed one depth per forward with a tree mask and dropped afterwards.
    With temperature > 0 and draft_sampling 'sample', chains are sampled from the draft and carry q.

    `drafting` is `propose` as a generator of draft forwards: it yields (model, vocab, Pass) and receives that
    pass's logits, so batched decoding (speculative.draft_together) runs one draft pass per draft position for all
    live sequences that share the draft model; `propose` runs it alone."""

    needs_features = reads_prompt_logits = False

    def __init__(self, model, s: DecodeSettings, vocab: int | None = None):
        self.model, self.vocab = prepare_model(model), vocab
        self.sampled = not s.greedy and s.draft_sampling == "sample"
        self.settings = s

    def start(self, prompt_ids: list[int], generator=None, prompt_logits=None) -> None:
        self.cache, self.cached, self.generator = new_cache(self.model), 0, generator

    def propose(self, committed, feats, shape: Shape, trace: Trace) -> Proposal:
        return draft_alone(self.drafting(committed, feats, shape, trace))

    def draft_pass(self, ids: list[int], rows: int = 1, positions=None, attend=None):
        return self.model, self.vocab, Pass(ids, self.cache, rows, positions, attend)

    def drafting(self, committed, feats, shape: Shape, trace: Trace):
        n = len(committed)
        # feeds every committed token the cache lacks (usually the target's last token, two after a full accept)
        logits = yield self.draft_pass(committed[self.cached:])
        self.cached = n
        if self.sampled:
            return (yield from self.sample_chain(logits[0], shape, trace))
        slots: dict[int, int] = {}
        steps = grow_tree(top(logits, shape.width)[0], shape.budget, shape.width, shape.depth, shape.stop_tokens,
                          shape.min_prob)
        try:
            frontier, partial = next(steps)
            while True:
                cached = self.cache.get_seq_length()
                tree_mask = None if shape.width == 1 else path_attend(frontier, partial.parents, slots, n, cached)
                positions = [n - 1 + partial.depths[f] for f in frontier]
                out = yield self.draft_pass([partial.tokens[f] for f in frontier], len(frontier), positions,
                                            tree_mask)
                frontier, partial = steps.send(top(out, shape.width))
        except StopIteration as done:
            tree, expansions = done.value
        if shape.width == 1:
            self.cached = n + expansions  # every chain token but the last was fed
        else:
            rollback(self.cache, n)
        count_draft(trace, 1 + expansions)
        return Proposal(tree)

    def sample_chain(self, logits: torch.Tensor, shape: Shape, trace: Trace):
        tokens, q_rows = [], []
        for i in range(shape.depth):
            q = logits_to_probs(logits, self.settings)
            tokens.append(sample(q, self.generator))
            q_rows.append(q)
            if tokens[-1] in shape.stop_tokens or i == shape.depth - 1:
                break
            logits = (yield self.draft_pass(tokens[-1:]))[0]
        self.cached += len(tokens) - 1
        count_draft(trace, len(tokens))
        return Proposal(chain(tokens), torch.stack(q_rows))

    def observe(self, committed, proposal=None, logits=None) -> None:
        self.cached = min(self.cached, len(committed) - 1)  # drafts past the accepted prefix are stale
        rollback(self.cache, self.cached)


def draft_alone(drafting) -> Proposal:
    """Run a drafting generator (DraftModelProposer.drafting) one forward at a time; its Proposal."""
    return answer_steps(drafting, lambda request: forward_passes(request[0], [request[2]], request[1])[0][0])


class NgramProposer:
    """Prompt lookup (PLD): find the latest earlier occurrence of the sequence's last n tokens (n = ngram_max down
    to ngram_min) and propose the tokens that followed it, as a chain. The occurrences are indexed as tokens are
    committed (per n, each n-gram's latest end), so a lookup costs a few dict reads whatever the context's length:
    a numpy scan of the whole context per n (sliding windows) took ~0.17 ms a pass at 300 tokens, 3 % of an int4
    step, spent again on every pass without a match."""

    drafts_in_shadow = True  # propose only reads its tables (DraftLength may verify a prefix)
    needs_features = reads_prompt_logits = False

    def __init__(self, s: DecodeSettings, memory: dict | None = None):
        self.n_max, self.n_min = s.ngram_max, s.ngram_min

    def start(self, prompt_ids: list[int], generator=None, prompt_logits=None) -> None:
        self.history: list[int] = []
        # latest[n]: n-gram -> the index just past its latest occurrence that ends before the last token
        self.latest: dict[int, dict[tuple, int]] = {n: {} for n in range(self.n_min, self.n_max + 1)}

    def propose(self, committed, feats, shape: Shape, trace: Trace) -> Proposal:
        trace.draft_units += shape.depth
        return Proposal(chain(self.lookup(committed, shape.depth, shape.stop_tokens)))

    def lookup(self, committed, k: int, stop_tokens=()) -> list[int]:
        """The k tokens after the latest earlier occurrence of the context's last n tokens, longest n first; cut
        after a stop token."""
        history, indexed = self.history, len(self.history)
        history.extend(committed[indexed:])
        length = len(history)
        for end in range(max(indexed, 1), length):  # the n-grams ending before the last token, oldest first
            for n, latest in self.latest.items():
                if end >= n:
                    latest[tuple(history[end - n:end])] = end
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            start = self.latest[n].get(tuple(history[length - n:]))
            if start is not None:
                drafts = history[start:start + k]
                stop_at = hit_eos(drafts, stop_tokens)
                return drafts[:stop_at + 1] if stop_at is not None else drafts
        return []

    def observe(self, committed, proposal=None, logits=None) -> None:
        pass


class EagleProposer:
    """EAGLE-style drafting. Draft position j holds the pair (feature F_j, token x_{j+1}); pairs built from the
    target's verified features are kept, pairs built from the draft's own predictions are dropped after each
    proposal (the next proposal feeds the verified ones)."""

    needs_features, reads_prompt_logits = True, False

    def __init__(self, drafter: Drafter):
        self.drafter, self.module = drafter, drafter.module
        self.device = drafter.lm_weight.device

    def start(self, prompt_ids: list[int], generator=None, prompt_logits=None) -> None:
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
    def propose(self, committed, feats, shape: Shape, trace: Trace) -> Proposal:
        n = len(committed) - 1  # verified features F_0 .. F_{n-1}; the last committed token x_n has none yet
        start = self.cached
        root = self.step(committed[start + 1:n + 1], feats[start:n], list(range(start, n)))[-1]
        self.cached = n
        predicted: dict[int, torch.Tensor] = {}  # node → its predicted feature (input of its children)
        slots: dict[int, int] = {}

        def expand(frontier, partial):
            cached = self.keys.shape[2]
            attend = None if shape.width == 1 else path_attend(frontier, partial.parents, slots, n, cached)
            inputs = torch.stack([predicted[partial.parents[f]] if partial.parents[f] >= 0 else root
                                  for f in frontier])
            out = self.step([partial.tokens[f] for f in frontier], inputs,
                            [n - 1 + partial.depths[f] for f in frontier], attend)
            for row, node in enumerate(frontier):
                predicted[node] = out[row]
            return top(out @ self.head_w.T, shape.width, self.ids)

        tree, expansions = build_tree(top(root[None] @ self.head_w.T, shape.width, self.ids)[0], expand,
                                      shape.budget, shape.width, shape.depth, shape.stop_tokens, shape.min_prob)
        self.keys, self.values = self.keys[:, :, :n], self.values[:, :, :n]
        count_draft(trace, 1 + expansions)
        return Proposal(tree)

    def observe(self, committed, proposal=None, logits=None) -> None:
        pass


class MedusaProposer:
    """Medusa: head i scores depth i from the last verified feature; one pass of all heads per proposal."""

    needs_features, reads_prompt_logits = True, False

    def __init__(self, drafter: Drafter):
        self.drafter, self.module = drafter, drafter.module

    def start(self, prompt_ids: list[int], generator=None, prompt_logits=None) -> None:
        self.ids, self.head_w = self.drafter.head(prompt_ids)

    @torch.inference_mode()
    def propose(self, committed, feats, shape: Shape, trace: Trace) -> Proposal:
        per_depth = top(self.module(feats[len(committed) - 2].float()) @ self.head_w.T, shape.width, self.ids)
        tree, _ = build_tree(per_depth[0], lambda frontier, partial: [per_depth[partial.depths[f]] for f in frontier],
                             shape.budget, shape.width, min(shape.depth, self.module.heads), shape.stop_tokens,
                             shape.min_prob)
        count_draft(trace, 1)
        return Proposal(tree)

    def observe(self, committed, proposal=None, logits=None) -> None:
        pass


class RecyclingProposer:
    """Token Recycling (Luo et al. 2024): an adjacency matrix [vocab × topk] holds, for each token, the target's
    top-k next tokens the last time it scored that token (from the prompt's logits and every verify pass's
    rows, accepted or not: the candidates are "recycled"); each step grows the static template
    (trainfree.recycling_template) from the last committed token through the matrix, and the target verifies the
    tree. The matrix is rebuilt per generation from what the job's other conversations taught (trainfree's
    memory rule; 8 + 4·topk bytes per learned row), stored sparse (trainfree.RecycledRows: 4·vocab bytes of index,
    4·topk per token seen)."""

    drafts_in_shadow = True  # propose only reads its tables (DraftLength may verify a prefix)
    needs_features = False
    reads_prompt_logits = True

    def __init__(self, s: DecodeSettings, memory: dict | None = None, scored: bool = False):
        self.topk, self.memory = s.recycle_topk, memory if memory is not None else {}
        # scored (the dynamic tree's): also keep each candidate's score, and tables keyed by more context
        # (CONTEXT_ORDERS, trainfree.ContextTable)
        self.scored = scored
        self.prompt_topk = self.topk  # the prefill hands start each prompt row's top-k only (decoding.RowsTop)

    def start(self, prompt_ids: list[int], generator=None, prompt_logits=None) -> None:
        # (the two tokens before each token or None, the tokens, their top-k rows, the rows' scores or None) this
        # generation saw
        self.learned: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        others = remember(self.memory, "recycling+scored" if self.scored else "recycling", prompt_ids, self.learned)
        vocab = prompt_logits.vocab if isinstance(prompt_logits, RowsTop) else prompt_logits.shape[-1]
        self.topk = min(self.topk, vocab)
        self.matrix = RecycledRows(vocab, self.topk, scored=self.scored)
        self.contexts = [ContextTable(vocab, self.topk, order) for order in CONTEXT_ORDERS] if self.scored else []
        chunks = [chunk for learned in others for chunk in learned]
        if chunks:  # one update over all of them, in order (a later row of a token wins): a job's generations
            # leave thousands of chunks, and one numpy call per chunk would cost more than the decoding's steps
            self.update(*(None if chunk[0] is None else np.concatenate(chunk) for chunk in zip(*chunks)))
        n = len(prompt_ids)
        before = [([-1, -1] + prompt_ids)[i:i + 2] for i in range(n)] if self.scored else None
        self.learn(prompt_ids, prompt_logits, before)
        self.seen = len(prompt_ids) + 1  # committed length at the next verify pass; its root is committed[seen - 1]

    def update(self, before: np.ndarray | None, tokens: np.ndarray, rows: np.ndarray, probs: np.ndarray | None
               ) -> None:
        self.matrix.update(tokens, rows, probs)
        for table in self.contexts:
            table.update(before, tokens, rows, probs)

    def learn(self, tokens: list[int], logits: torch.Tensor, before=None) -> None:
        """Learn each token's top-k (the rows of `logits`); before[i] (scored only): the two tokens before
        tokens[i] (-1: none)."""
        if isinstance(logits, RowsTop):  # the prefill's rows, reduced in the forward (prompt_topk)
            values, indices = logits.values[:, :self.topk], logits.indices[:, :self.topk]
        else:
            values, indices = top_k_rows(logits, self.topk)
        rows = indices.to(torch.int32).cpu().numpy()
        probs = None
        if self.scored:
            # the candidates' shares among the top-k: a score the dynamic tree calibrates, not the full softmax
            # (whose exp over the whole vocabulary would cost more per pass than all the drafting)
            probs = torch.softmax(values.float(), dim=-1).cpu().numpy()
        # the tokens before are kept only for the context tables
        context = np.asarray(before, dtype=np.int32).reshape(len(tokens), 2) if self.scored else None
        chunk = (context, np.asarray(tokens, dtype=np.int64), rows, probs)
        self.update(*chunk)
        self.learned.append(chunk)

    def propose(self, committed, feats, shape: Shape, trace: Trace) -> Proposal:
        tree = self.draft(committed, shape)
        trace.draft_units += len(tree)
        return Proposal(tree)

    def draft(self, committed, shape: Shape) -> Tree:
        # a chain (width 1, e.g. llama.cpp's draft hook) is the template's best path: rank 0 at every depth
        template = recycling_template(shape.budget, shape.depth, self.topk if shape.width > 1 else 1)
        return recycled_tree(self.matrix, committed[-1], template, shape.depth, shape.stop_tokens)

    def observe(self, committed, proposal, logits) -> None:
        tree, seen = proposal.tree, self.seen
        tokens = [committed[seen - 1]] + tree.tokens
        before = None
        if self.scored:  # a node's two tokens before: its parent's last one and its parent
            before = [(committed[seen - 3] if seen >= 3 else -1, committed[seen - 2] if seen >= 2 else -1)]
            for parent in tree.parents:
                before.append((before[parent + 1][1], tokens[parent + 1]))
        self.learn(tokens, logits, before)
        self.seen = len(committed)


def frequency_draft(conts: list[list[int]], shape: Shape) -> Tree:
    """The continuations' trie cut to the shape's `budget` most frequent nodes, or for a chain (width 1, e.g.
    llama.cpp's draft hook) its most frequent path."""
    if shape.width > 1:
        return frequency_tree(conts, shape.budget, shape.stop_tokens)
    return frequency_chain(conts, shape.depth, shape.stop_tokens)


SUFFIX_MAX_MATCH = 32      # longest context suffix matched (longer matches add no information here)
SUFFIX_DEPTH_PER_MATCH = 2  # speculation depth <= this × match length (SuffixDecoding's α): short matches guess less
SUFFIX_MAX_HITS = 64       # continuations per source: the latest matches


class SuffixProposer:
    """SuffixDecoding (Oliaro et al. 2024) / SAMD (Hu et al. 2024): the longest suffix of the context that occurs
    in the prompt, the output so far, or earlier outputs of the job's other conversations (trainfree's memory
    rule; at most MEMORY_TOKENS tokens kept), and the trie of what followed its occurrences, cut to the
    `budget` most frequent nodes; the draft reaches SUFFIX_DEPTH_PER_MATCH × the match length deep (up to k)."""

    drafts_in_shadow = True  # propose only reads its tables (DraftLength may verify a prefix)
    needs_features = reads_prompt_logits = False

    def __init__(self, s: DecodeSettings, memory: dict | None = None):
        self.capacity, self.memory = s.max_new_tokens + s.k + 1, memory if memory is not None else {}

    def start(self, prompt_ids: list[int], generator=None, prompt_logits=None) -> None:
        self.history = np.zeros(len(prompt_ids) + self.capacity, dtype=np.int64)
        self.history[:len(prompt_ids)] = prompt_ids
        self.filled = len(prompt_ids)
        self.output = {"tokens": self.history, "start": len(prompt_ids), "end": len(prompt_ids)}
        others, kept = [], 0
        for out in reversed(remember(self.memory, "suffix", prompt_ids, self.output)):
            kept += out["end"] - out["start"]
            if kept > MEMORY_TOKENS:
                break
            others.append(out["tokens"][out["start"]:out["end"]])
        self.corpus = concatenate(others[::-1])

    def propose(self, committed, feats, shape: Shape, trace: Trace) -> Proposal:
        tree = self.draft(committed, shape)
        trace.draft_units += len(tree)
        return Proposal(tree)

    def draft(self, committed, shape: Shape) -> Tree:
        return frequency_draft(self.continuations(committed, shape.depth)[1], shape)

    def continuations(self, committed, depth: int) -> tuple[int, list[list[int]]]:
        """(the match length, what followed the longest match of the context's suffix in the history and the
        earlier outputs, up to min(depth, SUFFIX_DEPTH_PER_MATCH × the match length) tokens each)."""
        length = len(committed)
        self.history[self.filled:length] = committed[self.filled:]
        self.filled = self.output["end"] = length
        context = self.history[:length]
        own, own_ends = match_ends(self.history, context, SUFFIX_MAX_MATCH, before=length - 1)
        past, past_ends = match_ends(self.corpus, context, SUFFIX_MAX_MATCH)
        best = max(own, past)
        depth = min(depth, SUFFIX_DEPTH_PER_MATCH * best)
        conts = []
        if best and own == best:
            conts += continuations(self.history, own_ends[-SUFFIX_MAX_HITS:], depth, stop=length)
        if best and past == best:
            conts += continuations(self.corpus, past_ends[-SUFFIX_MAX_HITS:], depth)
        return best, conts

    def observe(self, committed, proposal=None, logits=None) -> None:
        pass


class SuffixRecyclingProposer:
    """Suffix matching, then Token Recycling in the rest of the node budget: one tree, the union of the suffix
    proposer's frequency tree and the recycling proposer's template tree (tree.merge: a path both propose is
    verified once; suffix nodes first, recycling's fill what is left of tree_budget). Copying methods win where
    the answer repeats its context (summarisation, RAG), Token Recycling where it does not (docs/train-free.md's
    per-category table); this proposes both in one verify pass. Each part keeps its own memory rule."""

    drafts_in_shadow = True  # propose only reads its tables (DraftLength may verify a prefix)
    needs_features = False
    reads_prompt_logits = True

    def __init__(self, s: DecodeSettings, memory: dict | None = None):
        memory = memory if memory is not None else {}
        self.suffix, self.recycling = SuffixProposer(s, memory), RecyclingProposer(s, memory)

    def start(self, prompt_ids: list[int], generator=None, prompt_logits=None) -> None:
        self.suffix.start(prompt_ids, generator, prompt_logits)
        self.recycling.start(prompt_ids, generator, prompt_logits)

    def propose(self, committed, feats, shape: Shape, trace: Trace) -> Proposal:
        tree = merge([self.suffix.draft(committed, shape), self.recycling.draft(committed, shape)], shape.budget)
        trace.draft_units += len(tree)
        return Proposal(tree)

    def observe(self, committed, proposal, logits) -> None:
        self.recycling.observe(committed, proposal, logits)  # learns every row of the merged tree


class DynamicTreeProposer:
    """Suffix matching and Token Recycling in one dynamic tree (EAGLE-2's best-first rule over model-free
    candidates). A node's children are the suffix trie's continuations under it (raw score: their share of the
    continuations through it, SuffixDecoding's), the top-k recycled after its last two tokens
    (trainfree.ContextTable: Token Recycling with more context) and the adjacency matrix's top-k after its
    token (raw score for both: the candidate's share of the target's top-k when it was recycled); a token the target
    has not scored in this job has the target's context-free row instead (memory['context_free'], the target's
    top-k after that token alone, datastore.load_context_free_rows), so no step is left without a draft.
    trainfree.Acceptance turns the raw scores into one estimate, the chance a candidate is accepted once its
    parent is, learned per source from every verified node whose parent the target accepted (a suffix score also
    by the length of the match it follows); a token several sources propose takes the highest. The tree holds the
    `budget` nodes with the highest path probability (trainfree.scored_tree): deep where the target has been
    predictable, wide where not. Memory rule as for its parts: the matrix, the context tables, the suffix memory and
    the acceptance counts of a generation serve only the job's other conversations. Memory per conversation: the
    matrix and its scores 4·vocab + 8·topk bytes per token seen, the context table 8·topk + 16 bytes per context
    (both sized to what the job taught: about 1 MiB in a 16-prompt queue), the suffix memory; for the job: the
    context-free rows (8·vocab·topk bytes, the target's own) and each generation's learned rows, 16 + 8·topk bytes
    per verified row."""

    drafts_in_shadow = True  # propose only reads its tables (DraftLength may verify a prefix)
    needs_features = False
    reads_prompt_logits = True
    # Acceptance sources: candidates recycled after one token (0), after each of CONTEXT_ORDERS (1..), context-free
    # rows, then suffix continuations by the match length they follow (a longer match is a likelier copy: 1, 2,
    # 3-4, 5-8, 9+ tokens)
    RECYCLED, CONTEXT_FREE, SUFFIX_MATCH_CLASSES = 0, 1 + len(CONTEXT_ORDERS), (1, 2, 3, 5, 9)

    def __init__(self, s: DecodeSettings, memory: dict | None = None):
        self.memory = memory if memory is not None else {}
        self.suffix = SuffixProposer(s, self.memory)
        self.recycling = RecyclingProposer(s, self.memory, scored=True)
        self.prompt_topk = self.recycling.prompt_topk

    def start(self, prompt_ids: list[int], generator=None, prompt_logits=None) -> None:
        self.suffix.start(prompt_ids, generator, prompt_logits)
        self.recycling.start(prompt_ids, generator, prompt_logits)
        # (rows, scores) [vocab, topk] or None (then a token with no matrix row has no recycled candidates)
        self.context_free = self.memory.get("context_free")
        sources = self.CONTEXT_FREE + 1 + len(self.SUFFIX_MATCH_CLASSES)
        self.acceptance, self.others = Acceptance(sources), Acceptance(sources)
        for counts in remember(self.memory, "acceptance", prompt_ids, self.acceptance):
            self.others.add(counts)
        self.infos: list[list] = []  # per node of the last proposal: its (source, raw score) pairs

    def propose(self, committed, feats, shape: Shape, trace: Trace) -> Proposal:
        match, conts = self.suffix.continuations(committed, shape.depth)
        trie = build_trie(conts, shape.stop_tokens)
        # after the recycled sources, by the match's class (bisect 1..; 0 = no match: no trie, nothing offered)
        suffix_source = self.CONTEXT_FREE + bisect.bisect_right(self.SUFFIX_MATCH_CLASSES, match)
        matrix, contexts = self.recycling.matrix, self.recycling.contexts
        context_free = self.context_free
        estimate = self.acceptance.estimator(self.others)

        def candidates(token: int, key: tuple) -> list:
            node, before = key  # the node's trie node (None: off the trie) and the two tokens before it
            found: dict[int, list] = {}  # token -> [probability, trie node or None, [(source, raw score), ...]]

            def offer(candidate: int, source: int, raw: float, child: int | None = None) -> None:
                p = estimate(source, raw)
                entry = found.get(candidate)
                if entry is None:
                    found[candidate] = [p, child, [(source, raw)]]
                else:
                    entry[0] = max(entry[0], p)
                    entry[2].append((source, raw))

            if node is not None:
                through = trie.count[node] if node >= 0 else trie.total
                for child_token, child in trie.children[node + 1].items():
                    offer(child_token, suffix_source, trie.count[child] / through, child)
            for source, table in enumerate(contexts, start=1):
                for candidate, raw in zip(*table.row(before, token)):
                    offer(candidate, source, raw)
            source, (row, scores) = self.RECYCLED, matrix.scored_row(token)
            if row[0] < 0 and context_free is not None:  # not scored in this job yet
                source, row, scores = self.CONTEXT_FREE, context_free[0][token], context_free[1][token]
            for candidate, raw in zip(row.tolist(), scores.tolist()):
                if candidate < 0:
                    break
                offer(candidate, source, raw)
            return [(t, p, (child, (before[1], token)), sources) for t, (p, child, sources) in found.items()]

        root_key = (-1 if trie.total else None, tuple(([-1, -1] + committed[-3:-1])[-2:]))
        tree, infos, _ = scored_tree(candidates, committed[-1], shape.budget, shape.depth, shape.stop_tokens,
                                     chain_only=shape.width == 1, root_key=root_key)
        self.infos = infos
        trace.draft_units += len(tree)
        return Proposal(tree)

    def observe(self, committed, proposal, logits) -> None:
        self.recycling.observe(committed, proposal, logits)  # learns every row of the tree
        tree = proposal.tree  # the verified nodes: the proposal, or its first nodes (DraftLength.verify)
        if len(self.infos) >= len(tree):
            # count the nodes whose parent the target accepted (given by greedy acceptance along the tree): the
            # estimate is the chance of acceptance once the parent is
            # the target's token after the root and each node: column 0 of the top-k rows just learned
            argmax = self.recycling.learned[-1][2][:, 0].tolist()
            accepted = []
            for token, parent, sources in zip(tree.tokens, tree.parents, self.infos):
                reached = parent < 0 or accepted[parent]
                accepted.append(reached and argmax[parent + 1] == token)
                if reached:
                    for source, raw in sources:
                        self.acceptance.record(source, raw, accepted[-1])
        self.infos = []


REST_MAX_MATCH = 16  # REST: longest context suffix looked up in the datastore
REST_MAX_HITS = 256  # occurrences whose continuations form the trie


class RestProposer:
    """REST (He et al. 2024): retrieval from a datastore (trainfree.Datastore, a suffix array over a token corpus,
    memory['datastore'], loaded by the runner): the continuations of the longest context suffix (up to
    REST_MAX_MATCH tokens) found in the corpus form a trie, of which the `budget` most frequent nodes are verified
    as a tree. The corpus is fixed for the job, so a repeat drafts exactly as the first run did."""

    drafts_in_shadow = True  # propose only reads its tables (DraftLength may verify a prefix)
    needs_features = reads_prompt_logits = False

    def __init__(self, s: DecodeSettings, memory: dict | None = None):
        if not memory or "datastore" not in memory:
            raise ValueError("the rest proposer needs a datastore (memory['datastore'], runner.load_datastore)")
        self.datastore = memory["datastore"]

    def start(self, prompt_ids: list[int], generator=None, prompt_logits=None) -> None:
        pass

    def propose(self, committed, feats, shape: Shape, trace: Trace) -> Proposal:
        _, conts = self.datastore.retrieve(committed[-REST_MAX_MATCH:], shape.depth, REST_MAX_MATCH,
                                           max_hits=REST_MAX_HITS)
        tree = frequency_draft(conts, shape)
        trace.draft_units += len(tree)
        return Proposal(tree)

    def observe(self, committed, proposal=None, logits=None) -> None:
        pass


class LookaheadProposer:
    """Lookahead decoding (Fu et al. 2024, LADE as in Spec-Bench): every verify pass also runs one Jacobi
    iteration of a window of W columns × N − 1 levels (trainfree.window_rows: extra rows nobody verifies), which
    yields W n-grams per pass for a pool keyed by first token (the latest G per key); the pool's n-grams that
    start with the last committed token are the guesses, merged into a trie (most recent first, cut to the
    `budget` nodes and depth k) and verified by the tree rule. A pass holds 1 + W(N − 1) − 1 + guess rows: with W
    5, N 3, G 3 at most 1 + 9 + 6 = 16. The window starts as W + N − 3 tokens drawn from the prompt (seeded),
    needs N − 2 passes to fill, and moves one position per pass; the pool lives for one generation, so repeats
    draft exactly as the first run did."""

    needs_features = reads_prompt_logits = False

    def __init__(self, s: DecodeSettings, memory: dict | None = None):
        self.w, self.n, self.g, self.seed = s.lookahead_window, s.lookahead_ngram, s.lookahead_guesses, s.seed
        self.max_extra_rows = self.w * (self.n - 1) - 1  # the full window; a filling one holds fewer rows

    def start(self, prompt_ids: list[int], generator=None, prompt_logits=None) -> None:
        rng = np.random.default_rng(self.seed)
        self.levels = [rng.choice(np.asarray(prompt_ids), self.w + self.n - 3).tolist()]
        self.pool: dict[int, list[tuple[int, ...]]] = {}

    def propose(self, committed, feats, shape: Shape, trace: Trace) -> Proposal:
        self.root = committed[-1]
        guesses = [list(gram[:shape.depth]) for gram in reversed(self.pool.get(self.root, ()))]
        tree = frequency_tree(guesses, shape.budget, shape.stop_tokens)
        tokens, depths, attend = window_rows(self.levels)
        trace.draft_units += len(tree)
        return Proposal(tree, extra=ExtraRows(tokens, depths, torch.from_numpy(attend)))

    def observe(self, committed, proposal, logits) -> None:
        if proposal.extra is None:  # the loop verified without asking (no room left to draft)
            return
        # the window's predictions are argmaxes at any temperature (LADE): they only decide what is guessed
        preds = argmax_rows(torch.cat([logits[:1], logits[len(proposal.tree) + 1:]])).tolist()
        self.levels, grams = advance_window(self.root, self.levels, preds, self.n)
        for key, gram in grams:
            add_ngram(self.pool, key, gram, self.g)


# Proposers that need no draft model: kind → class(settings, memory). `memory` is a dict that lives as long as the
# loaded pair (a job's prompts, a bench run), for proposers that learn across generations.
MODEL_FREE_PROPOSERS = {"ngram": NgramProposer, "recycling": RecyclingProposer, "suffix": SuffixProposer,
                        "rest": RestProposer, "lookahead": LookaheadProposer,
                        "suffix-recycling": SuffixRecyclingProposer, "dynamic-tree": DynamicTreeProposer}


def make_proposer(kind: str, s: DecodeSettings, draft_model=None, drafter: Drafter | None = None,
                  vocab: int | None = None, memory: dict | None = None):
    """The proposer a strategy names (strategies.Strategy.proposer): 'draft' is a trained drafter when one is
    given, else the draft model; the others are MODEL_FREE_PROPOSERS."""
    if kind in MODEL_FREE_PROPOSERS:
        return MODEL_FREE_PROPOSERS[kind](s, memory if memory is not None else {})
    if kind != "draft":
        raise ValueError(f"unknown proposer '{kind}'")
    if drafter is not None:
        return EagleProposer(drafter) if drafter.kind == "eagle" else MedusaProposer(drafter)
    if draft_model is None:
        raise ValueError("a draft proposer needs a draft model or a trained drafter")
    return DraftModelProposer(draft_model, s, vocab)
