"""`specdec dashboard [--db PATH] [--port N] [--address A]`: run `streamlit run dashboard/app.py -- --db PATH`
headless, in this process.

The launcher replaces itself with the Streamlit server (exec) instead of starting it as a child: a SIGTERM or
SIGHUP from a service manager, `kill` or a closed terminal then reaches the server itself, and no orphan keeps the
port. Streamlit's own environment settings are respected: without --port/--address, STREAMLIT_SERVER_PORT and
STREAMLIT_SERVER_ADDRESS apply before the defaults (8501, localhost).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from specdec.db.store import default_db_path

APP = Path(__file__).with_name("app.py")
DEFAULT_PORT, DEFAULT_ADDRESS = 8501, "localhost"


def build_command(db: str | None, port: int, address: str = DEFAULT_ADDRESS) -> list[str]:
    """The streamlit command line. The db path is made absolute because the server runs in dashboard/ (so its
    .streamlit/config.toml applies) rather than in the caller's directory; without --db it is the default store
    ($SPECDEC_DB or db/specdec.duckdb here), flagged so the app knows `specdec ingest results/` fills it."""
    store = ["--db", os.path.abspath(db)] if db else ["--db", os.path.abspath(default_db_path()), "--default-store"]
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.headless", "true", "--server.port", str(port), "--server.address", address,
            "--browser.gatherUsageStats", "false", "--", *store]


def port_from_env() -> int:
    """STREAMLIT_SERVER_PORT (Streamlit's own variable) when set, else 8501."""
    raw = os.environ.get("STREAMLIT_SERVER_PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SystemExit(f"specdec dashboard: error: STREAMLIT_SERVER_PORT must be a port number, got {raw!r}")
    return int(raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="specdec dashboard", description="Start the Streamlit dashboard over the "
                                "results store (read-only; ingest can run while it is open).")
    p.add_argument("--db", default=None, help="store path (default: $SPECDEC_DB or db/specdec.duckdb)")
    p.add_argument("--port", type=int, default=None,
                   help=f"port to serve on (default: $STREAMLIT_SERVER_PORT, else {DEFAULT_PORT})")
    p.add_argument("--address", default=None,
                   help=f"interface to listen on (default: $STREAMLIT_SERVER_ADDRESS, else {DEFAULT_ADDRESS}; "
                        "0.0.0.0 to reach it from other machines)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    port = args.port if args.port is not None else port_from_env()
    address = args.address or os.environ.get("STREAMLIT_SERVER_ADDRESS") or DEFAULT_ADDRESS
    print(f"specdec dashboard: http://{address}:{port}/  "
          f"(store: {os.path.abspath(args.db or default_db_path())}; Ctrl-C stops)", file=sys.stderr, flush=True)
    command = build_command(args.db, port, address)
    os.chdir(APP.parent)
    os.execv(command[0], command)  # never returns: this process becomes the server


if __name__ == "__main__":
    sys.exit(main())
