"""`specdec bench`: our decoding engine against transformers' own, side by side in one process.

Every runner (a strategy, with a draft where it needs one) decodes the same prompts with the same pair, k and
sampling settings. Runs are interleaved: each repeat walks the prompts, and for each prompt every runner decodes
it once, in an order that rotates with the repeat, so load from other processes hits every runner alike. Numbers
are medians over repeats. Our runners use models prepared by `decoding.prepare_model` (on a CPU: linear kernels
chosen per CPU, see `decoding.linear_kernels`); transformers' runners use separate, stock copies of the same
weights.

Output: one table per concern (speed, where the time goes, memory) and, as the last line, one JSON object.
Peak memory is measured per runner in a fresh subprocess (see `probe_memory`), because a process's peak RSS only
ever grows.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

PEERS = {"baseline": "hf-generate", "speculative": "hf-assisted", "ngram": "hf-ngram"}
DEFAULT_RUNNERS = ("baseline", "speculative", "ngram", "hf-generate", "hf-assisted", "hf-ngram")
GOALS = {"speculative_over_hf_assisted": 1.25, "ngram_over_hf_ngram": 1.10, "baseline_over_hf_generate": 1.0,
         "leviathan_fraction": 0.90, "leviathan_min_alpha": 0.5, "memory_over_weights_and_kv": 1.2}


class BenchError(ValueError):
    """Bad bench arguments (one-line message naming the argument and how to fix it)."""


@dataclass(frozen=True)
class Cell:
    """One runner: a strategy and, for strategies that need one, a draft spec ("alias" or "alias:LAYERS")."""
    strategy: str
    draft: str | None = None

    @property
    def name(self) -> str:
        return f"{self.strategy}@{self.draft}" if self.draft else self.strategy

    @property
    def engine(self) -> str:
        from specdec.hf_runners import HF_STRATEGIES

        return "transformers" if self.strategy in HF_STRATEGIES else "specdec"


def peer_of(cell: Cell) -> Cell | None:
    """transformers' counterpart of one of our runners (same draft), if it has one."""
    peer = PEERS.get(cell.strategy)
    return Cell(peer, cell.draft) if peer else None


def engine_baseline(cell: Cell) -> Cell:
    """Speedups are measured against the same engine's plain decoding."""
    return Cell("hf-generate") if cell.engine == "transformers" else Cell("baseline")


# --- arguments ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specdec bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, metavar="FILE", help="YAML file adding or overriding model aliases")
    p.add_argument("--target", default="smollm2-135m", help="target model alias (default: %(default)s)")
    p.add_argument("--draft", action="append", default=None, metavar="ALIAS[:LAYERS]",
                   help="draft for the strategies that need one; repeat for several. ALIAS:N is the alias cut to "
                        "its first N decoder layers (plus its final norm and head); TARGET+eagle or TARGET+medusa "
                        "is a drafter trained with `specdec train-drafter`. Default: the target itself")
    p.add_argument("--drafters-dir", default=None,
                   help="where trained drafters live (default: $SPECDEC_DRAFTERS_DIR or results/drafters)")
    p.add_argument("--runners", default=",".join(DEFAULT_RUNNERS),
                   help="comma-separated strategies from specdec.runner.STRATEGIES, or 'all' (default: %(default)s)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompt JSONL (default: prompts/suite.jsonl)")
    p.add_argument("--categories", default=None, help="comma-separated prompt categories (default: all)")
    p.add_argument("--per-category", type=int, default=1, help="prompts per category (default: 1)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated prompt ids (instead of categories)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="draft length (default: 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--draft-sampling", default="greedy", choices=["greedy", "sample"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ngram-max", type=int, default=3)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    p.add_argument("--repeats", type=int, default=3, help="measured passes over all prompts (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed short generations per runner (default: 1)")
    p.add_argument("--memory", default="subprocess", choices=["subprocess", "off"],
                   help="measure each runner's peak memory in a fresh process (default) or skip it")
    p.add_argument("--profile", action="store_true",
                   help="also run one generation per runner of ours under the torch profiler and print op shares")
    p.add_argument("--stock-kernels", action="store_true",
                   help="ablation: run our loops on stock transformers layers (no prepare_model)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu | cuda:N (default: cpu)")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)  # internal: one runner, one process
    return p


def split_list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def parse_draft(spec: str) -> tuple[str, int | None]:
    from specdec.drafters import DrafterError, parse_alias

    try:
        if parse_alias(spec):  # a trained drafter: no layer cut
            return spec, None
    except DrafterError as exc:
        raise BenchError(str(exc)) from None
    alias, _, layers = spec.partition(":")
    if not layers:
        return alias, None
    if not layers.isdigit() or int(layers) < 1:
        raise BenchError(f"draft '{spec}': the part after ':' must be a number of layers >= 1 (e.g. {alias}:8)")
    return alias, int(layers)


def default_prompts_file() -> Path:
    here = Path("prompts/suite.jsonl")
    if here.is_file():
        return here
    return Path(__file__).resolve().parent.parent / "prompts" / "suite.jsonl"


def settings_from(args):
    from specdec.decoding import DecodeSettings

    return DecodeSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, k=args.k, draft_sampling=args.draft_sampling, seed=args.seed,
                          stop_at_eos=not args.ignore_eos, ngram_max=args.ngram_max)


def check_args(args, registry) -> tuple[list[Cell], object, list[dict]]:
    """Every check that needs no model: runners, drafts, settings, prompts. Returns (cells, settings, prompts)."""
    from specdec.models import ModelError, resolve
    from specdec.prompts import PromptFileError, load_prompts, select
    from specdec.drafters import DrafterError, find_drafter, parse_alias
    from specdec.runner import NEEDS_DRAFT, STRATEGIES, TRAINED_DRAFTER_STRATEGIES, SettingsError, check_settings

    if args.repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")
    strategies = list(STRATEGIES) if args.runners.strip() == "all" else split_list(args.runners)
    if not strategies:
        raise BenchError("--runners is empty; give e.g. --runners baseline,hf-generate")
    unknown = [x for x in strategies if x not in STRATEGIES]
    if unknown:
        raise BenchError(f"unknown runner(s) {unknown}; choose from: {', '.join(STRATEGIES)} (or 'all')")
    drafts = args.draft or [args.target]
    for spec in drafts:
        parse_draft(spec)
    s = settings_from(args)
    try:
        resolve(args.target, registry)
        for spec in drafts:
            if parse_alias(spec):
                find_drafter(spec, args.drafters_dir)  # trained already? (else: the command that trains it)
            else:
                resolve(parse_draft(spec)[0], registry)
    except (ModelError, DrafterError) as exc:
        raise BenchError(str(exc)) from None
    cells = []
    for strategy in dict.fromkeys(strategies):
        for draft in (drafts if strategy in NEEDS_DRAFT else [None]):
            if draft and parse_alias(draft) and strategy not in TRAINED_DRAFTER_STRATEGIES:
                continue  # e.g. transformers' hf-assisted cannot drive a drafter specdec trained
            try:
                check_settings(strategy, parse_draft(draft)[0] if draft else None, s, registry, args.target)
            except SettingsError as exc:
                raise BenchError(str(exc)) from None
            cells.append(Cell(strategy, draft))
    path = Path(args.prompts) if args.prompts else default_prompts_file()
    try:
        prompts = select(load_prompts(path), ids=split_list(args.prompt_ids) or None,
                         categories=split_list(args.categories) or None,
                         per_category=None if args.prompt_ids else args.per_category)
    except PromptFileError as exc:
        raise BenchError(f"{exc} (pass --prompts FILE)" if not args.prompts else str(exc)) from None
    if not prompts:
        raise BenchError(f"no prompt in {path} matches --categories {args.categories!r}")
    return cells, s, prompts


# --- models ---------------------------------------------------------------------------------------------------

def decoder_layers(model):
    """The ModuleList of decoder blocks (Llama/Qwen/Mistral `model.layers`, GPT-NeoX `gpt_neox.layers`, GPT-2 `h`)."""
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if layers is not None:
            return base, name, layers
    raise BenchError(f"cannot cut {type(model).__name__} to fewer layers: no decoder layer list found")


def truncate_layers(model, n: int):
    """A copy of `model` that keeps its first n decoder blocks, final norm and head: an untrained early-exit draft
    that shares the target's vocabulary (honestly cheaper, usually much less accurate)."""
    base, name, layers = decoder_layers(model)
    if n >= len(layers):
        raise BenchError(f"a draft cut to {n} layers needs a model with more than {n} (it has {len(layers)})")
    short = copy.deepcopy(model)
    short_base, _, short_layers = decoder_layers(short)
    setattr(short_base, name, type(short_layers)(list(short_layers)[:n]))
    cfg = short.config.get_text_config(decoder=True)
    cfg.num_hidden_layers = n
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:n]
    return short


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def held_bytes(models) -> int:
    """Bytes of every tensor the models hold: parameters, buffers and pre-packed weights (each storage once)."""
    import torch

    seen, total = set(), 0
    for model in models:
        tensors = list(model.parameters()) + list(model.buffers())
        tensors += [m.packed for m in model.modules() if isinstance(getattr(m, "packed", None), torch.Tensor)]
        for t in tensors:
            key = id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size() if t.is_mkldnn else t.untyped_storage().nbytes()
    return total


def kv_bytes_per_token(model) -> int:
    """layers × 2 (K and V) × kv_heads × head_dim × bytes per element, at the model's own dtype."""
    from specdec.devices import kv_cache_bytes

    return kv_cache_bytes(model.config, 1, next(model.parameters()).element_size())


@dataclass
class Loaded:
    """Per engine ('specdec' or 'transformers'): runner.Pair per draft spec (None: no draft)."""
    pairs: dict
    weights_bytes: dict   # (engine, draft spec) -> target + draft parameter bytes, counted before preparing
    kv_per_token: dict    # (engine, draft spec) -> KV bytes per token, target + draft


def load_models(target_alias: str, cells: list[Cell], registry, device: str, stock_kernels: bool,
                drafters_dir=None) -> Loaded:
    """One stock target load; every engine and draft gets its own copy, so no runner shares weights with
    another (a self-draft is a second copy of the target, as a separately loaded draft would be). A trained
    drafter reads its engine's target (features, embedding, LM head), as it does in a workflow cell."""
    from specdec.decoding import prepare_model
    from specdec.drafters import find_drafter, load_drafter, parse_alias
    from specdec.models import LoadedModel, ModelError, load_model, resolve, verify_rows
    from specdec.runner import Pair

    def copy_of(loaded: LoadedModel, model=None) -> LoadedModel:
        return replace(loaded, model=copy.deepcopy(model if model is not None else loaded.model))

    def ready(loaded: LoadedModel, engine: str) -> LoadedModel:
        if engine == "specdec":
            if stock_kernels:
                loaded.model._specdec_prepared = True  # ablation: our loops skip preparing
            prepare_model(loaded.model)
        return loaded

    try:
        target = load_model(resolve(target_alias, registry), device=device)
        engines = sorted({c.engine for c in cells})
        base_drafts: dict[str, LoadedModel] = {}
        pairs, weights, kv = {}, {}, {}
        for engine in engines:
            drafts = sorted({c.draft for c in cells if c.engine == engine}, key=lambda d: d or "")
            # the last engine takes the loaded target itself; drafts are copied from it before it is prepared
            engine_target = target if engine == engines[-1] else copy_of(target)
            for spec in drafts:
                key = (engine, spec)
                if spec is None:
                    weights[key] = parameter_bytes(engine_target.model)
                    kv[key] = kv_bytes_per_token(engine_target.model)
                    pairs[key] = Pair(engine_target)
                    continue
                if parse_alias(spec):
                    drafter = load_drafter(find_drafter(spec, drafters_dir), engine_target.model)
                    cfg = drafter.module.config()
                    weights[key] = parameter_bytes(engine_target.model) + parameter_bytes(drafter.module)
                    # an EAGLE layer caches keys and values of one layer; Medusa heads cache nothing
                    kv[key] = kv_bytes_per_token(engine_target.model) + (
                        2 * cfg["hidden"] * 4 if drafter.kind == "eagle" else 0)
                    pairs[key] = Pair(engine_target, drafter=drafter)
                    continue
                alias, layers = parse_draft(spec)
                if alias == target_alias:
                    base = target
                else:
                    if alias not in base_drafts:
                        base_drafts[alias] = load_model(resolve(alias, registry), device=device)
                    base = base_drafts[alias]
                draft = replace(base, model=truncate_layers(base.model, layers)) if layers else copy_of(base)
                vocab = verify_rows(engine_target, draft)
                weights[key] = parameter_bytes(engine_target.model) + parameter_bytes(draft.model)
                kv[key] = kv_bytes_per_token(engine_target.model) + kv_bytes_per_token(draft.model)
                pairs[key] = Pair(engine_target, ready(draft, engine), vocab)
            ready(engine_target, engine)
    except ModelError as exc:
        raise BenchError(str(exc)) from None
    return Loaded(pairs, weights, kv)


# --- running --------------------------------------------------------------------------------------------------

def run_once(loaded: Loaded, cell: Cell, prompt_ids: list[int], s):
    """One generation → (record, trace), timed by the strategy's own loop."""
    from specdec.runner import decode, record_of

    pair = loaded.pairs[(cell.engine, cell.draft)]
    trace = decode(pair, cell.strategy, prompt_ids, s)
    return record_of(trace, cell.strategy, s, len(prompt_ids), None), trace


def run_interleaved(loaded: Loaded, cells: list[Cell], encoded: list[list[int]], s, repeats: int, warmup: int,
                    log=print) -> dict:
    """Every cell on every prompt, `repeats` times; within a repeat the cells take turns on each prompt."""
    from specdec.runner import warm_up

    for cell in cells:
        warm_up(loaded.pairs[(cell.engine, cell.draft)], cell.strategy, encoded[0], s, warmup)
    runs = {c.name: [] for c in cells}
    for repeat in range(repeats):
        order = cells[repeat % len(cells):] + cells[:repeat % len(cells)]
        started = time.perf_counter()
        for p_index, ids in enumerate(encoded):
            for cell in order:
                gc.collect()
                record, trace = run_once(loaded, cell, ids, s)
                runs[cell.name].append({"prompt": p_index, "repeat": repeat, "record": record, "trace": trace})
        log(f"[bench] repeat {repeat + 1}/{repeats} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise_cell(cell: Cell, runs: list[dict], k: int) -> dict:
    from specdec.metrics import expected_tokens, leviathan_speedup

    by_prompt: dict[int, list[dict]] = {}
    for run in runs:
        by_prompt.setdefault(run["prompt"], []).append(run["record"])
    # tokens/s = Σ over prompts of the median tokens ÷ Σ of the median wall times (medians over repeats)
    tokens = sum(median([r["new_tokens"] for r in recs]) for recs in by_prompt.values())
    wall = sum(median([r["wall_s"] for r in recs]) for recs in by_prompt.values())
    records = [run["record"] for run in runs]
    proposed = sum(r["proposed_tokens"] or 0 for r in records)
    accepted = sum(r["accepted_tokens"] or 0 for r in records)
    alpha = accepted / proposed if proposed else None
    c = median([r["cost_ratio_c"] for r in records])
    speculative = any(r["proposed_tokens"] is not None for r in records)
    passes = sum(r["target_forward_passes"] for r in records)
    steps = sum(run["trace"].steps for run in runs)
    predicted, by_position = None, None
    per_position = [r["proposed_per_position"] for r in records]
    depth = len(per_position[0] or [])  # k, or the deepest draft a tree / dynamic length can reach
    # ours: per-position counts, so each step's draft length is known (transformers reports totals only)
    if cell.engine == "specdec" and depth and all(p is not None and len(p) == depth for p in per_position):
        proposed_at = [sum(col) for col in zip(*per_position)]
        accepted_at = [sum(col) for col in zip(*(r["accepted_per_position"] for r in records))]
        by_position = [a / p if p else None for a, p in zip(accepted_at, proposed_at)]
    if speculative and alpha is not None and c is not None and steps:
        if by_position is not None:
            predicted = leviathan_speedup(alpha, depth, c, proposed_at, steps)
        else:  # totals only: the mean draft length per verify pass stands in for k
            n = proposed / steps
            predicted = expected_tokens(alpha, n) / (n * c + 1)
    return {
        "cell": cell.name, "strategy": cell.strategy, "draft": cell.draft, "engine": cell.engine,
        "runs": len(runs), "new_tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "acceptance_rate": alpha,
        "acceptance_by_position": by_position,  # accepted ÷ proposed at draft position 1, 2, … (trees: depth)
        "mean_accepted_tokens": sum(r["new_tokens"] for r in records) / passes if passes else None,
        "cost_ratio_c": c,
        "leviathan_prediction": predicted,
    }


def step_breakdown(runs: list[dict]) -> dict | None:
    """Where the time goes per target step (ms), over all runs of one of our runners."""
    traces = [run["trace"] for run in runs]
    steps = sum(t.steps for t in traces)
    if not steps:
        return None
    wall = sum(t.wall_s - t.ttft_s for t in traces)
    draft = sum(t.draft_s for t in traces)
    verify = sum(t.verify_s for t in traces)
    accept = sum(t.accept_s for t in traces)
    rollback = sum(t.rollback_s for t in traces)
    if not verify:  # plain decoding: every step is one target forward, nothing else is timed separately
        return {"steps": steps, "step_ms": 1000 * wall / steps, "draft_ms": 0.0, "verify_forward_ms": 1000 * wall / steps,
                "accept_ms": 0.0, "rollback_ms": 0.0, "other_ms": 0.0, "prefill_ms": 1000 * median([t.ttft_s for t in traces])}
    return {"steps": steps, "step_ms": 1000 * wall / steps, "draft_ms": 1000 * draft / steps,
            "verify_forward_ms": 1000 * (verify - accept) / steps, "accept_ms": 1000 * accept / steps,
            "rollback_ms": 1000 * rollback / steps,
            "other_ms": 1000 * (wall - draft - verify - rollback) / steps,
            "prefill_ms": 1000 * median([t.ttft_s for t in traces])}


def verify_over_step(runs: list[dict], base_runs: list[dict] | None) -> float | None:
    """Mean target verify forward (k+1 tokens) ÷ mean plain decoding step of the same engine, in one run."""
    traces = [r["trace"] for r in runs]
    steps, verify = sum(t.steps for t in traces), sum(t.verify_s - t.accept_s for t in traces)
    if not base_runs or not steps or not verify:
        return None
    base = [r["trace"] for r in base_runs]
    base_steps, base_time = sum(t.steps for t in base), sum(t.wall_s - t.ttft_s for t in base)
    return (verify / steps) / (base_time / base_steps) if base_steps and base_time > 0 else None


def identical_fraction(runs: list[dict], reference: list[dict]) -> float | None:
    """Share of (prompt, repeat) generations whose tokens equal our baseline's (meaningful for greedy only)."""
    ref = {(r["prompt"], r["repeat"]): r["record"]["token_hash"] for r in reference}
    pairs = [(r["record"]["token_hash"], ref.get((r["prompt"], r["repeat"]))) for r in runs]
    pairs = [(a, b) for a, b in pairs if b is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def summarise(cells: list[Cell], runs: dict, s) -> dict:
    summary = {c.name: summarise_cell(c, runs[c.name], s.k) for c in cells}
    ratios, leviathan = {}, {}
    for cell in cells:
        row = summary[cell.name]
        base = summary.get(engine_baseline(cell).name)
        row["speedup"] = (row["tokens_per_s"] / base["tokens_per_s"]
                          if base and base["tokens_per_s"] and row["tokens_per_s"] else None)
        peer = peer_of(cell)
        if cell.engine == "specdec" and peer and peer.name in summary:
            ours, theirs = row["tokens_per_s"], summary[peer.name]["tokens_per_s"]
            row["over_peer"] = ours / theirs if ours and theirs else None
            ratios[f"{cell.name}/{peer.name}"] = row["over_peer"]
        else:
            row["over_peer"] = None
        predicted = row["leviathan_prediction"]
        row["measured_over_predicted"] = row["speedup"] / predicted if predicted and row["speedup"] else None
        # Leviathan's model prices a verify pass like one plain step; on a CPU a (k+1)-token pass costs more.
        # Scaling the prediction by (plain step ÷ verify pass), both measured here, leaves only engine overhead.
        v = verify_over_step(runs[cell.name], runs.get(engine_baseline(cell).name)) if cell.engine == "specdec" \
            else None
        row["verify_over_step"] = v
        row["measured_over_predicted_with_verify_cost"] = (row["speedup"] * v / predicted
                                                           if predicted and v and row["speedup"] else None)
        if predicted is not None:
            leviathan[cell.name] = {"alpha": row["acceptance_rate"], "c": row["cost_ratio_c"], "k": s.k,
                                    "predicted": predicted, "measured": row["speedup"],
                                    "measured_over_predicted": row["measured_over_predicted"],
                                    "verify_over_step": v,
                                    "measured_over_predicted_with_verify_cost":
                                        row["measured_over_predicted_with_verify_cost"]}
        row["identical_to_baseline"] = (identical_fraction(runs[cell.name], runs["baseline"])
                                        if s.greedy and "baseline" in runs else None)
        row["step_breakdown"] = step_breakdown(runs[cell.name]) if cell.engine == "specdec" else None
    return {"cells": summary, "ratios": ratios, "leviathan": leviathan}


# --- memory ---------------------------------------------------------------------------------------------------

def proc_status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def probe_memory(spec: dict) -> dict:
    """Runs inside a fresh process: load only what one runner needs, decode the longest prompt once, and report
    its peak memory as the bytes of every tensor the models hold (weights as stored: pre-packed for ours) plus
    the peak growth during the measured generation (KV caches, activations, logits, allocator slack). CPU: RSS
    from /proc/self/status, the peak (VmHWM) reset right before the generation; CUDA: the allocator's counters.
    The RSS growth of loading (weights still mapped from the file, tokenizer, library code) is reported beside
    it as loaded_rss_bytes, not charged to the run."""
    import torch

    from specdec.models import load_registry

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cuda = device.startswith("cuda")
    registry = load_registry(spec["models"])
    cell = Cell(spec["strategy"], spec["draft"])
    s = settings_from(argparse.Namespace(**spec["settings"]))
    from specdec.runner import warm_up

    def resident() -> int:
        return torch.cuda.memory_allocated(device) if cuda else proc_status_kb("VmRSS") * 1024

    gc.collect()
    start = resident()
    loaded = load_models(spec["target"], [cell], registry, device, spec["stock_kernels"], spec.get("drafters_dir"))
    gc.collect()
    after_load = resident()
    key = (cell.engine, cell.draft)
    # One short untimed generation first, as in the timed runs: the libraries' one-time lazy set-up (kernel code
    # pages, thread pools, oneDNN primitives) is reported as warmup_bytes, not charged to the run.
    warm_up(loaded.pairs[key], cell.strategy, spec["prompt_ids"], s, 1)
    gc.collect()
    before_run = resident()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    elif not reset_peak_rss():
        raise BenchError("cannot reset the peak RSS (/proc/self/clear_refs); run with --memory off")
    record, _ = run_once(loaded, cell, spec["prompt_ids"], s)
    peak_run = torch.cuda.max_memory_allocated(device) if cuda else proc_status_kb("VmHWM") * 1024
    seq = len(spec["prompt_ids"]) + record["new_tokens"] + (s.k if cell.strategy != "baseline" else 0)
    weights, kv = loaded.weights_bytes[key], loaded.kv_per_token[key] * seq
    pair = loaded.pairs[key]
    held = held_bytes([pair.target.model] + ([pair.draft.model] if pair.draft else [])
                      + ([pair.drafter.module] if pair.drafter else []))
    peak = held + (peak_run - before_run)
    return {"cell": cell.name, "peak_bytes": peak, "held_bytes": held, "run_bytes": peak_run - before_run,
            "loaded_rss_bytes": after_load - start, "warmup_bytes": before_run - after_load,
            "weights_bytes": weights, "kv_bytes": kv, "sequence_tokens": seq,
            "over_weights_and_kv": peak / (weights + kv),
            "method": "held tensor bytes + (peak during run - before run), "
                      + ("CUDA allocator counters" if cuda else "RSS from /proc/self/status")}


def measure_memory(cells: list[Cell], args, s, prompt_ids: list[int], log=print) -> dict:
    results = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors leave RSS at once (no arena reuse)
    for cell in cells:
        spec = {"strategy": cell.strategy, "draft": cell.draft, "target": args.target, "models": args.models,
                "device": args.device, "threads": args.threads, "stock_kernels": args.stock_kernels,
                "drafters_dir": args.drafters_dir, "prompt_ids": prompt_ids, "settings": {k: getattr(args, k) for k in SETTINGS_ARGS}}
        out = subprocess.run([sys.executable, "-m", "specdec.bench", "--probe-memory", json.dumps(spec)],
                             capture_output=True, text=True, env=env, timeout=1800)
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            error = (out.stderr.strip().splitlines() or ["no output"])[-1]
            log(f"[bench] memory probe for {cell.name} failed: {error}", file=sys.stderr)
            results[cell.name] = {"cell": cell.name, "error": error}
            continue
        results[cell.name] = json.loads(lines[-1])
        log(f"[bench] memory of {cell.name}: {results[cell.name]['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    return results


SETTINGS_ARGS = ("max_new_tokens", "temperature", "top_p", "top_k", "k", "draft_sampling", "seed", "ignore_eos",
                 "ngram_max")


# --- profile --------------------------------------------------------------------------------------------------

def profile_cell(loaded: Loaded, cell: Cell, prompt_ids: list[int], s) -> dict:
    """One generation under the torch profiler: share of wall time per kind of operator; the rest is Python
    (our loop and transformers' module code, mask building, cache bookkeeping)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        record, _ = run_once(loaded, cell, prompt_ids, s)
    groups = {"linear": 0.0, "attention": 0.0, "other_ops": 0.0}
    top = []
    for event in prof.key_averages():
        if not event.key.startswith("aten::") and not event.key.startswith("mkldnn::"):
            continue
        self_s = event.self_cpu_time_total / 1e6
        name = event.key
        if any(x in name for x in ("mm", "linear", "addmm", "matmul", "mkldnn")):
            groups["linear"] += self_s
        elif "attention" in name:
            groups["attention"] += self_s
        else:
            groups["other_ops"] += self_s
        top.append((self_s, name))
    wall = record["wall_s"]
    shares = {k: v / wall for k, v in groups.items()}
    shares["python_and_framework"] = max(0.0, 1 - sum(shares.values()))
    top.sort(reverse=True)
    return {"wall_s": wall, "shares": shares, "top_ops": [(n, round(t / wall, 4)) for t, n in top[:6]]}


# --- output ---------------------------------------------------------------------------------------------------

def fmt(value, spec: str = ".2f", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def print_tables(summary: dict, memory: dict, profiles: dict, header: str, out=None) -> None:
    out = out or sys.stdout
    cells = summary["cells"]
    print(header, file=out)
    cols = ["runner", "engine", "tok/s", "x peer", "speedup", "alpha", "tok/step", "c", "Leviathan", "meas/pred",
            "verify/step", "meas/pred*v", "same tokens"]
    rows = []
    for name, r in cells.items():
        rows.append([name, r["engine"], fmt(r["tokens_per_s"], ".1f"), fmt(r["over_peer"]), fmt(r["speedup"]),
                     fmt(r["acceptance_rate"]), fmt(r["mean_accepted_tokens"]), fmt(r["cost_ratio_c"], ".3f"),
                     fmt(r["leviathan_prediction"]), fmt(r["measured_over_predicted"]), fmt(r["verify_over_step"]),
                     fmt(r["measured_over_predicted_with_verify_cost"]), fmt(r["identical_to_baseline"], ".0%")])
    print_table(cols, rows, out)
    breakdown = [(n, r["step_breakdown"]) for n, r in cells.items() if r["step_breakdown"]]
    if breakdown:
        print("\nwhere the time goes, ms per target step (ours):", file=out)
        cols = ["runner", "step", "draft", "verify fwd", "accept", "rollback", "other", "prefill"]
        print_table(cols, [[n, fmt(b["step_ms"]), fmt(b["draft_ms"]), fmt(b["verify_forward_ms"]),
                            fmt(b["accept_ms"], ".3f"), fmt(b["rollback_ms"], ".3f"), fmt(b["other_ms"], ".3f"),
                            fmt(b["prefill_ms"], ".1f")] for n, b in breakdown], out)
    if profiles:
        print("\ntorch profiler, share of one generation's wall time:", file=out)
        cols = ["runner", "linear", "attention", "other ops", "python+framework", "top ops"]
        print_table(cols, [[n, fmt(p["shares"]["linear"], ".0%"), fmt(p["shares"]["attention"], ".0%"),
                            fmt(p["shares"]["other_ops"], ".0%"), fmt(p["shares"]["python_and_framework"], ".0%"),
                            ", ".join(f"{op} {share:.0%}" for op, share in p["top_ops"][:3])]
                           for n, p in profiles.items()], out)
    if memory:
        print("\npeak memory per runner, MiB (fresh process each; peak = tensors held + growth during the run):",
              file=out)
        cols = ["runner", "peak", "held", "run", "weights", "KV cache", "peak/(weights+KV)", "RSS after load"]

        def mib(b):
            return fmt(b / 2**20 if b is not None else None, ".1f")

        print_table(cols, [[n, mib(m["peak_bytes"]), mib(m["held_bytes"]), mib(m["run_bytes"]),
                            mib(m["weights_bytes"]), mib(m["kv_bytes"]), fmt(m["over_weights_and_kv"]),
                            mib(m["loaded_rss_bytes"])]
                           if "error" not in m else [n, "failed: " + m["error"], "", "", "", "", "", ""]
                           for n, m in memory.items()], out)


def print_table(cols: list[str], rows: list[list[str]], out) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=out)
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)), file=out)


def goals(summary: dict, memory: dict) -> dict:
    """Each goal of issue 7 checked against this run's numbers (None where the run lacks the runners)."""
    cells = summary["cells"]

    def ratio_goal(strategy: str, bound: float):
        values = [r["over_peer"] for r in cells.values() if r["strategy"] == strategy and r["over_peer"] is not None]
        return None if not values else all(v >= bound for v in values)

    lev = [v["measured_over_predicted"] for v in summary["leviathan"].values()
           if v["alpha"] is not None and v["alpha"] >= GOALS["leviathan_min_alpha"]
           and v["measured_over_predicted"] is not None]
    lev_v = [v["measured_over_predicted_with_verify_cost"] for v in summary["leviathan"].values()
             if v["alpha"] is not None and v["alpha"] >= GOALS["leviathan_min_alpha"]
             and v.get("measured_over_predicted_with_verify_cost") is not None]
    mem = [m["over_weights_and_kv"] for m in memory.values() if "over_weights_and_kv" in m
           and m["cell"].startswith("speculative")]
    return {
        "speculative_over_hf_assisted": ratio_goal("speculative", GOALS["speculative_over_hf_assisted"]),
        "ngram_over_hf_ngram": ratio_goal("ngram", GOALS["ngram_over_hf_ngram"]),
        "baseline_over_hf_generate": ratio_goal("baseline", GOALS["baseline_over_hf_generate"]),
        "leviathan_fraction": None if not lev else all(v >= GOALS["leviathan_fraction"] for v in lev),
        "leviathan_fraction_with_verify_cost": None if not lev_v else all(v >= GOALS["leviathan_fraction"]
                                                                          for v in lev_v),
        "speculative_memory": None if not mem else all(v <= GOALS["memory_over_weights_and_kv"] for v in mem),
    }


# --- entry points ---------------------------------------------------------------------------------------------

def fail(message: str) -> int:
    print(f"specdec bench: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.probe_memory:
        print(json.dumps(probe_memory(json.loads(args.probe_memory))))
        return 0
    import torch

    from specdec.decoding import linear_kernels
    from specdec.models import ModelError, encode_prompt, load_registry

    try:
        registry = load_registry(args.models)
        cells, s, prompts = check_args(args, registry)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError(f"device '{args.device}' requested but no CUDA GPU is visible; use --device cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
        started = time.perf_counter()
        loaded = load_models(args.target, cells, registry, args.device, args.stock_kernels, args.drafters_dir)
        any_pair = next(iter(loaded.pairs.values()))
        encoded = [encode_prompt(any_pair.target, p["prompt"]) for p in prompts]
        runs = run_interleaved(loaded, cells, encoded, s, args.repeats, args.warmup)
        summary = summarise(cells, runs, s)
        profiles = ({c.name: profile_cell(loaded, c, encoded[0], s) for c in cells if c.engine == "specdec"}
                    if args.profile else {})
        del loaded, runs
        gc.collect()
        longest = max(encoded, key=len)
        memory = measure_memory(cells, args, s, longest) if args.memory == "subprocess" else {}
    except (BenchError, ModelError, ValueError, OSError) as exc:
        return fail(" ".join(str(exc).split()))
    kernels = None if args.stock_kernels or args.device != "cpu" else linear_kernels()
    header = (f"specdec bench: target {args.target}, drafts {', '.join(args.draft or [args.target])}, k={s.k}, "
              f"temperature {s.temperature}, {len(prompts)} prompts x {args.repeats} repeats, "
              f"max {s.max_new_tokens} new tokens, {torch.get_num_threads()} threads, device {args.device}"
              + (", STOCK kernels for ours (ablation)" if args.stock_kernels
                 else f", our CPU linear kernels: {kernels}" if kernels else ""))
    print_tables(summary, memory, profiles, header)
    cells_out = summary["cells"]
    result = {
        "target": args.target, "drafts": args.draft or [args.target], "k": s.k, "temperature": s.temperature,
        "max_new_tokens": s.max_new_tokens, "prompts": [p["id"] for p in prompts], "repeats": args.repeats,
        "device": args.device, "threads": torch.get_num_threads(), "stock_kernels": args.stock_kernels,
        "linear_kernels": kernels,
        "tokens_per_s": {n: r["tokens_per_s"] for n, r in cells_out.items()},
        "ratios": summary["ratios"],
        "speedup": {n: r["speedup"] for n, r in cells_out.items()},
        "leviathan": summary["leviathan"],
        "acceptance_by_position": {n: r["acceptance_by_position"] for n, r in cells_out.items()
                                   if r["acceptance_by_position"] is not None},
        "identical_to_baseline": {n: r["identical_to_baseline"] for n, r in cells_out.items()},
        "step_breakdown_ms": {n: r["step_breakdown"] for n, r in cells_out.items() if r["step_breakdown"]},
        "memory": memory,
        "goals": goals(summary, memory),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
