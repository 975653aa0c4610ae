"""`specdec report [--db PATH] [--out DIR] [filters]`: a static report of the store that people can paste.

It writes, into DIR (default `report/`):
- `report.md`: the leaderboard in Spec-Bench's form, losslessness and provenance as Markdown tables, figures linked;
- `report.html`: the same in ONE self-contained file (figures inlined as SVG, no script, no network);
- `leaderboard.csv` and the figures as `speedup-vs-k.svg` and `acceptance-per-position.svg`.

The leaderboard has one row per method (strategy), draft and k (and host, GPUs, sampling settings where those
vary): the median speedup per prompt category in Spec-Bench's column order, Spec-Bench's mean accepted tokens (Σ
new tokens ÷ Σ target forward passes: the mean over decoding steps, bonus token included, 1.00 for plain
decoding), the overall median speedup (over every prompt and repeat: `cell_summary.speedup_median` when nothing
is filtered out), and where the store has them, 95 % intervals, noise flags and non-degenerate-only figures.

The store is opened read-only and closed again; all SQL is here, and the dashboard's leaderboard page runs the
same statements (`cell_groups_sql`). Figures the store of an older or newer specdec lacks (intervals, noise,
degenerate outputs) are left out, not invented: `store_features` looks at which views, columns and macros exist.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pandas as pd
import sqlalchemy as sa

from specdec.db.store import db_error_message, default_db_path, engine_for
from specdec.db.text import escape_markdown, show_frame_controls
from specdec.strategies import STRATEGIES, is_plain_baseline

# Spec-Bench's leaderboard columns, in its order, under the category names prompt files use (Spec-Bench's own
# and specdec's suite); any other category follows, alphabetically.
CATEGORY_ORDER = ("multi-turn", "translation", "summarization", "summarisation", "qa", "math_reasoning", "math",
                  "rag")
CELL_KEY = ("host", "target", "draft", "strategy", "draft_length", "gpus", "temperature", "top_p", "top_k",
            "max_new_tokens")
FORMAT_KEY = ("weights", "threads")  # also part of a cell where the store has them (feature `formats`)
BATCH_KEY = ("batch_size",)  # likewise (feature `batch`)
# Settings that tell leaderboard rows apart beyond method, draft and k; shown only when they vary.
SETTINGS = ("host", "target", "gpus", "temperature", "top_p", "top_k", "max_new_tokens", *FORMAT_KEY, *BATCH_KEY)
# The plain decoding strategies: each engine's own baseline (ours, llama.cpp's), listed last.
BASELINES = tuple(name for name in STRATEGIES if is_plain_baseline(name))
FIGURES = ("speedup-vs-k.svg", "acceptance-per-position.svg", "speedup-vs-batch-size.svg")


class ReportError(RuntimeError):
    """The report cannot be built (no store, nothing matches the filters, unwritable folder); one line."""


@dataclass(frozen=True)
class ReportFilters:
    """Which runs the report covers; an empty tuple means "no restriction". `prompts` matches the end of the
    prompt file path a run recorded; `tag` the results folder of a workflow campaign (results/<tag>/<host>/)."""

    host: tuple[str, ...] = ()
    target: tuple[str, ...] = ()
    draft: tuple[str, ...] = ()
    strategy: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    tag: tuple[str, ...] = ()
    temperature: tuple[float, ...] = ()


# one clause per filter, `?` bound once per value; OR within a filter, AND across filters
FILTER_SQL = {
    "host": "r.host = ?",
    "target": "r.target = ?",
    "draft": "coalesce(r.draft, '') = ?",
    "strategy": "r.strategy = ?",
    "prompts": "ends_with(coalesce(json_extract_string(r.params_json, '$.prompts_file'), ''), ?)",
    "tag": "contains('/' || r.result_file, '/' || ? || '/' || r.host || '/')",
    "temperature": "r.temperature = ?",
}


def runs_sql(f: ReportFilters) -> tuple[str, list]:
    """`SELECT run_id FROM runs r WHERE ...` for the filters, with its parameters."""
    clauses, params = [], []
    for field in fields(f):
        values = getattr(f, field.name)
        if values:
            clauses.append("(" + " OR ".join([FILTER_SQL[field.name]] * len(values)) + ")")
            params.extend(values)
    return "SELECT r.run_id FROM runs r" + (" WHERE " + " AND ".join(clauses) if clauses else ""), params


# ---------------------------------------------------------------------------------------------------- store

def read(conn, sql: str, params=()) -> pd.DataFrame:
    """The result of `sql` with control characters in its text spelled out (db/text.py): a name stored with an ESC
    or a newline must not break a table, a terminal or the SVG writer (vl-convert aborts on them)."""
    return show_frame_controls(conn.execute(sql, list(params)).df())


# Which optional parts the store has: `ci` (the median_ci macro of issue 13), `noise` (its run_noise view),
# `degenerate` (issue 19's per-output flag in the speedup view). One row of three booleans.
FEATURES_SQL = """
    SELECT EXISTS (SELECT 1 FROM duckdb_functions() WHERE function_name = 'median_ci'
                   AND function_type = 'macro') AS ci,
           EXISTS (SELECT 1 FROM duckdb_views() WHERE view_name = 'run_noise') AS noise,
           EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'speedup'
                   AND column_name = 'degenerate') AS degenerate,
           EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'speedup'
                   AND column_name = 'weights') AS formats,
           EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'speedup'
                   AND column_name = 'batch_size') AS batch"""


def store_features(conn) -> dict[str, bool]:
    return {k: bool(v) for k, v in read(conn, FEATURES_SQL).iloc[0].items()}


def cell_key(features: dict) -> tuple[str, ...]:
    """The columns of the speedup view that make a cell: weight format, threads and batch size too where the store
    has them."""
    return CELL_KEY + (FORMAT_KEY if features.get("formats") else ()) + (BATCH_KEY if features.get("batch") else ())


def cell_groups_sql(features: dict, by_category: bool, where: str = "") -> str:
    """Aggregates of the speedup view `s` (joined to `m` measurements and `n` run_noise) per cell, or per cell and
    category: median speedup, its interval, noise, losslessness, Spec-Bench's mean accepted tokens. The interval
    is cell_summary's (the store's median_ci over the same values), so unfiltered and per cell they are the same
    numbers as the view's. `where`: a WHERE clause on `s` (the report's runs, the dashboard's filters)."""
    key = ", ".join(f"s.{c}" for c in cell_key(features)) + (", s.category" if by_category else "")
    optional = []
    if features["noise"]:
        optional += ["bool_or(n.noisy) AS noisy",
                     "string_agg(DISTINCT n.noise_reason, '; ' ORDER BY n.noise_reason) AS noise_reason"]
    if features["degenerate"]:
        optional += ["avg(CAST(s.degenerate AS DOUBLE)) AS degenerate_share",
                     "median(s.speedup) FILTER (WHERE NOT s.degenerate) AS speedup_clean"]
    if features["ci"]:
        optional += ["list(s.speedup ORDER BY s.prompt_id, s.\"repeat\", s.run_id) "
                     "FILTER (WHERE s.speedup IS NOT NULL) AS speedups"]
    noise_join = "LEFT JOIN run_noise n ON n.run_id = s.run_id" if features["noise"] else ""
    sql = f"""
        SELECT {key},
               median(s.speedup) AS speedup,
               quantile_cont(s.speedup, 0.25) AS speedup_p25,
               quantile_cont(s.speedup, 0.75) AS speedup_p75,
               count(s.speedup) AS n,
               count(DISTINCT s.prompt_id) AS prompts,
               sum(m.new_tokens) FILTER (WHERE m.target_forward_passes > 0)
                   / nullif(sum(m.target_forward_passes), 0) AS mean_accepted_tokens,
               median(s.acceptance_rate) AS acceptance_rate,
               avg(CAST(s.matches_baseline AS DOUBLE)) AS share_identical,
               count(s.matches_baseline) AS compared,
               count(*) FILTER (WHERE NOT s.matches_baseline) AS mismatches,
               median(s.tokens_per_s) AS tokens_per_s,
               median(s.baseline_tokens_per_s) AS baseline_tokens_per_s
               {''.join(', ' + o for o in optional)}
        FROM speedup s
        JOIN measurements m ON m.run_id = s.run_id AND m.prompt_id = s.prompt_id AND m."repeat" = s."repeat"
        {noise_join}
        {where}
        GROUP BY {key}"""
    if not features["ci"]:
        return sql
    return f"""
        SELECT * EXCLUDE (speedups, interval), interval[1] AS ci_low, interval[2] AS ci_high
        FROM (SELECT *, CASE WHEN len(speedups) >= 2 THEN median_ci(speedups) END AS interval
              FROM ({sql}))"""


def acceptance_sql(f: ReportFilters, features: dict | None = None) -> tuple[str, list]:
    """Acceptance at each draft position per cell: per-position counts summed over the cell's decodes, accepted ÷
    proposed (position i counts as accepted when drafts 1..i all were, so the curve falls with i)."""
    chosen, params = runs_sql(f)
    columns = cell_key(features or {})
    key = ", ".join(f"s.{c}" for c in columns)
    return f"""
        WITH x AS (
            SELECT {key},
                   from_json(CAST(m.accepted_per_position AS VARCHAR), '["BIGINT"]') AS acc,
                   from_json(CAST(m.proposed_per_position AS VARCHAR), '["BIGINT"]') AS prop
            FROM speedup s
            JOIN measurements m ON m.run_id = s.run_id AND m.prompt_id = s.prompt_id AND m."repeat" = s."repeat"
            WHERE s.run_id IN ({chosen}) AND m.proposed_per_position IS NOT NULL),
        y AS (SELECT *, unnest(range(1, len(prop) + 1)) AS position FROM x)
        SELECT {", ".join(columns)}, position, sum(acc[position]) AS accepted, sum(prop[position]) AS proposed,
               sum(acc[position]) / nullif(sum(prop[position]), 0) AS acceptance
        FROM y GROUP BY ALL ORDER BY ALL""", params


def provenance_sql(f: ReportFilters) -> tuple[str, list]:
    """The machines and software the runs were measured with, one row per distinct combination."""
    chosen, params = runs_sql(f)
    return f"""
        SELECT host, cpu_name, cpu_count, coalesce(gpu_names, '[]') AS gpu_names, torch_version,
               transformers_version, specdec_version, python_version, git_commit, git_dirty,
               json_extract_string(params_json, '$.prompts_file') AS prompts_file,
               count(*) AS runs, count(*) FILTER (WHERE status <> 'ok') AS failed_runs,
               min(started_utc) AS first_started_utc, max(started_utc) AS last_started_utc
        FROM runs WHERE run_id IN ({chosen})
        GROUP BY ALL ORDER BY host, first_started_utc""", params


# ---------------------------------------------------------------------------------------------------- shaping

def category_order(categories) -> list[str]:
    known = [c for c in CATEGORY_ORDER if c in set(categories)]
    return known + sorted(set(categories) - set(known))


def method_label(strategy: str, draft) -> str:
    return strategy if not isinstance(draft, str) or not draft else f"{strategy} ← {draft}"


def leaderboard_frame(cells: pd.DataFrame, by_category: pd.DataFrame) -> pd.DataFrame:
    """Spec-Bench's table as numbers: one row per cell, `<category>` speedup columns (with `<category> low` /
    `<category> high` when intervals exist), mean accepted tokens, overall speedup and its interval, the noise
    flag, the share of outputs identical to the baseline. Fastest overall first; baselines last."""
    if cells.empty:
        return pd.DataFrame()
    keys = [c for c in CELL_KEY + FORMAT_KEY if c in cells]
    board = cells.copy()
    cats = category_order(by_category.category.dropna().unique()) if not by_category.empty else []
    wide = by_category[by_category.category.notna()]
    for cat in cats:
        part = wide[wide.category == cat]
        cols = {"speedup": cat, **({"ci_low": f"{cat} low", "ci_high": f"{cat} high"} if "ci_low" in part else {})}
        board = board.merge(part[keys + list(cols)].rename(columns=cols), on=keys, how="left")
    board = board.rename(columns={"speedup": "overall", "ci_low": "overall low", "ci_high": "overall high",
                                  "strategy": "method", "draft_length": "k"})
    board["is_baseline"] = board.method.isin(BASELINES)
    settings = [c for c in SETTINGS if c in board]
    order = ["is_baseline", "overall", "method", "draft", "k", *settings]  # ties in a fixed order
    board = board.sort_values(order, ascending=[True, False] + [True] * (len(order) - 2), na_position="last")
    lead = ["method", "draft", "k", *(c for c in settings if board[c].nunique(dropna=False) > 1)]
    per_cat = [c for cat in cats for c in (cat, f"{cat} low", f"{cat} high") if c in board]
    tail = [c for c in ("mean_accepted_tokens", "overall", "overall low", "overall high", "noisy", "noise_reason",
                        "speedup_clean", "degenerate_share", "share_identical", "compared", "n", "prompts",
                        "tokens_per_s", "baseline_tokens_per_s") if c in board]
    out = board[lead + per_cat + tail].reset_index(drop=True)
    out.attrs["categories"] = cats
    # weights and threads left unset (the alias's own, torch's count) say nothing worth a note
    out.attrs["constant"] = {c: board[c].iloc[0] for c in settings
                             if c not in lead and not (c in FORMAT_KEY and pd.isna(board[c].iloc[0]))}
    return out


def flag(value) -> bool | None:
    """A nullable boolean from a DataFrame cell (numpy bool, pandas NA, None) as True / False / None."""
    return None if value is None or pd.isna(value) else bool(value)


def fmt_speedup(value, low=None, high=None) -> str:
    if value is None or pd.isna(value):
        return "—"
    interval = "" if low is None or pd.isna(low) else f" ({low:.2f}–{high:.2f})"
    return f"{value:.2f}×{interval}"


def display_frame(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as text cells: speedups as `1.52× (1.40–1.61)`, noisy rows marked."""
    rows = []
    for _, r in board.iterrows():
        row = {"method": r.method, "draft": r.draft if isinstance(r.draft, str) else "—",
               "k": "—" if pd.isna(r.k) else str(int(r.k))}
        row.update({c: r[c] for c in SETTINGS if c in board})
        for cat in board.attrs["categories"]:
            row[cat] = fmt_speedup(r[cat], r.get(f"{cat} low"), r.get(f"{cat} high"))
        row["mean accepted tokens"] = "—" if pd.isna(r.mean_accepted_tokens) else f"{r.mean_accepted_tokens:.2f}"
        row["overall"] = fmt_speedup(r.overall, r.get("overall low"), r.get("overall high"))
        if "noisy" in board:  # why a row is noisy: in notes()
            row["noise"] = {None: "not measured", True: "noisy", False: "quiet"}[flag(r.noisy)]
        if "speedup_clean" in board:
            row["overall, non-degenerate"] = fmt_speedup(r.speedup_clean)
        row["identical to baseline"] = ("—" if pd.isna(r.share_identical) or r.method in BASELINES
                                        else f"{r.share_identical:.0%} of {int(r.compared)}")
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:  # stored names shown as written: no markup of theirs renders (`<img ...>`, links, `|`)
        return escape_markdown(text_of(v))
    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- figures

def series(df: pd.DataFrame) -> pd.Series:
    """"target ← draft · strategy" plus the settings that vary in `df`, so lines of two machines never merge."""
    label = df.target.astype(str) + df.draft.map(lambda d: f" ← {d}" if isinstance(d, str) and d else "") \
        + " · " + df.strategy.astype(str)
    for col in ("host", "gpus", "temperature", *FORMAT_KEY, *BATCH_KEY):
        if col in df and df[col].nunique(dropna=False) > 1:
            label += " · " + col + "=" + df[col].astype(str)
    return label


def speedup_chart(cells: pd.DataFrame):
    import altair as alt

    d = cells[cells.draft_length.notna() & cells.speedup.notna()].copy()
    if d.empty:
        return None
    d["series"] = series(d)
    lo, hi = ("ci_low", "ci_high") if "ci_low" in d and d.ci_low.notna().any() else ("speedup_p25", "speedup_p75")
    base = alt.Chart(d).encode(x=alt.X("draft_length:Q", title="draft length k", axis=alt.Axis(tickMinStep=1),
                                       scale=alt.Scale(zero=False, nice=False, padding=16)),  # error bars clear of the frame
                               color=alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom",
                                                                                         columns=1, labelLimit=0)))
    rule = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(strokeDash=[6, 4], color="gray").encode(y="y:Q")
    chart = alt.layer(base.mark_errorbar().encode(y=alt.Y(f"{lo}:Q", title="speedup over baseline (×)"),
                                                  y2=f"{hi}:Q"),
                      base.mark_line(point=True).encode(y="speedup:Q"), rule)
    band = "95 % interval of the median" if lo == "ci_low" else "p25–p75 over prompts and repeats"
    return chart.properties(width=640, height=300, title="Speedup vs draft length"), band


def batch_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells of series measured at more than one batch size, with `series` labelled without the batch size
    (each series is one line over batch sizes) and the draft length folded into it."""
    if "batch_size" not in cells or cells.batch_size.nunique() < 2:
        return cells.iloc[0:0]
    d = cells[cells.speedup.notna() & ~cells.strategy.isin(BASELINES)].copy()
    d["series"] = series(d.drop(columns=list(BATCH_KEY))) + d.draft_length.map(
        lambda k: f" · k={int(k)}" if pd.notna(k) else "")
    return d[d.groupby("series").batch_size.transform("nunique") > 1]


def crossovers(d: pd.DataFrame) -> dict[str, tuple]:
    """Per series: (largest batch size whose speedup interval lies above 1, smallest whose interval lies below 1)
    (issue 32's B*); None where no batch size qualifies or the store has no intervals."""
    out = {}
    for name, g in d.groupby("series"):
        if "ci_low" not in g:
            out[name] = (None, None)
            continue
        above = g.batch_size[g.ci_low > 1]
        below = g.batch_size[g.ci_high < 1]
        out[name] = (int(above.max()) if len(above) else None, int(below.min()) if len(below) else None)
    return out


def batch_chart(d: pd.DataFrame):
    import altair as alt

    if d.empty:
        return None
    lo, hi = ("ci_low", "ci_high") if "ci_low" in d and d.ci_low.notna().any() else ("speedup_p25", "speedup_p75")
    base = alt.Chart(d).encode(
        x=alt.X("batch_size:Q", title="batch size (sequences decoded at once)", scale=alt.Scale(type="log", base=2),
                axis=alt.Axis(values=sorted(int(b) for b in d.batch_size.unique()))),
        color=alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom", columns=1, labelLimit=0)))
    rule = alt.Chart(pd.DataFrame({"y": [1.0]})).mark_rule(strokeDash=[6, 4], color="gray").encode(y="y:Q")
    chart = alt.layer(base.mark_errorbar().encode(y=alt.Y(f"{lo}:Q", title="speedup over baseline (×)"), y2=f"{hi}:Q"),
                      base.mark_line(point=True).encode(y="speedup:Q"), rule)
    band = "95 % interval of the median" if lo == "ci_low" else "p25–p75 over prompts and repeats"
    return chart.properties(width=640, height=300, title="Speedup vs batch size"), band


def serving_chart(d: pd.DataFrame):
    """Median TPOT (ms) against concurrency per speculation kind, with 95 % intervals of the median (columns
    concurrency, series, tpot_ms, tpot_ci_low_ms, tpot_ci_high_ms), beside output throughput (throughput_tok_s)."""
    import altair as alt

    if d.empty:
        return None
    x = alt.X("concurrency:Q", title="concurrent requests", scale=alt.Scale(type="log", base=2),
              axis=alt.Axis(values=sorted(int(c) for c in d.concurrency.unique())))
    color = alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom", columns=1, labelLimit=0))
    base = alt.Chart(d).encode(x=x, color=color)
    tpot = alt.layer(base.mark_errorbar().encode(y=alt.Y("tpot_ci_low_ms:Q", title="median TPOT (ms)"),
                                                 y2="tpot_ci_high_ms:Q"),
                     base.mark_line(point=True).encode(y="tpot_ms:Q")).properties(
        width=300, height=260, title="Time per output token")
    throughput = base.mark_line(point=True).encode(y=alt.Y("throughput_tok_s:Q", title="output tokens/s")).properties(
        width=300, height=260, title="Throughput")
    return alt.hconcat(tpot, throughput)


def acceptance_chart(pos: pd.DataFrame):
    import altair as alt

    if pos.empty:
        return None
    d = pos.copy()
    d["series"] = series(d) + d.draft_length.map(lambda k: f" · k={int(k)}" if pd.notna(k) else "")
    return alt.Chart(d).mark_line(point=True).encode(
        x=alt.X("position:Q", title="draft position (1 = first proposed token)", axis=alt.Axis(tickMinStep=1),
                scale=alt.Scale(zero=False, nice=False, padding=16)),
        y=alt.Y("acceptance:Q", title="accepted ÷ proposed", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom", columns=1, labelLimit=0)),
    ).properties(width=640, height=280, title="Acceptance per draft position")


def to_svg(chart) -> str:
    """Altair → SVG text, rendered offline by vl-convert (Vega bundled, no browser, no network)."""
    import vl_convert

    return vl_convert.vegalite_to_svg(chart.to_json())


# ---------------------------------------------------------------------------------------------------- building

@dataclass
class Report:
    leaderboard: pd.DataFrame  # numbers (leaderboard_frame)
    table: pd.DataFrame  # the same as text cells (display_frame)
    acceptance: pd.DataFrame
    provenance: pd.DataFrame
    features: dict
    figures: dict  # file name -> (svg text, caption)
    filters: ReportFilters
    db: str


def collect(db: str | Path, f: ReportFilters = ReportFilters()) -> Report:
    """Read everything the report shows from the store (read-only) and draw the figures."""
    path = Path(db)
    if not path.is_file():
        raise ReportError(f"no results store at {path}: run `snakemake --cores 2` (or `specdec ingest`) first")
    engine = engine_for(path, read_only=True)
    try:
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            features = store_features(conn)
            chosen, params = runs_sql(f)
            cells = read(conn, cell_groups_sql(features, False, f"WHERE s.run_id IN ({chosen})"), params)
            by_cat = read(conn, cell_groups_sql(features, True, f"WHERE s.run_id IN ({chosen})"), params)
            acceptance = read(conn, *acceptance_sql(f, features))
            provenance = read(conn, *provenance_sql(f))
        finally:
            raw.close()
    except (duckdb.Error, sa.exc.SQLAlchemyError) as exc:
        raise ReportError(db_error_message(exc, path)) from exc
    finally:
        engine.dispose()
    if cells.empty:
        what = f"runs matching {filters_text(f)}" if any(getattr(f, x.name) for x in fields(f)) else "the store"
        raise ReportError(f"no successful measurement in {what} ({path}): nothing to report")
    board = leaderboard_frame(cells, by_cat)
    figures = {}
    drawn = speedup_chart(cells)
    if drawn:
        chart, band = drawn
        figures[FIGURES[0]] = (to_svg(chart), f"Median speedup per draft length; bars: {band}. Dashed: baseline.")
    chart = acceptance_chart(acceptance)
    if chart is not None:
        figures[FIGURES[1]] = (to_svg(chart), "Per-position counts summed over every prompt and repeat of a cell.")
    batched = batch_frame(cells)
    drawn = batch_chart(batched)
    if drawn:
        chart, band = drawn
        found = "; ".join(f"{name}: B* {above or '—'} / {below or '—'}" for name, (above, below)
                          in crossovers(batched).items())
        figures[FIGURES[2]] = (to_svg(chart), f"Median per-sequence speedup per batch size, each batch size's "
                               f"baseline decoded at that batch size in the same job; bars: {band}. Crossover "
                               f"(largest batch size whose interval lies above 1 / smallest below 1): {found}.")
    return Report(board, display_frame(board), acceptance, provenance, features, figures, f, str(path))


def notes(features: dict, board: pd.DataFrame) -> list[str]:
    """What the numbers are, in sentences shared by the Markdown and the HTML."""
    out = ["Speedup: the median over a row's prompts × repeats of tokens/s ÷ its baseline's tokens/s (the store's "
           "`speedup` view; Spec-Bench instead divides mean tokens/s by the baseline's mean). Columns are prompt "
           "categories in Spec-Bench's order; Spec-Bench's MT-Bench questions are one category, `multi-turn`.",
           "Mean accepted tokens: Σ new tokens ÷ Σ target forward passes (Spec-Bench's #MAT: per decoding step, "
           "bonus token included; 1.00 for plain decoding)."]
    if features["ci"]:
        out.append("(a–b): 95 % bootstrap interval of the median (the store's `median_ci`, as in `cell_summary`).")
    else:
        out.append("This store has no confidence intervals (`median_ci`); they appear once it does.")
    if features["noise"]:
        out.append("Noise: whether another load on the machine was measured while a row's runs decoded "
                   "(`run_noise`); a noisy row's speedup is not a clean comparison.")
        for _, r in board[board.noisy.map(flag) == True].iterrows() if "noisy" in board else []:  # noqa: E712
            k = "" if pd.isna(r.k) else f" k={int(r.k)}"
            where = ", ".join(f"{c} {r[c]}" for c in ("host", "gpus", "temperature") if c in board)
            out.append(f"Noisy: {method_label(r.method, r.draft)}{k}{' (' + where + ')' if where else ''}: "
                       f"{r.noise_reason}.")
    if features["degenerate"]:
        out.append("Non-degenerate: the median speedup over outputs not flagged as copies or loops.")
    out.append("Identical to baseline: share of greedy outputs whose tokens equal the baseline's (losslessness; "
               "sampled rows are not compared).")
    constant = board.attrs.get("constant", {})
    if constant:
        out.append("All rows: " + ", ".join(f"{k} = {v}" for k, v in constant.items()) + ".")
    return out


def filters_text(f: ReportFilters) -> str:
    chosen = [f"{x.name} = {', '.join(map(str, getattr(f, x.name)))}" for x in fields(f) if getattr(f, x.name)]
    return "; ".join(chosen) if chosen else "none (every run in the store)"


def provenance_table(r: Report) -> pd.DataFrame:
    """Provenance compact enough to paste: one machine column, one software column, the commit."""
    p = r.provenance
    text = lambda v: text_of(v) or "?"  # noqa: E731
    return pd.DataFrame({
        "host": p.host,
        "CPU": [f"{text(c)} ({text(n)} cores)" for c, n in zip(p.cpu_name, p.cpu_count)],
        "GPUs": [", ".join(json.loads(g)) or "none" for g in p.gpu_names],
        "software": [f"specdec {text(a)}, torch {text(b)}, transformers {text(c)}, Python {text(d)}"
                     for a, b, c, d in zip(p.specdec_version, p.torch_version, p.transformers_version,
                                           p.python_version)],
        "commit": [text(c)[:10] + (" (dirty)" if flag(d) else "") for c, d in zip(p.git_commit, p.git_dirty)],
        "prompt file": p.prompts_file,
        "runs": p.runs, "failed": p.failed_runs,
        "measured (UTC)": [f"{a:%Y-%m-%d %H:%M}" + ("" if a == b else f" – {b:%Y-%m-%d %H:%M}")
                           for a, b in zip(p.first_started_utc, p.last_started_utc)],
    })


def render_markdown(r: Report) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"# specdec report\n\nStore `{r.db}`, generated {generated}. Filters: "
             f"{escape_markdown(filters_text(r.filters))}.\n", "## Leaderboard\n", markdown_table(r.table), ""]
    # the notes' own `code` spans stay; the stored names in them get no other markup
    parts += [f"- {escape_markdown(n, keep='`')}" for n in notes(r.features, r.leaderboard)] + [""]
    for name, (_, caption) in r.figures.items():
        parts += [f"![{caption}]({name})\n", f"*{caption}*\n"]
    parts += ["## Provenance\n", markdown_table(provenance_table(r)), ""]
    return "\n".join(parts)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1600px;
color:#222;padding:0 1em}table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;
padding:4px 8px;text-align:left;white-space:nowrap}th{background:#f3f3f3}.num{text-align:right}
tr.noisy td{background:#fff4e0}figure{margin:1.5em 0}figcaption{color:#555;font-size:13px}.scroll{overflow-x:auto}
code{background:#f3f3f3;padding:1px 4px}"""


def text_of(v) -> str:
    return "" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)


def html_table(df: pd.DataFrame, noisy: list[bool] | None = None) -> str:
    """Numbers right-aligned (a column whose every cell starts with a digit or a dash), text left."""
    align = [' class="num"' if all(re.match(r"[\d—-]", text_of(v)) for v in df[c]) else "" for c in df.columns]
    head = "".join(f"<th{a}>{html.escape(str(c))}</th>" for c, a in zip(df.columns, align))
    rows = []
    for i, row in enumerate(df.itertuples(index=False)):
        cls = ' class="noisy"' if noisy and noisy[i] else ""
        cells = "".join(f"<td{a}>{html.escape(text_of(v))}</td>" for v, a in zip(row, align))
        rows.append(f"<tr{cls}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def inline_code(escaped: str) -> str:
    """Markdown's `code` spans of an already escaped note as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def render_html(r: Report) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    noisy = [flag(v) is True for v in r.leaderboard.noisy] if "noisy" in r.leaderboard else None
    figures = "".join(f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>"
                      for svg, caption in r.figures.values())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>specdec report</title><style>{CSS}</style></head><body>
<h1>specdec report</h1>
<p>Store <code>{html.escape(r.db)}</code>, generated {generated}. Filters: {html.escape(filters_text(r.filters))}.</p>
<h2>Leaderboard</h2>
{html_table(r.table, noisy)}
<ul>{"".join(f"<li>{inline_code(html.escape(n))}</li>" for n in notes(r.features, r.leaderboard))}</ul>
<h2>Figures</h2>
{figures or "<p>No cell with a draft length and a baseline: nothing to draw.</p>"}
<h2>Provenance</h2>
{html_table(provenance_table(r))}
</body></html>
"""


def write_report(r: Report, out: str | Path) -> list[Path]:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "report.md", out / "report.html", out / "leaderboard.csv"]
        written[0].write_text(render_markdown(r), encoding="utf-8")
        written[1].write_text(render_html(r), encoding="utf-8")
        r.leaderboard.to_csv(written[2], index=False)
        for name, (svg, _) in r.figures.items():
            (out / name).write_text(svg, encoding="utf-8")
            written.append(out / name)
    except OSError as exc:
        raise ReportError(f"cannot write the report to {out}: {exc.strerror or exc}") from exc
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec report", description="Write a static report of the store: "
                                     "report.md, one self-contained report.html, leaderboard.csv and the figures.")
    parser.add_argument("--db", default=None, help="store path (default: $SPECDEC_DB or results/specdec.duckdb)")
    parser.add_argument("--out", default="report", help="output folder (default: %(default)s)")
    for name, help_text in (("host", "only runs on this host"), ("target", "only this target model alias"),
                            ("draft", "only this draft alias ('' = strategies without one)"),
                            ("strategy", "only this strategy (baselines still divide the speedups)"),
                            ("prompts", "only runs whose prompt file path ends with this, e.g. question.jsonl"),
                            ("tag", "only runs of this workflow tag (result files under results/TAG/HOST/)"),
                            ("temperature", "only this sampling temperature")):
        parser.add_argument(f"--{name}", action="append", default=[], type=float if name == "temperature" else str,
                            help=help_text + "; repeat for several")
    args = parser.parse_args(argv)
    f = ReportFilters(**{x.name: tuple(getattr(args, x.name)) for x in fields(ReportFilters)})
    try:
        report = collect(Path(args.db) if args.db else default_db_path(), f)
        written = write_report(report, args.out)
    except ReportError as exc:
        print(f"specdec report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(p) for p in written)} ({len(report.leaderboard)} leaderboard rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
