"""Read-only SQL against the results store: `specdec query "SQL" [--db PATH] [--format table|csv|json] [--limit N]`.

Two independent layers keep a user's SQL from changing the store or touching other files:

1. `check_sql` asks DuckDB's own parser what the text is (`duckdb.extract_statements`, no database needed): one
   statement, and a query (SELECT, WITH, FROM, VALUES, TABLE, DESCRIBE, SHOW, SUMMARIZE, PIVOT, EXPLAIN). A typo
   gets DuckDB's parser error; a write, DDL or session statement is refused with a one-line reason. It then
   tokenises the text with DuckDB's own tokenizer (`duckdb.tokenize`: string literals, quoted identifiers and
   comments are what DuckDB reads, so `WHERE error LIKE '%read_csv%'` is fine) and refuses file-reading table
   functions, file paths in FROM, and the functions and views that reveal server paths or settings
   (`current_setting`, `duckdb_databases`, ...).
2. `_execute_read_only` does not trust that check: it opens the file `read_only=True` (DuckDB rejects every
   write) with `enable_external_access = false` (no file, network or extension access: `read_csv`,
   `FROM 'x.csv'`, ATTACH, COPY, INSTALL all fail) and `lock_configuration = true` (so the SQL cannot set it
   back), both given when the connection opens (store.engine_for).

Within one process DuckDB shares one database instance between the connections to a file, and refuses a
connection whose configuration differs from the open ones. So every read-only connection (the dashboard's pages
and its SQL console alike) opens with these same settings: queries of one dashboard run side by side, instead of
a running console query locking the next one out ("the configuration has been locked").
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import threading
from pathlib import Path
from typing import Iterable, Iterator

import duckdb
import pandas as pd
import sqlalchemy as sa

from specdec.db.store import db_error_message, default_db_path, engine_for
from specdec.db.text import show_controls


class QueryError(RuntimeError):
    """A query that could not run (no store, timeout, DuckDB error); the message is one line."""


class UnsafeSQLError(QueryError):
    """SQL refused by check_sql before it reaches the database."""


READ_ONLY_NOTE = "the results store is read-only and takes one SELECT-style query (SELECT, WITH, FROM, DESCRIBE, SHOW)"

# Statement types (duckdb.StatementType names) that only read. PIVOT without an IN list parses as MULTI (it looks
# up the pivot values first); EXPLAIN is checked again without its EXPLAIN [ANALYZE] prefix.
READ_STATEMENTS = {"SELECT"}
# Table/scalar functions that read files, run SQL text, or reveal credentials.
FORBIDDEN_FUNCTIONS = {"glob", "sniff_csv", "query", "query_table", "getenv", "duckdb_secrets", "which_secret",
                       "checkpoint", "force_checkpoint", "load_extension", "csv_scan", "json_scan"}
# Names refused anywhere, called or not (DuckDB also reads `FROM duckdb_databases` without parentheses): they
# show server paths (the store's own, the secret and temp directories) and settings.
REVEALING_NAMES = {"current_setting", "duckdb_settings", "duckdb_databases", "duckdb_extensions",
                   "duckdb_temporary_files", "pg_settings"}
REVEALING_PREFIXES = ("pragma_",)
FORBIDDEN_FUNCTION_PREFIXES = ("read_", "parquet_", "iceberg_", "delta_", "sqlite_", "postgres_", "mysql_",
                               "ducklake_", "http")
FORBIDDEN_FUNCTION_SUFFIXES = ("_scan",)
# Words after which a table name comes: a string literal there is a file path DuckDB would read (`FROM 'x.csv'`).
TABLE_POSITION_WORDS = {"from", "join", "table", "describe", "show", "summarize", "pivot", "unpivot", "into"}
# Clause keywords that end a FROM list (so a comma after them is not "another table").
NON_FROM_CLAUSE_WORDS = {"select", "where", "group", "having", "order", "limit", "offset", "qualify", "window",
                         "on", "using", "union", "except", "intersect", "values", "returning", "sample"}

# duckdb.tokenize's token types as the kinds the checks look at
TOKEN_KINDS = {"keyword": "word", "identifier": "word", "string_const": "string", "numeric_const": "number",
               "operator": "punct"}


def _refuse(what: str) -> UnsafeSQLError:
    return UnsafeSQLError(f"refused: {what}; {READ_ONLY_NOTE}")


def tokenize(sql: str) -> list[tuple[str, str]]:
    """Split SQL into (kind, text) tokens with DuckDB's own tokenizer, so a string literal, quoted identifier or
    comment is exactly what DuckDB will read: word (keyword or name, lower-cased), ident (quoted identifier,
    unquoted and lower-cased), string (the literal as written, quotes included), number, punct. Comments vanish."""
    found = duckdb.tokenize(sql)
    ends = [start for start, _ in found[1:]] + [len(sql)]
    tokens = []
    for (start, token_type), end in zip(found, ends):
        text = sql[start:end].strip()
        if token_type.name == "comment":
            continue
        kind = "ident" if text.startswith('"') else TOKEN_KINDS[token_type.name]
        if kind == "ident":
            text = text[1:-1].replace('""', '"')
        tokens.append((kind, text.lower() if kind in ("word", "ident") else text))
    return tokens


def _forbidden_function(name: str) -> bool:
    return (name in FORBIDDEN_FUNCTIONS or name.startswith(FORBIDDEN_FUNCTION_PREFIXES)
            or name.endswith(FORBIDDEN_FUNCTION_SUFFIXES))


def statement_kind(sql: str) -> str:
    """The type of the one statement in `sql` per DuckDB's parser ("SELECT", "DELETE", ...), "EMPTY" or
    "MULTIPLE". A syntax error is DuckDB's own message (QueryError), not a refusal: the user mistyped, nothing was
    unsafe."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(db_error_message(exc, "")) from None
    if len(statements) != 1:
        return "MULTIPLE" if statements else "EMPTY"
    return statements[0].type.name


def check_sql(sql: str) -> str:
    """Return `sql` if it is a single read-only query, else raise UnsafeSQLError with a one-line reason (or
    QueryError with DuckDB's parser error for text that is not SQL).

    This is the friendly first layer; `_execute_read_only` enforces read-only and no file access regardless.
    """
    kind = statement_kind(sql)  # first: DuckDB's parser explains a syntax error better than any refusal
    if kind == "EMPTY":
        raise _refuse("empty query")
    tokens = tokenize(sql)
    first = tokens[0][1]
    if kind == "EXPLAIN":  # EXPLAIN [ANALYZE] <statement>: the statement it explains (ANALYZE runs it)
        inner = re.sub(r"^\s*explain\s+(analyze\s+)?", "", sql, count=1, flags=re.I)
        kind, first = (statement_kind(inner), inner.split(None, 1)[0].lower()) if inner != sql else (kind, first)
    if kind == "MULTI" and first == "pivot":
        kind = "SELECT"
    if kind == "MULTIPLE":
        raise _refuse("multiple statements")
    if kind not in READ_STATEMENTS:
        word = first if first not in ("with", "(") else kind.lower()
        raise _refuse(f"{word.upper()} is not allowed (no writes, DDL or session commands)")

    depth = 0
    clause = {0: None}  # innermost clause keyword per parenthesis depth, to tell a FROM list's commas
    padded = [("punct", ""), *tokens, ("punct", "")]
    for previous, (kind, text), following in zip(padded, padded[1:], padded[2:]):
        if kind in ("word", "ident") and (text in REVEALING_NAMES or text.startswith(REVEALING_PREFIXES)):
            raise _refuse(f"{text} is not allowed (it shows server paths and settings)")
        if kind in ("word", "ident") and following == ("punct", "(") and _forbidden_function(text):
            raise _refuse(f"{text}() is not allowed (no functions that read files or run SQL text)")
        in_table_position = ((previous[0] == "word" and previous[1] in TABLE_POSITION_WORDS)
                             or (previous == ("punct", ",") and clause.get(depth) == "from"))
        if in_table_position and (kind == "string" or (kind == "ident" and re.search(r"[./\\:]", text))):
            path = text if kind == "string" else repr(text)  # a literal as written, a quoted name unquoted
            raise _refuse(f"file path {path} in FROM (only the store's tables and views can be read)")
        if kind == "punct" and text == "(":
            depth += 1
            clause[depth] = None
        elif kind == "punct" and text == ")":
            depth = max(depth - 1, 0)
        elif kind == "word" and text in ("from", "join"):
            clause[depth] = "from"
        elif kind == "word" and text in NON_FROM_CLAUSE_WORDS:
            clause[depth] = "other"
    return sql


DEFAULT_TIMEOUT_S = 60.0  # `specdec query` interrupts a query still running after this (--timeout 0: never)
BATCH_VECTORS = 1  # rows fetched at a time, in DuckDB vectors of 2048 rows: the memory a streamed query holds


def iter_batches(sql: str, db_path: str | Path, limit: int | None = None, timeout_s: float | None = None,
                 params: list | None = None) -> Iterator[pd.DataFrame]:
    """Run `sql` on a read-only connection with external access disabled, WITHOUT the text check, and yield its
    rows in DataFrames of one DuckDB vector (2048 rows) at a time: DuckDB streams the result, so a reader that
    stops early (`| head -1`) stops the query and memory stays bounded by a batch. The first batch always comes
    (empty, with the columns, for an empty result). `timeout_s` interrupts the query (fetching included); `params`
are bound to its `?` placeholders.

    Kept apart from the text check so tests can prove this layer alone stops writes and file reads.
    """
    path = Path(db_path)
    if not path.is_file():
        raise QueryError(f"no results store at {path}: run `snakemake --cores 2` (or `specdec ingest`) first")
    engine = engine_for(path, read_only=True)  # external access off and configuration locked from the start
    timer = None
    try:
        raw = engine.raw_connection()
        try:
            duck = raw.driver_connection  # duckdb_engine's wrapper; forwards to the duckdb connection
            if timeout_s:
                timer = threading.Timer(timeout_s, duck.interrupt)
                timer.daemon = True
                timer.start()
            result = duck.execute(sql, params) if params else duck.execute(sql)
            if result.description is None:  # a statement without a result
                yield pd.DataFrame()
                return
            left, first = limit, True
            while True:
                batch = result.fetch_df_chunk(BATCH_VECTORS)
                if left is not None:
                    batch = batch.iloc[:left]
                    left -= len(batch)
                if first or not batch.empty:
                    yield batch
                first = False
                if batch.empty or left == 0:
                    return
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


def _execute_read_only(sql: str, db_path: str | Path, limit: int | None = None, timeout_s: float | None = None,
                       params: list | None = None) -> pd.DataFrame:
    """iter_batches' rows in one DataFrame (WITHOUT the text check)."""
    batches = list(iter_batches(sql, db_path, limit=limit, timeout_s=timeout_s, params=params))
    return batches[0] if len(batches) == 1 else pd.concat(batches, ignore_index=True)


def run_query(sql: str, db_path: str | Path, limit: int | None = None, timeout_s: float | None = None,
              params: list | None = None) -> pd.DataFrame:
    """Check `sql` (UnsafeSQLError if refused) and run it read-only on the store at `db_path` (QueryError on
    failure, including a missing store). `limit` caps the rows returned; `timeout_s` interrupts a slow query;
    `params` fill its `?` placeholders."""
    check_sql(sql)
    return _execute_read_only(sql, db_path, limit=limit, timeout_s=timeout_s, params=params)


MAX_CELL_CHARS = 200  # a table cell longer than this is cut, with a marker saying how much is left out


def short_cell(value):
    """A text cell for the aligned table: one line (newlines shown as \\n, every other control character as an
    escape such as \\x1b: db/text.py) of at most MAX_CELL_CHARS characters; a cut one ends in `…[+N chars]` (the
    csv and json formats keep every character, json as JSON escapes)."""
    if not isinstance(value, str):
        return value
    text = show_controls(value)
    cut = len(text) - MAX_CELL_CHARS
    return text if cut <= 0 else f"{text[:MAX_CELL_CHARS]}…[+{cut} chars]"


def format_table(df: pd.DataFrame, fmt: str = "table") -> str:
    """Render a result as `table` (aligned plain text with a row count; long text cut, see short_cell), `csv` (with
    header) or `json` (a list of row objects; NaN/NULL → null, times as ISO 8601)."""
    return "".join(format_batches([df], fmt)).rstrip("\n")


def format_batches(batches: Iterable[pd.DataFrame], fmt: str = "table") -> Iterator[str]:
    """format_table's text, piece by piece as the batches come (iter_batches), each piece ending in a newline.
    A table's columns are aligned within a batch of 2048 rows; the row count follows the last batch."""
    if fmt not in ("table", "csv", "json"):
        raise ValueError(f"unknown format {fmt!r}: use table, csv or json")
    rows = 0
    for i, df in enumerate(batches):
        rows += len(df)
        if fmt == "csv":
            yield df.to_csv(index=False, header=i == 0)
        elif fmt == "json":
            records = df.to_json(orient="records", date_format="iso", double_precision=15)[1:-1]
            if i == 0 or records:
                yield ("[" if i == 0 else ",") + records
        elif i == 0 and df.empty:
            yield "  ".join(show_controls(str(c)) for c in df.columns) + "\n" * (len(df.columns) > 0)
        elif not df.empty:
            text_columns = [c for c in df.columns
                            if pd.api.types.is_object_dtype(df[c]) or pd.api.types.is_string_dtype(df[c])]
            shown = df.assign(**{c: df[c].map(short_cell) for c in text_columns}) if text_columns else df
            shown = shown.rename(columns=lambda c: short_cell(c) if isinstance(c, str) else c)
            yield shown.to_string(index=False, header=i == 0) + "\n"
    if fmt == "json":
        yield "]\n"
    elif fmt == "table":
        yield f"({rows} row{'' if rows == 1 else 's'})\n"


def check_limits(limit: int | None, timeout_s: float | None) -> None:
    """--limit is a row count >= 1; --timeout a finite number of seconds >= 0, 0 meaning none (negative and nan
    used to mean "no limit" silently, and inf crashed the timer thread). Leaving --limit out means every row."""
    if limit is not None and limit < 1:
        raise QueryError(f"--limit must be >= 1 (leave it out for every row), got {limit}")
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s >= 0):
        raise QueryError(f"--timeout must be a number of seconds >= 0 (0: no limit), got {timeout_s}")


def print_out(text: str, end: str = "\n") -> bool:
    """Print to stdout; False when the reader stopped early (`| head -1`), which is not an error. Further writes
    (the interpreter's last flush) go to /dev/null instead of raising BrokenPipeError again."""
    try:
        print(text, end=end, flush=True)
        return True
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False


def main_query(argv: list[str] | None = None) -> int:
    """`specdec query`: print the result as it streams, or one `error: ...` line on stderr and return 2."""
    parser = argparse.ArgumentParser(prog="specdec query",
                                     description="Run one read-only SQL query against the results store "
                                                 "(tables runs, measurements; views speedup, cell_summary, failures).")
    parser.add_argument("sql", help='e.g. "SELECT * FROM cell_summary ORDER BY speedup_median DESC"')
    parser.add_argument("--db", default=None, help="store path (default: $SPECDEC_DB or results/specdec.duckdb)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help=f"table cuts text longer than {MAX_CELL_CHARS} characters (marked …[+N chars]) and "
                             "shows control characters as escapes (\\n, \\x1b); csv and json print every character "
                             "(default: table)")
    parser.add_argument("--limit", type=int, default=None, help="return at most N rows")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="interrupt a query still running after this, fetching included; 0: no limit "
                             "(default: %(default)g)")
    args = parser.parse_args(argv)
    db_path = Path(args.db) if args.db else default_db_path()
    try:
        check_limits(args.limit, args.timeout)
        check_sql(args.sql)
        for piece in format_batches(iter_batches(args.sql, db_path, limit=args.limit, timeout_s=args.timeout or None),
                                    args.format):
            if not print_out(piece, end=""):
                break  # the reader is gone: closing the generator ends the query and releases the store
    except QueryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main_query())
