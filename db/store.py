"""The results store: open it, create its tables and views, validate result files and ingest them.

DuckDB allows one read-write process per database file, and a writer locks readers in other processes out. So
workflow jobs never open the store: each writes a JSON result file, and `ingest` inserts a batch of files in one
short transaction. Engines use `NullPool` so the file lock is released as soon as a connection closes, instead of
being held by an idle pooled connection for the life of the process.

Ingest is all-or-nothing: every file is read and validated before the database is touched, then all new runs and
their measurements go in one transaction. A run whose `run_id` is already stored is skipped, so re-running ingest
over the same folder is harmless. A format-2 file may carry a second run, the cell's paired baseline; it is stored
as a run of its own, linked by `paired_with`. Format-1 files (before paired baselines) are still accepted.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from specdec import noise
from specdec.db import bootstrap
from specdec.db.schema import (EXTRA_FIELD, MEASUREMENT_JSON_FIELDS, PARAM_COLUMNS, RUN_JSON_FIELDS, Base, measurements,
                               median_ci_ranks, noise_thresholds, runs)
from specdec.db.schema import prices as prices_table

RESULT_FORMAT = "specdec-result/2"
RESULT_FORMATS = ("specdec-result/1", RESULT_FORMAT)  # 1: before paired baselines and noise readings
VIEWS_SQL = Path(__file__).with_name("views.sql")
STATUSES = ("ok", "failed")
# `runs` columns the store fills in itself rather than reading from the file's `run` object.
STORE_ONLY = ("params_json", "result_file", "ingested_utc", EXTRA_FIELD)

# Fields without which a row cannot be stored or matched to its baseline; they must be present and not null.
# Every other documented field may be null or absent (stored as NULL), so a runner that cannot measure
# something does not make its whole batch unloadable.
REQUIRED_RUN = ("run_id", "started_utc", "status", "host", "params")
REQUIRED_PARAMS = ("target", "strategy", "gpus", "temperature", "top_p", "top_k", "max_new_tokens")
REQUIRED_MEASUREMENT = ("prompt_id", "repeat", "status")


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


def default_db_path() -> Path:
    """`db/specdec.duckdb` relative to the working directory (the repository root), or `$SPECDEC_DB`."""
    return Path(os.environ.get("SPECDEC_DB") or "db/specdec.duckdb")


def engine_for(path: str | os.PathLike, read_only: bool = False) -> Engine:
    """A SQLAlchemy engine on the DuckDB file at `path`.

    NullPool: every `connect()` opens the file and closing the connection releases DuckDB's file lock, so an
    ingest in another process can run as soon as a reader is done. `read_only=True` lets several reader
    processes share the file (but not with a writer).
    """
    url = URL.create("duckdb", database=str(path))
    return sa.create_engine(url, poolclass=NullPool, connect_args={"read_only": read_only})


def init_db(path: str | os.PathLike) -> None:
    """Create the parent folder, the tables (if missing) and (re)create the views. Safe to call any number of times.

    Views are `CREATE OR REPLACE`d every time, so an edited views.sql takes effect on the next ingest. Tables
    are created when missing, and a store made by an older version gets the columns it lacks (NULL in the rows
    it already holds: nothing stored changes). Missing noise thresholds get their defaults, and the bootstrap rank
table (db/bootstrap.py) is filled once.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = engine_for(path)
    try:
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
            add_missing_columns(conn)
            stored = set(conn.execute(sa.select(noise_thresholds.c.name)).scalars())
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            missing = [{"name": n, "value": v, "updated_utc": now} for n, v in noise.THRESHOLDS.items()
                       if n not in stored]
            if missing:
                conn.execute(sa.insert(noise_thresholds), missing)
            if conn.execute(sa.select(sa.func.count()).select_from(median_ci_ranks)).scalar() != bootstrap.MAX_EXACT:
                conn.execute(sa.delete(median_ci_ranks))
                conn.execute(sa.insert(median_ci_ranks), bootstrap.rank_rows())
            for statement in view_statements():
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def add_missing_columns(conn) -> None:
    """ALTER TABLE ... ADD COLUMN IF NOT EXISTS for every column of the schema: columns added since a store was
    created appear, empty (every added column is nullable, so old rows stay valid)."""
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            if column.primary_key:
                continue
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN IF NOT EXISTS "{column.name}" {kind}')


def view_statements() -> list[str]:
    """The statements of views.sql, split at semicolons that end a line (comment-only chunks dropped)."""
    chunks = re.split(r";[ \t]*$", VIEWS_SQL.read_text(encoding="utf-8"), flags=re.M)
    code = lambda chunk: "\n".join(l for l in chunk.splitlines() if not l.strip().startswith("--")).strip()  # noqa: E731
    return [chunk.strip() for chunk in chunks if code(chunk)]


def db_error_message(exc: BaseException, path: str | os.PathLike) -> str:
    """One line for a database error, with the likely cause spelled out for the common lock conflict."""
    text = str(getattr(exc, "orig", None) or exc)
    if "could not set lock" in text.lower():  # DuckDB's IOException when another process holds the file
        return (f"the results store {path} is open in another process (a dashboard, query or ingest); "
                f"DuckDB allows one writer and no readers alongside it: close it and retry")
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


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
    if isinstance(kind, sa.Boolean):
        ok = isinstance(value, bool)
        want = "true or false"
    elif isinstance(kind, sa.Integer):  # Integer and BigInteger
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif isinstance(kind, sa.Double):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "a number"
    elif isinstance(kind, sa.DateTime):
        want = "an ISO 8601 UTC time like 2026-11-23T07:30:00Z"
        try:
            ok = isinstance(value, str) and _parse_utc(value) is not None
        except ValueError:
            ok = False
    else:
        ok = isinstance(value, str)
        want = "a string"
    if not ok:
        raise _fail(path, field, f"must be {want}, got {_show(value)}")


def _check_required(path, obj: dict, keys: Iterable[str], prefix: str) -> None:
    for key in keys:
        if key not in obj:
            raise _fail(path, prefix + key, "missing")
        if obj[key] is None or obj[key] == "":
            raise _fail(path, prefix + key, "must not be null or empty")


def _check_list(path, field: str, value) -> None:
    if value is not None and not isinstance(value, list):
        raise _fail(path, field, f"must be a list or null, got {_show(value)}")


def load_result_file(path: str | os.PathLike) -> dict:
    """Read and validate one result file; return its parsed JSON.

    Checks the format tag, the required fields (REQUIRED_RUN, REQUIRED_PARAMS, REQUIRED_MEASUREMENT), the type
    of every field that has a column, the status values and that no (prompt_id, repeat) occurs twice — for the
    cell's run and for its paired baseline, which must be a `baseline` run whose `paired_with` is the cell's
    run_id. Raises ResultFileError with a one-line message naming the file and the field.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResultFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{path}: not valid JSON: {str(exc).splitlines()[0]}") from exc
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
        if paired["run"]["params"]["strategy"] != "baseline":
            raise _fail(path, "paired_baseline.run.params.strategy", "must be 'baseline'")
        if paired["run"]["run_id"] == doc["run"]["run_id"]:
            raise _fail(path, "paired_baseline.run.run_id", "must differ from the cell's run_id")
    return doc


def _check_run_document(path, doc: dict, prefix: str) -> None:
    """One run object and its measurements (the file itself, or its `paired_baseline`)."""
    run = doc.get("run")
    if not isinstance(run, dict):
        raise _fail(path, prefix + "run", "missing or not an object")
    _check_required(path, run, REQUIRED_RUN, prefix + "run.")
    params = run["params"]
    if not isinstance(params, dict):
        raise _fail(path, prefix + "run.params", "must be an object")
    _check_required(path, params, REQUIRED_PARAMS, prefix + "run.params.")
    if run["status"] not in STATUSES:
        raise _fail(path, prefix + "run.status", f"must be one of {', '.join(STATUSES)}, got {_show(run['status'])}")
    for column in runs.columns:
        name = column.name
        if name in STORE_ONLY:
            continue
        if name in RUN_JSON_FIELDS:
            _check_list(path, f"{prefix}run.{name}", run.get(name))
        elif name in PARAM_COLUMNS:
            _check_value(path, f"{prefix}run.params.{name}", column, params.get(name))
        else:
            _check_value(path, f"{prefix}run.{name}", column, run.get(name))

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
        for column in measurements.columns:
            if column.name in MEASUREMENT_JSON_FIELDS:
                _check_list(path, f"{where}.{column.name}", row.get(column.name))
            elif column.name not in ("run_id", EXTRA_FIELD):
                _check_value(path, f"{where}.{column.name}", column, row.get(column.name))
        key = (row["prompt_id"], row["repeat"])
        if key in seen:
            raise _fail(path, where, f"duplicate prompt_id {key[0]!r} repeat {key[1]}")
        seen.add(key)


def run_documents(doc: dict) -> list[dict]:
    """The runs a validated file holds, each as {"run", "measurements"}: the cell's, then its paired baseline's."""
    paired = doc.get("paired_baseline")
    return [doc] + ([paired] if paired else [])


# ---------------------------------------------------------------------------------------------------- rows

def _json_text(value) -> str | None:
    return None if value is None else json.dumps(value)


def _extra_json(obj: dict, stored: set) -> str | None:
    """The fields of `obj` that have no column (e.g. a placement plan, per-device memory), as one JSON object."""
    extra = {k: v for k, v in obj.items() if k not in stored}
    return json.dumps(extra, sort_keys=True, default=str) if extra else None


def _number(value):
    """Non-finite floats (NaN from a 0/0 rate) become NULL: they would poison medians and are not valid JSON out."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_row(doc: dict, result_file: str, ingested_utc: datetime) -> dict:
    """The `runs` row of a validated result file."""
    run, params = doc["run"], doc["run"]["params"]
    row = {}
    for column in runs.columns:
        name = column.name
        if name in PARAM_COLUMNS:
            value = params.get(name)
        elif name in RUN_JSON_FIELDS:
            value = _json_text(run.get(name))
        else:
            value = run.get(name)
        if isinstance(column.type, sa.DateTime) and isinstance(value, str):
            value = _parse_utc(value)
        row[name] = _number(value)
    row["params_json"] = json.dumps(params, sort_keys=True)
    row[EXTRA_FIELD] = _extra_json(run, set(row) | {"params"})
    row["result_file"] = result_file
    row["ingested_utc"] = ingested_utc
    return row


def measurement_rows(doc: dict) -> list[dict]:
    """The `measurements` rows of a validated result file."""
    run_id = doc["run"]["run_id"]
    out = []
    for m in doc["measurements"]:
        row = {}
        for column in measurements.columns:
            value = m.get(column.name)
            if column.name in MEASUREMENT_JSON_FIELDS:
                value = _json_text(value)
            row[column.name] = _number(value)
        row["run_id"] = run_id
        row[EXTRA_FIELD] = _extra_json(m, set(row))
        out.append(row)
    return out


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


def ingest(db_path: str | os.PathLike, result_paths: Iterable[str | os.PathLike],
           prices: dict | None = None, noise_limits: dict | None = None) -> IngestReport:
    """Insert result files into the store at `db_path` (created if missing) in one transaction.

    All files are validated first (ResultFileError on the first bad one, before the database is opened). Runs
    whose run_id is already stored, or appears earlier in the same batch, are skipped. Any database error rolls
    the whole batch back. `prices`, when given, replaces the `prices` table in the same transaction;
    `noise_limits` (the config's `noise:`, merged over the defaults) replaces the `noise_thresholds` table.
    """
    prices = check_prices(prices) if prices is not None else None
    if noise_limits is not None:
        try:
            noise_limits = noise.check_thresholds(noise_limits)
        except ValueError as exc:
            raise ResultFileError(str(exc)) from None
    paths = [str(p) for p in result_paths]
    docs = [(p, load_result_file(p)) for p in paths]
    report = IngestReport(files=len(docs))
    init_db(db_path)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    engine = engine_for(db_path)
    try:
        with engine.begin() as conn:
            parts = [(path, part) for path, doc in docs for part in run_documents(doc)]
            ids = [part["run"]["run_id"] for _, part in parts]
            stored = set(conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id.in_(ids))).scalars()) if ids else set()
            new_runs, new_measurements = [], []
            for path, part in parts:
                run_id = part["run"]["run_id"]
                if run_id in stored:
                    report.skipped_runs += 1
                    continue
                stored.add(run_id)
                new_runs.append(run_row(part, path, now))
                new_measurements.extend(measurement_rows(part))
            if new_runs:
                conn.execute(sa.insert(runs), new_runs)
            if new_measurements:
                conn.execute(sa.insert(measurements), new_measurements)
            if prices is not None:
                conn.execute(sa.delete(prices_table))
                if prices:
                    conn.execute(sa.insert(prices_table), [{"device": d, "price_per_hour": p, "updated_utc": now}
                                                           for d, p in prices.items()])
            if noise_limits is not None:
                conn.execute(sa.delete(noise_thresholds))
                conn.execute(sa.insert(noise_thresholds), [{"name": n, "value": v, "updated_utc": now}
                                                           for n, v in noise_limits.items()])
    finally:
        engine.dispose()
    report.new_runs = len(new_runs)
    report.measurement_rows = len(new_measurements)
    report.failed_rows = sum(1 for row in new_measurements if row["status"] != "ok")
    return report


def summary_line(report: IngestReport, db_path: str | os.PathLike) -> str:
    """The one line the ingest CLI prints."""
    return (f"ingested {report.files} result files into {db_path}: {report.new_runs} new runs, "
            f"{report.skipped_runs} already stored (skipped), {report.measurement_rows} measurements "
            f"({report.failed_rows} failed)")
