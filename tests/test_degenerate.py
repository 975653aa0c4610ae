"""Degenerate outputs: copy and repeat shares on scripted texts, the flag's rule, and the wiring into records,
result files and the store (older stores gain the columns). Views and the dashboard page: tests/test_dashboard.py.
"""

from __future__ import annotations

import pytest

from specdec.measure.metrics import DegenerateRule, copy_share, degeneracy, repeat_share

PROMPT = ("Translate from German to English : Eine hartnäckige Verletzung hält den Stürmer der FSV Mainz 05 "
          "vom Auswärtsspiel in Bremen fern .")


def ids(text: str, vocab: dict[str, int] = {}) -> list[int]:  # noqa: B006 (one vocabulary shared by all texts)
    """Word-level token ids: the same word gets the same id in every text."""
    return [vocab.setdefault(word, len(vocab)) for word in text.split()]


def shares(output: str, prompt: str | list[str] = PROMPT, rule: DegenerateRule = DegenerateRule()) -> dict:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    return degeneracy(ids(output), [ids(p) for p in prompts], rule)


def test_pure_copy_of_the_source_is_degenerate():
    source = PROMPT.split(": ", 1)[1]  # the German sentence, word for word (19 tokens)
    assert shares(source) == {"copy_share": 1.0, "repeat_share": 0.0, "degenerate": True}


def test_a_loop_is_degenerate():
    loop = "in der Auswärtsspiel von Mainz " * 4  # 5 words, 4 rounds: every window from the second round on repeats
    assert shares(loop) == {"copy_share": 0.0, "repeat_share": 15 / 20, "degenerate": True}


def test_the_issues_copy_then_loop_output():
    # copies the source's first 10 tokens, then loops on "in der Auswärtsspiel der FSV Mainz 05" (27 tokens)
    text = ("Eine hartnäckige Verletzung hält den Stürmer der FSV Mainz 05 in der Auswärtsspiel der FSV Mainz 05 "
            "in der Auswärtsspiel der FSV Mainz 05 in der Auswärtsspiel")
    out = shares(text)
    # copied: tokens 0-9 ("Eine ... Mainz 05") and "der FSV Mainz 05" at 13-16 and 20-23
    assert out["copy_share"] == pytest.approx(18 / 27)
    # repeated: from token 13 ("der FSV Mainz 05" a second time) to the end; the loop's first round is new text
    assert out["repeat_share"] == pytest.approx(14 / 27)
    assert out["degenerate"]  # by repetition; the copy alone (0.67) stays below 0.8


def test_normal_prose_is_not_degenerate():
    translation = ("A stubborn injury keeps the striker of FSV Mainz 05 out of the away game in Bremen . "
                   "He hopes to return next week .")
    out = shares(translation)
    # only "FSV Mainz 05" and "in Bremen" come from the source: 3-grams and shorter, so nothing copied at n = 4
    assert out == {"copy_share": 0.0, "repeat_share": 0.0, "degenerate": False}
    # at n = 3 the name "FSV Mainz 05" counts as copied: 3 of 25 tokens
    assert shares(translation, rule=DegenerateRule(ngram=3))["copy_share"] == pytest.approx(3 / 25)


def test_half_copied_answer_is_below_the_default_and_thresholds_are_inclusive():
    text = "Eine hartnäckige Verletzung hält den Stürmer that is what the sentence says"  # 6 copied of 12
    out = shares(text)
    assert out["copy_share"] == 0.5 and out["repeat_share"] == 0.0 and not out["degenerate"]
    assert shares(text, rule=DegenerateRule(copy_share=0.5))["degenerate"]  # at the threshold: flagged


def test_overlapping_repeats_and_short_outputs():
    assert shares("na na na na na")["repeat_share"] == 4 / 5  # the second window (tokens 1-4) repeats the first
    assert shares("na na na na")["repeat_share"] == 0.0
    assert shares("Eine hartnäckige Verletzung") == {"copy_share": 0.0, "repeat_share": 0.0, "degenerate": False}
    assert shares("") == {"copy_share": 0.0, "repeat_share": 0.0, "degenerate": False}


def test_a_conversation_is_judged_against_all_its_user_turns():
    turns = ["Write a short note to my neighbour about the plants .",
             "Now write it again for my landlord please ."]
    answer = "Dear landlord , now write it again for my landlord please"  # copies the second turn: 7 of 11
    out = shares(answer, turns)
    assert out["copy_share"] == pytest.approx(7 / 11)
    assert shares(answer, turns[:1])["copy_share"] == 0.0
    # an n-gram that only exists across the boundary of two turns is not in the prompt
    assert shares("plants . Now write", turns)["copy_share"] == 0.0


@pytest.mark.parametrize("values, message", [
    ({"ngrams": 4}, "degenerate: unknown key(s) ['ngrams']"),
    ({"ngram": 0}, "n-gram length must be an integer >= 1, got 0"),
    ({"repeat_share": 1.5}, "repeat_share threshold must be a number in (0, 1], got 1.5"),
    ({"copy_share": "high"}, "copy_share threshold must be a number in (0, 1], got 'high'"),
])
def test_bad_rules_are_one_line_errors(values, message):
    with pytest.raises(ValueError) as info:
        DegenerateRule.from_dict(values)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_pure_functions_agree_with_degeneracy():
    out, prompt = ids("a b c d a b c d e"), ids("x a b c d y")
    assert copy_share(out, [prompt]) == 8 / 9 and repeat_share(out) == 4 / 9


# ---------------------------------------------------------------------------------------------- wiring

NEW_COLUMNS = ("copy_share", "repeat_share", "degenerate")


def test_every_measurement_carries_the_shares_of_its_rule(prompt_file, tiny_models):
    from transformers import AutoTokenizer

    from specdec.run.job import run_cell
    from specdec.prompts import load_prompts

    rule = {"ngram": 3, "repeat_share": 0.4, "copy_share": 0.6}
    doc = run_cell({"target": "tiny-target", "strategy": "ngram", "k": 3, "prompts_file": str(prompt_file),
                    "models": tiny_models, "max_new_tokens": 16, "repeats": 1, "warmup": 0, "stop_at_eos": False,
                    "degenerate": rule})
    assert doc["run"]["status"] == "ok" and doc["run"]["params"]["degenerate"] == rule
    tok = AutoTokenizer.from_pretrained(tiny_models["tiny-target"]["path"])
    prompts = {p["id"]: [p["prompt"], *p["turns"]] for p in load_prompts(prompt_file)}
    for row in doc["measurements"]:
        # a conversation (prompt "b" has a follow-up) is judged against both user turns, without chat template
        user = [tok.encode(text, add_special_tokens=False) for text in prompts[row["prompt_id"]]]
        assert {k: row[k] for k in NEW_COLUMNS} == degeneracy(row["token_ids"], user, DegenerateRule(**rule))
    assert len(doc["measurements"][1]["token_ids"]) == 32  # both turns' answers are judged together


def test_the_workflow_hands_its_rule_to_every_cell_and_validates_it(tiny_models):
    from snakemake.utils import validate

    from test_workflow import REPO, base_config, matrix

    plain = matrix.expand_cells(base_config(tiny_models))
    assert all("degenerate" not in cell for cell in plain.values())  # no rule set: the cells keep their hashes
    rule = {"ngram": 3, "copy_share": 0.9}
    ruled = matrix.expand_cells(base_config(tiny_models, degenerate=rule))
    assert all(cell["degenerate"] == rule for cell in ruled.values())
    assert all(ruled[name]["config_hash"] != cell["config_hash"] for name, cell in plain.items())  # re-measured
    with pytest.raises(Exception) as info:
        validate(base_config(tiny_models, degenerate={"copy_share": 1.5}),
                 str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert matrix.schema_error_line(info.value) == "degenerate.copy_share: 1.5 is greater than the maximum of 1"


def test_a_bad_rule_in_a_job_is_refused_before_anything_loads(prompt_file):
    from specdec.run.job import run_job

    code = run_job({"target": "x", "strategy": "baseline", "prompts_file": str(prompt_file),
                    "degenerate": {"copy_share": 2}}, "unused.json")
    assert code == 2


def test_generate_takes_the_rule_from_flags_and_checks_it_before_loading(monkeypatch, capsys):
    import specdec.model.models
    from specdec import cli

    assert cli.DEGENERATE_DEFAULTS == DegenerateRule().to_dict()  # written out there so --help needs no torch

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(specdec.model.models, "load_model", no_loading)
    monkeypatch.setattr("specdec.run.runner.load_model", no_loading)
    assert cli.main(["generate", "--prompt", "hi", "--degenerate-copy", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "specdec: error: degenerate copy_share threshold must be a number in (0, 1], got 1.5"


def test_an_older_store_gains_the_columns_and_keeps_its_rows(tmp_path):
    import json
    from datetime import datetime

    import sqlalchemy as sa

    from dashboard_fixture import make_result
    from specdec.db.schema import Base
    from specdec.db.store import engine_for, ingest, measurement_rows, run_row

    old = sa.MetaData()  # the schema before the shares existed
    for table in Base.metadata.sorted_tables:
        sa.Table(table.name, old, *[c._copy() for c in table.columns if c.name not in NEW_COLUMNS])
    before = make_result(host="h", target="t", draft=None, strategy="ngram", k=2, alpha=0.5, repeats=1)
    for m in before["measurements"]:
        for key in NEW_COLUMNS:
            m.pop(key, None)
    db = tmp_path / "old.duckdb"
    engine = engine_for(db)
    with engine.begin() as conn:
        old.create_all(conn)
        conn.execute(sa.insert(old.tables["runs"]), [run_row(before, "old.json", datetime(2026, 1, 1))])
        conn.execute(sa.insert(old.tables["measurements"]),
                     [{k: v for k, v in r.items() if k not in NEW_COLUMNS} for r in measurement_rows(before)])
    engine.dispose()

    after = make_result(host="h", target="t", draft=None, strategy="ngram", k=2, alpha=0.5, repeats=1,
                        started="2026-11-25T00:00:00Z")
    path = tmp_path / "new.json"
    path.write_text(json.dumps(after))
    assert ingest(db, [path]).new_runs == 1
    engine = engine_for(db, read_only=True)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT r.run_id, m.copy_share, m.repeat_share, m.degenerate FROM measurements m "
                                    "JOIN runs r USING (run_id)").fetchall()
        summary = conn.exec_driver_sql("SELECT n_measurements, degenerate_share, n_clean FROM cell_summary").fetchall()
    engine.dispose()
    stored = {m["prompt_id"]: m for m in after["measurements"]}
    assert len(rows) == 2 * len(stored)
    assert {r[1:] for r in rows if r[0] == before["run"]["run_id"]} == {(None, None, None)}  # unknown, not clean
    new = [r[1:] for r in rows if r[0] == after["run"]["run_id"]]
    assert sorted(new) == sorted((m["copy_share"], m["repeat_share"], m["degenerate"]) for m in stored.values())
    flagged = sum(m["degenerate"] for m in stored.values())
    assert summary == [(2 * len(stored), flagged / len(stored), len(stored) - flagged)]


# ---------------------------------------------------------------------------------------------- views and page

from dashboard_fixture import DEGENERATE_PROMPT, build_fixture_db, make_result, write_results  # noqa: E402
from test_dashboard import fixture_db, frame_with, rounded, run_page, sql, store  # noqa: E402,F401 (fixtures)

KEY = "host, target, coalesce(draft, '') AS draft, strategy, draft_length, gpus, temperature"


def test_the_speedup_view_carries_the_flags(store):
    flags = sql(store, "SELECT prompt_id, bool_and(degenerate) AS all_, bool_or(degenerate) AS any_, "
                       "min(copy_share) AS copied FROM speedup GROUP BY prompt_id")
    assert {(r.prompt_id, r.all_, r.any_) for r in flags.itertuples()} == {
        (p, p == DEGENERATE_PROMPT, p == DEGENERATE_PROMPT) for p in ("sum-01", "sum-02", "code-01", "code-02")}
    assert flags.set_index("prompt_id").copied[DEGENERATE_PROMPT] == 1.0  # the fixture's output copies its prompt


def test_cell_summary_gives_the_figures_without_degenerate_outputs(store):
    best = sql(store, "SELECT * FROM cell_summary WHERE host = 'lab-a' AND strategy = 'speculative' "
                      "AND draft_length = 4 AND gpus = 1 AND temperature = 0").iloc[0]
    # by construction (tests/dashboard_fixture.py): one prompt of four is degenerate and it is the fastest
    assert best.degenerate_share == 0.25 and best.n_clean == 6 and best.n_measurements == 8
    assert best.speedup_median == 2.0 and best.speedup_median_clean == pytest.approx(2.0 * 0.95)
    assert best.acceptance_rate_median == pytest.approx(0.7)
    assert best.acceptance_rate_median_clean == pytest.approx(0.65)  # what is left: one summary, two code prompts
    assert best.mean_accepted_tokens_median_clean == pytest.approx(1 + 0.65 * 4 * 0.8)
    # every drafting cell: the same medians as over the rows of the other prompts
    summary = sql(store, f"SELECT {KEY}, speedup_median_clean, acceptance_rate_median_clean, "
                         f"mean_accepted_tokens_median_clean, n_clean FROM cell_summary "
                         f"WHERE acceptance_rate_median IS NOT NULL")
    direct = sql(store, f"""SELECT {KEY}, median(speedup), median(acceptance_rate), median(mean_accepted_tokens),
                                   count(*) FROM speedup
                            WHERE prompt_id <> '{DEGENERATE_PROMPT}' AND acceptance_rate IS NOT NULL GROUP BY ALL""")
    assert len(summary) == 9
    assert rounded(summary.itertuples(index=False)) == rounded(direct.itertuples(index=False))


def test_acceptance_page_shows_the_split_and_the_degenerate_outputs(store):
    at = run_page("acceptance")
    split = frame_with(at, "degenerate_share", "acceptance_rate_clean", "speedup_clean", "n_clean")
    expected = sql(store, """SELECT degenerate_share, acceptance_rate_median, acceptance_rate_median_clean,
                                    mean_accepted_tokens_median_clean, speedup_median, speedup_median_clean, n_clean
                             FROM cell_summary WHERE acceptance_rate_median IS NOT NULL""")
    shown = split[["degenerate_share", "acceptance_rate", "acceptance_rate_clean", "mean_accepted_tokens_clean",
                   "speedup", "speedup_clean", "n_clean"]]
    assert rounded(shown.itertuples(index=False)) == rounded(expected.itertuples(index=False))
    assert any("at least 50% of its tokens lie in 4-grams it already produced" in c.value for c in at.caption)
    # the heat map pairs each cell's overall figures with its non-degenerate ones
    heat = next(f for c in at.get("vega_lite_chart") for f in _frames(c) if "outputs" in f.columns)
    assert set(heat.outputs) == {"all", "non-degenerate"}

    listed = frame_with(at, "prompt_id", "copy_share", "repeat_share", "excerpt")
    flagged = sql(store, "SELECT prompt_id, copy_share, repeat_share FROM speedup WHERE degenerate")
    assert len(listed) == len(flagged) == 13 * 2  # every ok run's two repeats of the degenerate prompt
    assert rounded(listed[["prompt_id", "copy_share", "repeat_share"]].itertuples(index=False)) == \
        rounded(flagged.itertuples(index=False))
    assert set(listed.excerpt) == {f"output of {DEGENERATE_PROMPT}"}
    assert any(h.value == f"Degenerate outputs ({len(flagged)})" for h in at.subheader)
    # the by-prompt table says which prompts the flags come from
    by_prompt = frame_with(at, "prompt_id", "degenerate_share")
    assert set(by_prompt[by_prompt.degenerate_share > 0].prompt_id) == {DEGENERATE_PROMPT}


def test_acceptance_page_on_a_store_without_flags(tmp_path, monkeypatch):
    results = [make_result(host="h", target="t", draft=None, strategy=s, k=k, alpha=a, speed=1.2)
               for s, k, a in (("baseline", None, None), ("ngram", 2, 0.5))]
    for doc in results:
        for m in doc["measurements"]:
            for key in NEW_COLUMNS:
                del m[key]
    db = tmp_path / "old.duckdb"
    from specdec.db.store import ingest

    ingest(db, write_results(results, tmp_path / "results"))
    monkeypatch.setenv("SPECDEC_DB", str(db))
    at = run_page("acceptance")
    assert any("carry no degenerate flag" in i.value for i in at.info)


def _frames(chart):
    from test_dashboard import chart_frames

    return chart_frames(chart)
