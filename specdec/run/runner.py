"""Strategies by name (strategies.py): argument checks (before any model loads), pair loading, and one
generation → one record."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from specdec import crash, simulated_crash
from specdec.engines import llamacpp

from specdec.measure import metrics

from specdec.model import quant
from specdec.methods.datastore import (CONTEXT_FREE_PREFIX, DEFAULT_NEW_TOKENS, corpus_documents, load_context_free_rows,
                               load_datastore)
from specdec.model.decoding import Clock, DecodeSettings, baseline_decode, forward, new_cache
from specdec.methods.drafters import DrafterError, find_drafter, load_drafter, parse_for_target
from specdec.engines.hf_reference import hf_decode, hf_decode_batch
from specdec.model.kernels import (attention_kernel, exact_rows_requested, linear_kernels, prepare_model,
                                   quant_kernels)
from specdec.model.llama_forward import forward_choice
from specdec.model.models import (WEIGHT_FORMATS, LoadedModel, ModelError, encode_prompt, load_model, resolve,
                            shared_logit_rows)
from specdec.methods.proposers import DraftLength, make_proposer
from specdec.methods.speculative import Request, decode_slots, speculative_decode
from specdec.strategies import NAMES, STRATEGIES, names
from specdec.methods.tree import Tree, forward_tree

DRAFT_SAMPLING = ("greedy", "sample")
# Upper bounds that catch typos (k 1e9, temperature 70 meant as 0.7) before anything loads; the workflow's config
# schema uses the same numbers. k, the deepest draft position: published drafters go 5-8 deep (Medusa 5 heads,
# EAGLE 6), so 64 leaves room.
# Temperature: the cap of OpenAI's API; already at 2 the embedded SmolLM2's top 50 tokens hold only 21 % of the
# probability (entropy 8.0 of a uniform 10.8 nats; 1.5 % at 5), so samples are noise. max_new_tokens: 32 768,
# far beyond benchmark answers (Spec-Bench, MT-bench: under 2 048) and 4x SmolLM2's context; the KV cache for
# prompt + max_new_tokens is allocated up front, so 1e8 would fail only after the model loads.
MAX_K, MAX_TEMPERATURE, MAX_NEW_TOKENS = 64, 2.0, 32768


class SettingsError(ValueError):
    """Bad strategy arguments (one-line message naming the argument and how to fix it)."""


def check_settings(strategy: str, draft: str | None, s: DecodeSettings, registry: dict | None = None,
                   target: str | None = None, weights: str | None = None) -> None:
    """Every check that needs no model, so bad arguments fail in milliseconds. `weights`: a weight format that
    overrides the aliases' (our engine and transformers'; llama.cpp runs the GGUF's own)."""
    if strategy not in STRATEGIES:
        raise SettingsError(f"unknown strategy '{strategy}'; choose one of: {', '.join(NAMES)}")
    st = STRATEGIES[strategy]
    if st.needs_draft and not draft:
        raise SettingsError(f"strategy '{strategy}' needs a draft model: add --draft ALIAS")
    if not st.needs_draft and draft:
        raise SettingsError(f"strategy '{strategy}' uses no draft model (got draft '{draft}'): drop --draft")
    if not isinstance(s.k, int) or not 1 <= s.k <= MAX_K:  # whatever the strategy: an impossible value is a typo
        raise SettingsError(f"draft length k must be an integer from 1 to {MAX_K}, got {s.k!r}")
    if s.tree_budget is not None and (not st.tree or not isinstance(s.tree_budget, int) or s.tree_budget < 1):
        raise SettingsError(f"tree budget must be an integer >= 1 and is used by tree strategies "
                            f"({', '.join(n for n in NAMES if STRATEGIES[n].tree)}) only, got {s.tree_budget!r} "
                            f"for '{strategy}'")
    if not 0 <= s.temperature <= MAX_TEMPERATURE:
        raise SettingsError(f"temperature must be from 0 (greedy) to {MAX_TEMPERATURE:g}, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise SettingsError(f"top-p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise SettingsError(f"top-k must be >= 0 (0 = off), got {s.top_k}")
    if not 1 <= s.max_new_tokens <= MAX_NEW_TOKENS:
        raise SettingsError(f"max-new-tokens must be from 1 to {MAX_NEW_TOKENS}, got {s.max_new_tokens}")
    if s.draft_sampling not in DRAFT_SAMPLING:
        raise SettingsError(f"draft sampling must be one of {DRAFT_SAMPLING}, got '{s.draft_sampling}'")
    if not s.use_cache and strategy != "baseline":
        raise SettingsError(f"use_cache=false is only measured for the baseline strategy, not '{strategy}'")
    if not 1 <= s.ngram_min <= s.ngram_max:
        raise SettingsError(f"need 1 <= ngram_min <= ngram_max, got {s.ngram_min} and {s.ngram_max}")
    if not isinstance(s.recycle_topk, int) or s.recycle_topk < 1:
        raise SettingsError(f"recycle_topk must be an integer >= 1, got {s.recycle_topk!r}")
    for key, low in (("lookahead_window", 1), ("lookahead_ngram", 3), ("lookahead_guesses", 1)):
        value = getattr(s, key)
        if not isinstance(value, int) or value < low:
            raise SettingsError(f"{key} must be an integer >= {low}, got {value!r}")
    if s.rest_corpus is not None and st.proposer == "rest":
        try:
            corpus_documents(s.rest_corpus)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    try:
        linear_kernels()  # a bad $SPECDEC_CPU_LINEAR, $SPECDEC_CPU_ATTENTION, $SPECDEC_EXACT_ATTENTION or
        attention_kernel()  # $SPECDEC_FORWARD fails here, before any model loads
        quant_kernels()  # and a bad $SPECDEC_CPU_QUANT
        exact_rows_requested()
        forward_choice()
        trained = parse_for_target(draft, target)
    except (ValueError, DrafterError) as exc:
        raise SettingsError(str(exc)) from None
    if trained and not st.takes_trained_drafter:
        raise SettingsError(f"strategy '{strategy}' cannot use the trained drafter '{draft}'; use one of "
                            f"{', '.join(names(draft='model-or-drafter'))}")
    if (trained or st.tree or st.length not in ("fixed", "cost")) and s.draft_sampling != "greedy":
        raise SettingsError(f"'{strategy}' with draft '{draft}' proposes the draft's top tokens (exact at any "
                            "temperature): use draft_sampling greedy")
    if st.engine == llamacpp.ENGINE:
        try:
            llamacpp.check_settings(strategy, s)
        except llamacpp.LlamaCppError as exc:
            raise SettingsError(str(exc)) from None
        if weights is not None:
            raise SettingsError(f"'{strategy}' runs the GGUF's own quantisation; weights ({weights}) apply to our "
                                "engine only: drop the weight format for llama.cpp strategies")
    elif weights is not None and weights not in WEIGHT_FORMATS:
        raise SettingsError(f"weight format '{weights}' is not one of {', '.join(WEIGHT_FORMATS)}")
    if registry is not None:
        for alias in (target, None if trained else draft):
            if alias:
                try:
                    spec = resolve(alias, registry)
                    if st.engine == llamacpp.ENGINE:
                        llamacpp.gguf_file(spec)  # a GGUF alias whose file is here, with no weight format set
                except ModelError as exc:
                    raise SettingsError(str(exc)) from None


@dataclass
class Pair:
    """A loaded target, an optional loaded draft, and the logit rows they share (or a trained drafter)."""
    target: LoadedModel
    draft: LoadedModel | None = None
    vocab: int | None = None
    drafter: object = None  # drafters.Drafter when the draft slot names `<target>+eagle|medusa`
    memory: dict = field(default_factory=dict)  # what model-free proposers learn across this pair's generations


def load_pair(target_alias: str, draft_alias: str | None, registry: dict, device: str = "cpu",
              device_map=None, max_memory=None, tp_plan: str | None = None, drafters_dir=None,
              drafter_settings: dict | None = None, engine: str = "specdec", weights: str | None = None,
              threads: int | None = None) -> Pair:
    """With a device_map the target is placed by accelerate (with tp_plan, sharded by transformers' tensor
    parallelism); the draft always sits whole on `device` (a small draft loses more to cross-device hops than it
    gains from being split). A trained drafter is looked up (and its absence reported) before any model loads.
    engine 'llamacpp' (strategies.Strategy.engine) loads both as llama.cpp models: GGUF aliases on the CPU with
    `threads` threads (default: torch's count). `weights` overrides the aliases' weight format (target and draft
    alike; quant.py)."""
    if engine == llamacpp.ENGINE:
        target, draft = llamacpp.load_pair(resolve(target_alias, registry),
                                           resolve(draft_alias, registry) if draft_alias else None, threads)
        return Pair(target, draft)
    if weights is not None:
        registry = {**registry, **{a: replace(registry[a], weights=weights) for a in (target_alias, draft_alias)
                                   if a in registry}}
    folder = find_drafter(draft_alias, drafters_dir, drafter_settings) if parse_for_target(draft_alias, target_alias) \
        else None
    target = load_model(resolve(target_alias, registry), device=device, device_map=device_map,
                        max_memory=max_memory, tp_plan=tp_plan)
    if not draft_alias:
        return Pair(target)
    if folder is not None:
        return Pair(target, drafter=load_drafter(folder, target.model))
    draft = load_model(resolve(draft_alias, registry), device=device)
    return Pair(target, draft, shared_logit_rows(target, draft))


def decode(pair: Pair, strategy: str, prompt_ids: list[int], s: DecodeSettings):
    """One generation of `prompt_ids` with a loaded pair → Trace."""
    memory = prepare(pair, strategy, s)
    if simulated_crash(f"decode:{strategy}"):
        crash(f"a decode of {strategy}")
    return decode_models(strategy, pair.target.model, prompt_ids, s, pair.target.eos_token_ids,
                         pair.draft.model if pair.draft else None, pair.drafter, pair.vocab,
                         getattr(pair.target.tokenizer, "pad_token_id", None), memory)


def prepare(pair: Pair, strategy: str, s: DecodeSettings) -> dict:
    """The strategy's memory on this pair, with what must exist before its first generation (REST's datastore,
    the dynamic tree's context-free rows: built or read once; warm_up calls this, so the cost never lands in a
    measured generation)."""
    memory = pair.memory.setdefault(strategy, {})
    proposer = STRATEGIES[strategy].proposer
    if proposer == "rest" and memory.get("corpus", False) != s.rest_corpus:
        memory.update(datastore=rest_datastore(pair, s), corpus=s.rest_corpus)
    if proposer == "dynamic-tree" and memory.get("context_free_topk") != s.recycle_topk:
        memory.update(context_free=context_free_candidates(pair, s.recycle_topk), context_free_topk=s.recycle_topk)
    return memory


def cache_label(pair: Pair) -> str:
    """The target's name for what is cached per target (datastore.py): `<alias>` in float32, else
    `<alias>@<format>` (`@int8`, llama.cpp's `@gguf-Q4_1`): what the target computes depends on its weights."""
    fmt = weight_format(pair)
    return pair.target.spec.alias + ("" if fmt == "float32" else f"@{fmt}")


def rest_datastore(pair: Pair, s: DecodeSettings):
    """REST's datastore for this target (datastore.py): the corpus file, or the target's own greedy answers as
    this engine decodes them in this weight format, cached per alias and format (`<alias>@int8`,
    `<alias>@gguf-Q4_1` for llama.cpp; float32 keeps the plain alias): each is built once, and no cell's corpus
    depends on which format happened to run first."""
    greedy = DecodeSettings(max_new_tokens=DEFAULT_NEW_TOKENS, k=8)
    llama = llamacpp.is_llama(pair.target.model)

    def answer(prompt: str) -> list[int]:  # prompt lookup: the same greedy tokens as the baseline, sooner
        strategy = "llamacpp-specdec-ngram" if llama else "ngram"
        return decode(pair, strategy, encode_prompt(pair.target, prompt), greedy).tokens

    return load_datastore(cache_label(pair), s.rest_corpus,
                          lambda text: pair.target.tokenizer.encode(text, add_special_tokens=False), answer)


def context_free_candidates(pair: Pair, topk: int):
    """The dynamic tree's context-free rows for this target (datastore.load_context_free_rows), cached per alias
    and weight format like REST's datastore. Scored with the kernels the decoding loops use (prepare_model, which
    they would call first anyway): 81 s instead of 125 s for SmolLM2-135M's vocabulary on 2 CPU cores."""
    model = prepare_model(pair.target.model)
    prefix = list(pair.target.tokenizer.encode(CONTEXT_FREE_PREFIX))
    vocab = pair.vocab or model.config.vocab_size
    return load_context_free_rows(cache_label(pair), prefix, vocab, min(topk, vocab),
                                  lambda tokens: next_token_logits(model, prefix, tokens))


def next_token_logits(model, prefix: list[int], tokens: list[int]):
    """The model's logits after prefix + [t] for each t in `tokens` (prefix: at least one token), in one verify
    pass of a one-level tree: each token a child of the prefix's last token (tree.forward_tree)."""
    if not prefix:
        raise ValueError("next_token_logits needs a prefix of at least one token (the tree's root)")
    cache = new_cache(model, len(prefix) + len(tokens))
    if len(prefix) > 1:
        forward(model, prefix[:-1], cache)
    star = Tree(list(tokens), [-1] * len(tokens), [1] * len(tokens))
    return forward_tree(model, prefix[-1], star, cache)[0][1:]


def decode_models(strategy: str, target, prompt_ids: list[int], s: DecodeSettings, eos_ids, draft_model=None,
                  drafter=None, vocab: int | None = None, pad_id: int | None = None, memory: dict | None = None):
    """One generation with the strategy's engine, proposer and draft-length policy → Trace."""
    st = STRATEGIES[strategy]
    if st.engine == llamacpp.ENGINE:
        return llamacpp.decode_models(strategy, target, prompt_ids, s, eos_ids, draft_model, memory)
    if llamacpp.is_llama(target):
        raise SettingsError(f"'{strategy}' runs on {st.engine}'s engine, but the pair was loaded for llama.cpp")
    if st.engine == "transformers":
        return hf_decode(strategy, target, prompt_ids, s, sorted(eos_ids), draft=draft_model, pad_id=pad_id)
    eos = set(eos_ids)
    if st.proposer is None:
        return baseline_decode(target, prompt_ids, s, eos)
    return speculative_decode(target, prompt_ids, s, eos,
                              *drafting(strategy, s, eos, draft_model, drafter, vocab, memory), vocab)


def drafting(strategy: str, s: DecodeSettings, eos: set[int], draft_model=None, drafter=None,
             vocab: int | None = None, memory: dict | None = None) -> tuple:
    """(proposer, draft-length policy) of one generation with a strategy of ours."""
    st = STRATEGIES[strategy]
    return (make_proposer(st.proposer, s, draft_model, drafter, vocab, memory),
            DraftLength(s, st.length, st.width, eos if s.stop_at_eos else ()))


def decode_batch(pair: Pair, strategy: str, prompts: list[list[int]], s: DecodeSettings, batch_size: int,
                 on_pass=None) -> list:
    """Every prompt decoded with `batch_size` sequences in flight -> one Trace per prompt, in order. Ours:
    speculative.decode_slots, each sequence with its own proposer over the strategy's shared memory (what a
    proposer learns across a job's prompts, as in decode); `baseline` runs the same slots without one.
    transformers: its batched generate (hf_decode_batch). llama.cpp: one sequence at a time only."""
    st = STRATEGIES[strategy]
    if st.engine == llamacpp.ENGINE:
        raise SettingsError(f"batch size {batch_size}: '{strategy}' runs on llama.cpp's engine, which specdec drives "
                            "one sequence at a time; use batch size 1 (or llama-server for concurrent requests)")
    eos = set(pair.target.eos_token_ids)
    draft = pair.draft.model if pair.draft else None
    if st.engine == "transformers":
        return hf_decode_batch(strategy, pair.target.model, prompts, s, sorted(eos), batch_size, draft=draft,
                               pad_id=getattr(pair.target.tokenizer, "pad_token_id", None))
    memory = prepare(pair, strategy, s)

    def request(ids: list[int]) -> Request:
        if st.proposer is None:
            return Request(ids)
        return Request(ids, *drafting(strategy, s, eos, draft, pair.drafter, pair.vocab, memory))

    # a generator: each request (its proposer's tables) made when its slot opens, freed when it ends
    return decode_slots(pair.target.model, (request(ids) for ids in prompts), s, eos, pair.vocab, batch_size,
                        on_pass)


def generate_batch(pair: Pair, strategy: str, prompts: list[dict], s: DecodeSettings, batch_size: int,
                   rule: metrics.DegenerateRule = metrics.DegenerateRule()) -> tuple[list[dict], dict]:
    """generate() for a queue of prompts ({"prompt": text or token ids, "turns": [...]}) decoded `batch_size` at a
    time -> (one record per prompt, the batch's totals). Conversations go turn by turn: every first turn through
    the slots, then every second turn (each asked after its own answer), and so on. The totals: new tokens of all
    sequences, the wall time of the whole queue, and their ratio, the batch's throughput."""
    device = pair.target.device
    metrics.reset_peak_memory(device)
    tok = pair.target.tokenizer
    turns = [[p["prompt"]] + list(p.get("turns") or []) for p in prompts]
    messages = [[] for _ in prompts]
    records: list[list[dict]] = [[] for _ in prompts]
    clock = Clock(device)
    start = clock()
    for i in range(max(len(t) for t in turns)):
        active = [j for j, t in enumerate(turns) if i < len(t)]
        encoded = []
        for j in active:
            if isinstance(turns[j][i], str):
                if i:
                    messages[j].append({"role": "assistant", "content": records[j][-1]["text"]})
                messages[j].append({"role": "user", "content": turns[j][i]})
                encoded.append(encode_prompt(pair.target, messages[j]))
            else:  # raw token ids (tests, tiny models without a tokenizer)
                encoded.append(list(turns[j][i]))
        for j, ids, trace in zip(active, encoded, decode_batch(pair, strategy, encoded, s, batch_size)):
            text = tok.decode(trace.tokens, skip_special_tokens=True) if tok is not None else None
            records[j].append(record_of(trace, strategy, s, len(ids), text))
    wall = clock() - start
    peak = metrics.peak_memory(device)
    out = []
    for p, recs in zip(prompts, records):
        record = recs[0] if len(recs) == 1 else merge_turns(recs)
        if isinstance(p["prompt"], str):
            user_ids = metrics.user_token_ids(tok, p["prompt"], p.get("turns"))
            record.update(metrics.degeneracy(record["token_ids"], user_ids, rule))
        record["peak_memory_bytes"], record["memory_kind"] = peak
        out.append(record)
    new_tokens = sum(r["new_tokens"] for r in out)
    return out, {"batch_size": batch_size, "sequences": len(out), "new_tokens": new_tokens, "wall_s": wall,
                 "tokens_per_s": new_tokens / wall if wall > 0 else None}


def use_threads(threads: int | None) -> None:
    """One thread setting for both engines: torch's intra-op threads (process-wide) are set here, and llama.cpp
    models are created with torch's count (load_pair). None keeps torch's default (one per core)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SettingsError(f"threads must be an integer >= 1, got {threads!r}")
    torch.set_num_threads(threads)


def threads_in_use(pair: Pair) -> int:
    """The threads the pair decodes with: llama.cpp's for its models, else torch's."""
    model = pair.target.model
    if llamacpp.is_llama(model):
        return int(model.n_threads)
    return torch.get_num_threads()


def extra_buffers_in_use(pair: Pair) -> str | None:
    """How llama.cpp loaded the pair's target (llamacpp.extra_buffers: 'amx', 'off (probe crashed: SIGSEGV)',
    'on (no AMX)', ...); None for the torch engines."""
    return llamacpp.extra_buffers_of(pair.target.model)


def weight_format(pair: Pair) -> str:
    """The target's weight format as it runs: 'gguf-<type>' under llama.cpp, else quant.weight_format."""
    model = pair.target.model
    return llamacpp.weight_format(model) if llamacpp.is_llama(model) else quant.weight_format(model)


def generate(pair: Pair, strategy: str, prompt: str | list[int], s: DecodeSettings,
             turns: list[str] | None = None, rule: metrics.DegenerateRule = metrics.DegenerateRule()) -> dict:
    """One generation → one record. With `turns`, a multi-turn conversation: each follow-up is asked after the
    model's own previous answer (as MT-bench and Spec-Bench do); counts and times are summed over turns.
    `rule`: when the output counts as degenerate (copied from the prompt or looping), see metrics.degeneracy."""
    device = pair.target.device
    metrics.reset_peak_memory(device)
    record = _generate(pair, strategy, prompt, s, turns)
    user_ids = metrics.user_token_ids(pair.target.tokenizer, prompt, turns)
    record.update(metrics.degeneracy(record["token_ids"], user_ids, rule))
    record["peak_memory_bytes"], record["memory_kind"] = metrics.peak_memory(device)
    return record


def _generate(pair: Pair, strategy: str, prompt, s: DecodeSettings, turns) -> dict:
    tok = pair.target.tokenizer
    if not isinstance(prompt, str):  # raw token ids (tests, tiny models without a tokenizer)
        trace = decode(pair, strategy, list(prompt), s)
        return record_of(trace, strategy, s, len(prompt), None)
    messages = [{"role": "user", "content": prompt}]
    records = []
    for i, turn in enumerate([prompt] + list(turns or [])):
        if i:
            messages += [{"role": "assistant", "content": records[-1]["text"]}, {"role": "user", "content": turn}]
        ids = encode_prompt(pair.target, messages)
        trace = decode(pair, strategy, ids, s)
        text = tok.decode(trace.tokens, skip_special_tokens=True)
        records.append(record_of(trace, strategy, s, len(ids), text))
    return records[0] if len(records) == 1 else merge_turns(records)


def record_of(trace, strategy: str, s: DecodeSettings, prompt_tokens: int, text: str | None) -> dict:
    """One generation's metrics record, with the strategy's conventions for k and per-position counts."""
    st = STRATEGIES[strategy]
    # trees and dynamic lengths: metrics' per-step prediction over the depths actually used
    k = (s.k if st.fixed_length else len(trace.proposed_per_position)) if st.uses_k else None
    record = metrics.make_record(trace, k, prompt_tokens, text, st.uses_k)
    if st.engine == "transformers":  # transformers does not expose which draft position was rejected
        record["proposed_per_position"] = record["accepted_per_position"] = None
    return record


SUMMED = ("new_tokens", "wall_s", "target_forward_passes", "draft_forward_passes", "draft_s", "verify_s",
          "proposed_tokens", "accepted_tokens", "prompt_tokens")


def merge_turns(records: list[dict]) -> dict:
    """One record for a conversation: counts and times summed over turns, acceptance pooled (metrics.pool)."""
    merged = dict(records[0])
    for key in SUMMED:
        values = [r[key] for r in records]
        merged[key] = None if any(v is None for v in values) else sum(values)
    pooled = metrics.pool(records)
    for key in ("mean_accepted_tokens", "acceptance_rate", "cost_ratio_c", "leviathan_speedup"):
        merged[key] = pooled[key]
    if records[0]["proposed_per_position"] is not None:
        merged["proposed_per_position"] = pooled["proposed_per_position"]
        merged["accepted_per_position"] = pooled["accepted_per_position"]
    merged["token_ids"] = [t for r in records for t in r["token_ids"]]
    merged["token_hash"] = metrics.token_hash(merged["token_ids"])
    merged["text"] = "\n\n".join(r["text"] or "" for r in records)
    merged["stop_reason"] = records[-1]["stop_reason"]
    merged["tokens_per_s"] = merged["new_tokens"] / merged["wall_s"] if merged["wall_s"] else None
    merged["ttft_s"] = records[0]["ttft_s"]
    decode_tokens = merged["new_tokens"] - len(records)
    merged["tpot_s"] = (sum(r["wall_s"] - r["ttft_s"] for r in records) / decode_tokens) if decode_tokens > 0 else None
    return merged


def warm_up(pair: Pair, strategy: str, prompt_ids: list[int], s: DecodeSettings, runs: int = 1) -> None:
    """Short untimed generations so one-time costs (allocator growth, kernel selection, lazy init) are paid; with
    runs = 0 only the strategy's one-time preparation (prepare)."""
    prepare(pair, strategy, s)
    for _ in range(runs):
        decode(pair, strategy, prompt_ids, replace(s, max_new_tokens=min(s.max_new_tokens, 8)))
