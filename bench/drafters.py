"""Trained drafters on the benchmark suite: baseline vs chain / tree / dynamic-length drafting, one process.

    python bench/drafters.py [--per-category 2] [--max-new-tokens 96] [--repeats 2] [--k 4]
                             [--runners baseline,speculative@eagle,tree@eagle,...] [--drafters-dir DIR]

Every runner decodes the same prompts (prompts/suite.jsonl, the first N of each category; multi-turn prompts with
their follow-up turns) through specdec.runner.generate — the code path of the workflow's cells. Runs are
interleaved (each repeat walks the prompts and, per prompt, every runner in an order that rotates), so load from
other processes hits every runner alike; times are per-prompt medians over repeats.

Printed per runner: tokens/s (Spec-Bench's speedup = mean tok/s ÷ baseline mean tok/s, and the median of
per-prompt ratios), mean accepted tokens per verify step (excluding the prefill; Spec-Bench's definition incl.
the bonus token) and per target pass (the record's field, prefill included), acceptance rate α per depth, cost
ratio c, the Leviathan prediction from the measured α and c, and whether greedy output equals the baseline's.
The last line is one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace


def parse_runner(text: str, target: str) -> tuple[str, str, str | None]:
    """'tree@eagle' → (name, strategy, draft alias); 'baseline' → no draft; a draft without '+' is a model alias."""
    strategy, _, draft = text.partition("@")
    if draft in ("eagle", "medusa"):
        draft = f"{target}+{draft}"
    return text, strategy, draft or None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--runners", default="baseline,speculative@eagle,tree@eagle,speculative-heuristic@eagle,"
                                        "speculative-confidence@eagle,speculative@medusa,tree@medusa")
    p.add_argument("--prompts", default="prompts/suite.jsonl")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--prompt-ids", default=None, help="comma-separated ids (instead of --per-category)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--drafters-dir", default=None)
    p.add_argument("--models", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from specdec.decoding import DecodeSettings
    from specdec.models import encode_prompt, load_registry
    from specdec.prompts import load_prompts, select
    from specdec.runner import Pair, check_settings, generate, load_pair, warm_up

    registry = load_registry(args.models)
    runners = [parse_runner(r, args.target) for r in args.runners.split(",")]
    s = DecodeSettings(max_new_tokens=args.max_new_tokens, k=args.k, temperature=args.temperature)
    for _, strategy, draft in runners:
        check_settings(strategy, draft, s, registry, args.target)
    ids = args.prompt_ids.split(",") if args.prompt_ids else None
    prompts = select(load_prompts(args.prompts), ids, None, None if ids else args.per_category)

    pairs: dict[str | None, Pair] = {}
    base = load_pair(args.target, None, registry)
    for _, _, draft in runners:
        if draft not in pairs:
            pairs[draft] = base if draft is None else Pair(
                base.target, drafter=load_pair(args.target, draft, registry, drafters_dir=args.drafters_dir).drafter)
    warm = encode_prompt(base.target, prompts[0]["prompt"])
    for name, strategy, draft in runners:
        warm_up(pairs[draft], strategy, warm, s, 2)

    records: dict[str, dict[str, list[dict]]] = {name: {q["id"]: [] for q in prompts} for name, _, _ in runners}
    start = time.perf_counter()
    for repeat in range(args.repeats):
        for i, q in enumerate(prompts):
            shift = (i + repeat) % len(runners)
            for name, strategy, draft in runners[shift:] + runners[:shift]:
                record = generate(pairs[draft], strategy, q["prompt"], replace(s, seed=s.seed + repeat), q["turns"])
                records[name][q["id"]].append(record)
            print(f"  repeat {repeat + 1}/{args.repeats} prompt {i + 1}/{len(prompts)} {q['id']} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    def median(name, prompt_id, key):
        return statistics.median(r[key] for r in records[name][prompt_id])

    base_name = runners[0][0]
    base_tps = {q["id"]: median(base_name, q["id"], "tokens_per_s") for q in prompts}
    summary = {}
    header = (f"{'runner':<32} {'tok/s':>6} {'speedup':>7} {'med.ratio':>9} {'acc/step':>8} {'acc/pass':>8} "
              f"{'alpha':>5} {'c':>6} {'leviathan':>9} {'=base':>5}  alpha by depth")
    print(header)
    for name, strategy, draft in runners:
        rows = [r for q in prompts for r in records[name][q["id"]]]
        tps = {q["id"]: median(name, q["id"], "tokens_per_s") for q in prompts}
        new_tokens = sum(r["new_tokens"] for r in rows)
        passes = sum(r["target_forward_passes"] for r in rows)
        turns = sum(1 + len(q["turns"]) for q in prompts) * args.repeats  # one prefill pass per turn
        proposed = [sum(col) for col in zip(*(r["proposed_per_position"] for r in rows))] \
            if rows[0]["proposed_per_position"] else []
        accepted = [sum(col) for col in zip(*(r["accepted_per_position"] for r in rows))] \
            if rows[0]["accepted_per_position"] else []
        alpha = sum(accepted) / sum(proposed) if proposed and sum(proposed) else None
        cs = [r["cost_ratio_c"] for r in rows if r["cost_ratio_c"] is not None]
        levs = [r["leviathan_speedup"] for r in rows if r["leviathan_speedup"] is not None]
        same = all(records[name][q["id"]][0]["token_hash"] == records[base_name][q["id"]][0]["token_hash"]
                   for q in prompts)
        out = {"tokens_per_s": statistics.mean(tps.values()),
               "speedup": statistics.mean(tps.values()) / statistics.mean(base_tps.values()),
               "median_prompt_ratio": statistics.median(tps[i] / base_tps[i] for i in tps),
               "accepted_per_step": new_tokens / (passes - turns) if passes > turns else None,
               "accepted_per_pass": new_tokens / passes, "alpha": alpha,
               "alpha_by_depth": [round(a / b, 3) if b else None for a, b in zip(accepted, proposed)],
               "c": statistics.median(cs) if cs else None, "leviathan": statistics.median(levs) if levs else None,
               "matches_baseline": same}
        summary[name] = out
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{name:<32} {out['tokens_per_s']:6.2f} {out['speedup']:7.3f} {out['median_prompt_ratio']:9.3f} "
              f"{fmt(out['accepted_per_step'], '8.3f')} {out['accepted_per_pass']:8.3f} {fmt(alpha, '5.3f')} "
              f"{fmt(out['c'], '6.3f')} {fmt(out['leviathan'], '9.3f')} {str(same):>5}  {out['alpha_by_depth']}")
    print(json.dumps({"prompts": [q["id"] for q in prompts], "k": args.k, "max_new_tokens": args.max_new_tokens,
                      "repeats": args.repeats, "temperature": args.temperature, "runners": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
