"""How fast is each dashboard page on a store with 100 000 measurement rows? Target: every page under 2 s.

    python bench/dashboard_queries.py [--rows 100000] [--db PATH] [--repeats 3]

Fills a store through the real ingest (synthetic result files from tests/dashboard_fixture.py: 80 prompts × 3
repeats per run, 2 hosts × 2 pairs × 1–2 GPUs × 2 temperatures × 13 strategy/k settings × campaigns, a few failed
runs and mismatching outputs), or reuses --db if it already holds rows. Then renders every page with Streamlit's
AppTest, the way a browser session runs it:

- cold: the query cache off, so every SQL statement runs (what the first visitor after an ingest waits for);
  `sql s` is the time inside those statements, `page s` the whole script run (SQL, pandas, chart specs; on the
  SQL console page also its example query, which runs through `specdec query`'s guarded path);
- warm: the cache on and already filled (every later rerun: a filter click, another visitor).

Medians over --repeats runs after one warm-up run. Prints one row per page and the headline figures.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic result files the dashboard tests use

TARGET_S = 2.0
PROMPTS = [(f"{cat}-{i:02d}", cat) for cat in ("summarisation", "code", "math", "qa", "translation", "rag",
                                                "chat", "extraction") for i in range(1, 11)]
REPEATS = 3
PAIRS = [("pythia-1.4b", "pythia-70m"), ("llama-3.1-8b-instruct", "llama-3.2-1b-instruct")]
# (strategy, k, speed over the baseline, acceptance α): the 13 runs of one host × pair × GPUs × temperature
SETTINGS = ([("baseline", None, 1.0, None), ("hf-generate", None, 1.05, None), ("hf-assisted", 4, 1.4, 0.6)]
            + [("speculative", k, s, a) for k, s, a in ((1, 1.3, 0.8), (2, 1.6, 0.76), (3, 1.8, 0.72),
                                                         (4, 1.9, 0.7), (5, 1.85, 0.67), (6, 1.7, 0.64),
                                                         (8, 1.5, 0.6))]
            + [("ngram", k, s, a) for k, s, a in ((2, 1.2, 0.4), (4, 1.25, 0.33), (8, 1.1, 0.25))])


def synthetic_results(rows: int, seed: int = 0) -> list[dict]:
    """Result files holding at least `rows` measurement rows: campaigns (one day each) of the full matrix, and the
    last two jobs failed before decoding (one failed row per prompt × repeat)."""
    from dashboard_fixture import make_result

    rng = random.Random(seed)
    matrix = list(itertools.product(("lab-a", "lab-b"), PAIRS, (1, 2), (0.0, 0.7), SETTINGS))
    jobs = -(-rows // (len(PROMPTS) * REPEATS))  # ceil
    results = []
    for i in range(max(jobs - 2, 0)):
        campaign, (host, (target, draft), gpus, temperature, (strategy, k, speed, alpha)) = \
            i // len(matrix), matrix[i % len(matrix)]
        greedy_spec = strategy == "speculative" and temperature == 0
        res = make_result(host=host, target=target, draft=draft if strategy in ("speculative", "hf-assisted") else None,
                          strategy=strategy, k=k, gpus=gpus, temperature=temperature,
                          speed=speed * (0.8 if host == "lab-b" else 1.0), alpha=alpha, prompts=PROMPTS,
                          repeats=REPEATS, started=f"2026-11-{20 + campaign:02d}T07:30:00Z",
                          mismatch=(rng.choice(PROMPTS)[0], 0) if greedy_spec and rng.random() < 0.1 else None,
                          baseline_tps=15.0 * gpus ** 0.5)
        jitter(res, rng)
        results.append(res)
    while len(results) < jobs:
        results.append(make_result(host="lab-a", target=PAIRS[1][0], draft=PAIRS[1][1], strategy="speculative", k=4,
                                   gpus=4, prompts=PROMPTS, repeats=REPEATS, failed="CUDA out of memory"))
    return results


def jitter(res: dict, rng: random.Random) -> None:
    """Per-measurement noise, so medians, quantiles and per-prompt figures are not all equal."""
    for m in res["measurements"]:
        if m["status"] != "ok":
            continue
        f = rng.lognormvariate(0, 0.08)
        m["tokens_per_s"] *= f
        m["wall_s"] /= f
        if m.get("acceptance_rate") is not None:
            m["acceptance_rate"] = min(1.0, max(0.0, m["acceptance_rate"] + rng.gauss(0, 0.03)))


def fill_store(db: Path, rows: int) -> float:
    from dashboard_fixture import write_results

    from specdec.db.store import ingest

    results = synthetic_results(rows)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_results(results, Path(tmp))
        for i in range(0, len(paths), 50):  # batches keep each transaction's memory modest
            ingest(db, paths[i:i + 50])
    return time.perf_counter() - t0


def time_page(page: str, cached: bool, repeats: int) -> tuple[float, float, int]:
    """Median (page seconds, SQL seconds, SQL statements) of one page's script run."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from specdec.dashboard import queries as q

    calls: list[float] = []
    read = q._read

    def timed_read(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return read(*args, **kwargs)
        finally:
            calls.append(time.perf_counter() - t0)

    q._read, q.USE_CACHE = timed_read, cached
    app = str(Path(q.__file__).with_name("app.py"))
    pages, sqls, counts = [], [], []
    try:
        for i in range(repeats + 1):  # run 0 warms up (imports, and the cache when cached)
            if not cached:
                st.cache_data.clear()
            calls.clear()
            at = AppTest.from_file(app, default_timeout=120)
            at.query_params["page"] = page
            t0 = time.perf_counter()
            at.run()
            elapsed = time.perf_counter() - t0
            if at.exception:
                raise RuntimeError(f"page {page} raised: {at.exception[0].value}")
            if i:
                pages.append(elapsed)
                sqls.append(sum(calls))
                counts.append(len(calls))
    finally:
        q._read, q.USE_CACHE = read, True
    return statistics.median(pages), statistics.median(sqls), int(statistics.median(counts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="measurement rows to fill (default %(default)s)")
    p.add_argument("--db", default=None, help="store to use; filled first if it has no rows (default: a temp file)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per page after one warm-up (default 3)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)  # Streamlit outside a server warns "no runtime" on every page run

    from specdec.dashboard.pages import PAGES
    from specdec.db.query import run_query

    tmp = tempfile.TemporaryDirectory()
    db = Path(args.db) if args.db else Path(tmp.name) / "bench.duckdb"
    have = int(run_query("SELECT count(*) AS n FROM measurements", db).n[0]) if db.exists() else 0
    if have == 0:
        print(f"filling {db} with {args.rows} measurement rows through `ingest` ...", flush=True)
        print(f"  ingest took {fill_store(db, args.rows):.1f} s", flush=True)
    os.environ["SPECDEC_DB"] = str(db)

    counts = run_query("""SELECT (SELECT count(*) FROM runs) AS runs, (SELECT count(*) FROM measurements) AS rows,
                                 (SELECT count(*) FROM cell_summary) AS cells,
                                 (SELECT count(*) FROM failures) AS failed,
                                 (SELECT count(*) FROM speedup WHERE NOT matches_baseline) AS mismatches""", db).iloc[0]
    print(f"store: {db} ({db.stat().st_size / 2**20:.1f} MiB): {counts.runs} runs, {counts.rows} measurement rows, "
          f"{counts.cells} cells, {counts.failed} failed rows, {counts.mismatches} mismatching outputs")
    best = run_query("""SELECT host, target, draft, strategy, draft_length, gpus, temperature, speedup_median,
                               acceptance_rate_median FROM cell_summary
                        WHERE draft_length IS NOT NULL ORDER BY speedup_median DESC LIMIT 1""", db).iloc[0]
    print(f"best cell: {best.speedup_median:.2f}× {best.target} ← {best.draft} {best.strategy} "
          f"k={best.draft_length} on {best.host}, {best.gpus} GPU, T={best.temperature}, "
          f"acceptance {best.acceptance_rate_median:.2f}")
    print(f"\nmedian of {args.repeats} runs per page; cold = query cache off, warm = cache filled; "
          f"target < {TARGET_S:g} s cold\n")
    print(f"{'page':<14} {'queries':>7} {'cold sql s':>10} {'cold page s':>11} {'warm page s':>11}  verdict")
    worst = 0.0
    for slug in PAGES:
        page_s, sql_s, n = time_page(slug, cached=False, repeats=args.repeats)
        warm_s, _, _ = time_page(slug, cached=True, repeats=args.repeats)
        worst = max(worst, page_s)
        print(f"{slug:<14} {n:>7} {sql_s:>10.3f} {page_s:>11.3f} {warm_s:>11.3f}  "
              f"{'ok' if page_s < TARGET_S else 'SLOW'}", flush=True)
    print(f"\nslowest page cold: {worst:.3f} s ({'within' if worst < TARGET_S else 'over'} the {TARGET_S:g} s target)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
