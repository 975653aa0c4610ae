"""Batch size as a measured dimension: where does speculation stop paying? (issue 32)

    python bench/batching.py [--batch-sizes 1,2,4,8,16] [--methods ngram,suffix,dynamic-tree,speculative]
                             [--per-category 2] [--repeats 2] [--max-new-tokens 64] [--k 8] [--tree-budget 14]
                             [--threads 2] [--out results/batching.json]

On this CPU with the embedded SmolLM2-135M (float32, our forward and kernels) and the suite's first turns: for every
batch size B, our plain decoding (`baseline`) and each method decode the same prompt queue with B slots
(runner.generate_batch), interleaved per repeat in a rotating order, so load hits every runner alike; transformers'
batched generate (hf-generate, left padded) is the peer of our batched baseline. The speculative runs use the
target as its own draft (the only same-vocabulary draft offline): a control whose acceptance is ~1.

Per method and B: the median per-sequence speedup over our baseline (each prompt's tok/s in the method's batch over
its tok/s in the baseline's batch of the same repeat) with its 95 % bootstrap interval (exact order statistics,
db/bootstrap.py), the batch throughput speedup, tokens per target pass, per-sequence TPOT, greedy identity with the
baseline, and the crossover B*: the largest B whose interval lies above 1 and the smallest whose interval lies
below 1.

The prediction beside it: one target pass of B sequences with r rows each is profiled (time T(B, r), median of 5,
over caches as long as a prompt plus half the answer); with the method's tokens per pass tau measured at B = 1,
and what a pass costs beyond the target's forward at B = 1 (drafting, acceptance, the loop:
o for the method, o0 for plain decoding, paid per sequence), the predicted speedup at B is
tau * (T(B, 1) + B * o0) / (T(B, r) + B * o) (add_predictions), and the predicted B* the largest B where it
exceeds 1. --predict-from recomputes the predictions of a saved run on a fresh profile. Prints a table and writes
everything as JSON to --out (--figure: the speedup-vs-batch-size SVG).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from engines import cpu_model, load_average  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--methods", default="ngram,suffix,dynamic-tree,speculative")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--prompts", default=str(REPO / "prompts" / "suite.jsonl"))
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tree-budget", type=int, default=14)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip transformers' batched generate")
    parser.add_argument("--memory", choices=("on", "off"), default="on",
                        help="peak memory per runner and B, each in a fresh process (about 15 s each)")
    parser.add_argument("--out", default=str(REPO / "results" / "batching.json"))
    parser.add_argument("--predict-from", default=None, metavar="JSON",
                        help="recompute the predictions of a saved run (its --out) from a fresh pass profile")
    parser.add_argument("--figure", default=None, help="also draw speedup vs batch size as SVG here (the report's "
                                                         "figure: medians with 95 %% intervals)")
    return parser.parse_args(argv)


def median_interval(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """(median, 95 % low, 95 % high): the bootstrap interval of the median from exact order statistics."""
    from specdec.db.bootstrap import median_ci_ranks

    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None, None, None
    if len(xs) < 2:
        return xs[0], None, None
    low_a, low_b, high_a, high_b = median_ci_ranks(len(xs))
    return statistics.median(xs), (xs[low_a - 1] + xs[low_b - 1]) / 2, (xs[high_a - 1] + xs[high_b - 1]) / 2


def crossover(rows: list[dict], key_low: str = "ci_low", key_high: str = "ci_high") -> dict:
    """B* from intervals: the largest B whose interval lies above 1, the smallest whose interval lies below 1."""
    above = [r["batch_size"] for r in rows if r[key_low] is not None and r[key_low] > 1]
    below = [r["batch_size"] for r in rows if r[key_high] is not None and r[key_high] < 1]
    return {"largest_paying": max(above, default=None), "smallest_losing": min(below, default=None)}


def profile_pass(model, batch: int, rows: int, context: int, repeats: int = 5) -> float:
    """Median seconds of one target pass of `batch` sequences with `rows` rows each over caches of `context`."""
    import torch

    from specdec.model.decoding import Pass, forward_passes, new_cache, rollback

    caches = []
    for b in range(batch):
        cache = new_cache(model, context + rows + 1)
        forward_passes(model, [Pass([3 + (i * 7 + b) % 500 for i in range(context)], cache)])
        caches.append(cache)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            passes = [Pass([11 + i for i in range(rows)], cache, rows) for cache in caches]
            start = time.perf_counter()
            forward_passes(model, passes)
            times.append(time.perf_counter() - start)
            for cache in caches:
                rollback(cache, context)
    return statistics.median(times[1:])


def add_predictions(rows: list[dict], table: list[dict], model, sizes: list[int], context: int) -> dict:
    """Each method's predicted speedup per B (into rows) and predicted B* (into table), from one profiled target
    pass T(B, r) of B sequences with r rows each (over caches of `context` tokens) and what was measured at B = 1:
    tau, the tokens per pass, r, the verify rows per pass, and the wall time per pass of the method (w = tau /
    its throughput) and of plain decoding (w0 = 1 / its throughput). What a pass costs beyond the target's forward
    at B = 1 (drafting, acceptance, cache compaction, the loop: o = w - T(1, r), o0 = w0 - T(1, 1)) is paid per
    sequence, so at B it is B times that:
        predicted speedup(B) = tau * (T(B, 1) + B * o0) / (T(B, r) + B * o).
    Returns the profile: {rows: {B: seconds}}."""
    profile = {1: {b: profile_pass(model, b, 1, context) for b in sizes}}
    at1 = {r["runner"]: r for r in rows if r["batch_size"] == 1}
    for entry in table:
        runner, tau = entry["runner"], entry["tau_at_1"]
        one = at1.get(runner)
        if runner == "hf-generate" or not tau or one is None:
            entry["predicted_largest_paying"] = None
            continue
        r_rows = max(1, round(entry["verify_rows_at_1"]))
        if r_rows not in profile:
            profile[r_rows] = {b: profile_pass(model, b, r_rows, context) for b in sizes}
        t1, tr = profile[1], profile[r_rows]
        o0 = max(0.0, 1.0 / one["baseline_throughput_tok_s"] - t1[1])
        om = max(0.0, tau / one["throughput_tok_s"] - tr[1])
        entry.update(verify_rows_profiled=r_rows, overhead_s_per_pass_at_1=om, baseline_overhead_s_per_pass_at_1=o0)
        paying = []
        for row in rows:
            if row["runner"] == runner:
                b = row["batch_size"]
                row["predicted_speedup"] = tau * (t1[b] + b * o0) / (tr[b] + b * om)
                if row["predicted_speedup"] > 1:
                    paying.append(b)
        entry["predicted_largest_paying"] = max(paying, default=None)
    return {f"rows_{r}": t for r, t in profile.items()}


def probe_batch_memory(args, runner: str, encoded: list[list[int]], s, batch_size: int) -> dict:
    """Peak memory of one batched decode of the queue in a fresh process (bench_measure.probe_memory: the tensors
    the models hold plus the peak RSS growth during the decode, after an untimed pass over the same queue),
    against the weights plus the KV of the B longest sequences in flight."""
    from specdec.run.bench_measure import run_memory_probe
    from specdec.strategies import STRATEGIES

    spec = {"strategy": runner, "draft": args.target if STRATEGIES[runner].needs_draft else None, "weights": None,
            "target": args.target, "models": {}, "device": "cpu", "threads": args.threads, "stock_kernels": False,
            "drafters_dir": None, "prompt_ids": encoded[0], "settings": vars(s), "batch_size": batch_size,
            "batch_prompt_ids": encoded}
    probe = run_memory_probe(spec)
    if "error" in probe:
        print(f"[batching] memory of {runner} at B={batch_size} failed: {probe['error']}", file=sys.stderr)
        return probe
    print(f"[batching] memory of {runner} at B={batch_size}: {probe['peak_bytes'] / 2**20:.0f} MiB, "
          f"{probe['over_weights_and_kv']:.2f}x weights + KV", file=sys.stderr)
    return probe


def draw(rows: list[dict], cpu: str, path: Path) -> None:
    """The report's speedup-vs-batch-size figure (db/report.py:batch_chart) from the bench's rows."""
    import pandas as pd

    from specdec.db.report import batch_chart, to_svg

    d = pd.DataFrame([{"batch_size": r["batch_size"], "speedup": r["speedup"], "ci_low": r["ci_low"],
                       "ci_high": r["ci_high"],
                       "series": r["runner"] + (" (transformers' batched generate)" if r["runner"] == "hf-generate"
                                                else "")} for r in rows])
    chart, _ = batch_chart(d)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_svg(chart.properties(title=f"Speedup vs batch size: SmolLM2-135M, {cpu}")))


def print_tables(doc: dict) -> None:
    """The bench's tables from its JSON document: per method and B, B* measured and predicted, memory, the peer."""
    rows, table = doc["rows"], doc["crossovers"]
    sizes = sorted({r["batch_size"] for r in rows})
    print(f"\n{'runner':<14}{'B':>4}{'speedup [95% CI]':>24}{'pred':>7}{'thru x':>8}{'tok/pass':>9}"
          f"{'TPOT ms':>9}{'tok/s all':>10}{'same':>6}{'mem/(w+kv)':>11}")
    for r in rows:
        ci = f"[{r['ci_low']:.2f}-{r['ci_high']:.2f}]" if r["ci_low"] is not None else ""
        pred = f"{r['predicted_speedup']:.2f}" if r["predicted_speedup"] else "-"
        print(f"{r['runner']:<14}{r['batch_size']:>4}{r['speedup']:>9.2f} {ci:>14}{pred:>7}"
              f"{r['throughput_speedup']:>8.2f}{r['tokens_per_pass']:>9.2f}{r['tpot_ms']:>9.1f}"
              f"{r['throughput_tok_s']:>10.1f}{r['identical_share']:>6.0%}{over(r.get('memory')):>11}")
    print(f"\n{'runner':<14}{'B* measured (largest paying / smallest losing)':>48}{'B* predicted':>14}")
    for t in table:
        c = t["crossover"]
        print(f"{t['runner']:<14}{str(c['largest_paying']) + ' / ' + str(c['smallest_losing']):>48}"
              f"{str(t['predicted_largest_paying']):>14}")
    memory = {(m["runner"], m["batch_size"]): m for m in doc.get("memory") or []}
    if memory:
        print("\npeak memory / (weights + KV of B sequences), each in a fresh process; MiB in brackets")
        print(f"{'runner':<14}" + "".join(f"{'B=' + str(b):>16}" for b in sizes))
        for runner in dict.fromkeys(m["runner"] for m in doc["memory"]):
            cells = [memory.get((runner, b), {}) for b in sizes]
            print(f"{runner:<14}" + "".join(
                f"{over(c) + (' [' + str(round(c['peak_bytes'] / 2**20)) + ']' if 'peak_bytes' in c else ''):>16}"
                for c in cells))
    peer = [r for r in rows if r["runner"] == "hf-generate"]
    if peer:
        print("\nours / transformers' batched generate, throughput: " + ", ".join(
            f"B={r['batch_size']} {r['baseline_throughput_tok_s'] / r['throughput_tok_s']:.2f}x" for r in peer))


def predict_again(args) -> int:
    """--predict-from: the predictions of a saved run recomputed from a fresh pass profile on this machine (the
    measured rows are kept as they are); the document is written to --out."""
    from specdec.model.kernels import prepare_model
    from specdec.model.models import encode_prompt, load_registry
    from specdec.prompts import load_prompts, select
    from specdec.run.runner import load_pair, use_threads

    doc = json.loads(Path(args.predict_from).read_text())
    settings = doc["settings"]
    use_threads(settings["threads"])
    pair = load_pair(settings["target"], None, load_registry({}))
    context = doc.get("profile_context")
    if context is None:  # as the run computed it: the median prompt plus half the answer
        prompts = select(load_prompts(settings["prompts"]), per_category=settings["per_category"])
        context = int(statistics.median(len(encode_prompt(pair.target, p["prompt"])) for p in prompts)
                      + settings["max_new_tokens"] // 2)
    sizes = sorted({r["batch_size"] for r in doc["rows"]})
    doc["pass_profile_s"] = add_predictions(doc["rows"], doc["crossovers"], prepare_model(pair.target.model), sizes,
                                            context)
    doc["profile_context"] = context
    doc["predicted_again"] = {"cpu": cpu_model(), "load_before": load_average(), "when": time.strftime("%Y-%m-%d")}
    print_tables(doc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    if args.figure:
        draw(doc["rows"], doc["cpu"], Path(args.figure))
    print(json.dumps({"rows": len(doc["rows"]), "out": str(out)}))
    return 0


def over(probe: dict | None) -> str:
    return f"{probe['over_weights_and_kv']:.2f}" if probe and "over_weights_and_kv" in probe else "-"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.predict_from:
        return predict_again(args)
    import torch

    from specdec.model.decoding import DecodeSettings
    from specdec.model.kernels import prepare_model
    from specdec.model.models import encode_prompt, load_registry
    from specdec.prompts import load_prompts, select
    from specdec.strategies import STRATEGIES
    from specdec.run.runner import generate_batch, load_pair, use_threads, warm_up

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    use_threads(args.threads)
    prompts = [{**p, "turns": []} for p in select(load_prompts(args.prompts), per_category=args.per_category)]
    if max(sizes) > len(prompts):
        raise SystemExit(f"--batch-sizes: {max(sizes)} is more than the {len(prompts)} prompts selected; raise "
                         "--per-category or lower the batch sizes")
    registry = load_registry({})
    pair = load_pair(args.target, args.target if "speculative" in methods else None, registry)
    s = DecodeSettings(max_new_tokens=args.max_new_tokens, k=args.k, tree_budget=args.tree_budget)
    runners = ["baseline"] + methods + ([] if args.no_peer else ["hf-generate"])
    print(f"CPU: {cpu_model()}  threads: {torch.get_num_threads()}  prompts: {len(prompts)}  "
          f"max_new_tokens: {s.max_new_tokens}  k: {s.k}  tree budget: {s.tree_budget}  load before: "
          f"{load_average():.2f}", file=sys.stderr)
    warm_ids = encode_prompt(pair.target, prompts[0]["prompt"])
    for runner in runners:
        warm_up(pair, runner, warm_ids, s, 1)
    results: dict = {}  # (runner, B) -> list of (records, totals) per repeat
    for b in sizes:
        for repeat in range(args.repeats):
            order = runners[repeat % len(runners):] + runners[:repeat % len(runners)]
            for runner in order:
                records, totals = generate_batch(pair, runner, prompts, replace(s, seed=repeat), b)
                results.setdefault((runner, b), []).append((records, totals))
                print(f"[batching] B={b} repeat {repeat + 1}/{args.repeats} {runner}: "
                      f"{totals['tokens_per_s']:.1f} tok/s in all", file=sys.stderr)
    memory = {}  # (runner, B) -> probe_memory's answer: peak bytes against weights + KV of B sequences
    if args.memory == "on":
        encoded = [encode_prompt(pair.target, p["prompt"]) for p in prompts]
        for runner in runners:
            for b in sizes:
                memory[(runner, b)] = probe_batch_memory(args, runner, encoded, s, b)
    # the prediction's inputs: tokens per pass, verify rows and draft time per pass at B = 1
    model = prepare_model(pair.target.model)
    context = statistics.median(len(encode_prompt(pair.target, p["prompt"])) for p in prompts) + s.max_new_tokens // 2
    rows_out, table = [], []
    for runner in runners[1:]:
        at1 = [r for records, _ in results[(runner, 1)] for r in records] if (runner, 1) in results else []
        tau = statistics.mean(r["new_tokens"] / max(1, r["target_forward_passes"]) for r in at1) if at1 else None
        verify_rows = (statistics.mean((r["proposed_tokens"] or 0) / max(1, r["target_forward_passes"] - 1)
                                       for r in at1) + 1) if at1 and runner != "hf-generate" else 1
        draft_per_pass = (statistics.mean(r["draft_s"] / max(1, r["target_forward_passes"] - 1) for r in at1)
                          if at1 and runner != "hf-generate" else 0.0)
        per_method = []
        for b in sizes:
            speedups, throughput, identical, tpot, passes = [], [], [], [], []
            for (records, totals), (base, base_totals) in zip(results[(runner, b)], results[("baseline", b)]):
                for r, r0 in zip(records, base):
                    speedups.append(r["tokens_per_s"] / r0["tokens_per_s"])
                    identical.append(r["token_ids"] == r0["token_ids"])
                    tpot.append(r["tpot_s"])
                    passes.append(r["new_tokens"] / max(1, r["target_forward_passes"]))
                throughput.append(totals["tokens_per_s"] / base_totals["tokens_per_s"])
            med, low, high = median_interval(speedups)
            row = {"runner": runner, "batch_size": b, "speedup": med, "ci_low": low, "ci_high": high,
                   "throughput_speedup": statistics.median(throughput), "identical_share": statistics.mean(identical),
                   "tokens_per_pass": statistics.mean(passes), "tpot_ms": 1e3 * statistics.median(t for t in tpot if t),
                   "predicted_speedup": None,
                   "memory": memory.get((runner, b)),
                   "throughput_tok_s": statistics.median(t["tokens_per_s"] for _, t in results[(runner, b)]),
                   "baseline_throughput_tok_s": statistics.median(t["tokens_per_s"]
                                                                  for _, t in results[("baseline", b)])}
            per_method.append(row)
            rows_out.append(row)
        table.append({"runner": runner, "crossover": crossover(per_method), "tau_at_1": tau,
                      "verify_rows_at_1": verify_rows, "draft_s_per_pass_at_1": draft_per_pass})
    context = int(context)
    pass_profile = add_predictions(rows_out, table, model, sizes, context)
    doc = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "settings": vars(args),
           "pass_profile_s": pass_profile, "profile_context": context, "rows": rows_out, "crossovers": table,
           "memory": [{"runner": r, "batch_size": b, **m} for (r, b), m in memory.items()]}
    print_tables(doc)
    print(f"load after: {load_average():.2f}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    if args.figure:
        draw(rows_out, cpu_model(), Path(args.figure))
    print(json.dumps({"rows": len(rows_out), "out": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
