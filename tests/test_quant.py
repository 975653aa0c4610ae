"""Weight formats of our engine (specdec/model/quant.py): row-invariant kernels, speculative decoding identical to plain
decoding in the same format, and a stated agreement with float32 on the tiny model."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from specdec.model import quant
from specdec.model.decoding import DecodeSettings, baseline_decode, forward
from specdec.model.kernels import prepare_model, quant_ops
from specdec.model.models import WEIGHT_FORMATS, ModelError, load_model, load_registry
from specdec.run.runner import decode_models
from tiny import EOS, noisy_copy, prompts, tiny_target

FORMATS = ("bfloat16", "int8", "int4")


def convert(model, fmt):
    """The model in `fmt` with the kernels the engine picks on this CPU (ours where it has AVX-512 VNNI)."""
    return quant.apply_weights(model, fmt, quant_ops(fmt))
# Teacher-forced top-1 agreement with float32 over 20 random prompts x 24 positions of the tiny model, and the
# largest logit error relative to the largest logit (measured: 0.996 / 0.983 / 0.896 and 0.007 / 0.015 / 0.144).
MIN_AGREEMENT = {"bfloat16": 0.98, "int8": 0.95, "int4": 0.85}
MAX_RELATIVE_ERROR = {"bfloat16": 0.02, "int8": 0.03, "int4": 0.2}


@pytest.mark.parametrize("fmt", FORMATS)
def test_layers_give_each_row_the_same_bits_whatever_the_batch(fmt):
    """Why a verify pass of k + 1 rows can agree with k + 1 one-row steps at all."""
    torch.manual_seed(0)
    for rows_out, width in ((96, 64), (64, 128), (208, 64)):
        layer = quant.WeightOnlyLinear(torch.nn.Linear(width, rows_out, bias=False), fmt, ops=quant_ops(fmt))
        x = torch.randn(9, width)
        full = layer(x)
        assert full.dtype == x.dtype and full.shape == (9, rows_out)
        for i in range(9):
            assert torch.equal(layer(x[i:i + 1]), full[i:i + 1])
        assert torch.equal(layer(x[:5]), full[:5])


@pytest.mark.parametrize("fmt", FORMATS)
def test_speculative_decoding_matches_plain_decoding_in_the_same_format(fmt):
    """float64 tiny models: attention is exact to far below a bfloat16 step, so outputs must be identical."""
    target = convert(tiny_target(), fmt)
    draft = convert(noisy_copy(tiny_target(), 0.3), fmt)
    assert quant.weight_format(target) == fmt
    s = DecodeSettings(max_new_tokens=16, k=4)
    accepted = 0
    for ids in prompts(4):
        plain = decode_models("baseline", target, ids, s, {EOS})
        ngram = decode_models("ngram", target, ids, s, {EOS})
        drafted = decode_models("speculative", target, ids, s, {EOS}, draft_model=draft)
        assert ngram.tokens == plain.tokens and drafted.tokens == plain.tokens
        accepted += sum(drafted.accepted_per_position)
    assert accepted > 0  # the accept path ran, not only rejections


@pytest.mark.parametrize("fmt", FORMATS)
def test_agreement_with_float32_stays_within_the_stated_bounds(fmt):
    reference = tiny_target(dtype=torch.float32)
    model = convert(copy.deepcopy(reference), fmt)
    agree = total = 0
    error = 0.0
    for ids in prompts(20, length=24):  # one forward each
        a, b = forward(reference, ids, None, len(ids))[0], forward(model, ids, None, len(ids))[0]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        error = max(error, float((a - b).abs().max() / a.abs().max()))
    assert agree / total >= MIN_AGREEMENT[fmt]
    assert 0 < error <= MAX_RELATIVE_ERROR[fmt]  # > 0: the weights really are in the format


def test_prepare_model_keeps_quantised_layers_and_float32_attention():
    model = convert(tiny_target(dtype=torch.float32), "int4")
    prepare_model(model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "WeightOnlyLinear" in kinds and "PackedLinear" not in kinds and "Linear" not in kinds
    head = model.get_output_embeddings()
    assert head.fmt == "int8"  # the head stays int8 with int4, as the GGUF keeps it at Q8_0
    assert model.get_input_embeddings().weight.dtype == torch.float32
    trace = baseline_decode(model, prompts(1)[0], DecodeSettings(max_new_tokens=8), {EOS})
    assert len(trace.tokens) >= 1
    with pytest.raises(quant.WeightFormatError, match="before kernels.prepare_model"):
        quant.apply_weights(model, "int8")


def test_formats_are_checked():
    assert quant.WEIGHT_FORMATS == WEIGHT_FORMATS  # aliases are validated against the formats quant implements
    with pytest.raises(quant.WeightFormatError, match="not one of"):
        quant.check_format("int3")
    with pytest.raises(quant.WeightFormatError, match="CPU only"):
        quant.check_format("int4", "cuda:0")
    with pytest.raises(quant.WeightFormatError, match="out_features by 16"):
        quant.WeightOnlyLinear(torch.nn.Linear(64, 200), "int4")
    model = torch.nn.Sequential(torch.nn.Linear(64, 200), torch.nn.Linear(200, 64))
    model.get_output_embeddings = lambda: None
    quant.apply_weights(model, "int4")  # a shape the int4 kernel cannot take falls back to int8
    assert [m.fmt for m in model] == ["int8", "int8"]
    quant.check_format("bfloat16", "cuda:0")


def test_alias_weight_format_is_applied_on_load(tiny_models):
    registry = load_registry({**tiny_models, "tiny-int8": {**tiny_models["tiny-target"], "weights": "int8"}})
    assert quant.weight_format(load_model(registry["tiny-int8"]).model) == "int8"
    assert quant.weight_format(load_model(registry["tiny-target"]).model) == "float32"
    with pytest.raises(ModelError, match="weights 'int3'"):
        load_registry({"x": {**tiny_models["tiny-target"], "weights": "int3"}})


def test_a_cell_records_the_weight_format_and_threads_it_asked_for_and_ran(prompt_file, tiny_models):
    from specdec.run.job import run_cell

    base = {"target": "tiny-target", "strategy": "ngram", "k": 2, "prompts_file": str(prompt_file),
            "models": tiny_models, "max_new_tokens": 6, "warmup": 0}
    threads = torch.get_num_threads()
    try:
        asked = run_cell({**base, "weights": "int8", "threads": 1})
    finally:
        torch.set_num_threads(threads)  # the cell set the process-wide count
    params = asked["run"]["params"]
    assert asked["run"]["status"] == "ok", asked["run"]["error"]
    assert (params["weights"], params["weights_used"], params["threads"], params["threads_used"]) == \
        ("int8", "int8", 1, 1)
    assert params["engine"] == "specdec"
    plain = run_cell(base)["run"]["params"]  # nothing asked: matched with older runs by NULL, what ran beside it
    assert (plain["weights"], plain["weights_used"], plain["threads"]) == (None, "float32", None)
    refused = run_cell({**base, "strategy": "llamacpp-generate", "k": None})
    assert refused["run"]["status"] == "failed" and "not a GGUF file" in refused["run"]["error"]


class Projections(torch.nn.Module):
    """q, k, v and gate, up as a decoder layer holds them (transformers' names)."""

    def __init__(self, width=64, bias=False):
        super().__init__()
        torch.manual_seed(0)
        for name, rows in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("gate_proj", 96), ("up_proj", 96)):
            setattr(self, name, torch.nn.Linear(width, rows, bias=bias))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_projections_give_each_projection_its_own_layers_bits(fmt, bias):
    layers = Projections(bias=bias)
    separate = {name: quant.WeightOnlyLinear(getattr(layers, name), fmt, ops=quant_ops(fmt))
                for name, _ in layers.named_children()}
    quant.fuse_projections(layers, fmt, quant_ops(fmt))
    assert isinstance(layers.q_proj, quant.ProjectionSlice) and isinstance(layers.up_proj, quant.ProjectionSlice)
    assert sum(isinstance(m, quant.FusedWeightOnly) for m in layers.modules()) == 2
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    # in the model's order, in another order, and with another input between two reads of one fused group
    for order in (("q_proj", "k_proj", "v_proj"), ("v_proj", "q_proj", "k_proj"), ("gate_proj", "up_proj")):
        for name in order:
            assert torch.equal(getattr(layers, name)(x), separate[name](x)), name
    assert torch.equal(layers.q_proj(x), separate["q_proj"](x))
    assert torch.equal(layers.k_proj(y), separate["k_proj"](y))  # not x's cached slice
    assert torch.equal(layers.q_proj(x), separate["q_proj"](x))  # q read twice: computed again, not stale
    assert torch.equal(layers.v_proj(x), separate["v_proj"](x))  # from q's computation
    assert layers.q_k_v_fused.pending.input is x
    assert torch.equal(layers.k_proj(x), separate["k_proj"](x))
    assert layers.q_k_v_fused.pending.input is None  # every part read: no activations held between passes


def test_apply_weights_fuses_the_decoder_projections_and_decoding_is_unchanged(monkeypatch):
    fused = convert(tiny_target(), "int8")
    monkeypatch.setattr(quant, "fuse_projections", lambda *args: None)
    separate = convert(tiny_target(), "int8")
    kinds = [type(m).__name__ for m in fused.modules()]
    layers = fused.config.num_hidden_layers
    assert kinds.count("FusedWeightOnly") == 2 * layers and kinds.count("ProjectionSlice") == 5 * layers
    s = DecodeSettings(max_new_tokens=12)
    for ids in prompts(3):
        assert torch.equal(forward(fused, ids, None, len(ids))[0], forward(separate, ids, None, len(ids))[0])
        assert baseline_decode(fused, ids, s, {EOS}).tokens == baseline_decode(separate, ids, s, {EOS}).tokens


def test_visible_keys_reads_bool_and_additive_mask_rows():
    from specdec.model.attention import visible_keys

    prefix = torch.tensor([True, True, True, False, False])
    assert visible_keys(prefix) == 3
    assert visible_keys(torch.zeros(5).masked_fill(~prefix, torch.finfo(torch.float32).min)) == 3
    tree_row = torch.tensor([True, True, False, True, False])  # cached prefix, root, a sibling skipped, itself
    assert visible_keys(tree_row).tolist() == [0, 1, 3]


def test_exact_attention_gives_each_row_of_a_masked_pass_its_one_row_bits(monkeypatch):
    """SDPA's rows of a masked 5-row pass differ in the last bits from 5 one-row calls (20 of 20 random cases on
    torch 2.13, one thread); with $SPECDEC_EXACT_ATTENTION=1 they are the same bits, for chains and trees."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from specdec.model.attention import attend_rows, sdpa_one_row  # llama_forward's row-by-row attention
    from specdec.model.kernels import sdpa_gqa_attention

    monkeypatch.setenv("SPECDEC_EXACT_ATTENTION", "1")
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    torch.manual_seed(0)
    for cached in (20, 33):
        rows = 5
        q = torch.randn(1, 9, rows, 64)
        k, v = torch.randn(1, 3, cached + rows, 64), torch.randn(1, 3, cached + rows, 64)
        chain = torch.ones(rows, cached + rows, dtype=torch.bool).tril(cached)
        tree = chain.clone()
        tree[2:, cached + 1] = False  # rows 2.. skip node 1 (a sibling branch), as a tree mask does
        for attend in (chain, tree):
            additive = torch.zeros(attend.shape).masked_fill(~attend, torch.finfo(torch.float32).min)
            for mask in (attend[None, None], additive[None, None]):
                out = sdpa_gqa_attention(module, q, k, v, mask, scaling=0.125)[0]
                ours = attend_rows(q, k, v, mask, functools.partial(sdpa_one_row, scaling=0.125)).transpose(1, 2)
                for r in range(rows):
                    seen = attend[r].nonzero().flatten()
                    one = sdpa_attention_forward(module, q[:, :, r:r + 1], k[:, :, seen], v[:, :, seen], None,
                                                 scaling=0.125, is_causal=False)[0]
                    assert torch.equal(out[:, r:r + 1], one) and torch.equal(ours[:, r:r + 1], one)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_exact_attention_makes_verify_passes_bit_identical_to_one_row_steps(fmt, monkeypatch):
    """float32 activations, bfloat16 matmul inputs: the setting where SDPA's multi-row bits matter (quant.py)."""
    from specdec.model.decoding import new_cache

    monkeypatch.setenv("SPECDEC_EXACT_ATTENTION", "1")
    model = prepare_model(convert(tiny_target(dtype=torch.float32), fmt))
    for ids in prompts(4, length=10):
        head, tail = ids[:6], ids[6:]
        cache = new_cache(model, 32)
        forward(model, head, cache, 1)
        steps = torch.cat([forward(model, [t], cache, 1)[0] for t in tail])
        cache = new_cache(model, 32)
        forward(model, head, cache, 1)
        assert torch.equal(forward(model, tail, cache, len(tail))[0], steps)
    s = DecodeSettings(max_new_tokens=16, k=4, tree_budget=6)
    draft = convert(noisy_copy(tiny_target(dtype=torch.float32), 0.3), fmt)
    for ids in prompts(4):
        plain = decode_models("baseline", model, ids, s, {EOS}).tokens
        for strategy in ("ngram", "suffix", "recycling", "speculative"):
            out = decode_models(strategy, model, ids, s, {EOS},
                                draft_model=draft if strategy == "speculative" else None)
            assert out.tokens == plain, strategy


def test_a_bad_exact_attention_setting_is_refused_before_loading(monkeypatch):
    from specdec.run.runner import SettingsError, check_settings

    monkeypatch.setenv("SPECDEC_EXACT_ATTENTION", "yes")
    with pytest.raises(SettingsError, match="SPECDEC_EXACT_ATTENTION must be 0 or 1, got 'yes'"):
        check_settings("ngram", None, DecodeSettings(), load_registry())
