"""Our AVX-512 attention for passes of 1 to 16 query rows (specdec/model/csrc/few_row_attention.cpp): SDPA's result to
float32 rounding with grouped KV heads, cache views and tree masks; each row's bits independent of the other rows
(so a verify pass attends each row as its one-row step does); both forwards use it, bit for bit alike, and greedy
decoding stays token-identical to plain decoding; where it does not apply, SDPA runs, and the choice is named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from specdec.model import decoding, kernels
from specdec.model.attention import few_rows_fit, transposed_mask
from specdec.model.decoding import DecodeSettings, forward, new_cache
from specdec.run.runner import SettingsError, check_settings, decode_models
from tiny import EOS, context_free_memory, needs_panels, prompts, tiny_config


def sdpa(query, key, value, mask, scale):
    """The reference: torch's SDPA with shared KV heads, as [R, H * D]."""
    out = F.scaled_dot_product_attention(query[None].double(), key[None].double(), value[None].double(),
                                         attn_mask=None if mask is None else mask[None, None].double(),
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(query.shape[1], -1)


def tree_mask(rows: int, keys: int, gen) -> torch.Tensor:
    """An additive [rows, keys] mask: the cached keys visible, the pass's own keys a random tree (self always)."""
    attend = torch.ones(rows, keys, dtype=torch.bool)
    attend[:, keys - rows:] = torch.rand(rows, rows, generator=gen) < 0.5
    attend[torch.arange(rows), keys - rows + torch.arange(rows)] = True
    return torch.zeros(rows, keys).masked_fill_(~attend, torch.finfo(torch.float32).min)


@needs_panels
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 64), (8, 1, 64), (32, 8, 128), (6, 2, 128)])
def test_few_row_attention_is_sdpa_and_batch_invariant(heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(heads * 100 + dim)
    for rows in (1, 2, 3, 5, 8, 14, 16):
        for keys in (1, 7, 8, 9, 17, 300):
            if keys < rows:
                continue
            query = torch.randn(rows, heads, dim, generator=gen).transpose(0, 1)  # strided, as in our forward
            arena = torch.randn(2, kv_heads, 400, dim, generator=gen)  # a cache buffer longer than its keys
            key, value = arena[0, :, :keys], arena[1, :, :keys]
            mask = tree_mask(rows, keys, gen) if rows > 1 else None
            mask_t = None if mask is None else transposed_mask(mask[None, None])
            out = kernels.few_row_attention(query, key, value, mask_t, dim ** -0.5)
            assert out.shape == (rows, heads * dim) and out.dtype == torch.float32
            # a weighted mean of values: off by float32 rounding of the exps, the sums and the division
            err = (out.double() - sdpa(query, key, value, mask, dim ** -0.5)).abs().max().item()
            assert err < 1e-5 * value.abs().max().item()
            for r in range(rows):  # each row alone, with its own mask row: the same bits
                alone = kernels.few_row_attention(query[:, r:r + 1], key, value,
                                                  None if mask is None else transposed_mask(mask[None, None, r:r + 1]),
                                                  dim ** -0.5)
                assert torch.equal(alone[0], out[r])


@needs_panels
def test_few_row_attention_weighs_only_visible_keys():
    gen = torch.Generator().manual_seed(3)
    query, key, value = torch.randn(4, 2, 64, generator=gen), torch.randn(2, 5, 64, generator=gen), \
        torch.randn(2, 5, 64, generator=gen)
    # row 0 sees only key 0: its output is key 0's value exactly; row 1 sees keys 0 and 4 only
    attend = torch.tensor([[1, 0, 0, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    out = kernels.few_row_attention(query, key, value, transposed_mask(attend[None, None]), 0.125)
    heads_of_kv = [0, 0, 1, 1]
    for h, g in enumerate(heads_of_kv):
        torch.testing.assert_close(out[0, h * 64:(h + 1) * 64], value[g, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], sdpa(query[:, 1:2], key[:, [0, 4]], value[:, [0, 4]], None, 0.125)[0].float())


@needs_panels
def test_few_row_attention_rejects_what_it_cannot_compute():
    key = value = torch.randn(2, 20, 64)
    with pytest.raises(RuntimeError, match="1 to 16 query rows"):
        kernels.few_row_attention(torch.randn(4, 17, 64), key, value, torch.zeros(20, 17), 0.1)
    with pytest.raises(RuntimeError, match="head dimension 64 or 128"):
        kernels.few_row_attention(torch.randn(4, 1, 32), torch.randn(2, 20, 32), torch.randn(2, 20, 32), None, 0.1)
    with pytest.raises(RuntimeError, match="H a multiple of KVH"):
        kernels.few_row_attention(torch.randn(3, 1, 64), key, value, None, 0.1)
    with pytest.raises(RuntimeError, match=r"\[T, R\]"):
        kernels.few_row_attention(torch.randn(4, 2, 64), key, value, torch.zeros(2, 20), 0.1)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        kernels.few_row_attention(torch.randn(4, 1, 64).double(), key, value, None, 0.1)


def test_few_rows_fit_only_steps_and_masked_passes():
    q1, k = torch.zeros(1, 9, 1, 64), torch.zeros(1, 3, 40, 64)
    assert few_rows_fit(q1, k, None)
    q5 = torch.zeros(1, 9, 5, 64)
    assert few_rows_fit(q5, k, torch.zeros(1, 1, 5, 40))
    assert not few_rows_fit(q5, k, None)  # a causal prompt without a mask stays on SDPA
    assert not few_rows_fit(torch.zeros(1, 9, 17, 64), k, torch.zeros(1, 1, 17, 40))  # a prompt's rows
    assert not few_rows_fit(q5, k, torch.zeros(1, 1, 5, 41))  # a mask over other keys
    assert not few_rows_fit(torch.zeros(1, 9, 1, 64, dtype=torch.float64), k, None)
    assert not few_rows_fit(torch.zeros(1, 9, 1, 32), torch.zeros(1, 3, 40, 32), None)
    assert not few_rows_fit(torch.zeros(2, 9, 1, 64), torch.zeros(2, 3, 40, 64), None)


def test_attention_kernel_choice_is_named(monkeypatch):
    monkeypatch.delenv("SPECDEC_CPU_ATTENTION", raising=False)
    monkeypatch.setattr(kernels, "panel_kernel_problem", lambda: None)
    assert kernels.attention_kernel() == "few-rows"
    monkeypatch.setenv("SPECDEC_CPU_ATTENTION", "sdpa")
    assert kernels.attention_kernel() == "sdpa"
    monkeypatch.setattr(kernels, "panel_kernel_problem", lambda: "this CPU offers AVX2, not AVX512")
    monkeypatch.delenv("SPECDEC_CPU_ATTENTION")
    assert kernels.attention_kernel() == "sdpa"
    monkeypatch.setenv("SPECDEC_CPU_ATTENTION", "few-rows")
    with pytest.raises(ValueError, match="SPECDEC_CPU_ATTENTION=few-rows cannot run here: this CPU offers AVX2"):
        kernels.attention_kernel()
    monkeypatch.setenv("SPECDEC_CPU_ATTENTION", "flash")
    with pytest.raises(ValueError, match="SPECDEC_CPU_ATTENTION must be one of auto, few-rows, sdpa, got 'flash'"):
        kernels.attention_kernel()
    with pytest.raises(SettingsError, match="SPECDEC_CPU_ATTENTION"):  # before any model loads
        check_settings("baseline", None, DecodeSettings())


def wide_head_target(seed: int = 0) -> LlamaForCausalLM:
    """A tiny float32 Llama whose heads are 64 wide (the kernel's smallest), 4 query heads over 2 KV heads."""
    config = tiny_config()
    config.head_dim = 64
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval().requires_grad_(False)


def counted(monkeypatch) -> list:
    """Count the kernel's calls (rows per call, one per layer) from both forwards: few_row_attention, rope_attend
    (our forward's fused call of it after the first layer) and decoder_layers (our forward's one call of every
    layer's rope_attend and the rest, from C++: counted once per layer it runs)."""
    calls = []
    real, fused, layers = kernels.few_row_attention, kernels.rope_attend, kernels.decoder_layers
    monkeypatch.setattr(kernels, "few_row_attention", lambda q, *a: calls.append(q.shape[1]) or real(q, *a))
    monkeypatch.setattr(kernels, "rope_attend", lambda qkv, *a: calls.append(qkv.shape[0]) or fused(qkv, *a))
    monkeypatch.setattr(kernels, "decoder_layers",  # each layer's rope_attend of each sequence
                        lambda x, cos, sin, rows, keys, *a: calls.extend(rows * (len(keys) // len(rows))) or
                        layers(x, cos, sin, rows, keys, *a))
    return calls


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on x [heads, rows, D] with cos, sin [rows, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@needs_panels
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 128), (8, 1, 64)])
def test_rope_attend_is_rotary_the_cache_write_and_the_kernel_bit_for_bit(heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(heads + dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    for rows, start in ((1, 0), (1, 37), (5, 20), (16, 100)):
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen)
        freqs = torch.arange(start, start + rows).float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        arena = torch.randn(3, 2, 1, kv_heads, 128, dim, generator=gen)  # a KVArena: layer 1's slot
        expected_arena = arena.clone()
        split = qkv.view(rows, heads + 2 * kv_heads, dim).transpose(0, 1)
        qk = rotated(split[:heads + kv_heads], cos, sin)
        expected_arena[1, 0, 0, :, start:start + rows] = qk[heads:]
        expected_arena[1, 1, 0, :, start:start + rows] = split[heads + kv_heads:]
        mask = tree_mask(rows, start + rows, gen) if rows > 1 else None
        mask_t = None if mask is None else transposed_mask(mask[None, None])
        expected = kernels.few_row_attention(qk[:heads], expected_arena[1, 0, 0, :, :start + rows],
                                             expected_arena[1, 1, 0, :, :start + rows], mask_t, dim ** -0.5)
        out = kernels.rope_attend(qkv, cos, sin, arena[1, 0], arena[1, 1], start, heads, kv_heads, mask_t,
                                  dim ** -0.5)
        assert torch.equal(out, expected)
        assert torch.equal(arena, expected_arena)  # only this pass's positions of this layer were written
    with pytest.raises(RuntimeError, match="capacity >= start \\+ rows"):
        kernels.rope_attend(qkv, cos, sin, arena[1, 0], arena[1, 1], 120, heads, kv_heads, None, 0.1)


@needs_panels
def test_both_forwards_run_the_kernel_bit_for_bit_alike(monkeypatch):
    from test_llama_forward import passes

    monkeypatch.delenv("SPECDEC_CPU_ATTENTION", raising=False)
    calls = counted(monkeypatch)
    model = kernels.prepare_model(wide_head_target(), linear="panels")
    ours = model._specdec_own_forward
    assert ours.few_rows is not None
    for ids in prompts(2, length=24):
        caches = new_cache(model, 8), new_cache(model, 8)
        model._specdec_own_forward = ours
        mine = passes(model, caches[0], ids)
        mine_calls, calls[:] = list(calls), []
        model._specdec_own_forward = None  # transformers' forward, through kernels.sdpa_gqa_attention
        theirs = passes(model, caches[1], ids)
        layers = len(model.model.layers)
        # 3 one-row steps, the 5-row chain pass and the 5-row tree pass, in every layer; not the 10-row prefill
        # (causal, no mask): the same calls in both forwards (ours: rope_attend in every layer, through
        # decoder_layers)
        assert mine_calls == calls == [1] * 3 * layers + [5] * layers * 2
        calls[:] = []
        for (a_logits, a_hidden), (b_logits, b_hidden) in zip(mine, theirs):
            assert torch.equal(a_logits, b_logits)
            assert a_hidden is None or torch.equal(a_hidden, b_hidden)
        for a, b in zip(caches[0].layers, caches[1].layers):  # rope_attend wrote the same keys and values
            assert a.get_seq_length() == b.get_seq_length()
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@needs_panels
@pytest.mark.parametrize("strategy", ["dynamic-tree", "ngram", "lookahead"])
def test_greedy_decoding_with_the_kernel_matches_plain_decoding(strategy, monkeypatch):
    monkeypatch.delenv("SPECDEC_CPU_ATTENTION", raising=False)
    calls = counted(monkeypatch)
    target = kernels.prepare_model(wide_head_target(1), linear="panels")
    s = DecodeSettings(max_new_tokens=24, k=4, stop_at_eos=False)
    memory = context_free_memory(target) if strategy == "dynamic-tree" else None
    for ids in prompts(4, seed=5):
        assert decode_models(strategy, target, ids, s, {EOS}, memory=memory).tokens == \
            decode_models("baseline", target, ids, s, {EOS}).tokens
    assert 1 in calls and max(calls) > 1  # steps and verify passes both ran it


@needs_panels
def test_sdpa_runs_when_asked_or_where_the_kernel_does_not_apply(monkeypatch):
    calls = counted(monkeypatch)
    monkeypatch.setenv("SPECDEC_CPU_ATTENTION", "sdpa")
    model = kernels.prepare_model(wide_head_target(), linear="panels")
    assert model._specdec_own_forward.few_rows is None
    forward(model, prompts(1)[0], new_cache(model), 1)
    monkeypatch.delenv("SPECDEC_CPU_ATTENTION")
    narrow = kernels.prepare_model(LlamaForCausalLM(tiny_config()).float().eval(), linear="panels")  # 16 wide
    cache = new_cache(narrow)
    forward(narrow, prompts(1)[0], cache, 1)
    forward(narrow, [5], cache, 1)
    assert calls == []
    wide = kernels.prepare_model(wide_head_target(), linear="panels")
    cache = new_cache(wide)
    forward(wide, prompts(1)[0], cache, 1)
    decoding.rollback(cache, 6)
    forward(wide, [5], cache, 1)
    assert calls == [1] * len(wide.model.layers)  # the step only, not the prompt
