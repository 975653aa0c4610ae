"""Do paired speedups survive a busy machine, and is the busy part flagged? The goal benchmark of issue 13.

    python bench/paired_noise.py [--configfile config.yaml] [--cores 2] [--hog-share 0.5] [--keep]

Runs the default matrix (config.yaml, `baseline: paired`) twice with Snakemake, each in a temporary working
directory with its own store:

1. quiet: nothing added (other users of the machine are not stopped: the script says what it measured);
2. loaded: a CPU hog — one busy-looping process per core — starts with the run and stops once `--hog-share` of the
   cells have written their result files, so part of the matrix runs under it and part does not.

Then prints both runs' cells side by side (median paired speedup, its 95 % interval, noisy or not) and checks:

- every cell's paired median speedup differs by less than 15 % between the quiet and the loaded run;
- the self-draft cells (speculative, the target as its own draft) stay below 1.2x in both runs, and no cell's
  median exceeds 3x;
- every cell the hog ran through (for at least half of its run time) is flagged noisy in the loaded run, and no
  cell of the quiet run is.

One PASS/FAIL line per check, and the CPU model. Not a test: it takes two matrix runs (~20-40 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_CHANGE = 0.15
SELF_DRAFT_LIMIT = 1.2
ANY_CELL_LIMIT = 3.0


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def start_hog(cores: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]


def stop_hog(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def run_matrix(workdir: Path, configfile: Path, cores: int, hog_cells: int | None) -> dict:
    """One `snakemake` run of the matrix in `workdir`; with `hog_cells`, a hog runs from the start until that many
    cell result files exist. Returns wall time and the hog's UTC interval."""
    workdir.mkdir(parents=True)
    (workdir / "prompts").symlink_to(REPO / "prompts")  # the config's prompt paths are relative
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--profile",
           str(REPO / "profiles" / "default"), "--directory", str(workdir), "--configfile", str(configfile),
           "--cores", str(cores), "--config", f"db={workdir / 'store.duckdb'}", f"results={workdir / 'results'}",
           "tag=bench"]
    hog, hog_start, hog_stop = [], None, None
    log = open(workdir / "snakemake.log", "w")
    started = time.perf_counter()
    if hog_cells:
        hog, hog_start = start_hog(cores), datetime.now(timezone.utc)
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if hog and len(list((workdir / "results").glob("bench/*/cells/*.json"))) >= hog_cells:
                stop_hog(hog)
                hog, hog_stop = [], datetime.now(timezone.utc)
            time.sleep(0.5)
    finally:
        if hog:
            stop_hog(hog)
            hog_stop = datetime.now(timezone.utc)
        log.close()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed in {workdir} (exit {proc.returncode}); see {workdir / 'snakemake.log'}")
    return {"wall_s": wall, "hog": (hog_start, hog_stop) if hog_cells else None}


def cells(db: Path) -> dict[tuple, dict]:
    """Per cell (strategy, draft, k): median paired speedup, interval, noise, and the run's UTC interval."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("""
            SELECT c.strategy, coalesce(c.draft, '-'), coalesce(c.draft_length, 0), c.target, c.speedup_median,
                   c.speedup_ci_low, c.speedup_ci_high, c.noisy, c.noise_reason, c.paired_share,
                   min(r.started_utc), max(r.finished_utc)
            FROM cell_summary c
            JOIN runs r ON r.strategy = c.strategy AND r.target = c.target AND r.paired_with IS NULL
                       AND r.draft IS NOT DISTINCT FROM c.draft
                       AND coalesce(r.k, 0) = coalesce(c.draft_length, r.k, 0)
            GROUP BY ALL ORDER BY ALL""").fetchall()
    finally:
        con.close()
    out = {}
    for strategy, draft, k, target, median, low, high, noisy, reason, paired, t0, t1 in rows:
        out[(strategy, draft, k)] = dict(target=target, median=median, low=low, high=high, noisy=noisy,
                                         reason=reason, paired=paired, start=t0.replace(tzinfo=timezone.utc),
                                         end=t1.replace(tzinfo=timezone.utc))
    return out


def hog_share(cell: dict, hog) -> float:
    """Share of the cell's run time the hog was running."""
    start, stop = hog
    overlap = (min(cell["end"], stop) - max(cell["start"], start)).total_seconds()
    return max(0.0, overlap) / max((cell["end"] - cell["start"]).total_seconds(), 1e-9)


def fmt(cell: dict | None) -> str:
    if cell is None or cell["median"] is None:
        return "-"
    ci = f"[{cell['low']:.2f}-{cell['high']:.2f}]" if cell["low"] is not None else "[-]"
    flag = "NOISY" if cell["noisy"] else "quiet" if cell["noisy"] is not None else "?"
    return f"{cell['median']:.2f} {ci} {flag}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", default=str(REPO / "config.yaml"))
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--hog-share", type=float, default=0.5, help="share of cells the hog runs through")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working directories")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "workflow"))
    import matrix
    import yaml

    config = yaml.safe_load(Path(args.configfile).read_text())
    n_cells = len(matrix.expand_cells({**config, "baseline": config.get("baseline", "paired")}))
    hog_cells = max(1, round(args.hog_share * n_cells))
    root = Path(tempfile.mkdtemp(prefix="specdec-paired-noise-"))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; matrix {args.configfile}: {n_cells} cells; "
          f"working directories under {root}", flush=True)
    print("Other processes on this machine (other users, agents) are not stopped: the quiet run is as quiet as the "
          "machine was.", flush=True)
    try:
        quiet_run = run_matrix(root / "quiet", Path(args.configfile), args.cores, None)
        print(f"quiet run: {quiet_run['wall_s'] / 60:.1f} min", flush=True)
        loaded_run = run_matrix(root / "loaded", Path(args.configfile), args.cores, hog_cells)
        start, stop = loaded_run["hog"]
        print(f"loaded run: {loaded_run['wall_s'] / 60:.1f} min; hog of {args.cores} busy processes for "
              f"{(stop - start).total_seconds() / 60:.1f} min (until {hog_cells} of {n_cells} cells were done)",
              flush=True)
        quiet, loaded = cells(root / "quiet" / "store.duckdb"), cells(root / "loaded" / "store.duckdb")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'cell (strategy, draft, k)':<38} {'quiet: median [95% CI]':<28} {'loaded: median [95% CI]':<28} "
          f"{'change':>7} {'hog share':>9}")
    checks = {"change": [], "self_draft": [], "max": [], "hog_flagged": [], "quiet_clean": []}
    for key in sorted(set(quiet) | set(loaded)):
        a, b = quiet.get(key), loaded.get(key)
        strategy, draft, k = key
        change = share = None
        if a and b and a["median"] and b["median"]:
            change = b["median"] / a["median"] - 1
            checks["change"].append((key, abs(change) < MAX_CHANGE))
        if b:
            share = hog_share(b, loaded_run["hog"])
            if share >= 0.5:
                checks["hog_flagged"].append((key, bool(b["noisy"])))
        if a and strategy != "baseline":
            checks["quiet_clean"].append((key, a["noisy"] is False))
        for run in (a, b):
            if run and run["median"] is not None:
                checks["max"].append((key, run["median"] <= ANY_CELL_LIMIT))
                if strategy == "speculative" and draft == run["target"]:
                    checks["self_draft"].append((key, run["median"] < SELF_DRAFT_LIMIT))
        name = f"{strategy} {draft} k={k or '-'}"
        print(f"{name:<38} {fmt(a):<28} {fmt(b):<28} {'-' if change is None else f'{100 * change:+.1f}%':>7} "
              f"{'-' if share is None else f'{100 * share:.0f}%':>9}")
    for label, cell in (("quiet", quiet), ("loaded", loaded)):
        reasons = {f"{k[0]} k={k[2] or '-'}": c["reason"] for k, c in cell.items() if c["noisy"]}
        if reasons:
            print(f"noisy in the {label} run: " + "; ".join(f"{n}: {r}" for n, r in reasons.items()))

    descriptions = {
        "change": f"every cell's paired median differs by < {100 * MAX_CHANGE:.0f} % between the runs",
        "self_draft": f"self-draft cells stay below {SELF_DRAFT_LIMIT}x in both runs",
        "max": f"no cell's median exceeds {ANY_CELL_LIMIT}x",
        "hog_flagged": "cells the hog ran through (>= 50 % of their time) are flagged noisy",
        "quiet_clean": "no cell of the quiet run is flagged noisy",
    }
    print()
    ok_all = True
    for name, results in checks.items():
        bad = [f"{k[0]} k={k[2] or '-'}" for k, ok in results if not ok]
        ok = bool(results) and not bad
        ok_all &= ok
        detail = f" ({len(results)} checked)" if ok else f" (failing: {', '.join(bad) or 'nothing to check'})"
        print(f"{'PASS' if ok else 'FAIL'}  {descriptions[name]}{detail}")
    print(json.dumps({"quiet_wall_s": round(quiet_run["wall_s"], 1), "loaded_wall_s": round(loaded_run["wall_s"], 1),
                      "cpu": cpu_model(), "pass": ok_all}))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
