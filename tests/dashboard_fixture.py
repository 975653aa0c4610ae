"""Synthetic result files (docs/results.md, format specdec-result/1) for the dashboard tests and benchmark.

The numbers are chosen so the expected figures are known by construction: every baseline decodes at 20 tok/s
(median over its repeats), and every other cell runs at `speed` × 20 tok/s times a per-prompt factor whose
median is 1, so the median speedup of a cell is exactly its `speed`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

from specdec.measure.metrics import DegenerateRule, degeneracy

PROMPTS = [("sum-01", "summarisation"), ("sum-02", "summarisation"), ("code-01", "code"), ("code-02", "code")]
# per-prompt multipliers on tokens/s; over 2 repeats: .7 .7 .95 .95 1.05 1.05 1.5 1.5 -> median 1.0, but mean 1.05,
# so a page that averaged instead of taking the median would show different figures
PROMPT_FACTOR = {"sum-01": 0.7, "sum-02": 1.5, "code-01": 0.95, "code-02": 1.05}
# acceptance per category; the median over the four prompts is the mean of the two
CATEGORY_ALPHA_SHIFT = {"summarisation": 0.05, "code": -0.05}
BASELINE_TPS = 20.0
C_RATIO = 0.1

TARGET, DRAFT = "smollm2-135m", "smollm2-draft"
BEST = {"speedup": 2.0, "target": TARGET, "draft": DRAFT, "strategy": "speculative", "k": 4, "acceptance": 0.7}
# this prompt's outputs copy the prompt and loop (specdec.measure.metrics.degeneracy flags them): without it a cell's
# median speedup is `speed` x 0.95 (factors .7 .95 1.05) and its median acceptance that of category code
DEGENERATE_PROMPT = "sum-02"
MISMATCH = {"prompt_id": "code-02", "repeat": 1, "strategy": "speculative", "k": 8}


def token_hash(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def leviathan(alpha: float, k: int, c: float) -> float:
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1))


def _tokens(prompt_id: str, temperature: float, n: int = 16) -> list[int]:
    seed = int(hashlib.md5(f"{prompt_id}:{temperature}".encode()).hexdigest(), 16)
    return [(seed >> (i * 4)) % 97 + 3 for i in range(n)]


def _prompt_tokens(prompt_id: str) -> list[int]:
    return _tokens(prompt_id + ":prompt", 0.0, 40)


def make_result(*, host: str, target: str, draft: str | None, strategy: str, k: int | None, gpus: int = 1,
                temperature: float = 0.0, speed: float = 1.0, alpha: float | None = None,
                prompts=PROMPTS, repeats: int = 2, started: str = "2026-11-23T07:30:00Z",
                failed: str | None = None, mismatch: tuple[str, int] | None = None,
                baseline_tps: float = BASELINE_TPS, commit: str = "abc1234", noise: dict | None = None) -> dict:
    """One job's result file as a dict. `mismatch` = (prompt_id, repeat) whose tokens differ from the baseline.
    `noise`: noise readings of the run (e.g. {"other_cpu_cores": 1.4}), which make it a format-2 file."""
    run_id = uuid.uuid4().hex
    spec = strategy not in ("baseline", "hf-generate")
    per_position = strategy in ("speculative", "ngram")
    measurements = []
    for prompt_id, category in prompts:
        for r in range(repeats):
            m = {"prompt_id": prompt_id, "category": category, "repeat": r, "status": "ok", "error": None}
            if failed:
                m.update(status="failed", error=failed)
                measurements.append(m)
                continue
            # baselines: 19 and 21 tok/s over the two repeats (median 20); others: speed x factor x 20
            if strategy == "baseline":
                tps = baseline_tps + (-1.0 if r % 2 == 0 else 1.0)
            else:
                tps = baseline_tps * speed * PROMPT_FACTOR.get(prompt_id, 1.0)
            ids = _tokens(prompt_id, temperature)
            if prompt_id == DEGENERATE_PROMPT:  # the prompt's first 8 tokens, twice
                ids = _prompt_tokens(prompt_id)[:8] * 2
            if mismatch == (prompt_id, r):
                ids = ids[:8] + [999] * 8
            new = len(ids)
            wall = new / tps
            m.update(prompt_tokens=40, new_tokens=new, stop_reason="max_new_tokens", wall_s=wall,
                     tokens_per_s=tps, ttft_s=0.05 * (1 + gpus), tpot_s=(wall - 0.05) / (new - 1),
                     target_forward_passes=new, draft_forward_passes=None, draft_s=None, verify_s=None,
                     proposed_tokens=None, accepted_tokens=None, acceptance_rate=None, mean_accepted_tokens=1.0,
                     proposed_per_position=None, accepted_per_position=None, cost_ratio_c=None,
                     leviathan_speedup=None, peak_memory_bytes=(500 + 100 * (draft is not None)) * 2**20,
                     memory_kind="process_rss_peak", token_ids=ids, token_hash=token_hash(ids),
                     text=f"output of {prompt_id}" + (" (diverged)" if mismatch == (prompt_id, r) else ""),
                     **degeneracy(ids, [_prompt_tokens(prompt_id)]))
            if spec and alpha is not None:
                a = alpha + CATEGORY_ALPHA_SHIFT.get(category, 0.0)
                steps = 10
                proposed = [steps] * k
                accepted = [round(steps * a ** (i + 1)) for i in range(k)]
                m.update(proposed_tokens=steps * k, accepted_tokens=round(a * steps * k), acceptance_rate=a,
                         mean_accepted_tokens=1 + a * k * 0.8, draft_forward_passes=steps * k,
                         draft_s=0.01 * steps * k, verify_s=0.1 * steps, cost_ratio_c=C_RATIO,
                         leviathan_speedup=leviathan(a, k, C_RATIO))
                if per_position:
                    m.update(proposed_per_position=proposed, accepted_per_position=accepted)
            measurements.append(m)
    params = {"cell": f"{host}-{target}-{draft or 'none'}-{strategy}-k{k}-g{gpus}-t{temperature}",
              "target": target, "draft": draft, "strategy": strategy, "k": k, "gpus": gpus,
              "temperature": temperature, "top_p": 1.0, "top_k": 0, "draft_sampling": "greedy", "use_cache": True,
              "max_new_tokens": 16, "repeats": repeats, "warmup": 1, "prompts_file": "prompts/suite.jsonl",
              "target_source": "synthetic", "draft_source": "synthetic" if draft else None, "dtype": "float32",
              "degenerate": DegenerateRule().to_dict()}
    run = {"run_id": run_id, "workflow_run_id": "wf-test", "started_utc": started, "finished_utc": started,
           "status": "failed" if failed else "ok", "error": failed, "git_commit": commit, "git_dirty": False,
           "host": host, "cpu_name": "Synthetic CPU", "cpu_count": 2,
           "gpu_names": ["Synthetic GPU"] * gpus, "gpu_count": gpus, "cuda_version": None,
           "driver_version": None, "torch_version": "2.13.0+cpu", "transformers_version": "5.23.0",
           "specdec_version": "0.1.0", "python_version": "3.11.7", "seed": 0, "config_hash": "0" * 64,
           "devices": ["cpu"], "params": params, **(noise or {})}
    return {"format": "specdec-result/2" if noise else "specdec-result/1", "run": run, "measurements": measurements}


def fixture_results() -> list[dict]:
    """The small, hand-checkable matrix the dashboard tests run against."""
    a = "lab-a"
    out = [
        make_result(host=a, target=TARGET, draft=None, strategy="baseline", k=None),
        make_result(host=a, target=TARGET, draft=DRAFT, strategy="speculative", k=2, speed=1.5, alpha=0.8),
        make_result(host=a, target=TARGET, draft=DRAFT, strategy="speculative", k=4, speed=2.0, alpha=0.7),
        make_result(host=a, target=TARGET, draft=DRAFT, strategy="speculative", k=8, speed=1.6, alpha=0.6,
                    mismatch=(MISMATCH["prompt_id"], MISMATCH["repeat"])),
        make_result(host=a, target=TARGET, draft=None, strategy="ngram", k=2, speed=1.2, alpha=0.4),
        make_result(host=a, target=TARGET, draft=None, strategy="ngram", k=4, speed=1.3, alpha=0.3),
        make_result(host=a, target=TARGET, draft=DRAFT, strategy="hf-assisted", k=4, speed=1.8, alpha=0.65),
        # sampling: its own baseline, no losslessness verdict
        make_result(host=a, target=TARGET, draft=None, strategy="baseline", k=None, temperature=0.7),
        make_result(host=a, target=TARGET, draft=DRAFT, strategy="speculative", k=4, temperature=0.7,
                    speed=1.7, alpha=0.6),
        # scaling: two GPUs
        make_result(host=a, target=TARGET, draft=None, strategy="baseline", k=None, gpus=2, baseline_tps=30.0),
        make_result(host=a, target=TARGET, draft=DRAFT, strategy="speculative", k=4, gpus=2, speed=1.9,
                    alpha=0.7, baseline_tps=30.0),
        # a second machine
        make_result(host="lab-b", target=TARGET, draft=None, strategy="baseline", k=None,
                    started="2026-11-24T08:00:00Z", commit="def5678"),
        make_result(host="lab-b", target=TARGET, draft=DRAFT, strategy="speculative", k=4, speed=1.25, alpha=0.7,
                    started="2026-11-24T08:00:00Z", commit="def5678"),
        # a job that failed before decoding
        make_result(host=a, target="llama-8b", draft="llama-1b", strategy="speculative", k=4,
                    failed="CUDA out of memory"),
    ]
    return out


def write_results(results: list[dict], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for res in results:
        p = directory / f"{res['run']['params']['cell']}-{res['run']['run_id'][:8]}.json"
        p.write_text(json.dumps(res))
        paths.append(p)
    return paths


def build_fixture_db(tmp: Path) -> Path:
    """Write the synthetic result files and ingest them with the real store code."""
    from specdec.db.store import ingest

    paths = write_results(fixture_results(), tmp / "results")
    db = tmp / "fixture.duckdb"
    report = ingest(str(db), [str(p) for p in paths])
    assert not report.refused, report.refused  # the fixture's files must be plausible results
    return db


# Names no result file can bring in any more (ingest refuses control characters), but a store written by an older
# specdec or by hand may hold: a terminal escape, a newline, HTML and Markdown that would run or load something.
HOSTILE = "evil\x1b[2J<img src=x onerror=alert(1)>\n![x](http://example.invalid/x.png)|\u202e"


def build_hostile_db(tmp: Path) -> Path:
    """The fixture store with hostile names written straight into it (bypassing ingest): a host, a strategy, a
    category and a CPU name."""
    import duckdb

    db = build_fixture_db(tmp)
    con = duckdb.connect(str(db))
    try:
        con.execute("UPDATE runs SET host = ? || host, cpu_name = ? WHERE host = 'lab-a'", [HOSTILE, HOSTILE])
        con.execute("UPDATE runs SET strategy = ? WHERE strategy = 'ngram'", [HOSTILE])
        con.execute("UPDATE measurements SET category = ? WHERE category = 'code'", [HOSTILE])
    finally:
        con.close()
    return db
