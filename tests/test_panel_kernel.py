"""Our AVX-512 linear kernel (specdec/model/csrc/panel_linear.cpp): a dense linear layer's product to float32 rounding,
each row's bits independent of the other rows of the call (so a verify pass's linear layers give every row a
one-row step's bits), and the kernel choice and its errors."""

from __future__ import annotations

import sys

import pytest
import torch

from specdec.model import kernels
from tiny import needs_panels


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


@needs_panels
@pytest.mark.parametrize("out_features,in_features", [(16, 1), (48, 7), (64, 64), (192, 576), (576, 1536),
                                                      (80, 33)])
def test_panel_linear_is_the_dense_product_and_batch_invariant(out_features, in_features):
    gen = torch.Generator().manual_seed(out_features * 1000 + in_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    packed = kernels.pack_panels(weight)
    assert packed.shape == (out_features // 16, in_features, 16)
    for rows in list(range(1, 18)) + [24, 31, 40, 301]:
        x = torch.randn(rows, in_features, generator=gen)
        for b in (None, bias):
            y = kernels.panel_linear(x, packed, b)
            assert y.shape == (rows, out_features) and y.dtype == torch.float32
            # float32 rounding of an in-order sum: at most in_features ulps of the sum of |terms|, far below 1e-3
            scale = (x.abs().double() @ weight.abs().double().T) + (0 if b is None else b.abs().double())
            err = (y.double() - reference(x, weight, b)).abs()
            assert (err <= scale * in_features * 2 ** -23 + 1e-30).all()
        y = kernels.panel_linear(x, packed, None)
        # every row alone, and any slice of rows, gives the same bits as the rows together
        assert torch.equal(torch.cat([kernels.panel_linear(x[i:i + 1], packed, None) for i in range(rows)]), y)
        if rows > 3:
            assert torch.equal(kernels.panel_linear(x[1:rows - 1], packed, None), y[1:rows - 1])
    # a strided view is multiplied as its contiguous copy
    x = torch.randn(in_features, 5, generator=gen).T
    assert torch.equal(kernels.panel_linear(x, packed, None), kernels.panel_linear(x.contiguous(), packed, None))


@needs_panels
def test_panel_kernel_rejects_what_it_cannot_multiply():
    packed = kernels.pack_panels(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match="K = x.size"):
        kernels.panel_linear(torch.randn(2, 9), packed, None)
    with pytest.raises(RuntimeError, match="2-D float32"):
        kernels.panel_linear(torch.randn(2, 8, dtype=torch.float64), packed, None)


@needs_panels
def test_panel_linear_module_keeps_only_panels():
    linear = torch.nn.Linear(24, 48)
    layer = kernels.PanelLinear(linear)
    assert kernels.PanelLinear.fits(linear) and not kernels.PanelLinear.fits(torch.nn.Linear(24, 40))
    assert torch.equal(layer.weight, linear.weight) and layer.bias is linear.bias
    assert [n for n, _ in layer.named_parameters()] == ["bias"]  # the dense weight is not kept
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


def test_panels_are_chosen_where_they_run_and_named_where_they_do_not(monkeypatch):
    monkeypatch.delenv("SPECDEC_CPU_LINEAR", raising=False)
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(kernels, "panel_kernel_problem", lambda: None)
    assert kernels.linear_kernels() == "panels"
    monkeypatch.setattr(kernels, "panel_kernel_problem", lambda: "this CPU offers AVX2, not AVX512")
    assert kernels.linear_kernels() == "onednn"
    monkeypatch.setenv("SPECDEC_CPU_LINEAR", "panels")
    with pytest.raises(ValueError, match="SPECDEC_CPU_LINEAR=panels cannot run here: this CPU offers AVX2, not "
                                         "AVX512; set SPECDEC_CPU_LINEAR=onednn or mkl"):
        kernels.linear_kernels()


@needs_panels
def test_a_tied_head_and_embedding_keep_one_copy_in_panels():
    import copy

    from transformers import LlamaForCausalLM

    from specdec.model import decoding
    from specdec.model.decoding import DecodeSettings, baseline_decode
    from specdec.run.runner import decode_models
    from tiny import EOS, VOCAB, prompts, tiny_config

    config = tiny_config()
    config.tie_word_embeddings = True
    torch.manual_seed(4)
    stock = LlamaForCausalLM(config).float().eval().requires_grad_(False)
    with torch.no_grad():
        stock.lm_head.weight.mul_(8.0)  # sharp logits, as tiny_target's (the embedding is the same matrix)
    assert stock.lm_head.weight is stock.model.embed_tokens.weight
    prepared = kernels.prepare_model(copy.deepcopy(stock), linear="panels")
    head, embedding = prepared.get_output_embeddings(), prepared.get_input_embeddings()
    assert type(head) is kernels.PanelLinear and type(embedding) is kernels.PanelEmbedding
    assert embedding.packed is head.packed  # one matrix, held once
    assert not any(p.shape[0] == VOCAB for p in prepared.parameters())  # no dense copy of it either
    assert torch.equal(embedding.weight, stock.model.embed_tokens.weight)
    ids = torch.tensor([[3, 17, 40, 0, 47]])
    assert torch.equal(embedding(ids), stock.model.embed_tokens(ids))
    stock._specdec_prepared = True  # the reference stays on transformers' layers
    s = DecodeSettings(max_new_tokens=20, k=3, stop_at_eos=False)
    for p in prompts(3, seed=8):
        expected = baseline_decode(stock, p, s, {EOS}).tokens
        assert baseline_decode(prepared, p, s, {EOS}).tokens == expected
        assert decode_models("dynamic-tree", prepared, p, s, {EOS}).tokens == expected
    logits = decoding.forward(prepared, prompts(1, seed=9)[0], None, 3)[0]
    torch.testing.assert_close(logits, decoding.forward(stock, prompts(1, seed=9)[0], None, 3)[0],
                               rtol=1e-4, atol=1e-4)


@needs_panels
def test_a_head_that_a_trained_drafter_shares_stays_dense(monkeypatch):
    from specdec.methods import drafters
    from tiny import tiny_target

    monkeypatch.delenv("SPECDEC_CPU_LINEAR", raising=False)
    model = tiny_target(dtype=torch.float32)
    head = model.get_output_embeddings().weight
    drafter = drafters.attach("medusa", drafters.new_module("medusa", model, None, heads=2), model)
    kernels.prepare_model(model, linear="panels")
    assert type(model.get_output_embeddings()) is kernels.DenseOneDNNLinear
    assert model.get_output_embeddings().weight is head and drafter.lm_weight is head  # still one matrix
    assert type(model.model.layers[0].mlp.up_proj) is kernels.PanelLinear  # the decoder still runs panels


def test_kernel_build_folder_is_one_per_environment(monkeypatch, tmp_path):
    """Two virtual environments (interpreter prefixes) never share a build folder, so neither rebuilds the other's
    kernels; one environment always finds its own; torch's version and the compiler flags are part of the key."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    a, b = kernels.kernel_build_dir("/envs/a/.venv"), kernels.kernel_build_dir("/envs/b/.venv")
    assert a != b and a.parent == b.parent == tmp_path
    assert a == kernels.kernel_build_dir("/envs/a/.venv") and a.name.startswith(kernels.KERNEL_NAME + "-")
    assert kernels.kernel_build_dir("/envs/a/.venv", torch_version="0.0.0") != a
    assert kernels.kernel_build_dir("/envs/a/.venv", cflags=("-O2",)) != a
    assert kernels.kernel_build_dir() == kernels.kernel_build_dir(sys.prefix)
