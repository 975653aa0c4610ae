"""REST's datastore: which corpus the `rest` proposer retrieves from, tokenised, and cached on disk.

Default corpus: the target's own greedy answers to the first DEFAULT_PROMPTS prompts of prompts/training.jsonl
(as a trained drafter learns from them; the benchmark suite's prompts are not among them), generated once and
cached as `<datastores root>/<target>-<hash of the settings>.npy` (root: $SPECDEC_DATASTORES_DIR or
results/datastores; `<target>` is `<alias>@<format>` for a weight format other than float32, e.g. `@int4` or
llama.cpp's `@gguf-Q4_1`, runner.rest_datastore), so every later job reuses it. A corpus file given in the
settings (`rest_corpus`) is a JSONL file (each row's "text", else "prompt") or a plain-text file (one document),
tokenised with the target's tokenizer on every load (no chat template).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from specdec.prompts import load_prompts
from specdec.trainfree import Datastore, concatenate

ROOT_ENV = "SPECDEC_DATASTORES_DIR"
DEFAULT_PROMPTS = 32        # training prompts answered by the target for the default corpus
DEFAULT_NEW_TOKENS = 128    # tokens per answer (cut at end of sequence)
FORMAT = 1                  # bump when the cached corpus's meaning changes


def datastores_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get(ROOT_ENV) or "results/datastores")


def training_prompts_file() -> Path:
    here = Path("prompts/training.jsonl")
    return here if here.is_file() else Path(__file__).resolve().parent.parent / "prompts" / "training.jsonl"


def corpus_documents(path: str | Path) -> list[str]:
    """The documents of a corpus file: JSONL rows' "text" (or "prompt"), or the whole file as one document."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"rest corpus '{path}' does not exist; set rest_corpus to a .jsonl or text file, or leave "
                         "it unset for the target's own generations")
    if path.suffix != ".jsonl":
        return [path.read_text()]
    docs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            docs.append(row["text"] if "text" in row else row["prompt"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"rest corpus {path}:{n}: each line must be a JSON object with a \"text\" (or "
                             "\"prompt\") field") from None
    return docs


def default_corpus_path(target: str, prompts_file: Path, root=None) -> Path:
    key = json.dumps([FORMAT, target, hashlib.sha256(prompts_file.read_bytes()).hexdigest(), DEFAULT_PROMPTS,
                      DEFAULT_NEW_TOKENS])
    return datastores_root(root) / f"{target}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.npy"


def to_stderr(message: str) -> None:
    """Progress goes to stderr: stdout carries `specdec bench`'s JSON and `specdec generate`'s output."""
    print(message, file=sys.stderr)


def load_datastore(target: str, corpus_file: str | None, tokenize, answer, root=None, log=to_stderr) -> Datastore:
    """The datastore for `target`: from `corpus_file` (tokenize: text -> ids), or the cached default corpus,
    built on first use with answer(prompt text) -> generated ids."""
    if corpus_file:
        return Datastore(concatenate([np.asarray(tokenize(doc)) for doc in corpus_documents(corpus_file)]))
    prompts_file = training_prompts_file()
    path = default_corpus_path(target, prompts_file, root)
    if path.is_file():
        return Datastore(np.load(path))
    prompts = load_prompts(prompts_file)[:DEFAULT_PROMPTS]
    log(f"rest: building the datastore from {target}'s answers to {len(prompts)} prompts of {prompts_file} "
        f"(once; cached in {path})")
    corpus = concatenate([np.asarray(answer(p["prompt"]), dtype=np.int64) for p in prompts])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, corpus)
    tmp.replace(path)  # atomic: parallel jobs never read half a file
    return Datastore(corpus)
