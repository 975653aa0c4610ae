"""Every SQL statement the dashboard runs, as functions taking the database path and filters, returning DataFrames.

User-chosen values always travel as bound parameters (`?`); the only text assembled here is the list of
placeholders and fixed column expressions. Each query opens the database read-only and closes it again, so the
dashboard never holds the file between queries and `specdec ingest` can run while it is open.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, fields

import duckdb
import pandas as pd
import sqlalchemy as sa
import streamlit as st

from specdec.db.store import engine_for
from specdec.db.text import show_frame_controls

# The benchmark (bench/dashboard_queries.py) turns this off to time the SQL itself, not the cache.
USE_CACHE = True


class StoreBusy(RuntimeError):
    """The database file is locked by a writer (an ingest is running)."""


@dataclass(frozen=True)
class Filters:
    """Sidebar selections; an empty tuple means "no restriction" on that dimension."""

    pair: tuple[str, ...] = ()  # "target|draft" keys, draft "" when the strategy has none
    strategy: tuple[str, ...] = ()
    k: tuple[int, ...] = ()
    gpus: tuple[int, ...] = ()
    category: tuple[str, ...] = ()
    temperature: tuple[float, ...] = ()
    host: tuple[str, ...] = ()
    run: tuple[str, ...] = ()


FILTER_NAMES = [f.name for f in fields(Filters)]

# Column expression of each filter dimension, per source. A source without a dimension ignores that filter
# (a run has no prompt category).
SPEEDUP_COLS = {"pair": "s.target || '|' || coalesce(s.draft, '')", "strategy": "s.strategy",
                "k": "s.draft_length", "gpus": "s.gpus", "category": "s.category",
                "temperature": "s.temperature", "host": "s.host", "run": "s.run_id"}
RUNS_COLS = {"pair": "r.target || '|' || coalesce(r.draft, '')", "strategy": "r.strategy", "k": "r.k",
             "gpus": "r.gpus", "temperature": "r.temperature", "host": "r.host", "run": "r.run_id"}
MEASUREMENT_RUN_COLS = {**RUNS_COLS, "category": "m.category"}

# The cell key of the `cell_summary` view: top_k and max_new_tokens are part of the baseline key, so cells that
# differ only in them stay apart.
CELL_KEYS = ("s.host, s.target, s.draft, s.strategy, s.draft_length, s.gpus, s.temperature, s.top_p, s.top_k, "
             "s.max_new_tokens, s.engine, s.weights, s.threads")


def pair_key(target: str, draft: str | None) -> str:
    return f"{target}|{draft or ''}"


def pair_label(key: str) -> str:
    target, _, draft = key.partition("|")
    return f"{target} ← {draft}" if draft else target


# ---------------------------------------------------------------------------------------------------- plumbing

def db_stamp(db: str) -> tuple:
    """Changes whenever the file (or its write-ahead log) changes, so cached results refresh after an ingest."""
    stamp = []
    for p in (db, db + ".wal"):
        try:
            st_ = os.stat(p)
            stamp.append((st_.st_mtime_ns, st_.st_size))
        except FileNotFoundError:
            stamp.append(None)
    return tuple(stamp)


@functools.lru_cache(maxsize=8)
def _engine(db: str) -> sa.Engine:
    """The store's own read-only engine (NullPool: every query opens the file and closing releases it). Going
    through engine_for, like the SQL console's run_query, matters: DuckDB shares one database instance between the
    connections of a process and refuses a second connection opened with a different configuration."""
    return engine_for(db, read_only=True)


def _read(db: str, sql: str, params: list) -> pd.DataFrame:
    try:
        raw = _engine(db).raw_connection()
    except (duckdb.Error, sa.exc.SQLAlchemyError) as exc:
        # DuckDB allows one writer *or* readers: while ingest holds the file, a read-only open fails.
        if "lock" in str(exc).lower():
            raise StoreBusy(f"the database {db} is being written (an ingest is running); reload in a moment") from exc
        raise
    try:  # control characters in stored names spelled out (db/text.py): charts, tables and captions show them
        return show_frame_controls(raw.driver_connection.execute(sql, params).df())
    finally:
        raw.close()


@st.cache_data(max_entries=512, show_spinner=False)
def _read_cached(db: str, sql: str, params: tuple, stamp: tuple) -> pd.DataFrame:
    # `stamp` is only part of the cache key: a new mtime/size makes a new entry, so fresh runs show up.
    return _read(db, sql, list(params))


def fetch(db: str, sql: str, params=()) -> pd.DataFrame:
    if not USE_CACHE:
        return _read(db, sql, list(params))
    return _read_cached(db, sql, tuple(params), db_stamp(db))


def where(f: Filters, cols: dict[str, str], extra: list[str] | None = None) -> tuple[str, list]:
    """A WHERE clause for the active filters: `col IN (?, ?)` per dimension, values bound as parameters."""
    clauses, params = list(extra or []), []
    for name, col in cols.items():
        values = getattr(f, name)
        if values:
            clauses.append(f"{col} IN ({', '.join('?' * len(values))})")
            params.extend(values)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


# ---------------------------------------------------------------------------------------------- store status

def store_status(db: str) -> dict:
    """Counts that decide between the dashboard and the "fill the store" page. Never raises for a missing or
    uninitialised file: both mean "empty"."""
    if not os.path.exists(db):
        return {"exists": False, "runs": 0, "ok_runs": 0, "measurements": 0, "failed_measurements": 0}
    try:
        df = fetch(db, """
            SELECT (SELECT count(*) FROM runs) AS runs,
                   (SELECT count(*) FROM runs WHERE status = 'ok') AS ok_runs,
                   (SELECT count(*) FROM measurements) AS measurements,
                   (SELECT count(*) FROM measurements WHERE status <> 'ok') AS failed_measurements""")
    except duckdb.CatalogException:  # file exists but `init_db` never ran
        return {"exists": True, "runs": 0, "ok_runs": 0, "measurements": 0, "failed_measurements": 0}
    return {"exists": True, **{k: int(v) for k, v in df.iloc[0].items()}}


def filter_options(db: str) -> dict[str, list]:
    """The values each sidebar filter can take, from the runs (and the prompt categories)."""
    runs = fetch(db, """
        SELECT run_id, cell, started_utc, status, host, target, draft, strategy, k, gpus, temperature
        FROM runs WHERE paired_with IS NULL ORDER BY started_utc DESC, run_id""")  # paired baselines: not cells
    cats = fetch(db, "SELECT DISTINCT category FROM measurements WHERE category IS NOT NULL ORDER BY 1")
    pairs = sorted({pair_key(t, d if isinstance(d, str) else None) for t, d in zip(runs.target, runs.draft)})
    return {
        "pair": pairs,
        "strategy": sorted(runs.strategy.dropna().unique().tolist()),
        "k": sorted(int(x) for x in runs.k.dropna().unique()),
        "gpus": sorted(int(x) for x in runs.gpus.dropna().unique()),
        "category": cats.category.tolist(),
        "temperature": sorted(float(x) for x in runs.temperature.dropna().unique()),
        "host": sorted(runs.host.dropna().unique().tolist()),
        "run": runs.run_id.tolist(),
        # labels for the run selector: "cell · started · id"
        "run_labels": {r.run_id: f"{r.cell or r.strategy} · {r.started_utc} · {r.run_id[:8]}"
                       for r in runs.itertuples()},
    }


# ---------------------------------------------------------------------------------------------- cell figures

def _cells_sql(f: Filters) -> tuple[str, list]:
    """One row per cell from the `speedup` view with the figures of `cell_summary` (same key, same medians),
    filtered *before* aggregating so the category/run filters change the figures (the precomputed view cannot be
    filtered that way). With no filter set, every shared column equals cell_summary's.

    `predicted_speedup` is Leviathan et al.'s expected walltime improvement from the cell's median acceptance α
    and median cost ratio c: (1 − α^(k+1)) / ((1 − α)(k·c + 1)), and (k + 1) / (k·c + 1) when α = 1.
    `speedup_ci_low/high`: the 95 % bootstrap interval of the median (the store's median_ci, as in cell_summary);
    `noisy`/`noise_reason` from run_noise.
    """
    w, params = where(f, SPEEDUP_COLS)
    sql = f"""
        WITH agg AS (
            SELECT {CELL_KEYS},
                   bool_or(n.noisy) AS noisy,
                   string_agg(DISTINCT n.noise_reason, '; ' ORDER BY n.noise_reason) AS noise_reason,
                   list(s.speedup) FILTER (WHERE s.speedup IS NOT NULL) AS speedups,
                   count(DISTINCT s.run_id) AS runs,
                   count(*) AS n,
                   count(DISTINCT s.prompt_id) AS prompts,
                   median(s.speedup) AS speedup,
                   quantile_cont(s.speedup, 0.25) AS speedup_p25,
                   quantile_cont(s.speedup, 0.75) AS speedup_p75,
                   min(s.speedup) AS speedup_min,
                   max(s.speedup) AS speedup_max,
                   median(s.tokens_per_s) AS tokens_per_s,
                   median(s.baseline_tokens_per_s) AS baseline_tokens_per_s,
                   median(s.acceptance_rate) AS acceptance_rate,
                   median(s.mean_accepted_tokens) AS mean_accepted_tokens,
                   avg(CAST(s.matches_baseline AS DOUBLE)) AS share_identical,
                   count(s.matches_baseline) AS compared,
                   count(*) FILTER (WHERE NOT s.matches_baseline) AS mismatches,
                   median(s.cost_ratio_c) AS cost_ratio_c,
                   median(s.leviathan_speedup) AS leviathan_speedup_median,
                   median(s.ttft_s) AS ttft_s,
                   median(s.tpot_s) AS tpot_s,
                   max(s.peak_memory_bytes) AS peak_memory_bytes,
                   median(s.cost_per_mtok) AS cost_per_mtok,
                   -- over non-degenerate outputs only (as cell_summary's *_clean; NULL flags count in neither)
                   avg(CAST(s.degenerate AS DOUBLE)) AS degenerate_share,
                   count(*) FILTER (WHERE NOT s.degenerate) AS n_clean,
                   median(s.speedup) FILTER (WHERE NOT s.degenerate) AS speedup_clean,
                   median(s.acceptance_rate) FILTER (WHERE NOT s.degenerate) AS acceptance_rate_clean,
                   median(s.mean_accepted_tokens) FILTER (WHERE NOT s.degenerate) AS mean_accepted_tokens_clean
            FROM speedup s LEFT JOIN run_noise n ON n.run_id = s.run_id {w}
            GROUP BY {CELL_KEYS}),
        ci AS (SELECT *, median_ci(speedups) AS interval FROM agg)
        SELECT * EXCLUDE (speedups, interval),
               interval[1] AS speedup_ci_low, interval[2] AS speedup_ci_high,
               CASE WHEN acceptance_rate IS NULL OR cost_ratio_c IS NULL OR NOT draft_length >= 1 THEN NULL
                    WHEN acceptance_rate >= 1 THEN (draft_length + 1) / (draft_length * cost_ratio_c + 1)
                    ELSE (1 - pow(acceptance_rate, draft_length + 1))
                         / ((1 - acceptance_rate) * (draft_length * cost_ratio_c + 1))
               END AS predicted_speedup
        FROM ci"""
    return sql, params


def cells(db: str, f: Filters) -> pd.DataFrame:
    """Per-cell medians and spreads, fastest first; the figures most pages chart."""
    sql, params = _cells_sql(f)
    return fetch(db, sql + " ORDER BY speedup DESC NULLS LAST, strategy, draft_length, host, gpus, temperature",
                 params)


def best_k(db: str, f: Filters) -> pd.DataFrame:
    """The fastest draft length of every pair × strategy, separately per host, GPU count, sampling settings, weight
    format and threads (a draft length that pays on one machine need not pay on another). Only strategies that draft. Cells measured
    on a quiet machine come first: a noisy k is the answer only when every k of that row was noisy."""
    sql, params = _cells_sql(f)
    return fetch(db, f"""
        WITH c AS ({sql})
        SELECT target, draft, strategy, draft_length AS best_k, speedup, speedup_ci_low, speedup_ci_high,
               noisy, noise_reason, speedup_p25, speedup_p75,
               acceptance_rate, mean_accepted_tokens, cost_ratio_c, predicted_speedup, tokens_per_s,
               baseline_tokens_per_s, cost_per_mtok, host, gpus, temperature, top_p, top_k, max_new_tokens, weights,
               threads, n
        FROM c
        WHERE draft_length IS NOT NULL AND speedup IS NOT NULL
        QUALIFY row_number() OVER (
            PARTITION BY host, target, draft, strategy, gpus, temperature, top_p, top_k, max_new_tokens, weights,
                         threads
            ORDER BY coalesce(noisy, false), speedup DESC, draft_length) = 1
        ORDER BY coalesce(noisy, false), speedup DESC, target, draft, strategy""", params)


# ---------------------------------------------------------------------------------------------- leaderboard

def leaderboard(db: str, f: Filters) -> tuple[pd.DataFrame, dict]:
    """The leaderboard of `specdec report` (same SQL: specdec.db.report) over the filtered rows: one row per cell
    with its speedup per category, mean accepted tokens and overall speedup. Returns (numbers, store features)."""
    from specdec.db import report

    features = {k: bool(v) for k, v in fetch(db, report.FEATURES_SQL).iloc[0].items()}
    w, params = where(f, SPEEDUP_COLS)
    cells = fetch(db, report.cell_groups_sql(features, False, w), params)
    by_category = fetch(db, report.cell_groups_sql(features, True, w), params)
    return report.leaderboard_frame(cells, by_category), features


def batch_cells(db: str, f: Filters) -> pd.DataFrame:
    """The report's cells (specdec.db.report.cell_groups_sql, batch size part of the cell) over the filtered rows,
    for speedup vs batch size."""
    from specdec.db import report

    features = {k: bool(v) for k, v in fetch(db, report.FEATURES_SQL).iloc[0].items()}
    if not features.get("batch"):
        return pd.DataFrame()
    w, params = where(f, SPEEDUP_COLS)
    return fetch(db, report.cell_groups_sql(features, False, w), params)


def engines(db: str, f: Filters) -> pd.DataFrame:
    """Every engine × strategy × weight format (× threads) at its fastest draft length: tok/s, speedup over the same
    engine's plain decoding in the same format, tokens per target pass, and the plain decoding's own tok/s."""
    sql, params = _cells_sql(f)
    return fetch(db, f"""
        WITH c AS ({sql})
        SELECT engine, strategy, weights, threads, draft_length AS best_k, tokens_per_s, baseline_tokens_per_s,
               speedup, speedup_p25, speedup_p75, mean_accepted_tokens, acceptance_rate, share_identical, host,
               target, draft, gpus, temperature, top_p, top_k, max_new_tokens, n
        FROM c
        QUALIFY row_number() OVER (
            PARTITION BY host, target, draft, strategy, weights, threads, gpus, temperature, top_p, top_k,
                         max_new_tokens
            ORDER BY speedup DESC NULLS LAST, draft_length) = 1
        ORDER BY host, target, engine, weights, threads, strategy""", params)


# ---------------------------------------------------------------------------------------------- acceptance

def acceptance_by(db: str, f: Filters, by: str) -> pd.DataFrame:
    """Median acceptance rate and mean accepted tokens per cell and category (`by="category"`) or prompt."""
    group = {"category": "s.category", "prompt": "s.category, s.prompt_id"}[by]  # fixed SQL, never user text
    w, params = where(f, SPEEDUP_COLS, ["s.acceptance_rate IS NOT NULL"])
    return fetch(db, f"""
        SELECT {CELL_KEYS}, {group},
               median(s.acceptance_rate) AS acceptance_rate,
               median(s.mean_accepted_tokens) AS mean_accepted_tokens,
               median(s.speedup) AS speedup, count(*) AS n,
               avg(CAST(s.degenerate AS DOUBLE)) AS degenerate_share
        FROM speedup s {w}
        GROUP BY ALL ORDER BY ALL""", params)


def degenerate_rules(db: str, f: Filters) -> list[dict]:
    """The rules (params `degenerate`: ngram, repeat_share, copy_share) the filtered runs flagged outputs with."""
    w, params = where(f, RUNS_COLS, ["json_extract(r.params_json, '$.degenerate') IS NOT NULL"])
    rules = fetch(db, f"""
        SELECT DISTINCT CAST(json_extract(r.params_json, '$.degenerate') AS VARCHAR) AS rule
        FROM runs r {w} ORDER BY 1""", params)
    return [json.loads(rule) for rule in rules.rule]


def degenerate_outputs(db: str, f: Filters) -> pd.DataFrame:
    """Every output flagged degenerate (copied from its prompt or looping), with its shares and text."""
    w, params = where(f, SPEEDUP_COLS, ["s.degenerate"])
    return fetch(db, f"""
        SELECT s.host, s.target, s.draft, s.strategy, s.draft_length, s.gpus, s.temperature,
               s.prompt_id, s.category, s."repeat", s.copy_share, s.repeat_share, s.acceptance_rate,
               s.mean_accepted_tokens, s.speedup, m.text, s.run_id
        FROM speedup s
        JOIN measurements m ON m.run_id = s.run_id AND m.prompt_id = s.prompt_id AND m."repeat" = s."repeat"
        {w}
        ORDER BY s.category, s.prompt_id, s.target, s.draft, s.strategy, s.draft_length, s."repeat" """, params)


def acceptance_per_position(db: str, f: Filters) -> pd.DataFrame:
    """Acceptance at each draft position, per cell: the per-position counts summed over the cell's measurements,
    then accepted ÷ proposed. Every target step proposes all k positions (fewer only near max_new_tokens) and
    position i counts as accepted when the first i drafts all were, so the curve falls with i."""
    w, params = where(f, SPEEDUP_COLS, ["m.proposed_per_position IS NOT NULL"])
    return fetch(db, f"""
        WITH x AS (
            SELECT {CELL_KEYS},
                   -- CAST first: works whether the store keeps the lists as JSON text or as a list type
                   from_json(CAST(m.accepted_per_position AS VARCHAR), '["BIGINT"]') AS acc,
                   from_json(CAST(m.proposed_per_position AS VARCHAR), '["BIGINT"]') AS prop
            FROM speedup s
            JOIN measurements m ON m.run_id = s.run_id AND m.prompt_id = s.prompt_id AND m."repeat" = s."repeat"
            {w}),
        y AS (SELECT *, unnest(range(1, len(prop) + 1)) AS position FROM x)
        SELECT host, target, draft, strategy, draft_length, gpus, temperature, top_p, top_k, max_new_tokens,
               position, sum(acc[position]) AS accepted, sum(prop[position]) AS proposed,
               sum(acc[position]) / nullif(sum(prop[position]), 0) AS acceptance
        FROM y GROUP BY ALL ORDER BY ALL""", params)


# ---------------------------------------------------------------------------------------------- losslessness

def mismatches(db: str, f: Filters) -> pd.DataFrame:
    """Every greedy output that differs from its baseline, with both texts so the divergence can be read."""
    w, params = where(f, SPEEDUP_COLS, ["s.matches_baseline = false"])
    return fetch(db, f"""
        SELECT s.host, s.target, s.draft, s.strategy, s.draft_length, s.gpus, s.temperature,
               s.prompt_id, s.category, s."repeat", s.run_id, m.new_tokens, m.text,
               -- the output the view compared against (its paired decode, or the shared baseline's first repeat)
               bm.text AS baseline_text, s.baseline_source
        FROM speedup s
        JOIN measurements m ON m.run_id = s.run_id AND m.prompt_id = s.prompt_id AND m."repeat" = s."repeat"
        LEFT JOIN measurements bm ON bm.run_id = s.baseline_run_id AND bm.prompt_id = s.prompt_id
                                 AND bm."repeat" = s.baseline_repeat
        {w}
        ORDER BY s.target, s.draft, s.strategy, s.draft_length, s.prompt_id, s."repeat" """, params)


# ---------------------------------------------------------------------------------------------- provenance

def runs(db: str, f: Filters) -> pd.DataFrame:
    """Every run with its provenance and how many of its measurements succeeded."""
    w, params = where(f, RUNS_COLS)
    return fetch(db, f"""
        SELECT r.*, coalesce(c.ok, 0) AS ok_measurements, coalesce(c.failed, 0) AS failed_measurements
        FROM runs r
        LEFT JOIN (SELECT run_id, count(*) FILTER (WHERE status = 'ok') AS ok,
                          count(*) FILTER (WHERE status <> 'ok') AS failed
                   FROM measurements GROUP BY run_id) c ON c.run_id = r.run_id
        {w}
        ORDER BY r.started_utc DESC, r.run_id""", params)


def failures(db: str, f: Filters) -> pd.DataFrame:
    """The `failures` view (every failed measurement) grouped by run and error text."""
    w, params = where(f, MEASUREMENT_RUN_COLS)
    return fetch(db, f"""
        SELECT x.run_id, r.started_utc, x.host, x.cell, x.target, x.draft, x.strategy, x.k, r.gpus,
               r.status AS run_status, x.error, count(*) AS measurements,
               string_agg(DISTINCT x.prompt_id, ', ' ORDER BY x.prompt_id) AS prompts
        FROM failures x
        JOIN runs r ON r.run_id = x.run_id
        JOIN measurements m ON m.run_id = x.run_id AND m.prompt_id = x.prompt_id AND m."repeat" = x."repeat"
        {w}
        GROUP BY ALL ORDER BY r.started_utc DESC, x.run_id, x.error""", params)


def schema(db: str) -> pd.DataFrame:
    """Tables, views and their columns, as a reference beside the SQL console."""
    return fetch(db, """
        SELECT table_name, string_agg(column_name, ', ' ORDER BY ordinal_position) AS columns
        FROM information_schema.columns WHERE table_schema = 'main'
        GROUP BY table_name ORDER BY table_name""")
