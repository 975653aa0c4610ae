"""Tiny random-initialised Llama models for fast, deterministic engine tests.

The draft is the target with Gaussian noise added to every weight, so it agrees with the target often but not
always: both the accept and the reject paths run in every test. float64 keeps the 1-token and (k+1)-token
forward passes numerically identical to ~1e-15, so greedy token identity tests the algorithm, not rounding.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.model import kernels

VOCAB = 48
EOS = 2
# Where the engine tests that take a device run their models (conftest's `target` and `draft`, the sampling
# tests' models): cpu by default, cuda (or cuda:N) for scripts/gpu-check.sh's run on a GPU
DEVICE = os.environ.get("SPECDEC_TEST_DEVICE", "cpu")

PANEL_PROBLEM = kernels.panel_kernel_problem()  # builds our AVX-512 kernel once per machine (~35 s), then cached
needs_panels = pytest.mark.skipif(PANEL_PROBLEM is not None,
                                  reason=f"the panel kernel cannot run here: {PANEL_PROBLEM}")
QUANT_PROBLEM = kernels.quant_kernel_problem()  # our int8/int4 kernels: the same extension, and AVX-512 VNNI
needs_vnni = pytest.mark.skipif(QUANT_PROBLEM is not None,
                                reason=f"our int8/int4 kernels cannot run here: {QUANT_PROBLEM}")
AMX_PROBLEM = kernels.amx_problem()  # the same kernels' AMX tiles (Intel Xeons from Sapphire Rapids)
needs_amx = pytest.mark.skipif(AMX_PROBLEM is not None, reason=f"our AMX tiles cannot run here: {AMX_PROBLEM}")


def tiny_config(vocab: int = VOCAB, layers: int = 2, hidden: int = 64) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False)


def tiny_target(seed: int = 0, dtype=torch.float64, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab)).to(dtype)
    # Sharper logits than the default init, so greedy argmaxes are not near-ties and text has structure.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval().requires_grad_(False)


def noisy_copy(model: LlamaForCausalLM, noise: float, seed: int = 1) -> LlamaForCausalLM:
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * noise * p.std().clamp_min(1e-3))
    return draft.eval().requires_grad_(False)


def prompts(n: int, length: int = 12, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    """Random prompts that avoid EOS; every third repeats a phrase so n-gram lookup has something to find."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        if i % 3 == 0:
            ids = ids[: length // 2] * 2
        out.append(ids)
    return out


def paths(tree) -> set[tuple[int, ...]]:
    """Every root-to-node token path of a draft tree (specdec.methods.tree.Tree)."""
    out = set()
    for i in range(len(tree)):
        path, node = [], i
        while node >= 0:
            path.append(tree.tokens[node])
            node = tree.parents[node]
        out.add(tuple(reversed(path)))
    return out


CHARS = ["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)]  # 99 ids: char-level tokenizer


def char_tokenizer():
    """A character-level fast tokenizer (BPE with no merges), so tiny models can read real prompt files."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def save_tiny_pair(root, noise: float = 0.3) -> dict:
    """Save a tiny target and its noisy draft (with tokenizers) under root; returns `models:` entries for them."""
    from pathlib import Path

    root = Path(root)
    target = tiny_target(vocab=len(CHARS), dtype=torch.float32)
    draft = noisy_copy(target, noise)
    entries = {}
    for alias, model in (("tiny-target", target), ("tiny-draft", draft)):
        model.generation_config.eos_token_id = EOS
        model.generation_config.pad_token_id = 0
        model.save_pretrained(root / alias)
        char_tokenizer().save_pretrained(root / alias)
        entries[alias] = {"path": str(root / alias), "dtype": "float32", "chat": False}
    return entries


def context_free_memory(model, prefix=(1,), topk: int = 8) -> dict:
    """The dynamic tree's context-free rows of `model` after `prefix` (default: BOS), as runner.prepare puts them
    in the strategy's memory."""
    from specdec.methods.datastore import context_free_rows
    from specdec.run.runner import next_token_logits

    vocab = model.config.vocab_size
    rows = context_free_rows(lambda tokens: next_token_logits(model, list(prefix), tokens), vocab, min(topk, vocab))
    return {"context_free": rows}
