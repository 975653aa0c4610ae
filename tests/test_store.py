"""The results store: validation, all-or-nothing ingest, the speedup/cell_summary/failures views, and read-only queries.

Everything runs on small synthetic result files built here, with numbers chosen so the expected speedups and
medians can be worked out by hand (see `SPEC_TPS` / `BASE_TPS`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from specdec.db import ingest as ingest_cli
from specdec.db.query import (MAX_CELL_CHARS, QueryError, UnsafeSQLError, _execute_read_only, check_sql, format_table,
                              main_query, run_query)
from specdec.db.store import (IngestReport, ResultFileError, default_db_path, engine_for, ingest, init_db,
                              load_result_file)

PROMPTS = ("p1", "p2", "p3")
# tokens/s per prompt, per repeat (repeat 0, repeat 1).
BASE_TPS = {"p1": (10.0, 12.0), "p2": (20.0, 20.0), "p3": (8.0, 10.0)}  # medians 11, 20, 9
SPEC_TPS = {"p1": (22.0, 22.0), "p2": (30.0, 34.0), "p3": (18.0, 18.0)}
# Hand-computed: spec tokens/s ÷ baseline median, per (prompt, repeat).
EXPECTED_SPEEDUP = {("p1", 0): 2.0, ("p1", 1): 2.0, ("p2", 0): 1.5, ("p2", 1): 1.7, ("p3", 0): 2.0, ("p3", 1): 2.0}
BASE_HASH = {"p1": "h-p1", "p2": "h-p2", "p3": "h-p3"}
SPEC_HASH = {"p1": "h-p1", "p2": "h-p2", "p3": "h-p3-different"}  # greedy outputs match on p1, p2 only
ACCEPTANCE = {"p1": 0.8, "p2": 0.6, "p3": 0.4}
MEAN_ACCEPTED = {"p1": 3.0, "p2": 2.5, "p3": 2.0}
COST_C = {"p1": 0.1, "p2": 0.2, "p3": 0.3}


def make_result(run_id: str, strategy: str, tps: dict | None, hashes: dict | None = None, *, draft=None, k=None,
                started="2026-11-23T07:30:00Z", status="ok", error=None, host="h1", target="tiny") -> dict:
    """A valid specdec-result/1 document: 3 prompts × 2 repeats, greedy. `tps=None` makes a failed job."""
    speculative = strategy != "baseline"
    measurements = []
    for prompt in PROMPTS:
        for repeat in range(2):
            row = {"prompt_id": prompt, "category": "qa", "repeat": repeat, "status": "failed", "error": error,
                   "prompt_tokens": None, "new_tokens": None, "stop_reason": None, "wall_s": None,
                   "tokens_per_s": None, "ttft_s": None, "tpot_s": None, "target_forward_passes": None,
                   "draft_forward_passes": None, "draft_s": None, "verify_s": None, "proposed_tokens": None,
                   "accepted_tokens": None, "acceptance_rate": None, "mean_accepted_tokens": None,
                   "proposed_per_position": None, "accepted_per_position": None, "cost_ratio_c": None,
                   "leviathan_speedup": None, "peak_memory_bytes": None, "memory_kind": None, "token_ids": None,
                   "token_hash": None, "text": None}
            if tps is not None:
                rate = tps[prompt][repeat]
                row.update(status="ok", error=None, prompt_tokens=12, new_tokens=32, stop_reason="max_new_tokens",
                           wall_s=32 / rate, tokens_per_s=rate, ttft_s=0.05, tpot_s=1 / rate,
                           target_forward_passes=32, peak_memory_bytes=5_000_000_000, memory_kind="process_rss_peak",
                           token_ids=[5, 6, 7], token_hash=hashes[prompt], text="abc")
                if speculative:
                    row.update(draft_forward_passes=40, draft_s=0.1, verify_s=0.5, proposed_tokens=40,
                               accepted_tokens=32, acceptance_rate=ACCEPTANCE[prompt],
                               mean_accepted_tokens=MEAN_ACCEPTED[prompt], proposed_per_position=[10, 10, 10, 10],
                               accepted_per_position=[9, 8, 8, 7], cost_ratio_c=COST_C[prompt],
                               leviathan_speedup=1.9)
            measurements.append(row)
    return {
        "format": "specdec-result/1",
        "run": {
            "run_id": run_id, "workflow_run_id": "wf-1", "started_utc": started, "finished_utc": started,
            "status": status, "error": error, "git_commit": "abc123", "git_dirty": False, "host": host,
            "cpu_name": "Test CPU", "cpu_count": 2, "gpu_names": [], "gpu_count": 0, "cuda_version": None,
            "driver_version": None, "torch_version": "2.13.0+cpu", "transformers_version": "5.23.0",
            "specdec_version": "0.1.0", "python_version": "3.11.7", "seed": 0, "config_hash": "cfg",
            "devices": ["cpu"],
            "params": {"cell": f"{target}-{strategy}-{draft}-{k}", "target": target, "draft": draft,
                       "strategy": strategy, "k": k, "gpus": 0, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                       "draft_sampling": "greedy", "use_cache": True, "max_new_tokens": 32, "repeats": 2,
                       "warmup": 1, "prompts_file": "prompts/suite.jsonl", "target_source": "test",
                       "draft_source": None, "dtype": "float32"},
        },
        "measurements": measurements,
    }


def write(folder: Path, name: str, doc: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(doc))
    return path


def standard_files(folder: Path) -> list[Path]:
    """A baseline run (k=4 on purpose: draft_length must still be NULL), a speculative run and a failed run."""
    return [
        write(folder, "base.json", make_result("run-base", "baseline", BASE_TPS, BASE_HASH, k=4)),
        write(folder, "spec.json", make_result("run-spec", "speculative", SPEC_TPS, SPEC_HASH, draft="tiny-draft",
                                               k=4, started="2026-11-23T08:00:00Z")),
        write(folder, "failed.json", make_result("run-fail", "speculative", None, draft="missing", k=4,
                                                 status="failed", error="draft weights not found")),
    ]


def count(db: Path, table: str) -> int:
    return int(run_query(f"SELECT count(*) AS n FROM {table}", db)["n"][0])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store with the three standard runs, shared by the read-only tests."""
    folder = tmp_path_factory.mktemp("store")
    files = standard_files(folder / "results")
    db = folder / "db" / "specdec.duckdb"
    report = ingest(db, files)
    return db, files, report


# ------------------------------------------------------------------------------------------------ ingest

def test_ingest_counts(store):
    db, files, report = store
    assert report == IngestReport(files=3, new_runs=3, skipped_runs=0, measurement_rows=18, failed_rows=6)
    assert count(db, "runs") == 3
    assert count(db, "measurements") == 18


def test_columns_are_typed_and_lists_stored_as_json_text(store):
    db, _, _ = store
    row = run_query("SELECT r.started_utc, r.git_dirty, r.temperature, r.devices, r.params_json, m.token_ids, "
                    "m.proposed_per_position, m.peak_memory_bytes, typeof(m.peak_memory_bytes) AS mem_type, "
                    "typeof(r.started_utc) AS time_type "
                    "FROM runs r JOIN measurements m USING (run_id) "
                    "WHERE r.run_id = 'run-spec' AND m.prompt_id = 'p1' AND m.repeat = 0", db).iloc[0]
    assert str(row["started_utc"]) == "2026-11-23 08:00:00"
    assert row["time_type"] == "TIMESTAMP" and row["mem_type"] == "BIGINT"
    assert row["git_dirty"] is False or row["git_dirty"] == False  # noqa: E712 (numpy bool)
    assert row["temperature"] == 0.0 and row["peak_memory_bytes"] == 5_000_000_000
    assert json.loads(row["devices"]) == ["cpu"]
    assert json.loads(row["token_ids"]) == [5, 6, 7]
    assert json.loads(row["proposed_per_position"]) == [10, 10, 10, 10]
    assert json.loads(row["params_json"])["prompts_file"] == "prompts/suite.jsonl"


def test_reingest_adds_nothing(tmp_path):
    files = standard_files(tmp_path / "results")
    db = tmp_path / "s.duckdb"
    ingest(db, files)
    again = ingest(db, files)
    assert again == IngestReport(files=3, new_runs=0, skipped_runs=3, measurement_rows=0, failed_rows=0)
    assert count(db, "runs") == 3 and count(db, "measurements") == 18


def test_a_bad_file_is_refused_and_the_good_ones_go_in(tmp_path):
    db = tmp_path / "s.duckdb"
    files = standard_files(tmp_path / "results")
    ingest(db, files[:1])
    good = write(tmp_path / "more", "good.json", make_result("run-new", "baseline", BASE_TPS, BASE_HASH))
    doc = make_result("run-bad", "baseline", BASE_TPS, BASE_HASH)
    del doc["run"]["host"]
    bad = write(tmp_path / "more", "bad.json", doc)
    report = ingest(db, [bad, good])
    assert report.refused == [f"{bad}: run.host: missing"]
    assert report.new_runs == 1 and report.measurement_rows == 6
    assert count(db, "runs") == 2 and count(db, "measurements") == 12  # the good file went in, the bad one not


def test_bad_file_never_creates_the_store(tmp_path):
    bad = write(tmp_path, "bad.json", {"format": "specdec-result/1", "run": {}, "measurements": []})
    report = ingest(tmp_path / "db" / "s.duckdb", [bad])
    assert report.refused == [f"{bad}: run.run_id: missing"] and report.new_runs == 0
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(format="specdec-result/9"), "format"),
    (lambda d: d["run"]["params"].pop("temperature"), "run.params.temperature"),
    (lambda d: d["run"]["params"].update(top_k="zero"), "run.params.top_k"),
    (lambda d: d["run"].update(started_utc="yesterday"), "run.started_utc"),
    (lambda d: d["run"].update(status="done"), "run.status"),
    (lambda d: d["measurements"][2].update(tokens_per_s="fast"), "measurements[2].tokens_per_s"),
    (lambda d: d["measurements"][1].pop("repeat"), "measurements[1].repeat"),
    (lambda d: d["measurements"][1].update(repeat=0), "measurements[1]"),  # duplicate (p1, 0)
    (lambda d: d["measurements"][0].update(token_ids="1,2"), "measurements[0].token_ids"),
])
def test_validation_names_the_field(tmp_path, mutate, field):
    doc = make_result("r", "baseline", BASE_TPS, BASE_HASH)
    mutate(doc)
    path = write(tmp_path, "x.json", doc)
    with pytest.raises(ResultFileError) as err:
        load_result_file(path)
    assert str(err.value).startswith(f"{path}: {field}:")


def test_invalid_json_is_a_result_file_error(tmp_path):
    path = tmp_path / "truncated.json"
    path.write_text('{"format": "specdec-result/1", "run": {')
    with pytest.raises(ResultFileError, match="truncated.json: not valid JSON"):
        load_result_file(path)


def test_database_error_rolls_back_every_file(tmp_path, monkeypatch):
    """A row that passes validation but not DuckDB (here a value forced past the checks) fails the insert of
    measurements after earlier files' runs went in: the transaction leaves nothing behind, and the error names
    the file whose rows were refused."""
    import specdec.db.store as store

    db = tmp_path / "s.duckdb"
    good = write(tmp_path, "good.json", make_result("run-a", "baseline", BASE_TPS, BASE_HASH))
    bad = write(tmp_path, "overflow.json", make_result("run-b", "baseline", BASE_TPS, BASE_HASH))
    real_rows = store.measurement_rows

    def overflowing(doc):
        rows = real_rows(doc)
        if doc["run"]["run_id"] == "run-b":
            rows[0]["prompt_tokens"] = 2 ** 40
        return rows

    monkeypatch.setattr(store, "measurement_rows", overflowing)
    with pytest.raises(ResultFileError) as err:
        ingest(db, [good, bad])
    message = str(err.value)
    assert message.startswith(f"{bad}: the store refused it: ") and "\n" not in message
    assert count(db, "runs") == 0 and count(db, "measurements") == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["run"].update(run_id="   "), "run.run_id: must be 1-128 letters"),
    (lambda d: d["run"].update(run_id="run with spaces"), "run.run_id: must be 1-128 letters"),
    (lambda d: d["measurements"][0].update(repeat=-1), "measurements[0].repeat: must be >= 0, got -1"),
    (lambda d: d["run"]["params"].update(k=-4), "run.params.k: must be >= 1, got -4"),
    (lambda d: d["measurements"][1].update(tokens_per_s=-5.0), "measurements[1].tokens_per_s: must be >= 0"),
    (lambda d: d["measurements"][0].update(prompt_tokens=2 ** 40), "does not fit a 32-bit integer"),
    (lambda d: d["run"]["params"].update(temperature=float("nan")), "run.params.temperature: must be a finite"),
    (lambda d: d["measurements"][0].update(acceptance_rate=1.5), "acceptance_rate: must be <= 1, got 1.5"),
])
def test_impossible_values_are_refused_naming_the_file(tmp_path, mutate, message):
    """Values DuckDB would refuse without naming the file (NOT NULL for a NaN, INT32 overflow), and values it
    would store but that cannot be measurements (negative counts and rates, a run id of spaces)."""
    doc = make_result("run-x", "speculative", SPEC_TPS, SPEC_HASH, draft="d", k=4)
    mutate(doc)
    path = write(tmp_path, "odd.json", doc)
    [refusal] = ingest(tmp_path / "s.duckdb", [path]).refused
    assert refusal.startswith(f"{path}: ") and message in refusal and "\n" not in refusal
    assert not (tmp_path / "s.duckdb").exists()


def test_the_same_run_in_two_files(tmp_path):
    """Identical copies are one run (skipped); the same run id with other content is refused naming both files,
    within a batch (the later file) and against what is stored, and the rest of the batch goes in."""
    db = tmp_path / "s.duckdb"
    doc = make_result("run-1", "baseline", BASE_TPS, BASE_HASH)
    original = write(tmp_path / "a", "r.json", doc)
    copy = write(tmp_path / "b", "r.json", doc)
    assert ingest(db, [original, copy]) == IngestReport(files=2, new_runs=1, skipped_runs=1, measurement_rows=6)
    assert ingest(db, [copy]).skipped_runs == 1  # moved or copied result files: still the same run
    forged = json.loads(json.dumps(doc))
    forged["run"]["host"] = "EVIL"
    forged["measurements"][0].update(tokens_per_s=9999.0, wall_s=32 / 9999.0)  # plausible, but not what is stored
    fake = write(tmp_path / "c", "r.json", forged)
    other = write(tmp_path / "c", "new.json", make_result("run-2", "baseline", BASE_TPS, BASE_HASH))
    report = ingest(db, [other, fake])
    assert report.refused == [f"{fake}: run.run_id: already stored from {original} with different content; remove "
                              "the wrong file"]
    assert report.new_runs == 1  # the other file went in
    fresh = tmp_path / "fresh.duckdb"
    report = ingest(fresh, [fake, original])
    assert report.refused == [f"{original}: run.run_id: 'run-1' is also in {fake} with different content; remove "
                              "the wrong file"]
    assert count(db, "runs") == 2 and count(fresh, "runs") == 1
    assert run_query("SELECT DISTINCT host FROM runs", db)["host"].tolist() == ["h1"]


def test_ingest_waits_while_a_reader_holds_the_store(tmp_path, capsys):
    db = tmp_path / "s.duckdb"
    init_db(db)
    script = (f"import duckdb, sys, time\ncon = duckdb.connect({str(db)!r}, read_only=True)\n"
              "print('open', flush=True)\nsys.stdin.readline()\ntime.sleep(1.5)\ncon.close()\n"
              "print('closed', flush=True)\ntime.sleep(60)")
    reader = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "open"
        files = standard_files(tmp_path / "results")
        with pytest.raises(Exception, match="lock"):  # --wait 0: fails at once, as before
            ingest(db, files, wait_s=0)
        reader.stdin.write("go\n")
        reader.stdin.flush()  # the reader closes 1.5 s from now; ingest waits for it
        assert ingest(db, files, wait_s=30).new_runs == 3
        assert reader.stdout.readline().strip() == "closed"  # ingest got in only after the reader left
        assert "is open in another process (a dashboard or query); waiting up to 30 s" in capsys.readouterr().err
    finally:
        reader.kill()
        reader.wait()
    assert count(db, "runs") == 3


def test_ingest_cli_skips_other_json_in_folders_but_not_named_files(tmp_path, capsys):
    """`specdec ingest results/` after training a drafter: its drafter.json and data.json are not result files."""
    standard_files(tmp_path / "results" / "default")
    write(tmp_path / "results" / "drafters" / "data-x", "data.json", {"target": "t", "tokens": 10})
    write(tmp_path / "results" / "drafters" / "t+eagle-0123456789", "drafter.json",
          {"format": "specdec-drafter/1", "kind": "eagle"})
    db = tmp_path / "cli.duckdb"
    assert ingest_cli.main(["--db", str(db), str(tmp_path / "results")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ingested 3 result files") and err.startswith("note: skipped 2 JSON files that are not")
    data = tmp_path / "results" / "drafters" / "data-x" / "data.json"
    assert ingest_cli.main(["--db", str(db), str(data)]) == 2
    assert capsys.readouterr().err.startswith(f"refused: {data}: format: expected one of 'specdec-result/1', "
                                              "'specdec-result/2', got null")
    broken = tmp_path / "results" / "default" / "broken.json"
    broken.write_text('{"format": "specdec-result/1", "run": {')  # found by the walk, but damaged: refused
    assert ingest_cli.main(["--db", str(db), str(tmp_path / "results")]) == 2
    assert "broken.json: not valid JSON" in capsys.readouterr().err


def test_ingest_cli_store_that_cannot_be_created_is_one_line(tmp_path, capsys):
    files = standard_files(tmp_path / "results")
    (tmp_path / "afile").write_text("")
    db = tmp_path / "afile" / "sub" / "s.duckdb"
    assert ingest_cli.main(["--db", str(db), str(files[0])]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot create the results store {db}: Not a directory ({db.parent}) (nothing was ingested)\n"


def test_ingest_cli_recurses_folders(tmp_path, capsys):
    standard_files(tmp_path / "results" / "nested")
    db = tmp_path / "cli.duckdb"
    assert ingest_cli.main(["--db", str(db), str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"ingested 3 result files into {db}: 3 new runs, 0 already stored (skipped), "
                   f"18 measurements (6 failed)")
    assert ingest_cli.main(["--db", str(db), str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_default_db_path(monkeypatch, tmp_path):
    monkeypatch.delenv("SPECDEC_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_db_path() == Path("results/specdec.duckdb")
    # a store at the pre-2026-12 default stays in use while it is the only one, then the new one wins
    Path("db").mkdir()
    Path("db/specdec.duckdb").touch()
    assert default_db_path() == Path("db/specdec.duckdb")
    Path("results").mkdir()
    Path("results/specdec.duckdb").touch()
    assert default_db_path() == Path("results/specdec.duckdb")
    monkeypatch.setenv("SPECDEC_DB", "/tmp/elsewhere.duckdb")
    assert default_db_path() == Path("/tmp/elsewhere.duckdb")


def test_init_db_is_idempotent(tmp_path):
    db = tmp_path / "deep" / "folder" / "s.duckdb"
    init_db(db)
    init_db(db)
    names = set(run_query("SELECT table_name FROM information_schema.tables", db)["table_name"])
    assert {"runs", "measurements", "speedup", "cell_summary", "failures"} <= names


# ------------------------------------------------------------------------------------------------ views

def test_speedup_view(store):
    db, _, _ = store
    df = run_query("SELECT * FROM speedup WHERE strategy = 'speculative' ORDER BY prompt_id, repeat", db)
    assert len(df) == 6  # the failed run contributes nothing
    for _, row in df.iterrows():
        assert row["speedup"] == pytest.approx(EXPECTED_SPEEDUP[(row["prompt_id"], row["repeat"])])
    assert list(df["baseline_tokens_per_s"]) == pytest.approx([11, 11, 20, 20, 9, 9])
    assert list(df["matches_baseline"]) == [True, True, True, True, False, False]
    assert set(df["draft_length"]) == {4} and set(df["draft"]) == {"tiny-draft"}
    expected_columns = ["run_id", "host", "target", "draft", "strategy", "draft_length", "gpus", "temperature",
                        "top_p", "top_k", "max_new_tokens", "prompt_id", "category", "repeat", "new_tokens",
                        "tokens_per_s", "baseline_tokens_per_s", "speedup", "acceptance_rate",
                        "mean_accepted_tokens", "matches_baseline", "ttft_s", "tpot_s", "peak_memory_bytes",
                        "cost_ratio_c", "leviathan_speedup", "started_utc", "cost_per_mtok",
                        "copy_share", "repeat_share", "degenerate", "baseline_source",
                        "baseline_run_id", "baseline_repeat", "cpu_name", "gpu_names", "engine", "weights",
                        "threads", "batch_size"]
    assert list(df.columns) == expected_columns
    assert set(df["batch_size"]) == {1}  # files from before batching: one sequence at a time
    assert set(df["baseline_source"]) == {"shared"}  # format-1 files: no pairing


def test_speedup_view_baseline_rows(store):
    db, _, _ = store
    df = run_query("SELECT * FROM speedup WHERE strategy = 'baseline' ORDER BY prompt_id, repeat", db)
    assert list(df["speedup"]) == pytest.approx([10 / 11, 12 / 11, 1.0, 1.0, 8 / 9, 10 / 9])
    assert df["draft_length"].isna().all()  # k = 4 in the file, but a baseline does not draft
    assert list(df["matches_baseline"]) == [True] * 6


def with_params(doc: dict, **params) -> dict:
    doc["run"]["params"].update(params)
    return doc


def test_speedup_is_over_the_same_engine_and_weight_format(tmp_path):
    """llama.cpp rows take llamacpp-generate as their baseline, int8 rows the int8 baseline; threads keep apart."""
    half = {p: tuple(v / 2 for v in tps) for p, tps in BASE_TPS.items()}
    files = [write(tmp_path, "base.json", with_params(make_result("b", "baseline", BASE_TPS, BASE_HASH),
                                                     weights="float32", threads=2)),
             write(tmp_path, "base8.json", with_params(make_result("b8", "baseline", half, BASE_HASH),
                                                      weights="int8", threads=2)),
             write(tmp_path, "ng8.json", with_params(make_result("n8", "ngram", SPEC_TPS, SPEC_HASH, k=4),
                                                    weights="int8", threads=2)),
             write(tmp_path, "lgen.json", with_params(make_result("lg", "llamacpp-generate", SPEC_TPS, BASE_HASH),
                                                     weights="gguf-Q4_1", threads=2)),
             write(tmp_path, "lng.json", with_params(make_result("ln", "llamacpp-ngram", SPEC_TPS, SPEC_HASH, k=4),
                                                    weights="gguf-Q4_1", threads=2)),
             write(tmp_path, "lng1.json", with_params(make_result("ln1", "llamacpp-ngram", SPEC_TPS, SPEC_HASH, k=4),
                                                     weights="gguf-Q4_1", threads=1))]
    db = tmp_path / "s.duckdb"
    ingest(db, files)
    df = run_query("SELECT run_id, engine, weights, threads, prompt_id, repeat, speedup, baseline_tokens_per_s "
                   "FROM speedup ORDER BY run_id, prompt_id, repeat", db)
    rows = {run: part for run, part in df.groupby("run_id")}
    assert list(rows["n8"]["baseline_tokens_per_s"]) == pytest.approx([5.5, 5.5, 10, 10, 4.5, 4.5])  # int8 base
    assert list(rows["ln"]["speedup"]) == pytest.approx([1.0, 1.0, 30 / 32, 34 / 32, 1.0, 1.0])  # over llamacpp-gen
    assert set(rows["ln"]["engine"]) == {"llamacpp"} and set(rows["n8"]["engine"]) == {"specdec"}
    assert rows["ln1"]["speedup"].isna().all()  # no llama.cpp baseline at 1 thread
    summary = run_query("SELECT strategy, engine, weights, threads, draft_length FROM cell_summary "
                        "ORDER BY strategy, threads", db)
    assert len(summary) == 6 and summary["draft_length"].isna().sum() == 3

def test_cell_summary(store):
    db, _, _ = store
    df = run_query("SELECT * FROM cell_summary ORDER BY strategy", db)
    assert list(df["strategy"]) == ["baseline", "speculative"]
    spec = df.iloc[1]
    assert spec["n_runs"] == 1 and spec["n_measurements"] == 6
    # speedups sorted: 1.5, 1.7, 2, 2, 2, 2 → median 2; quantile_cont p25 at position 1.25 → 1.7 + 0.25·0.3.
    assert spec["speedup_median"] == pytest.approx(2.0)
    assert spec["speedup_p25"] == pytest.approx(1.775)
    assert spec["speedup_p75"] == pytest.approx(2.0)
    assert spec["speedup_min"] == pytest.approx(1.5) and spec["speedup_max"] == pytest.approx(2.0)
    assert spec["tokens_per_s_median"] == pytest.approx(22.0)  # 18 18 22 22 30 34
    assert spec["baseline_tokens_per_s_median"] == pytest.approx(11.0)  # 9 9 11 11 20 20
    assert spec["acceptance_rate_median"] == pytest.approx(0.6)
    assert spec["mean_accepted_tokens_median"] == pytest.approx(2.5)
    assert spec["match_share"] == pytest.approx(4 / 6)
    assert spec["leviathan_speedup_median"] == pytest.approx(1.9)
    assert spec["cost_ratio_c_median"] == pytest.approx(0.2)
    base = df.iloc[0]
    assert base["speedup_median"] == pytest.approx(1.0) and base["match_share"] == pytest.approx(1.0)
    assert math.isnan(base["acceptance_rate_median"])


def test_failures_view(store):
    db, _, _ = store
    df = run_query("SELECT * FROM failures ORDER BY prompt_id, repeat", db)
    assert list(df.columns) == ["run_id", "host", "cell", "target", "draft", "strategy", "k", "prompt_id", "repeat",
                                "error"]
    assert len(df) == 6
    assert set(df["run_id"]) == {"run-fail"} and set(df["error"]) == {"draft weights not found"}
    assert list(df["prompt_id"]) == ["p1", "p1", "p2", "p2", "p3", "p3"]


def test_most_recent_baseline_wins(tmp_path):
    """An older baseline run (10× faster, different hashes) must not be used once a newer one exists."""
    db = tmp_path / "s.duckdb"
    old = {p: (v[0] * 10, v[1] * 10) for p, v in BASE_TPS.items()}
    files = standard_files(tmp_path / "results")
    files.append(write(tmp_path / "results", "old.json",
                       make_result("run-old", "baseline", old, {p: "x" for p in PROMPTS}, started="2026-11-01T00:00:00Z")))
    ingest(db, files)
    df = run_query("SELECT prompt_id, repeat, speedup, matches_baseline FROM speedup WHERE strategy = 'speculative' "
                   "ORDER BY prompt_id, repeat", db)
    assert list(df["speedup"]) == pytest.approx([EXPECTED_SPEEDUP[(p, r)] for p in PROMPTS for r in (0, 1)])
    assert list(df["matches_baseline"]) == [True, True, True, True, False, False]
    old_rows = run_query("SELECT speedup FROM speedup WHERE run_id = 'run-old' ORDER BY prompt_id, repeat", db)
    assert list(old_rows["speedup"]) == pytest.approx([100 / 11, 120 / 11, 10, 10, 80 / 9, 100 / 9])


def test_no_baseline_means_null_speedup(tmp_path):
    db = tmp_path / "s.duckdb"
    ingest(db, [write(tmp_path, "s.json", make_result("r", "speculative", SPEC_TPS, SPEC_HASH, draft="d", k=3,
                                                      host="other"))])
    df = run_query("SELECT speedup, baseline_tokens_per_s, matches_baseline FROM speedup", db)
    assert len(df) == 6 and df.isna().all().all()


def test_sampling_runs_have_no_match_flag(tmp_path):
    db = tmp_path / "s.duckdb"
    base = make_result("b", "baseline", BASE_TPS, BASE_HASH)
    spec = make_result("s", "speculative", SPEC_TPS, SPEC_HASH, draft="d", k=3)
    for doc in (base, spec):
        doc["run"]["params"]["temperature"] = 0.7
    ingest(db, [write(tmp_path, "b.json", base), write(tmp_path, "s.json", spec)])
    df = run_query("SELECT speedup, matches_baseline FROM speedup WHERE strategy = 'speculative' "
                   "ORDER BY prompt_id, repeat", db)
    assert list(df["speedup"]) == pytest.approx([EXPECTED_SPEEDUP[(p, r)] for p in PROMPTS for r in (0, 1)])
    assert df["matches_baseline"].isna().all()


# ------------------------------------------------------------------------------------------------ queries

REFUSED = {
    "DELETE FROM runs": "DELETE",
    "UPDATE runs SET host = 'x'": "UPDATE",
    "INSERT INTO runs SELECT * FROM runs": "INSERT",
    "DROP VIEW speedup": "DROP",
    "CREATE TABLE t AS SELECT 1": "CREATE",
    "ALTER TABLE runs ADD COLUMN x INT": "ALTER",
    "ATTACH '/tmp/other.duckdb' AS o": "ATTACH",
    "COPY runs TO '/tmp/runs.csv'": "COPY",
    "PRAGMA database_list": "PRAGMA",
    "SET threads = 1": "SET",
    "INSTALL httpfs": "INSTALL",
    "SELECT 1; DELETE FROM runs": "multiple statements",
    "SELECT 1; SELECT 2": "multiple statements",
    "WITH x AS (SELECT 1) DELETE FROM runs": "DELETE",
    "SELECT * FROM read_csv('/etc/passwd')": "read_csv()",
    "SELECT * FROM read_text('/etc/hostname')": "read_text()",
    "SELECT * FROM glob('/etc/*')": "glob()",
    "SELECT * FROM '/etc/passwd'": "file path '/etc/passwd' in FROM",
    "SELECT * FROM runs, '/etc/passwd'": "file path '/etc/passwd' in FROM",
    "SELECT * FROM query('SELECT 1')": "query()",
    # A string trick that fools a tokeniser unaware of E'' strings: DuckDB sees two statements.
    "SELECT e'\\' '; DELETE FROM runs; --'": "multiple statements",
}


@pytest.mark.parametrize("sql", list(REFUSED))
def test_check_sql_refuses(sql):
    with pytest.raises(UnsafeSQLError) as err:
        check_sql(sql)
    message = str(err.value)
    assert message.startswith("refused: ") and REFUSED[sql] in message and "read-only" in message
    assert "\n" not in message


def test_run_query_refuses_before_touching_the_store(store):
    db, _, _ = store
    with pytest.raises(UnsafeSQLError, match="DELETE"):
        run_query("DELETE FROM measurements", db)
    assert count(db, "measurements") == 18


def test_accepts_read_only_queries(store):
    db, _, _ = store
    df = run_query("SELECT count(*) AS n FROM failures WHERE error <> 'please delete; drop table runs' -- delete\n", db)
    assert df["n"][0] == 6
    df = run_query("WITH fast AS (SELECT * FROM speedup WHERE speedup >= 2) "
                   "SELECT prompt_id, count(*) AS n FROM fast WHERE strategy = 'speculative' GROUP BY prompt_id "
                   "ORDER BY prompt_id;", db)
    assert df.to_dict("list") == {"prompt_id": ["p1", "p3"], "n": [2, 2]}
    assert list(run_query("FROM runs SELECT run_id ORDER BY run_id", db)["run_id"]) == ["run-base", "run-fail",
                                                                                        "run-spec"]
    assert len(run_query("SELECT * FROM measurements", db, limit=4)) == 4


@pytest.mark.parametrize("sql, why", [
    ("DELETE FROM runs", "read-only"),
    ("SELECT 1; DELETE FROM runs", "read-only"),
    ("CREATE TABLE evil AS SELECT 1", "read-only"),
    ("SELECT * FROM read_csv('{csv}')", "disabled"),
    ("SELECT * FROM '{csv}'", "disabled"),  # a replacement scan: DuckDB would read the file
    ("SELECT * FROM read_text('/etc/hostname')", "disabled"),
    ("ATTACH '{folder}/other.duckdb' AS o", "disabled"),
    ("SET enable_external_access = true", "locked"),
])
def test_execution_layer_stops_what_the_text_check_would(store, tmp_path, sql, why):
    """Bypass check_sql: the read-only, no-external-access connection alone must refuse."""
    db, _, _ = store
    csv_file = tmp_path / "secret.csv"
    csv_file.write_text("a,b\n1,2\n")
    with pytest.raises(QueryError) as err:
        _execute_read_only(sql.format(csv=csv_file, folder=tmp_path), db)
    assert why in str(err.value)
    assert count(db, "runs") == 3


def test_execution_layer_cannot_copy_out(store, tmp_path):
    db, _, _ = store
    target = tmp_path / "leak.csv"
    with pytest.raises(QueryError):
        _execute_read_only(f"COPY runs TO '{target}'", db)
    assert not target.exists()


@pytest.mark.parametrize("sql", ["SELECT count(*) AS load FROM runs", "SELECT 1 AS comment",
                                 "SELECT status AS set, count(*) AS copy FROM runs GROUP BY ALL",
                                 "EXPLAIN SELECT * FROM runs", "PIVOT runs ON status USING count(*)",
                                 "DESCRIBE runs", "SHOW TABLES", "SUMMARIZE runs", "VALUES (1)", "TABLE runs"])
def test_keywords_as_names_and_every_read_statement_are_accepted(store, sql):
    db, _, _ = store
    assert check_sql(sql) == sql
    run_query(sql, db, limit=1)


@pytest.mark.parametrize("sql", ["SELECT current_setting('secret_directory')", "SELECT path FROM duckdb_databases()",
                                 "FROM duckdb_databases", "SELECT * FROM pragma_database_list",
                                 "SELECT value FROM duckdb_settings() WHERE name = 'temp_directory'",
                                 'SELECT * FROM "duckdb_databases"'])
def test_functions_that_show_server_paths_are_refused(store, sql):
    with pytest.raises(UnsafeSQLError, match="not allowed .it shows server paths"):
        check_sql(sql)


def test_typos_get_duckdbs_own_message_with_its_hint(store):
    db, _, _ = store
    with pytest.raises(QueryError) as err:
        run_query("SELEC * FROM runs", db)
    assert not isinstance(err.value, UnsafeSQLError)
    assert str(err.value) == 'Parser Error: syntax error at or near "SELEC"'
    with pytest.raises(QueryError) as err:
        run_query("SELECT * FROM cell_sumary", db)
    assert str(err.value).startswith("Catalog Error: Table with name cell_sumary does not exist!")
    assert str(err.value).endswith('Did you mean "cell_summary"?') and "\n" not in str(err.value)
    with pytest.raises(QueryError, match="^Parser Error: unterminated string literal$"):
        check_sql("SELECT 'abc")
    with pytest.raises(UnsafeSQLError, match="^refused: empty query"):
        check_sql("-- only a comment\n;")


def test_a_running_query_does_not_block_the_next_in_the_same_process(store):
    """The dashboard runs console queries in one process: a slow one must not lock the others out (it did: the
    first SET lock_configuration locked the shared database instance for every later connection)."""
    db, _, _ = store
    slow_error = []

    def slow():
        try:
            run_query("SELECT count(*) FROM range(100000000000) a WHERE a % 7 = 3", db, timeout_s=3)
        except QueryError as exc:
            slow_error.append(str(exc))

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        time.sleep(0.5)  # the slow query is running
        assert count(db, "runs") == 3
        assert run_query("SELECT count(*) AS n FROM measurements", db, timeout_s=5)["n"][0] == 18
    finally:
        thread.join()
    assert slow_error == ["query timed out after 3 s"]


def test_timeout_interrupts(store):
    db, _, _ = store
    with pytest.raises(QueryError, match="timed out"):
        run_query("SELECT count(*) FROM range(100000000000) a WHERE a % 7 = 3", db, timeout_s=0.2)


def test_missing_store_message(tmp_path, capsys):
    missing = tmp_path / "nothing.duckdb"
    with pytest.raises(QueryError) as err:
        run_query("SELECT 1", missing)
    assert str(err.value) == f"no results store at {missing}: run `snakemake --cores 2` (or `specdec ingest`) first"
    assert main_query(["SELECT 1", "--db", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {err.value}" and captured.out == ""
    assert not missing.exists()  # a query must not create an empty store


def test_main_query_csv(store, capsys):
    db, _, _ = store
    sql = ("SELECT prompt_id, repeat, speedup, matches_baseline FROM speedup WHERE strategy = 'speculative' "
           "ORDER BY prompt_id, repeat")
    assert main_query([sql, "--db", str(db), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["prompt_id"] for r in rows] == ["p1", "p1", "p2", "p2", "p3", "p3"]
    assert [float(r["speedup"]) for r in rows] == pytest.approx([2.0, 2.0, 1.5, 1.7, 2.0, 2.0])
    assert [r["matches_baseline"] for r in rows] == ["True", "True", "True", "True", "False", "False"]


def test_main_query_json(store, capsys):
    db, _, _ = store
    sql = ("SELECT strategy, last_started_utc, speedup_median, acceptance_rate_median FROM cell_summary "
           "ORDER BY strategy")
    assert main_query([sql, "--db", str(db), "--format", "json", "--limit", "5"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == ["baseline", "speculative"]
    assert rows[1]["last_started_utc"].startswith("2026-11-23T08:00:00")
    assert [r["speedup_median"] for r in rows] == pytest.approx([1.0, 2.0])
    assert rows[0]["acceptance_rate_median"] is None and rows[1]["acceptance_rate_median"] == pytest.approx(0.6)


def test_main_query_refusal_and_table(store, capsys):
    db, _, _ = store
    assert main_query(["DROP TABLE runs", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refused: DROP") and err.count("\n") == 1
    assert main_query(["SELECT run_id, status FROM runs ORDER BY run_id", "--db", str(db)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run_id", "status"] and out[1].split() == ["run-base", "ok"]
    assert out[-1] == "(3 rows)"


def test_table_format_cuts_long_text_with_a_marker(store, capsys):
    db, _, _ = store
    sql = "SELECT repeat('x', 100000) || chr(10) || 'end' AS big, 7 AS n"  # shown as xx...x\nend
    assert main_query([sql, "--db", str(db), "--limit", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["x" * MAX_CELL_CHARS + "…[+" + str(100000 + 5 - MAX_CELL_CHARS) + "", "chars]", "7"]
    assert main_query([sql, "--db", str(db), "--format", "csv"]) == 0
    assert len(capsys.readouterr().out) > 100000  # csv and json keep every character


@pytest.mark.parametrize("option, value, message", [
    ("--timeout", "-1", "--timeout must be a number of seconds >= 0 (0: no limit), got -1"),
    ("--timeout", "nan", "got nan"), ("--timeout", "inf", "got inf"), ("--limit", "0", "--limit must be >= 1"),
])
def test_query_limits_are_validated(store, capsys, option, value, message):
    db, _, _ = store
    assert main_query(["SELECT 1", "--db", str(db), option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("rows", [200000, 10 ** 12])
def test_query_into_a_closed_pipe_is_quiet(store, rows):
    """The result streams: `| head -1` ends the query at once, even one of a trillion rows (it used to be built in
    memory whole first: 13 s and 2.5 GB for 20 million rows, and no default timeout)."""
    db, _, _ = store
    start = time.monotonic()
    result = subprocess.run(f"{sys.executable} -m specdec.cli query --db {db} 'SELECT * FROM range({rows})' | head -1",
                            shell=True, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "range" and result.stderr == ""
    assert time.monotonic() - start < 50  # well below the default timeout: the query did not run to its end


def test_query_batches_stream_and_stop_early(store):
    from specdec.db.query import format_batches, iter_batches

    db, _, _ = store
    batches = iter_batches("SELECT * FROM range(1000000000000) t(x)", db, timeout_s=30)
    first = next(batches)
    assert len(first) == 2048 and first.x.iloc[-1] == 2047
    batches.close()  # the reader stops: the query ends, the store is released
    assert count(db, "runs") == 3
    pieces = list(format_batches(iter_batches("SELECT * FROM range(5000) t(x)", db, limit=4100), "csv"))
    assert len(pieces) == 3 and pieces[0].startswith("x\n0\n") and not pieces[1].startswith("x")
    assert sum(p.count("\n") for p in pieces) == 4101
    whole = "".join(format_batches(iter_batches("SELECT * FROM range(5000) t(x)", db), "json"))
    assert json.loads(whole) == [{"x": i} for i in range(5000)]
    table = "".join(format_batches(iter_batches("SELECT * FROM range(5000) t(x)", db), "table")).splitlines()
    assert table[0].strip() == "x" and len(table) == 5002 and table[-1] == "(5000 rows)"


def test_query_has_a_default_timeout_and_0_means_none(store, capsys, monkeypatch):
    from specdec.db import query

    db, _, _ = store
    assert query.DEFAULT_TIMEOUT_S == 60
    monkeypatch.setattr(query, "DEFAULT_TIMEOUT_S", 0.3)
    slow = "SELECT count(*) FROM range(100000000000) a WHERE a % 7 = 3"
    assert main_query([slow, "--db", str(db)]) == 2
    assert capsys.readouterr().err == "error: query timed out after 0.3 s\n"
    assert main_query(["SELECT 42 AS n", "--db", str(db), "--timeout", "0"]) == 0
    assert capsys.readouterr().out.split() == ["n", "42", "(1", "row)"]


def test_query_table_shows_control_characters_as_escapes(store, capsys):
    db, _, _ = store
    sql = "SELECT 'a' || chr(27) || '[2J' || chr(155) || chr(8238) || 'b' AS name"
    assert main_query([sql, "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out
    assert "a\\x1b[2J\\x9b\\u202eb" in out


def test_format_table_empty():
    import pandas as pd

    assert format_table(pd.DataFrame({"a": [], "b": []}), "table") == "a  b\n(0 rows)"
    assert format_table(pd.DataFrame({"a": [1]}), "json") == '[{"a":1}]'


def test_engine_releases_the_file_lock(tmp_path):
    """NullPool: after a connection closes, a read-only open of the same file (another config) must work."""
    db = tmp_path / "s.duckdb"
    init_db(db)
    engine = engine_for(db)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    assert count(db, "runs") == 0  # would fail with a configuration/lock conflict if the writer were still open
    engine.dispose()


# ------------------------------------------------------------------------------------------- cost, extra fields

def test_cost_per_million_tokens_from_device_prices(tmp_path):
    gpu_doc = make_result("run-gpu", "baseline", BASE_TPS, BASE_HASH, host="h2")
    gpu_doc["run"].update(gpu_names=["NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB"], gpu_count=2)
    files = standard_files(tmp_path / "results") + [write(tmp_path / "results", "gpu.json", gpu_doc)]
    db = tmp_path / "specdec.duckdb"
    ingest(db, files)  # no prices yet: cost is unknown, not zero
    assert run_query("SELECT count(cost_per_mtok) AS n FROM speedup", db)["n"][0] == 0

    # the longest matching key wins; a CPU run takes the "cpu" price
    ingest(db, [], prices={"A100": 2.0, "A100-SXM4-40GB": 1.5, "cpu": 0.36})
    rows = run_query("SELECT run_id, tokens_per_s, cost_per_mtok FROM speedup", db)
    for run_id, tps, cost in rows.itertuples(index=False):
        per_hour = 2 * 1.5 if run_id == "run-gpu" else 0.36
        assert cost == pytest.approx(per_hour / (tps * 3600) * 1e6)
    summary = run_query("SELECT cost_per_mtok_median AS c FROM cell_summary WHERE host = 'h2'", db)
    costs = [3.0 / (tps * 3600) * 1e6 for pair in BASE_TPS.values() for tps in pair]
    assert summary["c"][0] == pytest.approx(statistics.median(costs))

    # prices are replaced, not merged; a device without a price leaves the run's cost unknown
    ingest(db, [], prices={"H100": 4.0})
    assert run_query("SELECT count(cost_per_mtok) AS n FROM speedup", db)["n"][0] == 0
    assert count(db, "runs") == 4  # re-ingesting to change prices touched no run


def test_bad_prices_are_refused_before_the_store_is_touched(tmp_path):
    db = tmp_path / "specdec.duckdb"
    with pytest.raises(ResultFileError, match=r"prices.A100: must be a number >= 0"):
        ingest(db, standard_files(tmp_path / "results"), prices={"A100": -1})
    assert not db.exists()


def test_fields_without_a_column_are_kept_as_json(tmp_path):
    doc = make_result("run-x", "baseline", BASE_TPS, BASE_HASH)
    doc["run"]["placement"] = {"mode": "pipeline", "per_device_bytes": [1, 2]}
    doc["measurements"][0]["peak_memory_per_device"] = {"cuda:0": 123}
    db = tmp_path / "specdec.duckdb"
    ingest(db, [write(tmp_path, "x.json", doc)])
    run_extra = run_query("SELECT extra_json FROM runs", db)["extra_json"][0]
    assert json.loads(run_extra) == {"placement": {"mode": "pipeline", "per_device_bytes": [1, 2]}}
    extra = run_query("SELECT extra_json FROM measurements WHERE prompt_id = 'p1' AND \"repeat\" = 0", db)
    assert json.loads(extra["extra_json"][0]) == {"peak_memory_per_device": {"cuda:0": 123}}


# ------------------------------------------------------------------------------------------------ tampered files

REAL_RESULT = Path(__file__).parent / "data" / "result-tiny.json"  # a real `specdec run-job` file (data/README.md)


def real_result() -> dict:
    return json.loads(REAL_RESULT.read_text())


def edited(edit) -> callable:
    """A tampering of the parsed file: `edit(doc)` changes it in place."""
    def text(doc: dict) -> str:
        edit(doc)
        return json.dumps(doc)
    return text


def future(doc: dict) -> None:
    doc["run"].update(started_utc="9999-01-01T00:00:00Z", finished_utc="9999-01-01T01:00:00Z")


# The tampered files (issue 30: 16 of 40 were stored), and a few more: each is refused naming the rule.
TAMPERED = {
    "ESC in a strategy name": (edited(lambda d: d["run"]["params"].update(strategy="speculative\x1b[2J")),
                               "run.params.strategy: contains a control character"),
    "unknown strategy": (edited(lambda d: d["run"]["params"].update(strategy="warp-drive")),
                         "run.params.strategy: unknown strategy"),
    "token ids of other types": (edited(lambda d: d["measurements"][0].update(token_ids=["a", None, {"x": 1}])),
                                 "measurements[0].token_ids: token ids must be integers"),
    "1000 accepted of 10 proposed": (edited(lambda d: d["measurements"][1].update(accepted_tokens=1000,
                                                                                  proposed_tokens=10)),
                                     "measurements[1].accepted_tokens: accepted 1000 > proposed 10"),
    "accepted > proposed at a position": (edited(lambda d: d["measurements"][0].update(
        accepted_per_position=[p + 1 for p in d["measurements"][0]["proposed_per_position"]])),
        "measurements[0].accepted_per_position[0]: accepted"),
    "5000 new tokens, max 64": (edited(lambda d: (d["run"]["params"].update(max_new_tokens=64),
                                                  d["measurements"][0].update(new_tokens=5000))),
                                "measurements[0].new_tokens: 5000 > max_new_tokens 64 x 1 turn(s)"),
    "tokens/s 1e308": (edited(lambda d: d["measurements"][0].update(tokens_per_s=1e308)),
                       "measurements[0].tokens_per_s: 1e+308 > 1e+06 tokens/s"),
    "tokens/s not new_tokens / wall_s": (edited(lambda d: d["measurements"][3].update(
        tokens_per_s=2 * d["measurements"][3]["tokens_per_s"])), "measurements[3].tokens_per_s: "),
    "ok with 0 new tokens": (edited(lambda d: d["measurements"][2].update(new_tokens=0, tokens_per_s=0.0)),
                             "measurements[2].new_tokens: an ok measurement generated at least 1 token"),
    "ok with no measurements": (edited(lambda d: d.update(measurements=[])),
                                "measurements: a run with status ok needs at least one ok measurement"),
    "finish before the start": (edited(lambda d: d["run"].update(finished_utc="2000-01-01T00:00:00Z")),
                                "run.finished_utc: 2000-01-01T00:00:00Z is before started_utc"),
    "start in year 9999": (edited(future), "run.started_utc: 9999-01-01T00:00:00Z is in the future"),
    "a 5 MB error string": (edited(lambda d: d["measurements"][0].update(error="x" * 5_000_000)),
                            "measurements[0].error: longer than 4096 characters (5000000)"),
    "a 5 MB prompt id": (edited(lambda d: d["measurements"][0].update(prompt_id="p" * 5_000_000)),
                         "measurements[0].prompt_id: longer than 512 characters"),
    "duplicate JSON keys": (lambda doc: json.dumps(doc).replace('"run": {', '"run": {"host": "elsewhere", ', 1),
                            "duplicate keys: duplicate key \"host\" in one object"),
    "200,000 nested [": (lambda doc: "[" * 200_000, "not valid JSON: nested too deeply"),
    "engine not the strategy's": (edited(lambda d: d["run"]["params"].update(engine="llamacpp")),
                                  "run.params.engine: must be 'specdec'"),
    "newline in a host name": (edited(lambda d: d["run"].update(host="vm\nFAKE LINE")),
                               "run.host: contains a control character"),
    "tampered paired baseline": (edited(lambda d: d["paired_baseline"]["measurements"][1].update(new_tokens=5000)),
                                 "paired_baseline.measurements[1].new_tokens: 5000 > max_new_tokens 12"),
}


def test_the_real_result_file_passes(tmp_path):
    report = ingest(tmp_path / "s.duckdb", [REAL_RESULT])
    assert report.refused == [] and report.new_runs == 2 and report.measurement_rows == 8


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_copies_of_a_real_result_are_refused(tmp_path, case):
    tamper, rule = TAMPERED[case]
    path = tmp_path / "tampered.json"
    path.write_text(tamper(real_result()))
    db = tmp_path / "s.duckdb"
    report = ingest(db, [path])
    assert len(report.refused) == 1 and report.new_runs == 0
    line = report.refused[0]
    assert line.startswith(f"{path}: ") and rule in line and "\n" not in line and len(line) < 400, line
    assert not db.exists()  # nothing stored


def test_ingest_of_a_folder_refuses_the_tampered_files_and_stores_the_good_one(tmp_path, capsys):
    """One folder with every tampered file and one good one: one line per refused file (the deeply nested one
    too: it used to be a 32-line RecursionError traceback from the folder walk), exit 2, only the good one in."""
    folder = tmp_path / "results"
    folder.mkdir()
    for i, (tamper, _) in enumerate(TAMPERED.values()):
        (folder / f"t{i:02d}.json").write_text(tamper(real_result()))
    (folder / "good.json").write_text(REAL_RESULT.read_text())
    db = tmp_path / "s.duckdb"
    assert ingest_cli.main(["--db", str(db), str(folder)]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == len(TAMPERED) and all(line.startswith(f"refused: {folder}/t") for line in lines)
    assert "Traceback" not in err
    assert out.startswith(f"ingested {len(TAMPERED) + 1} result files into {db}: 2 new runs") and "refused" in out
    assert count(db, "runs") == 2 and count(db, "measurements") == 8
    assert ingest_cli.main(["--db", str(db), str(folder / "good.json")]) == 0  # a rerun: nothing twice
    assert count(db, "runs") == 2


def test_non_finite_numbers_are_null_where_the_format_allows_it(tmp_path):
    """NaN and Infinity (JSON extensions Python reads) are stored as NULL in nullable columns (a 0/0 rate), and
    refused where a value is required."""
    doc = real_result()
    doc["measurements"][0].update(cost_ratio_c=float("nan"), leviathan_speedup=float("inf"))
    path = write(tmp_path, "nan.json", doc)
    db = tmp_path / "s.duckdb"
    assert ingest(db, [path]).refused == []
    row = run_query("SELECT cost_ratio_c, leviathan_speedup FROM measurements WHERE decode_index = 0", db).iloc[0]
    assert row.isna().all()
    doc["run"].update(run_id="other")
    doc["run"]["params"].update(top_p=float("nan"))
    doc["paired_baseline"]["run"].update(paired_with="other")
    [line] = ingest(db, [write(tmp_path, "nan2.json", doc)]).refused
    assert "run.params.top_p: must be a finite number, got nan" in line


def test_the_schema_file_covers_every_column():
    """db/result.schema.json names every column a result file fills (a column added to db/schema.py without it
    would go unchecked)."""
    from specdec.db.schema import PARAM_COLUMNS, measurements, runs
    from specdec.db.store import RESULT_SCHEMA, STORE_ONLY

    schema = json.loads(RESULT_SCHEMA.read_text())["$defs"]
    run_props, params, rows = (set(schema[k]["properties"]) for k in ("run", "params", "measurement"))
    assert {c.name for c in runs.columns} - set(STORE_ONLY) - set(PARAM_COLUMNS) <= run_props
    assert set(PARAM_COLUMNS) <= params
    assert {c.name for c in measurements.columns} - set(STORE_ONLY) - {"run_id"} <= rows


# ------------------------------------------------------------------------------------------------ prune

@pytest.fixture
def prunable(tmp_path):
    """The three standard runs (host h1) and the real paired file (host vm) filed under tag t1."""
    db = tmp_path / "s.duckdb"
    real = tmp_path / "results" / "t1" / "vm" / "cell.json"
    real.parent.mkdir(parents=True)
    real.write_text(REAL_RESULT.read_text())
    assert ingest(db, standard_files(tmp_path / "results" / "old") + [real]).new_runs == 5
    return db, real_result()


def prune_cli(db, *args) -> int:
    from specdec.db import prune

    return prune.main(["--db", str(db), *args])


def test_prune_says_what_would_go_then_removes_it_with_yes(prunable, capsys):
    db, doc = prunable
    cell, paired = doc["run"]["run_id"], doc["paired_baseline"]["run"]["run_id"]
    assert prune_cli(db, "--tag", "t1") == 0
    out = capsys.readouterr().out
    assert out.startswith("would remove 2 runs (8 measurements) matching (tag = t1): ") and "--yes" in out
    assert count(db, "runs") == 5  # a dry run changes nothing
    assert prune_cli(db, "--id", paired, "--yes") == 0  # the paired baseline alone: its cell goes with it
    assert capsys.readouterr().out.startswith(f"removed 2 runs (8 measurements) matching (id = {paired}) from {db}")
    assert count(db, "runs") == 3 and count(db, "measurements") == 18
    log = run_query("SELECT filter, runs, measurements, run_ids FROM prunes", db).iloc[0]
    assert (log["filter"], log["runs"], log["measurements"]) == (f"(id = {paired})", 2, 8)
    assert json.loads(log["run_ids"]) == sorted([cell, paired])
    assert prune_cli(db, "--host", "h1", "--where", "status = 'failed'", "--yes") == 0
    assert run_query("SELECT run_id FROM runs ORDER BY run_id", db)["run_id"].tolist() == ["run-base", "run-spec"]
    assert count(db, "measurements") == 12 and count(db, "prunes") == 2


@pytest.mark.parametrize("args, message", [
    ((), "give at least one filter"),
    (("--where", "1=1) OR (1=1"), "a ')' closes more than it opened"),
    (("--where", "true; DROP TABLE runs"), "without ';'"),
    (("--where", "(true"), "balanced parentheses"),
    (("--where", "run_id IN (SELECT * FROM read_csv('/etc/passwd'))"), "read_csv() is not allowed"),
    (("--where", "no_such_column = 1"), "no_such_column"),
])
def test_prune_refuses_bad_filters_before_removing_anything(prunable, capsys, args, message):
    db, _ = prunable
    assert prune_cli(db, *args, "--yes") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert count(db, "runs") == 5 and count(db, "measurements") == 26


def test_prune_through_the_cli_and_of_nothing(prunable, capsys):
    from specdec.cli import main as cli_main

    db, _ = prunable
    assert cli_main(["prune", "--db", str(db), "--host", "nobody", "--yes"]) == 0
    assert capsys.readouterr().out.startswith("removed 0 runs (0 measurements) matching (host = nobody)")
    assert count(db, "runs") == 5
