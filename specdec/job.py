"""One benchmark cell: load the models once, decode every prompt `repeats` times, write one result file.

The file format is docs/results.md. A cell that fails (missing weights, too few GPUs, out of memory) still writes
its file, with the error on every affected row, so the failure is stored and the rest of the matrix runs on.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import traceback
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from specdec import __version__
from specdec.decoding import DecodeSettings
from specdec.models import encode_prompt, load_registry
from specdec.prompts import load_prompts, select
from specdec.runner import check_settings, generate, load_pair, warm_up

FORMAT = "specdec-result/1"
JOB_DEFAULTS = dict(draft=None, k=None, gpus=0, temperature=0.0, top_p=1.0, top_k=0, draft_sampling="greedy",
                    use_cache=True, max_new_tokens=128, repeats=1, warmup=1, seed=0, stop_at_eos=True,
                    ngram_max=3, prompt_ids=None, categories=None, per_category=None, models=None,
                    config_hash=None, workflow_run_id=None, cell=None, gpu_mode="pipeline")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:1000]


def git_state(cwd: str | None = None) -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit is None:
            return None, None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def provenance(job: dict) -> dict:
    import torch
    import transformers

    # The commit of the specdec code that ran (an editable install: the repository), not of the working directory.
    commit, dirty = git_state(str(Path(__file__).resolve().parent))
    return {
        "git_commit": commit, "git_dirty": dirty, "host": socket.gethostname(), "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(), "gpu_names": [], "gpu_count": 0,
        "cuda_version": torch.version.cuda, "driver_version": driver_version() if torch.cuda.is_available() else None,
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "specdec_version": __version__, "python_version": platform.python_version(),
        "seed": job["seed"], "config_hash": job["config_hash"], "devices": ["cpu"],
    }


def settings_for(job: dict) -> DecodeSettings:
    return DecodeSettings(max_new_tokens=job["max_new_tokens"], temperature=job["temperature"], top_p=job["top_p"],
                          top_k=job["top_k"], k=job["k"] or 1, draft_sampling=job["draft_sampling"],
                          seed=job["seed"], use_cache=job["use_cache"], stop_at_eos=job["stop_at_eos"],
                          ngram_max=job["ngram_max"])


def read_job(spec: str | dict) -> dict:
    """A job from a dict, a JSON string, or a JSON file, with defaults filled in; unknown keys are refused."""
    if isinstance(spec, str):
        spec = json.loads(spec) if spec.lstrip().startswith("{") else json.loads(Path(spec).read_text())
    unknown = set(spec) - set(JOB_DEFAULTS) - {"target", "strategy", "prompts_file"}
    if unknown:
        raise ValueError(f"job has unknown key(s) {sorted(unknown)}")
    job = {**JOB_DEFAULTS, **spec}
    for key in ("target", "strategy", "prompts_file"):
        if not job.get(key):
            raise ValueError(f"job is missing '{key}'")
    return job


def failed_rows(prompts: list[dict], repeats: int, error: str) -> list[dict]:
    return [{"prompt_id": p["id"], "category": p["category"], "repeat": r, "status": "failed", "error": error}
            for p in prompts for r in range(repeats)]


def run_cell(job: dict, progress=None) -> dict:
    """Run one cell and return the result document (never raises for model or decoding failures)."""
    from specdec import devices

    job = read_job(job)
    run = {"run_id": uuid.uuid4().hex, "workflow_run_id": job["workflow_run_id"], "started_utc": utc_now(),
           "status": "ok", "error": None, **provenance(job)}
    params = {key: job[key] for key in ("cell", "target", "draft", "strategy", "k", "gpus", "temperature", "top_p",
                                        "top_k", "draft_sampling", "use_cache", "max_new_tokens", "repeats",
                                        "warmup", "prompts_file", "stop_at_eos", "ngram_max", "gpu_mode")}
    run["params"] = params
    prompts = select(load_prompts(job["prompts_file"]), job["prompt_ids"], job["categories"], job["per_category"])
    s = settings_for(job)
    measurements: list[dict] = []
    claim = None
    try:
        registry = load_registry(job["models"])
        check_settings(job["strategy"], job["draft"], s, registry, job["target"])
        claim = devices.claim_gpus(job["gpus"])
        run.update(gpu_names=claim.names, gpu_count=len(claim.indices), devices=claim.devices)
        target_spec = registry[job["target"]]
        params.update(target_source=target_spec.source, dtype=target_spec.dtype,
                      draft_source=registry[job["draft"]].source if job["draft"] else None)
        placement = {}
        if len(claim.indices) > 1:  # pipeline: the target's layers split over the claimed GPUs, balanced by memory
            placement = {"device_map": "balanced",
                         "max_memory": devices.pipeline_device_map_memory(claim, devices.visible_gpus())}
        pair = load_pair(job["target"], job["draft"], registry, device=claim.devices[0], **placement)
        if job["warmup"]:
            warm_up(pair, job["strategy"], encode_prompt(pair.target, prompts[0]["prompt"]), s, job["warmup"])
    except Exception as exc:  # the cell fails as a whole; record why on every row it would have produced
        run.update(status="failed", error=one_line(exc))
        measurements = failed_rows(prompts, job["repeats"], run["error"])
        if claim:
            claim.release()
        run["finished_utc"] = utc_now()
        return {"format": FORMAT, "run": run, "measurements": measurements}

    for p in prompts:
        for repeat in range(job["repeats"]):
            row = {"prompt_id": p["id"], "category": p["category"], "repeat": repeat, "status": "ok", "error": None}
            try:
                row.update(generate(pair, job["strategy"], p["prompt"], replace(s, seed=s.seed + repeat), p["turns"]))
            except Exception as exc:  # e.g. out of memory on one long prompt: keep going with the next
                row.update(status="failed", error=one_line(exc))
                _free_cuda()
            measurements.append(row)
            if progress:
                progress(row)
    claim.release()
    if all(m["status"] == "failed" for m in measurements):
        run.update(status="failed", error=measurements[0]["error"])
    run["finished_utc"] = utc_now()
    return {"format": FORMAT, "run": run, "measurements": measurements}


def _free_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_atomic(path: str | Path, document: dict) -> None:
    """Write then rename, so an interrupted job never leaves a truncated result file for ingest to trip on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle)
    os.replace(tmp, path)


def run_job(spec: str | dict, out: str | Path) -> int:
    try:
        job = read_job(spec)
    except (ValueError, OSError) as exc:
        print(f"specdec: error: bad job: {exc}", file=sys.stderr)
        return 2

    def progress(row):
        tps = row.get("tokens_per_s")
        status = f"{tps:6.1f} tok/s" if row["status"] == "ok" and tps else f"FAILED {row['error']}"
        print(f"  {job['cell'] or job['strategy']}  {row['prompt_id']:<10} r{row['repeat']}  {status}",
              file=sys.stderr, flush=True)

    try:
        document = run_cell(job, progress)
    except Exception as exc:  # a bug or a bad prompt file: no result to store, so fail the job loudly
        traceback.print_exc()
        print(f"specdec: error: {one_line(exc)}", file=sys.stderr)
        return 1
    write_atomic(out, document)
    if document["run"]["status"] == "failed":
        print(f"specdec: cell {job['cell'] or job['strategy']} FAILED (stored in {out}): {document['run']['error']}",
              file=sys.stderr)
    return 0
