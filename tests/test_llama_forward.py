"""Our own Llama forward (specdec/model/llama_forward.py) computes transformers' forward bit for bit, in every pass our
loops make (prefill, one-row steps, chain verify, tree verify with extra rows, hidden states), and in every
kernel set (float64, float32 oneDNN, MKL and our AVX-512 panels, bfloat16/int8/int4 weight-only); it stands
aside where it does not apply."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from specdec.model import decoding, kernels, llama_forward, quant
from specdec.model.decoding import DecodeSettings, additive_mask, forward, new_cache
from specdec.model.kernels import panel_extension, prepare_model
from specdec.model.models import load_registry
from specdec.run.runner import SettingsError, check_settings, decode_models
from tiny import DEVICE, EOS, context_free_memory, needs_panels, needs_vnni, prompts, tiny_config, tiny_target

def own_forward(model):
    return getattr(model, "_specdec_own_forward", None)  # installed by kernels.prepare_model


KERNELS = ["float64", "float32-onednn", "float32-mkl", pytest.param("float32-panels", marks=needs_panels),
           "bfloat16", "int8", "int4", pytest.param("int8-vnni", marks=needs_vnni),
           pytest.param("int4-vnni", marks=needs_vnni)]


def prepared(kind: str, monkeypatch):
    """A prepared tiny Llama whose linear layers run `kind`'s kernels."""
    if kind == "float64":
        return prepare_model(tiny_target())
    if kind.startswith("float32"):
        monkeypatch.setenv("SPECDEC_CPU_LINEAR", kind.split("-")[1])
        return prepare_model(tiny_target(dtype=torch.float32))
    if kind.endswith("-vnni"):  # our int8/int4 kernels
        return prepare_model(quant.apply_weights(tiny_target(dtype=torch.float32), kind[:4], panel_extension()))
    return prepare_model(quant.apply_weights(tiny_target(dtype=torch.float32), kind))


def passes(model, cache, ids: list[int]):
    """The passes our loops make, in order, on one cache: (logits, hidden states) of each."""
    out = [forward(model, ids[:10], cache, 10, hidden=True)]           # prefill, all rows (EAGLE reads them)
    for token in ids[10:13]:                                          # one-row steps
        out.append(forward(model, [token], cache))
    out.append(forward(model, ids[13:18], cache, 5))                  # chain verify pass: causal mask
    decoding.rollback(cache, 14)                                      # two of them rejected
    cached = cache.get_seq_length()
    # a tree pass: root, two children of the root, a grandchild, and one extra row seeing only the root
    attend = torch.ones(5, cached + 5, dtype=torch.bool)
    attend[:, cached:] = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0],
                                       [1, 0, 0, 0, 1]], dtype=torch.bool)
    positions = [cached, cached + 1, cached + 1, cached + 2, cached + 1]
    out.append(forward(model, ids[18:23], cache, 5, positions=positions, attend=attend, hidden=True))
    return out


@pytest.mark.parametrize("kind", KERNELS)
def test_our_forward_equals_transformers_bit_for_bit(kind, monkeypatch):
    model = prepared(kind, monkeypatch)
    ours = own_forward(model)
    assert isinstance(ours, llama_forward.LlamaWeights)  # our forward really runs below
    for ids in prompts(3, length=24):
        caches = new_cache(model, 8), new_cache(model, 8)  # small: the buffers grow during the passes
        model._specdec_own_forward = ours
        mine = passes(model, caches[0], ids)
        model._specdec_own_forward = None                     # transformers' forward
        theirs = passes(model, caches[1], ids)
        for (a_logits, a_hidden), (b_logits, b_hidden) in zip(mine, theirs):
            assert a_logits.dtype == torch.float32 and torch.equal(a_logits, b_logits)
            assert (a_hidden is None) == (b_hidden is None)
            assert a_hidden is None or torch.equal(a_hidden, b_hidden)
        for a, b in zip(caches[0].layers, caches[1].layers):
            assert a.get_seq_length() == b.get_seq_length()
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("exact", ["0", "1"])
def test_our_forward_computes_masked_passes_row_by_row_only_when_asked(exact, monkeypatch):
    monkeypatch.setenv("SPECDEC_EXACT_ATTENTION", exact)
    calls = []
    real = llama_forward.attend_rows
    monkeypatch.setattr(llama_forward, "attend_rows", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    model = prepared("int4", monkeypatch)
    assert own_forward(model) is not None
    passes(model, new_cache(model), prompts(1, length=24)[0])
    layers = len(model.model.layers)
    # the chain verify pass (5 rows) and the tree pass (5 rows), in every layer; never the prefill or a step
    assert calls == ([5] * layers * 2 if exact == "1" else [])


@pytest.mark.parametrize("strategy", ["ngram", "suffix", "recycling", "dynamic-tree", "lookahead"])
def test_greedy_methods_match_plain_decoding_in_our_forward(strategy):
    target = prepare_model(tiny_target())
    assert own_forward(target) is not None
    s = DecodeSettings(max_new_tokens=24, k=4)
    memory = context_free_memory(target) if strategy == "dynamic-tree" else None  # what runner.prepare adds
    for ids in prompts(4):
        assert decode_models(strategy, target, ids, s, {EOS}, memory=memory).tokens == \
            decode_models("baseline", target, ids, s, {EOS}).tokens


def test_our_forward_stands_aside_where_it_does_not_apply(monkeypatch):
    assert own_forward(tiny_target()) is None  # not prepared: transformers' forward
    eager = tiny_target()
    eager.set_attn_implementation("eager")
    assert "eager" in llama_forward.unsupported(eager)
    assert own_forward(prepare_model(eager)) is None
    config = tiny_config()
    qwen = Qwen2ForCausalLM(Qwen2Config(**{k: getattr(config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")})).eval()
    assert "Qwen2ForCausalLM" in llama_forward.unsupported(qwen)
    assert own_forward(prepare_model(qwen)) is None
    assert forward(qwen, [3, 4, 5], new_cache(qwen))[0].shape == (1, config.vocab_size)
    training = copy.deepcopy(tiny_target()).train()
    assert "training" in llama_forward.unsupported(training)
    monkeypatch.setenv("SPECDEC_FORWARD", "transformers")
    assert own_forward(prepare_model(tiny_target())) is None
    monkeypatch.setenv("SPECDEC_FORWARD", "fast")
    with pytest.raises(ValueError, match="SPECDEC_FORWARD must be one of own, own-python, transformers, got 'fast'"):
        llama_forward.forward_choice()
    with pytest.raises(SettingsError, match="SPECDEC_FORWARD"):  # before any model loads
        check_settings("baseline", None, DecodeSettings(), load_registry())


def test_additive_tree_mask_is_the_one_transformers_gets():
    """decoding.forward hands our forward the same additive mask it gives transformers."""
    attend = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    mask = additive_mask(attend, torch.float32, "cpu")
    assert mask.shape == (1, 1, 2, 3) and mask[0, 0, 0, 2] == torch.finfo(torch.float32).min
    assert llama_forward.causal_mask(1, 7) is None and llama_forward.causal_mask(4, 0) is None
    causal = llama_forward.causal_mask(2, 3)
    assert causal.shape == (1, 1, 2, 5) and causal[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]


# oneDNN-packed weights cannot be deep-copied
@pytest.mark.parametrize("kind", ["float64", "float32-mkl", "int4", pytest.param("int4-vnni", marks=needs_vnni)])
def test_a_deep_copy_of_a_prepared_model_computes_with_its_own_weights(kind, monkeypatch):
    """Our forward's kernel calls are partials over the model's tensors, so a copy's forward reads the copy's."""
    model = prepared(kind, monkeypatch)
    twin = copy.deepcopy(model)
    head = twin.get_output_embeddings()
    with torch.no_grad():
        (head.scales if isinstance(head, quant.WeightOnlyLinear) else head.weight).mul_(2.0)
        twin.model.norm.weight.add_(0.5)
    ids = prompts(1)[0]
    ours = forward(twin, ids, new_cache(twin), len(ids))[0]
    assert own_forward(twin) is not None and own_forward(twin) is not own_forward(model)
    twin._specdec_own_forward = None
    assert torch.equal(ours, forward(twin, ids, new_cache(twin), len(ids))[0])
    assert not torch.equal(ours, forward(model, ids, new_cache(model), len(ids))[0])


def test_on_stock_linear_layers_a_batched_pass_gives_each_sequence_its_own_logits():
    """On a GPU prepare_model swaps no layer, and our forward runs over the stock nn.Linear layers: one pass over
    every sequence's rows (batched decoding). The same code on the CPU's stock layers: each sequence of a ragged
    batch (prefills, then one step each) gets the logits transformers' forward gives it alone, and its cache
    holds exactly its own tokens. (With SPECDEC_TEST_DEVICE=cuda this runs on the GPU.)"""
    model = tiny_target().to(DEVICE)
    weights = llama_forward.llama_weights(model)
    assert weights is not None and weights.few_rows is None
    ps = [p[:6 + 3 * i] for i, p in enumerate(prompts(3, length=14, seed=2))]
    caches = [new_cache(model) for _ in ps]
    outs = llama_forward.forward_batch(weights, [(p, c, 2, None, None, False) for p, c in zip(ps, caches)])
    steps = llama_forward.forward_batch(weights, [([7 + i], c, 1, None, None, False) for i, c in enumerate(caches)])
    for i, (p, (logits, _), (step, _), cache) in enumerate(zip(ps, outs, steps, caches)):
        with torch.inference_mode():
            alone = model(torch.tensor([p + [7 + i]], device=DEVICE)).logits[0]
        torch.testing.assert_close(logits, alone[len(p) - 2:len(p)])
        torch.testing.assert_close(step, alone[-1:])
        assert cache.get_seq_length() == len(p) + 1


def test_bfloat16_on_the_cpu_stays_on_transformers_forward():
    reason = llama_forward.unsupported(tiny_target(dtype=torch.bfloat16))
    assert reason == "hidden states are bfloat16, not one of float32, float64 on the CPU"


def wide_prepared(kind: str, monkeypatch, forward_choice: str):
    """A prepared tiny float32 Llama with 64-wide heads (our few-row attention's smallest) whose linear layers run
    our panel, int8 or int4 kernels, under $SPECDEC_FORWARD=forward_choice."""
    from test_few_row_attention import wide_head_target

    monkeypatch.setenv("SPECDEC_FORWARD", forward_choice)
    monkeypatch.delenv("SPECDEC_CPU_ATTENTION", raising=False)
    if kind == "float32-panels":
        return prepare_model(wide_head_target(), linear="panels")
    return prepare_model(quant.apply_weights(wide_head_target(), kind[:4], panel_extension()))


@pytest.mark.parametrize("kind", [pytest.param("float32-panels", marks=needs_panels),
                                  pytest.param("int8-vnni", marks=needs_vnni),
                                  pytest.param("int4-vnni", marks=needs_vnni)])
def test_the_layers_in_one_native_call_equal_the_python_loop_bit_for_bit(kind, monkeypatch):
    """csrc/decoder_layers.cpp runs a step's and a verify pass's layers (chain and tree masks) with the same kernels
    as forward_batch's Python loop: the same logits, hidden states and cache, and it really runs."""
    calls = []
    real = kernels.decoder_layers
    monkeypatch.setattr(kernels, "decoder_layers", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    native = wide_prepared(kind, monkeypatch, "own")
    looped = wide_prepared(kind, monkeypatch, "own-python")
    assert own_forward(native).native is not None and own_forward(looped).native is None
    for ids in prompts(2, length=24):
        caches = new_cache(native, 8), new_cache(looped, 8)  # small: the buffers grow during the passes
        mine, theirs = passes(native, caches[0], ids), passes(looped, caches[1], ids)
        # 3 one-row steps, the 5-row chain pass and the 5-row tree pass; not the prefill (10 rows, no mask)
        assert calls == [1, 1, 1, 5, 5]
        calls.clear()
        for (a_logits, a_hidden), (b_logits, b_hidden) in zip(mine, theirs):
            assert torch.equal(a_logits, b_logits)
            assert (a_hidden is None) == (b_hidden is None)
            assert a_hidden is None or torch.equal(a_hidden, b_hidden)
        for a, b in zip(caches[0].layers, caches[1].layers):
            assert a.get_seq_length() == b.get_seq_length()
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@needs_vnni
def test_the_native_layers_of_a_deep_copy_read_the_copy_s_weights(monkeypatch):
    model = wide_prepared("int4-vnni", monkeypatch, "own")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[1].input_layernorm.weight.mul_(3.0)
    ids = prompts(1)[0]
    steps = []
    for m in (model, twin):
        cache = new_cache(m)
        forward(m, ids, cache, 1)
        steps.append(forward(m, [5], cache)[0])
    assert own_forward(twin).native is not None and not torch.equal(steps[0], steps[1])
    cache = new_cache(twin)
    forward(twin, ids, cache, 1)
    twin._specdec_own_forward = replace(own_forward(twin), native=None)  # the Python loop over the same weights
    assert torch.equal(forward(twin, [5], cache)[0], steps[1])


@needs_panels
def test_the_native_layers_stand_aside_for_prompts_exact_rows_and_unknown_kernels(monkeypatch):
    calls = []
    real = kernels.decoder_layers
    monkeypatch.setattr(kernels, "decoder_layers", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    model = wide_prepared("float32-panels", monkeypatch, "own")
    ids = prompts(2)
    caches = [new_cache(model), new_cache(model)]
    for seq, cache in zip(ids, caches):
        forward(model, seq, cache, 1)                      # a prompt: SDPA's causal pass, in Python
    fresh = new_cache(model)                                 # a batch holding a prompt beside a step
    decoding.forward_passes(model, [decoding.Pass([5], caches[0], 1), decoding.Pass(ids[0], fresh, 1)])
    assert calls == [] and caches[0].get_seq_length() == len(ids[0]) + 1 and fresh.get_seq_length() == len(ids[0])
    monkeypatch.setenv("SPECDEC_EXACT_ATTENTION", "1")
    forward(model, [7, 8], caches[0], 2)                    # masked rows one by one, as asked
    assert calls == []
    monkeypatch.delenv("SPECDEC_EXACT_ATTENTION")
    forward(model, [9], caches[0])
    assert calls == [1]
    # a projection our kernels do not run (oneDNN): the layers stay in Python
    monkeypatch.setenv("SPECDEC_CPU_LINEAR", "onednn")
    from test_few_row_attention import wide_head_target
    assert own_forward(prepare_model(wide_head_target())).native is None


@needs_vnni
def test_a_batch_s_layers_in_one_native_call_equal_the_python_loop_bit_for_bit(monkeypatch):
    """Several sequences in one pass (batched decoding: a step, a chain verify pass and a tree pass side by side,
    each over its own cache): decoder_layers attends each over its cache as the Python loop does."""
    calls = []
    real = kernels.decoder_layers
    monkeypatch.setattr(kernels, "decoder_layers", lambda x, cos, sin, rows, *a: calls.append(rows) or
                        real(x, cos, sin, rows, *a))
    models = wide_prepared("int4-vnni", monkeypatch, "own"), wide_prepared("int4-vnni", monkeypatch, "own-python")
    seqs = prompts(3, length=12)
    outs = []
    for model in models:
        caches = [new_cache(model, 8) for _ in seqs]
        for ids, cache in zip(seqs, caches):
            forward(model, ids, cache, 1)
        starts = [cache.get_seq_length() for cache in caches]
        attend = torch.ones(4, starts[2] + 4, dtype=torch.bool)
        attend[:, starts[2]:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]],
                                             dtype=torch.bool)
        positions = [starts[2], starts[2] + 1, starts[2] + 1, starts[2] + 2]
        batch = [decoding.Pass([5], caches[0], 1), decoding.Pass([6, 7, 8, 9, 10], caches[1], 5),
                 decoding.Pass([11, 12, 13, 14], caches[2], 4, positions, attend)]
        outs.append((decoding.forward_passes(model, batch), caches))
    assert calls == [[1, 5, 4]]  # the batch, in one call; not the prompts
    (mine, my_caches), (theirs, their_caches) = outs
    for (a, _), (b, _) in zip(mine, theirs):
        assert torch.equal(a, b)
    for caches in zip(my_caches, their_caches):
        for a, b in zip(caches[0].layers, caches[1].layers):
            assert a.get_seq_length() == b.get_seq_length()
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@needs_panels
def test_decoder_layers_refuses_a_malformed_layout():
    model = prepare_model(__import__("test_few_row_attention").wide_head_target(), linear="panels")
    ours = own_forward(model)
    cache = new_cache(model)
    forward(model, prompts(1)[0], cache, 1)
    keys, values, starts = llama_forward.extend_layers(cache, 1)
    x = torch.randn(1, model.config.hidden_size)
    cos, sin = llama_forward.rotary(ours, torch.tensor([starts[0]]), torch.float32)
    native, none = ours.native, [llama_forward.NO_TENSOR]
    args = (ours.heads, ours.kv_heads, ours.intermediate, ours.scaling)
    before = x.clone()
    out = kernels.decoder_layers(x, cos, sin, [1], keys, values, starts, none, native.tensors, native.ints,
                                 native.eps, *args)
    assert torch.equal(x, before) and not torch.equal(out, x)  # the caller's x (an embedding's rows) is left alone
    with pytest.raises(RuntimeError, match="the weights list ends early"):
        kernels.decoder_layers(x, cos, sin, [1], keys, values, starts, none, native.tensors[:-1], native.ints,
                               native.eps, *args)
    with pytest.raises(RuntimeError, match="unknown projection kind 7"):
        kernels.decoder_layers(x, cos, sin, [1], keys, values, starts, none, native.tensors,
                               [1, 7] + native.ints[2:], native.eps, *args)
    with pytest.raises(RuntimeError, match="must describe the same layers"):
        kernels.decoder_layers(x, cos, sin, [1], keys, values[:-1], starts, none, native.tensors, native.ints,
                               native.eps, *args)
    with pytest.raises(RuntimeError, match="rows do not add up"):
        kernels.decoder_layers(x, cos, sin, [2], keys, values, starts, none, native.tensors, native.ints,
                               native.eps, *args)
