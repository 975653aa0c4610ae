"""Decoding primitives and the autoregressive baseline; the speculative loop is speculative.py.

Flat functions in the spirit of gpt-fast's generate.py. Conventions shared by every loop:

* `committed` is the list of token ids accepted so far (prompt + generated). A model's KV cache always holds
  exactly `committed[:n]` for some n it tracks; each forward feeds the tokens the cache has not seen yet.
* KV caches are pre-allocated buffers (`GrowingLayer`): a step writes in place instead of concatenating the whole
  cache, and a rollback is a length change (later writes overwrite the rejected positions).
* temperature == 0 means greedy; otherwise tokens are sampled from the processed distribution
  (`logits_to_probs`: temperature, top-k, top-p).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, fields

import torch

from specdec import llama_forward
from specdec.kernels import prepare_model
from specdec.strategies import LOOKAHEAD_DEFAULTS


@dataclass
class DecodeSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    k: int = 4                      # draft length: the deepest draft position proposed per target verify pass
    tree_budget: int | None = None  # trees: draft nodes verified per pass (None: k)
    draft_sampling: str = "greedy"  # with temperature > 0: draft proposes its argmax ('greedy') or samples ('sample')
    seed: int = 0
    use_cache: bool = True          # baseline only: False re-encodes the whole sequence every step
    stop_at_eos: bool = True
    ngram_max: int = 3              # prompt lookup: longest suffix n-gram searched for, then shorter ones
    ngram_min: int = 1
    recycle_topk: int = 8           # recycling: candidates kept per token in the adjacency matrix
    rest_corpus: str | None = None  # rest: corpus file for the datastore (None: the target's own generations)
    # lookahead: W, the Jacobi window's columns (n-grams collected per pass); N, the n-gram size (the window has
    # N - 1 levels, guesses are N - 1 deep); G, n-grams kept per first token (all verified when it comes up)
    lookahead_window: int = LOOKAHEAD_DEFAULTS["lookahead_window"]
    lookahead_ngram: int = LOOKAHEAD_DEFAULTS["lookahead_ngram"]
    lookahead_guesses: int = LOOKAHEAD_DEFAULTS["lookahead_guesses"]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_mapping(cls, values) -> "DecodeSettings":
        """Settings from a dict or an argparse namespace, taking the keys named like fields (the CLI's --no-cache
        and --ignore-eos as their negations); missing or None keys keep the defaults."""
        get = values.get if isinstance(values, dict) else lambda key: getattr(values, key, None)
        given = {f.name: get(f.name) for f in fields(cls)}
        if get("no_cache") is not None:
            given["use_cache"] = not get("no_cache")
        if get("ignore_eos") is not None:
            given["stop_at_eos"] = not get("ignore_eos")
        return cls(**{key: value for key, value in given.items() if value is not None})


@dataclass
class Trace:
    """What one generation did; metrics.py turns it into a record."""
    tokens: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    wall_s: float = 0.0
    target_passes: int = 0
    draft_passes: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    steps: int = 0                  # verify passes after the prefill
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    stop_reason: str = "max_new_tokens"
    draft_units: int = 0            # forwards of the draft model, or proposal slots for model-free drafting
    accept_s: float = 0.0           # part of verify_s spent in the acceptance rule (after the target forward)
    rollback_s: float = 0.0         # cache cropping and bookkeeping after each verify pass

    def count_step(self, depth: int, accepted: int) -> None:
        """One verify pass: the proposal reached `depth` draft positions and the target accepted `accepted`."""
        self.target_passes += 1
        self.steps += 1
        for d in range(depth):
            self.proposed_per_position[d] += 1
        for d in range(accepted):
            self.accepted_per_position[d] += 1


class Clock:
    """perf_counter that waits for queued GPU work first, so a reading covers the kernels it claims to."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@functools.cache
def _growing_layer_class():
    """Defined on first use: importing transformers' cache module is deferred like every other transformers import."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A full-attention cache layer in a pre-allocated buffer that doubles when full.

        transformers' DynamicLayer concatenates the whole cache with the new keys on every forward (a copy of
        O(sequence) per layer per step); here a step writes its keys in place and `keys`/`values` are views of the
        filled prefix. Cropping only shortens the views: later writes overwrite the rejected positions.
        """

        def __init__(self, capacity: int = 256, **kwargs):
            super().__init__(**kwargs)
            self.capacity, self.length = capacity, 0
            self.key_buffer = self.value_buffer = None

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self.length = 0
            self.key_buffer = self.value_buffer = None

        def _reserve(self, needed: int, key_states, value_states) -> None:
            if self.key_buffer is not None and needed <= self.key_buffer.shape[-2]:
                return
            size = max(needed, self.capacity, 2 * (self.key_buffer.shape[-2] if self.key_buffer is not None else 0))
            grown = []
            for old, new in ((self.key_buffer, key_states), (self.value_buffer, value_states)):
                buf = new.new_empty(*new.shape[:-2], size, new.shape[-1])
                if old is not None:
                    buf[..., :self.length, :] = old[..., :self.length, :]
                grown.append(buf)
            self.key_buffer, self.value_buffer = grown

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            self._reserve(end, key_states, value_states)
            self.key_buffer[..., self.length:end, :] = key_states
            self.value_buffer[..., self.length:end, :] = value_states
            self.length = end
            self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:  # transformers' convention: a positive value is the length to keep
                tokens_to_remove = -max(0, self.length - tokens_to_remove)
            if tokens_to_remove == 0 or not self.is_initialized:
                return
            self.length = max(0, self.length + tokens_to_remove)
            self.keys = self.key_buffer[..., :self.length, :]
            self.values = self.value_buffer[..., :self.length, :]

        def reset(self) -> None:
            self.length = 0
            self.key_buffer = self.value_buffer = None
            super().reset()

    return GrowingLayer


def new_cache(model, capacity: int | None = None):
    """An empty KV cache for `model`: transformers' DynamicCache layout (sliding-window layers stay as they are)
    with every full-attention layer in a pre-allocated buffer of `capacity` positions (grown by doubling)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    growing = _growing_layer_class()
    cache.layers = [growing(capacity=capacity or 256) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def rollback(cache, keep: int) -> None:
    """Drop cached positions past `keep` (transformers >= 5 crops by a negative count)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def additive_mask(attend: torch.Tensor, dtype, device) -> torch.Tensor:
    """A bool [q, kv] "may attend" matrix as the 4-D additive float mask transformers passes through unchanged."""
    mask = torch.zeros(attend.shape, dtype=dtype, device=device)
    mask.masked_fill_(~attend.to(device), torch.finfo(dtype).min)
    return mask[None, None]


@torch.inference_mode()
def forward(model, ids: list[int], cache, rows: int = 1, vocab: int | None = None, positions: list[int] | None = None,
            attend: torch.Tensor | None = None, hidden: bool = False):
    """One forward of a causal LM over `ids`, extending `cache` (None: no cache).

    Returns (logits of the last `rows` positions as float32 [rows, vocab], the final hidden states of all `ids`
    [len(ids), hidden] when `hidden`, else None). positions: explicit position ids (default: after the cache);
    attend: bool [len(ids), cached + len(ids)] for tree attention (default: causal).
    """
    device = model.device
    extra = {}
    if attend is not None:
        extra["attention_mask"] = additive_mask(attend, model.dtype, device)
    own = getattr(model, "_specdec_own_forward", None) if cache is not None else None  # kernels.prepare_model
    if own is not None:
        logits, states = llama_forward.forward(own, ids, cache, rows, positions, extra.get("attention_mask"), hidden)
        return (logits if vocab is None else logits[:, :vocab]).float(), states
    if positions is not None:
        extra["position_ids"] = torch.tensor([positions], device=device)
    out = model(input_ids=torch.tensor([ids], dtype=torch.long, device=device), past_key_values=cache,
                use_cache=cache is not None, logits_to_keep=rows, output_hidden_states=hidden, **extra)
    logits = out.logits[0, -rows:]
    if vocab is not None:
        logits = logits[:, :vocab]
    return logits.float(), (out.hidden_states[-1][0] if hidden else None)


def logits_to_probs(logits: torch.Tensor, s: DecodeSettings) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) applied row-wise; the result is the distribution sampled from."""
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= s.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def select_token(logits: torch.Tensor, s: DecodeSettings, generator: torch.Generator) -> int:
    """Next token from one row of logits: argmax when greedy, else a sample from the processed distribution."""
    if s.greedy:
        return int(logits.argmax())
    return sample(logits_to_probs(logits, s), generator)


def make_generator(s: DecodeSettings, device) -> torch.Generator:
    device = torch.device(device)
    return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(s.seed)


def hit_eos(tokens: list[int], eos_ids: set[int]) -> int | None:
    """Index of the first end-of-sequence token in `tokens`, or None."""
    return next((i for i, tok in enumerate(tokens) if tok in eos_ids), None)


def baseline_decode(model, prompt_ids: list[int], s: DecodeSettings, eos_ids: set[int]) -> Trace:
    """Plain autoregressive decoding: one target forward per token (with a KV cache unless use_cache=False)."""
    prepare_model(model)
    clock, generator = Clock(model.device), make_generator(s, model.device)
    trace = Trace()
    start = clock()
    cache = new_cache(model, len(prompt_ids) + s.max_new_tokens) if s.use_cache else None
    token = select_token(forward(model, prompt_ids, cache)[0][0], s, generator)  # the prefill
    trace.ttft_s = clock() - start
    trace.tokens, trace.target_passes = [token], 1
    while True:
        if s.stop_at_eos and token in eos_ids:
            trace.stop_reason = "eos"
            break
        if len(trace.tokens) >= s.max_new_tokens:
            break
        ids = [token] if s.use_cache else prompt_ids + trace.tokens
        token = select_token(forward(model, ids, cache)[0][0], s, generator)
        trace.tokens.append(token)
        trace.target_passes += 1
    trace.wall_s = clock() - start
    trace.steps = trace.target_passes - 1
    return trace
