# Config validation and the cell matrix. Runs when the Snakefile is parsed, i.e. before any job starts.
import json
import re
import shlex
import sys

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
import matrix  # noqa: E402  (workflow/matrix.py: checks and expansion, no decoding logic)


# A bad config is one line naming the field, and nothing else: exit before Snakemake starts (or locks) anything.
try:
    matrix.validate_config(config)  # the schema's checks and defaults, NaN and infinities refused
except matrix.ConfigError as exc:
    matrix.exit_with_config_error(str(exc))
try:
    PROMPTS = matrix.check_config(config)  # paths are relative to the working directory, as for the jobs
    CELLS = matrix.expand_cells(config)
except matrix.ConfigError as exc:
    matrix.exit_with_config_error(str(exc))

HOST = matrix.host_label(config)
RUN_DIR = f"{config['results']}/{config['tag']}/{HOST}"
INGESTED = f"{RUN_DIR}/ingested.txt"


def cell_result(name):
    return f"{RUN_DIR}/cells/{name}.json"


wildcard_constraints:
    cell="|".join(re.escape(name) for name in CELLS) or "no-cells",


def workflow_threads(wildcards=None):
    # Cluster executors define no total core count; there profiles/slurm sets the threads per job instead.
    try:
        cores = workflow.cores
    except Exception:
        cores = None
    return cores if isinstance(cores, int) else 4
