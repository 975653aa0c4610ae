"""Our multi-row int8/int4 kernels (specdec/model/csrc/quant_linear.cpp): the product of the dequantised weights
with the activations quantised per row (float64 reference) within float32 rounding, each row's bits independent of
the other rows, the kernel choice and its fallback on CPUs without VNNI, and greedy identity of every method with
plain decoding through them."""

from __future__ import annotations

import pytest
import torch

from specdec.model import kernels, quant
from specdec.model.decoding import DecodeSettings
from specdec.model.kernels import prepare_model
from specdec.run.runner import decode_models
from tiny import EOS, needs_amx, needs_vnni, noisy_copy, prompts, tiny_target

ROWS = list(range(1, 18)) + [31, 33, 64, 67]  # 33 and 67: a block of 32 rows (int4_tile_rows) and a tail


def quantized_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantisation: per row scale = max|x| / 127, xq = round-half-even(x / scale)."""
    scale = x.abs().amax(dim=1) / 127
    xq = torch.where(scale[:, None] > 0, (x / scale[:, None]).round(), 0.0).clamp(-127, 127)
    return xq.double(), scale.double()


def int8_reference(x, q, scales):
    """(float64 product, float64 product of absolute values) of the quantised rows and the dequantised weights."""
    xq, s = quantized_rows(x)
    w = q.double() * scales.to(quant.KERNEL_DTYPE).double()[:, None]
    return (xq * s[:, None]) @ w.T, (xq.abs() * s[:, None]) @ w.abs().T


def int4_reference(x, q, scales_and_zeros, group):
    xq, s = quantized_rows(x)
    sz = scales_and_zeros.to(quant.KERNEL_DTYPE).double()  # [K / group, N, 2]
    scale, zero = (sz[..., i].T.repeat_interleave(group, dim=1) for i in (0, 1))
    low = zero - 8 * scale  # w = q * scale + low, the kernel's split: both terms' sizes bound its rounding
    exact = (xq * s[:, None]) @ ((q.double() - 8) * scale + zero).T
    return exact, (xq.abs() * s[:, None]) @ (q.double() * scale.abs()).T + (xq.abs() * s[:, None]) @ low.abs().T


@pytest.fixture(autouse=True)
def amx_off_after():
    """The AMX switch is the process's: a test that turned it on (or failed with it on) leaves it off."""
    yield
    if kernels.quant_kernel_problem() is None:
        kernels.panel_extension().quant_amx(False)


def layer(fmt: str, out_features: int, in_features: int, seed: int, **kw):
    """(a WeightOnlyLinear on our kernels, its float32 weight)."""
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen))
    return quant.WeightOnlyLinear(linear, fmt, ops=kernels.panel_extension(), **kw), linear.weight.detach()


def check_rows(module: quant.WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """The module's output for x, after checking every row alone and an inner slice give the same bits."""
    y = module(x)
    assert y.shape == (len(x), module.out_features) and y.dtype == x.dtype
    assert torch.equal(torch.cat([module(x[i:i + 1]) for i in range(len(x))]), y)
    if len(x) > 3:
        assert torch.equal(module(x[1:-1]), y[1:-1])
    return y


@needs_vnni
@pytest.mark.parametrize("out_features,in_features", [(16, 4), (40, 7), (80, 33), (192, 576), (576, 1536)])
def test_int8_kernel_is_the_reference_product_and_row_independent(out_features, in_features):
    module, weight = layer("int8", out_features, in_features, seed=out_features + in_features)
    q, scales = quant.quantize_int8(weight)
    gen = torch.Generator().manual_seed(1)
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
        y = check_rows(module, x)
        exact, size = int8_reference(x, q, scales)
        # the integer sum is exact; its conversion to float32 and two products round: 3 float32 ulps of the size
        assert ((y.double() - exact).abs() <= 3 * 2 ** -24 * size + 1e-30).all()


@needs_vnni
@pytest.mark.parametrize("out_features,in_features,group", [(16, 32, 32), (48, 64, 32), (576, 576, 32),
                                                            (192, 1536, 32), (64, 256, 64), (32, 256, 128),
                                                            (16, 24, 8)])
def test_int4_kernel_is_the_reference_product_and_row_independent(out_features, in_features, group):
    module, weight = layer("int4", out_features, in_features, seed=out_features + in_features, group=group)
    q, scales_and_zeros = quant.quantize_int4(weight, group)
    gen = torch.Generator().manual_seed(2)
    groups = in_features // group
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
        y = check_rows(module, x)
        exact, size = int4_reference(x, q, scales_and_zeros, group)
        # per group two fused multiply-adds into the float32 sum, then the row's scale: 2 ulps per group + 1
        assert ((y.double() - exact).abs() <= (2 * groups + 2) * 2 ** -24 * size + 1e-30).all()


@needs_vnni
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_activations_are_quantised_and_a_row_of_zeros_gives_zeros(fmt):
    """Not the weight-only product: the references above would not hold without the rows' quantisation (its
    error is far above float32 rounding), and a row of zeros (scale 0) is multiplied as zeros, not as NaN."""
    module, weight = layer(fmt, 64, 64, seed=3)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    x[2] = 0
    y = module(x)
    assert torch.equal(y[2], torch.zeros(64)) and torch.isfinite(y).all()
    if fmt == "int8":
        q, scales = quant.quantize_int8(weight)
        exact, _ = int8_reference(x, q, scales)
        dequantized = q.double() * scales.to(quant.KERNEL_DTYPE).double()[:, None]
    else:
        q, scales_and_zeros = quant.quantize_int4(weight)
        exact, _ = int4_reference(x, q, scales_and_zeros, quant.INT4_GROUP)
        sz = scales_and_zeros.to(quant.KERNEL_DTYPE).double()
        scale, zero = (sz[..., i].T.repeat_interleave(quant.INT4_GROUP, dim=1) for i in (0, 1))
        dequantized = (q.double() - 8) * scale + zero
    weight_only = x.double() @ dequantized.T
    assert (exact - weight_only).abs().max() > 1e-3 * weight_only.abs().max()
    assert (y.double() - exact).abs().max() < 1e-5 * weight_only.abs().max()


def kernel_quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """The kernel's xq of the rows of x, read back exactly through int8_linear with an identity weight: y[m, n] =
    xq[m, n] * 127 * scale_m * s[n] (the weight's q is 127 on the diagonal, s[n] its scale)."""
    width = x.shape[1]
    linear = torch.nn.Linear(width, width, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(width))
    module = quant.WeightOnlyLinear(linear, "int8", ops=kernels.panel_extension())
    y = module(x).double()
    scale = x.abs().amax(dim=1, keepdim=True) / 127
    return (y / (scale.double() * 127 * module.scales[:width].double())).round()


@needs_vnni
@pytest.mark.parametrize("amax", [1.0, 3.7, 1e-3, 123.456, 2.0 ** -100, 1e-37, 1e30])
def test_activation_quantisation_is_the_true_divisions_at_every_half_integer(amax):
    """The kernel multiplies by the scale's reciprocal where that cannot change the rounding and divides where it
    could: on quotients at and within 3 ulps of every half-integer k + 0.5 (the cases a multiply rounds the other way
    now and then), xq equals torch's round-half-even of the true division, clamped (and a scale whose reciprocal
    overflows, 1e-37 / 127, divides everywhere)."""
    scale = torch.tensor(amax, dtype=torch.float32) / 127
    halves = (torch.arange(-127, 127).float() + 0.5) * scale
    rows, up, down = [halves], halves.clone(), halves.clone()
    for _ in range(3):
        up, down = torch.nextafter(up, up + abs(amax)), torch.nextafter(down, down - abs(amax))
        rows += [up.clone(), down.clone()]
    rows.append(torch.randn(254, generator=torch.Generator().manual_seed(5)) * amax / 4)
    # each row's max|x| is amax itself (the last column), so its scale is `scale`
    x = torch.stack([torch.cat([r.clamp(-amax, amax), torch.tensor([-amax / 2, amax])]) for r in rows])
    expected = (x / scale).round().clamp(-127, 127)
    assert torch.equal(kernel_quantized_rows(x), expected.double())


@needs_vnni
def test_int_kernels_reject_what_they_cannot_multiply():
    module, _ = layer("int8", 32, 8, seed=5)
    with pytest.raises(RuntimeError, match="Kp = x.size"):
        kernels.panel_extension().int8_linear(torch.randn(2, 9), module.weight, module.col_sums, module.scales, 32)
    with pytest.raises(RuntimeError, match="2-D float32"):
        kernels.panel_extension().int8_linear(torch.randn(2, 8).double(), module.weight, module.col_sums,
                                              module.scales, 32)
    module, _ = layer("int4", 32, 64, seed=6)
    with pytest.raises(RuntimeError, match="multiple of 8 that divides"):
        kernels.panel_extension().int4_linear(torch.randn(2, 64), module.weight, module.scales, 48)
    with pytest.raises(RuntimeError, match=r"K = x.size\(1\)"):
        kernels.panel_extension().int4_linear(torch.randn(2, 96), module.weight, module.scales, 32)


def test_vnni_is_chosen_where_it_runs_and_torch_elsewhere(monkeypatch):
    monkeypatch.delenv("SPECDEC_CPU_QUANT", raising=False)
    monkeypatch.setattr(kernels, "panel_kernel_problem", lambda: None)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_vnni"})
    assert kernels.quant_kernels() == "vnni"
    monkeypatch.setenv("SPECDEC_CPU_QUANT", "torch")
    assert kernels.quant_kernels() == "torch"
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx512f", "avx512bw"})  # an AVX-512 CPU without VNNI
    monkeypatch.setenv("SPECDEC_CPU_QUANT", "auto")
    assert kernels.quant_kernels() == "torch"
    monkeypatch.setenv("SPECDEC_CPU_QUANT", "vnni")
    with pytest.raises(ValueError, match="SPECDEC_CPU_QUANT=vnni cannot run here: this CPU lacks avx512_vnni; "
                                         "set SPECDEC_CPU_QUANT=torch"):
        kernels.quant_kernels()
    monkeypatch.setenv("SPECDEC_CPU_QUANT", "tiles")
    with pytest.raises(ValueError, match="SPECDEC_CPU_QUANT must be one of auto, amx, vnni, torch, got 'tiles'"):
        kernels.quant_kernels()


def test_amx_is_chosen_where_the_cpu_and_linux_allow_it(monkeypatch):
    monkeypatch.delenv("SPECDEC_CPU_QUANT", raising=False)
    monkeypatch.setattr(kernels, "panel_kernel_problem", lambda: None)
    vnni = {"avx512f", "avx512bw", "avx512_vnni"}
    monkeypatch.setattr(kernels, "cpu_flags", lambda: vnni | {"amx_tile", "amx_int8"})
    monkeypatch.setattr(kernels, "amx_granted", lambda: True)
    assert kernels.quant_kernels() == "amx"
    monkeypatch.setattr(kernels, "amx_granted", lambda: False)  # an old kernel: no tile state for the process
    assert kernels.quant_kernels() == "vnni"
    monkeypatch.setenv("SPECDEC_CPU_QUANT", "amx")
    with pytest.raises(ValueError, match="SPECDEC_CPU_QUANT=amx cannot run here: Linux did not grant"):
        kernels.quant_kernels()
    monkeypatch.setattr(kernels, "cpu_flags", lambda: vnni)  # an AMD EPYC
    with pytest.raises(ValueError, match="SPECDEC_CPU_QUANT=amx cannot run here: this CPU lacks amx_int8 and "
                                         "amx_tile; set SPECDEC_CPU_QUANT=vnni or torch"):
        kernels.quant_kernels()
    monkeypatch.setenv("SPECDEC_CPU_QUANT", "auto")
    assert kernels.quant_kernels() == "vnni"


@needs_amx
@pytest.mark.parametrize("fmt,out_features,in_features", [
    ("int8", 16, 64), ("int8", 80, 576), ("int8", 576, 1536), ("int8", 40, 70),  # K % 64 != 0: VNNI tiles instead
    ("int4", 16, 32), ("int4", 48, 64), ("int4", 576, 576), ("int4", 1536, 576), ("int4", 64, 256)])
def test_amx_tiles_give_the_vnni_tiles_bits(fmt, out_features, in_features):
    """Every row count, odd panel counts (48, 80 columns: a lone last panel) and blocks of 16 and 32 rows: the AMX
    pass is bit for bit the VNNI pass (the integer sums are exact, the float epilogue is the same), and rows stay
    independent of their neighbours with the tiles on."""
    module, _ = layer(fmt, out_features, in_features, seed=out_features * in_features)
    ops = kernels.panel_extension()
    gen = torch.Generator().manual_seed(7)
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
        assert not ops.quant_amx(False)
        vnni = module(x)
        assert ops.quant_amx(True)
        assert torch.equal(check_rows(module, x), vnni), rows


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_cpu_without_vnni_falls_back_to_torchs_kernels(fmt, monkeypatch):
    monkeypatch.delenv("SPECDEC_CPU_QUANT", raising=False)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx512f"})
    assert kernels.quant_ops(fmt) is None
    module = quant.WeightOnlyLinear(torch.nn.Linear(64, 32), fmt, ops=kernels.quant_ops(fmt))
    assert module.kernels == "torch"
    assert module.kernel().func is (quant.int4_matmul if fmt == "int4" else quant.int8_matmul)
    x = torch.randn(3, 64)
    assert torch.equal(module(x)[1:2], module(x[1:2]))


@needs_vnni
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("kernel", ["vnni", pytest.param("amx", marks=needs_amx)])
def test_every_method_decodes_as_plain_decoding_through_our_kernels(fmt, kernel, monkeypatch):
    """float32 tiny model prepared as the engine runs it (our few-row attention where it builds): every layer
    gives each row its one-row bits, so greedy outputs are identical, trees and draft models included."""
    monkeypatch.setenv("SPECDEC_CPU_QUANT", kernel)
    model = prepare_model(quant.apply_weights(tiny_target(dtype=torch.float32), fmt, kernels.quant_ops(fmt)))
    assert {m.kernels for m in model.modules() if isinstance(m, quant.WeightOnlyLinear)} == {"vnni"}
    assert kernels.panel_extension().quant_amx(kernel == "amx") == (kernel == "amx")  # what quant_ops left on
    draft = prepare_model(quant.apply_weights(noisy_copy(tiny_target(dtype=torch.float32), 0.3), fmt,
                                              kernels.quant_ops(fmt)))
    s = DecodeSettings(max_new_tokens=16, k=8, tree_budget=14)
    accepted = 0
    for ids in prompts(4):
        plain = decode_models("baseline", model, ids, s, {EOS})
        for strategy in ("ngram", "dynamic-tree", "suffix", "speculative"):
            out = decode_models(strategy, model, ids, s, {EOS},
                                draft_model=draft if strategy == "speculative" else None)
            assert out.tokens == plain.tokens, strategy
            accepted += sum(out.accepted_per_position)
    assert accepted > 0  # the accept path ran, not only rejections
