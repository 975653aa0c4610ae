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
import statistics
import time
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch

from specdec.model import kernels, llama_forward
from specdec.model.kernels import prepare_model
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
    event_s: float | None = None    # CUDA: the same span as wall_s timed by CUDA events (Clock.event_s); else None

    def count_step(self, depth: int, accepted: int) -> None:
        """One verify pass: the proposal reached `depth` draft positions and the target accepted `accepted`."""
        self.target_passes += 1
        self.steps += 1
        for d in range(depth):
            self.proposed_per_position[d] += 1
        for d in range(accepted):
            self.accepted_per_position[d] += 1


class Clock:
    """perf_counter that waits for queued GPU work first, so a reading covers the kernels it claims to.

    On CUDA each reading also records an event on the device's stream before synchronising (`last`): `event_s()`
    is the GPU's own time from the first reading, or from a given earlier reading's event, to the latest. Where
    the synchronisation is right, it agrees with the perf_counter difference (scripts/gpu-check.sh checks 5 %); a
    missing wait shows as a wall time shorter than the events'."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.first = self.last = None  # torch.cuda.Event of the first and the latest reading

    def __call__(self) -> float:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.first = event if self.first is None else self.first
            self.last = event
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def event_s(self, since=None) -> float | None:
        """CUDA-event seconds from `since` (the `last` of an earlier reading; default: the first reading) to the
        latest reading; None off CUDA or with no reading after it."""
        first = self.first if since is None else since
        if first is None or self.last is first:
            return None
        return first.elapsed_time(self.last) / 1000


class KVArena:
    """One buffer holding every full-attention layer's keys and values, [layers, 2, batch, kv_heads, capacity,
    head_dim] (GrowingLayer's slots), so that moving positions in all layers at once (tree.keep_path after a tree
    verify pass) is one gather and one copy instead of four per layer: 0.44 -> 0.02 ms per pass for SmolLM2's
    30 layers on 2 CPU cores. Allocated when the first layer writes; a layer that outgrows it or whose shape
    differs takes a buffer of its own (then moves go layer by layer, and the arena's memory goes with the last
    layer that leaves it)."""

    def __init__(self, layers: int, capacity: int):
        self.layers, self.capacity = layers, capacity
        self.tensor: torch.Tensor | None = None

    def slot(self, index: int, needed: int, states: torch.Tensor) -> torch.Tensor | None:
        """[2, *states.shape[:-2], capacity, head_dim]: layer `index`'s keys and values, or None (no room)."""
        if self.tensor is None:
            self.tensor = states.new_empty(self.layers, 2, *states.shape[:-2], max(needed, self.capacity),
                                           states.shape[-1])
        fits = (self.tensor.shape[2:-2] == states.shape[:-2] and self.tensor.shape[-1] == states.shape[-1]
                and self.tensor.shape[-2] >= needed and self.tensor.dtype == states.dtype
                and self.tensor.device == states.device)
        return self.tensor[index] if fits else None


@functools.cache
def _growing_layer_class():
    """Defined on first use: importing transformers' cache module is deferred like every other transformers import."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A full-attention cache layer in a pre-allocated buffer that doubles when full.

        transformers' DynamicLayer concatenates the whole cache with the new keys on every forward (a copy of
        O(sequence) per layer per step); here a step writes its keys in place and `keys`/`values` are views of the
        filled prefix, made when read (our forward writes and attends through the buffers and never reads them:
        two views per layer per pass and per crop were ~85 us a pass over SmolLM2's 30 layers, ~1.5 % of an int4
        step). Cropping only shortens the length: later writes overwrite the rejected positions. The first
        buffer is the layer's slot of the cache's KVArena, when there is one and it fits.
        """

        def __init__(self, capacity: int = 256, arena: KVArena | None = None, index: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.capacity, self.length = capacity, 0
            self.arena, self.index = arena, index
            self.key_buffer = self.value_buffer = None
            self.in_arena = False  # key_buffer and value_buffer are this layer's arena slot
            self.view_length = -1  # the length `keys` and `values` were last made for (-1: none)

        def fresh(self, name: str):
            """self.<name> (_keys or _values), made a view of the buffer's filled prefix when the length moved."""
            if getattr(self, "key_buffer", None) is not None and self.view_length != self.length:
                self.make_views()
            return getattr(self, name)

        keys = property(lambda self: self.fresh("_keys"), lambda self, value: setattr(self, "_keys", value))
        values = property(lambda self: self.fresh("_values"), lambda self, value: setattr(self, "_values", value))

        def make_views(self) -> None:
            self._keys = self.key_buffer.narrow(-2, 0, self.length)
            self._values = self.value_buffer.narrow(-2, 0, self.length)
            self.view_length = self.length

        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self.length = 0
            self.key_buffer = self.value_buffer = None
            self.in_arena = False
            self.view_length = -1

        def _reserve(self, needed: int, key_states, value_states) -> None:
            if self.key_buffer is not None and needed <= self.key_buffer.shape[-2]:
                return
            slot = self.arena.slot(self.index, needed, key_states) \
                if self.arena is not None and self.key_buffer is None else None
            self.view_length = -1  # new buffers: views of the old ones are stale
            if slot is not None:
                self.key_buffer, self.value_buffer = slot[0], slot[1]
                self.in_arena = True
                return
            if self.in_arena:  # outgrown: the arena is no longer every layer's, let it go with the last view
                self.arena.tensor = None
            size = max(needed, self.capacity, 2 * (self.key_buffer.shape[-2] if self.key_buffer is not None else 0))
            grown = []
            for old, new in ((self.key_buffer, key_states), (self.value_buffer, value_states)):
                buf = new.new_empty(*new.shape[:-2], size, new.shape[-1])
                if old is not None:
                    buf[..., :self.length, :] = old[..., :self.length, :]
                grown.append(buf)
            self.key_buffer, self.value_buffer = grown
            self.in_arena = False

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            rows = key_states.shape[-2]
            if self.key_buffer is None:  # the first write: a buffer shaped like these states
                self._reserve(self.length + rows, key_states, value_states)
            start = self.extend(rows)
            self.key_buffer[..., start:start + rows, :] = key_states
            self.value_buffer[..., start:start + rows, :] = value_states
            return self.keys, self.values

        def extend(self, rows: int) -> int | None:
            """Room for `rows` more positions that the caller writes into key_buffer and value_buffer itself
            (llama_forward's fused rotary + cache write + attention): their first position, or None where the
            layer has no buffer yet (its first write goes through update)."""
            if self.key_buffer is None or not self.is_initialized:
                return None
            start, end = self.length, self.length + rows  # update's writes come through here too
            self._reserve(end, self.key_buffer, self.value_buffer)
            self.length = end
            return start

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:  # transformers' convention: a positive value is the length to keep
                tokens_to_remove = -max(0, self.length - tokens_to_remove)
            if tokens_to_remove == 0 or not self.is_initialized:
                return
            self.length = max(0, self.length + tokens_to_remove)

        def reset(self) -> None:
            self.length = 0
            self.key_buffer = self.value_buffer = None
            self.in_arena = False
            self.view_length = -1
            if self.arena is not None:
                self.arena.tensor = None  # the next write allocates it again
            super().reset()

    return GrowingLayer


def new_cache(model, capacity: int | None = None):
    """An empty KV cache for `model`: transformers' DynamicCache layout (sliding-window layers stay as they are)
    with every full-attention layer in a pre-allocated buffer of `capacity` positions (grown by doubling)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    growing = _growing_layer_class()
    full = [i for i, layer in enumerate(cache.layers) if type(layer) is DynamicLayer]
    # no arena for a model spread over devices: it would sit on one of them with room for every layer
    spread = len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
    arena = None if spread else KVArena(len(full), capacity or 256)
    for index, i in enumerate(full):
        cache.layers[i] = growing(capacity=capacity or 256, arena=arena, index=index)
    return cache


def kv_arena(cache) -> torch.Tensor | None:
    """The cache's KVArena tensor when every layer of the cache lives in it at the same length, else None."""
    layers = cache.layers
    arena = getattr(layers[0], "arena", None) if layers else None
    if arena is None or arena.tensor is None or len(layers) != arena.layers:
        return None
    length = layers[0].length
    if all(getattr(layer, "in_arena", False) and layer.arena is arena and layer.length == length for layer in layers):
        return arena.tensor
    return None


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


@dataclass
class Pass:
    """One sequence's rows in a target forward: `ids` the cache has not seen, extending `cache`; logits for the last
    `rows` of them. positions: explicit position ids (default: after the cache); attend: bool [len(ids), cached +
    len(ids)] for tree attention (default: causal); hidden: also return the final hidden states of all `ids`."""
    ids: list[int]
    cache: object
    rows: int = 1
    positions: list[int] | None = None
    attend: torch.Tensor | None = None
    hidden: bool = False
    topk: int = 0  # > 0: the `rows` logit rows come as a RowsTop (each row's top-k, the last row in full)


class RowsTop(NamedTuple):
    """A pass's last `rows` logit rows reduced to each row's top-k (values float32 [rows, k] and indices
    [rows, k], best first, as top_k_rows gives them) with the last row in full (float32 [1, vocab]): what a
    proposer that learns from every prompt row reads (Pass.topk), without the [rows, vocab] matrix — prompt ×
    vocabulary floats per prefill (60 MB for a 300-token prompt of SmolLM2, 16 of them in one pass at batch 16;
    GBs for a 128k vocabulary). The head runs over the final hidden states in chunks of TOP_ROWS_CHUNK rows."""
    values: torch.Tensor
    indices: torch.Tensor
    last: torch.Tensor

    @property
    def vocab(self) -> int:
        return self.last.shape[-1]


TOP_ROWS_CHUNK = 64


@torch.inference_mode()
def forward(model, ids: list[int], cache, rows: int = 1, vocab: int | None = None, positions: list[int] | None = None,
            attend: torch.Tensor | None = None, hidden: bool = False):
    """One forward of a causal LM over `ids`, extending `cache` (None: no cache).

    Returns (logits of the last `rows` positions as float32 [rows, vocab], the final hidden states of all `ids`
    [len(ids), hidden] when `hidden`, else None). positions: explicit position ids (default: after the cache);
    attend: bool [len(ids), cached + len(ids)] for tree attention (default: causal).
    """
    return forward_passes(model, [Pass(ids, cache, rows, positions, attend, hidden)], vocab)[0]


@torch.inference_mode()
def forward_passes(model, passes: list[Pass],
                   vocab: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One target pass over several sequences' rows (batched decoding: each sequence its own cache, positions and
    mask) -> (logits float32 [rows, vocab], hidden or None) per Pass, as `forward` returns them for one.

    Our forward (kernels.prepare_model) runs them as one pass: every linear layer reads its weights once for all
    rows, attention runs per sequence over its own cache (vLLM's flattened batch, without padding). transformers'
    forward (other architectures, device maps, tensor parallelism) runs them one after another: correct, but not
    batched (docs/batching.md)."""
    if any(p.topk for p in passes):  # the rows' top-k from the final hidden states, the head in chunks
        outs = forward_passes(model, [replace(p, rows=1, hidden=True, topk=0) if p.topk else p for p in passes],
                              vocab)
        return [(rows_top(model, hidden[len(hidden) - p.rows:], p.topk, vocab, logits), hidden if p.hidden else None)
                if p.topk else (logits, hidden) for p, (logits, hidden) in zip(passes, outs)]
    device = model.device
    own = getattr(model, "_specdec_own_forward", None) if all(p.cache is not None for p in passes) else None
    if own is not None:
        masks = [None if p.attend is None else additive_mask(p.attend, model.dtype, device) for p in passes]
        outs = llama_forward.forward_batch(own, [(p.ids, p.cache, p.rows, p.positions, mask, p.hidden)
                                                 for p, mask in zip(passes, masks)])
        return [((logits if vocab is None else logits[:, :vocab]).float(), states) for logits, states in outs]
    return [_forward_transformers(model, p, vocab) for p in passes]


def rows_top(model, hidden: torch.Tensor, k: int, vocab: int | None, last: torch.Tensor) -> RowsTop:
    """RowsTop of the rows whose final (normed) hidden states are `hidden`: the model's head over
    TOP_ROWS_CHUNK rows at a time, each chunk reduced to its top-k before the next (row by row the same logits
    as a pass that returns them all: the head's result for a row does not depend on the other rows)."""
    head = model.get_output_embeddings()
    values, indices = [], []
    for start in range(0, len(hidden), TOP_ROWS_CHUNK):
        logits = head(hidden[start:start + TOP_ROWS_CHUNK])
        logits = (logits if vocab is None else logits[:, :vocab]).float().contiguous()
        v, i = top_k_rows(logits, min(k, logits.shape[-1]))
        values.append(v)
        indices.append(i)
    return RowsTop(torch.cat(values), torch.cat(indices), last)


def _forward_transformers(model, p: Pass, vocab: int | None):
    device = model.device
    extra = {}
    if p.attend is not None:
        extra["attention_mask"] = additive_mask(p.attend, model.dtype, device)
    if p.positions is not None:
        extra["position_ids"] = torch.tensor([p.positions], device=device)
    out = model(input_ids=torch.tensor([p.ids], dtype=torch.long, device=device), past_key_values=p.cache,
                use_cache=p.cache is not None, logits_to_keep=p.rows, output_hidden_states=p.hidden, **extra)
    logits = out.logits[0, -p.rows:]
    if vocab is not None:
        logits = logits[:, :vocab]
    return logits.float(), (out.hidden_states[-1][0] if p.hidden else None)


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


TOP_K_BLOCK = 128  # top_k_rows: columns per block (a row of SmolLM2's 49,152 logits is 384 blocks)


def top_k_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's k largest entries, best first: torch.topk's values exactly (of equal
    values, which index comes first may differ), faster on a CPU for a few rows of a large vocabulary. Why: torch's
    row-wise reductions are slow there (topk over [16, 49152] float32 with 2 threads: ~0.5 ms, as much as a Token
    Recycling proposer's whole drafting per verify pass; this: ~0.18 ms), while a max over short contiguous
    blocks vectorises. The top k of the whole blocks lie in the k blocks with the largest maxima: those maxima
    are k entries >= m, the k-th largest block maximum, so every top-k entry is >= m, one above m sits in a block
    whose maximum is above m (a chosen one), and the chosen blocks hold entries equal to m (their maxima) as
    often as the top k needs them. The columns after the last whole block are always candidates, so a top-k over
    the candidates is exact."""
    if k <= logits.shape[-1] and kernels.row_select_fits(logits):
        best = kernels.top_k_rows(logits, k)  # one scan per row (csrc/row_select.cpp); None: a NaN, torch's order
        if best is not None:
            return best
    rows, vocab = logits.shape
    blocks = vocab // TOP_K_BLOCK
    if logits.device.type != "cpu" or blocks < 4 * k or not logits.is_contiguous():
        return torch.topk(logits, k, dim=-1)
    whole = logits[:, :blocks * TOP_K_BLOCK].view(rows, blocks, TOP_K_BLOCK)
    chosen = torch.topk(whole.amax(-1), k, dim=-1).indices  # [rows, k] block numbers
    candidates = whole[torch.arange(rows)[:, None], chosen].view(rows, k * TOP_K_BLOCK)
    if vocab > blocks * TOP_K_BLOCK:
        candidates = torch.cat([candidates, logits[:, blocks * TOP_K_BLOCK:]], dim=1)
    best = torch.topk(candidates, k, dim=-1)
    at = best.indices
    in_block = at < k * TOP_K_BLOCK
    block = chosen.gather(1, (at // TOP_K_BLOCK).clamp_(max=k - 1))
    tail = at - k * TOP_K_BLOCK + blocks * TOP_K_BLOCK  # a column after the last whole block
    columns = torch.where(in_block, block * TOP_K_BLOCK + at % TOP_K_BLOCK, tail)
    return best.values, columns


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def select_token(logits: torch.Tensor, s: DecodeSettings, generator: torch.Generator) -> int:
    """Next token from one row of logits: argmax when greedy, else a sample from the processed distribution."""
    if s.greedy:
        return int(argmax_rows(logits[None])[0])
    return sample(logits_to_probs(logits, s), generator)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) of logit rows [rows, vocab]: on a CPU our extension's scan (kernels.argmax_rows,
    the same answer; torch's takes ~70 us over one row of SmolLM2's vocabulary, ~1 % of an int4 step), else torch."""
    return kernels.argmax_rows(logits) if kernels.row_select_fits(logits) else logits.argmax(-1)


def make_generator(s: DecodeSettings, device) -> torch.Generator:
    device = torch.device(device)
    return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(s.seed)


def hit_eos(tokens: list[int], eos_ids: set[int]) -> int | None:
    """Index of the first end-of-sequence token in `tokens`, or None."""
    return next((i for i, tok in enumerate(tokens) if tok in eos_ids), None)


PASS_COST_CONTEXT = 64  # pass_costs: cached positions before the timed passes (a short prompt's worth)
PASS_COST_REPEATS = 3


def pass_costs(model, rows: int) -> list[float]:
    """Seconds of one target pass of 1, 2, ..., `rows` rows over PASS_COST_CONTEXT cached positions (the median of
    PASS_COST_REPEATS rounds over every row count after a warm-up round; a chain's causal rows), made non-decreasing
    in the rows (monotone_costs): the cost curve a cost-aware draft length weighs its gains against
    (proposers.DraftLength 'cost'). Measured once per model, row count and thread count and kept on the model
    (~0.3 s for SmolLM2-135M in int4 up to 9 rows on 2 CPU cores), so it is taken before the first timed
    generation, not inside every one. The rounds go over every row count in turn, so a slow spell of the host
    falls on all of them rather than on a few."""
    prepare_model(model)
    key = (rows, torch.get_num_threads(), str(model.device))
    known = getattr(model, "_specdec_pass_costs", {})
    if key not in known:
        clock, vocab = Clock(model.device), model.config.vocab_size
        cache = new_cache(model, PASS_COST_CONTEXT + rows + 1)
        forward(model, [i % vocab for i in range(1, PASS_COST_CONTEXT + 1)], cache)
        times: list[list[float]] = [[] for _ in range(rows)]
        for _ in range(PASS_COST_REPEATS + 1):
            for n in range(1, rows + 1):
                ids = [(7 * i) % vocab for i in range(1, n + 1)]
                start = clock()
                forward(model, ids, cache, rows=n)
                times[n - 1].append(clock() - start)
                rollback(cache, PASS_COST_CONTEXT)
        known[key] = monotone_costs([statistics.median(t[1:]) for t in times])
        model._specdec_pass_costs = known
    return known[key]


def monotone_costs(costs: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `costs` in least squares (pool adjacent violators): a pass of more
    rows never costs less than one of fewer. Measured medians scatter by ~10 % on a shared host (a 2-row pass
    measured at 0.87 of a 1-row one, float32 SmolLM2 on 2 cores): a draft then looks free, or dear, by chance."""
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for cost in costs:
        blocks.append([cost, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


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
    trace.event_s = clock.event_s()
    trace.steps = trace.target_passes - 1
    return trace
