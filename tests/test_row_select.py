"""Our argmax and top-k of logit rows (csrc/row_select.cpp, kernels.argmax_rows / top_k_rows) give torch's answers,
and decoding uses them where they run and torch's elsewhere."""

from __future__ import annotations

import math

import pytest
import torch

import specdec.model.decoding as decoding
from specdec.model import kernels
from tiny import needs_panels

NAN, INF = math.nan, math.inf


@needs_panels
@pytest.mark.parametrize("width", [1, 2, 15, 16, 17, 31, 100, 1000, 49152, 49157])
def test_argmax_rows_is_torchs(width):
    generator = torch.Generator().manual_seed(width)
    for rows in (1, 3, 9, 17):
        x = torch.randn(rows, width, generator=generator)
        assert torch.equal(kernels.argmax_rows(x), x.argmax(-1))
        tied = (x * 2).round()  # many equal maxima: the first one wins
        assert torch.equal(kernels.argmax_rows(tied), tied.argmax(-1))
    wide = torch.randn(4, width + 7, generator=generator)
    assert torch.equal(kernels.argmax_rows(wide[:, 3:3 + width]), wide[:, 3:3 + width].argmax(-1))


@needs_panels
def test_argmax_rows_orders_nan_and_infinities_as_torch():
    x = torch.tensor([[1.0, NAN, 2.0, NAN] + [0.0] * 30, [-INF] * 34, [0.0] * 33 + [NAN], [INF, 1.0] + [INF] * 32,
                      [-INF] * 20 + [-1e38] + [-INF] * 13])
    assert kernels.argmax_rows(x).tolist() == x.argmax(-1).tolist() == [1, 0, 33, 0, 20]


@needs_panels
@pytest.mark.parametrize("k", [1, 2, 5, 8, 16])
def test_top_k_rows_kernel_is_torch_topk(k):
    generator = torch.Generator().manual_seed(k)
    for width in (k, k + 1, 17, 640, 49152, 49155):
        if width < k:
            continue
        x = torch.randn(7, width, generator=generator)
        values, indices = kernels.top_k_rows(x, k)
        expected = torch.topk(x, k)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)  # distinct values


@needs_panels
def test_top_k_rows_kernel_keeps_equal_values_in_index_order():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0] + [0.0] * 20 + [3.0], [-INF] * 26])
    values, indices = kernels.top_k_rows(x, 3)
    assert values.tolist() == [[3.0, 3.0, 3.0], [-INF, -INF, -INF]]
    assert indices.tolist() == [[0, 2, 4], [0, 1, 2]]
    values, indices = kernels.top_k_rows(x, 5)
    assert indices[0].tolist() == [0, 2, 4, 25, 3]


@needs_panels
def test_top_k_rows_hands_nan_rows_to_torch():
    x = torch.randn(3, 100)
    x[1, 40] = NAN
    assert kernels.top_k_rows(x, 4) is None
    values, indices = decoding.top_k_rows(x, 4)  # torch.topk: NaN first
    assert indices[1, 0] == 40 and torch.equal(indices[[0, 2]], torch.topk(x, 4).indices[[0, 2]])


@needs_panels
def test_decoding_uses_the_kernel_on_cpu_float32_only(monkeypatch):
    calls = []
    real = kernels.argmax_rows
    monkeypatch.setattr(kernels, "argmax_rows", lambda x: calls.append(x.dtype) or real(x))
    row = torch.randn(49152)
    s = decoding.DecodeSettings()
    assert decoding.select_token(row, s, None) == int(row.argmax())
    assert decoding.select_token(row.double(), s, None) == int(row.argmax())  # torch's argmax: not float32
    assert calls == [torch.float32]
    assert decoding.argmax_rows(torch.randn(2, 5, dtype=torch.float64)).dtype == torch.int64
