"""One benchmark cell: load the models once, decode every prompt `repeats` times, write one result file.

The file format is docs/results.md. A cell that fails (missing weights, too few GPUs, out of memory) still writes
its file, with the error on every affected row, so the failure is stored and the rest of the matrix runs on.

Paired baselines (`baseline_mode: paired`, the default): a cell that is not itself a baseline also decodes its
engine's plain decoding (strategies.store_baseline: `llamacpp-generate` for llama.cpp cells, else `baseline`) on
the same loaded target, with the same settings, weights, threads and seeds, interleaved with its own decodes
prompt × repeat by prompt × repeat in ABBA order, so load that comes and goes hits both sides alike and every
speedup is a ratio of two decodes taken seconds apart on the same machine. Those rows go into the same file as a
second run (`paired_baseline`, linked by `paired_with`). While the cell decodes, specdec.measure.noise samples what else
loads the machine.
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

from specdec.run import devices, parallel, serve

from specdec.methods import drafters

from specdec.measure import machine, noise
from specdec.model.decoding import DecodeSettings
from specdec.model.kernels import cpuinfo_field
from specdec.measure.metrics import DegenerateRule
from specdec.model.models import encode_prompt, load_registry
from specdec.prompts import load_prompts, select
from specdec.run.runner import (check_settings, extra_buffers_in_use, generate, generate_batch, load_pair,
                                threads_in_use, use_threads, warm_up, weight_format)
from specdec.strategies import LOOKAHEAD_DEFAULTS, STRATEGIES, is_plain_baseline, names, store_baseline

FORMAT = "specdec-result/2"
BASELINE_MODES = ("paired", "shared")
JOB_DEFAULTS = dict(baseline_mode="paired", draft=None, k=None, tree_budget=None, gpus=0, temperature=0.0, top_p=1.0,
                    top_k=0, draft_sampling="greedy", use_cache=True, max_new_tokens=128, repeats=1, warmup=1, seed=0,
                    stop_at_eos=True, ngram_max=3, prompt_ids=None, categories=None, per_category=None, models=None,
                    recycle_topk=8, rest_corpus=None, **LOOKAHEAD_DEFAULTS,  # train-free proposers' parameters
                    config_hash=None, workflow_run_id=None, cell=None, gpu_mode="pipeline",
                    drafters_dir=None, drafter_settings=None,  # trained drafters: cache root, training settings
                    degenerate=None,  # metrics.DegenerateRule fields (None: its defaults)
                    weights=None, threads=None,  # our engine's weight format (None: the alias's); CPU threads
                    batch_size=1,  # sequences decoded at once (runner.generate_batch); 1: one at a time
                    concurrency=1, request_rate=None, server=None)  # serving cells (run/serve.py)


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
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


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
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),  # set when the cell ran as a cluster job
    }


def settings_for(job: dict) -> DecodeSettings:
    return DecodeSettings.from_mapping({**job, "k": job["k"] or 1})


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
    DegenerateRule.from_dict(job["degenerate"])
    batch = job["batch_size"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch!r}")
    if job["baseline_mode"] not in BASELINE_MODES:
        raise ValueError(f"baseline_mode must be one of {', '.join(BASELINE_MODES)}, got {job['baseline_mode']!r}")
    return job


def failed_rows(prompts: list[dict], repeats: int, error: str) -> list[dict]:
    return [{"prompt_id": p["id"], "category": p["category"], "repeat": r, "status": "failed", "error": error}
            for p in prompts for r in range(repeats)]


def is_paired(job: dict) -> bool:
    """Whether this cell decodes a paired baseline: every cell but a baseline, unless the config shares baselines."""
    return job["baseline_mode"] == "paired" and not is_plain_baseline(job["strategy"])


def unit_order(i: int, paired: bool) -> tuple[str, ...]:
    """Which side decodes first in the i-th prompt × repeat unit: ABBA (cell, baseline, baseline, cell, ...), so
    a trend in the machine's speed favours neither side and warm caches from the previous decode alternate too."""
    if not paired:
        return ("cell",)
    return ("cell", "baseline") if i % 2 == 0 else ("baseline", "cell")


def turns_of(prompt: dict) -> int:
    """A prompt's user turns (1 + its follow-ups): a row's new_tokens may reach max_new_tokens x turns (ingest checks
    it)."""
    return 1 + len(prompt.get("turns") or [])


def decode_units(prompts: list[dict], repeats: int, paired: bool, decode_one, progress=None):
    """Every prompt × repeat once for the cell (and once for its paired baseline, in unit_order). `decode_one(side,
    prompt, repeat)` returns the row's metrics (or raises). Returns (cell rows, baseline rows); every row has its
    `decode_index`, the position of that decode in the job."""
    rows = {"cell": [], "baseline": []}
    index = 0
    for i, (p, repeat) in enumerate((p, r) for p in prompts for r in range(repeats)):
        for side in unit_order(i, paired):
            row = {"prompt_id": p["id"], "category": p["category"], "repeat": repeat, "status": "ok", "error": None,
                   "decode_index": index, "turns": turns_of(p)}
            row.update(decode_one(side, p, repeat))
            index += 1
            rows[side].append(row)
            if progress:
                progress(row if side == "cell" else {**row, "paired_baseline": True})
    return rows["cell"], rows["baseline"]


def new_run(job: dict) -> tuple[dict, list[dict]]:
    """(the run record of a cell about to run: provenance and parameters, status ok; the prompts it decodes)."""
    run = {"run_id": uuid.uuid4().hex, "workflow_run_id": job["workflow_run_id"], "started_utc": utc_now(),
           "status": "ok", "error": None, **provenance(job)}
    params = {key: job[key] for key in ("cell", "target", "draft", "strategy", "k", "tree_budget", "gpus",
                                        "temperature", "top_p", "top_k", "draft_sampling", "use_cache",
                                        "max_new_tokens", "repeats", "warmup", "prompts_file", "stop_at_eos",
                                        "ngram_max", "recycle_topk", "rest_corpus", "gpu_mode", "weights", "threads",
                                        "batch_size", *LOOKAHEAD_DEFAULTS)}
    params["engine"] = STRATEGIES[job["strategy"]].engine
    params["degenerate"] = DegenerateRule.from_dict(job["degenerate"]).to_dict()  # behind every `degenerate` flag
    if not is_plain_baseline(job["strategy"]):  # a baseline is its own reference: it has no baseline mode
        params["baseline_mode"] = job["baseline_mode"]
    run["params"] = params
    prompts = select(load_prompts(job["prompts_file"]), job["prompt_ids"], job["categories"], job["per_category"])
    return run, prompts


def crashed_document(job: dict, crash: dict) -> dict:
    """The result file of a cell whose process died of a signal (isolate.run_child's crash): every row failed
    with a one-line reason naming the signal, the engine and the crashing frame; `run.crash` holds them apart, so
    the workflow's ingest step can set the file aside once stored and the next run measures the cell again."""
    job = read_job(job)
    run, prompts = new_run(job)
    reason = (f"NativeCrash: the cell's process died of {crash['signal']} in engine "
              f"{run['params']['engine']} ({job['strategy']})" + (f", at {crash['frame']}" if crash["frame"] else ""))
    run.update(status="failed", error=reason[:1000], finished_utc=utc_now(),
               crash={"signal": crash["signal"], "frame": crash["frame"]})
    return {"format": FORMAT, "run": run, "measurements": failed_rows(prompts, job["repeats"], run["error"]),
            "paired_baseline": None}


def run_cell(job: dict, progress=None, read_noise=None) -> dict:
    """Run one cell and return the result document (never raises for model or decoding failures).

    Inside a tensor-parallel worker (see parallel.py) it runs this rank's share and raises instead, so torchrun
    stops every rank and the parent process stores the failure. `read_noise` replaces the machine reading of
    specdec.measure.noise (tests)."""
    job = read_job(job)
    worker = parallel.in_worker()
    paired = is_paired(job)
    run, prompts = new_run(job)
    params = run["params"]
    rule = DegenerateRule.from_dict(job["degenerate"])
    s = settings_for(job)
    if params["engine"] == "server":
        return run_serving(job, run, prompts, s, rule, paired, progress, read_noise)
    claim = None
    gpu_uuids: list[str] = []
    try:
        if job["batch_size"] > len(prompts):
            raise ValueError(f"batch_size {job['batch_size']} is more than the job's {len(prompts)} prompt(s): slots "
                             "would stay idle; lower it or select more prompts")
        registry = load_registry(job["models"])
        check_settings(job["strategy"], job["draft"], s, registry, job["target"], weights=job["weights"])
        check_gpu_mode(job)
        use_threads(job["threads"])
        target_spec = registry[job["target"]]
        trained = drafters.parse_alias(job["draft"])  # `<target>+eagle|medusa`: no registry entry, a folder
        draft_spec = registry[job["draft"]] if job["draft"] and not trained else None
        params.update(target_source=target_spec.source, dtype=target_spec.dtype,
                      draft_source=draft_spec.source if draft_spec else None)
        if trained:
            params["draft_source"] = "drafter:" + str(drafters.drafter_dir(*trained, job["drafter_settings"],
                                                                          job["drafters_dir"]))
        if worker:
            pair = parallel.load_pair_tensor_parallel(job["target"], job["draft"], registry)
            used = [parallel.worker_device()]
        else:
            claim = devices.claim_gpus(job["gpus"])
            run.update(gpu_names=claim.names, gpu_count=len(claim.indices), devices=claim.devices)
            inventory = devices.visible_gpus() if claim.indices else []
            gpu_uuids = [g.uuid for g in inventory if g.index in claim.indices]
            placement = devices.plan_cell(target_spec, draft_spec, job["gpu_mode"], claim, inventory,
                                          job["max_new_tokens"], s.k if STRATEGIES[job["strategy"]].uses_k else 0)
            run["placement"] = placement.record()
            if placement.mode == "tensor":  # the same cell again, on one process per GPU
                sampler = start_noise(read_noise, gpu_uuids)
                document = parallel.run_under_torchrun(job, len(claim.indices), claim.indices)
                claim.release()
                return add_noise(merge_worker_document(document, run, claim), sampler.stop())
            kwargs = ({"device_map": "balanced", "max_memory": placement.max_memory}
                      if placement.mode == "pipeline" else {})
            pair = load_pair(job["target"], job["draft"], registry, device=claim.devices[0], **kwargs,
                             drafters_dir=job["drafters_dir"], drafter_settings=job["drafter_settings"],
                             engine=params["engine"], weights=job["weights"], threads=job["threads"])
            used = claim.devices
        # `weights` and `threads` stay as asked (None: the alias's format, torch's thread count), so cells that set
        # neither keep matching baselines stored before these existed; llama.cpp cells always run the GGUF's own
        # quantisation and record it. What ran is kept beside them.
        if params["engine"] == "llamacpp":
            params["weights"] = weight_format(pair)
            params["llamacpp_extra_buffers"] = extra_buffers_in_use(pair)  # amx | off (probe crashed: ...) | ...
        params.update(weights_used=weight_format(pair), threads_used=threads_in_use(pair))
        if all(d == "cpu" for d in used):  # the machine's limits, so every CPU figure can be set against them
            run["machine"] = machine.run_record(run["cpu_name"], params["threads_used"])
        # weights as loaded, before decoding's first call repacks CPU layers into non-parameter buffers
        weights = devices.loaded_bytes([pair.target.model] + ([pair.draft.model] if pair.draft else []), used)
        warm_ids = encode_prompt(pair.target, prompts[0]["prompt"])
        warm_up(pair, job["strategy"], warm_ids, s, job["warmup"])  # also with warmup 0: see runner.warm_up
        if paired:  # both sides: one-time costs must not land on whichever decodes first
            warm_up(pair, store_baseline(job["strategy"]), warm_ids, s, job["warmup"])
        if job["batch_size"] > 1 and job["warmup"]:  # the batched passes' shapes too
            for strategy in [job["strategy"]] + ([store_baseline(job["strategy"])] if paired else []):
                generate_batch(pair, strategy, prompts[:job["batch_size"]], replace(s, max_new_tokens=8),
                               job["batch_size"], rule)
    except Exception as exc:  # the cell fails as a whole; record why on every row it would have produced
        if worker:
            raise
        run.update(status="failed", error=one_line(exc))
        if claim:
            claim.release()
        run["finished_utc"] = utc_now()
        return {"format": FORMAT, "run": run, "measurements": failed_rows(prompts, job["repeats"], run["error"]),
                "paired_baseline": None}

    devices.reset_peak_memory(used)
    peaks = [0] * len(used)

    def decode_one(side: str, p: dict, repeat: int) -> dict:
        nonlocal peaks
        strategy = job["strategy"] if side == "cell" else store_baseline(job["strategy"])
        try:
            out = generate(pair, strategy, p["prompt"], replace(s, seed=s.seed + repeat), p["turns"], rule)
        except Exception as exc:  # e.g. out of memory on one long prompt: keep going with the next
            if worker:  # the other ranks are waiting inside a collective: only stopping them all is safe
                raise
            _free_cuda()
            out = {"status": "failed", "error": one_line(exc)}
        peaks = [max(a, b) for a, b in zip(peaks, devices.peak_memory_per_device(used))]
        return out

    batches = []

    def decode_batch(side: str, repeat: int) -> list[dict]:
        nonlocal peaks
        strategy = job["strategy"] if side == "cell" else store_baseline(job["strategy"])
        try:
            rows, totals = generate_batch(pair, strategy, prompts, replace(s, seed=s.seed + repeat),
                                          job["batch_size"], rule)
            batches.append({"side": side, "repeat": repeat, **totals})
        except Exception as exc:  # the whole batch failed (e.g. out of memory): its rows say why
            if worker:  # as in decode_one: the other ranks wait inside a collective
                raise
            _free_cuda()
            rows = [{"status": "failed", "error": one_line(exc)} for _ in prompts]
        peaks = [max(a, b) for a, b in zip(peaks, devices.peak_memory_per_device(used))]
        return rows

    sampler = None if worker else start_noise(read_noise, gpu_uuids)  # the parent samples for its ranks
    if job["batch_size"] > 1:
        measurements, baseline_rows = decode_batches(prompts, job["repeats"], paired, decode_batch, progress)
        run["batches"] = batches
    else:
        measurements, baseline_rows = decode_units(prompts, job["repeats"], paired, decode_one, progress)
    if worker:
        used, peaks, weights = [sum(x, []) for x in zip(*parallel.gather((used, peaks, weights)))]
    else:
        claim.release()
    run.update(devices=used, device_peak_memory_bytes=peaks, device_weight_bytes=weights)
    if all(m["status"] == "failed" for m in measurements):
        run.update(status="failed", error=measurements[0]["error"])
    run["finished_utc"] = utc_now()
    document = {"format": FORMAT, "run": run, "measurements": measurements,
                "paired_baseline": paired_baseline(run, baseline_rows) if paired else None}
    return document if sampler is None else add_noise(document, sampler.stop())


def decode_batches(prompts: list[dict], repeats: int, paired: bool, decode_batch, progress=None):
    """decode_units for a batch size above 1: each repeat decodes every prompt at once (`decode_batch(side,
    repeat)` returns one row of metrics per prompt), the cell's batch and its paired baseline's alternating in
    unit_order (ABBA over repeats). Every row of one batch has the batch's `decode_index`."""
    rows = {"cell": [], "baseline": []}
    for index, (repeat, side) in enumerate((r, side) for r in range(repeats) for side in unit_order(r, paired)):
        for p, metrics_row in zip(prompts, decode_batch(side, repeat)):
            row = {"prompt_id": p["id"], "category": p["category"], "repeat": repeat, "status": "ok", "error": None,
                   "decode_index": index, "turns": turns_of(p), **metrics_row}
            rows[side].append(row)
            if progress:
                progress(row if side == "cell" else {**row, "paired_baseline": True})
    return rows["cell"], rows["baseline"]


def run_serving(job: dict, run: dict, prompts: list[dict], s: DecodeSettings, rule: DegenerateRule, paired: bool,
                progress=None, read_noise=None) -> dict:
    """A serving cell (engine 'server'): a server process per side driven by concurrent clients (run/serve.py).
    A server that does not start fails the whole cell before any request is measured."""
    params = run["params"]
    params.update(concurrency=job["concurrency"], request_rate=job["request_rate"],
                  server={**serve.SERVER_DEFAULTS, **(job["server"] or {})}, threads_used=job["threads"] or os.cpu_count())
    log_dir = Path(tempfile.mkdtemp(prefix=f"specdec-server-{job['cell'] or job['strategy']}-"))
    run["server_logs"] = str(log_dir)
    sampler = None
    try:
        registry = load_registry(job["models"])
        check_settings(job["strategy"], job["draft"], s, registry, job["target"], weights=job["weights"])
        if not isinstance(job["concurrency"], int) or job["concurrency"] < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {job['concurrency']!r}")
        if job["request_rate"] is not None and not job["request_rate"] > 0:
            raise ValueError(f"request_rate must be > 0 requests/s (or null: closed loop), got {job['request_rate']!r}")
        target_spec = registry[job["target"]]
        params.update(target_source=target_spec.source, dtype=target_spec.dtype,
                      draft_source=registry[job["draft"]].source if job["draft"] else None)
        sampler = start_noise(read_noise, [])
        measurements, baseline_rows, summaries = serve.run_server_cell(job, registry, prompts, paired, rule, log_dir,
                                                                       unit_order, progress)
    except Exception as exc:  # nothing half-measured: every row of the cell fails with the one-line reason
        if sampler is not None:
            sampler.stop()
        run.update(status="failed", error=one_line(exc), finished_utc=utc_now())
        return {"format": FORMAT, "run": run, "measurements": failed_rows(prompts, job["repeats"], run["error"]),
                "paired_baseline": None}
    run["serving"] = summaries["cell"]
    if all(m["status"] == "failed" for m in measurements):
        run.update(status="failed", error=measurements[0]["error"])
    run["finished_utc"] = utc_now()
    document = {"format": FORMAT, "run": run, "measurements": measurements, "paired_baseline": None}
    if paired:
        document["paired_baseline"] = paired_baseline(run, baseline_rows)
        document["paired_baseline"]["run"]["serving"] = summaries["baseline"]
    return add_noise(document, sampler.stop())


def paired_baseline(run: dict, rows: list[dict]) -> dict:
    """The paired baseline as a run of its own: the cell's provenance and settings with its plain decoding (no
    draft, no k), linked to the cell's run by `paired_with`."""
    params = {key: value for key, value in run["params"].items() if key != "baseline_mode"}
    baseline = store_baseline(params["strategy"])
    params.update(strategy=baseline, draft=None, k=None, draft_source=None, engine=STRATEGIES[baseline].engine)
    failed = all(m["status"] == "failed" for m in rows)
    base = {**run, "run_id": uuid.uuid4().hex, "paired_with": run["run_id"], "params": params,
            "status": "failed" if failed else "ok", "error": rows[0]["error"] if failed else None}
    return {"run": base, "measurements": rows}


def start_noise(read_noise, gpu_uuids: list[str]) -> noise.Sampler:
    return noise.Sampler(read_noise or (lambda: noise.read_machine(gpu_uuids))).start()


def add_noise(document: dict, readings: list) -> dict:
    """The noise readings of the whole job, and the spread of the baseline's tok/s over repeats (the paired
    baseline's, or a baseline cell's own), on the cell's run."""
    baseline = document.get("paired_baseline")
    if baseline:
        spread = noise.repeat_spread(baseline["measurements"])
    elif is_plain_baseline(document["run"]["params"]["strategy"]):
        spread = noise.repeat_spread(document["measurements"])
    else:
        spread = None  # a shared baseline was measured in another job; its own run has its spread
    document["run"].update(noise.summarise(readings), baseline_spread=spread)
    return document


def check_gpu_mode(job: dict) -> None:
    """Checks of the multi-GPU settings that need neither models nor devices."""
    if job["gpu_mode"] not in devices.GPU_MODES:
        raise devices.DeviceError(f"gpu_mode must be one of {', '.join(devices.GPU_MODES)}, got {job['gpu_mode']!r}")
    if not isinstance(job["gpus"], int) or job["gpus"] < 0:
        raise devices.DeviceError(f"gpus must be an integer >= 0 (0 = CPU), got {job['gpus']!r}")
    if job["weights"] and job["gpu_mode"] == "tensor" and job["gpus"] > 1:
        raise devices.DeviceError("weights apply to whole models, not to a target sharded by gpu_mode tensor: drop "
                                  "weights or use gpu_mode pipeline")
    if job["gpus"] and STRATEGIES[job["strategy"]].engine == "llamacpp":
        raise devices.DeviceError(f"'{job['strategy']}' runs llama.cpp on the CPU (llama-cpp-python is built without "
                                  "CUDA here): use gpus: 0 for llama.cpp cells")
    if job["gpu_mode"] == "tensor" and job["gpus"] > 1:
        tensor = names(tensor_parallel=True)
        if job["strategy"] not in tensor or drafters.parse_alias(job["draft"]):
            raise devices.DeviceError(f"gpu_mode tensor runs {', '.join(tensor)} with a draft model from the "
                                      f"registry (whole on rank 0), not '{job['strategy']}' with draft {job['draft']!r}: "
                                      "use gpu_mode: pipeline for this cell")


def merge_worker_document(document: dict, run: dict, claim) -> dict:
    """Rank 0's document, with what only the parent knows: the claimed devices and the memory estimate.
    Workers report their own devices (cuda:<local rank> after CUDA_VISIBLE_DEVICES); the parent's claim names
    the same GPUs by this machine's indices."""
    worker_run = document["run"]
    on_gpus = all(d.startswith("cuda") for d in worker_run.get("devices") or [])
    known = dict(started_utc=run["started_utc"], gpu_names=claim.names, gpu_count=len(claim.indices),
                 placement=run["placement"], devices=claim.devices if on_gpus else worker_run.get("devices"))
    worker_run.update(run_id=run["run_id"], **known)
    if document.get("paired_baseline"):
        document["paired_baseline"]["run"].update(paired_with=run["run_id"], **known)
    return document


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
    """`specdec run-job` inside its child process (isolate.run_job_isolated starts it): run the cell, write its
    result file."""
    try:
        job = read_job(spec)
    except (ValueError, OSError) as exc:
        print(f"specdec: error: bad job: {exc}", file=sys.stderr)
        return 2

    def progress(row):
        tps = row.get("tokens_per_s")
        status = f"{tps:6.1f} tok/s" if row["status"] == "ok" and tps else f"FAILED {row['error']}"
        side = "  (paired baseline)" if row.get("paired_baseline") else ""
        print(f"  {job['cell'] or job['strategy']}  {row['prompt_id']:<10} r{row['repeat']}  {status}{side}",
              file=sys.stderr, flush=True)

    try:
        document = run_cell(job, progress)
    except Exception as exc:  # a bug or a bad prompt file: no result to store, so fail the job loudly
        traceback.print_exc()
        print(f"specdec: error: {one_line(exc)}", file=sys.stderr)
        return 1
    write_atomic(out, document)
    run = document["run"]
    if run.get("other_cpu_cores") is not None:
        print(f"specdec: while {job['cell'] or job['strategy']} ran, other processes used "
              f"{run['other_cpu_cores']:.2f} of {run['cpu_count']} cores (CPU steal "
              f"{100 * (run['steal_share'] or 0):.1f} %, load average {run['load_avg'] or 0:.1f})", file=sys.stderr)
    if document["run"]["status"] == "failed":
        print(f"specdec: cell {job['cell'] or job['strategy']} FAILED (stored in {out}): {document['run']['error']}",
              file=sys.stderr)
    return 0
