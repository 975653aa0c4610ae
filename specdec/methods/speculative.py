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
"""

from __future__ import annotations

import torch

from specdec.model.decoding import (Clock, DecodeSettings, Trace, forward, hit_eos, make_generator, new_cache,
                              select_token)
from specdec.model.kernels import prepare_model
from specdec.methods.proposers import DraftLength, Proposal
from specdec.methods.tree import Tree, forward_tree, keep_path
from specdec.methods.verify import accept


def speculative_decode(target, prompt_ids: list[int], s: DecodeSettings, eos_ids: set[int], proposer,
                       length: DraftLength, vocab: int | None = None) -> Trace:
    """Lossless speculative decoding of `prompt_ids` with `proposer` under the draft-length policy `length`.
    vocab: the logit rows target and draft share (None: all)."""
    prepare_model(target)  # before inference mode: it swaps modules and copies parameters
    with torch.inference_mode():
        clock, generator = Clock(target.device), make_generator(s, target.device)
        trace = Trace(proposed_per_position=[0] * length.k_max, accepted_per_position=[0] * length.k_max)
        features = proposer.needs_features
        start = clock()
        n_prompt = len(prompt_ids)
        # + one proposal's nodes (and extra rows) before they are dropped
        room = n_prompt + s.max_new_tokens + length.max_nodes + getattr(proposer, "max_extra_rows", 0) + 2
        cache = new_cache(target, room)
        rows = n_prompt if proposer.reads_prompt_logits else 1
        logits, hidden = forward(target, prompt_ids, cache, rows, vocab, hidden=features)
        token = select_token(logits[-1], s, generator)
        trace.ttft_s = clock() - start
        trace.target_passes = 1
        committed = list(prompt_ids) + [token]
        feats = None
        if features:  # feats[i] = the target's final hidden state at committed[i]
            feats = hidden.new_empty(room, hidden.shape[-1])
            feats[:n_prompt] = hidden
        proposer.start(prompt_ids, generator, logits if proposer.reads_prompt_logits else None)
        done = s.stop_at_eos and token in eos_ids
        if done:
            trace.stop_reason = "eos"
        while not done and len(committed) - n_prompt < s.max_new_tokens:
            shape = length.shape(s.max_new_tokens - (len(committed) - n_prompt) - 1)
            t0 = clock()
            proposal = proposer.propose(committed, feats, shape, trace) if shape.depth > 0 else Proposal(Tree())
            t1 = clock()
            before = len(committed) - 1  # the root's slot in the target's cache
            logits, hidden = forward_tree(target, committed[-1], proposal.tree, cache, vocab, features,
                                          proposal.extra)
            t_forward = clock()
            path, token = accept(logits[:len(proposal.tree) + 1], proposal.tree, proposal.q, s, generator)
            t2 = clock()
            keep_path(cache, before, path)
            if features:
                rows = torch.tensor([0] + [i + 1 for i in path], device=hidden.device)
                feats[before:before + len(rows)] = hidden.index_select(0, rows)
            trace.draft_s += t1 - t0
            trace.verify_s += t2 - t1
            trace.accept_s += t2 - t_forward
            trace.count_step(proposal.tree.depth, len(path))
            new = [proposal.tree.tokens[i] for i in path] + [token]
            eos_at = hit_eos(new, eos_ids) if s.stop_at_eos else None
            if eos_at is not None:
                new, done, trace.stop_reason = new[:eos_at + 1], True, "eos"
            committed.extend(new)
            proposer.observe(committed, proposal, logits)
            length.observe(len(path), proposal.tree.depth)
            trace.rollback_s += clock() - t2  # KV compaction, proposer catch-up and bookkeeping
        trace.wall_s = clock() - start
        trace.tokens = committed[n_prompt:]
        return trace
