"""Noise readings and the rules that flag a run `noisy`: parsing, summaries and thresholds, all from injected
readings (no real clock, no dependence on the load of the machine running the tests)."""

from __future__ import annotations

import json

import pytest

from duck import fetch
from specdec.measure import noise
from specdec.db.store import ResultFileError, ingest
from specdec.measure.noise import Reading

PROC_STAT = """cpu  1000 50 300 5000 20 0 30 100 0 0
cpu0 500 25 150 2500 10 0 15 50 0 0
intr 12345
"""


def test_proc_stat_busy_steal_and_total():
    busy, steal, total = noise.parse_proc_stat(PROC_STAT, ticks_per_s=100)
    assert busy == pytest.approx((1000 + 50 + 300 + 0 + 30) / 100)  # user nice system irq softirq
    assert steal == pytest.approx(1.0)
    assert total == pytest.approx((1000 + 50 + 300 + 5000 + 20 + 0 + 30 + 100) / 100)
    with pytest.raises(ValueError, match="no aggregate 'cpu' line"):
        noise.parse_proc_stat("cpu0 1 2 3 4\n")
    assert noise.parse_loadavg("1.52 0.90 0.40 3/120 999\n") == 1.52


def test_compute_apps_count_only_others_on_our_gpus():
    text = ("GPU-aaaa, 100\n"      # ours (the job's own pid)
            "GPU-aaaa, 200\n"      # someone else on a claimed GPU
            "GPU-bbbb, 200\n"      # the same process on our second GPU: counted once
            "GPU-cccc, 300\n"      # another GPU, not claimed
            "No running processes found\n")
    assert noise.parse_compute_apps(text, ["GPU-AAAA", "gpu-bbbb"], own_pids={100}) == 1
    assert noise.parse_compute_apps(text, ["GPU-cccc"], own_pids={100}) == 1
    assert noise.parse_compute_apps("", ["GPU-aaaa"], own_pids=set()) == 0


def linear_readings(n: int, other_cores: float, steal_share: float = 0.0, cores: int = 2, load: float = 2.0):
    """n readings 10 s apart on a machine of `cores` cores that is fully busy: `other_cores` by other processes,
    the rest by us, plus `steal_share` of all CPU time stolen."""
    out = []
    for i in range(n):
        t = 10.0 * i
        total = cores * t
        steal = steal_share * total
        busy = total - steal
        out.append(Reading(t=t, busy_s=busy, steal_s=steal, total_s=total, own_s=busy - other_cores * t,
                           load1=load + i, gpu_other=None))
    return out


def test_summary_from_readings():
    figures = noise.summarise(linear_readings(4, other_cores=1.4, steal_share=0.1))
    assert figures["other_cpu_cores"] == pytest.approx(1.4)
    assert figures["steal_share"] == pytest.approx(0.1)
    assert figures["load_avg"] == pytest.approx(3.5)  # mean of 2, 3, 4, 5
    assert figures["gpu_other_processes"] is None and figures["noise_samples"] == 4
    # a quiet machine whose counters tick slightly apart never shows negative use by others
    quiet = [Reading(0, 0, 0, 0, 0), Reading(10, 19.9, 0, 20, 20.0)]
    assert noise.summarise(quiet)["other_cpu_cores"] == 0.0
    # one reading makes no window
    assert noise.summarise(linear_readings(1, 1.0))["other_cpu_cores"] is None


def test_sampler_reads_at_start_and_stop_and_survives_a_failing_read():
    readings = iter(linear_readings(3, other_cores=0.5))
    sampler = noise.Sampler(lambda: next(readings), interval=3600).start()  # the thread never fires in time
    taken = sampler.stop()
    assert [r.t for r in taken] == [0.0, 10.0]  # one at start, one at stop
    assert noise.summarise(taken)["other_cpu_cores"] == pytest.approx(0.5)

    def broken():
        raise OSError("no /proc here")

    assert noise.Sampler(broken).start().stop() == []
    assert noise.summarise([])["other_cpu_cores"] is None


def test_machine_reading_uses_injected_clock_and_gpu_query():
    reading = noise.read_machine(["GPU-x"], clock=lambda: 42.0, query_gpus=lambda: "GPU-x, 1\nGPU-x, 2\n")
    assert reading.t == 42.0 and reading.gpu_other == 2 and reading.own_s > 0 and reading.total_s > 0


def test_baseline_spread_over_repeats():
    rows = [{"prompt_id": p, "status": "ok", "tokens_per_s": v}
            for p, vals in {"a": (10, 12, 11), "b": (20, 20, 20), "c": (5, 6, 10)}.items() for v in vals]
    # per prompt (max - min) / median: a 2/11, b 0, c 5/6 -> median 2/11
    assert noise.repeat_spread(rows) == pytest.approx(2 / 11)
    assert noise.repeat_spread([{"prompt_id": "a", "status": "ok", "tokens_per_s": 10.0}]) is None
    failed = rows + [{"prompt_id": "a", "status": "failed", "tokens_per_s": None}]
    assert noise.repeat_spread(failed) == pytest.approx(2 / 11)


def test_thresholds_merge_and_refuse_bad_values():
    assert noise.check_thresholds({"other_cpu_cores": 1})["other_cpu_cores"] == 1.0
    assert noise.check_thresholds(None) == noise.THRESHOLDS
    with pytest.raises(ValueError, match=r"unknown threshold\(s\) \['cpu'\]"):
        noise.check_thresholds({"cpu": 1})
    with pytest.raises(ValueError, match="noise.steal_share: must be a number >= 0"):
        noise.check_thresholds({"steal_share": -1})


def test_schema_documents_the_same_defaults():
    from pathlib import Path

    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    documented = {k: v["default"] for k, v in schema["properties"]["noise"]["properties"].items()}
    assert documented == noise.THRESHOLDS


# --- the rules, as the store applies them ------------------------------------------------------------------------

def noise_result(run_id: str, **readings) -> dict:
    """A minimal format-2 baseline cell carrying noise readings (baselines need no paired run)."""
    rows = [{"prompt_id": "p", "repeat": r, "status": "ok", "tokens_per_s": 10.0, "token_hash": "h"}
            for r in range(2)]
    run = {"run_id": run_id, "started_utc": "2026-12-01T10:00:00Z", "status": "ok", "host": "h", "cpu_count": 2,
           "cpu_name": "CPU", "gpu_names": [], "params": {"target": "t", "strategy": "baseline", "gpus": 0,
                                                         "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                                         "max_new_tokens": 8, "cell": run_id}, **readings}
    return {"format": "specdec-result/2", "run": run, "measurements": rows}


def judged(tmp_path, docs, limits=None):
    paths = []
    for doc in docs:
        path = tmp_path / f"{doc['run']['run_id']}.json"
        path.write_text(json.dumps(doc))
        paths.append(path)
    db = tmp_path / "s.duckdb"
    ingest(db, paths, noise_limits=limits)
    return {run_id: (noisy, reason) for run_id, noisy, reason in fetch(db, "SELECT run_id, noisy, noise_reason "
                                                                         "FROM run_noise")}, db



def test_noise_rules_flag_each_reading_above_its_threshold(tmp_path):
    quiet = dict(other_cpu_cores=0.1, steal_share=0.01, baseline_spread=0.05, load_avg=2.0)
    verdicts, db = judged(tmp_path, [
        noise_result("a-quiet", **quiet),
        noise_result("b-busy", **{**quiet, "other_cpu_cores": 1.44}),
        noise_result("c-steal", **{**quiet, "steal_share": 0.2}),
        noise_result("d-gpu", **{**quiet, "gpu_other_processes": 1}),
        noise_result("e-spread", **{**quiet, "baseline_spread": 0.434, "other_cpu_cores": 0.9}),
        noise_result("f-unmeasured"),
    ])
    assert verdicts["a-quiet"] == (False, None)
    assert verdicts["b-busy"] == (True, "other processes used 1.4 of 2 cores")
    assert verdicts["c-steal"] == (True, "CPU steal 20 %")
    assert verdicts["d-gpu"] == (True, "1 other process(es) on the claimed GPUs")
    assert verdicts["e-spread"] == (True, "other processes used 0.9 of 2 cores; baseline tok/s spread 43 %")
    assert verdicts["f-unmeasured"][0] is None  # no readings: unknown, not quiet
    [(noisy, reason)] = fetch(db, "SELECT noisy, noise_reason FROM cell_summary")  # all six runs are one cell
    assert noisy and reason.startswith("1 other process(es) on the claimed GPUs; CPU steal 20 %; ")


def test_changed_thresholds_rejudge_stored_runs(tmp_path):
    doc = noise_result("busy", other_cpu_cores=0.4)
    verdicts, db = judged(tmp_path, [doc])
    assert verdicts["busy"][0]  # default threshold 0.25
    ingest(db, [tmp_path / "busy.json"], noise_limits={"other_cpu_cores": 0.5})  # the run is not stored twice
    assert fetch(db, "SELECT noisy FROM run_noise") == [(False,)]
    assert fetch(db, "SELECT count(*) FROM runs") == [(1,)]
    with pytest.raises(ResultFileError, match="noise: unknown threshold"):
        ingest(db, [], noise_limits={"loud": 1})
