"""llama.cpp (through llama-cpp-python) as a second decoding engine over GGUF models, measured like our own.

Strategies (the name carries the engine):

* `llamacpp-generate` — llama.cpp's plain decoding (`Llama.generate`), the engine's own baseline.
* `llamacpp-ngram` — llama-cpp-python's prompt lookup (`LlamaPromptLookupDecoding`: the *earliest* earlier
  occurrence of the last ngram_max..1 tokens) as the draft hook.
* `llamacpp-specdec-ngram` — our own prompt lookup (proposers.NgramProposer: the *latest* occurrence) plugged
  into the same hook, so one method is measured on both engines. Our other model-free proposers are plugged in
  the same way (`ProposerDraft`; a registry entry with engine 'llamacpp' and its proposer name):
  `llamacpp-suffix`, `llamacpp-rest` and `llamacpp-recycling`. The hook verifies one sequence, so each proposes a
  chain (proposers with width 1): suffix and REST the most frequent continuation, Token Recycling the rank-0
  path of its template. Token Recycling learns from the target's logits, which the hook does not pass: they are
  read from the Llama's scores buffer, where llama-cpp-python writes every position of a pass evaluated with
  logits_all (`EvalMeter` asks for that on the prompt too, as our engine computes the prompt's logits for it).
* `llamacpp-speculative` — a second GGUF as the draft: `GreedyDraft` runs a draft `Llama` greedily, keeping its KV
  cache across steps (only tokens it has not seen are fed).

How llama-cpp-python verifies: `Llama.generate` evaluates [last token] + drafts in one `Llama.eval` (one
llama_decode over k + 1 tokens), then samples each position in turn and keeps drafts while the sampled token equals
the draft; the first mismatch replaces the draft, the KV cache past it is dropped. With greedy sampling that is
greedy verification; with temperature > 0 it samples every position from the target (proposals are token ids,
never probabilities), which is exact speculative sampling for deterministic proposals, so every draft hook here
proposes argmaxes or lookups and `draft_sampling` must be `greedy`.

How a generation is counted (`decode`):

* target passes = calls of `Llama.eval` (the prompt is the first; a prompt longer than n_batch is still one
  call); `Llama.eval` is wrapped on the instance for the run and restored after it.
* proposals are what the draft hook returned. `RecordingDraft` wraps the hook: it caps each proposal at
  min(k, tokens still allowed − 1), as our engine does, so no proposal is cut off by max_new_tokens; cuts it after
  an end-of-sequence token; records it with the output position it starts at.
* accepted drafts are counted afterwards from the output: proposal i is accepted while it equals the token
  generated at its position. That is exactly the rule llama-cpp-python applies (keep while equal), so per-position
  acceptance is known. Cross-check (tested): Σ (tokens per verify eval − 1) = Σ proposed.
* times: TTFT = until the first token is yielded; draft_s = inside the hook; verify_s = inside verify evals.
  Sampling and llama-cpp-python's own loop are neither (accept_s and rollback_s stay 0).
* limits: a draft hook sees only token ids (and, through the Llama, its logits); draft-model passes are counted
  by `GreedyDraft` itself; the prompt pass computes only the last position's logits unless the proposer reads
  them (llama-cpp-python would compute the output head over the whole prompt whenever a draft model is set).

Numerics: llama.cpp's multi-token forward is not bit-identical to its 1-token forward (logits of a 2..16-token
batch differ from token-by-token ones by up to 0.5-0.7 on SmolLM2 Q4_1, whatever flash attention or the KV type),
so with the default micro-batch greedy speculative output can leave llama.cpp's own plain decoding at a near tie.
With n_ubatch = 1 (`load(..., ubatch=1)`) every pass runs token by token and the outputs are identical (tested);
the bench reports the share of identical outputs at the default.

Extra buffer types (`extra_buffers`): llama.cpp repacks weights into "extra" buffer types for faster kernels,
AMX tiles on Intel Xeons with AMX. On some of those machines its AMX matrix product segfaults
(ggml_backend_amx_mul_mat; upstream ggml-org/llama.cpp#20824) and takes the process down. Where the CPU has AMX,
a child process first evaluates a short prompt with them; if it dies of a signal, every Llama here loads with
`use_extra_bufts = False`. The verdict is cached per CPU and llama.cpp build ($SPECDEC_LLAMACPP_PROBE_DIR,
default ~/.cache/specdec). $SPECDEC_LLAMACPP_EXTRA_BUFFERS=on|off forces either way; what ran is recorded with
every run. docs/engines-llamacpp-amx.md.

Prompts are tokenised by the alias's transformers tokenizer (`models.encode_prompt`), so both engines decode the
very same token ids and their outputs can be compared token for token.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from specdec import crash, simulated_crash
from specdec.model import models
from specdec.model.kernels import cpuinfo_field, kernel_choice
from specdec.model.decoding import DecodeSettings, Trace
from specdec.methods.proposers import Shape, make_proposer
from specdec.strategies import STRATEGIES

ENGINE = "llamacpp"
N_CTX = 4096  # context per Llama: prompt + max_new_tokens + k + 1 must fit (checked before decoding)


EXTRA_BUFFERS_ENV = "SPECDEC_LLAMACPP_EXTRA_BUFFERS"
EXTRA_BUFFERS = ("auto", "on", "off")
PROBE_DIR_ENV = "SPECDEC_LLAMACPP_PROBE_DIR"
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")  # /proc/cpuinfo flags of Intel's Advanced Matrix Extensions
PROBE_TIMEOUT_S = 300  # load the GGUF and evaluate 15 tokens: seconds for small models, a minute for 7B on 2 cores
# The probe runs in a child with llama_cpp only (no torch): a batch of tokens (the matrix-matrix product where the
# AMX crash was seen) and then one token (matrix-vector), with llama.cpp's default model parameters.
PROBE_SCRIPT = """
import sys
import llama_cpp
from specdec import crash, simulated_crash

path, threads = sys.argv[1], int(sys.argv[2])
llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=threads, n_threads_batch=threads, verbose=False)
if simulated_crash("amx"):
    crash("llama.cpp's AMX buffers (probe)")
tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog, and the dog sleeps on.")
llm.eval(tokens)
llm.eval(tokens[-1:])
print("ok")
"""


class LlamaCppError(ValueError):
    """A llama.cpp strategy that cannot run as asked (one-line message naming the fix)."""


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


# --- extra buffer types (AMX) ------------------------------------------------------------------------------------

def extra_buffers_setting() -> str:
    """$SPECDEC_LLAMACPP_EXTRA_BUFFERS: auto (the default), on or off; a bad value is a one-line LlamaCppError."""
    try:
        return kernel_choice(EXTRA_BUFFERS_ENV, EXTRA_BUFFERS)
    except ValueError as exc:
        raise LlamaCppError(str(exc)) from None


def has_amx() -> bool:
    """Whether this CPU has AMX (or a test simulates one whose llama.cpp extra buffers crash)."""
    return simulated_crash("amx") or bool(set(cpuinfo_field("flags").split()) & set(AMX_FLAGS))


def probe_dir() -> Path:
    if os.environ.get(PROBE_DIR_ENV):
        return Path(os.environ[PROBE_DIR_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specdec"


def llama_build() -> dict:
    """What identifies the llama.cpp build: llama-cpp-python's version and its libraries (name, size, mtime)."""
    import llama_cpp

    lib = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in lib.glob("*.so*") if f.is_file()) \
        if lib.is_dir() else []
    return {"llama_cpp_python": llama_cpp.__version__, "library_dir": str(lib), "libraries": files}


def probe_file() -> Path:
    """The cache file of this machine's verdict: keyed by CPU model, CPU flags and the llama.cpp build."""
    key = json.dumps([cpuinfo_field("model name"), sorted(cpuinfo_field("flags").split()), llama_build(),
                      simulated_crash("amx")])
    return probe_dir() / f"llamacpp-extra-buffers-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def probe(path, threads: int) -> str:
    """Evaluate a short prompt on `path` with llama.cpp's default (extra) buffers in a child process: 'amx' if it
    works, 'off (probe crashed: SIGNAL)' if the child dies of a signal. Any other failure (an exception, the
    timeout) is 'off (probe failed: ...)'; only the two clear verdicts are cached."""
    cmd = [sys.executable, "-X", "faulthandler", "-c", PROBE_SCRIPT, str(path), str(threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"off (probe failed: no answer in {PROBE_TIMEOUT_S} s)"
    if out.returncode < 0:
        return f"off (probe crashed: {signal.Signals(-out.returncode).name})"
    if out.returncode != 0 or "ok" not in out.stdout.split():
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        return f"off (probe failed: {last[:200]})"
    return "amx"


_VERDICTS: dict[str, str] = {}  # probe file -> verdict, for this process


def extra_buffers(path, threads: int) -> str:
    """How Llamas load here: 'on (no AMX)' (llama.cpp's default; nothing to decide), 'amx' (the probe passed),
    'off (probe crashed: SIGSEGV)', 'on (forced)' or 'off (forced)' ($SPECDEC_LLAMACPP_EXTRA_BUFFERS). The probe
    runs once per machine and llama.cpp build (cached in probe_dir()), on the first GGUF loaded there."""
    choice = extra_buffers_setting()
    if choice != "auto":
        return f"{choice} (forced)"
    if not has_amx():
        return "on (no AMX)"
    cache = probe_file()
    if str(cache) not in _VERDICTS:
        try:
            _VERDICTS[str(cache)] = json.loads(cache.read_text())["verdict"]
        except (OSError, ValueError, KeyError, TypeError):
            verdict = probe(path, threads)
            print(f"specdec: llama.cpp extra buffers on this AMX CPU: {verdict} (probe of {Path(path).name}; "
                  f"cached in {cache})", file=sys.stderr)
            if verdict == "amx" or verdict.startswith("off (probe crashed"):
                save_verdict(cache, verdict, path)
            _VERDICTS[str(cache)] = verdict
    return _VERDICTS[str(cache)]


def save_verdict(cache: Path, verdict: str, model) -> None:
    record = {"verdict": verdict, "cpu": cpuinfo_field("model name"), "model": str(model), **llama_build(),
              "probed_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, cache)  # atomic: cells probing at once each write a whole file
    except OSError as exc:  # a read-only home: probe again next time, say why once
        print(f"specdec: cannot cache the llama.cpp probe in {cache} ({exc.strerror}); set {PROBE_DIR_ENV}",
              file=sys.stderr)


@contextlib.contextmanager
def default_params_without_extra_buffers():
    """llama-cpp-python's Llama builds its model parameters from llama_model_default_params() and has no argument
    for use_extra_bufts: inside this block those defaults have it off."""
    import llama_cpp.llama_cpp as c_api

    default = c_api.llama_model_default_params

    def without():
        params = default()
        params.use_extra_bufts = False
        return params

    c_api.llama_model_default_params = without
    try:
        yield
    finally:
        c_api.llama_model_default_params = default


def extra_buffers_of(llm) -> str | None:
    """How a Llama of ours was loaded (extra_buffers' value); None for other objects."""
    return getattr(llm, "specdec_extra_buffers", None)


def check_settings(strategy: str, s: DecodeSettings) -> None:
    """llama.cpp-specific checks that need no model (runner.check_settings does the generic ones)."""
    if not available():
        raise LlamaCppError(f"strategy '{strategy}' needs llama-cpp-python (pip install llama-cpp-python; it "
                            "compiles llama.cpp, about ten minutes on 2 cores)")
    extra_buffers_setting()
    if STRATEGIES[strategy].uses_k and s.draft_sampling != "greedy":
        raise LlamaCppError(f"'{strategy}': llama.cpp's draft hook takes token ids, not draft probabilities, so "
                            "drafts are argmaxes or lookups (exact at any temperature): use draft_sampling greedy")


def gguf_file(spec):
    """The GGUF file of an alias, or a one-line ModelError: llama.cpp runs GGUF files only."""
    if not models.is_gguf(spec):
        raise models.ModelError(f"model '{spec.alias}' is not a GGUF file ({spec.source}); llama.cpp strategies "
                                "need a GGUF alias (package + gguf_file, or a path to a .gguf file)")
    if spec.weights is not None:
        raise models.ModelError(f"model '{spec.alias}' sets weights: {spec.weights}, which only our engine applies; "
                                "llama.cpp runs the GGUF's own quantisation (drop `weights` for llama.cpp cells)")
    return models.gguf_path(spec)


def load(path, threads: int | None = None, n_ctx: int = N_CTX, ubatch: int | None = None):
    """A llama_cpp.Llama on the CPU with `threads` threads (default: torch's intra-op count, so one setting drives
    both engines). It is created with logits_all so that one instance serves plain and speculative decoding: its
    logits buffer (n_ctx rows, allocated but untouched until written) can then hold every position of a verify
    pass; `decode` turns the per-pass flag off wherever one row is enough. ubatch=1 evaluates every pass token by
    token (the numerics of plain decoding, at its speed)."""
    import llama_cpp

    if threads is None:
        threads = torch.get_num_threads()
    kwargs = dict(n_ubatch=ubatch) if ubatch else {}  # llama_decode splits a pass; its logits stay whole
    mode = extra_buffers(path, threads)
    off = mode.startswith("off")
    with default_params_without_extra_buffers() if off else contextlib.nullcontext():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              logits_all=True, verbose=False, **kwargs)
    if llm.model_params.use_extra_bufts == off:
        raise LlamaCppError(f"llama.cpp loaded {Path(path).name} with use_extra_bufts={not off} although asked for "
                            f"{mode}: this llama-cpp-python sets its model parameters another way")
    if not off and simulated_crash("amx"):
        crash("llama.cpp's AMX buffers")
    llm.specdec_extra_buffers = mode
    return llm


def load_tokenizer(spec, path):
    """The alias's transformers tokenizer: from the converted copy our engine caches (fast), else the GGUF."""
    from transformers import AutoTokenizer

    cached = models.converted_cache_dir(path, spec.dtype)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_model(spec, threads: int | None = None, ubatch: int | None = None):
    """A models.LoadedModel whose model is a Llama (device 'cpu')."""
    start = time.perf_counter()
    path = gguf_file(spec)
    llm = load(path, threads, ubatch=ubatch)
    tokenizer = load_tokenizer(spec, path)
    eos = {i for i in (llm.token_eos(), getattr(tokenizer, "eos_token_id", None)) if i is not None and i >= 0}
    return models.LoadedModel(spec=spec, model=llm, tokenizer=tokenizer, device="cpu",
                              load_s=time.perf_counter() - start, eos_token_ids=sorted(eos))


def load_pair(target_spec, draft_spec=None, threads: int | None = None, ubatch: int | None = None):
    """(target, draft or None) as LoadedModels over llama.cpp; the draft must share the target's vocabulary."""
    target = load_model(target_spec, threads, ubatch)
    if draft_spec is None:
        return target, None
    draft = load_model(draft_spec, threads, ubatch)
    check_same_vocab(target, draft)
    return target, draft


def is_llama(model) -> bool:
    return type(model).__module__.startswith("llama_cpp")


def vocabulary(llm) -> list[bytes]:
    return [llm._model.token_get_text(i) for i in range(llm.n_vocab())]


def check_same_vocab(target, draft) -> None:
    """Draft and target must map text to the same token ids (compared on llama.cpp's own vocabularies)."""
    t_vocab, d_vocab = vocabulary(target.model), vocabulary(draft.model)
    if t_vocab != d_vocab:
        differing = sum(a != b for a, b in zip(t_vocab, d_vocab)) + abs(len(t_vocab) - len(d_vocab))
        raise models.ModelError(f"target '{target.spec.alias}' and draft '{draft.spec.alias}' do not share a "
                                f"vocabulary ({len(t_vocab)} vs {len(d_vocab)} tokens, {differing} differ); "
                                "llamacpp-speculative needs a draft from the target's family")


def weight_format(llm) -> str:
    """The GGUF's file type as its quantisation name, e.g. 'gguf-Q4_1'."""
    from gguf import LlamaFileType

    ftype = llm.metadata.get("general.file_type")
    try:
        return "gguf-" + LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return "gguf"


# --- draft hooks ----------------------------------------------------------------------------------------------

# The hooks implement llama_cpp's LlamaDraftModel interface (called with the token ids so far, they return the draft
# ids as a numpy intc array) and are registered as its virtual subclasses on first use (`make_draft`), so importing
# this module does not load llama.cpp.

class GreedyDraft:
    """A draft Llama proposing its argmax `num_pred_tokens` times.

    Its KV cache holds `cached`, a prefix of what it was last shown plus its own drafts but the last; each call
    feeds only the tokens past the longest common prefix with the new input (the accepted drafts and the target's
    token, usually), then one token per further draft. `passes` counts draft evals.
    """

    def __init__(self, llm, num_pred_tokens: int = 4, eos_ids: set[int] = frozenset()):
        self.llm, self.num_pred_tokens, self.eos_ids = llm, num_pred_tokens, set(eos_ids)
        llm._logits_all = False  # a draft samples only its last position (a catch-up pass is the whole prompt)
        self.cached: list[int] = []
        self.passes = 0

    def start(self, prompt_ids: list[int]) -> None:
        self.cached, self.passes = [], 0
        self.llm.reset()

    def _argmax(self) -> int:
        import llama_cpp

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def __call__(self, input_ids, /, **kwargs):
        ids = [int(i) for i in input_ids]
        keep = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # feed at least one token: its logits give the first draft
        self.llm.n_tokens = keep  # Llama.eval drops cached positions from n_tokens on
        self.llm.eval(ids[keep:])
        self.passes += 1
        drafts: list[int] = []
        while len(drafts) < self.num_pred_tokens:
            drafts.append(self._argmax())
            if drafts[-1] in self.eos_ids or len(drafts) == self.num_pred_tokens:
                break
            self.llm.eval(drafts[-1:])
            self.passes += 1
        self.cached = ids + drafts[:-1]
        return np.array(drafts, dtype=np.intc)


class ProposerDraft:
    """One of our model-free proposers (proposers.MODEL_FREE_PROPOSERS) as a draft hook: it proposes a chain
    (width 1) after the tokens so far and observes what was kept at the next call. The proposer starts at the
    first call, when llama.cpp has evaluated the prompt. A proposer that reads the target's logits (Token
    Recycling) gets them from `llm`'s scores buffer: the prompt's rows at the start, the last verify pass's rows
    ([root] + drafts) in observe. Proposers that read hidden states are refused: llama.cpp does not keep them."""

    def __init__(self, proposer, stop_tokens=(), llm=None):
        if proposer.needs_features:
            raise LlamaCppError(f"{type(proposer).__name__} reads the target's hidden states, which llama.cpp's "
                                "draft hook cannot show")
        self.reads_logits = proposer.reads_prompt_logits
        if self.reads_logits and llm is None:
            raise LlamaCppError(f"{type(proposer).__name__} reads the target's logits: give the target Llama")
        self.proposer, self.stop_tokens, self.llm, self.num_pred_tokens = proposer, frozenset(stop_tokens), llm, 1
        self.start([])

    def start(self, prompt_ids: list[int]) -> None:
        self.prompt, self.started, self.last, self.verified_at = list(prompt_ids), False, None, 0

    def rows(self, start: int, n: int):
        """The target's logits at positions start .. start + n - 1 (written by a pass evaluated with logits_all)."""
        return torch.from_numpy(self.llm.scores[start:start + n])

    def __call__(self, input_ids, /, **kwargs):
        committed = [int(t) for t in input_ids]
        if not self.started:
            self.proposer.start(self.prompt, None, self.rows(0, len(self.prompt)) if self.reads_logits else None)
            self.started = True
        elif self.last is not None:
            logits = self.rows(self.verified_at, 1 + len(self.last.tree)) if self.reads_logits else None
            self.proposer.observe(committed, self.last, logits)
        depth = self.num_pred_tokens
        self.last = self.proposer.propose(committed, None, Shape(depth, depth, stop_tokens=self.stop_tokens),
                                          Trace(proposed_per_position=[0] * depth, accepted_per_position=[0] * depth))
        self.verified_at = len(committed) - 1  # the verify pass evaluates the last committed token, then the drafts
        return np.array(self.last.tree.tokens, dtype=np.intc)


@dataclass
class Proposal:
    start: int          # index in the generated tokens of the first proposed token
    tokens: list[int]
    cap: int            # the most this step could propose: min(k, tokens still allowed - 1)


@dataclass
class RecordingDraft:
    """Wraps a draft hook: caps and records every proposal, and times the hook."""
    inner: object
    k: int
    prompt_tokens: int
    max_new_tokens: int
    eos_ids: set = field(default_factory=set)
    proposals: list = field(default_factory=list)
    seconds: float = 0.0

    def __call__(self, input_ids, /, **kwargs):
        started = time.perf_counter()
        generated = len(input_ids) - self.prompt_tokens  # the hook sees prompt + every generated token
        cap = max(0, min(self.k, self.max_new_tokens - generated - 1))
        tokens: list[int] = []
        if cap:
            self.inner.num_pred_tokens = cap
            tokens = [int(t) for t in self.inner(input_ids)][:cap]
            for i, token in enumerate(tokens):
                if token in self.eos_ids:
                    tokens = tokens[:i + 1]
                    break
        self.proposals.append(Proposal(start=generated, tokens=tokens, cap=cap))
        self.seconds += time.perf_counter() - started
        return np.array(tokens, dtype=np.intc)


def make_draft(strategy: str, s: DecodeSettings, eos_ids: set[int], draft_llm=None, memory: dict | None = None,
               target_llm=None):
    """The draft hook of a llama.cpp strategy (None for plain decoding): a draft GGUF run greedily, one of our
    model-free proposers (the registry entry's `proposer`; `target_llm` for those that read its logits), or
    llama-cpp-python's own prompt lookup."""
    from llama_cpp.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding

    for hook in (GreedyDraft, ProposerDraft, RecordingDraft):
        LlamaDraftModel.register(hook)
    st = STRATEGIES[strategy]
    if st.engine != ENGINE:
        raise LlamaCppError(f"'{strategy}' is not a llama.cpp strategy")
    if not st.uses_k:
        return None
    if st.needs_draft:
        if draft_llm is None:
            raise LlamaCppError(f"'{strategy}' needs a draft model: add --draft ALIAS (a GGUF alias)")
        return GreedyDraft(draft_llm, s.k, eos_ids)
    if st.proposer is not None:
        return ProposerDraft(make_proposer(st.proposer, s, memory=memory), eos_ids, target_llm)
    return LlamaPromptLookupDecoding(max_ngram_size=s.ngram_max, num_pred_tokens=s.k)


# --- decoding -------------------------------------------------------------------------------------------------

class EvalMeter:
    """Wraps `Llama.eval` on one instance: counts and times calls, records their lengths, and asks llama.cpp for
    the logits of every position of a pass only where drafts are verified, and of the prompt only for a proposer
    that reads them (`prompt_rows`); plain decoding samples the last position only."""

    def __init__(self, llm, verifies_drafts: bool, prompt_rows: bool = False):
        self.llm, self.verifies_drafts, self.prompt_rows = llm, verifies_drafts, prompt_rows
        self.lengths, self.seconds, self.first_seconds = [], 0.0, 0.0
        self.previous = llm.__dict__.get("eval")
        self.inner = llm.eval
        self.logits_all = llm._logits_all
        llm.eval = self

    def __call__(self, tokens):
        started = time.perf_counter()
        first = not self.lengths
        self.llm._logits_all = self.verifies_drafts and (self.prompt_rows or not first)
        self.inner(tokens)
        elapsed = time.perf_counter() - started
        self.lengths.append(len(tokens))
        self.seconds += elapsed
        if first:
            self.first_seconds = elapsed

    def remove(self) -> None:
        self.llm._logits_all = self.logits_all
        if self.previous is None:
            del self.llm.eval
        else:
            self.llm.eval = self.previous


def decode(llm, prompt_ids: list[int], s: DecodeSettings, eos_ids: set[int], draft=None) -> Trace:
    """One generation with llama.cpp: plain decoding, or speculative with `draft` (a LlamaDraftModel) in
    llama-cpp-python's draft hook. Counting: module docstring."""
    needed = len(prompt_ids) + s.max_new_tokens + s.k + 1
    if needed > llm.n_ctx():
        raise LlamaCppError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens + k + 1 = {needed} exceeds the "
                            f"llama.cpp context of {llm.n_ctx()} tokens: lower max_new_tokens or shorten the prompt")
    if draft is not None and not llm._logits_all:
        raise LlamaCppError("a draft hook needs a Llama created with logits_all=True (llamacpp.load does that)")
    hook = RecordingDraft(draft, s.k, len(prompt_ids), s.max_new_tokens, set(eos_ids)) if draft is not None else None
    if hasattr(draft, "start"):
        draft.start(prompt_ids)
    llm.draft_model = hook
    llm.reset()  # no reuse of an earlier generation's cached prefix: every run encodes its whole prompt
    llm.set_seed(s.seed)
    meter = EvalMeter(llm, verifies_drafts=draft is not None, prompt_rows=getattr(draft, "reads_logits", False))
    trace = Trace()
    start = time.perf_counter()
    tokens = llm.generate(prompt_ids, temp=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=0.0, typical_p=1.0,
                          repeat_penalty=1.0)
    try:
        for token in tokens:
            if not trace.tokens:
                trace.ttft_s = time.perf_counter() - start
            trace.tokens.append(int(token))
            if s.stop_at_eos and token in eos_ids:
                trace.stop_reason = "eos"
                break
            if len(trace.tokens) >= s.max_new_tokens:
                break
    finally:
        tokens.close()
        meter.remove()
        llm.draft_model = None
    trace.wall_s = time.perf_counter() - start
    trace.target_passes = len(meter.lengths)
    trace.steps = max(0, trace.target_passes - 1)
    if hook is not None:
        count_acceptance(trace, hook.proposals, s.k)
        trace.verify_s = meter.seconds - meter.first_seconds
        trace.draft_s = hook.seconds
        trace.draft_passes = getattr(draft, "passes", 0)
        trace.draft_units = trace.draft_passes or sum(p.cap for p in hook.proposals)
    return trace


def count_acceptance(trace: Trace, proposals: list[Proposal], k: int) -> None:
    """Per draft position: how often a token was proposed there, and how often it equals the generated token."""
    trace.proposed_per_position, trace.accepted_per_position = [0] * k, [0] * k
    for proposal in proposals:
        for i in range(len(proposal.tokens)):
            trace.proposed_per_position[i] += 1
        for i, token in enumerate(proposal.tokens):
            at = proposal.start + i
            if at >= len(trace.tokens) or trace.tokens[at] != token:
                break
            trace.accepted_per_position[i] += 1


def decode_models(strategy: str, target, prompt_ids: list[int], s: DecodeSettings, eos_ids, draft=None,
                  memory: dict | None = None) -> Trace:
    """runner.decode_models for llama.cpp strategies: target and draft are Llama instances (`load_pair`)."""
    if not is_llama(target):
        raise LlamaCppError(f"'{strategy}' runs on llama.cpp models: load the pair with engine='llamacpp'")
    eos = set(eos_ids)
    return decode(target, prompt_ids, s, eos, make_draft(strategy, s, eos, draft, memory, target))
