"""`specdec bench`: our decoding engine against transformers' and llama.cpp's, side by side in one process.

Every runner (a strategy, with a draft where it needs one, in a weight format for the torch engines) decodes the
same prompts with the same pair, k and sampling settings, interleaved (measure.py). Numbers are medians over
repeats; speedups are against the same engine's plain decoding in the same weight format, measured in the same
run; each of our runners is also compared with its peer in the other engines (strategies.Strategy.peer).

Output: one table per concern (speed, where the time goes, memory) and, as the last line, one JSON object.
Peak memory is measured per runner in a fresh subprocess (measure.probe_memory), because a process's peak RSS
only ever grows.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from specdec import fail
from specdec.model.decoding import DecodeSettings
from specdec.methods.drafters import DrafterError, find_drafter, parse_alias
from specdec.measure.machine import machine_limits
from specdec.model.kernels import (attention_kernel, exact_rows_requested, linear_kernels, panel_kernel_problem,
                                   quant_kernels)
from specdec.model.llama_forward import forward_choice
from specdec.run.bench_measure import (BenchError, Cell, by_category, load_models, measure_memory, parse_draft,
                                       preflight, preflight_child, probe_memory, profile_cell, proposal_rows,
                                       roofline, run_interleaved, summarise)
from specdec.model.models import WEIGHT_FORMATS, ModelError, encode_prompt, load_registry, resolve
from specdec.prompts import PromptFileError, load_prompts, select
from specdec.run.job import cpu_name
from specdec.run.runner import SettingsError, check_settings, extra_buffers_in_use, weight_format
from specdec.strategies import NAMES, STRATEGIES, add_proposer_args, draft_length

DEFAULT_RUNNERS = ("baseline", "speculative", "ngram", "hf-generate", "hf-assisted", "hf-ngram")
GOALS = {"speculative_over_hf_assisted": 1.25, "ngram_over_hf_ngram": 1.10, "baseline_over_hf_generate": 1.0,
         "leviathan_fraction": 0.90, "leviathan_min_alpha": 0.5, "memory_over_weights_and_kv": 1.2}


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
                   help="where trained drafters live (default: $SPECDEC_DRAFTERS_DIR or results/drafters; "
                        "TARGET+KIND is the most recently trained one there), or one drafter's own folder")
    p.add_argument("--runners", default=",".join(DEFAULT_RUNNERS),
                   help="comma-separated strategies (`specdec generate --help` lists them), or 'all' "
                        "(default: %(default)s)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompt JSONL, specdec's form or a Spec-Bench/MT-Bench question.jsonl; the bench decodes each "
                   "prompt's first turn (default: prompts/suite.jsonl)")
    p.add_argument("--categories", default=None, help="comma-separated prompt categories (default: all)")
    p.add_argument("--per-category", type=int, default=1, help="prompts per category (default: 1)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated prompt ids (instead of categories)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=None, help="draft length of every runner; trees: the deepest position "
                   "(default: each runner's own, strategies.py: 8 for ngram, suffix, recycling, dynamic-tree, 4 for "
                   "draft models)")
    p.add_argument("--tree-budget", type=int, default=None,
                   help="tree strategies: nodes per verify pass (default: k)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--draft-sampling", default="greedy", choices=["greedy", "sample"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ngram-max", type=int, default=3)
    add_proposer_args(p)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    p.add_argument("--repeats", type=int, default=3, help="measured passes over all prompts (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed short generations per runner (default: 1)")
    p.add_argument("--memory", default="subprocess", choices=["subprocess", "off"],
                   help="measure each runner's peak memory in a fresh process (default) or skip it")
    p.add_argument("--profile", action="store_true",
                   help="also run one generation per runner of ours under the torch profiler and print op shares")
    p.add_argument("--stock-kernels", action="store_true",
                   help="ablation: run our loops on stock transformers layers (no prepare_model)")
    p.add_argument("--weights", default=None, metavar="LIST",
                   help="comma-separated weight formats for ours and transformers' runners, one runner each: "
                        f"{', '.join(WEIGHT_FORMATS)} (default: the alias's own); llama.cpp runs the GGUF's own")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of every engine: torch's intra-op threads and llama.cpp's (default: torch's "
                        "choice)")
    p.add_argument("--device", default="cpu", help="cpu | cuda:N (default: cpu)")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)  # internal: one runner, one process
    p.add_argument("--preflight", default=None, help=argparse.SUPPRESS)  # internal: llama.cpp runners, one child
    return p


def split_list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def default_prompts_file() -> Path:
    here = Path("prompts/suite.jsonl")
    if here.is_file():
        return here
    return Path(__file__).resolve().parent.parent / "prompts" / "suite.jsonl"


def check_args(args, registry) -> tuple[list[Cell], object, list[dict]]:
    """Every check that needs no model: runners, drafts, settings, prompts. Returns (cells, settings, prompts)."""
    if args.repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")
    strategies = list(NAMES) if args.runners.strip() == "all" else split_list(args.runners)
    if not strategies:
        raise BenchError("--runners is empty; give e.g. --runners baseline,hf-generate")
    unknown = [x for x in strategies if x not in STRATEGIES]
    if unknown:
        raise BenchError(f"unknown runner(s) {unknown}; choose from: {', '.join(NAMES)} (or 'all')")
    drafts = args.draft or [args.target]
    for spec in drafts:
        parse_draft(spec)
    formats = split_list(args.weights) or [None]
    bad = [f for f in formats if f is not None and f not in WEIGHT_FORMATS]
    if bad:
        raise BenchError(f"--weights: unknown format(s) {bad}; choose from {', '.join(WEIGHT_FORMATS)}")
    s = DecodeSettings.from_mapping(args)
    try:
        resolve(args.target, registry)
        for spec in drafts:
            if parse_alias(spec):
                folder = find_drafter(spec, args.drafters_dir, latest=True)  # else: the command that trains it
                print(f"specdec bench: drafter '{spec}': {folder}", file=sys.stderr)
            else:
                resolve(parse_draft(spec)[0], registry)
    except (ModelError, DrafterError) as exc:
        raise BenchError(str(exc)) from None
    cells = []
    for strategy in dict.fromkeys(strategies):
        st = STRATEGIES[strategy]
        llama = st.engine == "llamacpp"
        for draft in (drafts if st.needs_draft else [None]):
            if draft and parse_alias(draft) and not st.takes_trained_drafter:
                continue  # e.g. transformers' hf-assisted cannot drive a drafter specdec trained
            if llama and draft and parse_draft(draft)[1]:
                continue  # llama.cpp drafts are whole GGUF files, not layer cuts
            for fmt in ([None] if llama else formats):  # llama.cpp: the GGUF's own quantisation
                # the runner's k: the given one, else its strategy's default (--tree-budget is for the tree
                # runners; the others ignore it)
                settings = replace(s, k=draft_length(strategy, args.k),
                                   tree_budget=args.tree_budget if st.tree else None)
                try:
                    check_settings(strategy, parse_draft(draft)[0] if draft else None, settings, registry,
                                   args.target, weights=fmt)
                except SettingsError as exc:
                    raise BenchError(str(exc)) from None
                cells.append(Cell(strategy, draft, fmt, settings))
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


# --- output ---------------------------------------------------------------------------------------------------

def fmt(value, spec: str = ".2f", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def print_tables(summary: dict, memory: dict, profiles: dict, header: str, crashed: dict | None = None,
                 out=None) -> None:
    out = out or sys.stdout
    cells = summary["cells"]
    print(header, file=out)
    cols = ["runner", "engine", "tok/s", "x peer", "x llama.cpp", "speedup", "alpha", "tok/step", "c", "Leviathan",
            "meas/pred", "verify/step", "meas/pred*v", "same tokens", "= ours", "prefix = ours", "degenerate"]
    rows = []
    for name, r in cells.items():
        rows.append([name, r["engine"], fmt(r["tokens_per_s"], ".1f"), fmt(r["over_peer"]), fmt(r["over_llamacpp"]),
                     fmt(r["speedup"]), fmt(r["acceptance_rate"]), fmt(r["mean_accepted_tokens"]),
                     fmt(r["cost_ratio_c"], ".3f"), fmt(r["leviathan_prediction"]), fmt(r["measured_over_predicted"]),
                     fmt(r["verify_over_step"]), fmt(r["measured_over_predicted_with_verify_cost"]),
                     fmt(r["identical_to_baseline"], ".0%"), fmt(r["identical_to_ours"], ".0%"),
                     fmt(r["prefix_agreement_with_ours"], ".0%"), fmt(r["degenerate_share"], ".0%")])
    for name, why in (crashed or {}).items():
        rows.append([name, STRATEGIES[name.split("@")[0]].engine, "CRASHED"] + [""] * (len(cols) - 3))
    print_table(cols, rows, out)
    for name, why in (crashed or {}).items():
        print(f"CRASHED {name}: {why} (left out of the run)", file=out)
    print("(x peer: ours / transformers; x llama.cpp: ours / the same method in llama.cpp; speedup: over the same "
          "engine's plain decoding in the same weights; same tokens: greedy outputs equal to that plain decoding's; "
          "= ours, prefix = ours: equal to / shared prefix with our plain decoding's)", file=out)
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


def print_roofline(machine, bounds: dict, out=None) -> None:
    """Each of our runners' ms per target pass against its roofline bound (bench_measure.roofline)."""
    if not machine:
        return
    out = out or sys.stdout
    int8 = f"{machine.int8_gop_s:.0f} int8 GOP/s (VNNI)" if machine.int8_gop_s else "no VNNI"
    print(f"\nroofline: {machine.cpu}, {machine.threads} threads: read {machine.bandwidth_gb_s:.1f} GB/s, "
          f"{machine.float32_gflop_s:.0f} float32 GFLOP/s, {int8} (measure.machine's probe, cached per host)",
          file=out)
    if bounds:
        cols = ["runner", "ms/pass", "rows <=", "weights MB", "memory ms", "compute ms", "pass/bound"]
        print_table(cols, [[n, fmt(b["pass_ms"]), str(b["rows"]), fmt(b["weight_bytes"] / 1e6, ".1f"),
                            fmt(b["memory_ms"]), fmt(b["compute_ms"]), fmt(b["over_bound"])]
                           for n, b in bounds.items()], out)


def print_categories(categories: dict, out=None) -> None:
    """Spec-Bench's table: speedup over the engine's baseline per prompt category, and mean accepted tokens."""
    names = list(next(iter(categories.values()), {}))
    if len(names) < 2:
        return
    print("\nspeedup per category (mean accepted tokens):", file=out)
    rows = [[cell] + [f"{fmt(c['speedup'])} ({fmt(c['mean_accepted_tokens'])})" for c in per.values()]
            for cell, per in categories.items()]
    print_table(["runner"] + names, rows, out)


def print_event_gaps(summary: dict, out=None) -> None:
    """On CUDA: how far each runner's CUDA-event time strays from its synchronised wall time (largest per run)."""
    gaps = {n: r["cuda_event_gap"] for n, r in summary["cells"].items() if r["cuda_event_gap"] is not None}
    if gaps:
        print("\nCUDA events vs synchronised wall time, largest gap per run: "
              + ", ".join(f"{n} {g:.2%}" for n, g in gaps.items()), file=out)


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.probe_memory:
        print(json.dumps(probe_memory(json.loads(args.probe_memory))))
        return 0
    if args.preflight:
        preflight_child(json.loads(args.preflight))
        return 0
    try:
        registry = load_registry(args.models)
        cells, s, prompts = check_args(args, registry)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError(f"device '{args.device}' requested but no CUDA GPU is visible; use --device cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
        started = time.perf_counter()
        crashed = preflight(cells, args, s, prompts[0]["prompt"])
        cells = [c for c in cells if c.name not in crashed]
        if not cells:
            raise BenchError("every runner crashed: " + "; ".join(f"{n} {why}" for n, why in crashed.items()))
        loaded = load_models(args.target, cells, registry, args.device, args.stock_kernels, args.drafters_dir,
                             args.threads)
        formats = {c.name: weight_format(loaded.pairs[c.key]) for c in cells}  # as run: int8, gguf-Q4_1, ...
        extra_buffers = sorted({extra_buffers_in_use(loaded.pairs[c.key]) for c in cells if c.engine == "llamacpp"})
        any_pair = next(iter(loaded.pairs.values()))
        encoded = [encode_prompt(any_pair.target, p["prompt"]) for p in prompts]
        runs = run_interleaved(loaded, cells, encoded, s, args.repeats, args.warmup)
        summary = summarise(cells, runs, s)
        categories = by_category(cells, runs, [p["category"] for p in prompts])
        profiles = ({c.name: profile_cell(loaded, c, encoded[0], s) for c in cells if c.engine == "specdec"}
                    if args.profile else {})
        # the machine's limits (probed once per host and thread count, cached) and each pass against its bound
        machine = machine_limits(cpu_name()) if args.device == "cpu" and panel_kernel_problem() is None else None
        context = sum(map(len, encoded)) / len(encoded) + s.max_new_tokens / 2  # mean tokens in the KV cache
        bounds = roofline(cells, loaded, summary, s, context, machine) if machine else {}
        del loaded, runs
        gc.collect()
        longest = max(encoded, key=len)
        memory = measure_memory(cells, args, s, longest) if args.memory == "subprocess" else {}
    except (BenchError, ModelError, ValueError, OSError) as exc:
        return fail(exc, "specdec bench")
    kernels = None if args.stock_kernels or args.device != "cpu" else linear_kernels()
    attention = attention_kernel() if kernels else None  # float32 models on the CPU (kernels.prepare_model)
    int_kernels = quant_kernels() if args.device == "cpu" else None  # int8/int4 layers (models.load_model)
    own = None if args.stock_kernels or args.device != "cpu" else forward_choice()  # where a Llama target applies
    exact = exact_rows_requested()
    ks = {c.name: c.settings.k for c in cells if STRATEGIES[c.strategy].uses_k}
    budgets = {c.name: proposal_rows(c.strategy, c.settings) for c in cells if STRATEGIES[c.strategy].tree}
    k_text = (f"k={args.k}" if args.k is not None else "k per runner (" + ", ".join(
        f"{n} {k}" + (f"/{budgets[n]}" if n in budgets else "") for n, k in ks.items()) + ")")
    header = (f"specdec bench: target {args.target}, drafts {', '.join(args.draft or [args.target])}, {k_text}, "
              f"temperature {s.temperature}, {len(prompts)} prompts x {args.repeats} repeats, "
              f"max {s.max_new_tokens} new tokens, {torch.get_num_threads()} threads, device {args.device}"
              + (", STOCK kernels for ours (ablation)" if args.stock_kernels
                 else f", our CPU linear kernels: {kernels}, attention: {attention}, forward: {own}, "
                      f"int8/int4: {int_kernels}" if kernels
                 else "")
              + (", EXACT attention rows (SPECDEC_EXACT_ATTENTION=1: a diagnostic, slower)" if exact else "")
              + (f", llama.cpp extra buffers: {', '.join(extra_buffers)}" if extra_buffers else ""))
    print_tables(summary, memory, profiles, header, crashed)
    print_roofline(machine, bounds)
    print_categories(categories)
    print_event_gaps(summary)
    cells_out = summary["cells"]
    result = {
        "target": args.target, "drafts": args.draft or [args.target], "k": args.k, "k_per_runner": ks,
        "tree_budget_per_runner": budgets, "temperature": s.temperature,
        "max_new_tokens": s.max_new_tokens, "prompts": [p["id"] for p in prompts], "repeats": args.repeats,
        "device": args.device, "threads": torch.get_num_threads(), "stock_kernels": args.stock_kernels,
        "linear_kernels": kernels, "attention_kernel": attention, "quant_kernels": int_kernels, "forward": own,
        "exact_attention": exact,
        "machine": asdict(machine) if machine else None, "roofline": bounds,
        "llamacpp_extra_buffers": extra_buffers[0] if len(extra_buffers) == 1 else extra_buffers or None,
        "crashed": crashed,  # runner -> why: its preflight child died of a signal (left out of the run)
        "tokens_per_s": {n: r["tokens_per_s"] for n, r in cells_out.items()},
        "ratios": summary["ratios"],
        "speedup": {n: r["speedup"] for n, r in cells_out.items()},
        "tokens_per_target_pass": {n: r["mean_accepted_tokens"] for n, r in cells_out.items()},
        "leviathan": summary["leviathan"],
        "acceptance_by_position": {n: r["acceptance_by_position"] for n, r in cells_out.items()
                                   if r["acceptance_by_position"] is not None},
        "identical_to_baseline": {n: r["identical_to_baseline"] for n, r in cells_out.items()},
        "identical_to_ours": {n: r["identical_to_ours"] for n, r in cells_out.items()},
        "prefix_agreement_with_ours": {n: r["prefix_agreement_with_ours"] for n, r in cells_out.items()},
        "engines": {n: r["engine"] for n, r in cells_out.items()},
        "weights": formats,
        "degenerate_share": {n: r["degenerate_share"] for n, r in cells_out.items()},  # metrics.DegenerateRule
        "step_breakdown_ms": {n: r["step_breakdown"] for n, r in cells_out.items() if r["step_breakdown"]},
        "cuda_event_gap": {n: r["cuda_event_gap"] for n, r in cells_out.items()},  # bench_measure.event_gap
        "by_category": categories,
        "memory": memory,
        "goals": goals(summary, memory),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
