"""The one draft-then-verify loop every speculative strategy of ours runs (proposers.py says who drafts).

Each step: the proposer drafts a tree within the shape the draft-length policy allows (a chain is a tree of width
1); the target verifies [last committed token] + tree in one forward (tree attention for trees, plain causal
for chains); verify.accept picks the accepted path and the next token; tree.keep_path keeps the accepted KV
entries in place (nothing is recomputed). The target's cache holds `committed[:-1]`: the last committed token
is the root of the next verify pass. When the proposer reads target features (EAGLE, Medusa), they come out of the
same verify forward, so they cost no extra target pass. A proposal may add rows that the pass computes but does
not verify (Proposal.extra: Lookahead's Jacobi window), after the tree: the proposer reads their logits in
observe, and keep_path drops their KV entries with the rejected nodes.

Per-position counts are by depth: a step "proposes" position d when its tree reaches depth d and "accepts" it when
the accepted path does, so for chains they are the usual counts and for trees α is the chance the path goes one
level deeper.

Batched decoding (`decode_slots`) runs the same steps for several sequences at once: a batch size is a number of
slots; every target pass holds each live sequence's rows (its prefill, or [root] + its own tree: ragged, an empty
draft is one row), each with its own cache, positions and mask (decoding.forward_passes); acceptance, the next
token and keep_path are per sequence, so each cache keeps exactly its accepted entries. When a sequence ends (EOS
or max tokens) the next prompt in the queue takes its slot in the next pass. Each sequence has its own proposer
(and generator, seeded as it would be alone), so with row-independent kernels its output is the one it gets alone.
Draft models draft for all live sequences in one draft pass per draft position (draft_together); other proposers
(n-gram tables, trees, EAGLE/Medusa heads) draft per sequence.
`baseline` at a batch size runs the same slots with no proposer: one row per sequence per pass.
"""


from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from specdec.model.decoding import (Clock, DecodeSettings, Pass, RowsTop, Trace, forward_passes, hit_eos,
                                    make_generator, new_cache, pass_costs, select_token)
from specdec.model.kernels import prepare_model
from specdec.methods.proposers import DraftLength, Proposal
from specdec.methods.tree import Tree, first_nodes, keep_path, tree_pass
from specdec.methods.verify import accept


def speculative_decode(target, prompt_ids: list[int], s: DecodeSettings, eos_ids: set[int], proposer,
                       length: DraftLength, vocab: int | None = None) -> Trace:
    """Lossless speculative decoding of `prompt_ids` with `proposer` under the draft-length policy `length`.
    vocab: the logit rows target and draft share (None: all)."""
    return decode_slots(target, [Request(prompt_ids, proposer, length)], s, eos_ids, vocab, slots=1)[0]


@dataclass
class Request:
    """One prompt of a batched decode with its own proposer (None: plain decoding) and draft-length policy."""
    prompt_ids: list[int]
    proposer: object = None
    length: DraftLength | None = None


class Generation:
    """One sequence in flight: its cache, committed tokens, proposer and trace. The target's cache holds
    `committed[:-1]`; `next_pass` says what the sequence needs from the next target pass, `take` reads its
    share of that pass."""

    def __init__(self, target, request: Request, s: DecodeSettings, eos_ids: set[int], clock: Clock):
        self.s, self.eos_ids, self.clock = s, eos_ids, clock
        self.proposer, self.length = request.proposer, request.length
        self.prompt_ids = list(request.prompt_ids)
        self.generator = make_generator(s, target.device)
        k_max = self.length.k_max if self.length else 0
        self.trace = Trace(proposed_per_position=[0] * k_max, accepted_per_position=[0] * k_max)
        self.features = bool(self.proposer is not None and self.proposer.needs_features)
        self.start = clock()
        self.start_event = clock.last  # CUDA: this request's span by events (a batch's requests share the clock)
        n_prompt = len(self.prompt_ids)
        # + one proposal's nodes (and extra rows) before they are dropped
        extra_rows = getattr(self.proposer, "max_extra_rows", 0) if self.proposer is not None else 0
        self.room = n_prompt + s.max_new_tokens + (self.length.max_nodes if self.length else 0) + extra_rows + 2
        self.cache = new_cache(target, self.room)
        self.committed: list[int] = []
        self.feats = None
        self.done = False
        self.proposal = self.before = None
        self.t_draft = 0.0

    def next_pass(self):
        """A generator: yields the draft forwards this step's proposer needs as (model, vocab, Pass) (a draft
        model's; draft_together runs them batched across sequences) and receives their logits; returns the
        target Pass this sequence needs next."""
        if not self.committed:  # the prefill
            reads = self.proposer is not None and self.proposer.reads_prompt_logits
            rows = len(self.prompt_ids) if reads else 1
            # a proposer that learns only each row's top-k gets just that (decoding.RowsTop), not [rows, vocab]
            topk = getattr(self.proposer, "prompt_topk", 0) if reads else 0
            return Pass(self.prompt_ids, self.cache, rows, hidden=self.features, topk=topk)
        if self.proposer is None:
            self.proposal = Proposal(Tree())
            return Pass([self.committed[-1]], self.cache)
        shape = self.length.shape(self.s.max_new_tokens - (len(self.committed) - len(self.prompt_ids)) - 1)
        t0 = self.clock()
        if shape.depth == 0:
            self.proposal = Proposal(Tree())
        elif hasattr(self.proposer, "drafting"):
            self.proposal = yield from self.proposer.drafting(self.committed, self.feats, shape, self.trace)
        else:
            self.proposal = self.proposer.propose(self.committed, self.feats, shape, self.trace)
        if self.length.verify is not None:  # the cost policy with shadows: verify a prefix, score the whole later
            self.length.watch(self.proposal.tree, len(self.committed))
            self.proposal = Proposal(first_nodes(self.proposal.tree, self.length.verify))
        self.t_draft = self.clock() - t0  # batched drafting: the wall time of the shared draft passes
        self.before = len(self.committed) - 1  # the root's slot in the target's cache
        return tree_pass(self.committed[-1], self.proposal.tree, self.cache, self.features, self.proposal.extra)

    def take(self, logits: torch.Tensor, hidden: torch.Tensor | None, forward_s: float) -> None:
        """Read this sequence's rows of the pass that just ran (forward_s: that pass's time)."""
        if not self.committed:
            self._prefilled(logits, hidden)
        else:
            self._verified(logits, hidden, forward_s)
        if not self.done and len(self.committed) - len(self.prompt_ids) >= self.s.max_new_tokens:
            self.done = True
        if self.done:
            self.trace.wall_s = self.clock() - self.start
            self.trace.event_s = self.clock.event_s(self.start_event)
            self.trace.tokens = self.committed[len(self.prompt_ids):]

    def _prefilled(self, logits, hidden) -> None:
        s, n_prompt = self.s, len(self.prompt_ids)
        token = select_token((logits.last if isinstance(logits, RowsTop) else logits)[-1], s, self.generator)
        self.trace.ttft_s = self.clock() - self.start
        self.trace.target_passes = 1
        self.committed = self.prompt_ids + [token]
        if self.features:  # feats[i] = the target's final hidden state at committed[i]
            self.feats = hidden.new_empty(self.room, hidden.shape[-1])
            self.feats[:n_prompt] = hidden
        if self.proposer is not None:
            self.proposer.start(self.prompt_ids, self.generator, logits if self.proposer.reads_prompt_logits else None)
        if s.stop_at_eos and token in self.eos_ids:
            self.done, self.trace.stop_reason = True, "eos"

    def _verified(self, logits, hidden, forward_s: float) -> None:
        s, trace, proposal = self.s, self.trace, self.proposal
        if self.proposer is None:  # plain decoding: one row, no acceptance
            token = select_token(logits[-1], s, self.generator)
            trace.target_passes += 1
            trace.steps += 1
            self._commit([token])
            return
        t_forward = self.clock()
        path, token = accept(logits[:len(proposal.tree) + 1], proposal.tree, proposal.q, s, self.generator)
        t2 = self.clock()
        keep_path(self.cache, self.before, path)
        if self.features:
            rows = torch.tensor([0] + [i + 1 for i in path], device=hidden.device)
            self.feats[self.before:self.before + len(rows)] = hidden.index_select(0, rows)
        trace.draft_s += self.t_draft
        trace.verify_s += forward_s + (t2 - t_forward)
        trace.accept_s += t2 - t_forward
        trace.count_step(proposal.tree.depth, len(path))
        self._commit([proposal.tree.tokens[i] for i in path] + [token])
        self.proposer.observe(self.committed, proposal, logits)
        self.length.observe(len(path), proposal.tree.depth, path if proposal.extra is None else None,
                            (trace.draft_s + trace.accept_s + trace.rollback_s) / trace.steps)
        if self.length.pending:
            self.length.settle(self.committed)
        trace.rollback_s += self.clock() - t2  # KV compaction, proposer catch-up and bookkeeping

    def _commit(self, new: list[int]) -> None:
        eos_at = hit_eos(new, self.eos_ids) if self.s.stop_at_eos else None
        if eos_at is not None:
            new, self.done, self.trace.stop_reason = new[:eos_at + 1], True, "eos"
        self.committed.extend(new)


def decode_slots(target, requests: Iterable[Request], s: DecodeSettings, eos_ids: set[int], vocab: int | None = None,
                 slots: int = 1, on_pass=None) -> list[Trace]:
    """Decode every request with `slots` sequences in flight: one target pass per step holds every live
    sequence's rows; a finished sequence's slot goes to the next request at once (no slot waits for the slowest).
    Returns one Trace per request, in order; each Trace's ttft_s and wall_s count from the request's admission.
    Requests are taken from the iterable as slots free up: given a generator, a request (its proposer's tables,
    its caches) exists only while it is in flight, so a queue's memory is that of `slots` sequences, not of the
    whole queue (a dynamic-tree conversation's tables: about 1 MiB in a 16-prompt queue). on_pass(rows per
    sequence): called after each target pass (tests, bench)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    prepare_model(target)  # before inference mode: it swaps modules and copies parameters
    traces: dict[int, Trace] = {}
    with torch.inference_mode():
        clock = Clock(target.device)
        # not enumerate(): it keeps its last (index, request) tuple for reuse, so the last request taken would
        # outlive its generation
        queue, live, taken = iter(requests), [], 0
        waiting = True
        while waiting or live:
            while waiting and len(live) < slots:
                request = next(queue, None)
                if request is None:
                    waiting = False
                    break
                if slots == 1 and request.length is not None and request.length.policy == "cost":
                    # one sequence: the pass times of its own passes, measured once per model (a batch's
                    # passes share rows with other sequences: there the policy keeps its full budget)
                    request.length.bind(pass_costs(target, request.length.max_nodes + 1),
                                        shadows=getattr(request.proposer, "drafts_in_shadow", False))
                live.append((taken, Generation(target, request, s, eos_ids, clock)))
                taken += 1
                del request  # the Generation holds what it needs of it; once it ends, nothing does
            if not live:
                break
            passes = draft_together([g.next_pass() for _, g in live])
            t0 = clock()
            outs = forward_passes(target, passes, vocab)
            forward_s = clock() - t0
            if on_pass is not None:
                on_pass([len(p.ids) for p in passes])
            live = take_pass(live, outs, forward_s, traces)
    return [traces[i] for i in range(len(traces))]


def take_pass(live: list, outs: list, forward_s: float, traces: dict) -> list:
    """Each live sequence reads its share of the pass; the finished ones leave their Trace in `traces` and are
    dropped (in a function of its own, so no loop variable keeps a finished Generation alive)."""
    for (index, g), (logits, hidden) in zip(live, outs):
        g.take(logits, hidden, forward_s)
        if g.done:
            traces[index] = g.trace
    return [(index, g) for index, g in live if not g.done]


def draft_together(steps: list) -> list[Pass]:
    """Drive every live sequence's next_pass generator to its target Pass. Draft forwards they yield run together:
    each round, one forward_passes call per draft model holds every sequence waiting on that model (one draft pass
    per draft position for all live sequences; each sequence its own cache, rows and mask)."""
    targets: list[Pass | None] = [None] * len(steps)
    waiting: dict[int, tuple] = {}

    def advance(i: int, sent) -> None:
        try:
            waiting[i] = steps[i].send(sent)
        except StopIteration as done:
            targets[i] = done.value

    for i in range(len(steps)):
        advance(i, None)
    while waiting:
        groups: dict[tuple, list[int]] = {}
        for i, (model, vocab, _) in waiting.items():
            groups.setdefault((id(model), vocab), []).append(i)
        for members in groups.values():
            model, vocab, _ = waiting[members[0]]
            outs = forward_passes(model, [waiting.pop(i)[2] for i in members], vocab)
            for i, (logits, _) in zip(members, outs):
                advance(i, logits)
    return targets
