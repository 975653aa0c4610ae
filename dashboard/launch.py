"""`specdec dashboard [--db PATH] [--port N]`: run `streamlit run dashboard/app.py -- --db PATH` headless."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from specdec.db.store import default_db_path

APP = Path(__file__).with_name("app.py")


def build_command(db: str | None, port: int, address: str = "localhost") -> list[str]:
    """The streamlit command line. The db path is made absolute because the server runs in dashboard/ (so its
    .streamlit/config.toml applies) rather than in the caller's directory; without --db it is the default store
    ($SPECDEC_DB or db/specdec.duckdb here), flagged so the app knows `specdec ingest results/` fills it."""
    store = ["--db", os.path.abspath(db)] if db else ["--db", os.path.abspath(default_db_path()), "--default-store"]
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.headless", "true", "--server.port", str(port), "--server.address", address,
            "--browser.gatherUsageStats", "false", "--", *store]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="specdec dashboard", description="Start the Streamlit dashboard over the "
                                "results store (read-only; ingest can run while it is open).")
    p.add_argument("--db", default=None, help="store path (default: $SPECDEC_DB or db/specdec.duckdb)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default: %(default)s)")
    p.add_argument("--address", default="localhost",
                   help="interface to listen on (default: %(default)s; 0.0.0.0 to reach it from other machines)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"specdec dashboard: http://{args.address}:{args.port}/  "
          f"(store: {os.path.abspath(args.db or default_db_path())}; Ctrl-C stops)", file=sys.stderr)
    try:
        return subprocess.call(build_command(args.db, args.port, args.address), cwd=APP.parent)
    except KeyboardInterrupt:  # Ctrl-C reaches streamlit too; exit quietly once it has stopped
        return 0


if __name__ == "__main__":
    sys.exit(main())
