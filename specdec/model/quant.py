"""Weight formats of our engine: float32, and bfloat16 / int8 / int4 weight-only linear layers, applied after loading.

As gpt-fast does it, the weights of every linear layer are stored in the format and multiplied by torch's packed
CPU kernels:

* bfloat16 — the weight in bfloat16, `torch.nn.functional.linear` in bfloat16.
* int8 — per output channel, symmetric: w ≈ q · scale, q in [-128, 127]; `torch.ops.aten._weight_int8pack_mm`.
* int4 — per group of INT4_GROUP input weights, asymmetric: w ≈ (q − 8) · scale + zero, q in [0, 15] (gpt-fast's
  layout); packed by `_convert_weight_to_int4pack_for_cpu`, multiplied by `_weight_int4pack_mm_for_cpu`. The
  output head stays int8, as the GGUF keeps its embedding/head at Q8_0: the argmax is what greedy decoding keeps.

Unlike gpt-fast, the rest of the model keeps its dtype (float32 for the embedded model): each layer casts its input
to bfloat16 for the kernel and its output back. The packed kernels are fast only for bfloat16 inputs (all 210
decoder matrices of SmolLM2-135M, one row, one thread, 2-core EPYC: int8 17 ms and int4 9 ms with bfloat16 inputs,
136 and 318 ms with float32 inputs, against 43 ms for float32 in pre-packed oneDNN). These layers give each row
bit-identical results whatever the number of rows (tested on the tiny models' shapes; not bfloat16 over SmolLM2's
1536-wide down projection: below), and the residual stream, norms and attention keep
their precision. `kernels.prepare_model` swaps only exact float32 `nn.Linear` layers for oneDNN, so it leaves
these layers alone (and still gives float32 attention its verify-pass variant).

Greedy identity of speculative decoding with its own plain decoding is then exact only as far as attention is:
torch's float32 SDPA returns a 5-query verify pass within ~4e-7 of five 1-query steps, not bit-identically, and
the cast to bfloat16 before the next matmul turns a few of those differences into a bfloat16 rounding step, which
can flip a near-tied argmax later on (a whole-bfloat16 model is worse: bfloat16 attention differs by far more).
docs/engines.md reports the share of identical outputs on the suite; the tests check exact identity where attention is
exact to the bits that matter (the float64 tiny model). $SPECDEC_EXACT_ATTENTION=1 computes verify passes'
attention row by row (kernels.attention_row_by_row): every other layer already gives each row the same bits, so
greedy speculative decoding is then identical to plain decoding in these formats too (a diagnostic: slower).
Where our few-row attention kernel runs (kernels.attention_kernel) attention is row-invariant without that cost,
and int8 and int4 verify passes give each row its one-row step's bits; bfloat16's down projection (torch's
bfloat16 matmul over 1536 inputs in SmolLM2) still does not (docs/engines.md, "Identity").

Our int8/int4 kernels (csrc/quant_linear.cpp, chosen by kernels.quant_kernels where the CPU has AVX-512 VNNI;
$SPECDEC_CPU_QUANT=vnni|torch overrides): the same weights (the format's bfloat16 scales and zeros), but the
activations quantised per row to int8 (scale max|x| / 127) and multiplied with integer dot products, the weights
read once per call for any number of rows. A verify pass of k + 1 rows then costs little more than a step
(docs/kernels.md). The activation rounding moves outputs a little further from float32 than the weight-only path
(tests/test_quant.py's bounds hold for both); each row's bits stay independent of the other rows, so greedy
speculative decoding equals plain decoding in the same format and kernels.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import nn

WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")  # models.WEIGHT_FORMATS validates aliases against the same
INT4_GROUP = 32  # divides every matrix width of SmolLM2 (576, 1536; 128 does not divide 576), Q4_1's block too
KERNEL_DTYPE = torch.bfloat16


class WeightFormatError(ValueError):
    """A weight format that is unknown or cannot run here (one-line message)."""


def check_format(fmt: str | None, device: str = "cpu") -> None:
    """Refuse an unknown format, or an integer format off the CPU, before any model loads."""
    if fmt is None:
        return
    if fmt not in WEIGHT_FORMATS:
        raise WeightFormatError(f"weight format '{fmt}' is not one of {', '.join(WEIGHT_FORMATS)}")
    if fmt in ("int8", "int4") and not str(device).startswith("cpu"):
        raise WeightFormatError(f"weight format '{fmt}' uses torch's packed CPU kernels and runs on the CPU only, "
                                f"not on '{device}': use float32 or bfloat16 there")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q [N, K] int8, scales [N] float32) with weight ≈ q · scales[:, None]."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group asymmetric int4: (q [N, K] int32 in 0..15, scales_and_zeros [K / group, N, 2] float32) with
    weight ≈ (q − 8) · scale + zero, zero = min + 8 · scale (gpt-fast's convention)."""
    w = weight.detach().float()
    rows, cols = w.shape
    groups = w.reshape(-1, group)
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    scales = ((high - low) / 15).clamp(min=1e-6)
    zeros = low + 8 * scales
    q = ((groups - low) / scales).round().clamp(0, 15).to(torch.int32).reshape(rows, cols)
    scales_and_zeros = torch.cat([scales.reshape(rows, -1, 1), zeros.reshape(rows, -1, 1)], dim=2)
    return q, scales_and_zeros.transpose(0, 1).contiguous()


def int4_fits(linear: nn.Linear, group: int = INT4_GROUP) -> bool:
    """The int4 kernels' shape rules: whole groups along the input, output rows in blocks of 16."""
    return linear.in_features % group == 0 and linear.out_features % 16 == 0


def int4_matmul(x, weight, group, scales, bias):
    """x [rows, in] (any float dtype) times an int4-packed weight: in bfloat16, back in x's dtype, plus bias."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), weight, group, scales).to(x.dtype)
    return y if bias is None else y + bias


def int8_matmul(x, weight, scales, bias):
    y = torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), weight, scales).to(x.dtype)
    return y if bias is None else y + bias


def bfloat16_matmul(x, weight, bias):
    y = torch.nn.functional.linear(x.to(KERNEL_DTYPE), weight).to(x.dtype)
    return y if bias is None else y + bias


def pack_int8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our VNNI kernel's int8 layout: q [N, K] -> (packed [Np/16, Kp/4, 64]: 16 output columns side by side, 4
    consecutive inputs of each, zero-padded to Np, Kp multiples of 16 and 4; col_sums [Np] int32 = 128 sum_k q)."""
    rows, cols = q.shape
    padded = torch.nn.functional.pad(q, (0, -cols % 4, 0, -rows % 16))
    np_, kp = padded.shape
    packed = padded.reshape(np_ // 16, 16, kp // 4, 4).transpose(1, 2).reshape(np_ // 16, kp // 4, 64)
    return packed.contiguous(), (128 * padded.to(torch.int32).sum(dim=1)).to(torch.int32)


def pack_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our VNNI kernel's int4 layout: q [N, K] in 0..15 -> packed [N/16, K/8, 64] bytes, byte (column j, i) of
    input octet o holding q[16p + j, 8o + i] low and q[16p + j, 8o + 4 + i] high; scales_and_zeros [K/G, N, 2]
    -> bfloat16 [N/16, K/G, 2, 16] (a panel's 16 scales, then its 16 zeros, per group)."""
    rows, cols = q.shape
    nibbles = q.to(torch.uint8).reshape(rows // 16, 16, cols // 8, 2, 4).permute(0, 2, 1, 3, 4)
    packed = (nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).reshape(rows // 16, cols // 8, 64)
    groups = scales_and_zeros.shape[0]
    sz = scales_and_zeros.to(KERNEL_DTYPE).reshape(groups, rows // 16, 16, 2).permute(1, 0, 3, 2)
    return packed.contiguous(), sz.contiguous()


def vnni_int8_matmul(x, op, weight, col_sums, scales, out_features, bias):
    """x [rows, in] (any float dtype) times a pack_int8 weight in our VNNI kernel `op` (the extension's
    int8_linear: int8 activations, per row), back in x's dtype, plus bias. float32 (our forward's states) goes
    straight in: two no-op conversions cost ~1 us a call, 121 calls a pass."""
    if x.dtype == torch.float32:
        y = op(x, weight, col_sums, scales, out_features)
    else:
        y = op(x.float(), weight, col_sums, scales, out_features).to(x.dtype)
    return y if bias is None else y + bias


def vnni_int4_matmul(x, op, weight, group, scales, bias):
    """vnni_int8_matmul for a pack_int4 weight (the extension's int4_linear)."""
    y = op(x, weight, scales, group) if x.dtype == torch.float32 else op(x.float(), weight, scales, group).to(x.dtype)
    return y if bias is None else y + bias


class WeightOnlyLinear(nn.Module):
    """An nn.Linear whose weight is stored as `fmt` (bfloat16, int8 or int4); input and output keep the caller's
    dtype. int8 and int4 run our VNNI kernels where `ops` is given (kernels.quant_ops(): the extension module;
    the weights packed for it here, the activations quantised per row to int8 on every call), else torch's packed
    kernels on bfloat16 activations. bfloat16 multiplies in bfloat16."""

    def __init__(self, linear: nn.Linear, fmt: str, group: int = INT4_GROUP, ops=None):
        super().__init__()
        self.fmt, self.group = fmt, group
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.kernels = "vnni" if ops is not None and fmt in ("int8", "int4") else "torch"
        # the extension's function, not its module: a deep copy of the model copies the layer (modules do not copy)
        self.op = getattr(ops, f"{fmt}_linear") if self.kernels == "vnni" else None
        if fmt == "int4":
            if not int4_fits(linear, group) or (self.kernels == "vnni" and group % 8):
                raise WeightFormatError(f"int4 needs in_features divisible by the group size {group} (a multiple of "
                                        f"8) and out_features by 16, got {linear.in_features} and "
                                        f"{linear.out_features}")
            q, scales_and_zeros = quantize_int4(linear.weight, group)
            if self.kernels == "vnni":
                weight, scales = pack_int4(q, scales_and_zeros)
            else:
                weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
                scales = scales_and_zeros.to(KERNEL_DTYPE)
            self.register_buffer("weight", weight)
            self.register_buffer("scales", scales)
        elif fmt == "int8":
            q, scales = quantize_int8(linear.weight)
            scales = scales.to(KERNEL_DTYPE)  # the format's scales, whichever kernel multiplies them
            if self.kernels == "vnni":
                weight, col_sums = pack_int8(q)
                self.register_buffer("weight", weight)
                self.register_buffer("col_sums", col_sums)
                self.register_buffer("scales", torch.nn.functional.pad(scales.float(), (0, -len(scales) % 16)))
            else:
                self.register_buffer("weight", q)
                self.register_buffer("scales", scales)
        elif fmt == "bfloat16":
            self.register_buffer("weight", linear.weight.detach().to(KERNEL_DTYPE))
            self.scales = None
        else:
            raise WeightFormatError(f"no weight-only layer for format '{fmt}'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel()(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    def kernel(self):
        """The bare call on 2-D inputs (llama_forward calls it without the module): a partial, so a deep copy of
        the model gets one over the copied weights."""
        if self.fmt == "int4" and self.kernels == "vnni":
            return functools.partial(vnni_int4_matmul, op=self.op, weight=self.weight, group=self.group,
                                     scales=self.scales, bias=self.bias)
        if self.fmt == "int8" and self.kernels == "vnni":
            return functools.partial(vnni_int8_matmul, op=self.op, weight=self.weight, col_sums=self.col_sums,
                                     scales=self.scales, out_features=self.out_features, bias=self.bias)
        if self.fmt == "int4":
            return functools.partial(int4_matmul, weight=self.weight, group=self.group, scales=self.scales,
                                     bias=self.bias)
        if self.fmt == "int8":
            return functools.partial(int8_matmul, weight=self.weight, scales=self.scales, bias=self.bias)
        return functools.partial(bfloat16_matmul, weight=self.weight, bias=self.bias)

    def native_call(self) -> tuple[str, int, tuple[torch.Tensor, ...]] | None:
        """(kernel, parameter, tensors) for csrc/decoder_layers.cpp's own call of our int8/int4 kernel
        (llama_forward.native_part); None on torch's kernels or with a bias, which that call does not add."""
        if self.kernels != "vnni" or self.bias is not None:
            return None
        if self.fmt == "int4":
            return "int4", self.group, (self.weight, self.scales)
        return "int8", self.out_features, (self.weight, self.col_sums, self.scales)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"
                + (f", kernels={self.kernels}" if self.fmt in ("int8", "int4") else ""))


# Projections of one input that a decoder layer computes one after another (transformers' names): with weight-only
# formats they become one matmul each, as gpt-fast's fused wqkv. A 1-token step of SmolLM2-135M in int4 then makes
# 4 kernel calls and 4 casts per layer instead of 7 of each (docs/speed.md: the time a step spends outside the kernels).
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedWeightOnly(nn.Module):
    """Several projections of the same input as one WeightOnlyLinear over their concatenated weights. The model
    still calls each projection by name (ProjectionSlice): the first call computes all outputs, the others take
    their slice of it while the input is the same tensor object and their part is still unread; any other call
    computes afresh, so a caller that calls them in another order or on other inputs still gets exact results.
    (Identity, not a version check: inference tensors keep no version counter, and no decoder layer writes into
    its normed input between its projections.)"""

    def __init__(self, linears: list[nn.Linear], fmt: str, ops=None):
        super().__init__()
        first = linears[0]
        joined = nn.Linear(first.in_features, sum(l.out_features for l in linears), bias=first.bias is not None)
        with torch.no_grad():
            joined.weight.copy_(torch.cat([l.weight.detach() for l in linears]))
            if first.bias is not None:
                joined.bias.copy_(torch.cat([l.bias.detach() for l in linears]))
        self.linear = WeightOnlyLinear(joined, fmt, ops=ops)
        self.sizes = [l.out_features for l in linears]
        self.pending = SimpleNamespace(input=None, outputs=(), unread=set())  # plain attributes: no Module setattr

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        pending = self.pending
        if x is not pending.input or index not in pending.unread:
            pending.input, pending.outputs = x, self.linear(x).split(self.sizes, dim=-1)
            pending.unread = set(range(len(self.sizes)))
        pending.unread.discard(index)
        out = pending.outputs[index]
        if not pending.unread:  # every projection read its part: hold no activations between passes
            pending.input, pending.outputs = None, ()
        return out


class ProjectionSlice(nn.Module):
    """Projection `index` of a FusedWeightOnly, in the place of the nn.Linear it replaces."""

    def __init__(self, fused: FusedWeightOnly, index: int):
        super().__init__()
        self.fused, self.index = [fused], index  # a list: the fused module is registered once, on the parent
        self.in_features, self.out_features = fused.linear.in_features, fused.sizes[index]
        self.fmt = fused.linear.fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0].output(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of a fused {self.fmt} projection, out_features={self.out_features}"


def fuse_projections(parent: nn.Module, fmt: str, ops=None) -> None:
    """Replace each group of FUSED_PROJECTIONS that `parent` holds as plain nn.Linear layers of one input width
    (and all with or all without bias, int4-shaped for int4) by a FusedWeightOnly and its slices."""
    for names in FUSED_PROJECTIONS:
        linears = [getattr(parent, name, None) for name in names]
        if not all(type(l) is nn.Linear for l in linears):
            continue
        if len({(l.in_features, l.bias is None) for l in linears}) != 1:
            continue
        if fmt == "int4" and not all(int4_fits(l) for l in linears):
            continue
        fused = FusedWeightOnly(linears, fmt, ops)
        parent.add_module("_".join(name.removesuffix("_proj") for name in names) + "_fused", fused)
        for index, name in enumerate(names):
            setattr(parent, name, ProjectionSlice(fused, index))


def weight_format(model) -> str:
    """The format of a model's linear layers: int4, int8, bfloat16 (weight-only), else its parameters' dtype.
    int4 models keep an int8 head, so int4 wins over int8."""
    formats = {m.fmt for m in model.modules() if isinstance(m, WeightOnlyLinear)}
    for fmt in ("int4", "int8", "bfloat16"):
        if fmt in formats:
            return fmt
    param = next(model.parameters(), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "unknown"


def apply_weights(model, fmt: str | None, ops=None):
    """Convert a freshly loaded model (before kernels.prepare_model) to the weight format `fmt`, in place.

    float32 casts every parameter to float32. bfloat16 / int8 / int4 replace every nn.Linear by a
    WeightOnlyLinear (with int4, the output head and any layer whose width is not a multiple of INT4_GROUP take
    int8) and leave everything else in the dtype it was loaded in (float32 for the embedded model). A head tied
    to the input embedding gets its own copy; the embedding stays a table (a lookup reads one row per token).
    None leaves the model as it was loaded (the alias's dtype). int8 and int4 layers run our VNNI kernels where
    `ops` is kernels.quant_ops()'s extension (models.load_model passes this CPU's choice), else torch's.
    """
    if fmt is None:
        return model
    check_format(fmt, str(next(model.parameters()).device))
    if getattr(model, "_specdec_prepared", False):
        raise WeightFormatError("apply_weights must run before kernels.prepare_model repacks the layers")
    if fmt == "float32":
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.float()
        return model
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        fuse_projections(parent, fmt, ops)
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            int8_instead = fmt == "int4" and (child is head or not int4_fits(child))
            setattr(parent, name, WeightOnlyLinear(child, "int8" if int8_instead else fmt, ops=ops))
    return model
