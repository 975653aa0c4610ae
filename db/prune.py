"""`specdec prune [--db PATH] (--id ID | --tag TAG | --host HOST | --where SQL)... [--yes]`: remove runs from the store.

Filters combine like the report's: several values of one filter are OR'ed, different filters AND'ed; `--where`
is one SQL expression on the `runs` table (e.g. `started_utc < '2026-11-01'`). A cell's paired baseline is a run
of its own, written by the same job into the same file: selecting either removes both, so no cell is left
without the baseline its speedups divide by. A run's measurements go with it (their foreign key).

Without `--yes` nothing changes: the command prints how many runs and measurements would go. With it, the runs
are chosen again and removed: their measurements in one transaction that also logs the removal in the `prunes`
table (when, the filter, the counts, the run ids), then the runs (DuckDB cannot delete both in one transaction:
prune). The runs are chosen on a read-only connection with the query command's checks
(db/query.py: one read-only statement, no file access), so the `--where` text never runs where it could write;
it must be one expression: `1=1) OR (1=1` and `; DROP ...` are refused before the store is opened.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import sqlalchemy as sa

from specdec.db.query import QueryError, run_query, tokenize
from specdec.db.report import FILTER_SQL
from specdec.db.schema import measurements, prunes, runs
from specdec.db.store import db_error_message, default_db_path, engine_for, init_db

# the clauses of runs_sql's filters (`r` is the runs table), `?` bound once per value
PRUNE_FILTERS = {"id": "r.run_id = ?", "tag": FILTER_SQL["tag"], "host": FILTER_SQL["host"]}


class PruneError(RuntimeError):
    """A prune that cannot run (bad filter, no store, a locked store); one line."""


@dataclass
class PruneFilter:
    """Which runs to remove: run ids, workflow tags, hosts, and SQL expressions on `runs` (every list may be empty,
    but not all of them)."""

    id: tuple[str, ...] = ()
    tag: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    where: tuple[str, ...] = ()

    def text(self) -> str:
        """The filter as the command line gave it (logged in `prunes`)."""
        return " AND ".join("(" + " OR ".join(f"{name} = {value}" for value in getattr(self, name)) + ")"
                            for name in ("id", "tag", "host", "where") if getattr(self, name))


def check_expression(where: str) -> str:
    """`where` if it is one SQL expression: its parentheses never close more than they opened and end balanced, and
    it holds no `;` (DuckDB's tokenizer reads strings and comments); else PruneError. The query that embeds it then
    passes db/query.py's check_sql (one read-only statement, no file-reading functions)."""
    depth = 0
    for kind, text in tokenize(where):
        if kind == "punct" and text == ";":
            raise PruneError(f"--where must be one SQL expression on runs, without ';': {where!r}")
        depth += {"(": 1, ")": -1}.get(text, 0) if kind == "punct" else 0
        if depth < 0:
            raise PruneError(f"--where must be one SQL expression on runs: a ')' closes more than it opened in "
                             f"{where!r}")
    if depth != 0 or not where.strip():
        raise PruneError(f"--where must be one SQL expression on runs (balanced parentheses, not empty): {where!r}")
    return where


def selection_sql(f: PruneFilter) -> tuple[str, list]:
    """`SELECT run_id FROM runs r WHERE ...` for the filter, with its parameters."""
    clauses, params = [], []
    for name, clause in PRUNE_FILTERS.items():
        values = getattr(f, name)
        if values:
            clauses.append("(" + " OR ".join([clause] * len(values)) + ")")
            params.extend(values)
    clauses += [f"({check_expression(w)})" for w in f.where]
    if not clauses:
        raise PruneError("give at least one filter: --id, --tag, --host or --where (--where true removes every run)")
    return "SELECT r.run_id FROM runs r WHERE " + " AND ".join(clauses) + " ORDER BY r.run_id", params


def chosen_runs(db: str | Path, f: PruneFilter) -> list[str]:
    """The run ids the filter selects, with the paired baselines of selected cells and the cells of selected
    paired baselines (one job's two runs go together). Read-only, with the query command's checks."""
    sql, params = selection_sql(f)
    try:
        ids = run_query(sql, db, params=params)["run_id"].tolist()
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        partners = run_query(f"SELECT run_id FROM runs WHERE paired_with IN ({marks}) UNION "
                             f"SELECT paired_with FROM runs WHERE run_id IN ({marks}) AND paired_with IS NOT NULL",
                             db, params=ids + ids)["run_id"].tolist()
    except QueryError as exc:
        raise PruneError(str(exc)) from None
    return sorted(set(ids) | set(partners))


def count_measurements(conn, ids: list[str]) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(measurements)
                        .where(measurements.c.run_id.in_(ids))).scalar() if ids else 0


def prune(db: str | Path, f: PruneFilter) -> tuple[int, int]:
    """Remove the runs `f` chooses (chosen_runs) and their measurements, logging the removal in `prunes`; returns
    (runs, measurements) removed."""
    ids = chosen_runs(db, f)
    if not ids:
        return 0, 0
    init_db(db)  # an older store gains the prunes table
    engine = engine_for(db)
    try:
        # Two transactions: DuckDB refuses to delete a row whose foreign-key children were deleted in the same
        # transaction (its documented foreign key limitation). The first removes the measurements and logs the
        # prune, the second the runs; should the second fail, the same prune run again removes what is left.
        with engine.begin() as conn:
            removed = count_measurements(conn, ids)
            conn.execute(sa.delete(measurements).where(measurements.c.run_id.in_(ids)))
            conn.execute(sa.insert(prunes), [{"prune_id": uuid.uuid4().hex,
                                              "pruned_utc": datetime.now(timezone.utc).replace(tzinfo=None),
                                              "filter": f.text(), "runs": len(ids), "measurements": removed,
                                              "run_ids": json.dumps(ids)}])
        with engine.begin() as conn:
            conn.execute(sa.delete(runs).where(runs.c.run_id.in_(ids)))
    except (duckdb.Error, sa.exc.SQLAlchemyError) as exc:
        raise PruneError(f"{db_error_message(exc, db)} (run the same prune again to finish it)") from exc
    finally:
        engine.dispose()
    return len(ids), removed


def dry_run(db: str | Path, f: PruneFilter) -> tuple[list[str], int]:
    """(run ids, measurement count) that prune would remove; nothing changes."""
    ids = chosen_runs(db, f)
    if not ids:
        return ids, 0
    marks = ", ".join("?" * len(ids))
    try:
        return ids, int(run_query(f"SELECT count(*) AS n FROM measurements WHERE run_id IN ({marks})", db,
                                  params=ids)["n"][0])
    except QueryError as exc:
        raise PruneError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec prune", description="Remove runs (and their measurements and "
                                     "paired baselines) from the store. Prints what it would remove; --yes removes "
                                     "it, in one transaction logged in the prunes table.")
    parser.add_argument("--db", default=None, help="store path (default: $SPECDEC_DB or results/specdec.duckdb)")
    parser.add_argument("--id", action="append", default=[], help="a run id; repeat for several")
    parser.add_argument("--tag", action="append", default=[],
                        help="runs of this workflow tag (result files under results/TAG/HOST/); repeat for several")
    parser.add_argument("--host", action="append", default=[], help="runs on this host; repeat for several")
    parser.add_argument("--where", action="append", default=[], metavar="SQL",
                        help="one SQL expression on the runs table, e.g. \"started_utc < '2026-11-01'\"")
    parser.add_argument("--yes", action="store_true", help="remove them (without it: only say what would go)")
    args = parser.parse_args(argv)
    db = Path(args.db) if args.db else default_db_path()
    f = PruneFilter(tuple(args.id), tuple(args.tag), tuple(args.host), tuple(args.where))
    try:
        if args.yes:
            removed, rows = prune(db, f)
        else:
            ids, rows = dry_run(db, f)
    except PruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.yes:
        print(f"removed {plural(removed, 'run')} ({plural(rows, 'measurement')}) matching {f.text()} from {db}"
              + ("; logged in its prunes table" if removed else ""))
    else:
        shown = ": " + ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "") + "; add --yes to remove them"
        print(f"would remove {plural(len(ids), 'run')} ({plural(rows, 'measurement')}) matching {f.text()}"
              f"{shown if ids else ''}")
    return 0


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"

if __name__ == "__main__":
    sys.exit(main())
