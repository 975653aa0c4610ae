"""Prompt files in both forms: specdec's own (id/prompt/turns) and Spec-Bench / MT-Bench question files
(question_id/category/turns), with Spec-Bench's multi-turn grouping and one-line errors naming file and line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from specdec.cli import main as cli_main
from specdec.run.job import run_cell
from specdec.prompts import MT_BENCH_CATEGORIES, MULTI_TURN, PromptFileError, load_prompts, select

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SPEC_BENCH = DATA / "spec_bench_question.jsonl"
MT_BENCH = DATA / "mt_bench_question.jsonl"


def test_spec_bench_file_loads_as_it_is_with_mt_bench_rows_grouped():
    rows = [json.loads(line) for line in SPEC_BENCH.read_text().splitlines()]
    prompts = load_prompts(SPEC_BENCH)
    assert [p["id"] for p in prompts] == [str(r["question_id"]) for r in rows]  # ids as strings, file order
    for p, r in zip(prompts, rows):
        assert p["prompt"] == r["turns"][0] and p["turns"] == r["turns"][1:]
        if r["category"] in MT_BENCH_CATEGORIES:  # Spec-Bench's "multi-turn conversation" task
            assert p["category"] == MULTI_TURN and p["subcategory"] == r["category"]
        else:
            assert p["category"] == r["category"] and "subcategory" not in p
    assert [p["category"] for p in prompts] == [MULTI_TURN, MULTI_TURN, "translation", "summarization", "qa",
                                               "math_reasoning", "rag"]
    assert len(prompts[0]["turns"]) == 1  # the second MT-Bench turn is asked after the model's first answer


def test_mt_bench_file_keeps_its_eight_categories():
    prompts = load_prompts(MT_BENCH)
    assert [(p["id"], p["category"]) for p in prompts] == [("81", "writing"), ("111", "math"), ("121", "coding")]
    assert all(len(p["turns"]) == 1 and "subcategory" not in p for p in prompts)


def test_select_by_group_or_subcategory():
    prompts = load_prompts(SPEC_BENCH)
    assert [p["id"] for p in select(prompts, categories=[MULTI_TURN])] == ["81", "82"]
    assert [p["id"] for p in select(prompts, categories=["math"])] == ["82"]
    assert [p["id"] for p in select(prompts, per_category=1)] == ["81", "161", "241", "321", "401", "481"]


OWN = '{"id": "ok", "category": "qa", "prompt": "fine"}'
QUESTION = '{"question_id": 1, "category": "qa", "turns": ["Fine?"]}'


@pytest.mark.parametrize("first, line, message", [(OWN, line, message) for line, message in [
    ('{"id": "x", "category": "qa"}', "'prompt' must be a non-empty string"),
    ('{"id": "x", "category": "qa", "prompt": "p"', "not valid JSON"),
    ('{"id": "x", "category": "qa", "prompt": "p", "colour": 1}', "unknown key(s) ['colour']"),
    ('{"id": "ok", "category": "qa", "prompt": "again"}', "duplicate prompt id 'ok' (first on line 1)"),
    ('{"question_id": 2, "category": "qa", "turns": ["y"]}', "mixes the two prompt file forms"),
]] + [(QUESTION, line, message) for line, message in [
    ('{"question_id": 2, "category": "qa", "turns": []}', "'turns' must be a non-empty list of non-empty strings"),
    ('{"question_id": 2, "category": "qa", "turns": "Why?"}', "'turns' must be a non-empty list"),
    ('{"question_id": 2, "category": "qa", "turns": ["Why?", ""]}', "'turns' must be a non-empty list"),
    ('{"question_id": null, "category": "qa", "turns": ["Why?"]}', "'question_id' must be an integer or a non-empty"),
    ('{"question_id": true, "category": "qa", "turns": ["Why?"]}', "'question_id' must be an integer"),
    ('{"question_id": 2, "turns": ["Why?"]}', "'category' must be a non-empty string"),
    ('{"question_id": 2, "category": "qa", "turns": ["Why?"], "answer": "x"}',
     "unknown key(s) ['answer'] in a question file"),
    ('{"question_id": 1, "category": "qa", "turns": ["Again?"]}', "duplicate prompt id '1' (first on line 1)"),
    ('{"id": "x", "category": "qa", "prompt": "p"}', "mixes the two prompt file forms"),
    ('{"question_id": 2, "category": "qa", "turns": ["Why?"]', "not valid JSON"),
]])
def test_malformed_prompt_file_gives_one_line_naming_file_and_line(tmp_path, first, line, message):
    path = tmp_path / "question.jsonl"
    path.write_text(first + "\n" + line + "\n")
    with pytest.raises(PromptFileError) as err:
        load_prompts(path)
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and "\n" not in text
    assert message in text


def test_the_shipped_prompt_suite_is_valid():
    root = Path(__file__).parent.parent / "prompts"
    suite = load_prompts(root / "suite.jsonl")
    per_category = {}
    for p in suite:
        per_category[p["category"]] = per_category.get(p["category"], 0) + 1
    assert len(per_category) >= 8 and min(per_category.values()) >= 8
    training = load_prompts(root / "training.jsonl")
    assert not {p["prompt"] for p in suite} & {p["prompt"] for p in training}


def test_generate_takes_a_question_file_with_its_turns(tiny_models, tmp_path, capsys):
    """`specdec generate --prompt-file question.jsonl --prompt-id 82` decodes both turns of that question (the
    record sums over turns), and a missing id is a one-line error before any model loads."""
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(tiny_models))
    base = ["--models", str(models), "generate", "--target", "tiny-target", "--device", "cpu",
            "--max-new-tokens", "4", "--ignore-eos", "--warmup", "0", "--json", "--prompt-file", str(SPEC_BENCH)]
    assert cli_main(base + ["--prompt-id", "82"]) == 0
    two_turns = json.loads(capsys.readouterr().out)
    assert cli_main(base + ["--prompt-id", "161"]) == 0
    one_turn = json.loads(capsys.readouterr().out)
    assert two_turns["new_tokens"] == 8 and one_turn["new_tokens"] == 4
    assert cli_main(base + ["--prompt-id", "999"]) == 2
    err = capsys.readouterr().err.strip()
    assert "999" in err and "not in the prompt file" in err and "\n" not in err


def test_the_spec_bench_config_is_valid_once_the_file_is_fetched(tmp_path, monkeypatch):
    """config/spec-bench.yaml names the file where its comment downloads it; missing, that is a one-line error."""
    from snakemake.utils import validate

    sys.path.insert(0, str(REPO / "workflow"))
    import matrix

    config = yaml.safe_load((REPO / "config" / "spec-bench.yaml").read_text())
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert config["prompts"] == "data/spec_bench/question.jsonl" and config["tag"] == "spec-bench"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(matrix.ConfigError, match="prompt file 'data/spec_bench/question.jsonl' does not exist"):
        matrix.check_config(config)
    monkeypatch.chdir(REPO)
    prompts = matrix.check_config({**config, "prompts": str(SPEC_BENCH)})
    assert [p["category"] for p in prompts].count(MULTI_TURN) == 2 and len(prompts) == 7


def test_a_workflow_cell_runs_a_question_file(tiny_models):
    """`prompts: question.jsonl` in the workflow: the config check selects by Spec-Bench's grouping, and a cell
    stores one row per question under its string id and grouped category, two-turn questions decoding twice."""
    sys.path.insert(0, str(REPO / "workflow"))
    import matrix
    from test_workflow import base_config

    config = base_config(tiny_models, prompts=str(SPEC_BENCH), categories=[MULTI_TURN])
    assert [p["id"] for p in matrix.check_config(config)] == ["81", "82"]
    doc = run_cell({"target": "tiny-target", "strategy": "baseline", "prompts_file": str(SPEC_BENCH),
                    "models": tiny_models, "max_new_tokens": 3, "repeats": 1, "warmup": 0, "stop_at_eos": False})
    rows = {m["prompt_id"]: m for m in doc["measurements"]}
    assert list(rows) == ["81", "82", "161", "241", "321", "401", "481"]
    assert all(m["status"] == "ok" for m in rows.values())
    assert rows["81"]["category"] == MULTI_TURN and rows["161"]["category"] == "translation"
    assert rows["81"]["new_tokens"] == 6 and rows["161"]["new_tokens"] == 3  # both turns of an MT-Bench question
