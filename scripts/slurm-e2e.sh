#!/usr/bin/env bash
# End-to-end check of the cluster profile: a single-node Slurm cluster on localhost (scripts/slurm-local.sh), a
# small matrix run with `snakemake --profile profiles/slurm`, then the rows checked in DuckDB.
#
# The matrix: tiny random Llama models (tests/tiny.py), baseline + speculative + ngram on the CPU, plus one
# baseline cell asking for 1 GPU. Slurm schedules that one on the node's fake GPU gres (so `--gpus` really goes
# through sbatch); the machine has no GPU, so the cell must be stored as failed with the "0 visible" message.
#
# Prints "slurm e2e: SKIPPED: <reason>" and exits 0 when this machine cannot run a Slurm cluster (no apt, not
# root, daemons refuse to start); exits 1 when the cluster ran but the workflow or the checks failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
export HF_HUB_OFFLINE=1

skip() {
    echo "slurm e2e: SKIPPED: $*"
    exit 0
}

fail() {
    echo "slurm e2e: FAILED: $*"
    exit 1
}

# shellcheck disable=SC1091
. scripts/setup.sh >/tmp/specdec-slurm-e2e-setup.log 2>&1 \
    || fail "scripts/setup.sh could not set up .venv: $(tail -n 3 /tmp/specdec-slurm-e2e-setup.log)"
set +e  # setup.sh turns on errexit; this script checks each step itself
if ! python -c "import snakemake_executor_plugin_slurm" 2>/dev/null; then
    python -m pip install --quiet -e ".[slurm]" >/dev/null 2>&1 \
        || skip "could not install the [slurm] extra (snakemake-executor-plugin-slurm) with pip"
fi

started_here=0
[ -n "${SPECDEC_SLURM_DIR:-}" ] || export SPECDEC_SLURM_DIR=/tmp/specdec-slurm
pgrep -x slurmctld >/dev/null || started_here=1
up_out=$(bash scripts/slurm-local.sh up 2>&1)
case $? in
    0) ;;
    3) skip "$(echo "$up_out" | sed -n 's/^UNAVAILABLE: //p' | tail -n 1)" ;;
    *) fail "scripts/slurm-local.sh up: $(echo "$up_out" | tail -n 3)" ;;
esac
export SLURM_CONF="$SPECDEC_SLURM_DIR/slurm.conf"

WORK=$(mktemp -d /tmp/specdec-slurm-e2e.XXXXXX)
cleanup() {
    [ "$started_here" = 1 ] && bash scripts/slurm-local.sh down >/dev/null 2>&1
    [ -n "${SPECDEC_KEEP_E2E:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

python - "$WORK" <<'EOF' || fail "could not write the e2e matrix"
import json, sys
from pathlib import Path

sys.path.insert(0, "tests")
from tiny import save_tiny_pair
from transformers.utils import logging

logging.disable_progress_bar()

work = Path(sys.argv[1])
models = save_tiny_pair(work / "models")
(work / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in [
    {"id": "a", "category": "qa", "prompt": "what is two plus two?"},
    {"id": "b", "category": "repetitive", "prompt": "la la la la la la la la"}]) + "\n")
config = {
    "models": models, "pairs": [{"target": "tiny-target", "draft": "tiny-draft"}],
    "prompts": str(work / "prompts.jsonl"), "strategies": ["baseline", "speculative", "ngram"],
    "draft_lengths": [2], "gpus": [0, 1],
    "generation": {"max_new_tokens": 8, "repeats": 1, "warmup": 0},
    "db": str(work / "specdec.duckdb"), "results": str(work / "results"), "tag": "slurm-e2e",
    "resources": {"mem_mb": 1000, "runtime": 10},
}
(work / "config.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
EOF

echo "slurm e2e: running the matrix through --profile profiles/slurm (work dir $WORK)"
start=$(date +%s)
(cd "$WORK" && timeout 1200 snakemake -s "$REPO/Snakefile" --profile "$REPO/profiles/slurm" \
    --slurm-no-account --slurm-status-command squeue --slurm-init-seconds-before-status-checks 5 \
    --set-threads run_cell=1 --default-resources mem_mb=1000 runtime=10 --jobs 4) >"$WORK/snakemake.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
    tail -n 40 "$WORK/snakemake.log"
    for f in "$WORK"/.snakemake/slurm_logs/*/*/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -n 15 "$f"; }; done
    fail "snakemake --profile profiles/slurm exited $rc (log above)"
fi
echo "slurm e2e: workflow finished in $(( $(date +%s) - start )) s"

python - "$WORK" <<'EOF' || fail "the stored rows are not what the matrix should produce (see above)"
import glob, json, sys
import duckdb

work = sys.argv[1]
files = sorted(glob.glob(f"{work}/results/slurm-e2e/*/cells/*.json"))
docs = {json.load(open(f))["run"]["params"]["cell"]: json.load(open(f)) for f in files}
problems = []
slurm_ids = {cell: doc["run"].get("slurm_job_id") for cell, doc in docs.items()}
if len(docs) != 6:
    problems.append(f"expected 6 result files (3 strategies x gpus 0/1), found {len(docs)}: {sorted(docs)}")
if not all(slurm_ids.values()) or len(set(slurm_ids.values())) != len(slurm_ids):
    problems.append(f"every cell should have run as its own Slurm job, got job ids {slurm_ids}")
con = duckdb.connect(f"{work}/specdec.duckdb", read_only=True)
# cells only: with `baseline: paired` (the default) every speculative/ngram cell also stores its paired baseline run
runs = con.execute("SELECT gpus, strategy, status, error FROM runs WHERE paired_with IS NULL "
                   "ORDER BY gpus, strategy").fetchall()
counts = con.execute("SELECT r.gpus, m.status, count(*) FROM measurements m JOIN runs r USING (run_id) "
                     "WHERE r.paired_with IS NULL GROUP BY ALL ORDER BY ALL").fetchall()
paired = con.execute("SELECT c.strategy, p.status, count(m.run_id) FROM runs p JOIN runs c ON c.run_id = p.paired_with "
                     "LEFT JOIN measurements m ON m.run_id = p.run_id WHERE c.gpus = 0 GROUP BY ALL ORDER BY ALL"
                     ).fetchall()
same = con.execute("SELECT count(*), count(*) FILTER (WHERE matches_baseline) FROM speedup "
                   "WHERE strategy <> 'baseline' AND gpus = 0").fetchone()
print("runs:", runs)
print("measurements (gpus, status, rows):", counts)
print("speculative/ngram rows identical to the baseline:", same)
print("paired baseline runs of the CPU cells (cell strategy, status, rows):", paired)
if [(g, s) for g, s, *_ in runs] != [(g, s) for g in (0, 1) for s in ("baseline", "ngram", "speculative")]:
    problems.append("runs table does not hold one row per cell")
if any(status != "ok" for g, _, status, _ in runs if g == 0):
    problems.append("a CPU cell failed")
if any(status != "failed" or "asks for 1 GPU(s) but this machine has 0" not in (error or "")
       for g, _, status, error in runs if g == 1):
    problems.append("the 1-GPU cells should be stored as failed with the '0 visible' message")
if counts != [(0, "ok", 6), (1, "failed", 6)]:
    problems.append(f"expected 6 ok CPU rows and 6 failed GPU rows, got {counts}")
if paired != [("ngram", "ok", 2), ("speculative", "ok", 2)]:
    problems.append(f"each CPU speculative/ngram cell should store an ok paired baseline of 2 rows, got {paired}")
if same != (4, 4):
    problems.append(f"greedy speculative and ngram rows should all match the baseline, got {same}")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
echo "slurm e2e: 1 passed, 0 failed"
