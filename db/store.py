"""The results store: open it, create its tables and views, validate result files and ingest them.

DuckDB allows one read-write process per database file, and a writer locks readers in other processes out. So
workflow jobs never open the store: each writes a JSON result file, and `ingest` inserts a batch of files in one
short transaction. Engines use `NullPool` so the file lock is released as soon as a connection closes, instead of
being held by an idle pooled connection for the life of the process.

Ingest validates every file before the database is touched (load_result_file: db/result.schema.json, then the
invariants of check_invariants; docs/store.md lists the rules). A file that fails is refused with one line naming
the file, the field and the rule, and the others go in: all their new runs and measurements in one transaction,
so a database error leaves nothing of the batch. A run whose `run_id` is already stored is skipped, so
re-running ingest over the same folder is harmless. A format-2 file may carry a second run, the cell's paired
baseline; it is stored as a run of its own, linked by `paired_with`. Format-1 files (before paired baselines) are
still accepted.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

import duckdb
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert  # duckdb_engine speaks PostgreSQL's dialect
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from specdec.measure import noise
from specdec.db import bootstrap
from specdec.db.schema import (EXTRA_FIELD, JSON_FIELDS, PARAM_COLUMNS, Base, measurements, median_ci_ranks,
                               noise_thresholds, runs)
from specdec.db.schema import prices as prices_table
from specdec.strategies import STRATEGIES, store_baseline

RESULT_FORMAT = "specdec-result/2"
RESULT_FORMATS = ("specdec-result/1", RESULT_FORMAT)  # 1: before paired baselines and noise readings
VIEWS_SQL = Path(__file__).with_name("views.sql")
STATUSES = ("ok", "failed")
# Columns the store fills in itself rather than reading from the file's `run` or measurement objects.
STORE_ONLY = ("params_json", "result_file", "ingested_utc", EXTRA_FIELD)

# Fields without which a row cannot be stored or matched to its baseline; they must be present and not null.
# Every other documented field may be null or absent (stored as NULL), so a runner that cannot measure
# something does not make its whole batch unloadable.
REQUIRED_RUN = ("run_id", "started_utc", "status", "host", "params")
REQUIRED_PARAMS = ("target", "strategy", "gpus", "temperature", "top_p", "top_k", "max_new_tokens")
REQUIRED_MEASUREMENT = ("prompt_id", "repeat", "status")
# Numeric columns are counts, times, rates, sizes and settings: none can be negative (the seed may be anything),
# and these have a larger minimum or a maximum. Integers must fit their column (INTEGER: 32 bits).
SIGNED_COLUMNS = ("seed",)
MINIMUM = {"k": 1, "max_new_tokens": 1, "repeats": 1}
MAXIMUM = {"acceptance_rate": 1, "top_p": 1}
INT_BITS = {sa.BigInteger: 64, sa.Integer: 32}
RUN_ID = re.compile(r"[A-Za-z0-9._:+-]{1,128}")  # a job's uuid4 hex; no spaces, quotes or control characters


class ResultFileError(ValueError):
    """A result file that cannot be ingested; the message is one line naming the file and the bad field."""


@dataclass
class IngestReport:
    """What one ingest did. Counts are of *new* rows: skipped runs contribute nothing but `skipped_runs`."""

    files: int = 0
    new_runs: int = 0
    skipped_runs: int = 0
    measurement_rows: int = 0
    failed_rows: int = 0
    refused: list[str] = field(default_factory=list)  # one line per file refused (the file and the rule)


DEFAULT_DB = Path("results/specdec.duckdb")
# The default before 2026-12 (db/ now holds only the store's code). Still read while it is the only store, so an
# upgrade hides nothing; the workflow refuses to start a second store beside it (workflow/matrix.py says how).
LEGACY_DB = Path("db/specdec.duckdb")


def default_db_path() -> Path:
    """`results/specdec.duckdb` relative to the working directory (the repository root), or `$SPECDEC_DB`; the old
    default `db/specdec.duckdb` while it exists and the new one does not."""
    if os.environ.get("SPECDEC_DB"):
        return Path(os.environ["SPECDEC_DB"])
    return LEGACY_DB if LEGACY_DB.exists() and not DEFAULT_DB.exists() else DEFAULT_DB


def engine_for(path: str | os.PathLike, read_only: bool = False) -> Engine:
    """A SQLAlchemy engine on the DuckDB file at `path`.

    NullPool: every `connect()` opens the file and closing the connection releases DuckDB's file lock, so an
    ingest in another process can run as soon as a reader is done. `read_only=True` lets several reader
    processes share the file (but not with a writer), and opens it with READER_CONFIG.
    """
    url = URL.create("duckdb", database=str(path))
    args = {"read_only": True, "config": dict(READER_CONFIG)} if read_only else {"read_only": False}
    return sa.create_engine(url, poolclass=NullPool, connect_args=args)


# Every read-only connection opens with these (never SET later: a process's connections to one file share a
# database instance, which refuses a second connection with another configuration, and once locked refuses the
# SET). Readers never need files, network or extensions, and the SQL console must not be able to turn them on.
READER_CONFIG = {"enable_external_access": False, "lock_configuration": True}


def init_db(path: str | os.PathLike) -> None:
    """Create the parent folder, the tables (if missing) and (re)create the views. Safe to call any number of times.

    Views are `CREATE OR REPLACE`d every time, so an edited views.sql takes effect on the next ingest. Tables
    are created when missing; columns added to the models since a store was created are added to it (NULL in its
    older rows), so an older store keeps working. Missing noise thresholds get their defaults, and the
    bootstrap rank table (db/bootstrap.py) is filled once.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = engine_for(path)
    try:
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
            add_missing_columns(conn)
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            conn.execute(pg_insert(noise_thresholds).on_conflict_do_nothing(),  # the defaults of missing ones
                         [{"name": n, "value": v, "updated_utc": now} for n, v in noise.THRESHOLDS.items()])
            if conn.execute(sa.select(sa.func.count()).select_from(median_ci_ranks)).scalar() != bootstrap.MAX_EXACT:
                replace_rows(conn, median_ci_ranks, bootstrap.rank_rows())
            for statement in view_statements():
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def replace_rows(conn, table: sa.Table, rows: list[dict]) -> None:
    """Empty `table` and insert `rows` (in the caller's transaction)."""
    conn.execute(sa.delete(table))
    if rows:
        conn.execute(sa.insert(table), rows)


def add_missing_columns(conn) -> None:
    """ALTER TABLE ... ADD COLUMN for every model column an existing table lacks (always nullable: older rows
    have no value for it)."""
    existing = set(conn.exec_driver_sql("SELECT table_name, column_name FROM information_schema.columns "
                                        "WHERE table_schema = 'main'").fetchall())
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            if (table.name, column.name) not in existing:
                kind = column.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN IF NOT EXISTS "{column.name}" {kind}')


def view_statements() -> list[str]:
    """The statements of views.sql, split at semicolons that end a line (comment-only chunks dropped)."""
    chunks = re.split(r";[ \t]*$", VIEWS_SQL.read_text(encoding="utf-8"), flags=re.M)
    code = lambda chunk: "\n".join(l for l in chunk.splitlines() if not l.strip().startswith("--")).strip()  # noqa: E731
    return [chunk.strip() for chunk in chunks if code(chunk)]


def is_locked(exc: BaseException) -> bool:
    """DuckDB's IOException when another process holds the file (a writer, or readers while we want to write)."""
    return "could not set lock" in str(getattr(exc, "orig", None) or exc).lower()


def db_error_message(exc: BaseException, path: str | os.PathLike) -> str:
    """One line for a database error, with the likely cause spelled out for the common lock conflict."""
    text = str(getattr(exc, "orig", None) or exc)
    if is_locked(exc):
        return (f"the results store {path} is open in another process (a dashboard, query or ingest); "
                f"DuckDB allows one writer and no readers alongside it: close it and retry")
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines:
        return type(exc).__name__
    # DuckDB's hints ("Did you mean ...", "Candidate bindings: ...") follow on lines of their own; keep them
    hints = [line for line in lines[1:] if line.startswith(("Did you mean", "Candidate bindings"))]
    return " ".join([lines[0], *hints])


# ---------------------------------------------------------------------------------------------------- validation

def _fail(path, field: str, problem: str) -> ResultFileError:
    return ResultFileError(f"{path}: {field}: {problem}")


def _show(value) -> str:
    """A short one-line rendering of a bad value for an error message."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_utc(value: str) -> datetime:
    """ISO 8601 → naive UTC datetime (the store's TIMESTAMP columns hold UTC). A time without zone is taken as UTC."""
    stamp = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(timezone.utc).replace(tzinfo=None)
    return stamp


def _check_value(path, field: str, column: sa.Column, value) -> None:
    """Raise if a non-null value cannot go into `column`, so that type errors surface before any insert."""
    if value is None:
        return
    kind = column.type
    if column.name in JSON_FIELDS:
        ok, want = isinstance(value, list), "a list or null"
    elif isinstance(kind, sa.Boolean):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(kind, sa.Integer):  # Integer and BigInteger
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(kind, sa.Double):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(kind, sa.DateTime):
        want = "an ISO 8601 UTC time like 2026-11-23T07:30:00Z"
        try:
            ok = isinstance(value, str) and _parse_utc(value) is not None
        except ValueError:
            ok = False
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise _fail(path, field, f"must be {want}, got {_show(value)}")
    if isinstance(kind, (sa.Integer, sa.Double)):
        _check_number(path, field, column, value)


def _check_number(path, field: str, column: sa.Column, value) -> None:
    """Finite where the column cannot be NULL (NaN and inf are stored as NULL), within the column's integer
    range, and within MINIMUM/MAXIMUM (0 for every unsigned column)."""
    if isinstance(value, float) and not math.isfinite(value):
        if not column.nullable:
            raise _fail(path, field, f"must be a finite number, got {value}")
        return
    bits = next((b for kind, b in INT_BITS.items() if type(column.type) is kind), None)
    if bits and not -2 ** (bits - 1) <= value < 2 ** (bits - 1):
        raise _fail(path, field, f"{value} does not fit a {bits}-bit integer")
    low = MINIMUM.get(column.name, None if column.name in SIGNED_COLUMNS else 0)
    if low is not None and value < low:
        raise _fail(path, field, f"must be >= {low}, got {_show(value)}")
    if column.name in MAXIMUM and value > MAXIMUM[column.name]:
        raise _fail(path, field, f"must be <= {MAXIMUM[column.name]}, got {_show(value)}")


def _check_required(path, obj: dict, keys: Iterable[str], prefix: str) -> None:
    for key in keys:
        if key not in obj:
            raise _fail(path, prefix + key, "missing")
        if obj[key] is None or obj[key] == "":
            raise _fail(path, prefix + key, "must not be null or empty")


def _check_columns(path, table: sa.Table, obj: dict, where: str, params: dict | None = None) -> None:
    """Every field of `obj` that has a column in `table` fits it; with `params` (a run's), the params columns are
    read from there. A run's run_id was checked against RUN_ID before; a measurement's is its run's."""
    for column in table.columns:
        if column.name in STORE_ONLY or column.name == "run_id":
            continue
        if params is not None and column.name in PARAM_COLUMNS:
            _check_value(path, f"{where}params.{column.name}", column, params.get(column.name))
        else:
            _check_value(path, f"{where}{column.name}", column, obj.get(column.name))


def load_result_file(path: str | os.PathLike) -> dict:
    """Read and validate one result file; return its parsed JSON.

    Checks the format tag, the required fields (REQUIRED_RUN, REQUIRED_PARAMS, REQUIRED_MEASUREMENT), the type
    of every field that has a column, the status values and that no (prompt_id, repeat) occurs twice — for the
    cell's run and for its paired baseline, which must be a run of the cell's plain decoding
    (strategies.store_baseline: `baseline`, or `llamacpp-generate` for llama.cpp cells) whose `paired_with` is the
    cell's run_id. Raises ResultFileError with a one-line message naming the file and the field.
    """
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise _fail(path, "format", "the file is not a JSON object")
    if doc.get("format") not in RESULT_FORMATS:
        raise _fail(path, "format", f"expected one of {', '.join(map(repr, RESULT_FORMATS))}, got "
                                    f"{_show(doc.get('format'))}")
    _check_run_document(path, doc, "")
    paired = doc.get("paired_baseline")
    if paired is not None:
        if doc["format"] == RESULT_FORMATS[0]:
            raise _fail(path, "paired_baseline", f"needs format {RESULT_FORMAT!r}")
        if not isinstance(paired, dict):
            raise _fail(path, "paired_baseline", "must be an object with `run` and `measurements`, or null")
        _check_run_document(path, paired, "paired_baseline.")
        if paired["run"].get("paired_with") != doc["run"]["run_id"]:
            raise _fail(path, "paired_baseline.run.paired_with", f"must be the cell's run_id "
                                                                 f"{_show(doc['run']['run_id'])}")
        cell_strategy = doc["run"]["params"]["strategy"]
        expected = store_baseline(cell_strategy) if cell_strategy in STRATEGIES else "baseline"
        if paired["run"]["params"]["strategy"] != expected:
            raise _fail(path, "paired_baseline.run.params.strategy", f"must be {expected!r} (the plain decoding "
                                                                     f"of a {cell_strategy!r} cell)")
        if paired["run"]["run_id"] == doc["run"]["run_id"]:
            raise _fail(path, "paired_baseline.run.run_id", "must differ from the cell's run_id")
    check_schema(path, doc)
    for prefix, part in (("", doc), ("paired_baseline.", paired)):
        if part is not None:
            check_invariants(path, part, prefix)
    return doc


class DuplicateKeyError(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple]) -> dict:
    """json.loads' object_pairs_hook: an object that names a key twice (json.loads would keep the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"duplicate key {_show(key)} in one object")
        out[key] = value
    return out


def read_json(path) -> object:
    """A file's JSON, with the reading and parsing failures as one-line ResultFileErrors: unreadable, not UTF-8,
    not JSON, a key twice in one object, or nested deeper than the parser's recursion limit."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except OSError as exc:
        raise ResultFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except DuplicateKeyError as exc:
        raise ResultFileError(f"{path}: duplicate keys: {exc}") from None
    except RecursionError:
        raise ResultFileError(f"{path}: not valid JSON: nested too deeply (a result file is a few levels "
                              "deep)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{path}: not valid JSON: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------------- schema

RESULT_SCHEMA = Path(__file__).with_name("result.schema.json")
# Lists the schema describes item by item but that are checked here in a loop instead (jsonschema takes ~10 us per
# item: a campaign's token ids would take minutes): the same bounds, read from the schema file.
LOOPED_LISTS = ("token_ids",)


@functools.cache
def schema_validator():
    """A jsonschema validator of db/result.schema.json, without the item schemas of LOOPED_LISTS."""
    import jsonschema

    schema = json.loads(RESULT_SCHEMA.read_text(encoding="utf-8"))
    for name in LOOPED_LISTS:
        schema["$defs"]["measurement"]["properties"][name].pop("items")
    return jsonschema.Draft202012Validator(schema)


@functools.cache
def looped_item_bounds(name: str) -> tuple[int, int]:
    items = json.loads(RESULT_SCHEMA.read_text(encoding="utf-8"))["$defs"]["measurement"]["properties"][name]["items"]
    return items["minimum"], items["maximum"]


def field_name(parts) -> str:
    """A jsonschema error path (`measurements`, 3, `token_ids`) as the messages write it: measurements[3].token_ids."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def schema_problem(error) -> str:
    """jsonschema's error as a short rule: its own message quotes the whole (maybe 50 MB) value and the schema."""
    if error.validator == "not":
        return "contains a control character (names must be printable text)"
    if error.validator == "maxLength":
        return f"longer than {error.validator_value} characters ({len(error.instance)}): the bound of this field"
    if error.validator == "type":
        kinds = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"must be of type {' or '.join(kinds)}, got {_show(error.instance)}"
    if error.validator in ("minimum", "maximum"):
        word = ">=" if error.validator == "minimum" else "<="
        return f"must be {word} {error.validator_value}, got {_show(error.instance)}"
    return " ".join(error.message.split())[:200]


def check_schema(path, doc: dict) -> None:
    """The file against db/result.schema.json (types, bounds, string sizes, printable names, list items)."""
    error = next(iter(sorted(schema_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))),
                 None)
    if error is not None:
        raise _fail(path, field_name(error.absolute_path) or "(top level)", schema_problem(error))
    low, high = looped_item_bounds("token_ids")
    for i, row in enumerate(_all_measurements(doc)):
        ids = row[1].get("token_ids") or []
        if not all(type(t) is int and low <= t <= high for t in ids):
            bad = next(t for t in ids if not (type(t) is int and low <= t <= high))
            raise _fail(path, f"{row[0]}.token_ids", f"token ids must be integers in [{low}, {high}] (the "
                                                     f"vocabulary's range is not recorded), got {_show(bad)}")


def _all_measurements(doc: dict) -> list[tuple[str, dict]]:
    rows = [(f"measurements[{i}]", m) for i, m in enumerate(doc["measurements"])]
    paired = doc.get("paired_baseline")
    if paired:
        rows += [(f"paired_baseline.measurements[{i}]", m) for i, m in enumerate(paired["measurements"])]
    return rows


# ---------------------------------------------------------------------------------------------------- invariants

TPS_TOLERANCE = 1e-3  # tokens_per_s may differ from new_tokens / wall_s by this share (a writer's rounding)
MAX_TOKENS_PER_S = 1e6  # one sequence's decoding speed: far above any hardware's (~1e3-1e4 tokens/s in 2026)
CLOCK_SKEW_S = 600  # a time may lie this far in the future of the ingesting machine (clocks of other hosts)
TURNS_UNRECORDED = 2  # files before `turns` was recorded: MT-Bench's, Spec-Bench's and specdec's prompt files
KNOWN_ENGINES = tuple(sorted({st.engine for st in STRATEGIES.values()}))


def check_invariants(path, doc: dict, prefix: str = "") -> None:
    """What a schema cannot state, for one run and its measurements (docs/store.md, Validation): the strategy and
    engine are known, times are in order and not in the future, an ok run has an ok measurement, and each
    measurement's counts and rates agree with each other and with the run's max_new_tokens. Fields a runner
    left out (null) are not checked: the format lets a runner omit what it cannot measure."""
    run, params = doc["run"], doc["run"]["params"]
    where = prefix + "run."
    strategy = params["strategy"]
    if strategy not in STRATEGIES:
        raise _fail(path, where + "params.strategy", f"unknown strategy {_show(strategy)} (known: specdec.strategies)")
    engine = params.get("engine")
    if engine is not None and engine != STRATEGIES[strategy].engine:
        raise _fail(path, where + "params.engine", f"must be {STRATEGIES[strategy].engine!r}, the engine of "
                                                   f"{strategy!r} (known engines: {', '.join(KNOWN_ENGINES)}), got "
                                                   f"{_show(engine)}")
    started = _parse_utc(run["started_utc"])
    latest = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(seconds=CLOCK_SKEW_S)
    if started > latest:
        raise _fail(path, where + "started_utc", f"{run['started_utc']} is in the future (more than "
                                                 f"{CLOCK_SKEW_S} s of clock skew)")
    if run.get("finished_utc") is not None:
        finished = _parse_utc(run["finished_utc"])
        if finished < started:
            raise _fail(path, where + "finished_utc", f"{run['finished_utc']} is before started_utc "
                                                      f"{run['started_utc']}")
        if finished > latest:
            raise _fail(path, where + "finished_utc", f"{run['finished_utc']} is in the future (more than "
                                                      f"{CLOCK_SKEW_S} s of clock skew)")
    rows = doc["measurements"]
    if run["status"] == "ok" and not any(m["status"] == "ok" for m in rows):
        raise _fail(path, prefix + "measurements", "a run with status ok needs at least one ok measurement")
    for i, m in enumerate(rows):
        check_measurement(path, m, f"{prefix}measurements[{i}].", params["max_new_tokens"])


def check_measurement(path, m: dict, where: str, max_new_tokens: int) -> None:
    """One measurement's counts and rates (see check_invariants)."""
    proposed, accepted = m.get("proposed_per_position"), m.get("accepted_per_position")
    if proposed is not None and accepted is not None:
        if len(proposed) != len(accepted):
            raise _fail(path, where + "accepted_per_position", f"has {len(accepted)} positions, "
                                                               f"proposed_per_position {len(proposed)}")
        for i, (p, a) in enumerate(zip(proposed, accepted)):
            if a > p:
                raise _fail(path, f"{where}accepted_per_position[{i}]", f"accepted {a} > proposed {p} at this "
                                                                        "position (accepted <= proposed)")
    if _known(m.get("accepted_tokens")) and _known(m.get("proposed_tokens")) \
            and m["accepted_tokens"] > m["proposed_tokens"]:
        raise _fail(path, where + "accepted_tokens", f"accepted {m['accepted_tokens']} > proposed "
                                                     f"{m['proposed_tokens']} (accepted <= proposed)")
    if m["status"] != "ok":
        return
    new, wall, rate = m.get("new_tokens"), m.get("wall_s"), m.get("tokens_per_s")
    if _known(new) and new < 1:
        raise _fail(path, where + "new_tokens", f"an ok measurement generated at least 1 token, got {new}")
    turns = m.get("turns", TURNS_UNRECORDED)
    if _known(new) and new > max_new_tokens * turns:
        raise _fail(path, where + "new_tokens", f"{new} > max_new_tokens {max_new_tokens} x {turns} turn(s)")
    if _known(wall) and wall <= 0 and _known(new):
        raise _fail(path, where + "wall_s", f"an ok measurement of {new} tokens took time (> 0 s), got {wall}")
    if _known(rate) and rate > MAX_TOKENS_PER_S:
        raise _fail(path, where + "tokens_per_s", f"{rate:g} > {MAX_TOKENS_PER_S:g} tokens/s: no single "
                                                  "sequence decodes that fast")
    if _known(rate) and _known(new) and _known(wall) and abs(rate - new / wall) > TPS_TOLERANCE * (new / wall):
        raise _fail(path, where + "tokens_per_s", f"{rate:g} is not new_tokens / wall_s = {new / wall:.6g} "
                                                  f"(tolerance {TPS_TOLERANCE:.1%})")


def _known(value) -> bool:
    """A number that is there: not null, and finite (NaN and inf are stored as NULL)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_run_document(path, doc: dict, prefix: str) -> None:
    """One run object and its measurements (the file itself, or its `paired_baseline`)."""
    run = doc.get("run")
    if not isinstance(run, dict):
        raise _fail(path, prefix + "run", "missing or not an object")
    _check_required(path, run, REQUIRED_RUN, prefix + "run.")
    if not (isinstance(run["run_id"], str) and RUN_ID.fullmatch(run["run_id"])):
        raise _fail(path, prefix + "run.run_id", f"must be 1-128 letters, digits or . _ : + - (a job writes a uuid4 "
                                                 f"hex), got {_show(run['run_id'])}")
    params = run["params"]
    if not isinstance(params, dict):
        raise _fail(path, prefix + "run.params", "must be an object")
    _check_required(path, params, REQUIRED_PARAMS, prefix + "run.params.")
    if run["status"] not in STATUSES:
        raise _fail(path, prefix + "run.status", f"must be one of {', '.join(STATUSES)}, got {_show(run['status'])}")
    _check_columns(path, runs, run, prefix + "run.", params)

    rows = doc.get("measurements")
    if not isinstance(rows, list):
        raise _fail(path, prefix + "measurements", "missing or not a list")
    seen = set()
    for i, row in enumerate(rows):
        where = f"{prefix}measurements[{i}]"
        if not isinstance(row, dict):
            raise _fail(path, where, "must be an object")
        _check_required(path, row, REQUIRED_MEASUREMENT, where + ".")
        if row["status"] not in STATUSES:
            raise _fail(path, where + ".status", f"must be one of {', '.join(STATUSES)}, got {_show(row['status'])}")
        _check_columns(path, measurements, row, where + ".")
        key = (row["prompt_id"], row["repeat"])
        if key in seen:
            raise _fail(path, where, f"duplicate prompt_id {key[0]!r} repeat {key[1]}")
        seen.add(key)


def run_documents(doc: dict) -> list[dict]:
    """The runs a validated file holds, each as {"run", "measurements"}: the cell's, then its paired baseline's."""
    paired = doc.get("paired_baseline")
    return [doc] + ([paired] if paired else [])


# ---------------------------------------------------------------------------------------------------- rows

def _extra_json(obj: dict, stored: set) -> str | None:
    """The fields of `obj` that have no column (e.g. a placement plan, per-device memory), as one JSON object."""
    extra = {k: v for k, v in obj.items() if k not in stored}
    return json.dumps(extra, sort_keys=True, default=str) if extra else None


def _number(value):
    """Non-finite floats (NaN from a 0/0 rate) become NULL: they would poison medians and are not valid JSON out."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _column_values(table: sa.Table, obj: dict, params: dict | None = None) -> dict:
    """`table`'s columns from a validated object (with `params`, a run's, for the params columns): JSON lists as
    JSON text, times as naive UTC, non-finite numbers as NULL."""
    row = {}
    for column in table.columns:
        value = (params if params is not None and column.name in PARAM_COLUMNS else obj).get(column.name)
        if column.name in JSON_FIELDS and value is not None:
            value = json.dumps(value)
        elif isinstance(column.type, sa.DateTime) and isinstance(value, str):
            value = _parse_utc(value)
        row[column.name] = _number(value)
    return row


def run_row(doc: dict, result_file: str, ingested_utc: datetime) -> dict:
    """The `runs` row of a validated result file."""
    run, params = doc["run"], doc["run"]["params"]
    return {**_column_values(runs, run, params), "params_json": json.dumps(params, sort_keys=True),
            EXTRA_FIELD: _extra_json(run, set(runs.columns.keys()) | {"params"}), "result_file": result_file,
            "ingested_utc": ingested_utc}


def measurement_rows(doc: dict) -> list[dict]:
    """The `measurements` rows of a validated result file."""
    run_id, stored = doc["run"]["run_id"], set(measurements.columns.keys())
    return [{**_column_values(measurements, m), "run_id": run_id, EXTRA_FIELD: _extra_json(m, stored)}
            for m in doc["measurements"]]


# ---------------------------------------------------------------------------------------------------- ingest

def check_prices(prices) -> dict[str, float]:
    """Config `prices`: device name (or substring, or "cpu") -> price per hour, a number >= 0."""
    if not isinstance(prices, dict):
        raise ResultFileError(f"prices must be an object of device name -> price per hour, got {_show(prices)}")
    for device, price in prices.items():
        if not isinstance(device, str) or not device.strip():
            raise ResultFileError(f"prices: device names must be non-empty strings, got {_show(device)}")
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0:
            raise ResultFileError(f"prices.{device}: must be a number >= 0 (price per hour), got {_show(price)}")
    return {device: float(price) for device, price in prices.items()}


LOCK_WAIT_S = 60.0  # how long ingest waits for readers (a dashboard query, `specdec query`) to release the store


def ingest(db_path: str | os.PathLike, result_paths: Iterable[str | os.PathLike],
           prices: dict | None = None, noise_limits: dict | None = None,
           wait_s: float = LOCK_WAIT_S) -> IngestReport:
    """Insert result files into the store at `db_path` (created if missing) in one transaction.

    All files are validated first (load_result_file), before the database is opened: a file that fails is refused,
    its one-line reason in the report's `refused`, and the others go in; when every file is refused the store is
    not touched. A run whose run_id is already stored, or appears earlier in the same batch, is skipped if it is
    the same run, and its file is refused naming both files if it is not (in a batch: any difference; against the
    store: host, start time, parameters, and each measurement's status, tok/s and output hash). Any database
    error rolls the whole batch back (ResultFileError naming the file whose rows raised it). While another process holds the store (DuckDB allows one
    writer and no readers beside it), ingest retries for up to `wait_s` seconds, saying so once on stderr.
    `prices`, when given, replaces the `prices` table in the same transaction; `noise_limits` (the config's
    `noise:`, merged over the defaults) replaces the `noise_thresholds` table. A file's paired baseline is a run
    of its own (run_documents).
    """
    prices = check_prices(prices) if prices is not None else None
    if noise_limits is not None:
        try:
            noise_limits = noise.check_thresholds(noise_limits)
        except ValueError as exc:
            raise ResultFileError(str(exc)) from None
    paths = [str(p) for p in result_paths]
    loaded, refused = [], []
    for path in paths:
        try:
            loaded.append((path, load_result_file(path)))
        except ResultFileError as exc:
            refused.append(str(exc))
    docs, clashes = unique_runs(loaded)
    refused += clashes
    if paths and not loaded:  # every file refused: the store is not touched (nor created)
        return IngestReport(files=len(paths), refused=refused)
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            return _ingest_once(db_path, docs, len(paths), prices, noise_limits, refused)
        except (duckdb.Error, sa.exc.SQLAlchemyError) as exc:
            if not is_locked(exc) or time.monotonic() >= deadline:
                raise
            if not said:
                print(f"ingest: {db_path} is open in another process (a dashboard or query); waiting up to "
                      f"{wait_s:g} s for it", file=sys.stderr, flush=True)
                said = True
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))


def unique_runs(docs: list[tuple[str, dict]]) -> tuple[list[tuple[str, dict | None]], list[str]]:
    """The batch with each run once, and the refusals: a later file holding the same run (same run_id, same
    content) becomes (path, None), skipped; a later file with the same run_id and other content is refused, with a
    message naming both files."""
    first: dict[str, tuple[str, dict]] = {}
    out, refused = [], []
    for path, doc in docs:
        run_id = doc["run"]["run_id"]
        if run_id not in first:
            first[run_id] = (path, doc)
            out.append((path, doc))
        elif doc == first[run_id][1]:
            out.append((path, None))
        else:
            refused.append(f"{path}: run.run_id: {run_id!r} is also in {first[run_id][0]} with different content; "
                           "remove the wrong file")
    return out, refused


def run_fingerprint(run: dict, rows: Iterable[dict]) -> tuple:
    """What must agree between a stored run and a file with its run_id for the two to be the same run: columns
    every specdec version fills the same way (others may move between columns and extra_json)."""
    return (run["host"], run["started_utc"], run["params_json"],
            sorted((m["prompt_id"], m["repeat"], m["status"], m["tokens_per_s"], m["token_hash"]) for m in rows))


def stored_fingerprints(conn, ids: list[str]) -> dict[str, tuple[str, tuple]]:
    """run_id -> (result file it was ingested from, fingerprint) for the stored runs among `ids`."""
    if not ids:
        return {}
    found = {r.run_id: r._mapping for r in conn.execute(
        sa.select(runs.c.run_id, runs.c.host, runs.c.started_utc, runs.c.params_json, runs.c.result_file)
        .where(runs.c.run_id.in_(ids)))}
    rows: dict[str, list] = {run_id: [] for run_id in found}
    if found:
        cols = [measurements.c[name] for name in ("run_id", "prompt_id", "repeat", "status", "tokens_per_s",
                                                  "token_hash")]
        for m in conn.execute(sa.select(*cols).where(measurements.c.run_id.in_(list(found)))):
            rows[m.run_id].append(m._mapping)
    return {run_id: (run["result_file"], run_fingerprint(run, rows[run_id])) for run_id, run in found.items()}


def _ingest_once(db_path, docs: list[tuple[str, dict | None]], files: int, prices, noise_limits,
                 refused: list[str]) -> IngestReport:
    report = IngestReport(files=files, skipped_runs=sum(1 for _, doc in docs if doc is None), refused=list(refused))
    try:
        init_db(db_path)
    except OSError as exc:  # the folder cannot be made (a file in the way, no permission, read-only mount)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(db_path) else ""
        raise ResultFileError(f"cannot create the results store {db_path}: {exc.strerror or exc}{where}") from None
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    engine = engine_for(db_path)
    try:
        with engine.begin() as conn:
            files_todo = [(path, run_documents(doc)) for path, doc in docs if doc is not None]
            stored = stored_fingerprints(conn, [part["run"]["run_id"] for _, parts in files_todo for part in parts])
            for path, parts in files_todo:
                new = [(run_row(part, path, now), measurement_rows(part)) for part in parts]
                clash = next((stored[run["run_id"]][0] for run, rows in new if run["run_id"] in stored
                              and stored[run["run_id"]][1] != run_fingerprint(run, rows)), None)
                if clash is not None:  # refused whole: a file's cell and paired baseline go in together
                    report.refused.append(f"{path}: run.run_id: already stored from {clash} with different "
                                          "content; remove the wrong file")
                    continue
                for run, rows in new:
                    if run["run_id"] in stored:
                        report.skipped_runs += 1
                        continue
                    try:
                        conn.execute(sa.insert(runs), [run])
                        if rows:
                            conn.execute(sa.insert(measurements), rows)
                    except (duckdb.Error, sa.exc.SQLAlchemyError) as exc:
                        raise ResultFileError(f"{path}: the store refused it: "
                                              f"{db_error_message(exc, db_path)}") from exc
                    report.new_runs += 1
                    report.measurement_rows += len(rows)
                    report.failed_rows += sum(1 for row in rows if row["status"] != "ok")
            if prices is not None:
                replace_rows(conn, prices_table, [{"device": d, "price_per_hour": p, "updated_utc": now}
                                                  for d, p in prices.items()])
            if noise_limits is not None:
                replace_rows(conn, noise_thresholds, [{"name": n, "value": v, "updated_utc": now}
                                                      for n, v in noise_limits.items()])
    finally:
        engine.dispose()
    return report


def summary_line(report: IngestReport, db_path: str | os.PathLike) -> str:
    """The one line the ingest CLI prints (after one line per refused file)."""
    refused = f"; {len(report.refused)} refused (above)" if report.refused else ""
    return (f"ingested {report.files} result files into {db_path}: {report.new_runs} new runs, "
            f"{report.skipped_runs} already stored (skipped), {report.measurement_rows} measurements "
            f"({report.failed_rows} failed){refused}")
