"""Measuring for `specdec bench`: load one target and every runner's draft, decode the prompts interleaved, and
summarise each runner's records (metrics.pool); plus the per-runner memory probe and the torch profile.

A runner is a `Cell`: a strategy with a draft where it needs one, and a weight format (quant.py) for the torch
engines. Every runner gets its own copy of the weights, so none shares a prepared model with another (ours are
prepared by kernels.prepare_model; transformers' stay stock); llama.cpp runners each get their own Llama over the
GGUF file. Runs are interleaved: each repeat walks the prompts, and for each prompt every runner decodes it once, in
an order that rotates with the repeat, so load from other processes hits every runner alike.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from specdec.measure import metrics
from specdec.model.decoding import DecodeSettings
from specdec.run.devices import kv_cache_bytes
from specdec.methods.drafters import DrafterError, find_drafter, load_drafter, parse_alias
from specdec.model.kernels import prepare_model, quant_ops
from specdec.model.models import (LoadedModel, ModelError, encode_prompt, load_model, load_registry, resolve,
                                  shared_logit_rows)
from specdec.model.quant import apply_weights
from specdec.run.isolate import enable_crash_dump, run_child
from specdec.run.runner import Pair, decode, decode_batch, load_pair, record_of, warm_up
from specdec.strategies import STRATEGIES, plain_baseline


class BenchError(ValueError):
    """Bad bench arguments (one-line message naming the argument and how to fix it)."""


@dataclass(frozen=True)
class Cell:
    """One runner: a strategy, for strategies that need one a draft spec ("alias" or "alias:LAYERS"), for the
    torch engines a weight format (None: the alias's own), and its decode settings (its own k and tree budget;
    None: the bench's)."""
    strategy: str
    draft: str | None = None
    weights: str | None = None
    settings: DecodeSettings | None = field(default=None, compare=False)

    def settings_or(self, s: DecodeSettings) -> DecodeSettings:
        return self.settings if self.settings is not None else s

    @property
    def name(self) -> str:
        return (f"{self.strategy}@{self.draft}" if self.draft else self.strategy) + (
            f"[{self.weights}]" if self.weights else "")

    @property
    def engine(self) -> str:
        return STRATEGIES[self.strategy].engine

    @property
    def key(self) -> tuple:
        """What a runner's models are loaded for (`Loaded.pairs`)."""
        return self.engine, self.draft, self.weights


def peer_of(cell: Cell) -> Cell | None:
    """transformers' counterpart of one of our runners (same draft and weights), if it has one."""
    peer = STRATEGIES[cell.strategy].peer
    return Cell(peer, cell.draft, cell.weights) if peer else None


def llamacpp_peer_of(cell: Cell) -> Cell | None:
    """llama.cpp's counterpart of one of our runners (the same method on the GGUF, same draft), if it has one."""
    peer = next((name for name, st in STRATEGIES.items() if st.engine == "llamacpp" and st.peer == cell.strategy),
                None)
    return Cell(peer, cell.draft) if peer else None


def engine_baseline(cell: Cell) -> Cell:
    """Speedups are measured against the same engine's plain decoding, in the same weight format."""
    return Cell(plain_baseline(cell.engine), weights=cell.weights)


def parse_draft(spec: str) -> tuple[str, int | None]:
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
    """Bytes of the weights a model saves: parameters and saved buffers (quantised weights are buffers), each once."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def held_bytes(models) -> int:
    """Bytes of every tensor the models hold: parameters, buffers and pre-packed weights (each storage once)."""
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


def linear_layers(model) -> list:
    """The modules that multiply by a weight matrix (nn.Linear and our kernel layers; fused projections once)."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear or callable(getattr(m, "kernel", None))]


def pass_cost(model) -> tuple[int, int]:
    """(bytes of weights a pass reads: every linear layer's own tensors, not the input embedding's table, of
    which a pass reads a row per token; multiply-adds per row: the linear layers' in x out, attention left out)."""
    read, macs = 0, 0
    for m in linear_layers(model):
        tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        packed = getattr(m, "packed", None)
        tensors += [packed] if isinstance(packed, torch.Tensor) else []
        read += sum(t.numel() * t.element_size() for t in tensors)
        macs += m.in_features * m.out_features
    return read, macs


def proposal_rows(strategy: str, s: DecodeSettings) -> int:
    """The most rows one proposal of `strategy` adds to a verify pass: the tree budget (k where unset) for trees, k
    for chains, 0 for plain decoding."""
    st = STRATEGIES[strategy]
    if st.proposer is None:
        return 0
    return (s.tree_budget or s.k) if st.tree else s.k


def roofline(cells: list, loaded, summary: dict, s: DecodeSettings, context: float, machine) -> dict:
    """Our runners' ms per target pass against the pass's roofline bound on `machine` (measure.machine): weights
    read + KV cache read at `context` tokens over the bandwidth, and 2 x multiply-adds x rows verified over the
    peak (int8's where the linear layers run our VNNI kernels, else float32's; rows: 1 for plain decoding, else
    the most a pass verifies, k + 1 or tree_budget + 1, so the compute bound is an upper one)."""
    from specdec.measure.machine import roofline_ms

    out = {}
    for cell in cells:
        breakdown = summary["cells"][cell.name]["step_breakdown"]
        pair = loaded.pairs.get(cell.key)
        if cell.engine != "specdec" or not breakdown or pair is None:
            continue
        model = pair.target.model
        read, macs = pass_cost(model)
        rows = proposal_rows(cell.strategy, cell.settings_or(s)) + 1  # the proposal's rows and the root
        integer = any(getattr(m, "kernels", None) == "vnni" for m in linear_layers(model))
        bound = roofline_ms(machine, read + kv_bytes_per_token(model) * context, 2 * macs * rows, integer)
        out[cell.name] = {"pass_ms": breakdown["step_ms"], "rows": rows, "weight_bytes": read, **bound,
                          "over_bound": breakdown["step_ms"] / bound["bound_ms"]}
    return out


def kv_bytes_per_token(model) -> int:
    """layers × 2 (K and V) × kv_heads × head_dim × bytes per element, at the model's own dtype."""
    return kv_cache_bytes(model.config, 1, next(model.parameters()).element_size())


@dataclass
class Loaded:
    """runner.Pair per Cell.key: (engine, draft spec or None, weight format or None)."""
    pairs: dict
    weights_bytes: dict   # Cell.key -> target + draft weight bytes, counted before preparing
    kv_per_token: dict    # Cell.key -> KV bytes per token, target + draft


def load_models(target_alias: str, cells: list[Cell], registry, device: str, stock_kernels: bool,
                drafters_dir=None, threads: int | None = None) -> Loaded:
    """One stock target load; every engine, weight format and draft gets its own copy, so no runner shares
    weights with another (a self-draft is a second copy of the target, as a separately loaded draft would be). A
    trained drafter reads its engine's target (features, embedding, LM head), as it does in a workflow cell.
    llama.cpp runners load the GGUF files themselves (`threads` threads, default torch's)."""
    def copy_of(loaded: LoadedModel, model=None, weights: str | None = None) -> LoadedModel:
        return replace(loaded, model=apply_weights(copy.deepcopy(model if model is not None else loaded.model),
                                                   weights, quant_ops(weights)))

    def ready(loaded: LoadedModel, engine: str) -> LoadedModel:
        if engine == "specdec":
            if stock_kernels:
                loaded.model._specdec_prepared = True  # ablation: our loops skip preparing
            prepare_model(loaded.model)
        return loaded

    pairs, weights, kv = {}, {}, {}
    try:
        for cell in cells:
            if cell.engine == "llamacpp" and cell.key not in pairs:
                pairs[cell.key] = load_pair(target_alias, parse_draft(cell.draft)[0] if cell.draft else None,
                                            registry, engine="llamacpp", threads=threads)
        groups = sorted({(c.engine, c.weights) for c in cells if c.engine != "llamacpp"}, key=str)
        target = load_model(resolve(target_alias, registry), device=device) if groups else None
        base_drafts: dict[str, LoadedModel] = {}
        for engine, fmt in groups:
            drafts = sorted({c.draft for c in cells if (c.engine, c.weights) == (engine, fmt)}, key=lambda d: d or "")
            # the last group takes the loaded target itself; drafts are copied from it before it is converted
            last = (engine, fmt) == groups[-1]
            engine_target = replace(target, model=apply_weights(target.model, fmt, quant_ops(fmt))) if last else \
                copy_of(target, weights=fmt)
            for spec in drafts:
                key = (engine, spec, fmt)
                if spec is None:
                    weights[key] = parameter_bytes(engine_target.model)
                    kv[key] = kv_bytes_per_token(engine_target.model)
                    pairs[key] = Pair(engine_target)
                    continue
                if parse_alias(spec):
                    drafter = load_drafter(find_drafter(spec, drafters_dir, latest=True), engine_target.model)
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
                draft = copy_of(base, truncate_layers(base.model, layers) if layers else None, fmt)
                vocab = shared_logit_rows(engine_target, draft)
                weights[key] = parameter_bytes(engine_target.model) + parameter_bytes(draft.model)
                kv[key] = kv_bytes_per_token(engine_target.model) + kv_bytes_per_token(draft.model)
                pairs[key] = Pair(engine_target, ready(draft, engine), vocab)
            ready(engine_target, engine)
    except ModelError as exc:
        raise BenchError(str(exc)) from None
    return Loaded(pairs, weights, kv)


# --- running --------------------------------------------------------------------------------------------------

def run_once(loaded: Loaded, cell: Cell, prompt_ids: list[int], s):
    """One generation → (record, trace), timed by the strategy's own loop. Copy and repeat shares are taken
    against the whole encoded prompt (chat template included), as the default degenerate rule judges them."""
    pair, s = loaded.pairs[cell.key], cell.settings_or(s)
    trace = decode(pair, cell.strategy, prompt_ids, s)
    record = record_of(trace, cell.strategy, s, len(prompt_ids), None)
    record.update(metrics.degeneracy(record["token_ids"], [prompt_ids]))
    return record, trace


def without_gc(fn, *args):
    """fn(*args) with Python's cyclic garbage collector collected before and paused during it (as timeit does): a
    collection that fires inside a timed generation walks every live object of the process — other runners'
    tries and tables included — and charges that to whichever runner happened to allocate last. Measured: with
    `suffix-recycling` in the same bench, `dynamic-tree`'s speedup read 1.39-1.41x with the collector on during
    generations, against 1.48-1.55x beside other runners, and 1.50x with the pause. Reference counting still frees everything acyclic."""
    gc.collect()
    gc.disable()
    try:
        return fn(*args)
    finally:
        gc.enable()


def run_interleaved(loaded: Loaded, cells: list[Cell], encoded: list[list[int]], s, repeats: int, warmup: int,
                    log=print) -> dict:
    """Every cell on every prompt, `repeats` times; within a repeat the cells take turns on each prompt."""
    for cell in cells:
        warm_up(loaded.pairs[cell.key], cell.strategy, encoded[0], cell.settings_or(s), warmup)
    runs = {c.name: [] for c in cells}
    for repeat in range(repeats):
        order = cells[repeat % len(cells):] + cells[:repeat % len(cells)]
        started = time.perf_counter()
        for p_index, ids in enumerate(encoded):
            for cell in order:
                record, trace = without_gc(run_once, loaded, cell, ids, s)
                runs[cell.name].append({"prompt": p_index, "repeat": repeat, "record": record, "trace": trace})
        log(f"[bench] repeat {repeat + 1}/{repeats} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise_cell(cell: Cell, runs: list[dict]) -> dict:
    by_prompt: dict[int, list[dict]] = {}
    for run in runs:
        by_prompt.setdefault(run["prompt"], []).append(run["record"])
    # tokens/s = Σ over prompts of the median tokens ÷ Σ of the median wall times (medians over repeats)
    tokens = sum(median([r["new_tokens"] for r in recs]) for recs in by_prompt.values())
    wall = sum(median([r["wall_s"] for r in recs]) for recs in by_prompt.values())
    records = [run["record"] for run in runs]
    pooled = metrics.pool(records)
    return {
        "cell": cell.name, "strategy": cell.strategy, "draft": cell.draft, "engine": cell.engine,
        "runs": len(runs), "new_tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "acceptance_rate": pooled["acceptance_rate"],
        # accepted ÷ proposed at draft position 1, 2, … (trees: depth); None where a runner reports totals only
        "acceptance_by_position": pooled["acceptance_by_position"],
        "mean_accepted_tokens": pooled["mean_accepted_tokens"],
        "cost_ratio_c": pooled["cost_ratio_c"],
        "leviathan_prediction": pooled["leviathan_speedup"],
        "degenerate_share": sum(r["degenerate"] for r in records) / len(records),
        "cuda_event_gap": event_gap([run["trace"] for run in runs]),
    }


def event_gap(traces) -> float | None:
    """Largest |CUDA-event time - synchronised wall time| / wall time over a runner's generations (decoding.Clock):
    near 0 where every timed span waited for its kernels; None off CUDA (llama.cpp's runners time themselves)."""
    gaps = [abs(t.event_s - t.wall_s) / t.wall_s for t in traces if t.event_s is not None and t.wall_s > 0]
    return max(gaps) if gaps else None


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
    """Share of (prompt, repeat) generations whose tokens equal the reference's (meaningful for greedy only)."""
    ref = {(r["prompt"], r["repeat"]): r["record"]["token_hash"] for r in reference}
    pairs = [(r["record"]["token_hash"], ref.get((r["prompt"], r["repeat"]))) for r in runs]
    pairs = [(a, b) for a, b in pairs if b is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def prefix_agreement(runs: list[dict], reference: list[dict]) -> float | None:
    """Mean share of each output's tokens before its first difference from the reference output of the same
    (prompt, repeat), over the longer of the two: 1.0 when identical, near 0 when they part at once."""
    ref = {(r["prompt"], r["repeat"]): r["record"]["token_ids"] for r in reference}
    shares = []
    for run in runs:
        other = ref.get((run["prompt"], run["repeat"]))
        if other is None:
            continue
        mine = run["record"]["token_ids"]
        same = next((i for i, (a, b) in enumerate(zip(mine, other)) if a != b), min(len(mine), len(other)))
        shares.append(same / max(len(mine), len(other), 1))
    return sum(shares) / len(shares) if shares else None


def reference_baseline(runs: dict) -> str | None:
    """The runner other engines and weight formats are compared with: our plain decoding in the aliases' own
    format if it ran, else our first plain decoding runner."""
    return "baseline" if "baseline" in runs else next((n for n in runs if n.startswith("baseline[")), None)


def by_category(cells: list[Cell], runs: dict, categories: list[str]) -> dict:
    """Per cell and prompt category (Spec-Bench's columns): tokens/s, speedup over the engine's baseline and mean
    accepted tokens, on that category's prompts only. categories[i] is prompt i's."""
    out = {}
    for cell in cells:
        rows = {}
        for category in dict.fromkeys(categories):
            def subset(name):
                return [r for r in runs.get(name, []) if categories[r["prompt"]] == category]
            row = summarise_cell(cell, subset(cell.name))
            base = summarise_cell(engine_baseline(cell), subset(engine_baseline(cell).name)) \
                if engine_baseline(cell).name in runs else None
            rows[category] = {"tokens_per_s": row["tokens_per_s"], "mean_accepted_tokens": row["mean_accepted_tokens"],
                              "speedup": row["tokens_per_s"] / base["tokens_per_s"]
                              if base and base["tokens_per_s"] and row["tokens_per_s"] else None}
        out[cell.name] = rows
    return out


def summarise(cells: list[Cell], runs: dict, s) -> dict:
    summary = {c.name: summarise_cell(c, runs[c.name]) for c in cells}
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
            leviathan[cell.name] = {"alpha": row["acceptance_rate"], "c": row["cost_ratio_c"],
                                    "k": cell.settings_or(s).k,
                                    "predicted": predicted, "measured": row["speedup"],
                                    "measured_over_predicted": row["measured_over_predicted"],
                                    "verify_over_step": v,
                                    "measured_over_predicted_with_verify_cost":
                                        row["measured_over_predicted_with_verify_cost"]}
        # greedy only: the same engine's plain decoding (same weights), and our reference plain decoding
        own, ours = engine_baseline(cell).name, reference_baseline(runs)
        row["identical_to_baseline"] = (identical_fraction(runs[cell.name], runs[own])
                                        if s.greedy and own in runs else None)
        row["identical_to_ours"] = (identical_fraction(runs[cell.name], runs[ours])
                                    if s.greedy and ours else None)
        row["prefix_agreement_with_ours"] = (prefix_agreement(runs[cell.name], runs[ours])
                                             if s.greedy and ours else None)
        mirror = llamacpp_peer_of(cell) if cell.engine == "specdec" else None
        if mirror is not None and mirror.name in summary:
            ours_tps, theirs = row["tokens_per_s"], summary[mirror.name]["tokens_per_s"]
            row["over_llamacpp"] = ours_tps / theirs if ours_tps and theirs else None
            ratios[f"{cell.name}/{mirror.name}"] = row["over_llamacpp"]
        else:
            row["over_llamacpp"] = None
        row["step_breakdown"] = step_breakdown(runs[cell.name]) if cell.engine == "specdec" else None
    return {"cells": summary, "ratios": ratios, "leviathan": leviathan}


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


# --- crash preflight ------------------------------------------------------------------------------------------

def preflight(cells: list[Cell], args, s, prompt: str, log=print) -> dict[str, str]:
    """llama.cpp runners (native code whose kernels llama.cpp picks per machine: the AMX crash) first load and
    decode one short warm-up generation in a child process, all in one child, before anything loads here. Returns
    runner name -> one-line reason for those whose child died of a signal: they are left out of the run and
    reported as crashed; after a crash a new child checks the runners not yet done. Our runners are not checked
    (the memory probe runs each in a child, but after the timed runs)."""
    todo = [c for c in cells if c.engine == "llamacpp"]
    crashed: dict[str, str] = {}
    while todo:
        done_file = Path(tempfile.mkstemp(prefix="specdec-preflight-", suffix=".txt")[1])
        spec = {"cells": [[c.strategy, c.draft, vars(c.settings_or(s))] for c in todo], "target": args.target,
                "models": args.models, "threads": args.threads, "prompt": prompt, "done": str(done_file)}
        try:
            returncode, crash = run_child([sys.executable, "-m", "specdec.run.bench", "--preflight",
                                           json.dumps(spec)])
            done = set(done_file.read_text().split())
        finally:
            done_file.unlink()
        if crash is None:  # all done, or an ordinary error, which the run here reports the usual way
            break
        bad = next(c for c in todo if c.name not in done)
        crashed[bad.name] = (f"crashed: died of {crash['signal']} in engine {bad.engine}"
                             + (f", at {crash['frame']}" if crash["frame"] else ""))
        log(f"[bench] {bad.name} {crashed[bad.name]}; left out of the run", file=sys.stderr)
        todo = [c for c in todo if c.name not in done and c != bad]
    return crashed


def preflight_child(spec: dict) -> None:
    """Inside preflight's child: each runner in turn, its name appended to spec['done'] once it decoded."""
    enable_crash_dump()
    registry = load_registry(spec["models"])
    for strategy, draft, settings in spec["cells"]:
        cell, s = Cell(strategy, draft), DecodeSettings.from_mapping(settings)
        pair = load_models(spec["target"], [cell], registry, "cpu", False, threads=spec["threads"]).pairs[cell.key]
        warm_up(pair, strategy, encode_prompt(pair.target, spec["prompt"]), s, 1)
        with open(spec["done"], "a") as done:
            done.write(cell.name + "\n")


# --- memory ---------------------------------------------------------------------------------------------------

def proc_status_number(field: str) -> int | None:
    """A number from /proc/self/status: kB for the memory fields (VmRSS, VmHWM), a count for Threads."""
    try:
        match = re.search(rf"^{field}:\s+(\d+)(?: kB)?$", Path("/proc/self/status").read_text(), re.M)
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


def rss_resolution_bytes() -> int:
    """How far apart two readings of the kernel's RSS counters can be with nothing changed. Linux 6.2+ keeps a
    process's RSS in per-CPU counters: the peak (hiwater, reset and raised from the approximate read) can lag the
    exact sum by up to one batch of pages per CPU, the batch being max(32, 2 x CPUs); older kernels cache up to
    64 pages per thread. A growth smaller than this is below what the counters can tell apart."""
    cpus = os.cpu_count() or 1
    threads = proc_status_number("Threads") or 1
    return max(max(32, 2 * cpus) * cpus, 64 * threads) * os.sysconf("SC_PAGE_SIZE")


def run_growth(before: int, peak: int, resolution: int) -> int:
    """The peak's growth over the reading before the run. The peak counter is an approximate read and the RSS
    before the run an exact one (see rss_resolution_bytes): a run that grows memory by less than their
    resolution can read a few pages negative (-52 KiB once in CI with a tiny model) and counts as 0; anything
    further below is an error, not noise."""
    if peak - before >= 0:
        return peak - before
    if before - peak > resolution:
        raise BenchError(f"the peak memory during the run read {(before - peak) / 2**20:.2f} MiB below the "
                         f"memory before it, more than the counters' resolution ({resolution / 2**20:.2f} MiB); "
                         "run with --memory off and report this")
    return 0


def probe_memory(spec: dict) -> dict:
    """Runs inside a fresh process: load only what one runner needs, decode the longest prompt once, and report
    its peak memory as the bytes of every tensor the models hold (weights as stored: pre-packed for ours) plus
    the peak growth during the measured generation (KV caches, activations, logits, allocator slack). CPU: RSS
    from /proc/self/status, the peak (VmHWM) reset right before the generation; CUDA: the allocator's counters.
    The RSS growth of loading (weights still mapped from the file, tokenizer, library code) is reported beside
    it as loaded_rss_bytes, not charged to the run."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cuda = device.startswith("cuda")
    registry = load_registry(spec["models"])
    cell = Cell(spec["strategy"], spec["draft"], spec.get("weights"))
    s = DecodeSettings.from_mapping(spec["settings"])
    def resident() -> int:
        return torch.cuda.memory_allocated(device) if cuda else proc_status_number("VmRSS") * 1024

    gc.collect()
    start = resident()
    loaded = load_models(spec["target"], [cell], registry, device, spec["stock_kernels"], spec.get("drafters_dir"))
    gc.collect()
    after_load = resident()
    key = cell.key
    # One short untimed generation first, as in the timed runs: the libraries' one-time lazy set-up (kernel code
    # pages, thread pools, oneDNN primitives) is reported as warmup_bytes, not charged to the run.
    warm_up(loaded.pairs[key], cell.strategy, spec["prompt_ids"], s, 1)
    if spec.get("batch_prompt_ids"):
        decode_batch(loaded.pairs[key], cell.strategy, spec["batch_prompt_ids"], s, spec["batch_size"])
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    elif not reset_peak_rss():
        raise BenchError("cannot reset the peak RSS (/proc/self/clear_refs); run with --memory off")
    # read after the reset: the reset sets the peak to the RSS of that moment (approximately: run_growth)
    before_run = resident()
    rows = proposal_rows(cell.strategy, s)
    batch = spec.get("batch_prompt_ids")
    if batch:  # batched: the queue with batch_size slots, after one untimed pass over it (its shapes' set-up)
        b = spec["batch_size"]
        traces = decode_batch(loaded.pairs[key], cell.strategy, batch, s, b)
        peak_run = torch.cuda.max_memory_allocated(device) if cuda else proc_status_number("VmHWM") * 1024
        # the KV of the B longest sequences in flight at their longest (prompt + answer + one proposal's rows)
        seq = sum(sorted((len(p) + len(t.tokens) + rows for p, t in zip(batch, traces)), reverse=True)[:b])
    else:
        record, _ = run_once(loaded, cell, spec["prompt_ids"], s)
        peak_run = torch.cuda.max_memory_allocated(device) if cuda else proc_status_number("VmHWM") * 1024
        seq = len(spec["prompt_ids"]) + record["new_tokens"] + rows
    weights, kv = loaded.weights_bytes[key], loaded.kv_per_token[key] * seq
    pair = loaded.pairs[key]
    held = held_bytes([pair.target.model] + ([pair.draft.model] if pair.draft else [])
                      + ([pair.drafter.module] if pair.drafter else []))
    resolution = 0 if cuda else rss_resolution_bytes()
    run = run_growth(before_run, peak_run, resolution)
    peak = held + run
    return {"cell": cell.name, "peak_bytes": peak, "held_bytes": held, "run_bytes": run,
            "rss_resolution_bytes": resolution,
            "loaded_rss_bytes": after_load - start, "warmup_bytes": before_run - after_load,
            "weights_bytes": weights, "kv_bytes": kv, "sequence_tokens": seq,
            "over_weights_and_kv": peak / (weights + kv),
            "method": "held tensor bytes + (peak during run - before run), "
                      + ("CUDA allocator counters" if cuda else "RSS from /proc/self/status")}


def run_memory_probe(spec: dict) -> dict:
    """probe_memory(spec) in a fresh process (a process's peak RSS only grows: one probe per process) -> its answer,
    or {"error": the child's last stderr line}."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors leave RSS at once (no arena reuse)
    out = subprocess.run([sys.executable, "-m", "specdec.run.bench", "--probe-memory", json.dumps(spec)],
                         capture_output=True, text=True, env=env, timeout=1800)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def measure_memory(cells: list[Cell], args, s, prompt_ids: list[int], log=print) -> dict:
    results = {}
    for cell in cells:
        if cell.engine == "llamacpp":  # its weights are a mapped file and its KV and logits buffers are
            continue                   # allocated at load for the whole context: no tensors to count
        spec = {"strategy": cell.strategy, "draft": cell.draft, "weights": cell.weights, "target": args.target,
                "models": args.models,
                "device": args.device, "threads": args.threads, "stock_kernels": args.stock_kernels,
                "drafters_dir": args.drafters_dir, "prompt_ids": prompt_ids, "settings": vars(cell.settings_or(s))}
        probe = run_memory_probe(spec)
        if "error" in probe:
            log(f"[bench] memory probe for {cell.name} failed: {probe['error']}", file=sys.stderr)
            results[cell.name] = {"cell": cell.name, "error": probe["error"]}
            continue
        results[cell.name] = probe
        log(f"[bench] memory of {cell.name}: {probe['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    return results



