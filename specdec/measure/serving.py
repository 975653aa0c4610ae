"""Latency and throughput of a served workload, from what the client saw (specdec.engines.server.RequestResult
fields, passed here as plain numbers so this wing needs no engine).

Per request (`request_metrics`): TTFT = first token's arrival - send; end-to-end latency = last byte - send;
TPOT = (end-to-end - TTFT) / (tokens - 1), the mean time per output token after the first (vLLM's and
llama.cpp's bench definition); ITL = the gaps between successive token-bearing chunks (with speculation several
accepted tokens can arrive in one burst: small gaps then a long one; TPOT averages them).
Per cell (`cell_metrics`): medians and p90/p99 of TTFT, TPOT, ITL (all gaps pooled) and end-to-end latency; output
throughput = all output tokens / (last request's end - first request's send); goodput = requests per second whose
TPOT met the SLO (DistServe's definition, over the same span), with the share that met it.
`crossover`: C*, the lowest concurrency from which speculation no longer lowers median TPOT.
"""

from __future__ import annotations

import math

import numpy as np

QUANTILES = {"median": 0.5, "p90": 0.9, "p99": 0.99}


def quantiles(values, prefix: str) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {f"{prefix}_{name}": None for name in QUANTILES}
    return {f"{prefix}_{name}": float(np.quantile(values, q)) for name, q in QUANTILES.items()}


def request_metrics(sent: float, first: float | None, done: float, arrivals: list[float], new_tokens: int) -> dict:
    """One request's latencies (seconds) and its own tokens/s over its end-to-end time."""
    e2e = done - sent
    ttft = first - sent if first is not None else None
    tpot = (e2e - ttft) / (new_tokens - 1) if ttft is not None and new_tokens > 1 else None
    gaps = list(np.diff(arrivals)) if len(arrivals) > 1 else []
    return {"ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e, "wall_s": e2e,
            "tokens_per_s": new_tokens / e2e if e2e > 0 else None, "itl_s": [float(g) for g in gaps],
            **{k: v for k, v in quantiles(gaps, "itl").items()}}


def cell_metrics(rows: list[dict], tpot_slo_s: float | None = None) -> dict:
    """Summary of one side's requests (rows: request_metrics + `status`, `sent_s`, `done_s` (clock readings) and
    `new_tokens`); failed requests are counted, not measured."""
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    out = {"requests": len(ok), "failed_requests": len(rows) - len(ok)}
    if not ok:
        return out
    span = max(r["done_s"] for r in ok) - min(r["sent_s"] for r in ok)
    tokens = sum(r["new_tokens"] for r in ok)
    out.update(output_tokens=tokens, span_s=span, output_tokens_per_s=tokens / span if span > 0 else None,
               requests_per_s=len(ok) / span if span > 0 else None)
    for key in ("ttft", "tpot", "e2e"):
        out.update(quantiles([r[f"{key}_s"] for r in ok], key))
    out.update(quantiles([g for r in ok for g in r.get("itl_s") or []], "itl"))
    if tpot_slo_s is not None:
        met = [r for r in ok if r["tpot_s"] is not None and r["tpot_s"] <= tpot_slo_s]
        out.update(tpot_slo_s=tpot_slo_s, slo_share=len(met) / len(ok),
                   goodput_requests_per_s=len(met) / span if span > 0 else None)
    return out


def crossover(median_tpot: dict[int, tuple[float, float]]) -> int | None:
    """C*: the lowest concurrency C at which speculation no longer lowers median TPOT (spec >= plain) and stays
    so at every higher C measured. `median_tpot`: C -> (spec, plain). None: speculation lowers TPOT at every C
    measured (no crossover in range)."""
    found = None
    for c in sorted(median_tpot, reverse=True):
        spec, plain = median_tpot[c]
        if spec is None or plain is None or spec < plain:
            break
        found = c
    return found

