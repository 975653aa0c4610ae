"""Read a DuckDB store in tests: plain Python values (no pandas NaN for NULL), the file closed afterwards."""

from __future__ import annotations

import duckdb


def fetch(db, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()
