"""CPU kernels for our decoding loops: `prepare_model` makes a float32 model fast on a CPU, in place and once.

On a CPU with float32 weights verify passes share KV heads in attention, and the linear kernels are chosen per
CPU (`linear_kernels`):
- on AVX-512 CPUs, Intel's included, our own kernel (`PanelLinear`, csrc/panel_linear.cpp) for the decoder and
  the output head: the weights in panels of 16 output features, streamed once per call, every row's sums in
  registers. On a 2-core AMD EPYC all of SmolLM2-135M's decoder linear layers take 11.2 instead of 18.5 ms
  (oneDNN) for one row and 15.3 instead of 24.6 ms for 16 (docs/kernels.md); a row's result does not depend on the other
  rows of the call. It is compiled on first use (torch's cpp_extension, ~35 s, cached).
- without it, pre-packed oneDNN weights (a 1-token step 76 -> 38 ms on that EPYC, where MKL's small-matrix paths
  are slow), the head through oneDNN on its dense weight (5 rows: 14-18 ms instead of MKL's 25 ms on a Xeon);
- on Intel CPUs without it, MKL itself (1-row products 1.2-1.9x faster than packed oneDNN on a Sapphire Rapids
  Xeon, 5-row ones on par). On that Xeon our kernel beat MKL (issue 36's measurement, 12 Spec-Bench questions,
  96 tokens, k 8, tree budget 14: plain decoding 33.3 against 30.8 tok/s, a 15-row verify pass 1.60 instead of
  2.06 plain steps, dynamic-tree 1.25x instead of 1.01x), so it is the default there too.
Attention of passes of 1 to 16 rows (steps and verify passes) runs our AVX-512 kernel where it builds
(`attention_kernel`, csrc/few_row_attention.cpp): one KV head's query rows side by side in the vector lanes, every
row's result independent of the other rows; a 14-row verify pass's attention over 400 keys in about 2/5 of torch's
SDPA time (docs/kernels.md). Prompts stay on SDPA.
Elsewhere (GPU, other dtypes, device maps, tensor parallelism) the model is left as it is.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.model import llama_forward
from specdec.model.attention import (attend_rows, exact_rows_requested, few_rows_fit, fold_mask, grouped_rows,
                               transposed_mask)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear on 2-D inputs, the weight pre-packed or dense. Kernel calls are partials of functions like
    this one, not closures: a deep copy of a prepared model then calls its own copied weights."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class KernelLinear(torch.nn.Module):
    """A linear layer that runs a bare kernel call on 2-D inputs (`kernel()`, which llama_forward calls without
    the module); forward reshapes around it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel()(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)


class PackedLinear(KernelLinear):
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

    def kernel(self):
        """The bare kernel call on 2-D inputs (llama_forward calls it without the module)."""
        return functools.partial(onednn_linear, weight=self.packed, bias=self.bias)


PANEL_SOURCE = Path(__file__).parent / "csrc" / "panel_linear.cpp"
ATTENTION_SOURCE = Path(__file__).parent / "csrc" / "few_row_attention.cpp"
QUANT_SOURCE = Path(__file__).parent / "csrc" / "quant_linear.cpp"  # its functions carry their own VNNI target
NORM_SOURCE = Path(__file__).parent / "csrc" / "rms_norm.cpp"  # llama_forward.rms_norm: torch's bits, one call
SWIGLU_SOURCE = Path(__file__).parent / "csrc" / "swiglu.cpp"  # llama_forward's silu(gate) * up: torch's bits
SELECT_SOURCE = Path(__file__).parent / "csrc" / "row_select.cpp"  # decoding's argmax and top-k of logit rows
PROBE_SOURCE = Path(__file__).parent / "csrc" / "machine_probe.cpp"  # measure.machine: bandwidth and peak rates
DECODER_SOURCE = Path(__file__).parent / "csrc" / "decoder_layers.cpp"  # llama_forward's layer loop in one call


class PanelKernelError(RuntimeError):
    pass


@functools.cache
def panel_extension():
    """Our AVX-512 linear kernel (csrc/panel_linear.cpp), compiled by torch's cpp_extension the first time a
    environment needs it (~35 s on 2 cores; cached in kernel_build_dir(), one folder per environment, and rebuilt
    when the source changes). Raises PanelKernelError with the reason where it cannot run."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        raise PanelKernelError(f"this CPU (or $ATEN_CPU_CAPABILITY) offers {torch.backends.cpu.get_cpu_capability()}, "
                               "not AVX512")
    import time

    from torch.utils import cpp_extension

    start = time.perf_counter()
    # The ninja that installs with specdec, whether or not its environment is activated: another ninja on PATH
    # (a system one) hashes the build commands otherwise and rebuilds the kernel every time the two alternate.
    ninja_dir = ninja_bin_dir()
    if ninja_dir and os.environ.get("PATH", "").split(os.pathsep)[0] != ninja_dir:
        os.environ["PATH"] = os.pathsep.join([ninja_dir, os.environ.get("PATH", "")])
    build = kernel_build_dir()
    try:
        build.mkdir(parents=True, exist_ok=True)
        sources = [PANEL_SOURCE, ATTENTION_SOURCE, QUANT_SOURCE, NORM_SOURCE, SWIGLU_SOURCE, SELECT_SOURCE,
                   PROBE_SOURCE, DECODER_SOURCE]
        module = cpp_extension.load(name=KERNEL_NAME, sources=[str(s) for s in sources],
                                    extra_cflags=list(KERNEL_CFLAGS), build_directory=str(build), verbose=False)
    except Exception as e:  # no compiler, no ninja, no Python headers, no writable cache: say which, in one line
        reason = " ".join(str(e).split())[:300]
        raise PanelKernelError(f"could not build {PANEL_SOURCE.name}: {type(e).__name__}: {reason}") from e
    took = time.perf_counter() - start
    if took > 5:  # a build, not a load from the cache
        print(f"specdec: compiled the AVX-512 kernels in {took:.0f} s, cached in {build} (once per environment)",
              file=sys.stderr)
    return module


KERNEL_NAME = "specdec_panel_linear"
# -fopenmp: at::parallel_for is inline OpenMP; the runtime is the one torch already loaded
KERNEL_CFLAGS = ("-O3", "-mavx512f", "-mfma", "-fopenmp")


def kernel_build_dir(prefix: str | None = None, torch_version: str | None = None,
                     cflags: tuple[str, ...] = KERNEL_CFLAGS) -> Path:
    """Where the kernels are built and cached: `<root>/specdec_panel_linear-<hash>`, the hash of the interpreter's
    prefix (sys.prefix: one folder per virtual environment), torch's version and the compiler flags. Two
    environments on one machine each keep their own build instead of rebuilding a shared one in turn. The root
    is torch's: $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions."""
    from torch.utils import cpp_extension

    key = json.dumps([prefix or sys.prefix, torch_version or torch.__version__, list(cflags)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / \
        f"{KERNEL_NAME}-{digest}"


def ninja_bin_dir() -> str | None:
    """The folder of the ninja binary that pip installed with specdec (the `ninja` package), None without it."""
    try:
        import ninja
    except ImportError:
        return None
    return getattr(ninja, "BIN_DIR", None)


@functools.cache
def panel_kernel_problem() -> str | None:
    """Why the panel kernel cannot run here (None: it can; building it on the first call). Cached: where the
    build fails, later calls do not try again (functools.cache keeps no exceptions of panel_extension)."""
    try:
        panel_extension()
    except PanelKernelError as e:
        return str(e)
    return None


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out/16, in, 16]: 16 output features side by side for every input feature."""
    out, inp = weight.shape
    return weight.detach().reshape(out // 16, 16, inp).transpose(1, 2).contiguous()


def unpack_panels(packed: torch.Tensor) -> torch.Tensor:
    """pack_panels undone: a dense [out, in] copy."""
    return packed.transpose(1, 2).reshape(packed.shape[0] * 16, packed.shape[1])


def panel_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Our AVX-512 kernel on 2-D float32 inputs (a partial of it is a PanelLinear's kernel call)."""
    return panel_extension().panel_linear(x, packed, bias)


ATTENTION_KERNELS = ("auto", "few-rows", "sdpa")


def attention_kernel() -> str:
    """Which kernel computes float32 attention on the CPU for passes of 1 to attention.FEW_ROWS query rows
    (decoding steps and verify passes; prompts stay on SDPA): 'few-rows' (ours, csrc/few_row_attention.cpp) or
    'sdpa' (torch's flash attention). 'auto' (default) picks ours where it builds (AVX-512 and a C++ compiler),
    from measurements (docs/speed.md); $SPECDEC_CPU_ATTENTION=few-rows|sdpa overrides it."""
    choice = kernel_choice("SPECDEC_CPU_ATTENTION", ATTENTION_KERNELS, "few-rows", "SPECDEC_CPU_ATTENTION=sdpa")
    if choice != "auto":
        return choice
    return "few-rows" if panel_kernel_problem() is None else "sdpa"


def kernel_choice(variable: str, choices: tuple[str, ...], ours: str | None = None, instead: str = "",
                  why_not=None) -> str:
    """$variable's value ('auto' when unset), one of `choices`, else a ValueError naming them; asking for `ours`
    (a kernel of our extension) where it cannot run (`why_not()`, default `panel_kernel_problem`) is a ValueError
    with the reason and `instead`."""
    choice = os.environ.get(variable, "auto").strip().lower() or "auto"
    if choice not in choices:
        raise ValueError(f"{variable} must be one of {', '.join(choices)}, got '{choice}'")
    if choice == ours:
        problem = (why_not or panel_kernel_problem)()
        if problem:
            raise ValueError(f"{variable}={ours} cannot run here: {problem}; set {instead}")
    return choice


def few_row_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask_t: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """Our AVX-512 attention for 1 to attention.FEW_ROWS query rows with grouped KV heads: query [H, R, D], key
    and value [KVH, T, D] (cache views: only the last dimension must be contiguous), mask_t None (every key visible) or
    `attention.transposed_mask`'s [T, R]; returns [R, H * D], the layout the output projection reads. Each row's
    result does not depend on the other rows (a verify pass attends each row as its one-row step does); it agrees
    with SDPA to float32 rounding (another summation order, our exp)."""
    return panel_extension().few_row_attention(query, key, value, mask_t, scale)


def rope_attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_buffer: torch.Tensor,
                value_buffer: torch.Tensor, start: int, heads: int, kv_heads: int, mask_t: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """A few-row pass's attention in one call of our extension, from the fused q|k|v projection's output qkv
    [R, (H + 2 KVH) * D]: rotary embeddings on query and key heads (the bits of transformers'
    apply_rotary_pos_emb), the keys and values written into a cache layer's buffers ([1, KVH, capacity, D]) at
    positions [start, start + R), then `few_row_attention` over the first start + R positions -> [R, H * D].
    llama_forward.attend's path for steps and verify passes: one call instead of ~25 tensor operations per layer."""
    return panel_extension().rope_attend(qkv, cos, sin, key_buffer, value_buffer, start, heads, kv_heads, mask_t,
                                         scale)


def decoder_layers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segment_rows: list[int],
                   keys: list[torch.Tensor], values: list[torch.Tensor], starts: list[int],
                   masks: list[torch.Tensor], tensors: list[torch.Tensor], ints: list[int], eps: list[float],
                   heads: int, kv_heads: int, intermediate: int, scale: float) -> torch.Tensor:
    """A few-row pass's decoder layers in one call of our extension (csrc/decoder_layers.cpp): per layer rms_norm,
    the projections (our panel, int8 or int4 kernels, as llama_forward.native_layers lays them out), rope_attend of
    each sequence (segment_rows[s] rows of x, one after another) into its cache buffers keys/values at starts (one
    per sequence and layer, sequence-major) with its mask (masks[s]: rope_attend's mask_t, or an empty tensor),
    swiglu and the residual adds, in llama_forward's order with its bits -> the last layer's output [rows, hidden]
    (x itself is not modified)."""
    return panel_extension().decoder_layers(x, cos, sin, segment_rows, keys, values, starts, masks, tensors, ints,
                                            eps, heads, kv_heads, intermediate, scale)


RMS_NORM_WIDEST = 32767  # torch splits one wider row's sum across threads (its grain size, 32768): another order


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch.rms_norm(x, (n,), weight, eps) of float32 rows [rows, n] (last dimension contiguous) in one call of our
    extension (csrc/rms_norm.cpp: the same operations in the same order, ~0.8 instead of ~10 us a call)."""
    return panel_extension().rms_norm(x, weight, eps)


@functools.cache
def rms_norm_matches(width: int, eps: float) -> bool:
    """Whether our rms_norm gives torch.rms_norm's bits at this width here (random rows of several scales, 1 to 17
    rows): llama_forward uses it only then, so a torch whose summation order differs costs speed, not bits."""
    if width > RMS_NORM_WIDEST or panel_kernel_problem() is not None:
        return False
    generator = torch.Generator().manual_seed(width)
    for rows, scale in ((1, 1.0), (3, 1e-3), (17, 40.0), (1, 1e3)):
        x = torch.randn(rows, width, generator=generator) * scale
        weight = torch.randn(width, generator=generator)
        if not torch.equal(rms_norm(x, weight, eps), torch.rms_norm(x, (width,), weight, eps)):
            return False
    return True


def rms_norm_fits(model) -> bool:
    """Whether our rms_norm gives torch's bits for every RMSNorm of `model` (float32 weights of a width and epsilon
    `rms_norm_matches` accepts): llama_forward then runs it in place of torch.rms_norm."""
    norms = [m for m in model.modules() if hasattr(m, "variance_epsilon") and hasattr(m, "weight")]
    return bool(norms) and all(m.weight.dtype == torch.float32 and m.weight.dim() == 1 and m.weight.is_contiguous()
                               and rms_norm_matches(len(m.weight), float(m.variance_epsilon)) for m in norms)


def swiglu(gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
    """F.silu(gate_up[:, :I]) * gate_up[:, I:] of float32 rows [rows, 2 I] (last dimension contiguous) in one call of
    our extension (csrc/swiglu.cpp: the same operations, ~1.2 instead of ~6 us a row of SmolLM2's 1,536)."""
    return panel_extension().swiglu(gate_up, intermediate)


@functools.cache
def swiglu_matches(intermediate: int) -> bool:
    """Whether our swiglu gives torch's bits at this width here (random rows of several scales, 1 to 17 rows, with
    zeros, infinities, NaN, subnormals and the ends of exp's range): llama_forward uses it only then, so a torch whose
    silu is computed otherwise costs speed, not bits."""
    if panel_kernel_problem() is not None:
        return False
    try:
        swiglu(torch.zeros(1, 2 * intermediate), intermediate)
    except RuntimeError:  # a torch without Sleef's expf to call: torch's operators stay
        return False
    generator = torch.Generator().manual_seed(intermediate)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, -88.5, 88.5, -104.0])
    for rows, scale in ((1, 1.0), (3, 1e-3), (17, 40.0), (2, 1e3)):
        gate_up = torch.randn(rows, 2 * intermediate, generator=generator) * scale
        gate_up[0, :min(len(special), 2 * intermediate)] = special[:2 * intermediate]
        expected = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        if not torch.equal(swiglu(gate_up, intermediate).view(torch.int32), expected.view(torch.int32)):
            return False
    return True


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) of float32 rows [rows, n] in one call of our extension (csrc/row_select.cpp: the same
    answer, NaN first as torch orders it; ~5 instead of ~70 us a row of SmolLM2's 49,152 logits, 2-core Xeon)."""
    return panel_extension().argmax_rows(x)


def top_k_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each float32 row's k largest (values, int64 indices), best first, equal values in index order (torch.topk's
    values exactly), in one call of our extension; None where a row holds a NaN (torch.topk orders those)."""
    values, indices = panel_extension().top_k_rows(x, k)
    return (values, indices) if values.numel() else None


def row_select_fits(x: torch.Tensor) -> bool:
    """Whether argmax_rows / top_k_rows take `x`: float32 rows on a CPU where our extension runs."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and panel_kernel_problem() is None


class PanelLinear(KernelLinear):
    """A float32 nn.Linear whose weight is stored only in panels for our AVX-512 kernel (`pack_panels`; no dense
    copy kept). Each output is one in-order sum over the inputs, so a row's result does not depend on how many
    rows share the call: a verify pass's linear layers give each row a one-row step's bits."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack_panels(linear.weight)
        self.bias = linear.bias

    @staticmethod
    def fits(linear: torch.nn.Linear) -> bool:
        return linear.out_features % 16 == 0

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy, for code that reads weights (not used by forward)."""
        return unpack_panels(self.packed)

    def kernel(self):
        """The bare kernel call on 2-D inputs (llama_forward calls it without the module)."""
        return functools.partial(panel_linear, packed=self.packed, bias=self.bias)

    def native_call(self) -> tuple[str, int, tuple[torch.Tensor, ...]] | None:
        """(kernel, parameter, tensors) for csrc/decoder_layers.cpp's own call of it (llama_forward.native_part);
        None with a bias, which that call does not add."""
        return None if self.bias is not None else ("panels", 0, (self.packed,))


class PanelEmbedding(torch.nn.Module):
    """An input embedding that reads its rows from an output head's panels (`pack_panels` of the tied weight), so
    a model whose head and embedding are one matrix keeps one copy of it when the head runs our kernel."""

    def __init__(self, embedding: torch.nn.Embedding, packed: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.packed = packed

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy, for code that reads weights (not used by forward)."""
        return unpack_panels(self.packed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return panel_rows(ids, self.packed)


def panel_rows(ids: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the dense [out, in] matrix that `packed` holds in panels: [*ids.shape, in]."""
    return packed[ids // 16, :, ids % 16]


class DenseOneDNNLinear(KernelLinear):
    """The output head through oneDNN on its own dense weight: the weight stays shared (tied to the input
    embedding in many models) and readable, so no second copy of the largest matrix is made."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

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
    """transformers' SDPA attention, except that a multi-token pass with a mask (a verify pass) shares the
    key/value heads instead of materialising repeated copies of the whole KV cache per layer (each KV head's
    query heads folded into its rows, `attention.grouped_rows`, as our forward does; else enable_gqa), or, with
    $SPECDEC_EXACT_ATTENTION=1, is computed row by row (`attention_row_by_row`).
    Anything else goes to transformers' own function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.shape[2] > 1 and attention_mask is not None and attention_mask.shape[:2] == (1, 1)
            and query.shape[0] == 1 and kwargs.get("position_bias") is None and exact_rows_requested()):
        return attention_row_by_row(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if (getattr(module, "_specdec_few_rows", False) and not dropout and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and kwargs.get("cache") is None
            and few_rows_fit(query, key, attention_mask)):  # as our forward computes it: llama_forward
        mask_t = None if attention_mask is None else transposed_mask(attention_mask)
        out = few_row_attention(query[0], key[0], value[0], mask_t, scaling)
        return out.view(1, query.shape[2], query.shape[1], query.shape[3]), None
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.shape[2] == 1 or attention_mask is None or groups == 1 or dropout or kwargs.get("position_bias")
            is not None or kwargs.get("softcap") is not None or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if (query.shape[0] == 1 and attention_mask.shape[:2] == (1, 1)
            and query.shape[1] == groups * key.shape[1]):  # as our forward computes it: llama_forward
        out = grouped_rows(query, key, value, fold_mask(attention_mask, groups), scaling)
    else:
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


LINEAR_KERNELS = ("auto", "mkl", "onednn", "panels")


def cpuinfo_field(name: str) -> str:
    """A field of the first CPU in /proc/cpuinfo ('vendor_id', 'model name', 'flags'), '' where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU vendor string from /proc/cpuinfo ('GenuineIntel', 'AuthenticAMD', ...), '' where unknown."""
    return cpuinfo_field("vendor_id")


def linear_kernels() -> str:
    """Which kernels run the decoder's float32 linear layers on this CPU: 'mkl' (transformers' stock nn.Linear),
    'onednn' (PackedLinear) or 'panels' (PanelLinear, our AVX-512 kernel). $SPECDEC_CPU_LINEAR=mkl|onednn|panels
    overrides the choice; 'auto' (the default) picks our kernel where it runs (AVX-512 and a C++ compiler), on
    Intel and AMD alike, else MKL on Intel CPUs, else pre-packed oneDNN, from measurements (module docstring,
    docs/kernels.md)."""
    choice = kernel_choice("SPECDEC_CPU_LINEAR", LINEAR_KERNELS, "panels", "SPECDEC_CPU_LINEAR=onednn or mkl")
    if choice != "auto":
        return choice
    if panel_kernel_problem() is None:
        return "panels"
    return "mkl" if torch.backends.mkl.is_available() and cpu_vendor() == "GenuineIntel" else "onednn"


QUANT_KERNELS = ("auto", "amx", "vnni", "torch")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo ('avx512_vnni', 'amx_tile', ...), empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def quant_kernel_problem() -> str | None:
    """Why our int8/int4 kernels (csrc/quant_linear.cpp) cannot run here, None where they can."""
    missing = sorted({"avx512bw", "avx512_vnni"} - cpu_flags())
    if missing:
        return f"this CPU lacks {' and '.join(missing)}"
    return panel_kernel_problem()


def amx_problem() -> str | None:
    """Why our kernels cannot put many-row int8/int4 passes on AMX tiles here, None where they can (the CPU has
    amx_tile and amx_int8 and Linux grants this process the tile state)."""
    missing = sorted({"amx_tile", "amx_int8"} - cpu_flags())
    if missing:
        return f"this CPU lacks {' and '.join(missing)}"
    problem = quant_kernel_problem()
    if problem:
        return problem
    if not amx_granted():
        return "Linux did not grant this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
    return None


@functools.cache
def amx_granted() -> bool:
    """Whether the extension can turn its AMX tiles on in this process (asked once; left off until quant_ops)."""
    module = panel_extension()
    on = module.quant_amx(True)
    module.quant_amx(False)
    return on


def quant_kernels() -> str:
    """Which kernels multiply int8 and int4 weights (quant.WeightOnlyLinear, chosen when a model is converted):
    'amx' or 'vnni' (ours, csrc/quant_linear.cpp: activations quantised per row to int8, integer dot products, the
    weights read once per call for all rows; 'amx' computes int8 passes of 4 or more rows and int4 passes of 13 or
    more on the AMX tiles of Intel Xeons from Sapphire Rapids, to the same bits) or 'torch' (torch's packed
    weight-only kernels on bfloat16 activations, built for one row). 'auto' (default) picks 'amx' where the CPU has
    AMX, else 'vnni' where it has AVX-512 VNNI (and the extension builds), else 'torch'; $SPECDEC_CPU_QUANT=
    amx|vnni|torch overrides it."""
    choice = os.environ.get("SPECDEC_CPU_QUANT", "auto").strip().lower() or "auto"
    if choice == "amx":
        return kernel_choice("SPECDEC_CPU_QUANT", QUANT_KERNELS, "amx", "SPECDEC_CPU_QUANT=vnni or torch",
                             amx_problem)
    choice = kernel_choice("SPECDEC_CPU_QUANT", QUANT_KERNELS, "vnni", "SPECDEC_CPU_QUANT=torch",
                           quant_kernel_problem)
    if choice != "auto":
        return choice
    if quant_kernel_problem() is not None:
        return "torch"
    return "amx" if amx_problem() is None else "vnni"


def quant_ops(fmt: str | None):
    """The `ops` for quant.apply_weights(model, fmt, ops): our extension for int8 and int4 where `quant_kernels`
    picks 'amx' or 'vnni' (the AMX tiles turned on or off for this process accordingly), else None (torch's)."""
    if fmt not in ("int8", "int4"):
        return None
    choice = quant_kernels()
    if choice == "torch":
        return None
    module = panel_extension()
    module.quant_amx(choice == "amx")
    return module


def prepare_model(model, linear: str | None = None):
    """Make `model` fast for our decoding loops, in place and once (later calls return at once).

    On a CPU with float32 weights: SDPA attention becomes `sdpa_gqa_attention`; with `linear` == 'panels'
    (default: `linear_kernels()`) every linear layer whose width is a multiple of 16 becomes a PanelLinear, the
    head included unless a trained drafter shares it (drafters.attach; a tied input embedding becomes a
    PanelEmbedding over the head's panels); with 'onednn' the
    head becomes a DenseOneDNNLinear and every other linear layer a PackedLinear; with 'mkl' only the head changes
    (to DenseOneDNNLinear). Packed layers free their dense weights, so memory does not grow. Elsewhere (GPU,
    float16, float64, accelerate device maps, tensor parallelism) the model is left as it is. Outputs agree with
    the stock layers to float32 rounding (another summation order).
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
    few_rows = few_row_attention if getattr(model, "_specdec_few_rows", False) else None
    intermediate = getattr(model.config, "intermediate_size", None)
    model._specdec_own_forward = llama_forward.llama_weights(
        model, few_rows, rope_attend if few_rows is not None else None,
        rms_norm if few_rows is not None and rms_norm_fits(model) else None,
        swiglu if few_rows is not None and isinstance(intermediate, int) and swiglu_matches(intermediate) else None,
        decoder_layers)
    return model


def use_fast_kernels(model, linear: str | None) -> None:
    """prepare_model's CPU float32 part: GQA verify attention (our few-row kernel where it runs:
    `attention_kernel`); our panel kernel for the decoder and the head (a
    tied input embedding then reads the head's panels), or packed oneDNN / MKL linears and a oneDNN head; own
    copies of the weights."""
    kind = linear or linear_kernels()
    use_gqa_attention(model)
    if attention_kernel() == "few-rows":  # steps and verify passes: our attention kernel, in both forwards
        model._specdec_few_rows = True
        for module in model.modules():
            if hasattr(module, "num_key_value_groups"):  # transformers' attention layers
                module._specdec_few_rows = True
    output = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    tied = embedding.weight if embedding is not None else None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child.weight.dtype != torch.float32:
                continue
            if (child is output and kind == "panels" and PanelLinear.fits(child)
                    and not getattr(model, "_specdec_head_shared", False)  # a drafter holds it: drafters.attach
                    and (child.weight is not tied or type(embedding) is torch.nn.Embedding)):
                head = PanelLinear(child)
                setattr(parent, name, head)
                if child.weight is tied:  # one matrix for both: the embedding reads the head's panels
                    model.set_input_embeddings(PanelEmbedding(embedding, head.packed))
            elif child is output or child.weight is tied:
                setattr(parent, name, DenseOneDNNLinear(child))
            elif kind == "panels" and PanelLinear.fits(child):
                setattr(parent, name, PanelLinear(child))
            elif kind in ("onednn", "panels"):  # a width our kernel does not tile goes to oneDNN
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
