"""The GPU path end to end in one prepared run: scripts/gpu-check.sh's steps (docs/gpu.md says what each proves).

Each step runs its commands as subprocesses under its own timeout and prints one line, PASS, FAIL or SKIP with the
reason; the last line is `N passed, M failed`. `--dry-run` (a CPU machine, CI) runs what it can without a GPU: the
bundle's checksums, the imports, the test selection's collection, the workflow's dry run, the GPU claim with a
stand-in GPU, the JSON summary. Only the standard library is imported here: the check starts before its wheels are
installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STASH = Path(os.environ.get("SPECDEC_BUNDLE_STASH", "/tmp/specdec-gpu-bundle"))  # outlives one run on a warm machine
BUDGET_S = 480  # the steps after the install: 8 minutes of wall time, shared by their own timeouts below
# Each command's timeout in seconds (capped by what is left of BUDGET_S); the dry run's CPU variants get 60
TIMEOUTS = {"engine-tests": 100, "model": 90, "bench": 140, "matrix": 150, "query": 30, "claim": 30,
            "tensor-parallel": 60}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the check installs from the bundle (scripts/gpu-bundle.sh's REQUIREMENTS less the build backend) and imports
REQUIREMENTS = ["duckdb>=1.3", "duckdb-engine>=0.13", "sqlalchemy>=2.0", "snakemake>=9", "jsonschema", "gguf>=0.10",
                "pytest>=8", "pytest-timeout", "scipy"]
IMPORTS = ["torch", "transformers", "accelerate", "safetensors", "yaml", "pandas", "duckdb", "sqlalchemy",
           "duckdb_engine", "snakemake", "jsonschema", "gguf", "pytest", "scipy", "specdec.db"]
# The engine tests that take a device ($SPECDEC_TEST_DEVICE): greedy token identity of every strategy of ours
# (each strategy -> the test that decodes it and compares with plain decoding), then the rest
GREEDY_TESTS = {
    "baseline": "tests/test_engine.py::test_baseline_without_cache_matches_cached",
    "speculative": "tests/test_tree.py::test_greedy_draft_model_strategies_match_baseline",
    "tree": "tests/test_tree.py::test_greedy_draft_model_strategies_match_baseline",
    "speculative-heuristic": "tests/test_tree.py::test_greedy_draft_model_strategies_match_baseline",
    "speculative-confidence": "tests/test_tree.py::test_greedy_draft_model_strategies_match_baseline",
    "ngram": "tests/test_engine.py::test_greedy_speculative_and_ngram_match_baseline",
    "recycling": "tests/test_trainfree.py::test_greedy_train_free_trees_match_baseline",
    "suffix": "tests/test_trainfree.py::test_greedy_train_free_trees_match_baseline",
    "suffix-recycling": "tests/test_trainfree.py::test_greedy_train_free_trees_match_baseline",
    "dynamic-tree": "tests/test_trainfree.py::test_greedy_train_free_trees_match_baseline",
    "rest": "tests/test_trainfree.py::test_greedy_train_free_trees_match_baseline",
    "lookahead": "tests/test_lookahead.py::test_greedy_lookahead_matches_baseline",
}
OTHER_TESTS = [
    "tests/test_engine.py::test_transformers_peers_agree_with_our_greedy_baseline",
    "tests/test_engine.py::test_speculative_sampling_matches_target_sequence_distribution[sample]",
    "tests/test_tree.py::test_tree_forward_matches_sequential_forwards",
    "tests/test_engine.py::test_rollback_leaves_cache_equal_to_a_fresh_forward",
    "tests/test_engine.py::test_every_verify_pass_after_rejections_sees_a_correct_cache",
    "tests/test_tree.py::test_keep_path_leaves_the_cache_of_the_accepted_path",
    "tests/test_gpu_check.py::test_peak_memory_reads_what_the_device_allocated",
    # batched decoding on the GPU: our forward over the stock layers, one pass for every sequence's rows
    "tests/test_llama_forward.py::test_on_stock_linear_layers_a_batched_pass_gives_each_sequence_its_own_logits",
    "tests/test_batched.py::test_every_sequence_gets_its_batch_one_output",
    "tests/test_batched.py::test_draft_models_draft_for_all_live_sequences_in_one_pass",
    "tests/test_batched.py::test_sampled_sequences_match_their_batch_one_samples",
]
BENCH_RUNNERS = "baseline,ngram,suffix,dynamic-tree,speculative,hf-generate,hf-assisted,hf-ngram"
# Every step that decodes: our CPU kernels (csrc/, built with a C++ compiler on first use) are no part of a GPU
# check, so none is chosen or built on the GPU machine; no hub either
GPU_ENV = {"SPECDEC_CPU_LINEAR": "mkl", "SPECDEC_CPU_ATTENTION": "sdpa", "HF_HUB_OFFLINE": "1"}
# tests/tiny.py probes our AVX-512 kernel at import (a build where it can): a lower capability skips it
TINY_ENV = {**GPU_ENV, "ATEN_CPU_CAPABILITY": "avx2"}
EVENT_GAP_LIMIT = 0.05  # CUDA-event time vs synchronised wall time, per generation
# SmolLM2-135M's shape (its GGUF's metadata), for the random-initialised stand-in when the bundle has no GGUF
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


@dataclass
class Check:
    out: Path
    dry_run: bool
    bundle: Path
    python: str
    device: str = "cuda:0"
    started: float = field(default_factory=time.monotonic)
    results: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)   # what the steps found, for the JSON summary

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def remaining(self, cap: float) -> float:
        return max(5.0, min(cap, BUDGET_S - (time.monotonic() - self.started)))


class StepFailed(Exception):
    """A step's reason for FAIL (one line)."""


class Skipped(Exception):
    """A step's reason for SKIP (one line)."""


# --- helpers --------------------------------------------------------------------------------------------------

def sh(check: Check, name: str, cmd: list[str], timeout: float, env: dict | None = None,
       own_stdout: bool = False) -> str:
    """Run cmd from the repository root, its output to logs/NAME.log; StepFailed naming the exit or the timeout.
    Returns the log's text, or with own_stdout the command's stdout alone (kept in logs/NAME.out)."""
    log = check.logs / f"{name}.log"
    out = check.logs / f"{name}.out"
    with open(log, "a") as handle, open(out, "w") if own_stdout else handle as stdout:
        handle.write(f"$ {' '.join(cmd)}\n")
        handle.flush()
        # a session of its own: a timeout ends the command's children too (Snakemake's jobs, torchrun's ranks)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=handle, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise StepFailed(f"timed out after {timeout:.0f} s: {' '.join(cmd[:6])} ... (log: {log})") from None
    text = log.read_text()
    if code != 0:
        last = [line for line in text.splitlines() if line.strip()][-3:]
        raise StepFailed(f"exit {code}: {' | '.join(last)[-300:]} (log: {log})")
    return out.read_text() if own_stdout else text


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL to what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> tuple[dict, dict]:
    """manifest.sha256 -> ({part name: sha256}, {file inside the tar: sha256})."""
    parts, files = {}, {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            (parts if name.startswith("parts/") else files)[name.removeprefix("parts/")] = digest
    return parts, files


def bundle_tree() -> Path:
    return STASH / "tree"


def stash_parts(bundle: Path) -> tuple[dict, list[str]]:
    """Copy the parts this run carries (bundle/parts) into the stash, each checked against the manifest.
    Returns (the manifest's parts, the names still missing from the stash)."""
    manifest = bundle / "manifest.sha256"
    if not manifest.is_file():
        raise Skipped(f"no bundle: {manifest} is missing (make it with scripts/gpu-bundle.sh where the package "
                      "registries are reachable, and carry it: docs/gpu.md)")
    parts, _ = read_manifest(manifest)
    STASH.mkdir(parents=True, exist_ok=True)
    shutil.copy(manifest, STASH / "manifest.sha256")
    for name, digest in parts.items():
        here, kept = bundle / "parts" / name, STASH / name
        if here.is_file() and not (kept.is_file() and kept.stat().st_size == here.stat().st_size):
            if sha256(here) != digest:
                raise StepFailed(f"part {name} does not match its sha256 in the manifest (make the bundle again)")
            shutil.copy(here, kept)
    return parts, [name for name in parts if not (STASH / name).is_file()]


# --- steps ----------------------------------------------------------------------------------------------------

def step_bundle(check: Check) -> str:
    """Join the stashed parts, check every part's and every file's sha256, unpack into the stash."""
    parts, missing = stash_parts(check.bundle)
    if missing:
        raise StepFailed(f"parts {', '.join(missing)} not here yet: carry each in a run of "
                         "`bash scripts/gpu-check.sh --stash` first (docs/gpu.md)")
    for name, digest in parts.items():
        if sha256(STASH / name) != digest:
            raise StepFailed(f"stashed part {name} does not match its sha256 (delete {STASH} and carry it again)")
    tree = bundle_tree()
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    joined = STASH / "bundle.tar"
    with open(joined, "wb") as out:
        for name in sorted(parts):
            with open(STASH / name, "rb") as part:
                shutil.copyfileobj(part, out)
    with tarfile.open(joined) as tar:  # our own tar, its parts checked above
        try:
            tar.extractall(tree, filter="data")
        except TypeError:  # Python before 3.11.4 / 3.12 has no extraction filters
            tar.extractall(tree)
    joined.unlink()
    _, files = read_manifest(check.bundle / "manifest.sha256")
    bad = [name for name, digest in files.items() if not (tree / name).is_file() or sha256(tree / name) != digest]
    if bad:
        raise StepFailed(f"{len(bad)} file(s) of the joined bundle do not match the manifest, e.g. {bad[0]}")
    gguf = tree / "model" / GGUF
    check.facts["gguf"] = str(gguf) if gguf.is_file() else None
    wheels = len(list((tree / "wheels").glob("*.whl")))
    return (f"{len(parts)} part(s) joined, {len(files)} files match their sha256 ({wheels} wheels, "
            f"GGUF: {gguf.is_file()})")


def step_install(check: Check) -> str:
    """Install the wheels offline into this Python, then specdec itself (no dependencies: the image has torch)."""
    wheels = bundle_tree() / "wheels"
    if check.dry_run or not wheels.is_dir():
        why = "dry run: nothing installed" if check.dry_run else f"no wheels at {wheels}: nothing installed"
    else:
        pip = [check.python, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--find-links",
               str(wheels)]
        # an image's system Python may be marked externally managed (PEP 668): this machine is the check's alone
        env = {"PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_ROOT_USER_ACTION": "ignore"}
        sh(check, "install", pip + REQUIREMENTS, 300, env)
        sh(check, "install", pip + ["--no-deps", "-e", "."], 300, env)
        why = f"wheels from {wheels} and specdec installed offline"
    code = ("import importlib.util, sys; missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]; "
            "print('missing:', *missing) if missing else None; sys.exit(1 if missing else 0)")
    try:
        sh(check, "install", [check.python, "-c", code] + IMPORTS, 60)
    except StepFailed as exc:
        raise StepFailed(f"{why}, but not every module the check imports is importable: {exc}") from None
    return f"{why}; {len(IMPORTS)} modules importable"


def step_engine_tests(check: Check) -> str:
    """The engine tests that take a device, on the GPU (dry run: collected only, on the CPU)."""
    ids = list(dict.fromkeys(list(GREEDY_TESTS.values()) + OTHER_TESTS))
    env = {**TINY_ENV, "SPECDEC_TEST_DEVICE": "cpu" if check.dry_run else check.device}
    args = [check.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    if check.dry_run:
        text = sh(check, "engine-tests", args + ["--collect-only"] + ids, check.remaining(60), env)
        tail = [line for line in text.splitlines() if "collected" in line or "tests" in line][-1:]
        raise Skipped(f"needs a GPU; dry run: {len(ids)} test ids collected on the CPU ({' '.join(tail)})")
    text = sh(check, "engine-tests", args + ids, check.remaining(TIMEOUTS["engine-tests"]), env)
    return f"on {check.device}: {[line for line in text.splitlines() if line.strip()][-1]}"


def step_model(check: Check) -> str:
    """The target for the bench and the matrix: the bundle's GGUF under the alias smollm2-135m, else a random model
    of SmolLM2-135M's shape (real speeds, meaningless acceptance), saved with a character tokenizer."""
    models = check.out / "models.yaml"
    gguf = check.facts.get("gguf") or (str(bundle_tree() / "model" / GGUF)
                                       if (bundle_tree() / "model" / GGUF).is_file() else None)
    if gguf:
        models.write_text(json.dumps({"smollm2-135m": {"path": gguf, "dtype": "float32", "chat": True}}) + "\n")
        check.facts.update(models=str(models), model="smollm2-135m: the embedded GGUF from the bundle")
        return f"smollm2-135m = {gguf}"
    if check.dry_run:
        raise Skipped("no GGUF in the bundle; a GPU run would build a random-initialised SmolLM2-135M-shaped model")
    folder = check.out / "smollm2-135m-random"
    code = (f"import sys, json; sys.path.insert(0, 'tests'); from tiny import char_tokenizer; "
            f"from transformers import LlamaConfig, LlamaForCausalLM; import torch; torch.manual_seed(0); "
            f"m = LlamaForCausalLM(LlamaConfig(**json.loads(sys.argv[1]))); m.save_pretrained(sys.argv[2]); "
            f"char_tokenizer().save_pretrained(sys.argv[2])")
    sh(check, "model", [check.python, "-c", code, json.dumps(SMOLLM2_135M), str(folder)],
       check.remaining(TIMEOUTS["model"]), TINY_ENV)
    models.write_text(json.dumps({"smollm2-135m": {"path": str(folder), "dtype": "float32", "chat": False}}) + "\n")
    check.facts.update(models=str(models), model="RANDOM-INITIALISED model of SmolLM2-135M's shape (no GGUF in "
                                                 "the bundle): speeds are real, acceptance and outputs are not")
    return check.facts["model"]


def step_bench(check: Check) -> str:
    """`specdec bench` on the GPU: 8 runners, 8 suite prompts (one per category) x 2 repeats, memory probes."""
    if check.dry_run:
        raise Skipped("needs a GPU (the bench on the CPU is tests/test_bench.py)")
    if "models" not in check.facts:
        raise StepFailed("no target model (the model step failed)")
    cmd = [check.python, "-m", "specdec.cli", "bench", "--models", check.facts["models"], "--device", check.device,
           "--runners", BENCH_RUNNERS, "--k", "4", "--per-category", "1", "--repeats", "2", "--warmup", "1"]
    text = sh(check, "bench", cmd, check.remaining(TIMEOUTS["bench"]), GPU_ENV, own_stdout=True)
    lines = text.rstrip().splitlines()
    result = json.loads(lines[-1])
    (check.out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("specdec bench:"))
    (check.out / "bench.txt").write_text("\n".join(lines[start:-1]) + "\n")
    check.facts["bench"] = {key: result[key] for key in ("tokens_per_s", "speedup", "ratios", "identical_to_baseline",
                                                         "tokens_per_target_pass", "cuda_event_gap", "seconds")}
    check.facts["bench"]["peak_memory_mib"] = {n: m.get("peak_bytes", 0) / 2**20 for n, m in result["memory"].items()}
    runners = BENCH_RUNNERS.split(",")
    missing = [r for r in runners if not (result["tokens_per_s"].get(r) or 0) > 0]
    gaps = result["cuda_event_gap"]
    far = {n: g for n, g in gaps.items() if g is None or g > EVENT_GAP_LIMIT}
    failed_memory = [n for n, m in result["memory"].items() if "error" in m]
    if missing or far or failed_memory:
        raise StepFailed(f"runners without tok/s: {missing}; CUDA events vs wall time beyond "
                         f"{EVENT_GAP_LIMIT:.0%} (or unmeasured): {far}; memory probes failed: {failed_memory}")
    return (f"{len(runners)} runners, tok/s {min(result['tokens_per_s'].values()):.0f}-"
            f"{max(result['tokens_per_s'].values()):.0f}; CUDA events agree with the synchronised wall time within "
            f"{max(gaps.values()):.2%} (limit {EVENT_GAP_LIMIT:.0%}); table in {check.out / 'bench.txt'}")


def step_matrix(check: Check) -> str:
    """The default matrix with gpus: [1] and batch_sizes [1, 4] through Snakemake into a DuckDB store, then one
    `specdec query`. transformers' assisted generation refuses batch 4 (stored as a failure with its own words)."""
    folder = check.out / "matrix"
    folder.mkdir(parents=True, exist_ok=True)
    import yaml  # in the GPU image (pyyaml) as in specdec's own dependencies

    # the default matrix's strategies on the GPU; llama.cpp's run on the CPU only (gpus [1] would refuse them)
    default = yaml.safe_load(Path("config.yaml").read_text())
    strategies = [s for s in default["strategies"] if not s.startswith("llamacpp-")]
    config = {"gpus": [1], "batch_sizes": [1, 4], "strategies": strategies, "db": str(folder / "specdec.duckdb"),
              "results": str(folder / "results"), "tag": "gpu-check"}
    if check.facts.get("models"):
        config["models"] = json.loads(Path(check.facts["models"]).read_text())
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    # one cell on the GPU at a time, as the claim would make them wait anyway
    snake = [check.python, "-m", "snakemake", "--snakefile", "Snakefile", "--configfile", str(folder / "config.json"),
             "--cores", "4", "--resources", "gpu=1"]
    if check.dry_run:
        text = sh(check, "matrix", snake + ["-n", "--quiet", "rules"], check.remaining(60))
        counts = dict(re.findall(r"^(run_cell|total)\s+(\d+)$", text, re.M))
        raise Skipped(f"needs a GPU; dry run: Snakemake planned the matrix with gpus [1]: {counts.get('run_cell')} "
                      f"cells, {counts.get('total')} jobs")
    sh(check, "matrix", snake, check.remaining(TIMEOUTS["matrix"]), GPU_ENV)
    sql = "SELECT strategy, k, batch_size, status, devices, gpu_names, error FROM runs ORDER BY strategy, k, batch_size"
    text = sh(check, "query", [check.python, "-m", "specdec.cli", "query", "--db", config["db"], "--format", "json",
                               sql], check.remaining(TIMEOUTS["query"]), own_stdout=True)
    rows = json.loads(text)
    check.facts["matrix"] = rows
    refused = [r for r in rows if r["strategy"].startswith("hf-") and r["strategy"] != "hf-generate"
               and r["batch_size"] > 1 and "batch_size = 1" in str(r["error"])]
    bad = [r for r in rows if (r["status"] != "ok" or "cuda" not in str(r["devices"])) and r not in refused]
    if not rows or bad:
        raise StepFailed(f"{len(bad)} of {len(rows)} stored runs not ok on cuda, e.g. {bad[:1]}")
    return f"{len(rows)} runs stored, all ok on {rows[0]['devices']} ({rows[0]['gpu_names']}); store {config['db']}"


TP_CODE = """
import json, os, sys
sys.path.insert(0, "tests")
from tiny import save_tiny_pair
from specdec.run import job as jobs, parallel
out = sys.argv[1]
models = save_tiny_pair(os.path.join(out, "tiny-models"))
prompts = os.path.join(out, "tp-prompts.jsonl")
open(prompts, "w").write(json.dumps({"id": "a", "category": "qa", "prompt": "two plus two is"}) + "\\n")
job = jobs.read_job({"target": "tiny-target", "draft": "tiny-draft", "strategy": "speculative", "k": 3, "gpus": 1,
                     "gpu_mode": "tensor", "prompts_file": prompts, "models": models, "max_new_tokens": 12,
                     "repeats": 1, "warmup": 1, "stop_at_eos": False})
doc = parallel.run_under_torchrun(job, 1, [0])
run = doc["run"]
print(json.dumps({"status": run["status"], "error": run["error"], "devices": run.get("devices"),
                  "tokens": [m.get("token_hash") for m in doc["measurements"]]}))
"""

CLAIM_CODE = """
import json, subprocess, sys
from specdec.run import devices
inventory = None if sys.argv[1] == "real" else [devices.DeviceInfo(0, "stand-in-0", "StandInGPU", 1 << 30)]
first = devices.claim_gpus(1, inventory)
locks = sorted(p.name for p in devices.lock_dir().glob("gpu-*.lock"))
other = ("import sys; from specdec.run import devices; inv = None if sys.argv[1] == 'real' else "
         "[devices.DeviceInfo(0, 'stand-in-0', 'StandInGPU', 1 << 30)]; "
         "devices.claim_gpus(1, inv, timeout_s=1, poll_s=0.2)")
blocked = subprocess.run([sys.executable, "-c", other, sys.argv[1]], capture_output=True, text=True)
first.release()
again = devices.claim_gpus(1, inventory, timeout_s=5)
again.release()
print(json.dumps({"claimed": first.devices, "locks": locks, "second_claim_blocked": blocked.returncode != 0
                  and "could not claim" in blocked.stderr, "claimed_after_release": again.devices}))
"""


def step_parallel(check: Check) -> str:
    """One tensor-parallel cell at world size 1 over NCCL (torchrun, rank 0's draft), and the GPU claim/release."""
    env = {**TINY_ENV, "SPECDEC_GPU_LOCK_DIR": str(check.out / "locks")}
    text = sh(check, "parallel", [check.python, "-c", CLAIM_CODE, "stand-in" if check.dry_run else "real"],
              check.remaining(TIMEOUTS["claim"]), env)
    claim = json.loads(text.strip().splitlines()[-1])
    check.facts["claim"] = claim
    if not (claim["locks"] and claim["second_claim_blocked"] and claim["claimed_after_release"]):
        raise StepFailed(f"GPU claim with lock files misbehaved: {claim}")
    said = f"claim/release with lock files: {claim['claimed']} held, a second claim blocked, free again after release"
    if check.dry_run:
        raise Skipped(f"tensor parallel needs NCCL and a GPU (gloo on the CPU: tests/test_parallel.py); dry run: "
                      f"{said} (a stand-in GPU)")
    text = sh(check, "parallel", [check.python, "-c", TP_CODE, str(check.out)],
              check.remaining(TIMEOUTS["tensor-parallel"]), env)
    tp = json.loads(text.strip().splitlines()[-1])
    check.facts["tensor_parallel"] = tp
    if tp["status"] != "ok" or not str(tp["devices"]).count("cuda"):
        raise StepFailed(f"tensor-parallel cell at world size 1: {tp['status']} on {tp['devices']}: {tp['error']}")
    return f"tensor-parallel cell (torchrun, 1 rank, NCCL) ok on {tp['devices']}; {said}"


STEPS = [("bundle", step_bundle), ("install", step_install), ("engine-tests", step_engine_tests),
         ("model", step_model), ("bench", step_bench), ("matrix", step_matrix), ("parallel", step_parallel)]


def gpu_facts(check: Check) -> dict:
    code = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}))")
    try:
        return json.loads(sh(check, "summary", [check.python, "-c", code], 60).strip().splitlines()[-1])
    except (StepFailed, ValueError) as exc:
        return {"error": str(exc)}


def run(check: Check) -> int:
    check.logs.mkdir(parents=True, exist_ok=True)
    for name, step in STEPS:
        started = time.monotonic()
        if name == "engine-tests":
            check.started = started  # the 8 minutes (BUDGET_S) are the steps after the install
        try:
            status, reason = "PASS", step(check)
        except Skipped as exc:
            status, reason = "SKIP", str(exc)
        except StepFailed as exc:
            status, reason = "FAIL", str(exc)
        except Exception as exc:  # a bug of the check itself still ends in a FAIL line, not a traceback
            status, reason = "FAIL", f"{type(exc).__name__}: {exc}"
        seconds = round(time.monotonic() - started, 1)
        check.results.append({"step": name, "status": status, "reason": reason, "seconds": seconds})
        print(f"{status} {name} ({seconds:.0f} s): {reason}", flush=True)
    passed = sum(r["status"] == "PASS" for r in check.results)
    failed = sum(r["status"] == "FAIL" for r in check.results)
    summary = {"dry_run": check.dry_run, "device": check.device, "machine": gpu_facts(check),
               "wall_s": round(time.monotonic() - check.started, 1), "steps": check.results, **check.facts,
               "passed": passed, "failed": failed}
    (check.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    skipped = [r["step"] for r in check.results if r["status"] == "SKIP"]
    print(f"summary: {check.out / 'summary.json'}; skipped: {', '.join(skipped) or 'none'}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", help="output folder (summary.json, bench.txt, logs/); required unless --stash")
    p.add_argument("--dry-run", action="store_true", help="a CPU machine: run what needs no GPU, skip the rest")
    p.add_argument("--stash", action="store_true",
                   help=f"only keep the parts this run carries in {STASH} (runs before the check, docs/gpu.md)")
    p.add_argument("--bundle", default="gpu-bundle",
                   help="the folder scripts/gpu-bundle.sh wrote (default: %(default)s)")
    p.add_argument("--device", default="cuda:0", help="the GPU to test (default: %(default)s)")
    args = p.parse_args(argv)
    bundle = Path(args.bundle) if Path(args.bundle).is_absolute() else ROOT / args.bundle
    if args.stash:
        try:
            parts, missing = stash_parts(bundle)
        except (Skipped, StepFailed) as exc:
            print(f"gpu-check --stash: {exc}", file=sys.stderr)
            return 2
        print(f"stash {STASH}: {len(parts) - len(missing)} of {len(parts)} parts"
              + (f"; still to carry: {', '.join(missing)}" if missing else "; complete"))
        return 0
    if not args.out:
        p.error("give the output folder, e.g. scripts/gpu-check.sh gpu-check-out")
    if not args.device.startswith("cuda"):
        p.error(f"--device must be cuda or cuda:N, got {args.device!r} (use --dry-run on a machine without a GPU)")
    if not args.dry_run:
        probe = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(not torch.cuda.is_available())"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            p.error(f"{sys.executable} sees no CUDA GPU (torch.cuda.is_available() is not True: "
                    f"{(probe.stderr.strip().splitlines() or ['False'])[-1]}); use --dry-run on a machine without one")
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        p.error(f"output folder {out} is not empty; give a new one")
    out.mkdir(parents=True, exist_ok=True)
    return run(Check(out=out, dry_run=args.dry_run, bundle=bundle, python=sys.executable, device=args.device))


if __name__ == "__main__":
    sys.exit(main())
