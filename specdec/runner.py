"""Strategies by name: argument checks (before any model loads), model loading, and one generation → one record."""

from __future__ import annotations

from dataclasses import dataclass, replace

from specdec import decoding, drafting, metrics
from specdec.decoding import DecodeSettings, DraftModelState, baseline_decode, speculative_decode
from specdec.drafters import DrafterError, find_drafter, load_drafter, parse_alias
from specdec.hf_runners import HF_STRATEGIES, hf_decode
from specdec.models import LoadedModel, ModelError, encode_prompt, load_model, resolve, verify_rows

STRATEGIES = ("baseline", "speculative", "ngram") + drafting.STRATEGIES + HF_STRATEGIES
NEEDS_DRAFT = ("speculative", "hf-assisted") + drafting.STRATEGIES
USES_K = ("speculative", "ngram", "hf-assisted", "hf-ngram") + drafting.STRATEGIES
TRAINED_DRAFTER_STRATEGIES = ("speculative",) + drafting.STRATEGIES  # a draft slot may name `<target>+eagle|medusa`
DRAFT_SAMPLING = ("greedy", "sample")


class SettingsError(ValueError):
    """Bad strategy arguments (one-line message naming the argument and how to fix it)."""


def check_settings(strategy: str, draft: str | None, s: DecodeSettings, registry: dict | None = None,
                   target: str | None = None) -> None:
    """Every check that needs no model, so bad arguments fail in milliseconds."""
    if strategy not in STRATEGIES:
        raise SettingsError(f"unknown strategy '{strategy}'; choose one of: {', '.join(STRATEGIES)}")
    if strategy in NEEDS_DRAFT and not draft:
        raise SettingsError(f"strategy '{strategy}' needs a draft model: add --draft ALIAS")
    if strategy not in NEEDS_DRAFT and draft:
        raise SettingsError(f"strategy '{strategy}' uses no draft model (got draft '{draft}'): drop --draft")
    if strategy in USES_K and (not isinstance(s.k, int) or s.k < 1):
        raise SettingsError(f"draft length k must be an integer >= 1, got {s.k!r}")
    if s.temperature < 0:
        raise SettingsError(f"temperature must be >= 0 (0 = greedy), got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise SettingsError(f"top-p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise SettingsError(f"top-k must be >= 0 (0 = off), got {s.top_k}")
    if s.max_new_tokens < 1:
        raise SettingsError(f"max-new-tokens must be >= 1, got {s.max_new_tokens}")
    if s.draft_sampling not in DRAFT_SAMPLING:
        raise SettingsError(f"draft sampling must be one of {DRAFT_SAMPLING}, got '{s.draft_sampling}'")
    if not s.use_cache and strategy != "baseline":
        raise SettingsError(f"use_cache=false is only measured for the baseline strategy, not '{strategy}'")
    if not 1 <= s.ngram_min <= s.ngram_max:
        raise SettingsError(f"need 1 <= ngram_min <= ngram_max, got {s.ngram_min} and {s.ngram_max}")
    try:
        decoding.linear_kernels()  # a bad $SPECDEC_CPU_LINEAR fails here, before any model loads
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    try:
        trained = parse_alias(draft)
    except DrafterError as exc:
        raise SettingsError(str(exc)) from None
    if trained and strategy not in TRAINED_DRAFTER_STRATEGIES:
        raise SettingsError(f"strategy '{strategy}' cannot use the trained drafter '{draft}'; use one of "
                            f"{', '.join(TRAINED_DRAFTER_STRATEGIES)}")
    if trained and target and trained[0] != target:
        raise SettingsError(f"drafter '{draft}' belongs to target '{trained[0]}', not '{target}': use "
                            f"'{target}+{trained[1]}'")
    if (trained or strategy in drafting.STRATEGIES) and s.draft_sampling != "greedy":
        raise SettingsError(f"'{strategy}' with draft '{draft}' proposes the draft's top tokens (exact at any "
                            "temperature): use draft_sampling greedy")
    if registry is not None:
        for alias in (target, None if trained else draft):
            if alias:
                try:
                    resolve(alias, registry)
                except ModelError as exc:
                    raise SettingsError(str(exc)) from None


@dataclass
class Pair:
    """A loaded target, an optional loaded draft, and the logit rows they share (or a trained drafter)."""
    target: LoadedModel
    draft: LoadedModel | None = None
    vocab: int | None = None
    drafter: object = None  # drafters.Drafter when the draft slot names `<target>+eagle|medusa`


def load_pair(target_alias: str, draft_alias: str | None, registry: dict, device: str = "cpu",
              device_map=None, max_memory=None, tp_plan: str | None = None, drafters_dir=None,
              drafter_settings: dict | None = None) -> Pair:
    """With a device_map the target is placed by accelerate (with tp_plan, sharded by transformers' tensor
    parallelism); the draft always sits whole on `device` (a small draft loses more to cross-device hops than it
    gains from being split). A trained drafter is looked up (and its absence reported) before any model loads."""
    folder = find_drafter(draft_alias, drafters_dir, drafter_settings) if parse_alias(draft_alias) else None
    target = load_model(resolve(target_alias, registry), device=device, device_map=device_map,
                        max_memory=max_memory, tp_plan=tp_plan)
    if not draft_alias:
        return Pair(target)
    if folder is not None:
        return Pair(target, drafter=load_drafter(folder, target.model))
    draft = load_model(resolve(draft_alias, registry), device=device)
    return Pair(target, draft, verify_rows(target, draft))


def decode(pair: Pair, strategy: str, prompt_ids: list[int], s: DecodeSettings):
    target = pair.target
    eos = set(target.eos_token_ids)
    if strategy == "baseline":
        return baseline_decode(target.model, prompt_ids, s, eos)
    if strategy in drafting.STRATEGIES or pair.drafter is not None:
        return drafting.decode(strategy, target.model, prompt_ids, s, eos, pair.draft.model if pair.draft else None,
                               pair.drafter, pair.vocab)
    if strategy == "speculative":
        state = DraftModelState(pair.draft.model, vocab=pair.vocab)
        return speculative_decode(target.model, prompt_ids, s, eos, draft=state, vocab=pair.vocab)
    if strategy == "ngram":
        return speculative_decode(target.model, prompt_ids, s, eos)
    return hf_decode(strategy, target.model, prompt_ids, s, target.eos_token_ids,
                     draft=pair.draft.model if pair.draft else None,
                     pad_id=getattr(target.tokenizer, "pad_token_id", None))


def generate(pair: Pair, strategy: str, prompt: str | list[int], s: DecodeSettings,
             turns: list[str] | None = None) -> dict:
    """One generation → one record. With `turns`, a multi-turn conversation: each follow-up is asked after the
    model's own previous answer (as MT-bench and Spec-Bench do); counts and times are summed over turns."""
    device = pair.target.device
    metrics.reset_peak_memory(device)
    record = _generate(pair, strategy, prompt, s, turns)
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
    if len(records) == 1:
        return records[0]
    steps = sum(r["target_forward_passes"] - 1 for r in records)
    return merge_turns(records, prediction_k(strategy, s, sum(r["proposed_tokens"] or 0 for r in records), steps))


def prediction_k(strategy: str, s: DecodeSettings, proposed: int, steps: int) -> float | None:
    """The k of a merged record's Leviathan prediction: the fixed k, or for trees and dynamic lengths the mean
    number of draft positions per verify step (treated as a chain of that length)."""
    if strategy not in USES_K:
        return None
    if strategy in drafting.STRATEGIES:
        return proposed / steps if steps else None
    return s.k


def record_of(trace, strategy: str, s: DecodeSettings, prompt_tokens: int, text: str | None) -> dict:
    """One generation's metrics record, with the strategy's conventions for k and per-position counts."""
    speculative = strategy in USES_K
    k = s.k if speculative else None
    if strategy in drafting.STRATEGIES:  # lengths vary per step: metrics' per-step prediction over the lengths used
        k = len(trace.proposed_per_position)
    record = metrics.make_record(trace, k, prompt_tokens, text, speculative)
    if strategy in HF_STRATEGIES:  # transformers does not expose which draft position was rejected
        record["proposed_per_position"] = record["accepted_per_position"] = None
    return record


SUMMED = ("new_tokens", "wall_s", "target_forward_passes", "draft_forward_passes", "draft_s", "verify_s",
          "proposed_tokens", "accepted_tokens", "prompt_tokens")


def merge_turns(records: list[dict], k: int | None) -> dict:
    merged = dict(records[0])
    for key in SUMMED:
        values = [r[key] for r in records]
        merged[key] = None if any(v is None for v in values) else sum(values)
    for key in ("proposed_per_position", "accepted_per_position"):
        if records[0][key] is not None:
            merged[key] = [sum(col) for col in zip(*(r[key] for r in records))]
    merged["token_ids"] = [t for r in records for t in r["token_ids"]]
    merged["token_hash"] = metrics.token_hash(merged["token_ids"])
    merged["text"] = "\n\n".join(r["text"] or "" for r in records)
    merged["stop_reason"] = records[-1]["stop_reason"]
    merged["tokens_per_s"] = merged["new_tokens"] / merged["wall_s"] if merged["wall_s"] else None
    merged["ttft_s"] = records[0]["ttft_s"]
    decode_tokens = merged["new_tokens"] - len(records)
    merged["tpot_s"] = (sum(r["wall_s"] - r["ttft_s"] for r in records) / decode_tokens) if decode_tokens > 0 else None
    if merged["target_forward_passes"]:
        merged["mean_accepted_tokens"] = merged["new_tokens"] / merged["target_forward_passes"]
    if merged["proposed_tokens"]:
        merged["acceptance_rate"] = merged["accepted_tokens"] / merged["proposed_tokens"]
        cs = [r["cost_ratio_c"] for r in records if r["cost_ratio_c"] is not None]
        merged["cost_ratio_c"] = sum(cs) / len(cs) if cs else None
        merged["leviathan_speedup"] = metrics.leviathan_speedup(merged["acceptance_rate"], k, merged["cost_ratio_c"])
    return merged


def warm_up(pair: Pair, strategy: str, prompt_ids: list[int], s: DecodeSettings, runs: int = 1) -> None:
    """Short untimed generations so one-time costs (allocator growth, kernel selection, lazy init) are paid."""
    for _ in range(runs):
        decode(pair, strategy, prompt_ids, replace(s, max_new_tokens=min(s.max_new_tokens, 8)))
