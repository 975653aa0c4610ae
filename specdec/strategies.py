"""Every strategy specdec can run, in one table that the CLI, the workflow, bench, the tensor-parallel launcher and
the dashboard all read. Adding a method = one entry here (+ its proposer in proposers.py, if it drafts).

Pure data, no imports of the engine: the workflow and the dashboard read it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

ENGINES = ("specdec", "transformers", "llamacpp", "server")
# Lookahead's W, N, G (decoding.DecodeSettings, the CLI, the workflow's cells): 1 + W(N-1) - 1 + G(N-1) = 16 rows
# per verify pass, the cap (Spec-Bench runs W 7, N 5, G 7 on a GPU: 57 rows)
LOOKAHEAD_DEFAULTS = {"lookahead_window": 5, "lookahead_ngram": 3, "lookahead_guesses": 3}


@dataclass(frozen=True)
class Strategy:
    name: str
    help: str
    color: str                     # dashboard colour, fixed per strategy so a series keeps it under any filter
    engine: str = "specdec"        # whose decoding loop runs it: ours, transformers' generate() (a reference), or
                                   # llama.cpp's (llama-cpp-python's Llama.generate over a GGUF file, llamacpp.py)
    draft: str = "none"            # none | model (a draft LM) | model-or-drafter (also `<target>+eagle|medusa`)
    proposer: str | None = None    # ours: which proposer drafts (proposers.make_proposer); None = no drafting;
                                   # llama.cpp: our model-free proposer plugged into its draft hook, if any
    width: int = 1                 # children per expanded node: 1 = chains, > 1 = trees (tree_budget applies)
    length: str = "fixed"          # draft-length policy: fixed | heuristic | confidence | cost (proposers.DraftLength;
                                   # cost: each pass's budget from measured pass times, k the most)
    tensor_parallel: bool = False  # runs with the target sharded over GPUs (gpu_mode: tensor; a draft model,
                                   # whole on rank 0 — a trained drafter would need the sharded target's features)
    peer: str | None = None        # the same method in the other engine, compared by `specdec bench`
    serve: str | None = None       # engine 'server': the speculation the server runs (engines/server.py SPEC_KINDS)
    k: int = 4                     # default draft length (trees: the deepest position and, without a
                                   # --tree-budget, the nodes verified per pass) where a run gives none: DEFAULTS_SOURCE

    @property
    def uses_k(self) -> bool:
        return self.name not in ("baseline", "hf-generate", "llamacpp-generate") and self.serve != "off"

    @property
    def needs_draft(self) -> bool:
        return self.draft != "none"

    @property
    def takes_trained_drafter(self) -> bool:
        return self.draft == "model-or-drafter"

    @property
    def tree(self) -> bool:
        return self.width > 1

    @property
    def fixed_length(self) -> bool:
        """Every verify pass shows the target k drafts (fewer only where a proposal runs out)."""
        return self.uses_k and not self.tree and self.length == "fixed"


_ALL = (
    Strategy("baseline", "plain autoregressive decoding, one target forward per token", "#4e79a7",
             tensor_parallel=True, peer="hf-generate"),
    Strategy("speculative", "a draft model (or a trained drafter) proposes k tokens, the target verifies them",
             "#e15759", draft="model-or-drafter", proposer="draft", tensor_parallel=True, peer="hf-assisted"),
    Strategy("ngram", "prompt lookup: the tokens that followed the latest match of the last n-gram", "#59a14f",
             proposer="ngram", tensor_parallel=True, peer="hf-ngram", k=8, length="cost"),
    Strategy("tree", "a draft tree (best-first, 4 children per node, tree_budget nodes, depth <= k) verified in one "
             "forward with tree attention", "#b07aa1", draft="model-or-drafter", proposer="draft", width=4,
             tensor_parallel=True),
    Strategy("speculative-heuristic", "draft length adapts: +2 after a fully accepted block, -1 otherwise",
             "#edc948", draft="model-or-drafter", proposer="draft", length="heuristic", tensor_parallel=True),
    Strategy("speculative-confidence", "drafting stops after a token the draft gives probability < 0.4",
             "#ff9da7", draft="model-or-drafter", proposer="draft", length="confidence", tensor_parallel=True),
    Strategy("recycling", "Token Recycling: each token's top-k next tokens from the target's past logits grow a "
             "static draft tree (depth <= k, tree_budget nodes)", "#9c755f", proposer="recycling", width=8, k=8),
    Strategy("suffix", "suffix matching (SuffixDecoding/SAMD): what followed the longest context match in the prompt,"
             " the output and other prompts' outputs, as a frequency tree", "#86bcb6", proposer="suffix", width=4,
             k=8, length="cost"),
    Strategy("suffix-recycling", "suffix matching's frequency tree first, Token Recycling's template tree in the "
             "rest of the tree_budget nodes, verified as one tree", "#98df8a", proposer="suffix-recycling", width=8),
    Strategy("dynamic-tree", "suffix matches and Token Recycling's candidates (after one and after two tokens; for "
             "a token not yet scored, the target's context-free top-k, computed once and cached) in one dynamic "
             "tree: each scored by how often such candidates were accepted, the most likely paths kept "
             "(tree_budget nodes, depth <= k)", "#ff7f0e", proposer="dynamic-tree", width=8, k=8, length="cost"),
    Strategy("rest", "REST: continuations of the longest context match retrieved from a datastore (suffix array), "
             "as a frequency tree", "#d37295", proposer="rest", width=4),
    Strategy("lookahead", "Lookahead decoding: a Jacobi window (W columns x N-1 levels) in every verify pass fills "
             "an n-gram pool; up to G pooled n-grams after the last token are verified as a tree", "#b6992d",
             proposer="lookahead", width=4),
    Strategy("hf-generate", "transformers' generate(), plain greedy or sampled", "#bab0ac", engine="transformers",
             tensor_parallel=True, peer="baseline"),
    Strategy("hf-assisted", "transformers' assisted generation with the draft model, fixed k", "#f28e2b",
             engine="transformers", draft="model", peer="speculative"),
    Strategy("hf-ngram", "transformers' prompt lookup decoding, fixed k", "#76b7b2", engine="transformers",
             tensor_parallel=True, peer="ngram", k=8),
    Strategy("llamacpp-generate", "llama.cpp's plain decoding of a GGUF file (llama-cpp-python)", "#8c564b",
             engine="llamacpp", peer="baseline"),
    Strategy("llamacpp-ngram", "llama.cpp with llama-cpp-python's prompt lookup (earliest match) as draft hook",
             "#17becf", engine="llamacpp", k=8),
    Strategy("llamacpp-specdec-ngram", "llama.cpp with our prompt lookup (the ngram proposer) in its draft hook",
             "#9edae5", engine="llamacpp", proposer="ngram", peer="ngram", k=8),
    Strategy("llamacpp-speculative", "llama.cpp with a second GGUF drafting greedily through its draft hook",
             "#c49c94", engine="llamacpp", draft="model", peer="speculative"),
    # our train-free proposers in llama.cpp's hook: it verifies one sequence, so each drafts its best chain
    Strategy("llamacpp-recycling", "llama.cpp with our Token Recycling in its draft hook: the chain of rank-0 "
             "candidates (the adjacency matrix learns from the target's logits in llama.cpp's buffer)", "#bcbd22",
             engine="llamacpp", proposer="recycling", peer="recycling", k=8),
    Strategy("llamacpp-suffix", "llama.cpp with our suffix matching in its draft hook: the most frequent "
             "continuation as a chain", "#e377c2", engine="llamacpp", proposer="suffix", peer="suffix", k=8),
    Strategy("llamacpp-rest", "llama.cpp with our REST retrieval in its draft hook: the most frequent retrieved "
             "continuation as a chain", "#aec7e8", engine="llamacpp", proposer="rest", peer="rest"),
    # a server process per cell, driven over HTTP by concurrent clients (engines/server.py; config `server`:
    # llama.cpp's llama-server by default, vLLM, or a running server by URL)
    Strategy("server-plain", "a serving engine (llama-server, vLLM) without speculation, under `concurrency` "
             "clients", "#7f7f7f", engine="server", serve="off", peer="llamacpp-generate"),
    Strategy("server-ngram", "a serving engine's draft-free n-gram speculation (llama-server --spec-type "
             "ngram-simple, vLLM method ngram)", "#2ca02c", engine="server", serve="ngram"),
    Strategy("server-draft", "a serving engine drafting with the pair's draft model (llama-server --model-draft, "
             "vLLM draft_model)", "#d62728", engine="server", draft="model", serve="draft"),
    Strategy("server-suffix", "vLLM's suffix decoding (server kind vllm only)", "#9467bd", engine="server",
             serve="suffix"),
    Strategy("server-eagle", "vLLM with an EAGLE head as the pair's draft (server kind vllm only)", "#1f77b4",
             engine="server", draft="model", serve="eagle"),
)
STRATEGIES: dict[str, Strategy] = {s.name: s for s in _ALL}
NAMES = tuple(STRATEGIES)
# Where the default k of 8 above comes from (docs/strategies.md prints it under the table)
DEFAULTS_SOURCE = ("the best of k 4, 8 and 12 with tree budget k, and of budgets 8 and 14 at k 8, on the suite's 8 "
                   "categories (64 new tokens, float32 and int4, 2 threads) on a 2-core Intel Xeon, 2026-12-07: "
                   "[Train-free draft trees](train-free.md#default-draft-lengths); draft models keep 4, their best "
                   "depends on the pair. Strategies with the cost length (ngram, suffix, dynamic-tree) take it as the "
                   "most they draft and choose each pass's budget below it from the target's measured pass times: "
                   "[Cost-aware draft length](train-free.md#cost-aware-draft-length)")


def draft_length(strategy: str, k: int | None) -> int:
    """The draft length a run of `strategy` uses: the given k, else the strategy's default (a tree without a
    --tree-budget verifies k nodes)."""
    return STRATEGIES[strategy].k if k is None else k


def names(**where) -> tuple[str, ...]:
    """Strategy names whose attributes equal the given values, e.g. names(engine="transformers")."""
    return tuple(s.name for s in _ALL if all(getattr(s, key) == value for key, value in where.items()))


def plain_baseline(engine: str) -> str:
    """The strategy each engine's speedups are measured against: its own plain decoding."""
    return next(s.name for s in _ALL if s.engine == engine and not s.uses_k)


def store_baseline(strategy: str) -> str:
    """The plain decoding a cell of the workflow is compared with (its paired baseline, the store's speedup view):
    llama.cpp's own for llama.cpp strategies (same GGUF, threads), the server's own plain decoding for server
    strategies (same server, concurrency and prompts), ours for every other (transformers' cells
    included: the store has always compared them with our `baseline`)."""
    engine = STRATEGIES[strategy].engine
    return plain_baseline(engine) if engine in ("llamacpp", "server") else "baseline"


def is_plain_baseline(strategy: str) -> bool:
    """A strategy that is its own reference (a baseline cell of the workflow): no paired baseline, no mode."""
    return store_baseline(strategy) == strategy


def describe() -> str:
    """The strategies and what each does, for --help texts."""
    return "; ".join(f"{s.name}: {s.help}" for s in _ALL)


def add_proposer_args(p) -> None:
    """The train-free proposers' parameters, for every command line that decodes (generate, bench)."""
    p.add_argument("--recycle-topk", type=int, default=8,
                   help="recycling: candidates kept per token in the adjacency matrix (default: 8)")
    p.add_argument("--rest-corpus", default=None, metavar="FILE",
                   help="rest: corpus for the datastore, .jsonl (\"text\" per row) or text (default: the target's "
                        "own answers to prompts/training.jsonl, built once and cached in results/datastores)")
    helps = {"lookahead_window": ("W", "Jacobi window columns, n-grams collected per verify pass"),
             "lookahead_ngram": ("N", "n-gram size; the window has N-1 levels and guesses are N-1 tokens deep"),
             "lookahead_guesses": ("G", "n-grams kept per first token, the guesses verified after it; a pass "
                                        "verifies min(G(N-1), tree budget) guess nodes besides the window's "
                                        "W(N-1)-1 rows")}
    for key, (metavar, text) in helps.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=LOOKAHEAD_DEFAULTS[key], metavar=metavar,
                       help=f"lookahead: {text} (default: {LOOKAHEAD_DEFAULTS[key]})")
