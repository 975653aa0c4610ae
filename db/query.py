"""Read-only SQL against the results store: `specdec query "SQL" [--db PATH] [--format table|csv|json] [--limit N]`.

Two independent layers keep a user's SQL from changing the store or touching other files:

1. `check_sql` tokenises the text (string literals, quoted identifiers and comments are recognised the way DuckDB
   reads them, so `WHERE error LIKE '%delete%'` is fine) and refuses anything but one read-only query: write,
   DDL and session statements, several statements, file-reading table functions and file paths in FROM. It gives
   the user a clear one-line reason.
2. `_execute_read_only` does not trust that check: it opens the file `read_only=True` (DuckDB rejects every
   write), then sets `enable_external_access = false` (no file, network or extension access: `read_csv`,
   `FROM 'x.csv'`, ATTACH, COPY, INSTALL all fail) and `lock_configuration = true` (so the SQL cannot set it
   back) before running the user's text.

Both settings are database-instance wide in DuckDB; within one process, connections to the same file share an
instance, so a process that runs queries (the dashboard) keeps external access off for that file until every
connection to it is closed. That is what a read-only viewer wants anyway.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from pathlib import Path

import duckdb
import pandas as pd
import sqlalchemy as sa

from specdec.db.store import db_error_message, default_db_path, engine_for


class QueryError(RuntimeError):
    """A query that could not run (no store, timeout, DuckDB error); the message is one line."""


class UnsafeSQLError(QueryError):
    """SQL refused by check_sql before it reaches the database."""


READ_ONLY_NOTE = "the results store is read-only and takes one SELECT-style query (SELECT, WITH, FROM, DESCRIBE, SHOW)"

# First word of an accepted statement. DuckDB's FROM-first syntax and TABLE/DESCRIBE/SHOW/SUMMARIZE only read.
STATEMENT_STARTS = {"select", "with", "from", "values", "table", "describe", "show", "summarize", "explain",
                    "pivot", "unpivot"}
# Keywords refused anywhere outside string literals and quoted identifiers (e.g. `WITH x AS (...) DELETE ...`).
FORBIDDEN_KEYWORDS = {"insert", "update", "delete", "merge", "create", "drop", "alter", "truncate", "attach",
                      "detach", "copy", "export", "import", "install", "load", "pragma", "set", "reset", "call",
                      "checkpoint", "vacuum", "begin", "commit", "rollback", "abort", "use", "grant", "revoke",
                      "prepare", "execute", "deallocate", "comment"}
# Table/scalar functions that read files, run SQL text, or reveal credentials.
FORBIDDEN_FUNCTIONS = {"glob", "sniff_csv", "query", "query_table", "getenv", "duckdb_secrets", "which_secret",
                       "checkpoint", "force_checkpoint", "load_extension", "csv_scan", "json_scan"}
FORBIDDEN_FUNCTION_PREFIXES = ("read_", "parquet_", "iceberg_", "delta_", "sqlite_", "postgres_", "mysql_",
                               "ducklake_", "http")
FORBIDDEN_FUNCTION_SUFFIXES = ("_scan",)
# Words after which a table name comes: a string literal there is a file path DuckDB would read (`FROM 'x.csv'`).
TABLE_POSITION_WORDS = {"from", "join", "table", "describe", "show", "summarize", "pivot", "unpivot", "into"}
# Clause keywords that end a FROM list (so a comma after them is not "another table").
NON_FROM_CLAUSE_WORDS = {"select", "where", "group", "having", "order", "limit", "offset", "qualify", "window",
                         "on", "using", "union", "except", "intersect", "values", "returning", "sample"}

WORD_RE = re.compile(r"[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*")
NUMBER_RE = re.compile(r"[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?")
DOLLAR_TAG_RE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


def _refuse(what: str) -> UnsafeSQLError:
    return UnsafeSQLError(f"refused: {what}; {READ_ONLY_NOTE}")


def _quoted_end(sql: str, start: int, quote: str, backslash: bool) -> int:
    """Index just past the literal/identifier opening at `start`; a doubled quote continues it (SQL standard),
    and with `backslash` (DuckDB's E'...' strings) a backslash escapes the next character."""
    i = start + 1
    while i < len(sql):
        if backslash and sql[i] == "\\":
            i += 2
        elif sql[i] == quote:
            if sql.startswith(quote * 2, i):
                i += 2
            else:
                return i + 1
        else:
            i += 1
    raise _refuse("unterminated string literal or quoted identifier")


def tokenize(sql: str) -> list[tuple[str, str]]:
    """Split SQL into (kind, text) tokens: word (lower-cased), ident (quoted identifier, unquoted and lower-cased),
    string, number, punct. Comments vanish. Where DuckDB might read something differently (nested comments), this
    errs towards seeing *more* code than DuckDB does, never less, so nothing can hide from the checks."""
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                raise _refuse("unterminated /* comment")
            i = end + 2
        elif c == "'":
            end = _quoted_end(sql, i, "'", backslash=False)
            tokens.append(("string", sql[i + 1:end - 1]))
            i = end
        elif c in "eE" and sql.startswith("'", i + 1):
            end = _quoted_end(sql, i + 1, "'", backslash=True)
            tokens.append(("string", sql[i + 2:end - 1]))
            i = end
        elif c == '"':
            end = _quoted_end(sql, i, '"', backslash=False)
            tokens.append(("ident", sql[i + 1:end - 1].replace('""', '"').lower()))
            i = end
        elif c == "$" and DOLLAR_TAG_RE.match(sql, i):
            tag = DOLLAR_TAG_RE.match(sql, i).group(0)
            end = sql.find(tag, i + len(tag))
            if end < 0:
                raise _refuse("unterminated $$ string")
            tokens.append(("string", sql[i + len(tag):end]))
            i = end + len(tag)
        elif WORD_RE.match(sql, i):
            word = WORD_RE.match(sql, i).group(0)
            tokens.append(("word", word.lower()))
            i += len(word)
        elif NUMBER_RE.match(sql, i):
            # Only digits, point and a complete exponent: DuckDB reads `1e'x'` as 1 followed by the E-string e'x'.
            number = NUMBER_RE.match(sql, i).group(0)
            tokens.append(("number", number))
            i += len(number)
        else:
            tokens.append(("punct", c))
            i += 1
    return tokens


def _forbidden_function(name: str) -> bool:
    return (name in FORBIDDEN_FUNCTIONS or name.startswith(FORBIDDEN_FUNCTION_PREFIXES)
            or name.endswith(FORBIDDEN_FUNCTION_SUFFIXES))


def check_sql(sql: str) -> str:
    """Return `sql` if it is a single read-only query, else raise UnsafeSQLError with a one-line reason.

    This is the friendly first layer; `_execute_read_only` enforces read-only and no file access regardless.
    """
    tokens = tokenize(sql)
    while tokens and tokens[-1] == ("punct", ";"):
        tokens.pop()
    if not tokens:
        raise _refuse("empty query")
    if ("punct", ";") in tokens:
        raise _refuse("multiple statements")
    kind, first = tokens[0]
    if not (kind == "word" and first in STATEMENT_STARTS) and tokens[0] != ("punct", "("):
        raise _refuse(f"{first.upper()} is not allowed")

    depth = 0
    clause = {0: None}  # innermost clause keyword per parenthesis depth, to tell a FROM list's commas
    previous: tuple[str, str] = ("punct", "")
    for position, (kind, text) in enumerate(tokens):
        following = tokens[position + 1] if position + 1 < len(tokens) else ("punct", "")
        if kind == "word" and text in FORBIDDEN_KEYWORDS:
            raise _refuse(f"{text.upper()} is not allowed (no writes, DDL or session commands)")
        if kind in ("word", "ident") and following == ("punct", "(") and _forbidden_function(text):
            raise _refuse(f"{text}() is not allowed (no functions that read files or run SQL text)")
        in_table_position = ((previous[0] == "word" and previous[1] in TABLE_POSITION_WORDS)
                             or (previous == ("punct", ",") and clause.get(depth) == "from"))
        if in_table_position and (kind == "string" or (kind == "ident" and re.search(r"[./\\:]", text))):
            raise _refuse(f"file path {text!r} in FROM (only the store's tables and views can be read)")
        if kind == "punct" and text == "(":
            depth += 1
            clause[depth] = None
        elif kind == "punct" and text == ")":
            depth = max(depth - 1, 0)
        elif kind == "word" and text in ("from", "join"):
            clause[depth] = "from"
        elif kind == "word" and text in NON_FROM_CLAUSE_WORDS:
            clause[depth] = "other"
        previous = (kind, text)
    return sql


def _execute_read_only(sql: str, db_path: str | Path, limit: int | None = None,
                       timeout_s: float | None = None) -> pd.DataFrame:
    """Run `sql` on a read-only connection with external access disabled, WITHOUT the text check.

    Kept separate from run_query so tests can prove this layer alone stops writes and file reads.
    """
    path = Path(db_path)
    if not path.is_file():
        raise QueryError(f"no results store at {path}: run `snakemake --cores 2` (or `specdec ingest`) first")
    engine = engine_for(path, read_only=True)
    timer = None
    try:
        raw = engine.raw_connection()
        try:
            duck = raw.driver_connection  # duckdb_engine's wrapper; forwards to the duckdb connection
            duck.execute("SET enable_external_access = false")
            duck.execute("SET lock_configuration = true")
            if timeout_s:
                timer = threading.Timer(timeout_s, duck.interrupt)
                timer.daemon = True
                timer.start()
            relation = duck.sql(sql)
            if relation is None:  # a statement without a result
                return pd.DataFrame()
            if limit is not None:
                relation = relation.limit(limit)
            return relation.df()
        finally:
            if timer is not None:
                timer.cancel()
            raw.close()
    except duckdb.InterruptException as exc:
        raise QueryError(f"query timed out after {timeout_s:g} s") from exc
    except (duckdb.Error, sa.exc.SQLAlchemyError) as exc:
        raise QueryError(db_error_message(exc, path)) from exc
    finally:
        engine.dispose()


def run_query(sql: str, db_path: str | Path, limit: int | None = None, timeout_s: float | None = None) -> pd.DataFrame:
    """Check `sql` (UnsafeSQLError if refused) and run it read-only on the store at `db_path` (QueryError on
    failure, including a missing store). `limit` caps the rows returned; `timeout_s` interrupts a slow query."""
    check_sql(sql)
    return _execute_read_only(sql, db_path, limit=limit, timeout_s=timeout_s)


def format_table(df: pd.DataFrame, fmt: str = "table") -> str:
    """Render a result as `table` (aligned plain text with a row count), `csv` (with header) or `json` (a list of
    row objects; NaN/NULL → null, times as ISO 8601)."""
    if fmt == "csv":
        return df.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return df.to_json(orient="records", date_format="iso", double_precision=15)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}: use table, csv or json")
    rows = f"({len(df)} row{'' if len(df) == 1 else 's'})"
    if df.empty:
        return ("  ".join(str(c) for c in df.columns) + "\n" + rows).lstrip("\n")
    return df.to_string(index=False) + "\n" + rows


def main_query(argv: list[str] | None = None) -> int:
    """`specdec query`: print the result, or one `error: ...` line on stderr and return 2."""
    parser = argparse.ArgumentParser(prog="specdec query",
                                     description="Run one read-only SQL query against the results store "
                                                 "(tables runs, measurements; views speedup, cell_summary, failures).")
    parser.add_argument("sql", help='e.g. "SELECT * FROM cell_summary ORDER BY speedup_median DESC"')
    parser.add_argument("--db", default=None, help="store path (default: $SPECDEC_DB or db/specdec.duckdb)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--limit", type=int, default=None, help="return at most N rows")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="interrupt a slower query")
    args = parser.parse_args(argv)
    db_path = Path(args.db) if args.db else default_db_path()
    try:
        df = run_query(args.sql, db_path, limit=args.limit, timeout_s=args.timeout)
    except QueryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(df, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main_query())
