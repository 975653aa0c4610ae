"""One function per dashboard page: `page_x(db, filters)`. All SQL lives in queries.py; here we only shape and draw."""

from __future__ import annotations

import textwrap

import altair as alt
import pandas as pd
import streamlit as st

from specdec.dashboard import queries as q
from specdec.dashboard.queries import Filters
from specdec.db.query import QueryError, UnsafeSQLError, run_query
from specdec.db.text import escape_markdown, show_frame_controls
from specdec.strategies import STRATEGIES, is_plain_baseline

# What fills an empty store, from the repository root: the default matrix (its last step ingests), or ingesting
# result files that already exist. Both write the default store ($SPECDEC_DB or results/specdec.duckdb).
FILL_COMMANDS = ("snakemake --cores 2", "specdec ingest results/")
CHART_HEIGHT = 340
LEGEND_ROWS = 30  # entries a legend lists before "… N entries"
MANY_SERIES = 16  # above this, a chart of one line/bar per cell needs the filters to be readable
HEATMAP_WIDTH = 560  # px shared by side-by-side heat maps, beside LABEL_LIMIT px of labels
MAX_TABLE_ROWS = 2000  # rows a long listing shows on the page; its CSV download has them all
LABEL_LIMIT = 440  # px of a y-axis label before it is cut with "…"; series labels are long

# A fixed colour per strategy (Tableau 10), so a strategy looks the same whatever the filters leave on the page.
STRATEGY_COLORS = {name: s.color for name, s in STRATEGIES.items()}
OTHER_COLORS = ["#9c755f", "#d37295", "#a0cbe8", "#8cd17d"]  # strategies the registry no longer has
TABLE_ROWS = 10  # rows st.dataframe shows before it scrolls
TABLE_WIDTH = 940  # px of a table the page shows before it scrolls sideways (wide layout, 1400 px window)


# ---------------------------------------------------------------------------------------------- helpers

def series_label(df: pd.DataFrame, with_k: bool = False, like: pd.DataFrame | None = None) -> pd.Series:
    """"target ← draft · strategy", plus host / GPUs / temperature only when those vary in `like` (default: `df`),
    so lines that mix machines or sampling settings never collapse into one. Pages pass the unfiltered cells as
    `like`, so a filter changes neither a series' label nor (see all_series) its colour."""
    like = df if like is None else like
    has_draft = df.draft.notna() & (df.draft.astype(str) != "")
    # vectorised: the by-prompt tables have one row per cell × prompt, tens of thousands on a big store
    label = (df.target.astype(str) + (" ← " + df.draft.astype(str)).where(has_draft, "")
             + " · " + df.strategy.astype(str))
    if with_k:
        label += df.draft_length.map(lambda k: "" if pd.isna(k) else f" · k={int(k)}")
    for col, fmt in (("host", "{}"), ("gpus", "{} GPU"), ("temperature", "T={}"), ("top_p", "top-p={}"),
                     ("top_k", "top-k={}"), ("max_new_tokens", "{} new tokens"), ("weights", "{}"),
                     ("threads", "{} threads")):
        if col in df and col in like and like[col].nunique(dropna=False) > 1:
            label += " · " + df[col].map(lambda v: fmt.format(v))
    return label



def all_series(db: str, with_k: bool = False, drop: tuple = ()) -> tuple[list[str], pd.DataFrame]:
    """(every series label of the store's cells, sorted; the unfiltered cells to label like): the colour domain
    of a page, the same whatever the filters leave on it."""
    full = q.cells(db, Filters()).drop(columns=list(drop))
    return sorted(series_label(full, with_k).unique()), full


def series_color(domain, field: str = "series", title: str = "pair · strategy", shown=None) -> alt.Color:
    """One colour per series, the same in every chart of a page and under any filter (`domain`: every series the
    page can show, from all_series), and a legend below the chart with full labels (they are long: pair ·
    strategy · k · ...) listing only the series drawn (`shown`, default the whole domain)."""
    domain = list(dict.fromkeys(domain))
    shown = domain if shown is None else [s for s in domain if s in set(shown)]
    scheme = "category10" if len(domain) <= 10 else "tableau20"
    return alt.Color(f"{field}:N", title=title, scale=alt.Scale(scheme=scheme, domain=domain),
                     legend=alt.Legend(orient="bottom", columns=1, labelLimit=0, symbolOpacity=1,
                                       symbolLimit=LEGEND_ROWS, values=shown))


def strategy_scale(db: str) -> alt.Scale:
    """Every strategy of the store with its fixed colour (STRATEGY_COLORS; others by their place in the store's
    list), so filtering never recolours one."""
    strategies = q.filter_options(db)["strategy"]
    others = iter(OTHER_COLORS * (1 + len(strategies) // len(OTHER_COLORS)))
    return alt.Scale(domain=strategies, range=[STRATEGY_COLORS.get(name) or next(others) for name in strategies])


def with_legend(plot_height: int, legend_rows: int) -> int:
    """Chart height for a plot of `plot_height` px above a one-column legend: Streamlit sizes a stretched chart
    with autosize "fit", which counts the legend and axis titles inside the height."""
    return plot_height + 60 + 16 * min(legend_rows, LEGEND_ROWS + 1)


def many_series_hint(n: int) -> None:
    if n > MANY_SERIES:
        st.caption(f"{n} cells in one chart: narrow them with the sidebar filters (pair, strategy, host, GPUs, "
                   "temperature) for a readable view; the table lists them all.")


def cell_heatmaps(df: pd.DataFrame, x: str, x_title: str, panels, text: bool = True):
    """Heat maps side by side, one per (metric, title, number format): a row per cell (`series`), a column per
    value of `x`, the number written in each square when there is room. Cell labels on the first only; unlike
    grouped bars this stays readable with a hundred cells. One panel stretches to the page; several share
    HEATMAP_WIDTH px (Vega-Lite cannot stretch a concatenation)."""
    rows = sorted(df.series.unique())
    n_x = df[x].nunique()
    column = max(6, min(46, HEATMAP_WIDTH // (len(panels) * n_x)))
    text = text and column >= 30
    # x labels: level when the longest fits its column (~6.5 px a character at 11 px), else slanted or upright;
    # none is dropped (Vega's overlap removal hid one of two long category names) unless columns are too narrow
    # for even upright text
    panel_width = max(column * n_x, 120)
    band = panel_width / n_x if len(panels) > 1 else max(column, HEATMAP_WIDTH / n_x)  # one panel: stretched
    widest = 6.5 * max(len(str(v)) for v in df[x].unique())
    angle = 0 if widest <= band - 4 else -45 if band >= 18 else -90
    charts = []
    for i, (metric, title, fmt) in enumerate(panels):
        lo, hi = float(df[metric].min()), float(df[metric].max())
        base = alt.Chart(df).encode(
            y=alt.Y("series:N", title=None, sort=rows, axis=alt.Axis(labelLimit=LABEL_LIMIT) if i == 0 else None),
            x=alt.X(f"{x}:N", title=x_title, axis=alt.Axis(labelAngle=angle, labelOverlap=band < 12)))
        layer = base.mark_rect().encode(
            color=alt.Color(f"{metric}:Q", title=textwrap.wrap(title, max(16, int(panel_width / 6.5))),
                            scale=alt.Scale(scheme="viridis"),
                            legend=alt.Legend(orient="top", gradientLength=min(160, panel_width), titleLimit=0)),
            tooltip=["series", x, alt.Tooltip(f"{metric}:Q", format=".3f"), "n"])
        if text:  # dark squares (low values in viridis) get white numbers
            layer += base.mark_text(fontSize=11).encode(
                text=alt.Text(f"{metric}:Q", format=fmt),
                color=alt.condition(f"datum['{metric}'] < {(lo + hi) / 2!r}", alt.value("white"), alt.value("black")))
        charts.append(layer.properties(width=panel_width, height=20 * len(rows)))
    if len(charts) == 1:  # stretched: autosize "fit" counts the legend and axis labels in the height
        return charts[0].properties(width="container", height=20 * len(rows) + 160)
    return alt.hconcat(*charts, spacing=24).resolve_scale(color="independent")


def show(chart, where=st) -> None:
    """theme=None: Streamlit's chart theme replaces our colour scheme and legend settings. Side-by-side charts
    keep the panel widths they were given (Vega-Lite cannot stretch a concatenation to the container)."""
    width = "content" if isinstance(chart, (alt.HConcatChart, alt.ConcatChart)) else "stretch"
    where.altair_chart(chart, width=width, theme=None)


def table(df: pd.DataFrame, **kwargs) -> None:
    """st.dataframe with floats shown to 3 decimals (medians of ratios carry float noise otherwise)."""
    config = {c: st.column_config.NumberColumn(c, format="%.3f") for c in df.columns
              if pd.api.types.is_float_dtype(df[c])}
    config.update(kwargs.pop("column_config", {}))
    st.dataframe(df, hide_index=True, column_config=config, **kwargs)
    hint = scroll_hint(df)
    if hint:
        st.caption(hint)


def scroll_hint(df: pd.DataFrame) -> str | None:
    """A caption for a table the page cuts off (st.dataframe scrolls inside itself, without a visible scrollbar
    until the pointer is on it). Width is estimated from the text as shown (floats to 3 decimals): ~7 px a
    character, at most 48 characters a column, plus 24 px of padding (measured in Chromium at 1400 px)."""
    sample = df.head(200)

    def shown(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    width = sum(24 + 7 * min(48, max([len(str(c))] + [len(shown(v)) for v in sample[c]])) for c in df.columns)
    parts = ([f"all {len(df)} rows"] if len(df) > TABLE_ROWS else []) + (
        [f"all {len(df.columns)} columns (sideways)"] if width > TABLE_WIDTH else [])
    return f"Scroll inside the table to see {' and '.join(parts)}." if parts else None


def csv_download(df: pd.DataFrame, name: str, key: str) -> None:
    st.download_button("Download CSV", df.to_csv(index=False).encode(), file_name=name, mime="text/csv", key=key,
                       on_click="ignore")


def no_rows(f: Filters, what: str = "cells") -> None:
    if any(getattr(f, name) for name in q.FILTER_NAMES):
        st.info(f"No {what} match the sidebar filters. Clear a filter to see more.")
    else:  # runs exist (or the empty-store page would show), but none gave this kind of figure
        st.info(f"No {what} in the store yet. The Runs page lists every run and failure.")


def baseline_rule(y: float = 1.0) -> alt.Chart:
    return alt.Chart(pd.DataFrame({"y": [y]})).mark_rule(strokeDash=[6, 4], color="gray").encode(y="y:Q")


def fmt_k(k) -> str:
    return "—" if pd.isna(k) else str(int(k))


def noisy_mask(df: pd.DataFrame) -> pd.Series:
    """True where a cell was measured on a noisy machine (NULL, no readings, counts as not known to be noisy)."""
    return df.noisy.map(lambda v: bool(v) if pd.notna(v) else False).astype(bool)


def noise_text(df: pd.DataFrame) -> pd.Series:
    """A table column that cannot be missed: "⚠ noisy: <reason>" on noisy cells, blank otherwise."""
    return df.noise_reason.where(noisy_mask(df)).map(lambda r: f"⚠ noisy: {r}" if isinstance(r, str) else "")


def fmt_ci(low, high) -> str:
    return "—" if pd.isna(low) else f"{low:.2f}–{high:.2f}×"


def md(value) -> str:
    """A stored value inside a caption or warning (Streamlit renders Markdown): shown as written, no markup."""
    return escape_markdown(str(value))


def warn_noisy(df: pd.DataFrame, label: pd.Series) -> None:
    """A visible warning naming every noisy cell on the page, with why it was flagged."""
    noisy = df[noisy_mask(df)]
    if noisy.empty:
        return
    lines = "\n".join(f"- {md(name)}: {md(reason)}" for name, reason in zip(label[noisy.index], noisy.noise_reason))
    st.warning(f"{len(noisy)} cell(s) were measured while other work loaded the machine; their speedups are not "
               f"trustworthy (re-run them on a quieter machine, or see `noise:` in the config):\n{lines}", icon="⚠️")


# ---------------------------------------------------------------------------------------------- empty store

def page_empty(db: str, status: dict, chosen: bool = False) -> None:
    """The store is missing or has no runs: say exactly which commands fill it. `chosen`: the user picked this
    store with --db, so the default-store commands alone would fill a different file."""
    st.title("specdec dashboard")
    what = "does not exist yet" if not status["exists"] else "has no runs yet"
    st.warning(f"The results store `{db}` {what}.")
    st.markdown("Fill it from the repository root. Run the benchmark matrix (its last step ingests the results):")
    st.code(FILL_COMMANDS[0], language="bash")
    st.markdown("or, if result files already exist, insert them into the store:")
    st.code(FILL_COMMANDS[1], language="bash")
    if chosen:  # both commands above write the default store ($SPECDEC_DB or results/specdec.duckdb)
        st.markdown(f"This dashboard reads `{db}` (from `--db`), not the default store; fill that one with:")
        st.code(f"specdec ingest --db {db} results/", language="bash")
    st.markdown("Then reload this page. To open another store: `specdec dashboard --db PATH`.")


# ---------------------------------------------------------------------------------------------- overview

def page_overview(db: str, f: Filters) -> None:
    st.header("Overview")
    c = q.cells(db, f)
    # cells that draft (a draft length) and have a baseline to compare with (a speedup)
    spec = c[c.draft_length.notna() & c.speedup.notna()]
    if spec.empty:
        no_rows(f, "speculative cells with a baseline")
        return
    # cells() is ordered by median speedup, fastest first; the headline is the fastest cell measured on a quiet
    # machine, never silently a noisy one
    quiet = spec[~noisy_mask(spec)]
    top = (quiet if len(quiet) else spec).iloc[0]
    faster_noisy = spec[noisy_mask(spec) & (spec.speedup > top.speedup)]
    if len(quiet) == 0:
        st.warning(f"Every cell here was measured on a noisy machine; the best one is shown, but its speedup is not "
                   f"trustworthy: {md(top.noise_reason)}.", icon="⚠️")
    elif len(faster_noisy):
        fast = faster_noisy.iloc[0]
        st.warning(f"Not taken as the best: {md(series_label(faster_noisy).iloc[0])} · k={fmt_k(fast.draft_length)} "
                   f"measured {fast.speedup:.2f}× on a noisy machine ({md(fast.noise_reason)})"
                   + (f", and {len(faster_noisy) - 1} more noisy cell(s) above the best quiet one"
                      if len(faster_noisy) > 1 else "") + ".", icon="⚠️")
    pair = q.pair_label(q.pair_key(top.target, top.draft if isinstance(top.draft, str) else None))
    # two rows of cards: strategy and pair names are long and a fifth of the width cuts them short
    cards = st.columns(4, border=True)
    cards[0].metric("Best speedup", f"{top.speedup:.2f}×",
                    help="Median over prompts and repeats of tokens/s ÷ the baseline's tokens/s (paired: decoded in "
                         "the same job), best cell measured on a quiet machine")
    cards[1].metric("Draft length k", fmt_k(top.draft_length))
    cards[2].metric("Acceptance rate", "—" if pd.isna(top.acceptance_rate) else f"{top.acceptance_rate:.1%}",
                    help="Median accepted ÷ proposed draft tokens in that cell")
    cards[3].metric("Predicted (Leviathan)",
                    "—" if pd.isna(top.predicted_speedup) else f"{top.predicted_speedup:.2f}×",
                    help="(1 − α^(k+1)) / ((1 − α)(k·c + 1)) from the cell's median α and draft cost ratio c")
    names = st.columns([1.3, 3], border=True)
    names[0].metric("Strategy", top.strategy)
    names[1].metric("Pair (target ← draft)", pair)
    why = (f" Why: acceptance α = {top.acceptance_rate:.2f} and draft cost c = {top.cost_ratio_c:.3f} predict "
           f"{top.predicted_speedup:.2f}×; measured {top.speedup:.2f}×."
           if pd.notna(top.predicted_speedup) else "")
    st.caption(f"Host {md(top.host)}, {int(top.gpus)} GPU(s), temperature {top.temperature}; "
               f"95 % confidence interval of the median speedup {fmt_ci(top.speedup_ci_low, top.speedup_ci_high)} "
               f"(bootstrap over {int(top.n)} prompt × repeat measurements), p25–p75 "
               f"{top.speedup_p25:.2f}–{top.speedup_p75:.2f}; "
               f"{top.tokens_per_s:.1f} tok/s vs baseline {top.baseline_tokens_per_s:.1f} tok/s." + why)

    st.subheader("Best draft length per pair × strategy")
    b = q.best_k(db, f)
    b.insert(0, "pair", [q.pair_label(q.pair_key(t, d if isinstance(d, str) else None))
                         for t, d in zip(b.target, b.draft)])
    b["noise"] = noise_text(b)  # a noisy k is only chosen when every k of its row was noisy
    b = b.drop(columns=["noisy", "noise_reason"])
    # settings that are the same in every row add nothing to the table; the others tell two rows of one pair
    # and strategy apart, so they come first
    settings = ("host", "gpus", "temperature", "top_p", "top_k", "max_new_tokens", "weights", "threads")
    constant = [c for c in settings if b[c].nunique() <= 1]
    unpriced = [] if b.cost_per_mtok.notna().any() else ["cost_per_mtok"]  # no device prices configured
    shown = b.drop(columns=["target", "draft", *constant, *unpriced])
    lead = ["pair", "strategy", *(c for c in settings if c not in constant)]
    table(shown[lead + [c for c in shown.columns if c not in lead]], column_config={
        "cost_per_mtok": st.column_config.NumberColumn("cost per 1M tokens", format="%.4f"),
        "best_k": st.column_config.NumberColumn("best k", format="%d"),
        "speedup": st.column_config.NumberColumn("speedup", format="%.2f×"),
        "speedup_ci_low": st.column_config.NumberColumn("95 % CI low", format="%.2f×"),
        "speedup_ci_high": st.column_config.NumberColumn("95 % CI high", format="%.2f×"),
        "predicted_speedup": st.column_config.NumberColumn("predicted", format="%.2f×"),
        "acceptance_rate": st.column_config.NumberColumn("acceptance", format="percent"),
        "tokens_per_s": st.column_config.NumberColumn("tok/s", format="%.1f"),
        "baseline_tokens_per_s": st.column_config.NumberColumn("baseline tok/s", format="%.1f")})
    stated = [c for c in constant if b[c].notna().any()]  # unset weights/threads (the alias's, torch's): nothing to say
    if stated:
        st.caption("All rows: " + ", ".join(f"{c} = {md(b[c].iloc[0])}" for c in stated) + ".")

    status = q.store_status(db)
    s = st.columns(3)
    s[0].metric("Runs in store", status["runs"])
    s[1].metric("Measurements", status["measurements"])
    s[2].metric("Failed measurements", status["failed_measurements"])


# ---------------------------------------------------------------------------------------------- leaderboard

def page_leaderboard(db: str, f: Filters) -> None:
    from specdec.db import report

    st.header("Leaderboard")
    board, features = q.leaderboard(db, f)
    if board.empty:
        no_rows(f, "measurements")
        return
    st.caption("Spec-Bench's form: one row per method, draft and k; the median speedup per prompt category (Spec-Bench's "
               "MT-Bench questions are one category, `multi-turn`), mean accepted tokens, overall speedup. "
               "`specdec report` writes the same table as Markdown and HTML.")
    table(report.display_frame(board), height=min(35 * (len(board) + 1) + 3, 1100))  # every row, up to ~30
    for note in report.notes(features, board):
        st.caption(escape_markdown(note, keep="`"))  # our notes' code spans stay; stored names in them stay text
    csv_download(board, "leaderboard.csv", "dl_leaderboard")


# ---------------------------------------------------------------------------------------------- speedup vs k

def page_speedup(db: str, f: Filters) -> None:
    st.header("Speedup vs draft length")
    c = q.cells(db, f)
    d = c[(c.strategy != "baseline") & c.draft_length.notna()].copy()
    if d.empty:
        no_rows(f, "cells with a draft length")
        return
    domain, full = all_series(db)
    d["series"] = series_label(d, like=full)
    d["noise"] = noise_text(d)
    n_series = d.series.nunique()
    warn_noisy(d, d.series + " · k=" + d.draft_length.map(fmt_k))
    # bands of many series overlap into one smear: off by default then (the table keeps the spread)
    spread = st.radio("Band", ["p25–p75", "min–max", "none"], index=0 if n_series <= 8 else 2, horizontal=True,
                      key="speedup_band", help="Spread of the per-measurement speedup over prompts and repeats")
    lo, hi = ("speedup_min", "speedup_max") if spread == "min–max" else ("speedup_p25", "speedup_p75")
    many_series_hint(n_series)
    base = alt.Chart(d).encode(x=alt.X("draft_length:Q", title="draft length k", axis=alt.Axis(tickMinStep=1)),
                               color=series_color(domain, shown=d.series))
    line = base.mark_line(point=True).encode(
        y=alt.Y("speedup:Q", title="speedup over baseline (×)"),
        tooltip=["series", "draft_length", alt.Tooltip("speedup:Q", format=".2f"),
                 alt.Tooltip("speedup_ci_low:Q", title="95 % CI low", format=".2f"),
                 alt.Tooltip("speedup_ci_high:Q", title="95 % CI high", format=".2f"),
                 alt.Tooltip(f"{lo}:Q", format=".2f"), alt.Tooltip(f"{hi}:Q", format=".2f"),
                 alt.Tooltip("acceptance_rate:Q", format=".2f"), "noise", "n"])
    # error bars: the 95 % bootstrap interval of each median; a red ring marks cells measured on a noisy machine
    ci = base.mark_errorbar(ticks=True).encode(y=alt.Y("speedup_ci_low:Q", title="speedup over baseline (×)"),
                                               y2="speedup_ci_high:Q")
    noisy = base.transform_filter("datum.noisy === true").mark_point(
        size=260, color="#d62728", strokeWidth=2, filled=False).encode(
        y="speedup:Q", color=alt.value("#d62728"), tooltip=["series", "draft_length", "noise"])
    layers = [line, ci, noisy, baseline_rule()]
    if spread != "none":
        layers.insert(0, base.mark_area(opacity=0.2).encode(y=f"{lo}:Q", y2=f"{hi}:Q"))
    show(alt.layer(*layers).properties(height=with_legend(CHART_HEIGHT, n_series + 1)))
    st.caption("Line: median speedup of the cell; error bars: its 95 % bootstrap confidence interval over prompt × "
               "repeat pairs" + ("" if spread == "none" else f"; band: {spread} over prompts and repeats")
               + "; red ring: measured on a noisy machine. Dashed rule: the baseline (1.0×). Strategies without a "
               "draft length (baseline, hf-generate) are not drawn.")
    table(d[["series", "draft_length", "speedup", "speedup_ci_low", "speedup_ci_high", lo, hi, "noise",
             "acceptance_rate", "mean_accepted_tokens", "tokens_per_s", "baseline_tokens_per_s", "n"]],
          column_config={"speedup_ci_low": st.column_config.NumberColumn("95 % CI low", format="%.3f"),
                         "speedup_ci_high": st.column_config.NumberColumn("95 % CI high", format="%.3f")})


# ---------------------------------------------------------------------------------------------- acceptance

def page_acceptance(db: str, f: Filters) -> None:
    st.header("Acceptance")
    cat = q.acceptance_by(db, f, "category")
    if cat.empty:
        no_rows(f, "measurements with acceptance figures")
        return
    colors, full = all_series(db, with_k=True)  # one colour per cell on every chart of this page, any filter
    cat["series"] = series_label(cat, with_k=True, like=full)
    st.subheader("By category")
    many_series_hint(cat.series.nunique())
    show(cell_heatmaps(cat, "category", "prompt category",
                       [("acceptance_rate", "acceptance rate (median)", ".2f"),
                        ("mean_accepted_tokens", "mean accepted tokens per step (median)", ".2f")]))

    st.subheader("Acceptance per draft position")
    pos = q.acceptance_per_position(db, f)
    if pos.empty:
        st.info("No per-position counts in the filtered cells (hf-* runners do not report them).")
    else:
        pos["series"] = series_label(pos, with_k=True, like=full)
        chart = alt.Chart(pos).mark_line(point=True).encode(
            x=alt.X("position:Q", title="draft position (1 = first proposed token)", axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("acceptance:Q", title="accepted ÷ proposed", scale=alt.Scale(domain=[0, 1])),
            color=series_color(colors, title="pair · strategy · k", shown=pos.series),  # legend: drawn cells only
            tooltip=["series", "position", "accepted", "proposed", alt.Tooltip("acceptance:Q", format=".3f")])
        show(chart.properties(height=with_legend(CHART_HEIGHT, pos.series.nunique() + 1)))
        st.caption("Per-position counts summed over every prompt and repeat of the cell. Each target step "
                   "proposes all k positions; position i counts as accepted when drafts 1..i all were, so the "
                   "curve shows how far into a draft the target keeps agreeing.")

    st.subheader("By prompt")
    by_prompt = q.acceptance_by(db, f, "prompt")
    by_prompt["series"] = series_label(by_prompt, with_k=True, like=full)
    show(cell_heatmaps(by_prompt, "prompt_id", "prompt", [("acceptance_rate", "acceptance rate (median)", ".2f")]))
    table(by_prompt[["series", "category", "prompt_id", "acceptance_rate", "mean_accepted_tokens",
                            "speedup", "degenerate_share", "n"]])
    acceptance_without_degenerate(db, f)


EXCERPT_CHARS = 200


def rule_text(rule: dict) -> str:
    n = rule["ngram"]
    return (f"at least {rule['repeat_share']:.0%} of its tokens lie in {n}-grams it already produced (a loop) or "
            f"at least {rule['copy_share']:.0%} in {n}-grams copied from the prompt")


def acceptance_without_degenerate(db: str, f: Filters) -> None:
    """Each cell's acceptance and speedup over all outputs next to the same figures without degenerate ones, and
    the degenerate outputs themselves."""
    st.subheader("All outputs vs non-degenerate outputs")
    c = q.cells(db, f)
    c = c[c.acceptance_rate.notna()].copy()
    if c.degenerate_share.isna().all():
        st.info("These measurements carry no degenerate flag (stored before specdec measured copying and "
                "repetition); run the cells again to see the split.")
        return
    rules = q.degenerate_rules(db, f)
    described = ("; in other runs, when ".join(rule_text(r) for r in rules)
                 or "its copy or repeat share reaches its run's threshold")
    st.caption(f"An output is degenerate when {described} (config key `degenerate`, docs/results.md). Prompt "
               "lookup drafts such text for free, so its acceptance measures the model's failure more than the "
               "method. The non-degenerate medians leave those outputs out.")
    c["series"] = series_label(c, with_k=True)
    split = pd.concat([
        pd.DataFrame({"series": c.series, "outputs": "all", "acceptance_rate": c.acceptance_rate,
                      "mean_accepted_tokens": c.mean_accepted_tokens, "n": c.n}),
        pd.DataFrame({"series": c.series, "outputs": "non-degenerate", "acceptance_rate": c.acceptance_rate_clean,
                      "mean_accepted_tokens": c.mean_accepted_tokens_clean, "n": c.n_clean})])
    show(cell_heatmaps(split, "outputs", "outputs", [("acceptance_rate", "acceptance rate (median)", ".2f"),
                                                     ("mean_accepted_tokens", "accepted tokens per step (median)",
                                                      ".2f")]))
    table(c[["series", "degenerate_share", "acceptance_rate", "acceptance_rate_clean", "mean_accepted_tokens",
             "mean_accepted_tokens_clean", "speedup", "speedup_clean", "n", "n_clean"]],
          column_config={"degenerate_share": st.column_config.NumberColumn("degenerate", format="percent")})

    d = q.degenerate_outputs(db, f)
    st.subheader(f"Degenerate outputs ({len(d)})")
    if d.empty:
        st.success("No output in these cells is degenerate.")
        return
    d.insert(0, "series", series_label(d, with_k=True))
    d["excerpt"] = d.text.fillna("").map(lambda t: t if len(t) <= EXCERPT_CHARS else t[:EXCERPT_CHARS] + "…")
    if len(d) > MAX_TABLE_ROWS:
        st.caption(f"The first {MAX_TABLE_ROWS} are shown; the CSV has all {len(d)} with their whole text.")
    table(d.head(MAX_TABLE_ROWS)[["prompt_id", "category", "series", "repeat", "copy_share", "repeat_share",
                                  "acceptance_rate", "mean_accepted_tokens", "excerpt"]])
    csv_download(d.drop(columns=["excerpt"]), "degenerate_outputs.csv", "dl_degenerate")


# ---------------------------------------------------------------------------------------------- prediction

def page_predicted(db: str, f: Filters) -> None:
    st.header("Predicted vs measured speedup")
    c = q.cells(db, f)
    d = c[c.predicted_speedup.notna() & c.speedup.notna()].copy()
    if d.empty:
        no_rows(f, "cells with a Leviathan prediction")
        return
    domain, full = all_series(db)
    d["series"] = series_label(d, like=full)
    d["measured_over_predicted"] = d.speedup / d.predicted_speedup
    many_series_hint(d.series.nunique())
    hi = float(max(d.speedup.max(), d.predicted_speedup.max(), 1.0)) * 1.05
    diag = alt.Chart(pd.DataFrame({"x": [0.0, hi], "y": [0.0, hi]})).mark_line(
        strokeDash=[6, 4], color="gray").encode(x="x:Q", y="y:Q")
    points = alt.Chart(d).mark_point(filled=True, size=90).encode(
        x=alt.X("predicted_speedup:Q", title="predicted (Leviathan) speedup ×", scale=alt.Scale(domain=[0, hi])),
        y=alt.Y("speedup:Q", title="measured speedup ×", scale=alt.Scale(domain=[0, hi])),
        color=series_color(domain, shown=d.series),
        shape=alt.Shape("strategy:N", scale=alt.Scale(domain=q.filter_options(db)["strategy"]),
                        legend=alt.Legend(orient="bottom", values=sorted(d.strategy.unique()))),
        tooltip=["series", "draft_length", alt.Tooltip("predicted_speedup:Q", format=".2f"),
                 alt.Tooltip("speedup:Q", format=".2f"), alt.Tooltip("acceptance_rate:Q", format=".2f"),
                 alt.Tooltip("cost_ratio_c:Q", format=".3f")])
    legend_rows = d.series.nunique() + d.strategy.nunique() + 2
    show((diag + points).properties(height=with_legend(CHART_HEIGHT + 60, legend_rows)))
    st.caption("Prediction: (1 − α^(k+1)) / ((1 − α)(k·c + 1)) from the cell's median acceptance α and cost "
               "ratio c. "
               "Points below the dashed y = x line lose time to overhead the model ignores (sampling, cache "
               "rollback, Python); above it, the draft is cheaper in practice than c suggests.")
    table(d[["series", "draft_length", "predicted_speedup", "speedup", "measured_over_predicted",
             "acceptance_rate", "cost_ratio_c", "leviathan_speedup_median", "n"]])
    st.caption("leviathan_speedup_median: the median of the per-measurement predictions (each from that "
               "decode's own α and c), as in the cell_summary view.")


# ---------------------------------------------------------------------------------------------- latency

def page_latency(db: str, f: Filters) -> None:
    st.header("Latency and memory")
    c = q.cells(db, f)
    if c.empty:
        no_rows(f)
        return
    d = c.copy()
    d["cell"] = series_label(d, with_k=True, like=all_series(db, with_k=True)[1])
    d["ttft_ms"] = d.ttft_s * 1000
    d["tpot_ms"] = d.tpot_s * 1000
    d["peak_memory_mib"] = d.peak_memory_bytes / 2**20
    order = d.sort_values("tokens_per_s", ascending=False).cell.tolist()  # the same row order in every chart
    # four bar panels side by side sharing one row per cell, so the long cell labels are drawn once
    figures = (("tokens_per_s", "tokens / s", ".1f"), ("ttft_ms", "time to first token, ms", ".1f"),
               ("tpot_ms", "time per output token, ms", ".1f"), ("peak_memory_mib", "peak memory, MiB", ".0f"))
    panels = []
    for i, (metric, title, fmt) in enumerate(figures):
        panels.append(alt.Chart(d).mark_bar().encode(
            y=alt.Y("cell:N", title=None, sort=order, axis=alt.Axis(labelLimit=LABEL_LIMIT) if i == 0 else None),
            x=alt.X(f"{metric}:Q", title=title, axis=alt.Axis(orient="top", tickCount=4)),
            color=alt.Color("strategy:N", scale=strategy_scale(db),
                            legend=alt.Legend(orient="top", direction="horizontal",
                                              values=sorted(d.strategy.unique()))),
            tooltip=["cell", alt.Tooltip(f"{metric}:Q", format=fmt), "n"],
        ).properties(width=125, height=18 * len(d)))
    many_series_hint(len(d))
    show(alt.hconcat(*panels, spacing=12))
    st.caption("Medians over every prompt and repeat of a cell. Peak memory is what the runner recorded: CUDA max "
               "allocated on a GPU, the process's peak RSS on a CPU (which includes model loading).")
    cost = ["cost_per_mtok"] if d.cost_per_mtok.notna().any() else []  # only when device prices are configured
    table(d[["cell", "tokens_per_s", "baseline_tokens_per_s", "ttft_ms", "tpot_ms", "peak_memory_mib", *cost, "n"]],
          column_config={"cost_per_mtok": st.column_config.NumberColumn("cost per 1M tokens", format="%.4f")})


# ---------------------------------------------------------------------------------------------- scaling

def page_scaling(db: str, f: Filters) -> None:
    st.header("Scaling with GPU count")
    c = q.cells(db, f)
    if c.empty:
        no_rows(f)
        return
    d = c.copy()
    # GPU count is the x axis here, so keep it out of the series label
    colors, full = all_series(db, with_k=True, drop=("gpus",))
    d["series"] = series_label(d.drop(columns=["gpus"]), with_k=True, like=full)
    counts = d.groupby("series").gpus.nunique()
    if d.gpus.nunique() < 2:
        st.info(f"Only one GPU count ({int(d.gpus.iloc[0])}) in the filtered data; run the matrix with more GPU "
                "counts to see scaling.")
        chart_data = d
    else:  # a cell measured at one GPU count only has no line to draw; it stays in the table
        chart_data = d[d.series.isin(counts[counts > 1].index)]
        single = int((counts <= 1).sum())
        if single:
            st.caption(f"Charted: the {int((counts > 1).sum())} series measured at two or more GPU counts; "
                       f"{single} measured at one count are in the table below.")
    drawn = chart_data.series.nunique()
    many_series_hint(drawn)
    for metric, title in (("speedup", "speedup over baseline ×"), ("tokens_per_s", "tokens / s (median)")):
        chart = alt.Chart(chart_data).mark_line(point=True).encode(
            # GPU counts are whole numbers: ordinal, so one count alone is labelled "0", not "0.000000"
            x=alt.X("gpus:O", title="GPUs", axis=alt.Axis(labelAngle=0)), y=alt.Y(f"{metric}:Q", title=title),
            color=series_color(colors, title="pair · strategy · k", shown=chart_data.series),
            tooltip=["series", "gpus", alt.Tooltip(f"{metric}:Q", format=".2f"), "n"])
        layers = chart + baseline_rule() if metric == "speedup" else chart
        show(layers.properties(height=with_legend(CHART_HEIGHT - 60, drawn + 1)))
    table(d.sort_values(["series", "gpus"])[["series", "gpus", "speedup", "tokens_per_s", "baseline_tokens_per_s",
                                              "n"]])


# ---------------------------------------------------------------------------------------------- batch size

def page_batch(db: str, f: Filters) -> None:
    from specdec.db import report

    st.header("Speedup vs batch size")
    cells = q.batch_cells(db, f)
    if cells.empty:
        no_rows(f)
        return
    d = report.batch_frame(cells)
    if d.empty:
        st.info("No pair and method measured at two or more batch sizes in the filtered data; run the matrix with "
                "`batch_sizes: [1, 4]` (or more) to see where speculation stops paying.")
        return
    chart, band = report.batch_chart(d)
    show(chart)
    st.caption(f"Median per-sequence speedup over our plain decoding at the same batch size (decoded in the same "
               f"job); bars: {band}. Dashed rule: the baseline (1.0×).")
    found = report.crossovers(d)
    table(pd.DataFrame([{"series": name, "largest batch size paying": above, "smallest batch size losing": below}
                        for name, (above, below) in found.items()]))
    columns = ["series", "batch_size", "speedup", "ci_low", "ci_high", "tokens_per_s", "baseline_tokens_per_s",
               "mean_accepted_tokens", "n"]
    table(d.sort_values(["series", "batch_size"])[[c for c in columns if c in d]])


# ---------------------------------------------------------------------------------------------- losslessness

def page_losslessness(db: str, f: Filters) -> None:
    st.header("Losslessness")
    st.caption("Greedy speculative decoding must reproduce the baseline's tokens exactly. Share of outputs whose "
               "token hash equals the baseline's, per cell (sampled runs are not compared).")
    c = q.cells(db, f)
    d = c[(c.compared > 0) & ~c.strategy.map(lambda s: s in STRATEGIES and is_plain_baseline(s))].copy()
    if d.empty:
        no_rows(f, "greedy cells with a baseline")
        return
    d["cell"] = series_label(d, with_k=True)
    chart = alt.Chart(d).mark_bar().encode(
        y=alt.Y("cell:N", title=None, axis=alt.Axis(labelLimit=LABEL_LIMIT)),
        x=alt.X("share_identical:Q", title="share identical to baseline", scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(format="%")),
        color=alt.condition("datum.share_identical < 1", alt.value("#d62728"), alt.value("#2ca02c")),
        tooltip=["cell", alt.Tooltip("share_identical:Q", format=".1%"), "compared", "mismatches"])
    show(chart.properties(height=max(60, 22 * len(d)) + 50))
    table(d[["cell", "share_identical", "compared", "mismatches"]],
          column_config={"share_identical": st.column_config.NumberColumn("identical", format="percent")})

    mm = q.mismatches(db, f)
    st.subheader(f"Mismatches ({len(mm)})")
    if mm.empty:
        st.success("Every compared output is identical to its baseline.")
    else:
        if len(mm) > MAX_TABLE_ROWS:
            st.caption(f"The first {MAX_TABLE_ROWS} are shown; the CSV has all {len(mm)}.")
        table(mm.head(MAX_TABLE_ROWS))
        csv_download(mm, "mismatches.csv", "dl_mismatches")


# ---------------------------------------------------------------------------------------------- runs

RUN_COLUMNS = ["started_utc", "status", "cell", "host", "git_commit", "git_dirty", "gpu_count", "gpu_names",
               "cpu_name", "cuda_version", "driver_version", "torch_version", "transformers_version",
               "specdec_version", "python_version", "ok_measurements", "failed_measurements", "error", "target",
               "draft", "strategy", "k", "gpus", "temperature", "top_p", "top_k", "max_new_tokens", "repeats",
               "run_id", "finished_utc", "ingested_utc", "params_json", "result_file"]


def page_runs(db: str, f: Filters) -> None:
    st.header("Runs")
    r = q.runs(db, f)
    if r.empty:
        no_rows(f, "runs")
        return
    # provenance first, whatever else the store keeps after it
    order = [c for c in RUN_COLUMNS if c in r.columns] + [c for c in r.columns if c not in RUN_COLUMNS]
    r = r[order]
    st.caption(f"{len(r)} runs, {int((r.status != 'ok').sum())} failed. (The category filter does not apply to "
               "runs.)")
    table(r)
    csv_download(r, "runs.csv", "dl_runs")
    fail = q.failures(db, f)
    st.subheader(f"Failed measurements ({int(fail.measurements.sum()) if len(fail) else 0})")
    if fail.empty:
        st.success("No failed measurements.")
    else:
        st.caption("The `failures` view, one row per run and error.")
        table(fail)
        csv_download(fail, "failures.csv", "dl_failures")


# ---------------------------------------------------------------------------------------------- SQL console

DEFAULT_SQL = ("SELECT target, draft, strategy, draft_length, median(speedup) AS speedup\n"
               "FROM speedup GROUP BY ALL ORDER BY speedup DESC")


def page_sql(db: str, f: Filters) -> None:
    st.header("SQL console")
    st.caption("Read-only: one query (SELECT, WITH, FROM, DESCRIBE, ...); writes, DDL, ATTACH, COPY and functions "
               "that read files are refused. Tables `runs`, `measurements`; views `speedup`, `cell_summary`, "
               "`failures`. The sidebar filters do not apply here.")
    with st.form("sql_form"):
        sql = st.text_area("SQL", value=DEFAULT_SQL, height=140, key="sql_text")
        a, b = st.columns(2)
        limit = a.number_input("Row limit", min_value=1, max_value=1_000_000, value=1000, step=100, key="sql_limit")
        timeout = b.number_input("Time limit (s)", min_value=1, max_value=600, value=10, key="sql_timeout")
        submitted = st.form_submit_button("Run")
    if submitted or "sql_result" not in st.session_state:  # the example query runs when the page first opens
        st.session_state["sql_result"] = run_console(sql, db, int(limit), float(timeout))
    kind, payload = st.session_state.get("sql_result", (None, None))
    if kind == "refused":
        st.error(payload)
    elif kind == "failed":
        st.error(f"Query failed: {payload}")
    elif kind == "ok":
        note = " — row limit reached, there may be more" if len(payload) >= int(limit) else ""
        st.caption(f"{len(payload)} rows{note}")
        table(show_frame_controls(payload))  # control characters as escapes; the CSV keeps every character
        csv_download(payload, "query.csv", "dl_sql")
    with st.expander("Schema"):
        table(q.schema(db))


def run_console(sql: str, db: str, limit: int, timeout: float) -> tuple[str, object]:
    """("ok", DataFrame) | ("refused", reason) | ("failed", message): an error is text on the page, not a
    traceback. Not cached: the user asked for this run."""
    try:
        return "ok", run_query(sql, db, limit=limit, timeout_s=timeout)
    except UnsafeSQLError as exc:  # check_sql's reason: what was refused and what is allowed
        return "refused", str(exc)
    except QueryError as exc:  # a typo, an unknown column, the time limit: one line from DuckDB
        return "failed", str(exc)


# ---------------------------------------------------------------------------------------------- engines

def method_of(strategy: str) -> str:
    """The method a strategy runs, whatever the engine: another engine's strategy that mirrors one of ours
    (registry `peer`) is that method, so one method's column shows it on every engine."""
    st_ = STRATEGIES.get(strategy)
    return st_.peer if st_ is not None and st_.engine != "specdec" and st_.peer else strategy


def page_engines(db: str, f: Filters) -> None:
    st.header("Engines and weight formats")
    st.caption("Each engine's methods against that engine's own plain decoding in the same weight format "
               "(ours: float32 or the weight format of `weights`; llama.cpp: the GGUF's own quantisation), at each "
               "cell's fastest draft length. Speculation pays where the speedup is above 1.")
    e = q.engines(db, f)
    if e.empty:
        no_rows(f)
        return
    e["method"] = e.strategy.map(method_of)
    # the registry's engine (the store's `engine` column only picks baselines: transformers' cells share ours)
    e["engine"] = [STRATEGIES[x].engine if x in STRATEGIES else eng for x, eng in zip(e.strategy, e.engine)]
    e["weights"] = e.weights.fillna("as loaded")
    e["pays"] = [("yes" if v > 1 else "no") if pd.notna(k) and pd.notna(v) else ""  # drafting cells only
                 for k, v in zip(e.best_k, e.speedup)]
    labels = {"host": "{}", "target": "{}", "threads": "{} threads", "gpus": "{} GPU", "temperature": "T={}"}
    varying = [c for c in labels if e[c].nunique(dropna=False) > 1]
    e["series"] = e.engine + " · " + e.weights.astype(str)
    for c in varying:
        e["series"] += " · " + e[c].map(lambda v, f=labels[c]: f.format(v))
    drafting = e[e.best_k.notna() & e.speedup.notna()]
    if not drafting.empty:
        show(cell_heatmaps(drafting, "method", "method", [("speedup", "speedup ×", ".2f"),
                                                          ("mean_accepted_tokens", "tokens per target pass", ".2f")]))
    st.subheader("Plain decoding across engines")
    plain = e[e.best_k.isna()].copy()
    plain["tok/s ÷ fastest plain"] = plain.tokens_per_s / plain.tokens_per_s.max()
    table(plain[["series", "strategy", "tokens_per_s", "tok/s ÷ fastest plain", "n"]])
    st.subheader("Every engine × method × weight format")
    lead = ["engine", "method", "weights", *varying]
    table(e[lead + ["strategy", "best_k", "tokens_per_s", "baseline_tokens_per_s", "speedup", "pays",
                    "mean_accepted_tokens", "acceptance_rate", "share_identical", "n"]], column_config={
        "best_k": st.column_config.NumberColumn("best k", format="%d"),
        "speedup": st.column_config.NumberColumn("speedup", format="%.2f×"),
        "mean_accepted_tokens": st.column_config.NumberColumn("tokens / target pass", format="%.2f"),
        "acceptance_rate": st.column_config.NumberColumn("acceptance", format="percent"),
        "share_identical": st.column_config.NumberColumn("= own plain decoding", format="percent")})


PAGES = {
    "overview": ("Overview", page_overview),
    "leaderboard": ("Leaderboard", page_leaderboard),
    "speedup": ("Speedup vs draft length", page_speedup),
    "acceptance": ("Acceptance", page_acceptance),
    "predicted": ("Predicted vs measured", page_predicted),
    "latency": ("Latency and memory", page_latency),
    "scaling": ("Scaling", page_scaling),
    "batch": ("Batch size", page_batch),
    "losslessness": ("Losslessness", page_losslessness),
    "engines": ("Engines and weight formats", page_engines),
    "runs": ("Runs", page_runs),
    "sql": ("SQL console", page_sql),
}
