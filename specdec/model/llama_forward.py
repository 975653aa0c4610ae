"""Our own forward pass for Llama-architecture decoders (CPU, one CUDA GPU), as gpt-fast writes its model: the same
operations as transformers' LlamaForCausalLM, in the same order, as one flat function over the layers' weights.

Why: a one-token step of SmolLM2-135M in int4 through transformers' modules spends ~4.5 ms in the int4/int8
matmuls and ~0.8 ms in attention of 14-16 ms (torch profiler, 2-core EPYC); the rest is ~5,700 aten calls
(nested ones included) and the Python around them: module calls and hooks, keyword routing, output objects, mask
and rotary set-up, casts and reshapes per projection. This forward issues ~4,800 aten calls per step with far less
Python between them: 10.4 against 15.8 ms per step in int4, 17.2 against 20.6 in float32 (bench/forward.py;
docs/engines.md, "What closed the gap").

It computes what transformers computes, bit for bit (tests/test_llama_forward.py compares logits, hidden states
and KV caches with torch.equal): RMSNorm in float32 as LlamaRMSNorm, rotary embeddings as apply_rotary_pos_emb
(q and k rotated together: element-wise, the same bits), SDPA with shared KV heads (enable_gqa), the causal /
tree masks transformers would pass, and the model's own linear layers (oneDNN, MKL or the weight-only formats,
called on their kernels directly). On one CUDA GPU it runs the same operators over the stock nn.Linear layers
(float32, bfloat16, float16; float64 for tests): what batched decoding needs there, one pass over every sequence's rows
(forward_batch), where transformers' forward would take them one after another; written and tested on the CPU's
operators, not yet run on a GPU (docs/verified-where.md). `llama_weights` returns None for anything else — another
architecture, rotary scaling that changes with the sequence, eager attention, a device map or weights on several
devices, sharded weights, a model in training — and decoding.forward then runs transformers' forward as before.
$SPECDEC_FORWARD=transformers turns it off (an ablation: bench records which forward ran).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from specdec.model.attention import (attend_rows, exact_rows_requested, few_rows_fit, few_rows_shape_fit, fold_mask,
                                     grouped_rows, sdpa_one_row, transposed_mask)
from specdec.model.quant import FusedWeightOnly, ProjectionSlice

# own: our forward, a few-row pass's layers in one call of our extension where every kernel is ours (decoder_layers);
# own-python: our forward with the layers looped in Python (an ablation: the same bits); transformers: theirs
FORWARDS = ("own", "own-python", "transformers")
ROPE_TYPES = ("default", "linear", "llama3")  # inv_freq fixed at load time (dynamic/yarn/longrope change or scale it)

Matmul = Callable[[torch.Tensor], torch.Tensor]  # [rows, in] -> [rows, out], in the model's dtype


def forward_choice() -> str:
    """'own' (default), 'own-python' or 'transformers', from $SPECDEC_FORWARD."""
    choice = os.environ.get("SPECDEC_FORWARD", "own").strip().lower() or "own"
    if choice not in FORWARDS:
        raise ValueError(f"SPECDEC_FORWARD must be one of {', '.join(FORWARDS)}, got '{choice}'")
    return choice


def matmul(module) -> Matmul:
    """The kernel call of a linear layer without its module wrapping (inputs are already 2-D): the `kernel()` of
    our layers (kernels.PackedLinear, PanelLinear, DenseOneDNNLinear, quant.WeightOnlyLinear), F.linear for
    nn.Linear."""
    if hasattr(module, "kernel"):
        return module.kernel()
    if type(module) is torch.nn.Linear:
        return functools.partial(F.linear, weight=module.weight, bias=module.bias)
    raise TypeError(f"no kernel call for {type(module).__name__}")


def fused_layer(modules: list):
    """The fused weight-only layer whose slices `modules` are, all of it in order, or None."""
    if all(isinstance(m, ProjectionSlice) for m in modules):
        fused = modules[0].fused[0]
        if (isinstance(fused, FusedWeightOnly) and all(m.fused[0] is fused for m in modules)
                and [m.index for m in modules] == list(range(len(fused.sizes)))):
            return fused.linear
    return None


def projections(modules: list) -> Matmul:
    """One call computing the concatenated outputs of projections of the same input: the fused weight-only layer
    they are slices of, else each layer's kernel and a concatenation."""
    fused = fused_layer(modules)
    if fused is not None:
        return matmul(fused)
    return functools.partial(concatenated, calls=tuple(matmul(m) for m in modules))


def concatenated(x: torch.Tensor, calls: tuple[Matmul, ...]) -> torch.Tensor:
    return torch.cat([call(x) for call in calls], dim=-1)


def layer_projections(layer) -> tuple[list, list, list, list]:
    """A transformers decoder layer's linear modules, per projection our forward calls: q|k|v, out, gate|up, down."""
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]


NATIVE_KINDS = {"panels": 0, "int8": 1, "int4": 2}  # csrc/decoder_layers.cpp's projection kinds
NO_TENSOR = torch.empty(0)  # decoder_layers' "none" for a mask or an unused tensor (its lists hold tensors only)


def native_part(module) -> tuple[int, int, list[torch.Tensor]] | None:
    """How csrc/decoder_layers.cpp calls a linear layer's kernel itself: (kind, parameter, 3 tensors) from the
    layer's `native_call()` (kernels.PanelLinear, quant.WeightOnlyLinear on our kernels), or None where the layer
    runs another kernel."""
    call = module.native_call() if hasattr(module, "native_call") else None
    if call is None:
        return None
    kernel, parameter, tensors = call
    return NATIVE_KINDS[kernel], parameter, list(tensors) + [NO_TENSOR] * (3 - len(tensors))


def native_projection(modules: list) -> list[tuple[int, int, list[torch.Tensor]]] | None:
    """`projections` as decoder_layers' parts: the fused weight-only layer, else one part per module."""
    fused = fused_layer(modules)
    parts = [native_part(m) for m in ([fused] if fused is not None else modules)]
    return None if any(p is None for p in parts) else parts


@dataclass
class NativeLayers:
    """A model's decoder layers flattened for csrc/decoder_layers.cpp (its header says the layout)."""
    tensors: list[torch.Tensor]
    ints: list[int]
    eps: list[float]


def native_layers(layers, model_layers) -> NativeLayers | None:
    """NativeLayers for `model_layers` (transformers' decoder layers) with `layers` their LayerWeights, or None
    where a projection is not one of our kernels."""
    tensors, ints, eps = [], [], []
    for weights, layer in zip(layers, model_layers):
        tensors += [weights.attn_norm, weights.mlp_norm]
        eps += [float(weights.attn_eps), float(weights.mlp_eps)]
        for modules in layer_projections(layer):
            parts = native_projection(modules)
            if parts is None:
                return None
            ints.append(len(parts))
            for kind, parameter, part_tensors in parts:
                ints += [kind, parameter]
                tensors += part_tensors
    return NativeLayers(tensors, ints, eps)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    attn_eps: float
    qkv: Matmul          # -> [rows, (heads + 2 kv_heads) * head_dim]
    out: Matmul
    mlp_norm: torch.Tensor
    mlp_eps: float
    gate_up: Matmul      # -> [rows, 2 * intermediate]
    down: Matmul


@dataclass
class LlamaWeights:
    embed: torch.nn.Module  # the input embedding: nn.Embedding, or kernels.PanelEmbedding over the head's panels
    layers: list[LayerWeights]
    norm: torch.Tensor
    norm_eps: float
    head: Matmul
    inv_freq: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    scaling: float
    # kernels.few_row_attention where the model uses it (kernels.attention_kernel), else None (SDPA)
    few_rows: Callable | None = None
    # kernels.rope_attend beside it: rotary, the cache write and few_rows in one call (None: three steps in torch)
    rope_attend: Callable | None = None
    # kernels.rms_norm where it gives torch.rms_norm's bits for every norm of the model (kernels.rms_norm_fits)
    norm_kernel: Callable | None = None
    # kernels.swiglu where it gives F.silu(gate) * up's bits at the model's width (kernels.swiglu_matches), float32 only
    swiglu: Callable | None = None
    # kernels.decoder_layers and the layers it runs, where all of the above and every projection are our kernels
    decoder_layers: Callable | None = None
    native: NativeLayers | None = None


def unsupported(model) -> str | None:
    """Why our forward cannot stand in for transformers' on `model` (None: it can)."""
    from transformers import LlamaForCausalLM

    if type(model) is not LlamaForCausalLM:
        return f"{type(model).__name__} is not LlamaForCausalLM"
    config = model.config
    param = next(model.parameters(), None)
    if param is None or param.device.type not in ("cpu", "cuda") or type(param.detach()) is not torch.Tensor:
        return "weights are not ordinary CPU or CUDA tensors"
    if len({p.device for p in model.parameters()}) > 1:
        return "the weights are on several devices"
    if getattr(model, "hf_device_map", None) is not None:
        return "the model is spread by a device map"
    if model.training:
        return "the model is in training mode"
    if config._attn_implementation not in ("sdpa", "specdec_sdpa"):
        return f"attention '{config._attn_implementation}' is not SDPA"
    if config.hidden_act != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return "activation or tensor-parallel pretraining layout differs from Llama's"
    rotary = model.model.rotary_emb
    if rotary.rope_type not in ROPE_TYPES or rotary.attention_scaling != 1.0:
        return f"rotary scaling '{rotary.rope_type}' changes with the sequence"
    embed = model.model.embed_tokens  # a PanelEmbedding's `weight` would unpack a copy: read its panels' dtype
    dtype = (embed.packed if hasattr(embed, "packed") else embed.weight).dtype
    # a GPU: the dtypes models are served in (transformers' forward and ours issue the same operators; bitwise
    # agreement is tested on the CPU only). The CPU's bfloat16 stays on transformers' forward (a different matmul
    # path than the one our tests compare).
    dtypes = ((torch.float32, torch.float64) if param.device.type == "cpu"
              else (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    if dtype not in dtypes:
        return f"hidden states are {str(dtype).removeprefix('torch.')}, not one of " + \
            ", ".join(str(d).removeprefix("torch.") for d in dtypes) + f" on the {param.device.type.upper()}"
    return None


def llama_weights(model, few_rows: Callable | None = None, rope_attend: Callable | None = None,
                  norm_kernel: Callable | None = None, swiglu: Callable | None = None,
                  decoder_layers: Callable | None = None) -> LlamaWeights | None:
    """The tensors and kernel calls our forward reads, or None where it does not apply (`unsupported`, or a
    linear layer with no kernel call we know: `matmul`). few_rows: the attention kernel for passes of few rows
    (kernels.few_row_attention), used for float32 models on the CPU; rope_attend: the same kernel fused with rotary
    and the cache write (kernels.rope_attend), used with it; norm_kernel: RMSNorm in one call (kernels.rms_norm:
    kernels.prepare_model passes it where it gives torch's bits for every norm of the model), float32 only; swiglu:
    silu(gate) * up in one call (kernels.swiglu, passed where it gives torch's bits), float32 only; decoder_layers:
    a few-row pass's layers in one call of those kernels (kernels.decoder_layers), used where all four are given
    and every projection runs our panel or VNNI kernels, unless $SPECDEC_FORWARD is own-python."""
    choice = forward_choice()
    if choice == "transformers" or unsupported(model) is not None:
        return None
    config, inner = model.config, model.model
    layers = []
    try:
        for layer in inner.layers:
            qkv, (out,), gate_up, (down,) = layer_projections(layer)
            layers.append(LayerWeights(
                attn_norm=layer.input_layernorm.weight, attn_eps=layer.input_layernorm.variance_epsilon,
                qkv=projections(qkv), out=matmul(out),
                mlp_norm=layer.post_attention_layernorm.weight,
                mlp_eps=layer.post_attention_layernorm.variance_epsilon,
                gate_up=projections(gate_up), down=matmul(down)))
        head = matmul(model.lm_head)
    except TypeError:
        return None
    attn = inner.layers[0].self_attn
    cpu_float32 = model.dtype == torch.float32 and model.device.type == "cpu"
    native = None
    if (choice == "own" and cpu_float32 and decoder_layers is not None and few_rows is not None
            and rope_attend is not None and norm_kernel is not None and swiglu is not None):
        native = native_layers(layers, inner.layers)
    return LlamaWeights(embed=inner.embed_tokens, layers=layers, norm=inner.norm.weight,
                        norm_eps=inner.norm.variance_epsilon, head=head,
                        inv_freq=inner.rotary_emb.inv_freq, heads=config.num_attention_heads,
                        kv_heads=config.num_key_value_heads, head_dim=attn.head_dim,
                        intermediate=config.intermediate_size, scaling=attn.scaling,
                        few_rows=few_rows if cpu_float32 else None,
                        rope_attend=rope_attend if cpu_float32 and few_rows is not None else None,
                        norm_kernel=norm_kernel if cpu_float32 else None, swiglu=swiglu if cpu_float32 else None,
                        decoder_layers=decoder_layers if native is not None else None, native=native)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: in float32, then back to the input's dtype, then the weight. For float32 states and weight,
    torch.rms_norm: one call instead of six, the same bits (tests/test_llama_forward.py)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary(weights: LlamaWeights, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaRotaryEmbedding: cos and sin [rows, head_dim] for the positions."""
    freqs = positions[:, None].float() * weights.inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def causal_mask(rows: int, start: int, device=None) -> torch.Tensor | None:
    """The mask transformers passes to SDPA without a tree mask: None for a prefill (SDPA's causal flag) and for
    one row, a bool causal mask [1, 1, rows, start + rows] for a multi-row pass after cached positions."""
    if rows == 1 or start == 0:
        return None
    keys = torch.arange(start + rows, device=device)
    return (keys[None, :] <= (start + torch.arange(rows, device=device))[:, None])[None, None]


def forward(weights: LlamaWeights, ids: list[int], cache, rows: int = 1, positions: list[int] | None = None,
            tree_mask: torch.Tensor | None = None, hidden: bool = False):
    """decoding.forward's contract: (logits of the last `rows` positions [rows, vocab] in the model's dtype, the
    final (normed) hidden states of all ids [len(ids), hidden] when `hidden`, else None); extends `cache`.
    tree_mask: the additive float mask [1, 1, rows, cached + rows] transformers would get (decoding.additive_mask)."""
    return forward_batch(weights, [(ids, cache, rows, positions, tree_mask, hidden)])[0]


@dataclass
class Segment:
    """One sequence's rows in a batched pass: rows [start, end) of the pass, its cache, and how it attends (chosen
    at the first layer, once its keys are known; every layer alike)."""
    start: int
    end: int
    cache: object
    mask: torch.Tensor | None
    few: bool = False
    mask_t: torch.Tensor | None = None
    folded: torch.Tensor | None = None


def forward_batch(weights: LlamaWeights, passes: list[tuple]):
    """`forward` for several sequences in one pass: passes are (ids, cache, rows, positions, tree_mask, hidden)
    each. The linear layers run once over all rows (their weights are read once per pass: what makes a batch
    cheaper than its sequences one by one), attention per sequence over its own cache. With our linear kernels a
    row's result does not depend on the other rows (kernels.PanelLinear), so each sequence gets the bits it gets
    alone. Returns (logits, hidden or None) per pass, as `forward` does."""
    segments, ids, pos = [], [], []
    device = weights.inv_freq.device
    for seq_ids, cache, _, positions, tree_mask, _ in passes:
        n, start = len(seq_ids), cache.get_seq_length()
        segments.append(Segment(len(ids), len(ids) + n, cache,
                                tree_mask if tree_mask is not None else causal_mask(n, start, device)))
        ids += seq_ids
        pos.append(torch.tensor(positions, device=device) if positions is not None
                   else torch.arange(start, start + n, device=device))
    x = weights.embed(torch.tensor(ids, device=device))
    cos, sin = rotary(weights, torch.cat(pos) if len(pos) > 1 else pos[0], x.dtype)
    by_rows = exact_rows_requested()
    norm = weights.norm_kernel or rms_norm
    native = native_pass(weights, segments, x, cos, sin, by_rows)  # the layers in one call, or None: in Python
    # several sequences' rotary rows, sliced once per pass rather than once per layer (a slice is ~1 us of dispatch)
    rope = [] if len(segments) == 1 or native is not None else [(cos[s.start:s.end], sin[s.start:s.end])
                                                                for s in segments]
    for index, layer in enumerate(weights.layers if native is None else ()):
        qkv = layer.qkv(norm(x, layer.attn_norm, layer.attn_eps))
        if len(segments) == 1:
            att = attend(weights, index, segments[0], qkv, cos, sin, by_rows and segments[0].mask is not None)
        else:
            att = torch.cat([attend(weights, index, seg, qkv[seg.start:seg.end], seg_cos, seg_sin,
                                   by_rows and seg.mask is not None)
                             for seg, (seg_cos, seg_sin) in zip(segments, rope)])
        x = x + layer.out(att)
        gate_up = layer.gate_up(norm(x, layer.mlp_norm, layer.mlp_eps))
        x = x + layer.down(weights.swiglu(gate_up, weights.intermediate) if weights.swiglu is not None
                           else F.silu(gate_up[:, :weights.intermediate]) * gate_up[:, weights.intermediate:])
    if native is not None:
        x = native
    wanted = [(seg, rows, want_hidden) for seg, (_, _, rows, _, _, want_hidden) in zip(segments, passes)]
    if any(want_hidden for *_, want_hidden in wanted):
        x = norm(x, weights.norm, weights.norm_eps)
        logits = weights.head(last_rows(x, wanted))
    else:
        logits = weights.head(norm(last_rows(x, wanted), weights.norm, weights.norm_eps))
    out, at = [], 0
    for seg, rows, want_hidden in wanted:
        out.append((logits[at:at + rows], x[seg.start:seg.end] if want_hidden else None))
        at += rows
    return out


def native_pass(weights: LlamaWeights, segments: list[Segment], x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, by_rows: bool) -> torch.Tensor | None:
    """The decoder layers' output for x in one call of csrc/decoder_layers.cpp, or None where
    that loop does not apply and forward_batch's Python loop runs: it does for a pass whose every sequence our
    few-row attention takes (steps and verify passes, not prompts), in caches whose every layer has its buffer."""
    if (weights.native is None or weights.rope_attend is None or weights.norm_kernel is None
            or weights.swiglu is None or by_rows):  # (an ablation may unset one of the calls)
        return None
    for seg in segments:
        rows = seg.end - seg.start
        if not (few_rows_shape_fit(rows, seg.cache.get_seq_length() + rows, weights.heads, weights.kv_heads,
                                   weights.head_dim, seg.mask) and extendable(seg.cache)):
            return None
    keys, values, starts, masks = [], [], [], []
    for seg in segments:  # every sequence fits: only now extend their caches
        seg_keys, seg_values, seg_starts = extend_layers(seg.cache, seg.end - seg.start)
        keys += seg_keys
        values += seg_values
        starts += seg_starts
        masks.append(transposed_mask(seg.mask) if seg.mask is not None else NO_TENSOR)
    native = weights.native
    return weights.decoder_layers(x, cos, sin, [seg.end - seg.start for seg in segments], keys, values, starts,
                                  masks, native.tensors, native.ints, native.eps, weights.heads, weights.kv_heads,
                                  weights.intermediate, weights.scaling)


def extendable(cache) -> bool:
    """Whether every layer of the cache can take rows written in place (extend_layers): decoding's GrowingLayer
    with its buffer (a fresh cache's first write goes through its update)."""
    return all(getattr(layer, "key_buffer", None) is not None and layer.is_initialized for layer in cache.layers)


def extend_layers(cache, rows: int) -> tuple[list, list, list]:
    """Room for `rows` more positions in every layer of an `extendable` cache, written in place by the caller
    (GrowingLayer.extend): (key buffers, value buffers, first positions)."""
    layers = cache.layers
    starts = [layer.extend(rows) for layer in layers]
    return [layer.key_buffer for layer in layers], [layer.value_buffer for layer in layers], starts


def last_rows(x: torch.Tensor, wanted: list) -> torch.Tensor:
    """Each segment's last `rows` rows of x, in order (one pass: a slice, as before batching)."""
    if len(wanted) == 1:
        seg, rows, _ = wanted[0]
        return x[seg.end - rows:seg.end]
    return torch.cat([x[seg.end - rows:seg.end] for seg, rows, _ in wanted])


def attend(weights: LlamaWeights, index: int, seg: Segment, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           by_rows: bool) -> torch.Tensor:
    """One sequence's attention in layer `index`: rotary, its cache's update, and the attention of its rows over
    the cache -> [rows, heads * head_dim]."""
    n = qkv.shape[0]
    heads, kv_heads, dim, half = weights.heads, weights.kv_heads, weights.head_dim, weights.head_dim // 2
    if index and seg.few and weights.rope_attend is not None:  # layer 0 chose our kernel: one call for the rest
        layer = seg.cache.layers[index]
        extend = getattr(layer, "extend", None)  # decoding.new_cache's layers (a buffer written in place)
        start = extend(n) if extend is not None else None
        if start is not None:
            return weights.rope_attend(qkv, cos, sin, layer.key_buffer, layer.value_buffer, start, heads, kv_heads,
                                       seg.mask_t, weights.scaling)
    qkv = qkv.view(n, heads + 2 * kv_heads, dim).transpose(0, 1)  # [heads, rows, dim]
    qk, v = qkv[:heads + kv_heads], qkv[heads + kv_heads:]
    qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
    k, v = seg.cache.layers[index].update(qk[None, heads:], v[None])
    q = qk[None, :heads]
    mask = seg.mask
    if index == 0:  # how this sequence attends, once its keys are known; every layer alike
        # steps and verify passes: our kernel, each row as its one-row step computes it
        # (kernels.few_row_attention); else a masked multi-row pass (verify) with grouped KV heads folds its
        # query heads into rows for SDPA (attention.grouped_rows)
        seg.few = weights.few_rows is not None and not by_rows and few_rows_fit(q, k, mask)
        seg.mask_t = transposed_mask(mask) if seg.few and mask is not None else None
        seg.folded = (fold_mask(mask, heads // kv_heads)
                      if not seg.few and mask is not None and not by_rows and heads > kv_heads else None)
    if seg.few:
        return weights.few_rows(qk[:heads], k[0], v[0], seg.mask_t, weights.scaling)  # [rows, heads * dim]
    if by_rows:
        att = attend_rows(q, k, v, mask, functools.partial(sdpa_one_row, scaling=weights.scaling))
    elif seg.folded is not None:
        att = grouped_rows(q, k, v, seg.folded, weights.scaling)
    else:
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=weights.scaling,
                                             is_causal=mask is None and n > 1, enable_gqa=True)
    return att[0].transpose(0, 1).reshape(n, heads * dim)
