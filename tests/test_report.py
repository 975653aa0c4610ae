"""`specdec report` on the fixture store (tests/dashboard_fixture.py): the leaderboard's numbers equal what SQL on
the store's views gives (and, where the fixture fixes them by construction, the known numbers), the figures are
drawn from the same data, the files are self-contained, filters select runs, and errors are one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dashboard_fixture import BEST, MISMATCH, PROMPT_FACTOR, TARGET, build_fixture_db, make_result, write_results
from specdec.cli import main as cli_main
from specdec.db import report
from specdec.db.query import run_query
from specdec.db.store import ingest

KEY = ["host", "target", "draft", "strategy", "draft_length", "gpus", "temperature"]
SPEC_BENCH_PROMPTS = [("81", "multi-turn"), ("161", "translation"), ("241", "summarization"), ("321", "qa"),
                      ("401", "math_reasoning"), ("481", "rag")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_fixture_db(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def built(store):
    return report.collect(store)


def sql(db: Path, text: str) -> pd.DataFrame:
    return run_query(text, db)


def by_key(df: pd.DataFrame, value: str, key=("method", "draft", "k", "host", "gpus", "temperature")) -> dict:
    return {tuple(None if pd.isna(v) else v for v in row[:-1]): row[-1]
            for row in df[list(key) + [value]].itertuples(index=False)}


def test_overall_speedup_and_losslessness_are_cell_summary(store, built):
    board = built.leaderboard
    cells = sql(store, "SELECT * FROM cell_summary").rename(columns={"strategy": "method", "draft_length": "k"})
    assert len(board) == len(cells) == 13  # 9 drafting cells + 4 baselines; the failed run has no ok row
    expected = by_key(cells, "speedup_median")
    assert by_key(board, "overall") == pytest.approx(expected)
    assert by_key(board, "share_identical") == pytest.approx(by_key(cells, "match_share"), nan_ok=True)
    for store_column, column in (("speedup_ci_low", "overall low"), ("speedup_ci_high", "overall high")):
        if store_column in cells:  # the store's intervals (issue 13), when this store has them
            assert by_key(board, column) == pytest.approx(by_key(cells, store_column), nan_ok=True)
        else:
            assert column not in board
    for store_column, column in (("speedup_median_clean", "speedup_clean"), ("degenerate_share", "degenerate_share")):
        if store_column in cells:  # non-degenerate figures (issue 19), when this store has them
            assert by_key(board, column) == pytest.approx(by_key(cells, store_column), nan_ok=True)
    best = board.iloc[0]  # fastest first
    assert (best.method, best.draft, best.k, best.overall) == (BEST["strategy"], BEST["draft"], BEST["k"],
                                                                pytest.approx(BEST["speedup"]))
    assert board.method.tolist()[-4:] == ["baseline"] * 4  # baselines last, as Spec-Bench's vanilla row
    mismatch = board[(board.method == MISMATCH["strategy"]) & (board.k == MISMATCH["k"])].iloc[0]
    assert (mismatch.share_identical, mismatch.compared) == (pytest.approx(7 / 8), 8)


def test_category_columns_and_mean_accepted_tokens_match_sql(store, built):
    board = built.leaderboard
    assert built.leaderboard.attrs["categories"] == ["summarisation", "code"]  # Spec-Bench's order, then others
    per_cat = sql(store, """SELECT strategy AS method, draft, draft_length AS k, host, gpus, temperature, category,
                                   median(speedup) AS speedup
                            FROM speedup GROUP BY ALL""")
    for cat in ("summarisation", "code"):
        assert by_key(board, cat) == pytest.approx(by_key(per_cat[per_cat.category == cat], "speedup"))
    # by construction: summarisation prompts run at 0.7x and 1.5x of the cell's speed (median 1.1x), code at
    # 0.95x and 1.05x (median 1.0x)
    best = board.iloc[0]
    factors = [PROMPT_FACTOR[p] for p in ("sum-01", "sum-02")]
    assert best.summarisation == pytest.approx(BEST["speedup"] * sum(factors) / 2)
    assert best.code == pytest.approx(BEST["speedup"])
    mat = sql(store, """SELECT r.strategy AS method, r.draft, CASE WHEN r.strategy = 'baseline' THEN NULL ELSE r.k END
                               AS k, r.host, r.gpus, r.temperature,
                               sum(m.new_tokens) / sum(m.target_forward_passes) AS mat
                        FROM measurements m JOIN runs r USING (run_id) WHERE m.status = 'ok' GROUP BY ALL""")
    assert by_key(board, "mean_accepted_tokens") == pytest.approx(by_key(mat, "mat"))


def test_acceptance_per_position_is_summed_counts(store, built):
    rows = sql(store, """SELECT m.accepted_per_position AS acc, m.proposed_per_position AS prop
                         FROM measurements m JOIN runs r USING (run_id)
                         WHERE r.strategy = 'speculative' AND r.k = 8 AND m.status = 'ok'""")
    acc = [sum(x) for x in zip(*(json.loads(a) for a in rows.acc))]
    prop = [sum(x) for x in zip(*(json.loads(p) for p in rows.prop))]
    curve = built.acceptance[(built.acceptance.strategy == "speculative") & (built.acceptance.draft_length == 8)]
    assert curve.position.tolist() == list(range(1, 9))
    assert curve.acceptance.tolist() == pytest.approx([a / p for a, p in zip(acc, prop)])


def test_provenance_names_machines_versions_and_commits(store, built):
    p = built.provenance
    assert set(p.host) == {"lab-a", "lab-b"} and set(p.git_commit) == {"abc1234", "def5678"}
    assert p.runs.sum() == sql(store, "SELECT count(*) AS n FROM runs").n[0]
    assert set(p.cpu_name) == {"Synthetic CPU"} and set(p.torch_version) == {"2.13.0+cpu"}
    shown = report.provenance_table(built)
    assert set(shown.commit) == {"abc1234", "def5678"} and "Synthetic GPU, Synthetic GPU" in set(shown.GPUs)
    assert set(shown.software) == {"specdec 0.1.0, torch 2.13.0+cpu, transformers 5.23.0, Python 3.11.7"}
    assert p.failed_runs.sum() == 1


def test_files_are_written_and_self_contained(store, built, tmp_path):
    written = report.write_report(built, tmp_path)
    # the batch-size figure is drawn only for series measured at two or more batch sizes (tests/test_workflow.py)
    drawn = [name for name in report.FIGURES if name != "speedup-vs-batch-size.svg"]
    assert {p.name for p in written} == {"report.md", "report.html", "leaderboard.csv", *drawn}
    md = (tmp_path / "report.md").read_text()
    for name in drawn:  # figures linked from the Markdown, and real SVG
        assert f"]({name})" in md and (tmp_path / name).read_text().lstrip().startswith("<svg")
    best = built.table.iloc[0]
    assert f"| {BEST['strategy']} | {BEST['draft']} | {BEST['k']} |" in md and best.overall in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 2 and "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from a network
    assert all(c in page for c in ("Leaderboard", "Provenance", "abc1234", "Synthetic CPU"))
    csv = pd.read_csv(tmp_path / "leaderboard.csv")
    assert csv.overall.tolist() == pytest.approx(built.leaderboard.overall.tolist())


def test_spec_bench_categories_in_leaderboard_order(tmp_path):
    """A Spec-Bench run: six columns in its leaderboard's order, multi-turn first; --prompts selects those runs."""
    results = []
    for strategy, speed in (("baseline", 1.0), ("ngram", 1.4)):
        res = make_result(host="lab-s", target=TARGET, draft=None, strategy=strategy,
                          k=None if strategy == "baseline" else 3, speed=speed, alpha=0.5,
                          prompts=list(reversed(SPEC_BENCH_PROMPTS)))
        res["run"]["params"]["prompts_file"] = "data/spec_bench/question.jsonl"
        results.append(res)
    db = tmp_path / "s.duckdb"
    ingest(db, write_results(results + [make_result(host="lab-s", target=TARGET, draft=None, strategy="baseline",
                                                    k=None)], tmp_path / "results"))
    r = report.collect(db, report.ReportFilters(prompts=("question.jsonl",)))
    assert r.leaderboard.attrs["categories"] == [c for _, c in SPEC_BENCH_PROMPTS]
    assert r.leaderboard.method.tolist() == ["ngram", "baseline"]
    assert r.leaderboard.iloc[0].overall == pytest.approx(1.4)
    header = report.markdown_table(r.table).splitlines()[0]
    assert header.index("multi-turn") < header.index("translation") < header.index("rag")


def test_filters_select_runs(store, tmp_path):
    assert set(report.collect(store, report.ReportFilters(host=("lab-b",))).leaderboard.method) == \
        {"speculative", "baseline"}
    only = report.collect(store, report.ReportFilters(strategy=("ngram",), temperature=(0.0,))).leaderboard
    assert only.method.tolist() == ["ngram", "ngram"] and only.k.tolist() == [4, 2]
    assert report.collect(store, report.ReportFilters(draft=("",))).leaderboard.draft.isna().all()
    # a workflow tag is the results folder results/<tag>/<host>/
    tagged = tmp_path / "tagged.duckdb"
    shutil.copy(store, tagged)
    files = write_results([make_result(host="lab-c", target=TARGET, draft=None, strategy="baseline", k=None),
                           make_result(host="lab-c", target=TARGET, draft=None, strategy="ngram", k=2, speed=1.1,
                                       alpha=0.3)], tmp_path / "results" / "nightly" / "lab-c")
    ingest(tagged, files)
    board = report.collect(tagged, report.ReportFilters(tag=("nightly",))).leaderboard
    assert board.method.tolist() == ["ngram", "baseline"] and "host" not in board  # one host: no host column


def test_cli_writes_the_report_and_errors_are_one_line(store, tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli_main(["report", "--db", str(store), "--out", str(out), "--host", "lab-a"]) == 0
    assert "report.html" in capsys.readouterr().out and (out / "report.html").is_file()
    assert "Filters: host = lab-a" in (out / "report.md").read_text()
    for argv, message in ((["--host", "nowhere"], "no successful measurement in runs matching host = nowhere"),
                          (["--db", str(tmp_path / "none.duckdb")], "no results store at")):
        code = cli_main(["report", "--db", str(store), "--out", str(out), *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and "\n" not in err


def test_weight_formats_are_rows_of_their_own_and_each_engine_has_its_baseline(tmp_path):
    """Cells that differ only in weight format (or threads) are separate rows with the format shown; llama.cpp's
    plain decoding is listed with the baselines, last."""
    def result(strategy, weights, speed, k=3, threads=2):
        res = make_result(host="lab-w", target=TARGET, draft=None, strategy=strategy, k=k, speed=speed,
                          alpha=0.5 if k else None)
        res["run"]["params"].update(weights=weights, threads=threads)
        return res

    results = [result("baseline", "float32", 1.0, k=None), result("baseline", "int4", 1.0, k=None),
               result("ngram", "float32", 1.2), result("ngram", "int4", 1.6),
               result("llamacpp-generate", "gguf-Q4_1", 1.0, k=None)]
    db = tmp_path / "w.duckdb"
    ingest(db, write_results(results, tmp_path / "results"))
    board = report.collect(db).leaderboard
    assert [(m, w) for m, w in zip(board.method, board.weights)][:2] == [("ngram", "int4"), ("ngram", "float32")]
    assert board.overall.tolist()[:2] == pytest.approx([1.6, 1.2])  # each over plain decoding in its own format
    assert sorted(board.method.tolist()[2:]) == ["baseline", "baseline", "llamacpp-generate"]
    assert "threads" not in board and board.attrs["constant"]["threads"] == 2


def test_intervals_noise_and_degenerate_columns_are_used_when_the_store_has_them(store, tmp_path):
    """Stand-ins for the store's median_ci macro, run_noise view and degenerate flag (issues 13 and 19): the report
    takes its intervals, noise flags and non-degenerate speedups from them, and marks noisy rows."""
    import duckdb

    db = tmp_path / "features.duckdb"
    shutil.copy(store, db)
    con = duckdb.connect(str(db))
    con.execute("CREATE OR REPLACE MACRO median_ci(vals) AS [list_min(vals), list_max(vals)]")
    con.execute("""CREATE OR REPLACE VIEW run_noise AS SELECT run_id, host = 'lab-b' AS noisy,
                   CASE WHEN host = 'lab-b' THEN 'other processes used 1.5 of 2 cores' END AS noise_reason FROM runs""")
    if "degenerate" not in con.execute("SELECT * FROM speedup LIMIT 0").df().columns:
        definition = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'speedup'").fetchone()[0]
        con.execute(definition.replace("CREATE VIEW speedup AS", "CREATE VIEW speedup_plain AS", 1))
        con.execute("CREATE OR REPLACE VIEW speedup AS SELECT *, prompt_id = 'sum-02' AS degenerate FROM speedup_plain")
    con.close()
    r = report.collect(db)
    assert r.features == {"ci": True, "noise": True, "degenerate": True, "formats": True, "batch": True}
    spread = sql(db, """SELECT strategy AS method, draft, draft_length AS k, host, gpus, temperature,
                               min(speedup) AS lo, max(speedup) AS hi FROM speedup GROUP BY ALL""")
    assert by_key(r.leaderboard, "overall low") == pytest.approx(by_key(spread, "lo"))
    assert by_key(r.leaderboard, "overall high") == pytest.approx(by_key(spread, "hi"))
    assert set(r.table[r.table.noise == "noisy"].host) == {"lab-b"} and set(r.table.noise) == {"noisy", "quiet"}
    assert "Noisy: speculative ← smollm2-draft k=4 (host lab-b, gpus 1, temperature 0.0): other processes used 1.5 " \
        "of 2 cores." in report.notes(r.features, r.leaderboard)
    best = r.table.iloc[0]
    assert re.fullmatch(r"2\.00× \(\d\.\d\d–\d\.\d\d\)", best.overall), best.overall
    assert "overall, non-degenerate" in r.table and "summarisation low" in r.leaderboard
    page = report.render_html(r)
    assert page.count('<tr class="noisy">') == 2  # lab-b's speculative and baseline rows


def test_speedup_vs_batch_size_draws_each_series_over_its_batch_sizes_and_names_the_crossover():
    """Series measured at several batch sizes become one line each; B* from the intervals: the largest batch size
    whose interval lies above 1, the smallest whose interval lies below 1; baselines and single sizes left out."""
    rows = [("ngram", 4, b, s, lo, hi) for b, s, lo, hi in
            ((1, 1.5, 1.3, 1.7), (2, 1.3, 1.1, 1.4), (4, 1.05, 0.95, 1.2), (8, 0.8, 0.7, 0.9), (16, 0.6, 0.5, 0.7))]
    rows += [("suffix", 4, 1, 1.2, 1.1, 1.3), ("baseline", None, 1, 1.0, 0.9, 1.1), ("baseline", None, 2, 1.0, 0.9,
                                                                                    1.1)]
    cells = pd.DataFrame([{"host": "h", "target": "t", "draft": None, "strategy": st, "draft_length": k, "gpus": 0,
                           "temperature": 0.0, "batch_size": b, "speedup": s, "ci_low": lo, "ci_high": hi,
                           "speedup_p25": lo, "speedup_p75": hi} for st, k, b, s, lo, hi in rows])
    d = report.batch_frame(cells)
    assert set(d.strategy) == {"ngram"} and sorted(d.batch_size) == [1, 2, 4, 8, 16]
    assert report.crossovers(d) == {"t · ngram · k=4": (2, 8)}
    chart, band = report.batch_chart(d)
    assert band == "95 % interval of the median"
    assert report.to_svg(chart).lstrip().startswith("<svg")
    assert report.batch_frame(cells[cells.batch_size == 1]).empty  # one batch size: nothing to draw


def test_a_store_with_hostile_names_renders_everywhere(tmp_path, capsys):
    """A host, strategy, category and CPU name with ESC, a newline, HTML and Markdown image syntax (written to the
    store directly, as ingest refuses them): the report is written (vl-convert used to abort on the ESC with exit
    134), no file carries a control character or the raw markup, and `specdec query`'s table shows escapes."""
    from dashboard_fixture import HOSTILE, build_hostile_db
    from specdec.db.query import main_query

    db = build_hostile_db(tmp_path)
    out = tmp_path / "report"
    assert report.main(["--db", str(db), "--out", str(out)]) == 0
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    svgs = [p.read_text() for p in out.glob("*.svg")]
    assert len(svgs) == 2
    for text in [md, page, *svgs, (out / "leaderboard.csv").read_text()]:
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", text)
    for text in [page, *svgs]:  # HTML and SVG: markup escaped (Markdown's link syntax is plain text there)
        assert "<img" not in text
    assert not re.search(r"(?<!\\)(<img|\]\(http)", md)  # Markdown: only backslash-escaped, shown as text
    assert r"evil\\x1b\[2J\<img src=x onerror=alert(1)\>\\n!\[x\](http://example.invalid/x.png)\|\\u202e" in md
    assert "evil\\x1b[2J&lt;img src=x onerror=alert(1)&gt;" in page
    capsys.readouterr()
    sql = "SELECT DISTINCT host, strategy FROM runs ORDER BY ALL"
    assert main_query([sql, "--db", str(db)]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\u202e" not in shown and HOSTILE not in shown
    rows = len(run_query(sql, db))
    assert shown.count("\n") == rows + 2  # header, one line per row (no row broken by its newline), the count


def test_serving_chart_draws_tpot_with_intervals_and_throughput_per_kind():
    d = pd.DataFrame([{"concurrency": c, "series": f"speculation {kind}", "tpot_ms": t, "tpot_ci_low_ms": t - 1,
                       "tpot_ci_high_ms": t + 1, "throughput_tok_s": 40.0 * c / t}
                      for kind, base in (("off", 20.0), ("ngram", 15.0)) for c, t in ((1, base), (4, base * 2))])
    spec = report.serving_chart(d).to_dict()
    assert [panel["title"] for panel in spec["hconcat"]] == ["Time per output token", "Throughput"]
    marks = [layer["mark"]["type"] for layer in spec["hconcat"][0]["layer"]]
    assert marks == ["errorbar", "line"]
    svg = report.to_svg(report.serving_chart(d))
    assert svg.lstrip().startswith("<svg") and "speculation ngram" in svg and "concurrent requests" in svg
    assert report.serving_chart(d.iloc[0:0]) is None
