"""The dashboard under Streamlit's AppTest: every page runs on the fixture store (tests/dashboard_fixture.py) without
raising, and the figures it shows equal the ones computed in SQL from the store's views (and, where the fixture
fixes them by construction, the known numbers). Also: the empty-store page, URL filters, the SQL console's
refusals and limits, cache refresh after an ingest, and the page shown while an ingest holds the file.
"""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from dashboard_fixture import (BEST, C_RATIO, HOSTILE, MISMATCH, PROMPT_FACTOR, TARGET, build_fixture_db,
                               build_hostile_db, leviathan, make_result, write_results)
from specdec.dashboard import launch
from specdec.dashboard import queries as q
from specdec.dashboard.pages import FILL_COMMANDS, PAGES
from specdec.db import report
from specdec.db.query import run_query
from specdec.db.store import ingest, init_db
from specdec.strategies import STRATEGIES

APP = str(Path(q.__file__).with_name("app.py"))
CELL_KEY = ["host", "target", "draft", "strategy", "draft_length", "gpus", "temperature"]


@pytest.fixture(scope="module")
def fixture_db(tmp_path_factory) -> Path:
    return build_fixture_db(tmp_path_factory.mktemp("dashboard"))


@pytest.fixture
def store(fixture_db, monkeypatch) -> Path:
    """The fixture store, selected the way a user does without --db: $SPECDEC_DB."""
    monkeypatch.setenv("SPECDEC_DB", str(fixture_db))
    return fixture_db


def sql(db: Path, text: str) -> pd.DataFrame:
    """The expected figures, through the same read-only path `specdec query` uses."""
    return run_query(text, db)


def run_page(page: str | None = None, **params) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    if page:
        at.query_params["page"] = page
    for name, value in params.items():
        at.query_params[name] = value
    at.run()
    assert not at.exception, at.exception[0].value
    return at


def url(at: AppTest, name: str) -> list[str]:
    """The values of one query parameter of the app's URL (AppTest keeps a single value as a plain string)."""
    value = at.query_params.get(name, [])
    return [value] if isinstance(value, str) else list(value)


def charts(at: AppTest) -> list:
    return at.get("vega_lite_chart")


def chart_frames(chart) -> list[pd.DataFrame]:
    """The data a Vega-Lite chart was sent with (Arrow IPC per dataset)."""
    return [pa.ipc.open_stream(io.BytesIO(d.data.data)).read_all().to_pandas() for d in chart.proto.datasets]


def frame_with(at: AppTest, *columns: str) -> pd.DataFrame:
    """The first table on the page that has all `columns`."""
    for df in at.dataframe:
        if set(columns) <= set(df.value.columns):
            return df.value
    raise AssertionError(f"no table with columns {columns}; tables: {[list(d.value.columns) for d in at.dataframe]}")


def rounded(rows, digits: int = 9) -> list:
    """Rows (tuples) or single values, floats rounded (medians carry float noise), sorted: order-free comparison."""
    fix = lambda v: round(v, digits) if isinstance(v, float) else v  # noqa: E731
    return sorted(tuple(fix(v) for v in row) if isinstance(row, tuple) else fix(row) for row in rows)


# ---------------------------------------------------------------------------------------------- every page

@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_runs_without_error(store, page):
    at = run_page(page)
    assert not at.error, [e.value for e in at.error]
    assert at.header[0].value == {"predicted": "Predicted vs measured speedup",
                                  "scaling": "Scaling with GPU count",
                                  "batch": "Speedup vs batch size",
                                  "sql": "SQL console"}.get(page, PAGES[page][0])
    assert url(at, "page") == [page]  # the page is in the URL
    if page not in ("overview", "leaderboard", "runs", "sql", "batch"):
        assert charts(at), f"{page} draws no chart"
    if page == "batch":  # the fixture measures one batch size: the page says how to get a second
        assert "batch_sizes: [1, 4]" in at.info[0].value


def test_pages_with_nothing_to_show_say_so(tmp_path, monkeypatch):
    """Only a failed run in the store, or filters that match nothing: every page explains, none raises."""
    db = tmp_path / "failed.duckdb"
    ingest(db, write_results([make_result(host="h", target=TARGET, draft=None, strategy="baseline", k=None,
                                          failed="weights not found")], tmp_path / "results"))
    monkeypatch.setenv("SPECDEC_DB", str(db))
    for page in PAGES:
        at = run_page(page)
        assert not at.error, (page, [e.value for e in at.error])
        if page not in ("runs", "sql"):
            assert "in the store yet" in at.info[0].value, page
    monkeypatch.setenv("SPECDEC_DB", str(build_fixture_db(tmp_path / "fx")))
    at = run_page("speedup", strategy="baseline")  # a baseline has no draft length
    assert "match the sidebar filters" in at.info[0].value


def test_overview_headline_is_the_best_cell_in_sql(store):
    at = run_page("overview")
    best = sql(store, """SELECT * FROM cell_summary WHERE draft_length IS NOT NULL AND speedup_median IS NOT NULL
                         ORDER BY speedup_median DESC LIMIT 1""").iloc[0]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Best speedup"] == f"{best.speedup_median:.2f}×" == f"{BEST['speedup']:.2f}×"
    assert metrics["Pair (target ← draft)"] == f"{best.target} ← {best.draft}" \
        == f"{BEST['target']} ← {BEST['draft']}"
    assert metrics["Strategy"] == best.strategy == BEST["strategy"]
    assert metrics["Draft length k"] == str(int(best.draft_length)) == str(BEST["k"])
    assert metrics["Acceptance rate"] == f"{best.acceptance_rate_median:.1%}" == f"{BEST['acceptance']:.1%}"
    predicted = leviathan(BEST["acceptance"], BEST["k"], C_RATIO)
    assert metrics["Predicted (Leviathan)"] == f"{predicted:.2f}×"
    assert metrics["Runs in store"] == str(sql(store, "SELECT count(*) AS n FROM runs").n[0])


def test_overview_best_k_table_matches_cell_summary(store):
    table = frame_with(run_page("overview"), "pair", "strategy", "best_k", "speedup")
    expected = sql(store, """
        SELECT strategy, arg_max(draft_length, speedup_median) AS best_k, max(speedup_median) AS speedup
        FROM cell_summary WHERE draft_length IS NOT NULL AND speedup_median IS NOT NULL
        GROUP BY host, target, draft, strategy, gpus, temperature, top_p, top_k, max_new_tokens""")
    assert rounded(table[["strategy", "best_k", "speedup"]].itertuples(index=False)) == \
        rounded(expected.itertuples(index=False))
    assert len(table) == 6  # speculative x (lab-a 1 GPU, 2 GPUs, T=0.7, lab-b), ngram, hf-assisted


def test_speedup_page_matches_cell_summary(store):
    at = run_page("speedup")
    table = frame_with(at, "draft_length", "speedup", "speedup_p25", "speedup_p75", "n")
    expected = sql(store, """SELECT draft_length, speedup_median, speedup_p25, speedup_p75, n_measurements
                             FROM cell_summary WHERE draft_length IS NOT NULL""")
    assert rounded(table[["draft_length", "speedup", "speedup_p25", "speedup_p75", "n"]].itertuples(index=False)) \
        == rounded(expected.itertuples(index=False))
    # the chart: a line per series through the same medians, and the baseline rule at 1.0
    frames = chart_frames(charts(at)[0])
    lines = next(f for f in frames if "speedup" in f.columns)
    assert rounded(lines[["draft_length", "speedup"]].itertuples(index=False)) == \
        rounded(expected[["draft_length", "speedup_median"]].itertuples(index=False))
    assert any("y" in f.columns and f.y.tolist() == [1.0] for f in frames)


def test_acceptance_page_by_prompt_and_position(store):
    at = run_page("acceptance")
    by_prompt = frame_with(at, "prompt_id", "acceptance_rate", "mean_accepted_tokens")
    expected = sql(store, f"""
        SELECT {', '.join(CELL_KEY)}, prompt_id, median(acceptance_rate) AS acceptance_rate
        FROM speedup WHERE acceptance_rate IS NOT NULL GROUP BY ALL""")
    assert len(by_prompt) == len(expected)
    assert rounded(zip(by_prompt.prompt_id, by_prompt.acceptance_rate)) == \
        rounded(zip(expected.prompt_id, expected.acceptance_rate))
    # per position, for the best cell (α = 0.7 ± 0.05 by category, 10 steps per measurement, 2 repeats per prompt)
    position = next(f for c in charts(at) for f in chart_frames(c) if "position" in f.columns)
    best = position[(position.strategy == "speculative") & (position.draft_length == 4) & (position.host == "lab-a")
                     & (position.gpus == 1) & (position.temperature == 0.0)].sort_values("position")
    want = []
    for i in range(4):
        accepted = sum(2 * 2 * round(10 * (BEST["acceptance"] + shift) ** (i + 1)) for shift in (0.05, -0.05))
        want.append(accepted / (2 * 2 * 2 * 10))
    assert best.acceptance.round(12).tolist() == [round(w, 12) for w in want]


def test_category_filter_changes_acceptance(store):
    at = run_page("overview", category="code")
    assert {m.label: m.value for m in at.metric}["Acceptance rate"] == f"{BEST['acceptance'] - 0.05:.1%}"
    assert at.multiselect(key="filter_category").value == ["code"]


def test_predicted_page_uses_leviathan_on_cell_alpha_and_c(store):
    table = frame_with(run_page("predicted"), "draft_length", "predicted_speedup", "speedup", "acceptance_rate")
    cells = sql(store, """SELECT draft_length, acceptance_rate_median, cost_ratio_c_median, speedup_median
                          FROM cell_summary WHERE cost_ratio_c_median IS NOT NULL AND speedup_median IS NOT NULL""")
    expected = [(int(r.draft_length), leviathan(r.acceptance_rate_median, int(r.draft_length), r.cost_ratio_c_median),
                 r.speedup_median) for r in cells.itertuples()]
    shown = [(int(r.draft_length), r.predicted_speedup, r.speedup) for r in table.itertuples()]
    assert rounded(shown) == rounded(expected)


def test_latency_page_matches_cell_summary(store):
    table = frame_with(run_page("latency"), "cell", "tokens_per_s", "ttft_ms", "tpot_ms", "peak_memory_mib")
    expected = sql(store, "SELECT tokens_per_s_median FROM cell_summary")
    assert rounded(table.tokens_per_s) == rounded(expected.tokens_per_s_median)
    # fixture: time to first token 0.05 s × (1 + GPUs); peak memory 500 MiB, 600 with a draft model
    assert sorted(table.ttft_ms.round(6).unique()) == [100.0, 150.0]
    assert sorted(table.peak_memory_mib.unique()) == [500.0, 600.0]


def test_cost_per_million_tokens_appears_when_prices_are_set(tmp_path, monkeypatch):
    db = build_fixture_db(tmp_path)
    monkeypatch.setenv("SPECDEC_DB", str(db))
    assert "cost_per_mtok" not in frame_with(run_page("latency"), "cell", "tokens_per_s").columns
    ingest(db, [], prices={"Synthetic GPU": 3.6})  # $3.60 per GPU-hour
    table = frame_with(run_page("latency"), "cell", "tokens_per_s", "cost_per_mtok")
    expected = sql(db, "SELECT tokens_per_s_median, cost_per_mtok_median FROM cell_summary")
    assert rounded(zip(table.tokens_per_s, table.cost_per_mtok)) == \
        rounded(zip(expected.tokens_per_s_median, expected.cost_per_mtok_median))
    # the best cell: 1 GPU at 3.6/h, 40 tok/s × a per-prompt factor: 3.6 / (40 f × 3600) × 1e6 = 25 / f per million
    best = frame_with(run_page("overview"), "pair", "best_k", "cost_per_mtok").iloc[0]
    assert round(best.cost_per_mtok, 9) == round(25 * statistics.median(1 / f for f in PROMPT_FACTOR.values()), 9)


def test_scaling_page(store):
    at = run_page("scaling")
    table = frame_with(at, "series", "gpus", "speedup", "tokens_per_s")
    spec = table[table.series.str.contains("speculative · k=4 · lab-a · T=0.0")].sort_values("gpus")
    assert spec.gpus.tolist() == [1, 2] and spec.speedup.round(9).tolist() == [2.0, 1.9]
    assert spec.tokens_per_s.round(9).tolist() == [40.0, 57.0]
    # only the series measured at two GPU counts are drawn: the baseline and that speculative cell
    drawn = next(f for f in chart_frames(charts(at)[0]) if "series" in f.columns)
    assert drawn.series.nunique() == 2


def test_leaderboard_page_is_the_reports_table_with_csv(store):
    at = run_page("leaderboard")
    shown = frame_with(at, "method", "draft", "k", "summarisation", "code", "mean accepted tokens", "overall")
    assert shown.reset_index(drop=True).equals(report.collect(store).table)  # `specdec report`'s table, as text
    cells = sql(store, "SELECT speedup_median FROM cell_summary ORDER BY speedup_median DESC")
    medians = [text.split(" ")[0] for text in shown.overall]  # "2.00× (1.90–2.10)" when the store has intervals
    assert sorted(medians) == sorted(f"{v:.2f}×" for v in cells.speedup_median)
    assert medians[0] == f"{BEST['speedup']:.2f}×"
    assert [b.key for b in at.get("download_button")] == ["dl_leaderboard"]
    # the category filter keeps that column and computes the overall over its rows only
    code = frame_with(run_page("leaderboard", category="code"), "method", "overall")
    assert "summarisation" not in code and code.code.tolist() == code.overall.tolist()


def test_losslessness_page_lists_the_mismatch(store):
    at = run_page("losslessness")
    shares = frame_with(at, "cell", "share_identical", "compared", "mismatches")
    expected = sql(store, """SELECT match_share FROM cell_summary
                             WHERE strategy <> 'baseline' AND match_share IS NOT NULL""")
    assert rounded(shares.share_identical) == rounded(expected.match_share)
    assert shares.mismatches.sum() == 1
    mm = frame_with(at, "prompt_id", "repeat", "text", "baseline_text")
    assert len(mm) == 1
    row = mm.iloc[0]
    assert (row.prompt_id, row["repeat"], row.draft_length, row.strategy) == \
        (MISMATCH["prompt_id"], MISMATCH["repeat"], MISMATCH["k"], MISMATCH["strategy"])
    assert row.text.endswith("(diverged)") and row.baseline_text == f"output of {MISMATCH['prompt_id']}"
    assert at.subheader[0].value == "Mismatches (1)"


def test_runs_page_lists_provenance_and_failures(store):
    at = run_page("runs")
    runs = frame_with(at, "run_id", "git_commit", "host", "gpu_names", "torch_version", "started_utc")
    assert len(runs) == sql(store, "SELECT count(*) AS n FROM runs").n[0] == 14
    assert set(runs.git_commit) == {"abc1234", "def5678"}
    failures = frame_with(at, "run_id", "error", "measurements")
    assert failures.measurements.sum() == sql(store, "SELECT count(*) AS n FROM failures").n[0] == 8
    assert failures.error.tolist() == ["CUDA out of memory"]
    assert {b.key for b in at.get("download_button")} == {"dl_runs", "dl_failures"}


# ---------------------------------------------------------------------------------------------- SQL console

def console(query: str, limit: int | None = None, timeout: int | None = None) -> AppTest:
    at = run_page("sql")
    at.text_area(key="sql_text").set_value(query)
    if limit is not None:
        at.number_input(key="sql_limit").set_value(limit)
    if timeout is not None:
        at.number_input(key="sql_timeout").set_value(timeout)
    at.button[0].click()
    at.run()
    assert not at.exception, at.exception[0].value
    return at


def test_sql_console_runs_a_query_with_a_row_limit(store):
    at = run_page("sql")  # the example query runs on opening the page
    assert not at.error and len(at.dataframe[0].value) > 0
    at = console("SELECT run_id FROM measurements ORDER BY run_id", limit=3)
    assert len(at.dataframe[0].value) == 3
    assert any("row limit reached" in c.value for c in at.caption)
    at = console("SELECT count(*) AS n FROM failures")
    assert at.dataframe[0].value.n.tolist() == [8]


@pytest.mark.parametrize("query", [
    "DELETE FROM runs",
    "DROP VIEW speedup",
    "CREATE TABLE x AS SELECT 1",
    "ATTACH '/tmp/other.duckdb' AS other",
    "COPY runs TO '/tmp/runs.csv'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT 1; DELETE FROM runs",
])
def test_sql_console_refuses_writes_and_file_access(store, query):
    at = console(query)
    assert at.error and at.error[0].value.startswith("refused:"), [e.value for e in at.error]
    assert sql(store, "SELECT count(*) AS n FROM runs").n[0] == 14


def test_sql_console_time_limit_and_bad_sql_are_messages(store):
    at = console("SELECT count(*) FROM range(100000000000) a", timeout=1)
    assert at.error and "timed out after 1 s" in at.error[0].value
    at = console("SELECT no_such_column FROM runs")
    assert at.error and at.error[0].value.startswith("Query failed:") and "no_such_column" in at.error[0].value


# ---------------------------------------------------------------------------------------------- empty store

def fill_commands(at: AppTest) -> list[str]:
    return [c.value for c in at.code]


def test_missing_store_shows_the_commands_that_fill_it(tmp_path, monkeypatch):
    """$SPECDEC_DB names the store: `specdec ingest results/` writes there too, so the default commands fill it."""
    db = tmp_path / "nowhere" / "specdec.duckdb"
    monkeypatch.setenv("SPECDEC_DB", str(db))
    at = run_page()
    assert f"`{db}` does not exist yet" in at.warning[0].value
    assert fill_commands(at) == list(FILL_COMMANDS)
    assert not db.exists()  # looking must not create it


def test_default_store_path_when_nothing_is_chosen(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECDEC_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    at = run_page()
    assert "`results/specdec.duckdb` does not exist yet" in at.warning[0].value
    assert fill_commands(at) == list(FILL_COMMANDS)


def test_empty_store_chosen_with_db_flag_shows_its_own_ingest_command(tmp_path, monkeypatch):
    """`streamlit run dashboard/app.py -- --db PATH`: the default commands would fill another file, so the page
    adds the ingest command for this one."""
    db = tmp_path / "empty.duckdb"
    init_db(db)
    monkeypatch.delenv("SPECDEC_DB", raising=False)
    monkeypatch.setattr(sys, "argv", ["app.py", "--db", str(db)])
    at = run_page("speedup")
    assert "has no runs yet" in at.warning[0].value
    assert fill_commands(at) == [*FILL_COMMANDS, f"specdec ingest --db {db} results/"]


def test_fill_commands_are_real():
    """`specdec ingest results/` must be a valid command line of the ingest CLI (through the specdec entry point)."""
    from specdec import cli

    command = FILL_COMMANDS[1].split()
    assert command[0] == "specdec" and cli.command_index(command[1:]) == 0 and command[1] in cli.DELEGATED


# ---------------------------------------------------------------------------------------------- URL and filters

def test_url_filters_select_and_stale_values_are_ignored(store):
    at = run_page("overview", strategy="ngram", k=["4", "abc"], host="no-such-host")
    assert at.multiselect(key="filter_strategy").value == ["ngram"]
    assert at.multiselect(key="filter_k").value == [4]
    assert at.multiselect(key="filter_host").value == []
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Best speedup"] == "1.30×" and metrics["Strategy"] == "ngram"
    assert url(at, "k") == ["4"] and url(at, "host") == []  # the URL is cleaned up too


def test_widgets_write_filters_and_page_to_the_url(store):
    at = run_page("overview")
    at.multiselect(key="filter_gpus").set_value([2]).run()
    assert url(at, "gpus") == ["2"]
    assert {m.label: m.value for m in at.metric}["Best speedup"] == "1.90×"
    at.sidebar.radio(key="page").set_value("runs").run()
    assert url(at, "page") == ["runs"]
    assert len(frame_with(at, "run_id", "git_commit")) == 2  # the 2-GPU baseline and speculative runs
    at.multiselect(key="filter_gpus").set_value([]).run()
    assert url(at, "gpus") == []


# ---------------------------------------------------------------------------------------------- freshness

def test_new_runs_show_up_without_restarting(tmp_path, monkeypatch):
    """Cached queries are keyed on the file's mtime and size: an ingest while the dashboard is open shows up on
    the next rerun. The dashboard holds no connection between queries, or the ingest could not write."""
    db = build_fixture_db(tmp_path)
    monkeypatch.setenv("SPECDEC_DB", str(db))
    at = run_page("overview")
    assert {m.label: m.value for m in at.metric}["Best speedup"] == "2.00×"
    at.run()  # served from the cache: same figures
    assert {m.label: m.value for m in at.metric}["Best speedup"] == "2.00×"
    faster = make_result(host="lab-a", target=TARGET, draft="smollm2-draft", strategy="speculative", k=6, speed=3.0,
                         alpha=0.8)
    ingest(db, write_results([faster], tmp_path / "more"))
    at.run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Best speedup"] == "3.00×" and metrics["Draft length k"] == "6"
    assert metrics["Runs in store"] == "15"
    assert "6" in at.multiselect(key="filter_k").options


def test_store_from_an_older_version_shows_a_message(tmp_path, monkeypatch):
    """A store whose views lack a column the dashboard reads: one line saying so and how to rebuild, no traceback."""
    import duckdb

    db = build_fixture_db(tmp_path)
    with duckdb.connect(str(db)) as con:  # as if made before `cost_per_mtok` existed
        con.execute("CREATE TABLE old_speedup AS SELECT * EXCLUDE (cost_per_mtok) FROM speedup")
        con.execute("DROP VIEW cell_summary")
        con.execute("DROP VIEW speedup")
        con.execute("ALTER TABLE old_speedup RENAME TO speedup")
    monkeypatch.setenv("SPECDEC_DB", str(db))
    at = run_page("overview")
    assert "cost_per_mtok" in at.error[0].value and "made by an older specdec" in at.error[0].value


def test_store_being_written_shows_a_message(tmp_path, monkeypatch):
    """While an ingest holds DuckDB's write lock, readers cannot open the file: the page says so, no traceback."""
    db = build_fixture_db(tmp_path)
    monkeypatch.setenv("SPECDEC_DB", str(db))
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time\n"
                               f"con = duckdb.connect({str(db)!r})\nprint('locked', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        at = run_page("overview")
        assert at.warning and "being written" in at.warning[0].value
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------- display

def encodings(chart, channel: str) -> list[dict]:
    """Every `channel` encoding of a chart's spec, through layers and concatenations."""
    found, todo = [], [json.loads(chart.proto.spec)]
    while todo:
        spec = todo.pop()
        for key in ("layer", "hconcat", "vconcat"):
            todo.extend(spec.get(key, []))
        if channel in spec.get("encoding", {}):
            found.append(spec["encoding"][channel])
    return found


def series_colours(at: AppTest) -> dict[str, tuple]:
    """series label -> (colour domain, its place in it) for every series-coloured chart on the page: with the
    same domain and place, a series has the same colour."""
    out = {}
    for chart in charts(at):
        for enc in encodings(chart, "color"):
            if enc.get("field") in ("series", "strategy") and "domain" in enc.get("scale", {}):
                domain = enc["scale"]["domain"]
                shown = enc["legend"].get("values", domain)
                out.update({name: (tuple(domain), domain.index(name), tuple(enc["scale"].get("range", ())))
                            for name in shown})
    return out


def test_every_strategy_has_a_colour_of_its_own():
    colours = [strategy.color for strategy in STRATEGIES.values()]
    assert len(set(colours)) == len(colours), "two strategies would look like one series on the dashboard"


@pytest.mark.parametrize("page, narrow", [("speedup", {"strategy": "ngram"}),
                                          ("acceptance", {"strategy": ["ngram", "speculative"], "host": "lab-a"}),
                                          ("predicted", {"strategy": "ngram"}), ("scaling", {"strategy": "baseline"}),
                                          ("latency", {"strategy": ["ngram", "baseline"]})])
def test_a_series_keeps_its_label_and_colour_under_filters(store, page, narrow):
    whole, filtered = series_colours(run_page(page)), series_colours(run_page(page, **narrow))
    assert filtered and set(filtered) < set(whole)
    assert {name: whole[name] for name in filtered} == filtered


def test_legends_list_only_series_with_data(store):
    """hf-assisted has no per-position counts: it is in the colour domain (so colours stay put) but not listed."""
    at = run_page("acceptance")
    position = next(c for c in charts(at) if any("position" in f.columns for f in chart_frames(c)))
    colour = encodings(position, "color")[0]
    drawn = set(next(f for f in chart_frames(position) if "series" in f.columns).series)
    assert set(colour["legend"]["values"]) == drawn and not any("hf-assisted" in s for s in drawn)
    assert any("hf-assisted" in s for s in colour["scale"]["domain"])


def test_heatmap_labels_and_titles_fit(store):
    """Category names longer than their column are slanted, never dropped; legend titles wrap instead of being
    cut with "…"."""
    at = run_page("acceptance")
    heatmap = charts(at)[0]
    for x in encodings(heatmap, "x"):
        assert x["axis"]["labelAngle"] == -45 and x["axis"]["labelOverlap"] is False
    titles = [c["title"] for c in encodings(heatmap, "color") if "title" in c]
    assert sorted(titles) == [["acceptance rate", "(median)"], ["mean accepted", "tokens per step", "(median)"]]
    assert all(c["legend"]["titleLimit"] == 0 for c in encodings(heatmap, "color") if "legend" in c)


def test_one_gpu_count_is_an_ordinal_axis(store):
    at = run_page("scaling", gpus="1")
    assert all(x["type"] == "ordinal" for c in charts(at) for x in encodings(c, "x") if x.get("field") == "gpus")


def test_tables_that_do_not_fit_say_how_to_see_the_rest(store):
    at = run_page("runs")
    runs = frame_with(at, "run_id", "git_commit")
    hints = [c.value for c in at.caption if c.value.startswith("Scroll inside the table")]
    assert hints[0] == f"Scroll inside the table to see all {len(runs)} rows and all {len(runs.columns)} columns " \
                       "(sideways)."
    at = run_page("scaling", gpus="2")  # 2 rows of 6 short columns: nothing hidden, no hint
    assert not [c.value for c in at.caption if c.value.startswith("Scroll")]


# ---------------------------------------------------------------------------------------------- launcher

def test_launcher_command_line(monkeypatch):
    cmd = launch.build_command("db/x.duckdb", 8765)
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4].endswith("app.py")
    assert cmd[cmd.index("--server.port") + 1] == "8765" and cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-2:] == ["--db", os.path.abspath("db/x.duckdb")]  # absolute: streamlit runs in dashboard/
    monkeypatch.setenv("SPECDEC_DB", "elsewhere/s.duckdb")
    assert launch.build_command(None, 8765)[-3:] == ["--db", os.path.abspath("elsewhere/s.duckdb"), "--default-store"]


def test_specdec_dashboard_accepts_its_options(capsys):
    """`specdec dashboard --db PATH` reaches the launcher's own parser (argparse REMAINDER alone drops options)."""
    from specdec import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["dashboard", "--db", "x.duckdb", "--help"])
    assert exc.value.code == 0
    assert "--db DB" in capsys.readouterr().out


def test_engines_page_compares_each_engine_with_its_own_plain_decoding(tmp_path, monkeypatch):
    """Ours in float32 and int4, llama.cpp on the GGUF: speedups over the same engine and weight format, one method
    (ngram) on both engines, and whether speculation pays."""
    def run(strategy, weights, **kw):
        result = make_result(host="h", target=TARGET, draft=None, strategy=strategy, **kw)
        result["run"]["params"].update(weights=weights, threads=2)
        return result

    results = [run("baseline", "float32", k=None), run("baseline", "int4", k=None, baseline_tps=40.0),
               run("ngram", "int4", k=4, speed=1.2, alpha=0.4, baseline_tps=40.0),
               run("llamacpp-generate", "gguf-Q4_1", k=None, speed=3.0),
               run("llamacpp-specdec-ngram", "gguf-Q4_1", k=4, speed=2.4, alpha=0.5)]
    db = tmp_path / "engines.duckdb"
    ingest(db, write_results(results, tmp_path / "results"))
    monkeypatch.setenv("SPECDEC_DB", str(db))
    at = run_page("engines")
    assert not at.error and charts(at)
    table = frame_with(at, "engine", "method", "weights", "speedup", "pays")
    rows = {(r.engine, r.method, r.weights): r for r in table.itertuples()}
    assert set(rows) == {("specdec", "baseline", "float32"), ("specdec", "baseline", "int4"),
                         ("specdec", "ngram", "int4"), ("llamacpp", "baseline", "gguf-Q4_1"),
                         ("llamacpp", "ngram", "gguf-Q4_1")}
    assert round(rows["specdec", "ngram", "int4"].speedup, 9) == 1.2 and rows["specdec", "ngram", "int4"].pays == "yes"
    assert round(rows["llamacpp", "ngram", "gguf-Q4_1"].speedup, 9) == 0.8  # over llamacpp-generate (60 tok/s)
    assert rows["llamacpp", "ngram", "gguf-Q4_1"].pays == "no"
    plain = frame_with(at, "series", "tokens_per_s", "tok/s ÷ fastest plain")
    assert sorted(plain["tok/s ÷ fastest plain"].round(9)) == [round(20 / 60, 9), round(40 / 60, 9), 1.0]


def test_stopping_specdec_dashboard_stops_the_server(fixture_db, tmp_path):
    """SIGTERM to `specdec dashboard` (a service manager, `kill`, a closed terminal) stops the Streamlit server:
    the launcher becomes the server (exec), so no orphan keeps the port. Without --port, Streamlit's own
    STREAMLIT_SERVER_PORT is the port."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "STREAMLIT_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "specdec.cli", "dashboard", "--db", str(fixture_db)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        with pytest.raises(OSError):  # nothing listens on the port any more
            socket.create_connection(("localhost", port), timeout=2).close()
        assert f"http://localhost:{port}/" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:  # a child the launcher might have left behind would still be in the process group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("a process of the dashboard outlived SIGTERM")
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------------------------------- noise, intervals

def noisy_store(tmp_path, monkeypatch) -> Path:
    """The fixture matrix plus a cell measured on a busy machine that looks faster than the best quiet one."""
    from dashboard_fixture import DRAFT, fixture_results

    noisy = make_result(host="lab-a", target=TARGET, draft=DRAFT, strategy="speculative", k=6, speed=3.0, alpha=0.7,
                        noise={"other_cpu_cores": 1.4, "steal_share": 0.0, "load_avg": 3.1})
    db = tmp_path / "noisy.duckdb"
    ingest(db, write_results(fixture_results() + [noisy], tmp_path / "results"))
    monkeypatch.setenv("SPECDEC_DB", str(db))
    return db


def test_overview_never_takes_a_noisy_cell_as_the_best(tmp_path, monkeypatch):
    db = noisy_store(tmp_path, monkeypatch)
    assert sql(db, "SELECT max(speedup_median) AS m FROM cell_summary").m[0] == pytest.approx(3.0)
    at = run_page("overview")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Best speedup"] == f"{BEST['speedup']:.2f}×" and metrics["Draft length k"] == str(BEST["k"])
    assert any("3.00× on a noisy machine (other processes used 1.4 of 2 cores)" in w.value for w in at.warning)
    best = sql(db, "SELECT speedup_ci_low, speedup_ci_high FROM cell_summary WHERE strategy = 'speculative' "
                   "AND draft_length = 4 AND host = 'lab-a' AND gpus = 1 AND temperature = 0").iloc[0]
    assert f"{best.speedup_ci_low:.2f}–{best.speedup_ci_high:.2f}×" in at.caption[0].value
    # best k per pair × strategy: the quiet k = 4, not the noisy k = 6
    table = frame_with(at, "pair", "strategy", "best_k", "speedup_ci_low", "speedup_ci_high", "noise")
    row = table[(table.strategy == "speculative") & ((table.speedup - BEST["speedup"]).abs() < 1e-9)]
    assert row.best_k.tolist() == [BEST["k"]] and row.noise.tolist() == [""]


def test_speedup_page_shows_intervals_and_warns_about_noisy_cells(tmp_path, monkeypatch):
    db = noisy_store(tmp_path, monkeypatch)
    at = run_page("speedup")
    assert any("1 cell(s) were measured while other work loaded the machine" in w.value
               and "k=6: other processes used 1.4 of 2 cores" in w.value for w in at.warning)
    table = frame_with(at, "draft_length", "speedup", "speedup_ci_low", "speedup_ci_high", "noise")
    expected = sql(db, "SELECT draft_length, speedup_median, speedup_ci_low, speedup_ci_high FROM cell_summary "
                       "WHERE draft_length IS NOT NULL")
    assert rounded(table[["draft_length", "speedup", "speedup_ci_low", "speedup_ci_high"]].itertuples(index=False)) \
        == rounded(expected.itertuples(index=False))
    assert (table.speedup_ci_low <= table.speedup).all() and (table.speedup <= table.speedup_ci_high).all()
    assert table[table.draft_length == 6].noise.tolist() == ["⚠ noisy: other processes used 1.4 of 2 cores"]
    # the chart carries the intervals (error bars) and the noise flag (red rings) in its data
    data = next(f for f in chart_frames(charts(at)[0]) if "speedup_ci_low" in f.columns)
    assert {"speedup_ci_high", "noisy"} <= set(data.columns)


def test_every_page_renders_a_store_with_hostile_names(tmp_path_factory, monkeypatch):
    """Stored names with ESC, a newline, HTML and Markdown image syntax (dashboard_fixture.HOSTILE): every page
    runs, and no caption, warning or table shows a control character or lets the markup render."""
    monkeypatch.setenv("SPECDEC_DB", str(build_hostile_db(tmp_path_factory.mktemp("hostile"))))
    control = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]")
    shown = set()
    for page in PAGES:
        at = run_page(page)
        assert not at.error, [e.value for e in at.error]
        markdown = [e.value for kind in ("markdown", "caption", "warning", "info", "metric") for e in at.get(kind)
                    if isinstance(getattr(e, "value", None), str)]
        cells = [v for df in at.dataframe for col in df.value.columns for v in df.value[col] if isinstance(v, str)]
        assert not any(control.search(t) for t in markdown + cells), page
        # tables show text as text; in Markdown the stored name's image and HTML must arrive escaped
        assert not any(re.search(r"(?<!\\)(!\[x\]|<img)", t) for t in markdown), page
        if any("evil" in t for t in markdown + cells):
            shown.add(page)
    assert {"overview", "leaderboard", "speedup", "acceptance", "runs", "sql"} <= shown  # the names were shown
