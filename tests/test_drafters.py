"""Trained drafters: names and folders, training on a tiny model, save/load, greedy losslessness of chains and
trees with EAGLE and Medusa drafters, and running them as workflow cells."""

from __future__ import annotations

import json
import os
import shutil
import time
import types

import pytest
import torch
import yaml

from specdec.cli import main as cli_main
from specdec.model.decoding import DecodeSettings, baseline_decode
from specdec.methods.drafters import (DrafterError, DrafterSettings, attach, drafter_dir, find_drafter, load_drafter,
                              new_module, parse_alias)
from specdec.run.job import run_cell
from specdec.model.models import load_model, load_registry
from specdec.run.runner import SettingsError, check_settings, decode_models, load_pair
from specdec.methods.train import generate_sequences, train, train_drafter
from tiny import EOS, prompts, save_tiny_pair, tiny_target

SMALL = DrafterSettings(gen_tokens=20, vocab=40, epochs=12, batch_size=4, lr=3e-3, val_every=4, budget_minutes=2)


def test_alias_and_folder_naming(monkeypatch, tmp_path):
    assert parse_alias("smollm2-135m+eagle") == ("smollm2-135m", "eagle")
    assert parse_alias("smollm2-135m") is None and parse_alias(None) is None
    with pytest.raises(DrafterError, match="kind one of"):
        parse_alias("smollm2-135m+hydra")
    monkeypatch.delenv("SPECDEC_DRAFTERS_DIR", raising=False)
    folder = drafter_dir("smollm2-135m", "eagle")
    assert folder.parent.as_posix() == "results/drafters" and folder.name.startswith("smollm2-135m+eagle-")
    assert drafter_dir("smollm2-135m", "eagle", {}) == folder  # same settings, same folder
    assert drafter_dir("smollm2-135m", "eagle", {"vocab": 4096}) != folder
    assert drafter_dir("smollm2-135m", "medusa") != folder
    monkeypatch.setenv("SPECDEC_DRAFTERS_DIR", str(tmp_path))
    assert drafter_dir("smollm2-135m", "eagle").parent == tmp_path
    with pytest.raises(DrafterError, match="unknown drafter setting"):
        drafter_dir("smollm2-135m", "eagle", {"lerning_rate": 1})
    # the training prompts' contents are part of the name: an edited file means a new drafter
    prompts = tmp_path / "train.jsonl"
    prompts.write_text('{"id": "a", "category": "qa", "prompt": "Why is the sky blue?"}\n')
    before = drafter_dir("smollm2-135m", "eagle", {"prompts_file": str(prompts)})
    assert drafter_dir("smollm2-135m", "eagle", {"prompts_file": str(prompts)}) == before
    prompts.write_text('{"id": "a", "category": "qa", "prompt": "Why is the sea blue?"}\n')
    assert drafter_dir("smollm2-135m", "eagle", {"prompts_file": str(prompts)}) != before


@pytest.mark.parametrize("strategy, draft, sampling, message", [
    ("hf-assisted", "smollm2-135m+eagle", "greedy", "cannot use the trained drafter"),
    ("speculative", "pythia-70m+eagle", "greedy", "is trained for target 'pythia-70m'"),
    ("tree", "smollm2-135m+medusa", "sample", "draft_sampling greedy"),
    ("speculative", "smollm2-135m+lookahead", "greedy", "kind one of"),
    ("tree", None, "greedy", "needs a draft model"),
])
def test_drafter_settings_errors(strategy, draft, sampling, message):
    s = DecodeSettings(k=4, draft_sampling=sampling)
    with pytest.raises(SettingsError, match=message):
        check_settings(strategy, draft, s, load_registry(), "smollm2-135m")


def test_untrained_drafter_names_the_command_that_trains_it(tmp_path):
    with pytest.raises(DrafterError, match=r"specdec train-drafter --target smollm2-135m --kind medusa"):
        load_pair("smollm2-135m", "smollm2-135m+medusa", load_registry(), drafters_dir=tmp_path)


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    models = save_tiny_pair(root / "models")
    prompt_file = root / "train.jsonl"
    texts = ["hello there, how are you?", "count: one two three four", "la la la la la", "abc abc abc abc",
             "the quick brown fox", "a b c d e f g", "please repeat: xyz xyz", "tell me a story"]
    prompt_file.write_text("".join(json.dumps({"id": f"t{i}", "category": "qa", "prompt": t}) + "\n"
                                   for i, t in enumerate(texts)))
    return {"root": root, "models": models, "prompts": prompt_file,
            "settings": DrafterSettings(**{**SMALL.__dict__, "prompts_file": str(prompt_file)})}


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_training_lowers_the_loss_and_round_trips(tiny_env, kind):
    loaded = load_model(load_registry(tiny_env["models"])["tiny-target"])
    folder = train_drafter(loaded, kind, tiny_env["settings"], tiny_env["root"])
    meta = json.loads((folder / "drafter.json").read_text())
    training = meta["training"]
    # the same training prompts scored before and after (medusa's floor is the random target's high entropy)
    assert training["loss_after"] < training["loss_before"] - (0.5 if kind == "eagle" else 0.2)
    settings = tiny_env["settings"]
    assert len(training["val_top1_by_depth"]) == (settings.unroll if kind == "eagle" else settings.heads)
    assert meta["target"] == "tiny-target" and meta["settings"]["vocab"] == 40 and training["head_rows"] == 40
    assert folder == drafter_dir("tiny-target", kind, tiny_env["settings"], tiny_env["root"])
    # the saved drafter gives the trained module's outputs
    loaded_drafter = load_drafter(folder, loaded.model)
    assert loaded_drafter.kind == kind
    fresh = new_module(kind, loaded.model, None, 4)
    saved = load_drafter(folder, loaded.model).module.state_dict()
    assert set(saved) == set(fresh.state_dict())
    feats = torch.randn(1, 5, loaded.model.config.hidden_size)
    if kind == "eagle":
        emb = torch.randn(1, 5, loaded.model.config.hidden_size)
        out = loaded_drafter.module(emb, feats, torch.arange(5))[0]
        assert not torch.allclose(out, fresh(emb, feats, torch.arange(5))[0])
    # a second call finds the trained drafter instead of training again
    assert train_drafter(loaded, kind, tiny_env["settings"], tiny_env["root"]) == folder
    assert find_drafter(f"tiny-target+{kind}", tiny_env["root"], tiny_env["settings"]) == folder


@pytest.fixture(scope="module")
def float64_drafters():
    """EAGLE and Medusa drafters briefly trained on a float64 tiny target (float64 keeps greedy identity a test of
    the algorithm rather than of rounding)."""
    target = tiny_target()
    loaded = types.SimpleNamespace(model=target, eos_token_ids=[EOS])
    ps = prompts(12, seed=11)
    seqs, feats = generate_sequences(loaded, ps, 24)
    data = {"tokens": [torch.tensor(s) for s in seqs], "feats": feats, "prompt_lengths": [len(p) for p in ps]}
    settings = DrafterSettings(vocab=0, epochs=15, batch_size=4, lr=3e-3, val_every=6)
    out = {}
    for kind in ("eagle", "medusa"):
        drafter, _ = train(kind, loaded, settings, data, deadline=float("inf"))
        out[kind] = attach(kind, drafter.module.eval().requires_grad_(False), target)
    return target, out


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
@pytest.mark.parametrize("strategy", ["speculative", "tree", "speculative-heuristic", "speculative-confidence"])
def test_greedy_trained_drafters_match_baseline(float64_drafters, kind, strategy):
    target, drafters = float64_drafters
    accepted = 0
    for p in prompts(4, seed=13):
        for k in (2, 4):
            s = DecodeSettings(max_new_tokens=24, k=k)
            base = baseline_decode(target, p, s, {EOS}).tokens
            trace = decode_models(strategy, target, p, s, {EOS}, drafter=drafters[kind])
            assert trace.tokens == base, f"{kind} {strategy} k={k}"
            accepted += sum(trace.accepted_per_position)
    assert accepted > 0  # the drafters propose something the target takes: both paths run


def test_trained_drafters_as_workflow_cells(tiny_env, tmp_path):
    """`specdec train-drafter` through the CLI, then cells that name `tiny-target+eagle` / `+medusa`."""
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump(tiny_env["models"]))
    s = tiny_env["settings"]
    argv = ["--models", str(models_file), "train-drafter", "--target", "tiny-target", "--kind", "eagle",
            "--drafters-dir", str(tiny_env["root"]), "--prompts-file", s.prompts_file, "--gen-tokens",
            str(s.gen_tokens), "--vocab", str(s.vocab), "--epochs", str(s.epochs), "--budget-minutes", "2",
            "--device", "auto"]  # no GPU here: auto trains on the CPU
    settings = {"prompts_file": s.prompts_file, "gen_tokens": s.gen_tokens, "vocab": s.vocab, "epochs": s.epochs,
                "budget_minutes": 2.0}
    assert cli_main(argv) == 0
    expected = drafter_dir("tiny-target", "eagle", settings, tiny_env["root"])  # CLI flags over the defaults
    assert (expected / "drafter.json").is_file()
    for kind in ("eagle", "medusa"):
        if kind == "medusa":
            assert cli_main(argv[:6] + ["medusa"] + argv[7:]) == 0
        job = {"target": "tiny-target", "draft": f"tiny-target+{kind}", "prompts_file": str(tiny_env["prompts"]),
               "models": tiny_env["models"], "max_new_tokens": 10, "repeats": 1, "warmup": 1, "k": 3,
               "stop_at_eos": False, "prompt_ids": ["t0", "t2"], "drafters_dir": str(tiny_env["root"]),
               "drafter_settings": settings}
        for strategy in ("speculative", "tree", "speculative-heuristic"):
            doc = run_cell({**job, "strategy": strategy})
            assert doc["run"]["status"] == "ok", doc["run"]["error"]
            assert doc["run"]["params"]["draft_source"].startswith("drafter:")
            for row in doc["measurements"]:
                assert row["status"] == "ok" and row["new_tokens"] == 10
                for key in ("acceptance_rate", "mean_accepted_tokens", "draft_s", "verify_s", "cost_ratio_c",
                            "proposed_per_position", "accepted_per_position"):
                    assert row[key] is not None, key
    missing = run_cell({**job, "drafter_settings": {"vocab": 7}, "strategy": "tree"})
    assert missing["run"]["status"] == "failed"
    assert "specdec train-drafter --target tiny-target --kind medusa" in missing["run"]["error"]


def test_a_drafter_is_found_by_its_name_whatever_its_training_settings(tiny_env, tmp_path, capsys):
    """`train-drafter --budget-minutes 10` then `generate --draft T+eagle`: the name is the most recently trained
    drafter of that target and kind, not only the one with the default settings (whose folder may not exist)."""
    loaded = load_model(load_registry(tiny_env["models"])["tiny-target"])
    trained = train_drafter(loaded, "eagle", tiny_env["settings"], tiny_env["root"])  # cached by an earlier test
    root = tmp_path / "drafters"
    older, newer = root / "tiny-target+eagle-0000000000", root / "tiny-target+eagle-ffffffffff"
    shutil.copytree(trained, older)
    shutil.copytree(trained, newer)
    os.utime(older / "drafter.json", (1, 1))  # trained long ago
    shutil.copytree(trained, root / "tiny-target+eagle-extra-0000000000")  # another alias' folder: never matched
    assert find_drafter("tiny-target+eagle", root, latest=True) == newer
    with pytest.raises(DrafterError, match="not trained yet"):  # exact settings (the workflow's lookup) stay exact
        find_drafter("tiny-target+eagle", root)
    with pytest.raises(DrafterError, match=r"no .*tiny-target\+medusa-\*/drafter.json"):
        find_drafter("tiny-target+medusa", root, latest=True)
    assert find_drafter("tiny-target+eagle", older) == older  # a drafter's own folder, named directly
    with pytest.raises(DrafterError, match="holds the drafter 'tiny-target\\+eagle', not 'tiny-target\\+medusa'"):
        find_drafter("tiny-target+medusa", older)
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump(tiny_env["models"]))
    argv = ["--models", str(models_file), "generate", "--target", "tiny-target", "--draft", "tiny-target+eagle",
            "--strategy", "speculative", "--k", "2", "--max-new-tokens", "4", "--warmup", "0", "--prompt", "la la",
            "--device", "cpu", "--json"]
    assert cli_main(argv + ["--drafters-dir", str(root)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["drafter_dir"] == str(newer) and str(newer) in err
    assert cli_main(argv + ["--drafters-dir", str(older)]) == 0
    assert json.loads(capsys.readouterr().out)["drafter_dir"] == str(older)


def test_budget_counts_from_the_start_of_the_command(tiny_env, tmp_path, monkeypatch):
    """The budget covers loading and data generation too: a command that started an hour ago with a 2-minute
    budget trains no step once the data is ready (with MIN_TRAIN_S, the floor after data generation, at 0)."""
    from specdec.methods import train as train_module

    monkeypatch.setattr(train_module, "MIN_TRAIN_S", 0)
    loaded = load_model(load_registry(tiny_env["models"])["tiny-target"])
    folder = train_drafter(loaded, "medusa", tiny_env["settings"], tiny_env["root"], out=tmp_path / "late",
                           started=time.perf_counter() - 3600)
    training = json.loads((folder / "drafter.json").read_text())["training"]
    assert training["stopped"] == "budget" and training["steps"] == 0
    on_time = train_drafter(loaded, "medusa", tiny_env["settings"], tiny_env["root"], out=tmp_path / "on-time",
                            started=time.perf_counter())
    assert json.loads((on_time / "drafter.json").read_text())["training"]["stopped"] == "epochs"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_train_drafter_on_a_missing_gpu_is_a_one_line_error(tmp_path, capsys):
    code = cli_main(["train-drafter", "--target", "smollm2-135m", "--kind", "eagle", "--device", "cuda",
                     "--drafters-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "device 'cuda' requested but no CUDA GPU is visible" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_bench_runs_trained_drafters_beside_the_baseline(tiny_env, capsys, tmp_path):
    from specdec.run import bench

    loaded = load_model(load_registry(tiny_env["models"])["tiny-target"])
    quick = DrafterSettings(**{**tiny_env["settings"].__dict__, "epochs": 2})
    # bench looks drafters up under the default settings' folder: put a quickly trained one there
    train_drafter(loaded, "eagle", quick, tmp_path, out=drafter_dir("tiny-target", "eagle", None, tmp_path))
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump(tiny_env["models"]))
    code = bench.main(["--models", str(models_file), "--target", "tiny-target", "--prompts", str(tiny_env["prompts"]),
                       "--prompt-ids", "t0,t3", "--draft", "tiny-target+eagle", "--drafters-dir", str(tmp_path),
                       "--runners", "baseline,speculative,tree,hf-assisted", "--k", "3", "--max-new-tokens", "8",
                       "--ignore-eos", "--repeats", "1", "--warmup", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    folder = drafter_dir("tiny-target", "eagle", None, tmp_path)
    assert f"specdec bench: drafter 'tiny-target+eagle': {folder}" in err  # which drafter the name meant
    result = json.loads(out.strip().splitlines()[-1])
    cells = ["baseline", "speculative@tiny-target+eagle", "tree@tiny-target+eagle"]  # hf-assisted cannot use it
    assert list(result["tokens_per_s"]) == cells
    for name in cells[1:]:
        assert result["identical_to_baseline"][name] == 1.0
        assert len(result["acceptance_by_position"][name]) == 3  # k = 3 draft positions (tree: depths)
        assert result["leviathan"][name]["predicted"] > 0
        memory = result["memory"][name]
        assert "error" not in memory and memory["peak_bytes"] > memory["weights_bytes"] > 0
    code = bench.main(["--models", str(models_file), "--target", "tiny-target", "--draft", "tiny-target+medusa",
                       "--drafters-dir", str(tmp_path)])
    assert code == 2 and "specdec train-drafter --target tiny-target --kind medusa" in capsys.readouterr().err
