"""CPU kernels for our decoding loops: `prepare_model` makes a float32 model fast on a CPU, in place and once.

On a CPU with float32 weights the output head goes through oneDNN (a 5-row head pass: 14-18 ms instead of MKL's
25 ms on a Xeon), verify passes share KV heads in attention, and the decoder linear kernels are chosen per CPU
(`linear_kernels`): on AMD, pre-packed oneDNN weights (a 1-token step of SmolLM2-135M 76 -> 38 ms on a 2-core EPYC,
where MKL's small-matrix paths are slow); on Intel, MKL itself (1-row products 1.2-1.9x faster than packed oneDNN
on a Sapphire Rapids Xeon, 5-row ones on par). Elsewhere (GPU, other dtypes, device maps, tensor parallelism) the
model is left as it is.
"""

from __future__ import annotations

import functools
import os

import torch

from specdec import llama_forward
from specdec.attention import attend_rows, exact_rows_requested


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear on 2-D inputs, the weight pre-packed or dense. Kernel calls are partials of functions like
    this one, not closures: a deep copy of a prepared model then calls its own copied weights."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


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
        return self.kernel()(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    def kernel(self):
        """The bare kernel call on 2-D inputs (llama_forward calls it without the module)."""
        return functools.partial(onednn_linear, weight=self.packed, bias=self.bias)


class DenseOneDNNLinear(torch.nn.Module):
    """The output head through oneDNN on its own dense weight: the weight stays shared (tied to the input
    embedding in many models) and readable, so no second copy of the largest matrix is made."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel()(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    def kernel(self):
        """The bare kernel call on 2-D inputs (llama_forward calls it without the module)."""
        return functools.partial(onednn_linear, weight=self.weight, bias=self.bias)


def attention_row_by_row(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A multi-row pass's attention computed as each row's own one-row step computes it: transformers' SDPA with
    one query and no mask over the keys that row sees. SDPA gives a row of a masked multi-row pass slightly other
    bits than a one-row step; in float32 that is invisible, but the weight-only formats round every matmul input
    to bfloat16 and turn it into a flipped near-tie now and then (quant.py). With this, a verify pass is
    bit-identical to one-row steps and greedy speculative decoding to plain decoding in every format, at the cost
    of one SDPA call per row and layer (opt-in: $SPECDEC_EXACT_ATTENTION=1, a diagnostic, not a speed setting)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def one_row(q, k, v):  # transformers' own one-row call, as a one-row step makes it
        return sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=False,
                                      **kwargs)[0]

    return attend_rows(query, key, value, attention_mask, one_row, dim=1), None


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """transformers' SDPA attention, except that a multi-token pass with a mask (a verify pass) lets SDPA share
    the key/value heads (enable_gqa) instead of materialising repeated copies of the whole KV cache per layer,
    or, with $SPECDEC_EXACT_ATTENTION=1, is computed row by row (`attention_row_by_row`).
    Anything else goes to transformers' own function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.shape[2] > 1 and attention_mask is not None and attention_mask.shape[:2] == (1, 1)
            and query.shape[0] == 1 and kwargs.get("position_bias") is None and exact_rows_requested()):
        return attention_row_by_row(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
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
    return "mkl" if torch.backends.mkl.is_available() and cpu_vendor() == "GenuineIntel" else "onednn"


def prepare_model(model, linear: str | None = None):
    """Make `model` fast for our decoding loops, in place and once (later calls return at once).

    On a CPU with float32 weights: the output head becomes a DenseOneDNNLinear, SDPA attention becomes
    `sdpa_gqa_attention`, and with `linear` == 'onednn' (default: `linear_kernels()`) every other linear layer
    becomes a PackedLinear (its dense weight is freed, so memory does not grow); with 'mkl' they stay as they
    are. Elsewhere (GPU, float16, float64, accelerate device maps, tensor parallelism) the model is left as it
    is. Outputs agree with the stock layers to float32 rounding (another summation order).
    Then, wherever it applies (a Llama on the CPU: llama_forward.unsupported), decoding.forward runs our own
    forward over these layers instead of transformers' (the same bits, fewer operator calls).
    Call it on any model a new decoding loop runs on; prepared models still work with transformers' generate().
    """
    if getattr(model, "_specdec_prepared", False):
        return model
    model._specdec_prepared = True
    if fast_kernels_available(model):
        use_fast_kernels(model, linear)
    # after the kernel swap and the copies: our forward calls the kernels and reads the tensors the model keeps
    model._specdec_own_forward = llama_forward.llama_weights(model)
    return model


def use_fast_kernels(model, linear: str | None) -> None:
    """prepare_model's CPU float32 part: oneDNN head, GQA verify attention, packed or MKL linears, own copies."""
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
