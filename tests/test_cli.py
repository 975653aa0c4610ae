"""The `specdec` command line, including the real embedded SmolLM2 model end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

import specdec.model.models
from specdec.cli import main
from specdec.model.models import ModelError, load_model, load_registry, resolve
from tiny import CHARS, save_tiny_pair

SUMMARY_PROMPT = ("Summarise in one sentence: The Amazon rainforest covers about 5.5 million square kilometres "
                  "across nine countries, and Brazil holds about 60 percent of it.")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "specdec.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("argv, message", [
    (["--target", "no-such-model"], "unknown model alias 'no-such-model'"),
    (["--strategy", "beam"], "unknown strategy 'beam'"),
    (["--strategy", "ngram", "--k", "0"], "draft length k must be an integer from 1 to 64"),
    (["--strategy", "baseline", "--k", "0"], "draft length k must be an integer from 1 to 64, got 0"),
    (["--strategy", "ngram", "--k", "1000000000"], "draft length k must be an integer from 1 to 64"),
    (["--temperature", "-0.5"], "temperature must be from 0 (greedy) to 2"),
    (["--temperature", "1e9"], "temperature must be from 0 (greedy) to 2, got 1000000000.0"),
    (["--temperature", "nan"], "temperature must be from 0 (greedy) to 2, got nan"),
    (["--max-new-tokens", "100000000"], "max-new-tokens must be from 1 to 32768, got 100000000"),
    (["--strategy", "ngram", "--draft", "smollm2-135m"], "uses no draft model"),
    (["--strategy", "speculative"], "needs a draft model"),
    (["--strategy", "hf-assisted"], "needs a draft model"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
])
def test_bad_arguments_fail_in_one_line_before_any_model_loads(argv, message, monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(specdec.model.models, "load_model", no_loading)
    monkeypatch.setattr("specdec.run.runner.load_model", no_loading)
    assert main(["generate", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("specdec: error:")


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing.jsonl", "prompt file '{path}' does not exist (--prompt-file)"),
    (lambda tmp: tmp, "cannot read prompt file '{path}' (--prompt-file): Is a directory"),
    (lambda tmp: (tmp / "latin1.txt", (tmp / "latin1.txt").write_bytes(b"caf\xe9"))[0],
     "prompt file '{path}' is not UTF-8 text (--prompt-file)"),
])
def test_unreadable_prompt_file_is_one_line_naming_it(make, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("specdec.run.runner.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    path = make(tmp_path)
    assert main(["generate", "--prompt-file", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"specdec: error: {message.format(path=path)}"


def test_hub_alias_offline_says_weights_are_missing_and_how_to_point_at_a_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(ModelError) as err:
        load_model(resolve("pythia-70m", load_registry()))
    text = str(err.value)
    assert "weights for model 'pythia-70m' are not available here" in text
    assert "point the alias at a local copy" in text and "\n" not in text


def test_models_lists_aliases_and_availability(tmp_path):
    out = run_cli("models", "--json", env={"HF_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    rows = {r["alias"]: r for r in json.loads(out.stdout)}
    assert rows["smollm2-135m"]["available"] is True
    assert rows["pythia-1.4b"]["available"] is False and "hub" in rows["pythia-1.4b"]["source"]
    assert {"pythia-70m", "pythia-160m", "pythia-410m", "pythia-2.8b", "llama-3.2-1b", "llama-3.2-3b",
            "llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "qwen2.5-0.5b-instruct"} <= set(rows)


def test_bad_models_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "models.yaml"
    bad.write_text("mine: {path: /x, hub: y/z}\n")
    assert main(["--models", str(bad), "models"]) == 2
    assert "give exactly one of" in capsys.readouterr().err


def test_vocabulary_mismatch_names_both_models(tmp_path):
    entries = save_tiny_pair(tmp_path)
    # a draft whose tokenizer maps the same characters to other ids
    from transformers import AutoModelForCausalLM, AutoTokenizer
    other = tmp_path / "tiny-other"
    AutoModelForCausalLM.from_pretrained(entries["tiny-draft"]["path"]).save_pretrained(other)
    tok = AutoTokenizer.from_pretrained(entries["tiny-draft"]["path"])
    vocab = tok.backend_tokenizer.to_str()
    swapped = json.loads(vocab)
    swapped["model"]["vocab"] = {t: (len(CHARS) - 1 - i if i >= 4 else i) for t, i in swapped["model"]["vocab"].items()}
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(swapped)), eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(other)
    entries["tiny-other"] = {"path": str(other), "chat": False}
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(entries))
    out = run_cli("--models", str(models), "generate", "--target", "tiny-target", "--draft", "tiny-other",
                  "--strategy", "speculative", "--prompt", "abc", "--max-new-tokens", "4")
    assert out.returncode == 2
    assert "target 'tiny-target' and draft 'tiny-other' do not share a vocabulary" in out.stderr


def test_tiny_pair_through_the_cli_speculative_equals_baseline(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(save_tiny_pair(tmp_path)))
    common = ["--models", str(models), "generate", "--target", "tiny-target", "--prompt", "hello hello hello",
              "--max-new-tokens", "24", "--ignore-eos", "--json"]
    base = json.loads(run_cli(*common).stdout)
    spec = json.loads(run_cli(*common, "--strategy", "speculative", "--draft", "tiny-draft", "--k", "3").stdout)
    assert spec["token_ids"] == base["token_ids"] and len(base["token_ids"]) == 24
    assert base["acceptance_rate"] is None and base["mean_accepted_tokens"] == 1.0
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["target_forward_passes"] < 24
    lookahead = run_cli(*common, "--strategy", "lookahead", "--k", "4", "--tree-budget", "6", "--lookahead-window",
                        "4", "--lookahead-ngram", "4", "--lookahead-guesses", "2")
    assert lookahead.returncode == 0, lookahead.stderr
    assert json.loads(lookahead.stdout)["token_ids"] == base["token_ids"]


@pytest.mark.slow
def test_embedded_smollm2_end_to_end_through_the_cli():
    """The real model, offline: ngram and baseline give the same tokens; the JSON has every promised field."""
    env = {"HF_HUB_OFFLINE": "1"}
    common = ["generate", "--target", "smollm2-135m", "--max-new-tokens", "32", "--prompt", SUMMARY_PROMPT, "--json"]
    base = run_cli(*common, "--strategy", "baseline", env=env)
    assert base.returncode == 0, base.stderr
    ngram = run_cli(*common, "--strategy", "ngram", env=env)  # its default k: 8 (strategies.py)
    assert ngram.returncode == 0, ngram.stderr
    b, n = json.loads(base.stdout), json.loads(ngram.stdout)
    assert len(n["proposed_per_position"]) == 8
    for record in (b, n):
        for key in ("text", "token_ids", "new_tokens", "tokens_per_s", "acceptance_rate", "mean_accepted_tokens",
                    "target_forward_passes", "ttft_s", "tpot_s", "peak_memory_bytes", "token_hash"):
            assert key in record
    assert n["token_ids"] == b["token_ids"] and b["new_tokens"] > 5
    assert "Amazon" in b["text"] or "rainforest" in b["text"].lower()
    assert n["accepted_tokens"] > 0 and n["target_forward_passes"] < b["target_forward_passes"]
    # each verify pass yields its accepted drafts + 1 token (the prefill yields 1); an EOS may cut the last one
    assert n["target_forward_passes"] + n["accepted_tokens"] - n["new_tokens"] in (0, 1)
    for strategy in ("recycling", "suffix"):  # train-free trees: the same tokens, fewer target passes
        tree = run_cli(*common, "--strategy", strategy, "--k", "6", "--tree-budget", "10", env=env)
        assert tree.returncode == 0, tree.stderr
        t = json.loads(tree.stdout)
        assert t["token_ids"] == b["token_ids"] and t["target_forward_passes"] < b["target_forward_passes"]
