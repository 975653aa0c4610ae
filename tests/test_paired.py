"""Paired baselines: the ABBA decode order, per-pair ratios in the store, the same-machine rule, old stores and
files, and the bootstrap interval of cell_summary. Timings are injected; only one test decodes (tiny models)."""

from __future__ import annotations

import json
import statistics

import pytest

from duck import fetch
from specdec.run import job as job_module
from specdec.db.store import ResultFileError, ingest, load_result_file
from specdec.run.job import decode_units, run_cell, unit_order
from specdec.measure.noise import Reading
from specdec.strategies import is_plain_baseline, store_baseline

PROMPTS = [{"id": "p1", "category": "qa"}, {"id": "p2", "category": "code"}]



# --- the order of decodes in a job --------------------------------------------------------------------------------

def test_units_alternate_abba():
    assert [unit_order(i, paired=True) for i in range(4)] == [
        ("cell", "baseline"), ("baseline", "cell"), ("cell", "baseline"), ("baseline", "cell")]
    assert unit_order(1, paired=False) == ("cell",)

    seen = []
    cell, base = decode_units(PROMPTS, 2, True, lambda side, p, r: seen.append((side, p["id"], r)) or {})
    assert seen == [("cell", "p1", 0), ("baseline", "p1", 0), ("baseline", "p1", 1), ("cell", "p1", 1),
                    ("cell", "p2", 0), ("baseline", "p2", 0), ("baseline", "p2", 1), ("cell", "p2", 1)]
    assert [r["decode_index"] for r in cell] == [0, 3, 4, 7] and [r["decode_index"] for r in base] == [1, 2, 5, 6]
    assert [(r["prompt_id"], r["repeat"]) for r in cell] == [(r["prompt_id"], r["repeat"]) for r in base]

    only_cell, none = decode_units(PROMPTS, 2, False, lambda side, p, r: {})
    assert len(only_cell) == 4 and none == []


def drifting_decode(true_speedup: float, slowdown_per_decode: float):
    """Injected timings: the machine gets slower with every decode (a load that builds up); the cell is truly
    `true_speedup` times faster than the baseline at any one moment."""
    counter = iter(range(10_000))

    def decode_one(side, p, repeat):
        machine = 1.0 / (1.0 + slowdown_per_decode * next(counter))
        return {"tokens_per_s": 20.0 * machine * (true_speedup if side == "cell" else 1.0)}

    return decode_one


def test_pairs_cancel_drift_that_a_shared_baseline_does_not():
    prompts = [{"id": f"p{i}", "category": "qa"} for i in range(8)]
    cell, base = decode_units(prompts, 2, True, drifting_decode(1.5, 0.05))
    ratios = [c["tokens_per_s"] / b["tokens_per_s"] for c, b in zip(cell, base)]
    # within a pair the two decodes are adjacent: each ratio is off by one step of drift at most, and ABBA makes
    # the errors alternate in sign, so the median lands on the truth
    assert all(abs(r / 1.5 - 1) < 0.06 for r in ratios)
    assert statistics.median(ratios) == pytest.approx(1.5, rel=0.01)
    # a shared baseline measured before the cell (its own job at the start of the drift) is far off
    shared, _ = decode_units(prompts, 2, False, drifting_decode(1.0, 0.05))
    late_cell = [20.0 * 1.5 / (1.0 + 0.05 * (16 + i)) for i in range(16)]
    assert statistics.median(c / s["tokens_per_s"] for c, s in zip(late_cell, shared)) < 1.0


# --- one real job ---------------------------------------------------------------------------------------------

def fake_machine():
    """Readings of a machine on which other processes keep 0.6 of 2 cores busy, whatever the number of samples."""
    calls = iter(range(10_000))

    def read():
        t = 5.0 * next(calls)
        return Reading(t=t, busy_s=1.6 * t, steal_s=0.0, total_s=2.0 * t, own_s=1.0 * t, load1=1.5)

    return read


def test_a_cell_decodes_its_paired_baseline_in_the_same_job(prompt_file, tiny_models, tmp_path):
    spec = {"target": "tiny-target", "draft": "tiny-draft", "strategy": "speculative", "k": 3,
            "prompts_file": str(prompt_file), "models": tiny_models, "max_new_tokens": 8, "repeats": 2,
            "warmup": 1, "stop_at_eos": False, "cell": "c1"}
    doc = run_cell(spec, read_noise=fake_machine())
    run, paired = doc["run"], doc["paired_baseline"]
    assert doc["format"] == "specdec-result/2" and run["params"]["baseline_mode"] == "paired"
    assert paired["run"]["paired_with"] == run["run_id"] != paired["run"]["run_id"]
    assert paired["run"]["params"]["strategy"] == "baseline" and paired["run"]["params"]["draft"] is None
    assert paired["run"]["params"]["k"] is None and paired["run"]["params"]["cell"] == "c1"
    assert paired["run"]["host"] == run["host"] and paired["run"]["cpu_name"] == run["cpu_name"]
    # ABBA over the 4 prompt x repeat units, and greedy speculative output identical to its pair's
    assert [m["decode_index"] for m in doc["measurements"]] == [0, 3, 4, 7]
    assert [m["decode_index"] for m in paired["measurements"]] == [1, 2, 5, 6]
    assert [m["token_hash"] for m in doc["measurements"]] == [m["token_hash"] for m in paired["measurements"]]
    assert run["other_cpu_cores"] == pytest.approx(0.6) and run["load_avg"] == pytest.approx(1.5)
    assert run["noise_samples"] >= 2 and run["baseline_spread"] is not None

    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    db = tmp_path / "s.duckdb"
    ingest(db, [path])
    got = fetch(db, "SELECT baseline_source, baseline_run_id, matches_baseline, speedup, tokens_per_s, "
                    "baseline_tokens_per_s FROM speedup ORDER BY prompt_id, \"repeat\"")
    assert len(got) == 4  # the paired baseline is not a cell of its own
    for source, base_run, matches, speedup, tps, base_tps in got:
        assert source == "paired" and base_run == paired["run"]["run_id"] and matches
        assert speedup == pytest.approx(tps / base_tps)
    [(noisy, reason)] = fetch(db, "SELECT noisy, noise_reason FROM cell_summary")
    assert noisy and reason.startswith(f"other processes used 0.6 of {run['cpu_count']} cores")


def test_shared_mode_and_baseline_cells_decode_no_pair(prompt_file, tiny_models, monkeypatch):
    calls = []
    monkeypatch.setattr(job_module, "generate", lambda pair, strategy, *a: calls.append(strategy) or {})
    common = {"target": "tiny-target", "prompts_file": str(prompt_file), "models": tiny_models, "repeats": 1,
              "warmup": 0}
    doc = run_cell({**common, "strategy": "ngram", "k": 2, "baseline_mode": "shared"}, read_noise=fake_machine())
    assert calls == ["ngram", "ngram"] and doc["paired_baseline"] is None
    assert doc["run"]["params"]["baseline_mode"] == "shared" and doc["run"]["baseline_spread"] is None
    calls.clear()
    doc = run_cell({**common, "strategy": "baseline"}, read_noise=fake_machine())
    assert calls == ["baseline", "baseline"] and doc["paired_baseline"] is None
    assert "baseline_mode" not in doc["run"]["params"]
    with pytest.raises(ValueError, match="baseline_mode must be one of paired, shared, got 'both'"):
        job_module.read_job({**common, "strategy": "ngram", "baseline_mode": "both"})


# --- the store: synthetic result files with known tok/s ----------------------------------------------------------

def rows(tps: dict, hashes: dict | None = None) -> list[dict]:
    return [{"prompt_id": p, "category": "qa", "repeat": r, "status": "ok" if v else "failed",
             "error": None if v else "boom", "tokens_per_s": v, "token_hash": (hashes or {}).get(p, f"h-{p}")}
            for (p, r), v in tps.items()]


def run(run_id: str, strategy: str, *, host="h1", cpu="CPU A", gpus=(), mode=None, started="2026-12-01T10:00:00Z",
        **extra) -> dict:
    params = {"target": "t", "draft": "d" if strategy == "speculative" else None, "strategy": strategy,
              "k": 3 if strategy == "speculative" else None, "gpus": len(gpus), "temperature": 0.0, "top_p": 1.0,
              "top_k": 0, "max_new_tokens": 8, "cell": f"{strategy}-{mode}"}
    if mode:
        params["baseline_mode"] = mode
    return {"run_id": run_id, "started_utc": started, "status": "ok", "host": host, "cpu_name": cpu,
            "gpu_names": list(gpus), "cpu_count": 2, "params": params, **extra}


def paired_file(cell_id: str, cell_tps: dict, base_tps: dict, **kw) -> dict:
    base = run(cell_id + "-base", "baseline", paired_with=cell_id, **kw)
    return {"format": "specdec-result/2", "run": run(cell_id, "speculative", mode="paired", **kw),
            "measurements": rows(cell_tps), "paired_baseline": {"run": base, "measurements": rows(base_tps)}}


def store(tmp_path, docs: list[dict]):
    paths = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"{i}-{doc['run']['run_id']}.json"
        path.write_text(json.dumps(doc))
        paths.append(path)
    db = tmp_path / "s.duckdb"
    ingest(db, paths)
    return db


CELL = {("p1", 0): 30.0, ("p1", 1): 12.0, ("p2", 0): 40.0, ("p2", 1): 44.0}
PAIR = {("p1", 0): 20.0, ("p1", 1): 8.0, ("p2", 0): 20.0, ("p2", 1): None}  # the machine slowed on p1 r1


def test_speedup_is_the_ratio_within_each_pair_and_never_falls_back(tmp_path):
    shared = {"format": "specdec-result/2", "run": run("solo", "baseline"),
              "measurements": rows({k: 100.0 for k in CELL})}  # a fast standalone baseline cell on the same host
    db = store(tmp_path, [paired_file("cell", CELL, PAIR), shared])
    got = fetch(db, "SELECT prompt_id, \"repeat\", speedup, baseline_source FROM speedup WHERE run_id = 'cell' "
                    "ORDER BY ALL")
    assert got == [("p1", 0, 1.5, "paired"), ("p1", 1, 1.5, "paired"), ("p2", 0, 2.0, "paired"),
                   ("p2", 1, None, None)]  # its paired decode failed: no speedup, not the standalone baseline's
    # the paired baseline run is nobody's cell; the standalone baseline is its own cell
    assert fetch(db, "SELECT strategy, n_measurements FROM cell_summary ORDER BY strategy") == [
        ("baseline", 4), ("speculative", 4)]
    assert fetch(db, "SELECT count(*) FROM speedup WHERE run_id = 'cell-base'") == [(0,)]
    [(median, low, high, paired_share)] = fetch(db, "SELECT speedup_median, speedup_ci_low, speedup_ci_high, "
                                                    "paired_share FROM cell_summary WHERE strategy = 'speculative'")
    assert median == 1.5 and low <= median <= high and paired_share == pytest.approx(0.75)


def test_matches_baseline_compares_within_the_pair(tmp_path):
    doc = paired_file("cell", CELL, {k: 20.0 for k in CELL})
    doc["paired_baseline"]["measurements"][1]["token_hash"] = "different"
    db = store(tmp_path, [doc])
    assert [m for (m,) in fetch(db, "SELECT matches_baseline FROM speedup ORDER BY prompt_id, \"repeat\"")] == [
        True, False, True, True]


def test_shared_baselines_come_only_from_the_same_machine(tmp_path):
    def shared_cell(run_id, **kw):
        return {"format": "specdec-result/2", "run": run(run_id, "speculative", mode="shared", **kw),
                "measurements": rows({k: 30.0 for k in CELL})}

    def baseline(run_id, tps, **kw):
        return {"format": "specdec-result/2", "run": run(run_id, "baseline", **kw),
                "measurements": rows({k: tps for k in CELL})}

    db = store(tmp_path, [
        baseline("base-here", 20.0),
        # newer, but another CPU model under the same hostname (a re-provisioned node), and another GPU model
        baseline("base-other-cpu", 1.0, cpu="CPU B", started="2026-12-02T10:00:00Z"),
        baseline("base-gpu-b", 1.0, gpus=["GPU B"], started="2026-12-02T10:00:00Z"),
        shared_cell("here"), shared_cell("new-cpu", cpu="CPU C"), shared_cell("gpu-a", gpus=["GPU A"]),
        shared_cell("other-host", host="h2"),
    ])
    got = dict(fetch(db, "SELECT run_id, max(speedup) FROM speedup WHERE strategy = 'speculative' GROUP BY run_id"))
    assert got == {"here": 1.5, "new-cpu": None, "gpu-a": None, "other-host": None}
    assert set(fetch(db, "SELECT DISTINCT baseline_run_id FROM speedup WHERE run_id = 'here'")) == {("base-here",)}


def test_llamacpp_cells_are_compared_with_llamacpp_plain_decoding(tmp_path):
    """A llama.cpp cell pairs with llamacpp-generate (same GGUF and threads); shared, it takes the latest
    llamacpp-generate run with its weights and threads on the machine, never our baseline."""
    assert store_baseline("llamacpp-suffix") == "llamacpp-generate" and store_baseline("hf-assisted") == "baseline"
    assert is_plain_baseline("llamacpp-generate") and is_plain_baseline("baseline")
    assert not is_plain_baseline("hf-generate")  # transformers' cells compare with ours, as before

    def llama(doc_or_run, strategy, k=4, threads=2):
        params = doc_or_run["params"]
        params.update(strategy=strategy, k=k, draft=None, weights="gguf-Q4_1", threads=threads)
        return doc_or_run

    paired = paired_file("lc", CELL, PAIR)
    llama(paired["run"], "llamacpp-specdec-ngram")
    llama(paired["paired_baseline"]["run"], "llamacpp-generate", k=None)

    def plain(run_id, strategy, tps, threads=2, started="2026-12-01T10:00:00Z"):
        doc = {"format": "specdec-result/2", "run": run(run_id, "baseline", started=started),
               "measurements": rows({k: tps for k in CELL})}
        if strategy != "baseline":
            llama(doc["run"], strategy, k=None, threads=threads)
        return doc

    shared = {"format": "specdec-result/2", "measurements": rows({k: 30.0 for k in CELL}),
              "run": llama(run("lc-shared", "baseline", mode="shared"), "llamacpp-suffix")}
    db = store(tmp_path, [paired, shared, plain("ours", "baseline", 100.0),
                          plain("llama-2", "llamacpp-generate", 60.0),
                          plain("llama-1", "llamacpp-generate", 10.0, threads=1, started="2026-12-02T10:00:00Z")])
    got = fetch(db, "SELECT run_id, prompt_id, \"repeat\", speedup, baseline_source, baseline_run_id, engine "
                    "FROM speedup WHERE run_id IN ('lc', 'lc-shared') ORDER BY ALL")
    assert got[:3] == [("lc", "p1", 0, 1.5, "paired", "lc-base", "llamacpp"),
                       ("lc", "p1", 1, 1.5, "paired", "lc-base", "llamacpp"),
                       ("lc", "p2", 0, 2.0, "paired", "lc-base", "llamacpp")]
    assert {row[3:6] for row in got if row[0] == "lc-shared"} == {(0.5, "shared", "llama-2")}
    # the llama.cpp plain decoding cells are baselines of their own, beside ours
    assert fetch(db, "SELECT strategy, threads, round(speedup_median, 6) FROM cell_summary "
                     "WHERE strategy IN ('baseline', 'llamacpp-generate') ORDER BY ALL") == [
        ("baseline", None, 1.0), ("llamacpp-generate", 1, 1.0), ("llamacpp-generate", 2, 1.0)]
    # a paired baseline of the wrong engine is refused
    bad = json.loads(json.dumps(paired))
    bad["paired_baseline"]["run"]["params"]["strategy"] = "baseline"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ResultFileError, match="paired_baseline.run.params.strategy: must be 'llamacpp-generate'"):
        load_result_file(path)


def test_paired_baseline_is_validated(tmp_path):
    doc = paired_file("cell", CELL, PAIR)
    for mutate, message in (
        (lambda d: d["paired_baseline"]["run"].update(paired_with="someone-else"),
         "paired_baseline.run.paired_with: must be the cell's run_id"),
        (lambda d: d["paired_baseline"]["run"]["params"].update(strategy="ngram"),
         "paired_baseline.run.params.strategy: must be 'baseline'"),
        (lambda d: d["paired_baseline"]["measurements"][0].update(tokens_per_s="fast"),
         "paired_baseline.measurements[0].tokens_per_s"),
        (lambda d: d.update(format="specdec-result/1"), "paired_baseline: needs format 'specdec-result/2'"),
    ):
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ResultFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_result_file(path)


def test_a_store_from_before_pairing_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    import sqlalchemy as sa

    from specdec.db.schema import Base
    from specdec.db.store import engine_for

    # the tables as a store written before this change had them: no pairing or noise columns, no thresholds
    new = {"runs": {"baseline_mode", "paired_with", "load_avg", "other_cpu_cores", "steal_share",
                    "gpu_other_processes", "baseline_spread", "noise_samples"}, "measurements": {"decode_index"}}
    old = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        if table.name not in ("noise_thresholds", "median_ci_ranks"):
            sa.Table(table.name, old, *(c._copy() for c in table.columns if c.name not in new.get(table.name, ())))
    db = tmp_path / "old.duckdb"
    engine = engine_for(db)
    with engine.begin() as conn:
        old.create_all(conn)
        conn.exec_driver_sql("INSERT INTO runs (run_id, started_utc, status, host, target, strategy, gpus, "
                             "temperature, top_p, top_k, max_new_tokens, params_json, result_file, ingested_utc) "
                             "VALUES ('old-run', '2026-11-01', 'ok', 'h1', 't', 'baseline', 0, 0, 1, 0, 8, '{}', "
                             "'old.json', '2026-11-01')")
        conn.exec_driver_sql("INSERT INTO measurements (run_id, prompt_id, \"repeat\", status, tokens_per_s) "
                             "VALUES ('old-run', 'p1', 0, 'ok', 20.0)")
    engine.dispose()
    assert "paired_with" not in {c for (c,) in fetch(db, "SELECT column_name FROM information_schema.columns "
                                                         "WHERE table_name = 'runs'")}
    path = tmp_path / "new.json"
    path.write_text(json.dumps(paired_file("cell", CELL, PAIR)))
    ingest(db, [path])
    assert fetch(db, "SELECT run_id, paired_with FROM runs ORDER BY run_id") == [
        ("cell", None), ("cell-base", "cell"), ("old-run", None)]
    assert fetch(db, "SELECT tokens_per_s, decode_index FROM measurements WHERE run_id = 'old-run'") == [(20.0, None)]
    assert fetch(db, "SELECT count(*) FROM noise_thresholds") == [(4,)]
    assert fetch(db, "SELECT count(*) FROM median_ci_ranks") == [(200,)]


# --- the bootstrap interval --------------------------------------------------------------------------------------

def interval(tmp_path, speedups: list[float], name: str) -> tuple:
    """cell_summary's median and interval for a paired cell whose per-pair speedups are `speedups`."""
    cell = {(f"p{i}", 0): 10.0 * s for i, s in enumerate(speedups)}
    folder = tmp_path / name
    folder.mkdir()
    db = store(folder, [paired_file("cell", cell, {k: 10.0 for k in cell})])
    return fetch(db, "SELECT speedup_median, speedup_ci_low, speedup_ci_high FROM cell_summary")[0]


def spread_values(n: int) -> list[float]:
    """n speedups spread evenly over 0.8-1.2 (a fixed, known sample: median 1.0)."""
    return [0.8 + 0.4 * (i + 0.5) / n for i in range(n)]


def test_bootstrap_interval_contains_the_median_narrows_with_n_and_is_deterministic(tmp_path):
    median16, low16, high16 = interval(tmp_path, spread_values(16), "n16")
    median256, low256, high256 = interval(tmp_path, spread_values(256), "n256")
    assert median16 == pytest.approx(1.0) and median256 == pytest.approx(1.0)
    assert 0.8 <= low16 < 1.0 < high16 <= 1.2 and low256 < 1.0 < high256
    # the width falls like 1/sqrt(n): 16x the pairs, a quarter of the width (well under half); n = 256 is past the
    # exact rank table, so this also runs the normal approximation
    assert high256 - low256 < 0.5 * (high16 - low16)
    # the same rows give the same interval, in a fresh store too
    assert interval(tmp_path, spread_values(16), "n16-again") == (median16, low16, high16)
    # identical ratios: no uncertainty; a single pair: no interval
    assert interval(tmp_path, [1.3] * 5, "flat")[1:] == pytest.approx((1.3, 1.3))
    assert interval(tmp_path, [1.3], "one")[1:] == (None, None)


def test_exact_bootstrap_ranks_match_resampling_and_the_sql_approximation():
    """The interval ends db/bootstrap.py derives in closed form equal a (seeded) Monte Carlo percentile bootstrap of
    the median for odd n, and are no narrower for even n; above MAX_EXACT the store's normal approximation is
    within one rank of exact."""
    import numpy as np

    from specdec.db import bootstrap

    rng = np.random.default_rng(0)
    for n in (5, 9, 16, 31):
        x = np.sort(rng.lognormal(size=n))
        medians = np.median(x[rng.integers(0, n, (100_000, n))], axis=1)
        mc_low, mc_high = np.quantile(medians, [0.025, 0.975], method="inverted_cdf")
        a_lo, b_lo, a_hi, b_hi = bootstrap.median_ci_ranks(n)
        low, high = (x[a_lo - 1] + x[b_lo - 1]) / 2, (x[a_hi - 1] + x[b_hi - 1]) / 2
        if n % 2:
            assert (low, high) == (mc_low, mc_high)
        else:
            assert low <= mc_low and mc_high <= high
    for n in range(bootstrap.MAX_EXACT + 1, bootstrap.MAX_EXACT + 400, 37):
        for r in ((n + 1) // 2, n // 2 + 1):
            for q, z in ((0.025, -1.959964), (0.975, 1.959964)):
                assert abs(bootstrap.approx_rank(n, r, z) - bootstrap.quantile_rank(n, r, q)) <= 1
