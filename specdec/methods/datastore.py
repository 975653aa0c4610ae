"""What the train-free proposers build once per target and cache on disk: REST's datastore (which corpus the
`rest` proposer retrieves from, tokenised) and the dynamic tree's context-free rows.

Default corpus: the target's own greedy answers to the first DEFAULT_PROMPTS prompts of prompts/training.jsonl
(as a trained drafter learns from them; the benchmark suite's prompts are not among them), generated once and
cached as `<datastores root>/<target>-<hash of the settings>.npy` (root: $SPECDEC_DATASTORES_DIR or
results/datastores; `<target>` is `<alias>@<format>` for a weight format other than float32, e.g. `@int4` or
llama.cpp's `@gguf-Q4_1`, runner.rest_datastore), so every later job reuses it. A corpus file given in the
settings (`rest_corpus`) is a JSONL file (each row's "text", else "prompt") or a plain-text file (one document),
tokenised with the target's tokenizer on every load (no chat template).

Context-free rows (`dynamic-tree`): for every token of the vocabulary, the target's top-k next tokens after
CONTEXT_FREE_PREFIX and that token alone — a bigram table read from the target itself, no data and no training.
They stand in for Token Recycling's matrix row of a token the target has not yet scored in the job (a quarter of
the dynamic tree's steps had no candidate at all without them). Built in one-level tree forwards of
CONTEXT_FREE_CHUNK tokens (each token a child of the shared prefix: 81 s for SmolLM2-135M's 49,152 tokens on 2
CPU cores in chunks of 1024; about a fifth less in chunks of 128), cached as
`<datastores root>/<target>-context-free-<hash>.npz`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from specdec.prompts import load_prompts
from specdec.methods.trainfree import Datastore, concatenate

ROOT_ENV = "SPECDEC_DATASTORES_DIR"
DEFAULT_PROMPTS = 32        # training prompts answered by the target for the default corpus
DEFAULT_NEW_TOKENS = 128    # tokens per answer (cut at end of sequence)
FORMAT = 1                  # bump when the cached corpus's meaning changes
CONTEXT_FREE_PREFIX = "\n"  # what the context-free rows are computed after (the tokenizer's BOS first if it adds
# one): of ten neutral prefixes tried, a newline's rows held the target's next token most often (top-1 17 %, top-8
# 41 % of the tokens the dynamic tree found no row for, 16 suite prompts; none at all: 1 % and 15 %)
# tokens scored per forward: the pass's attention grows with its square (every row sees the prefix and itself
# through a tree mask over all the pass's keys), its matmuls' efficiency falls below ~128 rows; the first 8192
# tokens of SmolLM2-135M took 18.7 s in chunks of 1024, 15.1 s in 128, 15.7-18 s in 64 (2-core AMD EPYC, the same
# top-k rows; scores equal to float32 rounding)
CONTEXT_FREE_CHUNK = 128
CONTEXT_FREE_FORMAT = 1     # bump when the cached rows' meaning changes


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


def context_free_path(target: str, prefix: list[int], vocab: int, topk: int, root=None) -> Path:
    key = json.dumps([CONTEXT_FREE_FORMAT, target, prefix, vocab, topk])
    return datastores_root(root) / f"{target}-context-free-{hashlib.sha256(key.encode()).hexdigest()[:10]}.npz"


def load_context_free_rows(target: str, prefix: list[int], vocab: int, topk: int, score, root=None,
                           log=to_stderr) -> tuple[np.ndarray, np.ndarray]:
    """context_free_rows(score, vocab, topk) for `target`, cached: built on first use, read from disk after."""
    path = context_free_path(target, prefix, vocab, topk, root)
    if path.is_file():
        with np.load(path) as cached:
            return cached["rows"], cached["scores"]
    log(f"dynamic-tree: scoring the next token after each of {target}'s {vocab} tokens (once; cached in {path})")
    rows, scores = context_free_rows(score, vocab, topk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, rows=rows, scores=scores)
    tmp.replace(path)  # atomic: parallel jobs never read half a file
    return rows, scores


def context_free_rows(score, vocab: int, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [vocab, topk] int32: the top-k next tokens after each token, best first; scores [vocab, topk]
    float32: each candidate's share of its top-k, a softmax over the k logits, the scale of the dynamic tree's
    recycled candidates), with score(tokens) -> logits [len(tokens), >= vocab] after (a prefix and) each token."""
    rows = np.zeros((vocab, topk), dtype=np.int32)
    scores = np.zeros((vocab, topk), dtype=np.float32)
    for start in range(0, vocab, CONTEXT_FREE_CHUNK):
        tokens = list(range(start, min(vocab, start + CONTEXT_FREE_CHUNK)))
        top = torch.topk(score(tokens)[:, :vocab].float(), topk, dim=-1)
        rows[start:start + len(tokens)] = top.indices.cpu().numpy()
        scores[start:start + len(tokens)] = torch.softmax(top.values, dim=-1).cpu().numpy()
    return rows, scores
