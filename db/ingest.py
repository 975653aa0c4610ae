"""`python -m specdec.db.ingest --db PATH FILE_OR_DIR...` (also `specdec ingest ...`): insert result files.

Directories are searched recursively for `*.json`; every file found must be a valid result file, or nothing is
ingested (the error names the file and field). Prints one summary line; errors are one `error: ...` line on
stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import duckdb
import sqlalchemy as sa

from specdec.db.store import ResultFileError, db_error_message, default_db_path, ingest, summary_line


def collect_result_files(paths: list[str]) -> list[Path]:
    """Files as given, plus `*.json` under each directory (sorted, so ingest order and messages are stable)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.json") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise ResultFileError(f"{raw}: no such file or directory")
    return found


def json_option(text: str | None, flag: str):
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        raise ResultFileError(f"{flag} is not valid JSON ({exc.msg})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec ingest", description="Insert result files into the DuckDB store "
                                     "(one transaction; runs already stored are skipped).")
    parser.add_argument("--db", default=None, help="store path (default: $SPECDEC_DB or db/specdec.duckdb)")
    parser.add_argument("--prices", default=None, metavar="JSON",
                        help='replace the device price table, e.g. \'{"A100": 1.29, "cpu": 0.05}\' (price per hour)')
    parser.add_argument("--noise", default=None, metavar="JSON",
                        help='replace the noise thresholds runs are judged by, e.g. \'{"other_cpu_cores": 0.5}\' '
                             "(the rest keep their defaults)")
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="result files, or folders to search for *.json")
    args = parser.parse_args(argv)
    db_path = Path(args.db) if args.db else default_db_path()
    try:
        prices, noise_limits = json_option(args.prices, "--prices"), json_option(args.noise, "--noise")
        report = ingest(db_path, collect_result_files(args.paths), prices=prices, noise_limits=noise_limits)
    except ResultFileError as exc:
        print(f"error: {exc} (nothing was ingested)", file=sys.stderr)
        return 2
    except (duckdb.Error, sa.exc.SQLAlchemyError) as exc:
        print(f"error: {db_error_message(exc, db_path)} (nothing was ingested)", file=sys.stderr)
        return 2
    print(summary_line(report, db_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
