"""`python -m specdec.db.ingest --db PATH FILE_OR_DIR...` (also `specdec ingest ...`): insert result files.

Directories are searched recursively for `*.json`. A JSON file found there that is not a result file (no
`"format": "specdec-result/..."`, e.g. a trained drafter's drafter.json or its training data's data.json under
results/drafters/) is skipped with a note. A result file that fails validation (db/store.py, docs/store.md) is
refused with one `refused: FILE: FIELD: rule` line on stderr and the others go in, in one transaction; the exit
status is then 2. A file named on the command line must be a result file. Prints one summary line; other errors
(bad options, a store that cannot be opened) are one `error: ...` line on stderr with exit status 2 and nothing
ingested.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import duckdb
import sqlalchemy as sa

from specdec.db.store import (LOCK_WAIT_S, RESULT_FORMAT, ResultFileError, db_error_message, default_db_path, ingest,
                              is_locked, summary_line)

RESULT_FAMILY = RESULT_FORMAT.rsplit("/", 1)[0] + "/"  # "specdec-result/": any version is a result file


def is_other_json(path: Path) -> bool:
    """True for a JSON file that is plainly not a result file (valid JSON without a specdec-result format tag).
    Unreadable or invalid JSON is not decided here: ingest reports it, since it may be a damaged result file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    fmt = doc.get("format") if isinstance(doc, dict) else None
    return not (isinstance(fmt, str) and fmt.startswith(RESULT_FAMILY))


def collect_result_files(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """(result files, other JSON files skipped): files as given, plus the result files among `*.json` under each
    directory (sorted, so ingest order and messages are stable)."""
    found: list[Path] = []
    skipped: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for candidate in sorted(p for p in path.rglob("*.json") if p.is_file()):
                (skipped if is_other_json(candidate) else found).append(candidate)
        elif path.is_file():
            found.append(path)
        else:
            raise ResultFileError(f"{raw}: no such file or directory")
    return found, skipped


def set_aside_crashed(files: list[Path], folder: Path) -> list[Path]:
    """Move the result files of cells whose process crashed (`run.crash`: it died of a signal) into `folder`, as
    <name>.<run id>.json. The workflow's ingest step does this once they are stored, so they stay in the store as
    failures while the next run measures those cells again (a missing result file is what Snakemake reruns)."""
    moved = []
    for path in files:
        run = json.loads(path.read_text(encoding="utf-8"))["run"]
        if run.get("crash"):
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{path.stem}.{run['run_id']}.json"
            os.replace(path, target)
            moved.append(target)
    return moved


def json_option(text: str | None, flag: str):
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        raise ResultFileError(f"{flag} is not valid JSON ({exc.msg})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec ingest", description="Insert result files into the DuckDB store "
                                     "(one transaction; runs already stored are skipped; files that fail validation "
                                     "are refused, one line each, and the others go in).")
    parser.add_argument("--db", default=None, help="store path (default: $SPECDEC_DB or results/specdec.duckdb)")
    parser.add_argument("--prices", default=None, metavar="JSON",
                        help='replace the device price table, e.g. \'{"A100": 1.29, "cpu": 0.05}\' (price per hour)')
    parser.add_argument("--wait", type=float, default=LOCK_WAIT_S, metavar="SECONDS",
                        help="while another process (a dashboard query, `specdec query`) holds the store, retry for "
                             "this long before giving up (default: %(default)g)")
    parser.add_argument("--noise", default=None, metavar="JSON",
                        help='replace the noise thresholds runs are judged by, e.g. \'{"other_cpu_cores": 0.5}\' '
                             "(the rest keep their defaults)")
    parser.add_argument("--set-aside-crashed", default=None, metavar="DIR", type=Path,
                        help="once stored, move the result files of crashed cells (their process died of a signal) "
                             "into DIR, so the workflow measures those cells again on its next run")
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="result files, or folders to search for *.json")
    args = parser.parse_args(argv)
    db_path = Path(args.db) if args.db else default_db_path()
    try:
        if not (math.isfinite(args.wait) and args.wait >= 0):
            raise ResultFileError(f"--wait must be a number of seconds >= 0, got {args.wait}")
        prices, noise_limits = json_option(args.prices, "--prices"), json_option(args.noise, "--noise")
        files, skipped = collect_result_files(args.paths)
        if skipped:
            print(f"note: skipped {len(skipped)} JSON file{'s' if len(skipped) > 1 else ''} that "
                  f"{'are' if len(skipped) > 1 else 'is'} not a result file (e.g. {skipped[0]})", file=sys.stderr)
        report = ingest(db_path, files, prices=prices, noise_limits=noise_limits, wait_s=args.wait)
    except ResultFileError as exc:
        print(f"error: {exc} (nothing was ingested)", file=sys.stderr)
        return 2
    except (duckdb.Error, sa.exc.SQLAlchemyError) as exc:
        waited = f" (waited {args.wait:g} s; --wait sets how long)" if is_locked(exc) else ""
        print(f"error: {db_error_message(exc, db_path)}{waited} (nothing was ingested)", file=sys.stderr)
        return 2
    for line in report.refused:
        print(f"refused: {line}", file=sys.stderr)
    print(summary_line(report, db_path))
    if args.set_aside_crashed:
        moved = set_aside_crashed(files, args.set_aside_crashed)
        if moved:
            print(f"set aside {len(moved)} crashed cell result{'s' if len(moved) > 1 else ''} in "
                  f"{args.set_aside_crashed} (stored as failures): the next run measures "
                  f"{'them' if len(moved) > 1 else 'it'} again")
    return 2 if report.refused else 0


if __name__ == "__main__":
    sys.exit(main())
