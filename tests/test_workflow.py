"""The Snakemake matrix: config checks, expansion and pruning, and real end-to-end runs on tiny models.

The end-to-end tests run `snakemake` as a subprocess on the repository's Snakefile in a temporary working
directory, with tiny random models saved there, so they exercise exactly what a user runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from specdec.strategies import LOOKAHEAD_DEFAULTS


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
import matrix  # noqa: E402

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
             "--profile", str(REPO / "profiles" / "default")]


def base_config(models: dict, prompts: str = "prompts.jsonl", **overrides) -> dict:
    config = {
        "models": models,
        "pairs": [{"target": "tiny-target", "draft": "tiny-draft"}],
        "prompts": prompts,
        "strategies": ["baseline", "speculative", "ngram"],
        "draft_lengths": [2, 3],
        "gpus": [0],
        "generation": {"max_new_tokens": 12, "temperatures": [0.0], "seed": 0, "repeats": 2, "warmup": 0},
        "db": "store.duckdb",
        "tag": "t1",
        "host": "testhost",
    }
    config.update(overrides)
    return config


PROMPTS = [
    {"id": "a1", "category": "code", "prompt": "def add(a, b): return a + b"},
    {"id": "a2", "category": "repetitive", "prompt": "la la la la la la la la"},
    {"id": "a3", "category": "qa", "prompt": "what is the capital of France?"},
]


@pytest.fixture
def workdir(tmp_path, tiny_models):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return tmp_path


def write_config(workdir: Path, config: dict) -> Path:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(workdir: Path, *args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Snakemake on 2 cores with one thread per cell, so two cells of tiny models run at once (a real matrix gives
    each CPU cell every core: decode.smk's cell_threads); most of a tiny cell is its process starting."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPECDEC_GPU_LOCK_DIR": str(workdir / "locks"), **(env or {})}
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
                           "--cores", "2", "--set-threads", "run_cell=1", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def rows(db: Path, sql: str):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# --- expansion and pruning (no Snakemake, no models) ---------------------------------------------------------

def test_matrix_prunes_invalid_cells_and_shares_baselines(tiny_models):
    config = base_config(tiny_models, strategies=["baseline", "speculative", "ngram", "hf-generate"],
                         pairs=[{"target": "tiny-target", "draft": "tiny-draft"},
                                {"target": "tiny-target", "draft": "tiny-target"},
                                {"target": "tiny-draft"}],
                         gpus=[0, 2])
    config["generation"]["temperatures"] = [0.0, 0.7]
    cells = matrix.expand_cells(config)
    by_strategy = {}
    for name, cell in cells.items():
        assert cell["cell"] == name
        by_strategy.setdefault(cell["strategy"], []).append(cell)
    # baseline: no draft, no k; one per target x gpus x temperature, shared by both pairs of tiny-target
    assert all(c["draft"] is None and c["k"] is None for c in by_strategy["baseline"])
    assert len(by_strategy["baseline"]) == 2 * 2 * 2
    assert len(by_strategy["hf-generate"]) == 2 * 2 * 2
    # ngram: no draft model; per target x k x gpus x temperature
    assert all(c["draft"] is None for c in by_strategy["ngram"])
    assert len(by_strategy["ngram"]) == 2 * 2 * 2 * 2
    # speculative: only pairs with a draft (2 of 3), per k x gpus x temperature
    assert {(c["target"], c["draft"]) for c in by_strategy["speculative"]} == {
        ("tiny-target", "tiny-draft"), ("tiny-target", "tiny-target")}
    assert len(by_strategy["speculative"]) == 2 * 2 * 2 * 2
    # cell hashes identify the parameters; equal parameters never get two names
    assert len({c["config_hash"] for c in cells.values()}) == len(cells)
    # paired by default: every cell but a baseline decodes its own baseline; a baseline cell is the same job in
    # both modes, so switching modes re-runs only the cells whose measurement changes
    assert {c.get("baseline_mode") for c in cells.values() if c["strategy"] != "baseline"} == {"paired"}
    assert all("baseline_mode" not in c for c in by_strategy["baseline"])
    shared = matrix.expand_cells({**config, "baseline": "shared"})
    assert set(shared) == set(cells)
    assert {c.get("baseline_mode") for c in shared.values() if c["strategy"] != "baseline"} == {"shared"}
    assert all(shared[n] == cells[n] for n, c in cells.items() if c["strategy"] == "baseline")


def test_cell_parameters_do_not_depend_on_unrelated_config(tiny_models):
    # Adding a strategy or a model alias must not change (and so rerun) the cells that already exist.
    small = matrix.expand_cells(base_config(tiny_models))
    bigger = base_config({**tiny_models, "other": {"path": "/nowhere"}},
                         strategies=["baseline", "speculative", "ngram", "hf-ngram"])
    big = matrix.expand_cells(bigger)
    assert set(small) < set(big)
    for name, cell in small.items():
        assert big[name] == cell


def test_weight_formats_and_llamacpp_cells(tiny_models):
    """Weight formats multiply our cells (one baseline each); llama.cpp cells run the GGUF pair only, on the
    CPU, in its own format; configs without the new keys keep their cells' parameters (and so their results)."""
    config = base_config(tiny_models, pairs=[{"target": "tiny-target", "draft": "tiny-draft"},
                                             {"target": "smollm2-135m", "draft": "smollm2-135m"}],
                         strategies=["baseline", "ngram", "llamacpp-generate", "llamacpp-speculative"],
                         draft_lengths=[4], gpus=[0, 1], weights=["float32", "int8"])
    config["generation"]["threads"] = 1
    cells = matrix.expand_cells(config)
    base = [c for c in cells.values() if c["strategy"] == "baseline"]
    assert {(c["target"], c["weights"], c["gpus"]) for c in base} == {
        (t, w, g) for t in ("tiny-target", "smollm2-135m") for w in ("float32", "int8") for g in (0, 1)}
    llama = [c for c in cells.values() if c["strategy"].startswith("llamacpp-")]
    assert {(c["strategy"], c["target"], c["gpus"]) for c in llama} == {
        ("llamacpp-generate", "smollm2-135m", 0), ("llamacpp-speculative", "smollm2-135m", 0)}
    assert all("weights" not in c and c["threads"] == 1 for c in llama)
    # llama.cpp's plain decoding is a baseline cell (no pairing of its own); the others pair with it in their job
    assert {c["strategy"]: c.get("baseline_mode") for c in llama} == {"llamacpp-generate": None,
                                                                      "llamacpp-speculative": "paired"}
    assert "smollm2-135m__ngram__wint8__k4__g0__t0" in cells
    plain = matrix.expand_cells(base_config(tiny_models))
    assert all("weights" not in c and "threads" not in c for c in plain.values())


def test_train_free_cells_carry_their_own_parameters_only(tiny_models):
    config = base_config(tiny_models, strategies=["baseline", "ngram", "recycling", "suffix", "rest", "lookahead"],
                         tree_budgets=[15])
    config["generation"].update(recycle_topk=4, lookahead_window=7)
    cells = matrix.expand_cells(config)
    by_strategy = {c["strategy"]: c for c in cells.values()}
    assert by_strategy["recycling"]["recycle_topk"] == 4 and by_strategy["recycling"]["tree_budget"] == 15
    assert by_strategy["rest"]["rest_corpus"] is None
    lookahead = by_strategy["lookahead"]
    assert (lookahead["lookahead_window"], lookahead["lookahead_ngram"], lookahead["lookahead_guesses"]) == (7, 3, 3)
    assert all("recycle_topk" not in c for c in cells.values() if c["strategy"] != "recycling")
    assert all("lookahead_window" not in c for c in cells.values() if c["strategy"] != "lookahead")
    assert all(c["draft"] is None for c in cells.values())  # model-free: the pair's draft is not loaded
    # their llama.cpp strategies carry the same parameters, and only on the GGUF target
    config = base_config(tiny_models, pairs=[{"target": "tiny-target"}, {"target": "smollm2-135m"}],
                         strategies=["llamacpp-recycling", "llamacpp-rest"])
    config["generation"].update(recycle_topk=4, rest_corpus="corpus.jsonl")
    cells = matrix.expand_cells(config)
    assert {(c["strategy"], c["target"], c.get("recycle_topk"), c.get("rest_corpus")) for c in cells.values()} == {
        ("llamacpp-recycling", "smollm2-135m", 4, None), ("llamacpp-rest", "smollm2-135m", None, "corpus.jsonl")}


@pytest.mark.parametrize("change, field", [
    (lambda c: c.update(strategies=["baseline", "medusa-magic"]), "strategies: unknown strategy 'medusa-magic'"),
    (lambda c: c["pairs"].append({"target": "no-such-model"}), "pairs[1].target:"),
    (lambda c: c.update(prompts="missing.jsonl"), "prompts: prompt file 'missing.jsonl' does not exist"),
    (lambda c: c.update(pairs=[{"target": "tiny-target"}]), "strategies: speculative need a draft model"),
    (lambda c: c.update(categories=["code", "cod"]),
     "prompts: categories ['cod'] are not in the prompt file; its categories: code, repetitive, qa"),
    (lambda c: c.update(prompt_ids=["a1"], categories=["qa"]), "prompts: the selection"),
    (lambda c: c.update(db="prompts.jsonl/store.duckdb"), "db: cannot create 'prompts.jsonl/store.duckdb': "),
    (lambda c: c.update(db="."), "db: '.' is a folder, not a file"),
    (lambda c: c.update(results="prompts.jsonl"), "results: 'prompts.jsonl' is a file, not a folder"),
    (lambda c: c.update(db="/proc/specdec/store.duckdb"), "db: cannot create '/proc/specdec/store.duckdb' in '/proc'"),
    (lambda c: c.update(db="results/specdec.duckdb") or Path("db").mkdir() or Path("db/specdec.duckdb").touch(),
     "db: the store's default moved from db/specdec.duckdb to results/specdec.duckdb and yours is still at the old "
     "place; move it (mv db/specdec.duckdb* results/) or set db: db/specdec.duckdb"),
    (lambda c: c.update(strategies=["rest"]) or c["generation"].update(rest_corpus="none.txt"),
     "generation.rest_corpus: file 'none.txt' does not exist"),
    (lambda c: c.update(strategies=["llamacpp-ngram"]), "strategies: 'llamacpp-ngram' runs llama.cpp on GGUF models"),
    (lambda c: c.update(strategies=["llamacpp-generate"], gpus=[1], pairs=[{"target": "smollm2-135m"}]),
     "strategies: 'llamacpp-generate' runs llama.cpp on the CPU only"),
])
def test_semantic_config_errors_name_the_field(workdir, tiny_models, monkeypatch, change, field):
    monkeypatch.chdir(workdir)
    config = base_config(tiny_models)
    change(config)
    with pytest.raises(matrix.ConfigError) as info:
        matrix.check_config(config)
    message = str(info.value)
    assert message.startswith(field.split(":")[0]) and field in message and "\n" not in message


@pytest.mark.parametrize("change, expected", [
    (lambda c: c.update(colour="blue"), "(top level): Additional properties are not allowed ('colour' was unexpected)"),
    (lambda c: c.update(draft_lengths=[0, 2]), "draft_lengths.0: 0 is less than the minimum of 1"),
    (lambda c: c["generation"].update(max_new_tokens="many"), "generation.max_new_tokens: 'many' is not of type"),
    (lambda c: c["pairs"][0].update(drafts="x"), "pairs.0: Additional properties are not allowed"),
    (lambda c: c.update(draft_lengths=[1000000000]), "draft_lengths.0: 1000000000 is greater than the maximum of 64"),
    (lambda c: c["generation"].update(temperatures=[1e9]), "generation.temperatures.0: 1000000000.0 is greater than"),
    (lambda c: c["generation"].update(max_new_tokens=100000000),
     "generation.max_new_tokens: 100000000 is greater than the maximum of 32768"),
    (lambda c: c.update(baseline="both"), "baseline: 'both' is not one of ['paired', 'shared']"),
    (lambda c: c.update(noise={"other_cpu_cores": -1}), "noise.other_cpu_cores: -1 is less than the minimum of 0"),
    (lambda c: c.update(noise={"loud": 1}), "noise: Additional properties are not allowed ('loud' was unexpected)"),
    (lambda c: c["generation"].update(lookahead_ngram=2),
     "generation.lookahead_ngram: 2 is less than the minimum of 3"),
])
def test_schema_errors_are_one_line_naming_the_field(tiny_models, change, expected):
    from snakemake.utils import validate

    config = base_config(tiny_models)
    change(config)
    with pytest.raises(Exception) as info:
        validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    line = matrix.schema_error_line(info.value)
    assert expected in line and "\n" not in line


def test_schema_bounds_are_the_engines():
    """The config schema refuses exactly what the engine's check_settings refuses (before any job runs)."""
    from specdec.run import runner

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())["properties"]
    generation = schema["generation"]["properties"]
    assert schema["draft_lengths"]["items"]["maximum"] == runner.MAX_K
    assert generation["temperatures"]["items"]["maximum"] == runner.MAX_TEMPERATURE
    assert generation["max_new_tokens"]["maximum"] == runner.MAX_NEW_TOKENS
    for key, value in LOOKAHEAD_DEFAULTS.items():  # the documented defaults are the engine's
        assert generation[key]["default"] == value


@pytest.mark.parametrize("text, expected", [
    ("pairs:\n  - target: x\n   draft: y\n", "bad.yaml:3:4: YAML syntax error: expected <block end>, but found "
                                             "'<block mapping start>'; check this line's indentation"),
    ("pairs:\n\t- target: x\n", "bad.yaml:2:1: YAML syntax error: found character '\\t' that cannot start any "
                                "token; indent with spaces, not tabs"),
    ("- a\n- b\n", "bad.yaml: a config file is a mapping of keys"),
])
def test_yaml_errors_name_file_line_and_column(tmp_path, monkeypatch, capsys, text, expected):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(text)
    with pytest.raises(matrix.ConfigError) as info:
        matrix.load_config_file("bad.yaml")
    assert str(info.value).startswith(expected)
    # run-matrix.sh checks the files given with --configfile (Snakemake would say only "not valid JSON or YAML")
    with pytest.raises(SystemExit) as stop:
        matrix.main(["--cores", "2", "--config", "tag=x", "--configfile", "bad.yaml", "--dry-run"])
    assert stop.value.code == 1
    assert capsys.readouterr().err == f"config error: {info.value}\n"
    assert matrix.main(["--config", "configfile=bad.yaml"]) == 0  # --config is not --configfile


@pytest.mark.parametrize("path", ["config.yaml", "config/suite.yaml", "config/gpu-pythia.yaml"])
def test_the_shipped_configs_are_valid(path, monkeypatch):
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / path).read_text())
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    monkeypatch.chdir(REPO)
    prompts = matrix.check_config(config)
    cells = matrix.expand_cells(config)
    if path == "config.yaml":  # the default run must stay short on a 2-core CPU
        assert 1 <= len(prompts) <= 8 and 1 <= len(cells) <= 12


# --- Snakemake itself ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.update(draft_lengths=[0]), "config error: draft_lengths.0: 0 is less than the minimum of 1"),
    (lambda c: c.update(pairs=[{"target": "nope"}]), "config error: pairs[0].target: unknown model alias 'nope'"),
])
def test_snakemake_refuses_a_bad_config_before_any_job(workdir, tiny_models, edit, expected):
    config = base_config(tiny_models)
    edit(config)
    write_config(workdir, config)
    result = snakemake(workdir, "-n")
    assert result.returncode != 0
    # the one line, without Snakemake's wrapping (WorkflowError in file ..., File "...common.smk" lines)
    output = result.stdout + result.stderr
    assert sum(line.startswith(expected) for line in output.splitlines()) == 1
    assert "WorkflowError" not in output and "common.smk" not in output and 'File "' not in output
    assert not (workdir / "results").exists()


def test_snakemake_names_the_line_of_a_yaml_error_in_config_yaml(workdir, tiny_models):
    """The Snakefile's own config.yaml (no --configfile): a syntax error is named with file, line and column."""
    text = yaml.safe_dump(base_config(tiny_models)).replace("\ngpus:", "\ngpus: [0\n", 1)
    (workdir / "config.yaml").write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--cores", "2", "-n"], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 1
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("config error: config.yaml:") and "YAML syntax error" in errors[0]


def test_malformed_prompt_line_is_refused_by_snakemake(workdir, tiny_models):
    (workdir / "prompts.jsonl").write_text(json.dumps(PROMPTS[0]) + "\n{not json\n")
    write_config(workdir, base_config(tiny_models))
    result = snakemake(workdir, "-n")
    assert result.returncode != 0
    assert "config error: prompts: prompts.jsonl:2: not valid JSON" in result.stdout + result.stderr


def test_end_to_end_paired_rows_history_and_idempotent_ingest(workdir, tiny_models):
    config = base_config(tiny_models, report=True)  # baseline: paired, the default; the report as config.yaml has it
    write_config(workdir, config)
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    db = workdir / "store.duckdb"
    cells = matrix.expand_cells(config)
    assert len(cells) == 1 + 2 + 2  # baseline, speculative k2/k3, ngram k2/k3
    # every cell but the baseline cell also stores its paired baseline: a run of its own, linked to the cell
    n_runs = len(cells) + (len(cells) - 1)
    n_rows = n_runs * len(PROMPTS) * 2
    assert rows(db, "SELECT count(*), count(DISTINCT run_id) FROM measurements") == [(n_rows, n_runs)]
    assert rows(db, "SELECT count(*) FROM measurements WHERE status <> 'ok'") == [(0,)]
    assert rows(db, "SELECT count(*) FROM runs c JOIN runs b ON b.paired_with = c.run_id WHERE b.strategy = "
                    "'baseline' AND b.cell = c.cell AND b.host = c.host AND c.baseline_mode = 'paired'") == [(4,)]
    # every speedup of a non-baseline cell is the ratio within its pair, from the same job
    assert rows(db, "SELECT count(*), bool_and(baseline_source = 'paired'), "
                    "bool_and(abs(speedup - tokens_per_s / baseline_tokens_per_s) < 1e-9) FROM speedup "
                    "WHERE strategy <> 'baseline'") == [(4 * len(PROMPTS) * 2, True, True)]
    # noise readings on every cell, an interval on every cell summary
    assert rows(db, "SELECT count(*) FROM run_noise WHERE noisy IS NULL OR noise_samples < 2") == [(0,)]
    assert rows(db, "SELECT count(*) FROM cell_summary WHERE speedup_ci_low <= speedup_median "
                    "AND speedup_median <= speedup_ci_high") == [(len(cells),)]
    # provenance and the job's parameters are on every run
    run = rows(db, "SELECT host, git_commit IS NOT NULL, torch_version, config_hash, params_json FROM runs "
                   "WHERE strategy = 'speculative' AND k = 3")[0]
    assert run[1] and run[2] and run[3] == cells["tiny-target__tiny-draft__speculative__k3__g0__t0"]["config_hash"]
    assert json.loads(run[4])["draft"] == "tiny-draft"
    # greedy speculative output is identical to its paired baseline's, for every prompt and repeat
    assert rows(db, "SELECT count(*), bool_and(matches_baseline) FROM speedup "
                    "WHERE strategy IN ('speculative', 'ngram')") == [(8 * 3, True)]
    output = result.stdout + result.stderr
    assert "Best speedup per pair and strategy" in output and "ci_95" in output
    assert "Plain decoding per engine" in output and "plain_decoding" in output  # the baseline cell's speed
    html = workdir / "report" / "t1" / "report.html"
    assert f"Report (open it in a browser): {html.resolve()}" in output and "<svg" in html.read_text()

    # nothing to do when nothing changed: the summary is printed all the same; forcing the ingest adds no row
    idle = snakemake(workdir)
    assert idle.returncode == 0, idle.stderr[-3000:]
    assert "Best speedup per pair and strategy" in idle.stdout + idle.stderr
    assert "rule run_cell" not in idle.stdout + idle.stderr
    again = snakemake(workdir, "--forcerun", "ingest")
    assert again.returncode == 0, again.stderr[-3000:]
    assert rows(db, "SELECT count(*) FROM measurements") == [(n_rows,)]

    # a new tag measures again and appends: history is kept
    write_config(workdir, base_config(tiny_models, tag="t2", strategies=["baseline"]))
    third = snakemake(workdir)
    assert third.returncode == 0, third.stderr[-3000:]
    assert rows(db, "SELECT count(*), count(DISTINCT run_id) FROM measurements") == [
        (n_rows + len(PROMPTS) * 2, n_runs + 1)]


def test_failed_cells_are_stored_and_the_rest_of_the_matrix_runs(workdir, tiny_models):
    models = {**tiny_models, "gone": {"path": str(workdir / "no-such-model"), "dtype": "float32"}}
    config = base_config(models, pairs=[{"target": "tiny-target", "draft": "gone"}],
                         strategies=["baseline", "speculative"], draft_lengths=[2], gpus=[0, 1])
    config["generation"]["repeats"] = 1
    write_config(workdir, config)
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    db = workdir / "store.duckdb"
    by_cell = dict(rows(db, "SELECT r.cell, string_agg(DISTINCT m.status) || ' ' || coalesce(any_value(m.error), '') "
                            "FROM runs r JOIN measurements m USING (run_id) GROUP BY r.cell"))
    assert by_cell["tiny-target__baseline__g0__t0"].startswith("ok")
    # missing draft weights: every prompt is a failed row carrying the error
    assert by_cell["tiny-target__gone__speculative__k2__g0__t0"].startswith("failed")
    assert "no-such-model" in by_cell["tiny-target__gone__speculative__k2__g0__t0"]
    # a GPU cell on a machine without GPUs fails clearly instead of running on the CPU
    assert by_cell["tiny-target__baseline__g1__t0"].startswith("failed")
    assert "GPU" in by_cell["tiny-target__baseline__g1__t0"]
    assert rows(db, "SELECT count(*) FROM failures") == [(3 * len(PROMPTS),)]


def test_a_crashed_cell_is_stored_as_failed_and_retried_alone(workdir, tiny_models):
    """A cell whose process dies of SIGSEGV (simulated in its decoding): the matrix finishes, the store holds the
    other cells and the crash as failed rows naming signal, engine and frame; the next run measures only it."""
    config = base_config(tiny_models, strategies=["baseline", "ngram"], draft_lengths=[2], prompt_ids=["a1"])
    config["generation"].update(max_new_tokens=4, repeats=1)
    write_config(workdir, config)
    crashed_cell = "tiny-target__ngram__k2__g0__t0"
    result = snakemake(workdir, env={"SPECDEC_SIMULATE_CRASH": "decode:ngram"})
    assert result.returncode == 0, result.stderr[-3000:]
    db = workdir / "store.duckdb"
    by_cell = dict(rows(db, "SELECT r.cell, string_agg(DISTINCT m.status) || ' ' || coalesce(any_value(m.error), "
                            "'') FROM runs r JOIN measurements m USING (run_id) GROUP BY r.cell"))
    assert by_cell["tiny-target__baseline__g0__t0"] == "ok "
    assert by_cell[crashed_cell].startswith("failed NativeCrash: the cell's process died of SIGSEGV in engine "
                                            "specdec (ngram), at File ")
    output = result.stdout + result.stderr
    assert "Best speedup per pair and strategy" in output and "set aside 1 crashed cell result" in output
    run_dir = workdir / "results" / "t1" / "testhost"
    assert not (run_dir / "cells" / f"{crashed_cell}.json").exists()
    assert [p.name.split(".")[0] for p in (run_dir / "crashed").glob("*.json")] == [crashed_cell]

    again = snakemake(workdir)  # no crash this time: only the crashed cell runs, and is stored beside its failure
    assert again.returncode == 0, again.stderr[-3000:]
    assert rows(db, "SELECT r.cell, string_agg(m.status, ',' ORDER BY m.status) FROM runs r JOIN measurements m "
                    "USING (run_id) WHERE r.paired_with IS NULL GROUP BY r.cell ORDER BY r.cell") == [
        ("tiny-target__baseline__g0__t0", "ok"), (crashed_cell, "failed,ok")]  # the baseline cell did not rerun


def test_a_killed_run_resumes_with_only_the_missing_cells(workdir, tiny_models):
    config = base_config(tiny_models)
    config["generation"].update(max_new_tokens=24, repeats=1)
    write_config(workdir, config)
    cells_dir = workdir / "results" / "t1" / "testhost" / "cells"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
                             "--cores", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (cells_dir.exists() and any(cells_dir.glob("*.json"))):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what `kill PID` sends; Snakemake stops its running job and unlocks
    proc.wait(timeout=120)
    done_before = {p.name: p.read_text() for p in cells_dir.glob("*.json")}
    total = len(matrix.expand_cells(config))
    assert 1 <= len(done_before) < total, "the kill should land between the first and the last cell"
    assert not (workdir / "store.duckdb").exists() or rows(workdir / "store.duckdb",
                                                           "SELECT count(*) FROM measurements") == [(0,)]

    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    # cells finished before the kill were kept, not recomputed
    for name, text in done_before.items():
        assert (cells_dir / name).read_text() == text
    run_ids = {json.loads(t)["run"]["run_id"] for t in done_before.values()}
    stored = {r[0] for r in rows(workdir / "store.duckdb", "SELECT run_id FROM runs WHERE paired_with IS NULL")}
    assert run_ids <= stored and len(stored) == total
    paired = total - 1  # every cell but the baseline brought its paired baseline
    assert rows(workdir / "store.duckdb", "SELECT count(*) FROM runs WHERE paired_with IS NOT NULL") == [(paired,)]
    n = (total + paired) * len(PROMPTS)
    assert rows(workdir / "store.duckdb", "SELECT count(*), count(DISTINCT (run_id, prompt_id, \"repeat\")) "
                                          "FROM measurements") == [(n, n)]


def test_trained_drafters_are_trained_once_and_used_by_their_cells(workdir, tiny_models):
    # baseline: shared here (the other end-to-end test runs paired): the drafter cell compares with the baseline cell
    config = base_config(tiny_models, pairs=[{"target": "tiny-target", "draft": "tiny-target+eagle"}],
                         strategies=["baseline", "speculative", "hf-assisted"], draft_lengths=[3],
                         drafter_settings={"prompts_file": "prompts.jsonl", "gen_tokens": 16, "vocab": 40,
                                           "epochs": 4, "budget_minutes": 1}, baseline="shared")
    config["generation"]["repeats"] = 1
    write_config(workdir, config)
    cells = matrix.expand_cells(config)
    # hf-assisted cannot drive a drafter specdec trained itself: pruned, not run
    assert sorted(c["strategy"] for c in cells.values()) == ["baseline", "speculative"]
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = list((workdir / "results" / "drafters").glob("tiny-target+eagle-*/drafter.json"))
    assert len(folders) == 1
    db = workdir / "store.duckdb"
    assert rows(db, "SELECT count(*), bool_and(matches_baseline), bool_and(baseline_source = 'shared') FROM speedup "
                    "WHERE strategy = 'speculative'") == [(len(PROMPTS), True, True)]
    assert rows(db, "SELECT count(*) FROM runs WHERE paired_with IS NOT NULL") == [(0,)]
    assert rows(db, "SELECT count(*) FROM speedup WHERE strategy = 'speculative' AND acceptance_rate IS NULL") == [
        (0,)]
    # nothing changed: the drafter is not trained again
    trained_at = folders[0].stat().st_mtime
    again = snakemake(workdir)
    assert again.returncode == 0 and folders[0].stat().st_mtime == trained_at


def test_a_drafter_that_gpu_cells_use_trains_on_a_gpu(workdir, tiny_models):
    config = base_config(tiny_models, pairs=[{"target": "tiny-target", "draft": "tiny-target+eagle"}],
                         strategies=["speculative"], draft_lengths=[3],
                         drafter_settings={"prompts_file": "prompts.jsonl", "gen_tokens": 16})
    for gpus, expected in (([0], False), ([0, 1], True)):
        config["gpus"] = gpus
        write_config(workdir, config)
        result = snakemake(workdir, "-n", "-p")
        assert result.returncode == 0, result.stderr[-3000:]
        train_job = result.stdout[result.stdout.index("rule train_drafter"):]
        train_job = train_job[:train_job.index("rule run_cell")] if "rule run_cell" in train_job else train_job
        assert ("--device auto" in train_job) is expected, train_job
        assert ("gpu=1" in train_job) is expected, train_job


def test_a_drafter_for_another_target_is_a_config_error(tiny_models):
    config = base_config(tiny_models, pairs=[{"target": "tiny-target", "draft": "tiny-draft+eagle"}])
    with pytest.raises(matrix.ConfigError, match=r"pairs\[0\]\.draft: drafter 'tiny-draft\+eagle' is trained for "
                                                  r"target 'tiny-draft', not 'tiny-target'"):
        matrix.check_config(config)


def test_matrix_check_runs_as_run_matrix_sh_calls_it(tmp_path):
    """run-matrix.sh runs `python workflow/matrix.py` as a script (sys.path[0] = workflow/, no repository root):
    every import must resolve through the installed package, and a bad --configfile is named on stderr."""
    (tmp_path / "bad.yaml").write_text("- a\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(REPO / "workflow" / "matrix.py"), "--configfile",
                          str(tmp_path / "bad.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(f"config error: {tmp_path / 'bad.yaml'}: a config file is a mapping of keys")


def test_batch_sizes_run_end_to_end_into_the_store_and_the_report(workdir, tiny_models):
    """batch_sizes [1, 3]: every cell of ours at both sizes, each with its paired baseline at its own size; the
    store keeps the batch size and each batch's throughput; `specdec report` draws speedup vs batch size."""
    config = base_config(tiny_models, strategies=["baseline", "ngram"], draft_lengths=[3], batch_sizes=[1, 3])
    config["generation"]["repeats"] = 1
    write_config(workdir, config)
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    db = workdir / "store.duckdb"
    assert sorted(matrix.expand_cells(config)) == ["tiny-target__baseline__g0__t0", "tiny-target__baseline__g0__t0__B3",
                                                   "tiny-target__ngram__k3__g0__t0",
                                                   "tiny-target__ngram__k3__g0__t0__B3"]
    assert rows(db, "SELECT batch_size, count(*) FROM speedup WHERE strategy = 'ngram' GROUP BY 1 ORDER BY 1") == [
        (1, 3), (3, 3)]
    assert rows(db, "SELECT count(*), bool_and(baseline_source = 'paired'), bool_and(matches_baseline) FROM speedup "
                    "WHERE strategy = 'ngram' AND batch_size = 3") == [(3, True, True)]
    assert rows(db, "SELECT count(*), bool_and(throughput_speedup > 0) FROM batch_throughput "
                    "WHERE strategy = 'ngram'") == [(1, True)]
    out = workdir / "report"
    done = subprocess.run([sys.executable, "-m", "specdec.cli", "report", "--db", str(db), "--out", str(out)],
                          capture_output=True, text=True, cwd=workdir, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "speedup-vs-batch-size.svg").is_file()
    assert "Speedup vs batch size" in (out / "report.html").read_text()


# --- NaN and infinities ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_text, field", [
    ("generation:\n  temperatures: [.nan]\n", "generation.temperatures.0: must be a finite number, got nan"),
    ("noise: {other_cpu_cores: .nan}\n", "noise.other_cpu_cores: must be a finite number, got nan"),
    ("generation:\n  top_p: .nan\n", "generation.top_p: must be a finite number, got nan"),
    ("degenerate: {repeat_share: .nan}\n", "degenerate.repeat_share: must be a finite number, got nan"),
    ("prices: {cpu: .inf}\n", "prices.cpu: must be a finite number, got inf"),
    ("prices: {cpu: -.inf}\n", "prices.cpu: must be a finite number, got -inf"),
])
def test_nan_and_infinities_are_refused_by_the_loader_and_the_check(tmp_path, monkeypatch, capsys, yaml_text, field):
    """JSON Schema's bounds let NaN through (every comparison with it is false): `temperatures: [.nan]` used to
    decode and then fail every ingest; `other_cpu_cores: .nan` silently turned noise detection off."""
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(yaml_text)
    with pytest.raises(matrix.ConfigError, match=f"^bad.yaml: {field}$".replace(".", r"\.")):
        matrix.load_config_file("bad.yaml")
    with pytest.raises(SystemExit) as stop:  # run-matrix.sh's first command
        matrix.main(["--configfile", "bad.yaml"])
    assert stop.value.code == 1 and capsys.readouterr().err == f"config error: bad.yaml: {field}\n"
    config = base_config({})  # Snakemake's own reading of the config (common.smk) refuses it too
    config.update(yaml.safe_load(yaml_text))
    with pytest.raises(matrix.ConfigError, match=field.split(":")[0]):
        matrix.validate_config(config)


def test_run_matrix_first_command_checks_values_not_only_syntax(tmp_path, tiny_models):
    """`python workflow/matrix.py --configfile x.yaml` validates config.yaml merged with x.yaml against the
    schema: one line and exit 1 for a bad value (it returned 0 for every config with valid YAML)."""
    write_config(tmp_path, base_config(tiny_models))
    (tmp_path / "x.yaml").write_text("draft_lengths: [0]\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = str(REPO / "workflow" / "matrix.py")
    out = subprocess.run([sys.executable, script, "--configfile", "x.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr == "config error: draft_lengths.0: 0 is less than the minimum of 1\n"
    (tmp_path / "x.yaml").write_text("draft_lengths: [2]\n")
    out = subprocess.run([sys.executable, script, "--configfile", "x.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
