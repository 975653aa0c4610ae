"""specdec dashboard: `streamlit run dashboard/app.py -- --db PATH` (or env SPECDEC_DB, or `specdec dashboard`).

The page and every sidebar filter live in the URL query parameters, so a view can be shared by copying the URL.
"""

from __future__ import annotations

import argparse
import sys

import duckdb
import sqlalchemy as sa
import streamlit as st

from specdec.dashboard import pages
from specdec.dashboard import queries as q
from specdec.dashboard.queries import FILTER_NAMES, Filters
from specdec.db.store import db_error_message, default_db_path

# query parameter values are text; these dimensions are numbers in the store
PARSE = {"k": int, "gpus": int, "temperature": float}
LABELS = {"pair": "Pair (target ← draft)", "strategy": "Strategy", "k": "Draft length k", "gpus": "GPUs",
          "category": "Prompt category", "temperature": "Temperature", "host": "Host", "run": "Run"}


def db_path(argv: list[str]) -> tuple[str, bool]:
    """(store path, whether the user chose it with --db). --db beats SPECDEC_DB beats results/specdec.duckdb; the
    latter two are also where `specdec ingest` writes by default. `specdec dashboard` always passes an absolute
    --db (streamlit runs in dashboard/), with --default-store when the user gave none. allow_abbrev=False and
    parse_known_args: under AppTest sys.argv is pytest's, which must not be mistaken for ours."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--db", default=None)
    p.add_argument("--default-store", action="store_true")
    args, _ = p.parse_known_args(argv)
    if args.db:
        return args.db, not args.default_store
    return str(default_db_path()), False


def url_values(name: str, options: list) -> list:
    """The filter's values from the URL, converted and restricted to what the store holds (a stale shared link
    must not break the page)."""
    conv = PARSE.get(name, str)
    out = []
    for raw in st.query_params.get_all(name):
        try:
            value = conv(raw)
        except ValueError:
            continue
        if value in options and value not in out:
            out.append(value)
    return out


def sync_url(name: str, values: list) -> None:
    """Write one filter to the URL, only when it changed (each write is a message to the browser)."""
    wanted = [str(v) for v in values]
    if st.query_params.get_all(name) != wanted:
        if wanted:
            st.query_params[name] = wanted
        else:
            del st.query_params[name]


def choose_page() -> str:
    slugs = list(pages.PAGES)
    if "page" not in st.session_state:  # first run of this session: take the page from the URL
        from_url = st.query_params.get("page")
        st.session_state["page"] = from_url if from_url in slugs else slugs[0]
    slug = st.sidebar.radio("Page", slugs, key="page", format_func=lambda s: pages.PAGES[s][0])
    if st.query_params.get("page") != slug:
        st.query_params["page"] = slug
    return slug


def sidebar_filters(options: dict) -> Filters:
    st.sidebar.header("Filters")
    st.sidebar.caption("Empty = all. The URL keeps the selection: share it to share this view.")
    chosen = {}
    for name in FILTER_NAMES:
        key = f"filter_{name}"
        opts = options[name]
        if key not in st.session_state:
            st.session_state[key] = url_values(name, opts)
        else:  # new runs may have changed the options; drop selections that no longer exist
            st.session_state[key] = [v for v in st.session_state[key] if v in opts]
        fmt = {"pair": q.pair_label, "run": lambda r: options["run_labels"].get(r, r)}.get(name, str)
        chosen[name] = tuple(st.sidebar.multiselect(LABELS[name], opts, key=key, format_func=fmt))
        sync_url(name, list(chosen[name]))
    return Filters(**chosen)


def main() -> None:
    st.set_page_config(page_title="specdec dashboard", page_icon="⚡", layout="wide")
    db, chosen = db_path(sys.argv[1:])
    try:
        status = q.store_status(db)
        if status["runs"] == 0:
            pages.page_empty(db, status, chosen)
            return
        slug = choose_page()
        f = sidebar_filters(q.filter_options(db))
        st.sidebar.caption(f"Store: `{db}` · {status['runs']} runs · {status['measurements']} measurements")
        pages.PAGES[slug][1](db, f)
    except q.StoreBusy as exc:
        st.warning(f"{exc}.")
    except (duckdb.Error, sa.exc.SQLAlchemyError) as exc:  # e.g. not a DuckDB file, or a store from another version
        message = db_error_message(exc, db)
        if isinstance(getattr(exc, "orig", exc), (duckdb.BinderException, duckdb.CatalogException)):
            message += (". The store was made by an older specdec (tables are never migrated): move it aside and "
                        f"rebuild it with `specdec ingest --db {db} results/`")
        st.error(f"Cannot read the results store `{db}`: {message}")


main()
