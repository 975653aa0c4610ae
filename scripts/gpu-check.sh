#!/usr/bin/env bash
# The GPU path end to end in one prepared run (docs/gpu.md): run on the GPU machine from the repository root.
#   bash scripts/gpu-check.sh OUTDIR             join and check the bundle (gpu-bundle/, from scripts/gpu-bundle.sh),
#                                                install its wheels offline into this Python, then the engine tests on
#                                                cuda, `specdec bench`, the matrix through Snakemake into DuckDB, one
#                                                tensor-parallel cell over NCCL and the GPU claim (8 minutes at most)
#   bash scripts/gpu-check.sh OUTDIR --dry-run   a CPU machine (CI): every step that needs no GPU, the rest skipped
#   bash scripts/gpu-check.sh --stash            keep the bundle parts this run carries for a later run
# Each step prints PASS, FAIL or SKIP with the reason; the last line is `N passed, M failed` (exit 1 on a FAIL).
# The steps are scripts/gpu_check.py; PYTHON picks the interpreter (default: python3, the image's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
