"""The cluster profile: what profiles/slurm makes Snakemake ask of Slurm for each rule (a dry run, no cluster).

The run through a real single-node Slurm cluster (sbatch, squeue, DuckDB rows) is scripts/slurm-e2e.sh, which
.ci/run calls: it takes a few minutes and installs Debian packages, too much for the unit suite.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace


REPO = Path(__file__).parent.parent


def dry_run(tmp_path) -> str:
    config = {"pairs": [{"target": "smollm2-135m"}], "prompts": str(REPO / "prompts" / "smoke.jsonl"),
              "strategies": ["baseline"], "draft_lengths": [2], "gpus": [2], "gpu_mode": "tensor",
              "generation": {"max_new_tokens": 8}, "db": "store.duckdb", "results": "results",
              "resources": {"gpu_model": "a100", "mem_mb": 40000, "runtime": 90}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "8", "-s", str(REPO / "Snakefile"),
                          "--profile", str(REPO / "profiles" / "slurm")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    return out.stdout + out.stderr


def resources_of(log: str, rule: str) -> dict:
    block = log.split(f"rule {rule}:", 1)[1]
    line = re.search(r"resources: (.*)", block).group(1)
    return dict(item.split("=", 1) for item in line.split(", "))


def test_the_slurm_profile_asks_for_the_cells_gpus_model_memory_runtime_and_cpus(tmp_path):
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm_jobstep import get_cpu_setting

    log = dry_run(tmp_path)
    cell = resources_of(log, "run_cell")
    assert (cell["gpu"], cell["gpu_model"], cell["mem_mb"], cell["runtime"]) == ("2", "a100", "40000", "90")
    assert "OMP_NUM_THREADS=4 specdec run-job" in log  # set-threads from the profile (a dry run caps it at --cores)
    ingest = resources_of(log, "ingest")
    assert (ingest["mem_mb"], ingest["runtime"]) == ("4000", "30")
    # what the executor plugin turns those resources into on the sbatch command line
    job = SimpleNamespace(resources=SimpleNamespace(gpu=2, gpu_model="a100", get=lambda k, d=None: {
        "gpu": 2, "gpu_model": "a100"}.get(k, d)), threads=4)
    assert set_gres_string(job).strip() == "--gpus=a100:2"
    assert get_cpu_setting(job, True) == "--cpus-per-task=4"
