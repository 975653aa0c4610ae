"""Turning a decoding trace into the per-generation record every strategy reports (see docs/results.md)."""

from __future__ import annotations

import hashlib
import resource
import sys
from dataclasses import asdict, dataclass

import torch

from specdec.model.decoding import Trace


def token_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, token_ids)).encode()).hexdigest()


def expected_tokens(alpha: float, n: int) -> float:
    """Tokens one verify pass of n drafts yields when each is accepted with probability α: (1 − α^(n+1)) / (1 − α)."""
    return n + 1 if alpha >= 1 else (1 - alpha ** (n + 1)) / (1 - alpha)


def leviathan_speedup(alpha: float | None, k: int | None, c: float | None,
                      proposed_per_position: list[int] | None = None, steps: int | None = None) -> float | None:
    """Expected walltime improvement (1 − α^(k+1)) / ((1 − α)(k·c + 1)) (Leviathan et al. 2022, Theorem 3.8).

    With `proposed_per_position` and `steps` (verify passes), the same model is applied to the draft lengths the
    run actually used: n-gram lookup often proposes fewer than k tokens or none, and the last block is cut at
    max_new_tokens. Then the prediction is Σ_steps E(n) ÷ Σ_steps (n·c + 1) over each step's draft length n.
    """
    if alpha is None or k is None or c is None or k < 1:
        return None
    if proposed_per_position and steps:
        # steps that proposed at least i + 1 drafts -> steps that proposed exactly n drafts
        at_least = list(proposed_per_position) + [0]
        exactly = [steps - at_least[0]] + [at_least[n - 1] - at_least[n] for n in range(1, len(at_least))]
        tokens = sum(m * expected_tokens(alpha, n) for n, m in enumerate(exactly))
        cost = sum(m * (n * c + 1) for n, m in enumerate(exactly))
        return tokens / cost if cost else None
    return expected_tokens(alpha, k) / (k * c + 1)


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> tuple[int, str]:
    """CUDA: max bytes allocated since the last reset. CPU: the process's peak resident set size (a high-water
    mark over the process's life, so it includes model loading)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "process_rss_peak"


def make_record(trace: Trace, k: int | None, prompt_tokens: int, text: str | None = None,
                speculative: bool = False) -> dict:
    """Every metric of one generation; fields that do not apply to the strategy are None."""
    new_tokens = len(trace.tokens)
    wall = trace.wall_s
    record = {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "stop_reason": trace.stop_reason,
        "wall_s": wall,
        "tokens_per_s": new_tokens / wall if wall > 0 else None,
        "ttft_s": trace.ttft_s,
        # time per output token after the first (the decode phase), as serving benchmarks report it
        "tpot_s": (wall - trace.ttft_s) / (new_tokens - 1) if new_tokens > 1 else None,
        "target_forward_passes": trace.target_passes,
        "draft_forward_passes": trace.draft_passes if speculative else None,
        "draft_s": trace.draft_s if speculative else None,
        "verify_s": trace.verify_s if speculative else None,
        "mean_accepted_tokens": new_tokens / trace.target_passes if trace.target_passes else None,
        "proposed_tokens": None, "accepted_tokens": None, "acceptance_rate": None,
        "proposed_per_position": None, "accepted_per_position": None,
        "cost_ratio_c": None, "leviathan_speedup": None,
        "token_ids": list(trace.tokens),
        "token_hash": token_hash(trace.tokens),
        "text": text,
    }
    if speculative:
        proposed, accepted = sum(trace.proposed_per_position), sum(trace.accepted_per_position)
        alpha = accepted / proposed if proposed else None
        c = None
        if trace.draft_units and trace.steps and trace.verify_s > 0:
            c = (trace.draft_s / trace.draft_units) / (trace.verify_s / trace.steps)
        per_step = len(trace.proposed_per_position) == k  # per-position counts (our loops), not one total
        record.update(proposed_tokens=proposed, accepted_tokens=accepted, acceptance_rate=alpha,
                      proposed_per_position=list(trace.proposed_per_position),
                      accepted_per_position=list(trace.accepted_per_position),
                      cost_ratio_c=c,
                      leviathan_speedup=leviathan_speedup(alpha, k, c, trace.proposed_per_position if per_step
                                                          else None, trace.steps))
    return record


def pool(records: list[dict]) -> dict:
    """Acceptance pooled over several generations of one strategy (turns of a conversation, prompts × repeats of
    a bench cell): α = Σ accepted ÷ Σ proposed, α per draft position, tokens per target pass, the median c, and
    Leviathan's prediction over the draft lengths the runs actually used (from per-position counts), or, where a
    runner reports totals only, for a chain of the mean draft length."""
    steps = sum(r["target_forward_passes"] - 1 for r in records)
    passes = sum(r["target_forward_passes"] for r in records)
    out = {"steps": steps, "mean_accepted_tokens": sum(r["new_tokens"] for r in records) / passes if passes else None,
           "acceptance_rate": None, "acceptance_by_position": None, "proposed_per_position": None,
           "accepted_per_position": None, "cost_ratio_c": None, "leviathan_speedup": None}
    if any(r["proposed_tokens"] is None for r in records):
        return out
    proposed, accepted = sum(r["proposed_tokens"] for r in records), sum(r["accepted_tokens"] for r in records)
    alpha = accepted / proposed if proposed else None
    cs = sorted(r["cost_ratio_c"] for r in records if r["cost_ratio_c"] is not None)
    c = (cs[(len(cs) - 1) // 2] + cs[len(cs) // 2]) / 2 if cs else None
    out.update(acceptance_rate=alpha, cost_ratio_c=c)
    positions = [r["proposed_per_position"] for r in records]
    if positions[0] and all(p is not None and len(p) == len(positions[0]) for p in positions):
        proposed_at = [sum(col) for col in zip(*positions)]
        accepted_at = [sum(col) for col in zip(*(r["accepted_per_position"] for r in records))]
        out.update(proposed_per_position=proposed_at, accepted_per_position=accepted_at,
                   acceptance_by_position=[a / p if p else None for a, p in zip(accepted_at, proposed_at)],
                   leviathan_speedup=leviathan_speedup(alpha, len(proposed_at), c, proposed_at, steps))
    elif alpha is not None and c is not None and steps:
        n = proposed / steps
        out["leviathan_speedup"] = expected_tokens(alpha, n) / (n * c + 1)
    return out


# ---------------------------------------------------------------------------------------------- degenerate outputs

@dataclass(frozen=True)
class DegenerateRule:
    """When an output counts as degenerate (docs/results.md, "Degenerate outputs", has the measurements).

    n = 4 because prompt lookup with its default 3-token suffix accepts a drafted token exactly when that suffix
    plus the token, a 4-gram, occurred before: the shares measure the text prompt lookup drafts for free, while
    ordinary prose rarely repeats a 4-gram by chance. repeat_share >= 0.5: at least half the output re-says what
    it already said. Copying is a legitimate part of summaries and retrieval answers (0.3-0.6 of their tokens),
    so only near-total copying, copy_share >= 0.8, flags an output on its own.
    """
    ngram: int = 4
    repeat_share: float = 0.5
    copy_share: float = 0.8

    @classmethod
    def from_dict(cls, values: dict | None) -> "DegenerateRule":
        """From a job's or config's `degenerate` object; ValueError (one line) on an unknown key or bad value."""
        unknown = sorted(set(values or {}) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"degenerate: unknown key(s) {unknown}; allowed: ngram, repeat_share, copy_share")
        return cls(**(values or {}))

    def __post_init__(self) -> None:
        if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or self.ngram < 1:
            raise ValueError(f"degenerate n-gram length must be an integer >= 1, got {self.ngram!r}")
        for name in ("repeat_share", "copy_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"degenerate {name} threshold must be a number in (0, 1], got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def covered_share(ids: list[int], n: int, hits: list[bool]) -> float:
    """Share of the tokens of `ids` that lie inside at least one n-gram window i with hits[i] true."""
    covered = [False] * len(ids)
    for i, hit in enumerate(hits):
        if hit:
            covered[i:i + n] = [True] * n
    return sum(covered) / len(ids) if ids else 0.0


def copy_share(output_ids: list[int], prompt_ids: list[list[int]], n: int = 4) -> float:
    """Share of generated tokens inside an n-gram that also occurs in one of the prompt token sequences."""
    seen = {g for ids in prompt_ids for g in ngrams(list(ids), n)}
    return covered_share(output_ids, n, [g in seen for g in ngrams(output_ids, n)])


def repeat_share(output_ids: list[int], n: int = 4) -> float:
    """Share of generated tokens inside an n-gram that already started at an earlier position of the output
    (overlaps count: a run of one token repeated n + 1 times repeats its first n-gram)."""
    seen, hits = set(), []
    for g in ngrams(output_ids, n):
        hits.append(g in seen)
        seen.add(g)
    return covered_share(output_ids, n, hits)


def degeneracy(output_ids: list[int], prompt_ids: list[list[int]], rule: DegenerateRule = DegenerateRule()) -> dict:
    """The per-output fields `copy_share`, `repeat_share` and `degenerate` (either share at its threshold or above).

    `prompt_ids`: the token sequences of the user's text, one per user turn (a conversation is judged as a whole:
    its answers concatenated against all its user turns). Outputs shorter than n tokens have shares 0."""
    output_ids = list(output_ids)
    copied = copy_share(output_ids, prompt_ids, rule.ngram)
    repeated = repeat_share(output_ids, rule.ngram)
    return {"copy_share": copied, "repeat_share": repeated,
            "degenerate": repeated >= rule.repeat_share or copied >= rule.copy_share}


def user_token_ids(tokenizer, prompt, turns=None) -> list[list[int]]:
    """The user's turns as token ids, without chat template (raw-id prompts are their own ids)."""
    if not isinstance(prompt, str):
        return [list(prompt)]
    return [list(tokenizer.encode(text, add_special_tokens=False)) for text in [prompt, *(turns or [])]]
