# specdec benchmark matrix: `snakemake --cores 2` (local, profiles/default) or `--profile profiles/slurm`.
# Every cell of config.yaml's matrix becomes one `specdec run-job` writing one result file; a single ingest step
# then inserts all of them into the DuckDB store (DuckDB allows one writer process; jobs never open it).

import os
import sys

# Rules call `specdec` (and python) by name: find the ones of the environment running Snakemake, also when it was
# started as .venv/bin/snakemake or `.venv/bin/python -m snakemake` without activating the venv.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
sys.path.insert(0, f"{workflow.basedir}/workflow")
import matrix  # noqa: E402  (workflow/matrix.py: config checks and the cell matrix)

if Path("config.yaml").exists():  # a YAML syntax error named with file and line (Snakemake's own names neither)
    try:
        matrix.load_config_file("config.yaml")
    except matrix.ConfigError as exc:
        matrix.exit_with_config_error(str(exc))


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/drafters.smk"
include: "workflow/rules/decode.smk"
include: "workflow/rules/store.smk"


rule all:
    # A rule with a shell but no output always runs: the summary is printed after every run, also when every
    # cell was already done ("nothing to be done" would skip an onsuccess handler).
    input:
        INGESTED,
    default_target: True
    localrule: True
    params:
        summary=summary_command(),
        report=report_command(),
    shell:
        "{params.summary}; {params.report}"
