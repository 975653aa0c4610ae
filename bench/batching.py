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
over caches as long as a prompt plus half the answer); with the method's tokens per pass tau and draft time d per
pass measured at B = 1, the predicted speedup at B is tau * T(B, 1) / (T(B, r) + B * d), and the predicted B* the
largest B where it exceeds 1. Prints a table and writes everything as JSON to --out.
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


def probe_batch_memory(args, runner: str, encoded: list[list[int]], s, batch_size: int) -> dict:
    """Peak memory of one batched decode of the queue in a fresh process (bench_measure.probe_memory: the tensors
    the models hold plus the peak RSS growth during the decode, after an untimed pass over the same queue),
    against the weights plus the KV of the B longest sequences in flight."""
    import os
    import subprocess

    from specdec.strategies import STRATEGIES

    spec = {"strategy": runner, "draft": args.target if STRATEGIES[runner].needs_draft else None, "weights": None,
            "target": args.target, "models": {}, "device": "cpu", "threads": args.threads, "stock_kernels": False,
            "drafters_dir": None, "prompt_ids": encoded[0], "settings": vars(s), "batch_size": batch_size,
            "batch_prompt_ids": encoded}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors leave RSS at once (no arena reuse)
    out = subprocess.run([sys.executable, "-m", "specdec.run.bench", "--probe-memory", json.dumps(spec)],
                         capture_output=True, text=True, env=env, timeout=1800)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        error = (out.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"[batching] memory of {runner} at B={batch_size} failed: {error}", file=sys.stderr)
        return {"error": error}
    probe = json.loads(lines[-1])
    print(f"[batching] memory of {runner} at B={batch_size}: {probe['peak_bytes'] / 2**20:.0f} MiB, "
          f"{probe['over_weights_and_kv']:.2f}x weights + KV", file=sys.stderr)
    return probe


def over(probe: dict | None) -> str:
    return f"{probe['over_weights_and_kv']:.2f}" if probe and "over_weights_and_kv" in probe else "-"


def main(argv=None) -> int:
    args = parse_args(argv)
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
    t1 = {b: profile_pass(model, b, 1, int(context)) for b in sizes}
    rows_out, table = [], []
    for runner in runners[1:]:
        at1 = [r for records, _ in results[(runner, 1)] for r in records] if (runner, 1) in results else []
        tau = statistics.mean(r["new_tokens"] / max(1, r["target_forward_passes"]) for r in at1) if at1 else None
        verify_rows = (statistics.mean((r["proposed_tokens"] or 0) / max(1, r["target_forward_passes"] - 1)
                                       for r in at1) + 1) if at1 and runner != "hf-generate" else 1
        draft_per_pass = (statistics.mean(r["draft_s"] / max(1, r["target_forward_passes"] - 1) for r in at1)
                          if at1 and runner != "hf-generate" else 0.0)
        r_rows = max(1, round(verify_rows))
        tr = {b: profile_pass(model, b, r_rows, int(context)) for b in sizes} if runner != "hf-generate" else t1
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
            predicted = (tau * t1[b] / (tr[b] + b * draft_per_pass)) if tau and runner != "hf-generate" else None
            row = {"runner": runner, "batch_size": b, "speedup": med, "ci_low": low, "ci_high": high,
                   "throughput_speedup": statistics.median(throughput), "identical_share": statistics.mean(identical),
                   "tokens_per_pass": statistics.mean(passes), "tpot_ms": 1e3 * statistics.median(t for t in tpot if t),
                   "predicted_speedup": predicted,
                   "memory": memory.get((runner, b)),
                   "throughput_tok_s": statistics.median(t["tokens_per_s"] for _, t in results[(runner, b)]),
                   "baseline_throughput_tok_s": statistics.median(t["tokens_per_s"]
                                                                  for _, t in results[("baseline", b)])}
            per_method.append(row)
            rows_out.append(row)
        measured = crossover(per_method)
        pred_paying = [r["batch_size"] for r in per_method if r["predicted_speedup"] and r["predicted_speedup"] > 1]
        table.append({"runner": runner, "crossover": measured, "predicted_largest_paying": max(pred_paying, default=None),
                      "tau_at_1": tau, "verify_rows_at_1": verify_rows, "draft_s_per_pass_at_1": draft_per_pass})
    print(f"\n{'runner':<14}{'B':>4}{'speedup [95% CI]':>24}{'pred':>7}{'thru x':>8}{'tok/pass':>9}"
          f"{'TPOT ms':>9}{'tok/s all':>10}{'same':>6}{'mem/(w+kv)':>11}")
    for r in rows_out:
        ci = f"[{r['ci_low']:.2f}-{r['ci_high']:.2f}]" if r["ci_low"] is not None else ""
        pred = f"{r['predicted_speedup']:.2f}" if r["predicted_speedup"] else "-"
        print(f"{r['runner']:<14}{r['batch_size']:>4}{r['speedup']:>9.2f} {ci:>14}{pred:>7}"
              f"{r['throughput_speedup']:>8.2f}{r['tokens_per_pass']:>9.2f}{r['tpot_ms']:>9.1f}"
              f"{r['throughput_tok_s']:>10.1f}{r['identical_share']:>6.0%}{over(r['memory']):>11}")
    print(f"\n{'runner':<14}{'B* measured (largest paying / smallest losing)':>48}{'B* predicted':>14}")
    for t in table:
        c = t["crossover"]
        print(f"{t['runner']:<14}{str(c['largest_paying']) + ' / ' + str(c['smallest_losing']):>48}"
              f"{str(t['predicted_largest_paying']):>14}")
    if memory:
        print(f"\npeak memory / (weights + KV of B sequences), each in a fresh process; MiB in brackets")
        print(f"{'runner':<14}" + "".join(f"{'B=' + str(b):>16}" for b in sizes))
        for runner in runners:
            cells = [memory[(runner, b)] for b in sizes]
            print(f"{runner:<14}" + "".join(
                f"{over(c) + (' [' + str(round(c['peak_bytes'] / 2**20)) + ']' if 'peak_bytes' in c else ''):>16}"
                for c in cells))
    if not args.no_peer:
        print("\nours / transformers' batched generate, throughput: " + ", ".join(
            f"B={r['batch_size']} {r['baseline_throughput_tok_s'] / r['throughput_tok_s']:.2f}x"
            for r in rows_out if r["runner"] == "hf-generate"))
    print(f"load after: {load_average():.2f}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(), "settings": vars(args),
                               "pass_profile_s": {"rows_1": t1}, "rows": rows_out, "crossovers": table,
                               "memory": [{"runner": r, "batch_size": b, **m} for (r, b), m in memory.items()]}, indent=1))
    print(json.dumps({"rows": len(rows_out), "out": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
