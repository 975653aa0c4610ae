"""Our one-call gated MLP activation (csrc/swiglu.cpp, kernels.swiglu) gives torch's F.silu(gate) * up bits, and our
forward uses it only where it does (kernels.swiglu_matches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specdec.model import kernels
from specdec.model.kernels import prepare_model, swiglu, swiglu_matches
from tiny import needs_panels, tiny_target


def torchs(gate_up: torch.Tensor, width: int) -> torch.Tensor:
    return F.silu(gate_up[:, :width]) * gate_up[:, width:]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:  # NaN payloads included
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@needs_panels
@pytest.mark.parametrize("width", [1, 7, 16, 31, 32, 33, 64, 100, 576, 1536, 1537, 8192])
def test_swiglu_is_torchs_bit_for_bit(width):
    generator = torch.Generator().manual_seed(width)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, -88.5, 88.5, -104.0,
                            87.0, -87.0, 1e-20, -20.0, 20.0])
    for rows in (1, 2, 3, 16, 40):
        for scale in (1e-3, 1.0, 10.0, 100.0):
            gate_up = torch.randn(rows, 2 * width, generator=generator) * scale
            n = min(len(special), 2 * width)
            gate_up[0, :n] = special[:n]              # gates (and for narrow rows, ups) at the edges of exp's range
            gate_up[-1, -n:] = special[:n]            # ups, and the last row's scalar tail
            assert same_bits(swiglu(gate_up, width), torchs(gate_up, width))
    wide = torch.randn(5, 2 * width + 40, generator=generator)
    rows = wide[:, 20:20 + 2 * width]  # rows of a wider tensor: contiguous along the row only
    assert same_bits(swiglu(rows, width), torchs(rows, width))


@needs_panels
def test_swiglu_refuses_what_it_does_not_compute():
    with pytest.raises(RuntimeError, match="float32"):
        swiglu(torch.randn(2, 64, dtype=torch.float64), 32)
    with pytest.raises(RuntimeError, match="2 \\* intermediate"):
        swiglu(torch.randn(2, 64), 31)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        swiglu(torch.randn(64, 2).t(), 32)


@needs_panels
def test_our_forward_uses_it_only_where_it_matches_torch(monkeypatch):
    monkeypatch.setenv("SPECDEC_CPU_LINEAR", "panels")
    model = prepare_model(tiny_target(dtype=torch.float32))
    assert swiglu_matches(model.config.intermediate_size)
    assert model._specdec_own_forward.swiglu is kernels.swiglu
    # a kernel whose bits differ from torch's (here: one ulp off) is found out and left unused
    swiglu_matches.cache_clear()
    real = kernels.swiglu
    monkeypatch.setattr(kernels, "swiglu", lambda x, n: torch.nextafter(real(x, n), torch.tensor(1e9)))
    try:
        assert not swiglu_matches(model.config.intermediate_size)
        model._specdec_prepared = False
        assert prepare_model(model)._specdec_own_forward.swiglu is None
    finally:
        swiglu_matches.cache_clear()


@needs_panels
def test_a_torch_without_sleefs_exp_keeps_torchs_operators(monkeypatch):
    def unavailable(gate_up, width):  # what the extension raises where dlsym finds no Sleef_expf16_u10
        raise RuntimeError("swiglu: this torch does not export Sleef_expf16_u10")
    swiglu_matches.cache_clear()
    monkeypatch.setattr(kernels, "swiglu", unavailable)
    monkeypatch.setenv("SPECDEC_CPU_LINEAR", "panels")
    try:
        assert not swiglu_matches(64)
        model = prepare_model(tiny_target(dtype=torch.float32))
        assert model._specdec_own_forward is not None and model._specdec_own_forward.swiglu is None
    finally:
        swiglu_matches.cache_clear()
