#!/usr/bin/env bash
# Set up .venv (if needed) and run the default benchmark matrix (config.yaml) end to end: decode every cell,
# ingest the results into db/specdec.duckdb, print the best speedup per pair and strategy.
# Extra arguments go to snakemake, e.g. `bash scripts/run-matrix.sh --configfile config/suite.yaml`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
CORES=${CORES:-$(python -c "import os; print(os.cpu_count())")}
python workflow/matrix.py "$@"  # files given with --configfile: a YAML error named with file and line
snakemake --cores "$CORES" "$@"
