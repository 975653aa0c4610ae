"""Decoding loops: autoregressive baseline and lossless speculative decoding (draft model or n-gram lookup).

Flat functions in the spirit of gpt-fast's generate.py. Conventions shared by every loop:

* `committed` is the list of token ids accepted so far (prompt + generated). A model's KV cache always holds
  exactly `committed[:n]` for some n it tracks; each forward feeds the tokens the cache has not seen yet.
* The target's cache holds `committed[:-1]`: the last committed token is the one the next verify pass starts
  from, so a verify pass of k drafts is one forward over k + 1 tokens.
* After a rejection the caches are cropped (transformers' `DynamicCache.crop`) to the accepted prefix; nothing
  is recomputed.
* temperature == 0 means greedy: accept while the target's argmax equals the draft, then take the target's
  argmax, so the output is token-identical to the greedy baseline. temperature > 0 uses exact speculative
  sampling (Leviathan et al. 2022 / Chen et al. 2023): accept draft x with probability min(1, p(x)/q(x)),
  otherwise sample from normalise(max(0, p - q)); when all drafts are accepted sample a bonus token from p.
  A deterministic proposal (greedy draft, n-gram lookup) is a one-hot q, for which the same rule is exact.

Speed (see `specdec bench`): both loops first call `prepare_model`, which on a CPU with float32 weights sends the
output head through oneDNN (a 5-row head pass: 14-18 ms instead of MKL's 25 ms on a Xeon), lets verify passes share
KV heads in attention, and picks the decoder linear kernels per CPU (`linear_kernels`): on AMD, pre-packed oneDNN
weights (a 1-token step of SmolLM2-135M 76 -> 38 ms on a 2-core EPYC, where MKL's small-matrix paths are slow); on
Intel, MKL itself (1-row products 1.2-1.9x faster than packed oneDNN on a Sapphire Rapids Xeon, 5-row ones on par).
KV caches are pre-allocated buffers (`GrowingLayer`): a step writes in place instead of concatenating the whole
cache, and a rollback is a length change.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class DecodeSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    k: int = 4                      # draft length: tokens proposed per target verify pass
    draft_sampling: str = "greedy"  # with temperature > 0: draft proposes its argmax ('greedy') or samples ('sample')
    seed: int = 0
    use_cache: bool = True          # baseline only: False re-encodes the whole sequence every step
    stop_at_eos: bool = True
    ngram_max: int = 3              # prompt lookup: longest suffix n-gram searched for, then shorter ones
    ngram_min: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


class PackedLinear(torch.nn.Module):
    """A float32 nn.Linear whose weight is stored only in oneDNN's pre-packed layout (no dense copy is kept)."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int = 4):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The batch hint picks the blocking; 4 serves 1..9-row inputs (1-token steps and k+1-token verify passes).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), batch_hint)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy, for code that reads weights (not used by forward)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


class DenseOneDNNLinear(torch.nn.Module):
    """The output head through oneDNN on its own dense weight: the weight stays shared (tied to the input
    embedding in many models) and readable, so no second copy of the largest matrix is made."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias, "none", [],
                                               "")
        return y.reshape(*x.shape[:-1], self.out_features)


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """transformers' SDPA attention, except that a multi-token pass with a mask (a verify pass) lets SDPA share
    the key/value heads (enable_gqa) instead of materialising repeated copies of the whole KV cache per layer.
    Anything else goes to transformers' own function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (query.shape[2] == 1 or attention_mask is None or groups == 1 or dropout or kwargs.get("position_bias")
            is not None or kwargs.get("softcap") is not None or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model) -> None:
    """Switch a model that uses transformers' SDPA attention to `sdpa_gqa_attention` (same masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register("specdec_sdpa", sdpa_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("specdec_sdpa", sdpa_mask)
    model.set_attn_implementation("specdec_sdpa")


def fast_kernels_available(model) -> bool:
    param = next(model.parameters(), None)
    return (param is not None and param.device.type == "cpu" and param.dtype == torch.float32
            and type(param.detach()) is torch.Tensor  # not sharded (tensor-parallel DTensor) weights
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and getattr(model, "hf_device_map", None) is None)


LINEAR_KERNELS = ("auto", "mkl", "onednn")


def cpu_vendor() -> str:
    """The CPU vendor string from /proc/cpuinfo ('GenuineIntel', 'AuthenticAMD', ...), '' where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def linear_kernels() -> str:
    """Which kernels run the decoder's float32 linear layers on this CPU: 'mkl' (transformers' stock nn.Linear)
    or 'onednn' (PackedLinear). $SPECDEC_CPU_LINEAR=mkl|onednn overrides the choice; 'auto' (the default) picks
    MKL on Intel CPUs and pre-packed oneDNN elsewhere, from measurements on both (module docstring, README)."""
    choice = os.environ.get("SPECDEC_CPU_LINEAR", "auto").strip().lower() or "auto"
    if choice not in LINEAR_KERNELS:
        raise ValueError(f"SPECDEC_CPU_LINEAR must be one of {', '.join(LINEAR_KERNELS)}, got '{choice}'")
    if choice != "auto":
        return choice
    if not torch.backends.mkl.is_available():
        return "onednn"
    return "mkl" if cpu_vendor() == "GenuineIntel" else "onednn"


def prepare_model(model, linear: str | None = None):
    """Make `model` fast for our decoding loops, in place and once (later calls return at once).

    On a CPU with float32 weights: the output head becomes a DenseOneDNNLinear, SDPA attention becomes
    `sdpa_gqa_attention`, and with `linear` == 'onednn' (default: `linear_kernels()`) every other linear layer
    becomes a PackedLinear (its dense weight is freed, so memory does not grow); with 'mkl' they stay as they
    are. Elsewhere (GPU, float16, float64, accelerate device maps, tensor parallelism) the model is left as it
    is. Outputs agree with the stock layers to float32 rounding (another summation order).
    Call it on any model a new decoding loop runs on; prepared models still work with transformers' generate().
    """
    if getattr(model, "_specdec_prepared", False):
        return model
    model._specdec_prepared = True
    if not fast_kernels_available(model):
        return model
    pack = (linear or linear_kernels()) == "onednn"
    use_gqa_attention(model)
    output = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    tied = embedding.weight if embedding is not None else None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child.weight.dtype != torch.float32:
                continue
            if child is output or child.weight is tied:
                setattr(parent, name, DenseOneDNNLinear(child))
            elif pack:
                setattr(parent, name, PackedLinear(child))
    # Weights loaded from safetensors are views of one memory-mapped file: while any of them lives, every page
    # of the file that was read stays resident. Copying the tensors into ordinary memory lets the mapping go,
    # so the model holds one copy of its weights.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
        for module in model.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None:
                    module._buffers[name] = buf.clone()
    return model


@torch.inference_mode()
def forward(model, ids: list[int], cache, n_logits: int = 1, vocab: int | None = None) -> torch.Tensor:
    """Logits for the last `n_logits` positions of `ids` ([n_logits, vocab], float32), extending `cache`."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=n_logits)
    logits = out.logits[0, -n_logits:]
    if vocab is not None:
        logits = logits[:, :vocab]
    return logits.float()


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
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    gen.manual_seed(s.seed)
    return gen


def hit_eos(tokens: list[int], eos_ids: set[int]) -> int | None:
    """Index of the first end-of-sequence token in `tokens`, or None."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return i
    return None


def prefill(model, prompt_ids: list[int], cache, s, generator, vocab=None) -> int:
    """Encode the prompt and choose the first new token (its latency is the time to first token)."""
    return select_token(forward(model, prompt_ids, cache, 1, vocab)[0], s, generator)


def baseline_decode(model, prompt_ids: list[int], s: DecodeSettings, eos_ids: set[int]) -> Trace:
    """Plain autoregressive decoding: one target forward per token (with a KV cache unless use_cache=False)."""
    prepare_model(model)
    clock, generator = Clock(model.device), make_generator(s, model.device)
    trace = Trace()
    start = clock()
    cache = new_cache(model, len(prompt_ids) + s.max_new_tokens) if s.use_cache else None
    token = prefill(model, prompt_ids, cache, s, generator)
    trace.ttft_s = clock() - start
    trace.tokens, trace.target_passes = [token], 1
    while True:
        if s.stop_at_eos and token in eos_ids:
            trace.stop_reason = "eos"
            break
        if len(trace.tokens) >= s.max_new_tokens:
            break
        ids = [token] if s.use_cache else prompt_ids + trace.tokens
        token = select_token(forward(model, ids, cache, 1)[0], s, generator)
        trace.tokens.append(token)
        trace.target_passes += 1
    trace.wall_s = clock() - start
    trace.steps = trace.target_passes - 1
    return trace


def verify(target_logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
           s: DecodeSettings, generator: torch.Generator) -> tuple[int, int]:
    """Decide how many drafts the target accepts and the token that follows them.

    target_logits: [len(drafts) + 1, V], row i scores the position of drafts[i] (last row: the bonus position).
    draft_probs: [len(drafts), V] proposal distributions q, or None for deterministic proposals (one-hot q).
    Returns (number accepted, next token): the correction after a rejection, or the bonus token.
    """
    n = len(drafts)
    if s.greedy:
        predicted = target_logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < n and predicted[accepted] == drafts[accepted]:
            accepted += 1
        return accepted, predicted[accepted]
    p = logits_to_probs(target_logits, s)
    if n:
        idx = torch.tensor(drafts, device=p.device)
        rows = torch.arange(n, device=p.device)
        p_x = p[rows, idx]
        q_x = draft_probs[rows, idx] if draft_probs is not None else torch.ones_like(p_x)
        u = torch.rand(n, generator=generator, device=generator.device).to(p.device)
        rejected = (u * q_x >= p_x).tolist()  # accept iff u < p(x)/q(x), without dividing by q(x)
        for i, is_rejected in enumerate(rejected):
            if is_rejected:
                if draft_probs is not None:
                    residual = (p[i] - draft_probs[i]).clamp_min(0)
                else:
                    residual = p[i].clone()
                    residual[drafts[i]] = 0
                total = residual.sum()
                # total == 0 only when p == q, where rejection has probability 0; guard against rounding.
                residual = residual / total if total > 0 else p[i]
                return i, sample(residual, generator)
    return n, sample(p[n], generator)


@dataclass
class DraftModelState:
    """A draft model and its KV cache; `cached` is how many tokens the cache holds (a prefix of committed + drafts)."""
    model: object
    vocab: int | None = None
    cache: object = None
    cached: int = 0


def propose_with_draft(state: DraftModelState, committed: list[int], k: int, s: DecodeSettings,
                       generator, eos_ids: set[int], trace: Trace):
    """Draft up to k tokens autoregressively. Returns (tokens, q rows or None when proposals are deterministic).

    The first forward feeds every committed token the draft has not seen (usually the last accepted token, or
    two after a fully accepted block), so no separate catch-up pass is needed. The last draft token is never fed:
    if it is accepted it is caught up at the next step.
    """
    sampled = not s.greedy and s.draft_sampling == "sample"
    logits = forward(state.model, committed[state.cached:], state.cache, 1, state.vocab)[0]
    trace.draft_passes += 1
    trace.draft_units += 1
    tokens, q_rows = [], []
    for i in range(k):
        if sampled:
            q = logits_to_probs(logits, s)
            token = sample(q, generator)
            q_rows.append(q)
        else:
            token = int(logits.argmax())
        tokens.append(token)
        if token in eos_ids or i == k - 1:
            break
        logits = forward(state.model, [token], state.cache, 1, state.vocab)[0]
        trace.draft_passes += 1
        trace.draft_units += 1
    state.cached = len(committed) + len(tokens) - 1  # every draft token but the last has been fed
    return tokens, (torch.stack(q_rows) if sampled else None)


def propose_ngram(history: np.ndarray, length: int, k: int, s: DecodeSettings, eos_ids: set[int]) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n = ngram_max down to
    ngram_min) and propose the k tokens that followed it. Drafts stop after an end-of-sequence token."""
    seq = history[:length]
    for n in range(min(s.ngram_max, length - 1), s.ngram_min - 1, -1):
        suffix = seq[length - n:]
        # windows[i] = seq[i:i+n] for every start i whose window ends before the suffix itself
        windows = np.lib.stride_tricks.sliding_window_view(seq[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            drafts = seq[start:start + k].tolist()
            eos_at = hit_eos(drafts, eos_ids)
            return drafts[:eos_at + 1] if eos_at is not None else drafts
    return []


def speculative_decode(target, prompt_ids: list[int], s: DecodeSettings, eos_ids: set[int],
                       draft: DraftModelState | None = None, vocab: int | None = None) -> Trace:
    """Speculative decoding with a draft model (`draft`) or, when draft is None, n-gram prompt lookup."""
    prepare_model(target)
    if draft is not None:
        prepare_model(draft.model)
    clock, generator = Clock(target.device), make_generator(s, target.device)
    trace = Trace(proposed_per_position=[0] * s.k, accepted_per_position=[0] * s.k)
    start = clock()
    capacity = len(prompt_ids) + s.max_new_tokens + s.k + 1  # a verify pass may briefly hold k rejected drafts
    target_cache = new_cache(target, capacity)
    token = prefill(target, prompt_ids, target_cache, s, generator, vocab)
    trace.ttft_s = clock() - start
    trace.target_passes = 1
    committed = list(prompt_ids) + [token]
    n_prompt = len(prompt_ids)
    if draft is not None:
        draft.cache, draft.cached = new_cache(draft.model, capacity), 0
        history = None
    else:
        history = np.zeros(n_prompt + s.max_new_tokens + s.k + 1, dtype=np.int64)
        history[:len(committed)] = committed
    done = s.stop_at_eos and token in eos_ids
    if done:
        trace.stop_reason = "eos"
    while not done and len(committed) - n_prompt < s.max_new_tokens:
        remaining = s.max_new_tokens - (len(committed) - n_prompt)
        k = min(s.k, remaining - 1)  # never draft past max_new_tokens: the verify pass adds one more token
        t0 = clock()
        if k <= 0:
            drafts, q = [], None
        elif draft is not None:
            drafts, q = propose_with_draft(draft, committed, k, s, generator, eos_ids, trace)
        else:
            drafts, q = propose_ngram(history, len(committed), k, s, eos_ids), None
            trace.draft_units += k
        t1 = clock()
        logits = forward(target, [committed[-1]] + drafts, target_cache, len(drafts) + 1, vocab)
        t_forward = clock()
        accepted, token = verify(logits, drafts, q, s, generator)
        t2 = clock()
        trace.draft_s += t1 - t0
        trace.verify_s += t2 - t1
        trace.accept_s += t2 - t_forward
        trace.target_passes += 1
        trace.steps += 1
        for i in range(len(drafts)):
            trace.proposed_per_position[i] += 1
        for i in range(accepted):
            trace.accepted_per_position[i] += 1
        new = drafts[:accepted] + [token]
        eos_at = hit_eos(new, eos_ids) if s.stop_at_eos else None
        if eos_at is not None:
            new, done, trace.stop_reason = new[:eos_at + 1], True, "eos"
        before = len(committed)
        committed.extend(new)
        rollback(target_cache, before + accepted)  # the cache now holds committed[:-1]
        if draft is not None:
            draft.cached = min(draft.cached, before + accepted)
            rollback(draft.cache, draft.cached)
        else:
            history[before:len(committed)] = new
        trace.rollback_s += clock() - t2
    trace.wall_s = clock() - start
    trace.tokens = committed[n_prompt:]
    return trace
