"""transformers' own generate(), assisted generation and prompt lookup (strategies hf-*), run as reference peers.

Each is pinned to the same settings as our runners (fixed k, constant schedule, no confidence threshold; that
state lives on the assistant's generation_config and persists across calls, so it is reset before every run),
and instrumented with forward hooks so the same metrics come out: target/draft forward counts and times, and
the number of draft tokens the target was shown (from the verify passes' input lengths).
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from specdec.model.decoding import Clock, DecodeSettings, Trace


class FirstTokenTimer(BaseStreamer):
    """generate() calls put() with the prompt first, then with each batch of new tokens."""

    def __init__(self, clock: Clock):
        self.clock, self.calls, self.first_token_at = clock, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first_token_at is None:
            self.first_token_at = self.clock()

    def end(self):
        pass


class ForwardMeter:
    """Counts and times a model's top-level forward calls and records their input lengths."""

    def __init__(self, model, clock: Clock):
        self.clock, self.calls, self.seconds, self.input_lengths = clock, 0, 0.0, []
        self._started = 0.0
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.input_lengths.append(int(ids.shape[1]) if ids is not None else 0)
        self._started = self.clock()

    def _post(self, module, args, output):
        self.calls += 1
        self.seconds += self.clock() - self._started

    def remove(self):
        for handle in self.handles:
            handle.remove()


def generation_config(base: GenerationConfig, s: DecodeSettings, eos_ids: list[int], pad_id: int | None):
    cfg = copy.deepcopy(base)
    cfg.max_new_tokens, cfg.min_new_tokens, cfg.max_length = s.max_new_tokens, None, None
    cfg.do_sample = not s.greedy
    cfg.temperature = s.temperature if not s.greedy else None
    cfg.top_p = s.top_p if not s.greedy and s.top_p < 1.0 else None
    cfg.top_k = s.top_k if not s.greedy and s.top_k else None
    cfg.eos_token_id = eos_ids if s.stop_at_eos and eos_ids else None
    cfg.pad_token_id = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else None)
    cfg.repetition_penalty = None
    return cfg


def pin_assistant(assistant, s: DecodeSettings) -> None:
    """Fixed k, constant schedule, no early stop on confidence: the state the heuristic schedule mutates."""
    cfg = assistant.generation_config
    cfg.num_assistant_tokens = s.k
    cfg.num_assistant_tokens_schedule = "constant"
    cfg.assistant_confidence_threshold = 0.0


def strategy_config(strategy: str, target, s: DecodeSettings, eos_ids: list[int], draft=None,
                    pad_id: int | None = None) -> tuple[GenerationConfig, dict]:
    """generate()'s config and keyword arguments for one of transformers' strategies (hf-generate, hf-assisted
    with `draft` as the assistant, hf-ngram: prompt lookup at k)."""
    cfg = generation_config(target.generation_config, s, eos_ids, pad_id)
    kwargs = {}
    if strategy == "hf-assisted":
        pin_assistant(draft, s)
        kwargs["assistant_model"] = draft
    elif strategy == "hf-ngram":
        cfg.prompt_lookup_num_tokens = s.k
        cfg.max_matching_ngram_size = s.ngram_max
    return cfg, kwargs


def hf_decode(strategy: str, target, prompt_ids: list[int], s: DecodeSettings, eos_ids: list[int],
              draft=None, pad_id: int | None = None) -> Trace:
    clock = Clock(target.device)
    cfg, kwargs = strategy_config(strategy, target, s, eos_ids, draft, pad_id)
    target_meter = ForwardMeter(target, clock)
    draft_meter = ForwardMeter(draft, clock) if draft is not None else None
    timer = FirstTokenTimer(clock)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=target.device)
    torch.manual_seed(s.seed)
    try:
        start = clock()
        with torch.inference_mode():
            out = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=cfg,
                                  streamer=timer, **kwargs)
        end = clock()
    finally:
        target_meter.remove()
        if draft_meter:
            draft_meter.remove()
    tokens = out[0, len(prompt_ids):].tolist()
    trace = Trace(tokens=tokens, wall_s=end - start, ttft_s=(timer.first_token_at or end) - start,
                  target_passes=target_meter.calls, steps=max(0, target_meter.calls - 1), event_s=clock.event_s())
    trace.stop_reason = "eos" if s.stop_at_eos and tokens and tokens[-1] in eos_ids else "max_new_tokens"
    if strategy != "hf-generate":
        # Verify pass i sees the uncached tokens: the prompt (first pass) or the last token, plus the candidates.
        lengths = target_meter.input_lengths
        proposed = sum(lengths) - len(prompt_ids) - (len(lengths) - 1) if lengths else 0
        accepted = max(0, len(tokens) - target_meter.calls)
        trace.proposed_per_position, trace.accepted_per_position = [proposed], [accepted]
        trace.steps = target_meter.calls
        trace.verify_s = target_meter.seconds
        if draft_meter is not None:
            trace.draft_passes, trace.draft_s = draft_meter.calls, draft_meter.seconds
            trace.draft_units = draft_meter.calls
        else:  # prompt lookup: the drafting is the time not spent in the target
            trace.draft_s = max(0.0, trace.wall_s - target_meter.seconds)
            trace.draft_units = trace.steps * s.k
    return trace


def hf_decode_batch(strategy: str, target, prompts: list[list[int]], s: DecodeSettings, eos_ids: list[int],
                    batch_size: int, draft=None, pad_id: int | None = None) -> list[Trace]:
    """transformers' batched generate(), the peer of our batched decoding: the prompts in fixed blocks of
    `batch_size`, left-padded (a block waits for its slowest sequence: generate has no slots). Each Trace's
    wall_s and ttft_s are its block's. Assisted generation and prompt lookup refuse a batch above 1: that
    refusal (transformers' own error) is raised as it is."""
    clock = Clock(target.device)
    cfg, kwargs = strategy_config(strategy, target, s, eos_ids, draft, pad_id)
    pad = pad_id if pad_id is not None else eos_ids[0]
    cfg.pad_token_id = pad
    traces = []
    torch.manual_seed(s.seed)
    for at in range(0, len(prompts), batch_size):
        block = prompts[at:at + batch_size]
        width = max(len(p) for p in block)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in block], dtype=torch.long,
                                 device=target.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in block], dtype=torch.long,
                            device=target.device)
        meter, timer = ForwardMeter(target, clock), FirstTokenTimer(clock)
        try:
            start = clock()
            with torch.inference_mode():
                out = target.generate(input_ids, attention_mask=mask, generation_config=cfg, streamer=timer,
                                      **kwargs)
            end = clock()
        finally:
            meter.remove()
        for row in out[:, width:].tolist():
            tokens = trim_padding(row, set(eos_ids), pad, s.stop_at_eos)
            trace = Trace(tokens=tokens, wall_s=end - start, ttft_s=(timer.first_token_at or end) - start,
                          target_passes=meter.calls, steps=max(0, meter.calls - 1))
            trace.stop_reason = "eos" if s.stop_at_eos and tokens and tokens[-1] in eos_ids else "max_new_tokens"
            traces.append(trace)
    return traces


def trim_padding(row: list[int], eos_ids: set[int], pad: int, stop_at_eos: bool) -> list[int]:
    """A batched generate's row up to its sequence's end: through its first EOS (the rest is padding), else whole."""
    if stop_at_eos:
        for i, token in enumerate(row):
            if token in eos_ids:
                return row[:i + 1]
    return row
