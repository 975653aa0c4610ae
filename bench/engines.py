"""Engines × methods × weight formats on this CPU: our engine (float32, bfloat16, int8, int4) against llama.cpp on
the same GGUF (its own Q4_1), greedy, on the suite. Goal (issue 16): our plain decoding in a quantised format at
>= 0.8x llama.cpp's plain decoding, at 2 threads.

    python bench/engines.py [--threads 1,2] [--per-category 1] [--repeats 3] [--max-new-tokens 64] [--k 4]
                            [--weights float32,bfloat16,int8,int4] [--methods ngram,speculative]
                            [--out results/engines.json]

For each thread count, one `specdec bench` run (one process, runners interleaved per prompt, medians over repeats;
specdec/run/bench_measure.py) measures every runner: our baseline and --methods (default ngram and speculative, the target
as its own draft; the train-free recycling, suffix and rest can be added) per weight format, and on llama.cpp its
plain decoding, its own prompt lookup (llamacpp-ngram, with ngram) and the llama.cpp strategy of each method
(registry `peer`: llamacpp-specdec-ngram, -speculative, -recycling, -suffix, -rest). The load average
(/proc/loadavg) is read before and after each run: llama.cpp spins its threads, so on a busy machine its figures
collapse, and the table says how busy the machine was. Prints the CPU model, one table per thread count (speedup
over the same engine's plain decoding in the same weights, tokens per target pass, whether speculation pays,
agreement with our float32 plain decoding) and the goal check; writes everything as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ngram", "speculative")  # default --methods
GOAL = 0.8  # ours plain (quantised) ÷ llama.cpp plain


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def runners(methods: list[str]) -> list[str]:
    """Ours: plain decoding and each method; llama.cpp: plain decoding, its own prompt lookup beside ours, and
    the llama.cpp strategy whose registry `peer` is each method."""
    from specdec.strategies import STRATEGIES

    unknown = [m for m in methods if m not in STRATEGIES or STRATEGIES[m].engine != "specdec"]
    if unknown:
        raise SystemExit(f"--methods: {unknown} are not strategies of our engine; choose from "
                         + ", ".join(n for n, s in STRATEGIES.items() if s.engine == "specdec" and s.uses_k))
    llama = ["llamacpp-generate"] + (["llamacpp-ngram"] if "ngram" in methods else [])
    llama += [n for m in methods for n, s in STRATEGIES.items() if s.engine == "llamacpp" and s.peer == m]
    return ["baseline"] + methods + llama


def run_bench(args, threads: int) -> dict:
    command = [sys.executable, "-m", "specdec.cli", "bench", "--runners", ",".join(runners(args.methods)),
               "--weights", args.weights, "--threads", str(threads), "--per-category", str(args.per_category),
               "--repeats", str(args.repeats), "--max-new-tokens", str(args.max_new_tokens), "--k", str(args.k),
               "--memory", "off"]
    before, started = load_average(), time.time()
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"specdec bench failed ({' '.join(command)}): {out.stderr.strip().splitlines()[-1:]}")
    print(out.stdout.rsplit("\n", 2)[0], file=sys.stderr)  # bench's own tables, for the log
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_average"] = {"before": before, "after": load_average()}
    result["minutes"] = round((time.time() - started) / 60, 1)
    return result


def method(runner: str) -> str:
    return runner.split("@")[0].split("[")[0]


def rows_of(result: dict) -> list[dict]:
    """One row per runner: engine, method, weights, tok/s, speedup, tokens per target pass, pays, agreement."""
    from specdec.strategies import STRATEGIES

    rows = []
    for name, tps in result["tokens_per_s"].items():
        speculative = STRATEGIES[method(name)].uses_k
        speedup = result["speedup"][name]
        rows.append({
            "engine": result["engines"][name], "method": method(name), "weights": result["weights"][name],
            "tok/s": tps, "speedup": speedup,
            "tokens/pass": result["tokens_per_target_pass"][name],
            "pays": ("yes" if speedup > 1 else "no") if speculative and speedup else "",
            "same as own plain": result["identical_to_baseline"][name],
            "same as ours f32": result["identical_to_ours"][name],
            "prefix = ours f32": result["prefix_agreement_with_ours"][name]})
    return rows


def fmt(value, spec=".2f") -> str:
    if value is None or value == "":
        return "-" if value is None else ""
    return format(value, spec) if isinstance(value, float) else str(value)


def print_rows(rows: list[dict], out=sys.stdout) -> None:
    cols = list(rows[0])
    cells = [[fmt(r[c], ".0%" if c.startswith(("same", "prefix")) else ".2f") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |", file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |", file=out)


def goal_check(result: dict) -> dict:
    """Ours plain decoding per weight format ÷ llama.cpp's plain decoding."""
    llama = result["tokens_per_s"].get("llamacpp-generate")
    return {name: tps / llama for name, tps in result["tokens_per_s"].items()
            if name.startswith("baseline") and llama}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts, one bench run each")
    p.add_argument("--weights", default="float32,bfloat16,int8,int4")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods of ours, each also run on llama.cpp where it has a mirror "
                        "(default: %(default)s; e.g. add recycling,suffix,rest)")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--out", default="results/engines.json")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    runners(args.methods)  # unknown methods fail here, before anything runs
    report = {"cpu": cpu_model(), "settings": vars(args), "runs": {}}
    print(f"CPU: {report['cpu']}")
    for threads in [int(t) for t in args.threads.split(",")]:
        result = run_bench(args, threads)
        report["runs"][threads] = result
        rows = rows_of(result)
        print(f"\n{threads} thread(s), {len(result['prompts'])} prompts x {result['repeats']} repeats, "
              f"{result['minutes']} min, load average {result['load_average']['before']:.1f} before, "
              f"{result['load_average']['after']:.1f} after:")
        print_rows(rows)
        ratios = goal_check(result)
        print("ours plain ÷ llama.cpp plain: " + ", ".join(f"{n} {r:.2f}" for n, r in ratios.items())
              + f" (goal >= {GOAL} in a quantised format: "
              + ("met" if any(r >= GOAL for n, r in ratios.items() if "float32" not in n) else "NOT met") + ")")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
