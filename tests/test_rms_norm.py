"""Our one-call RMSNorm (csrc/rms_norm.cpp, kernels.rms_norm) gives torch.rms_norm's bits, and our forward uses it
only where it does (kernels.rms_norm_matches)."""

from __future__ import annotations

import pytest
import torch

from specdec.model import kernels
from specdec.model.kernels import prepare_model, rms_norm, rms_norm_fits, rms_norm_matches
from tiny import needs_panels, tiny_target


@needs_panels
@pytest.mark.parametrize("width", [8, 16, 17, 63, 64, 65, 100, 576, 960, 1536, 2049, 4096, 5000, 8192, 16384])
def test_rms_norm_is_torchs_bit_for_bit(width):
    generator = torch.Generator().manual_seed(width)
    for rows in (1, 2, 3, 16, 40):
        for scale in (1e-3, 1.0, 40.0):
            for eps in (1e-5, 1e-6):
                x = torch.randn(rows, width, generator=generator) * scale
                weight = torch.randn(width, generator=generator)
                assert torch.equal(rms_norm(x, weight, eps), torch.rms_norm(x, (width,), weight, eps))
    wide = torch.randn(5, width + 40, generator=generator)
    rows = wide[:, 20:20 + width]  # rows of a wider tensor: contiguous along the row only
    weight = torch.randn(width, generator=generator)
    assert torch.equal(rms_norm(rows, weight, 1e-5), torch.rms_norm(rows, (width,), weight, 1e-5))


@needs_panels
def test_rms_norm_refuses_what_it_does_not_compute():
    with pytest.raises(RuntimeError, match="float32"):
        rms_norm(torch.randn(2, 64, dtype=torch.float64), torch.randn(64), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        rms_norm(torch.randn(64, 2).t(), torch.randn(64), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        rms_norm(torch.randn(2, 64), torch.randn(32), 1e-5)


@needs_panels
def test_our_forward_uses_it_only_where_it_matches_torch(monkeypatch):
    assert rms_norm_matches(64, 1e-6) and not rms_norm_matches(kernels.RMS_NORM_WIDEST + 1, 1e-6)
    monkeypatch.setenv("SPECDEC_CPU_LINEAR", "panels")
    model = prepare_model(tiny_target(dtype=torch.float32))
    ours = model._specdec_own_forward
    assert ours.norm_kernel is kernels.rms_norm
    # a kernel whose bits differ from torch's (here: one ulp off) is found out and left unused
    rms_norm_matches.cache_clear()
    real = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda x, w, eps: torch.nextafter(real(x, w, eps), torch.tensor(1e9)))
    try:
        assert not rms_norm_matches(64, 1e-6) and not rms_norm_fits(model)
        model._specdec_prepared = False
        assert prepare_model(model)._specdec_own_forward.norm_kernel is None
    finally:
        rms_norm_matches.cache_clear()
