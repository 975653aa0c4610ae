"""llama.cpp's llama-server under concurrent load, speculation off / ngram-simple / self-draft (issue 35).

    python bench/serving.py [--concurrency 1,2,4,8] [--kinds off,ngram,draft] [--per-category 1] [--repeats 2]
                            [--max-new-tokens 64] [--k 4] [--threads 2] [--out results/serving.json]

For each concurrency C, one llama-server per speculation kind (the embedded GGUF as target; `draft`: the same GGUF
as its own draft, a control at acceptance ~1) with C slots, all up at once on 127.0.0.1 (an idle server holds no
core). Each round sends the suite's prompts (first turns, chat-formatted token ids, greedy, --max-new-tokens) at
concurrency C to each server in turn, the order reversed every other round (ABC CBA ...), after one warm-up batch
per server. At C = 1 each round also decodes the same prompts with our in-process `llamacpp-generate`
(llama-cpp-python, same GGUF and threads), so the client's overhead is measured in the same run.

Prints the CPU model and load, then per kind and C: median TPOT with its 95 % interval (exact order statistics,
specdec.db.bootstrap), output throughput (median over rounds, with min-max), median TTFT, the server-reported
acceptance and the share of outputs identical to plain decoding; C* per kind (the concurrency from which
speculation no longer lowers median TPOT); and server vs in-process at C = 1. Everything goes to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_ci(values) -> tuple[float | None, float | None, float | None]:
    """(median, low, high): the 95 % interval of the median from order statistics (db/bootstrap.py)."""
    from specdec.db import bootstrap

    x = sorted(values)
    if not x:
        return None, None, None
    if len(x) < 2:
        return x[0], None, None
    la, lb, ha, hb = bootstrap.median_ci_ranks(len(x))
    return statistics.median(x), (x[la - 1] + x[lb - 1]) / 2, (x[ha - 1] + x[hb - 1]) / 2


def in_process(llm, requests, max_new_tokens: int, eos) -> list[dict]:
    """Our llamacpp-generate on the same prompt ids: TPOT as the server's (time after the first token / (n - 1))."""
    from specdec.engines import llamacpp
    from specdec.model.decoding import DecodeSettings

    s = DecodeSettings(max_new_tokens=max_new_tokens)
    out = []
    for r in requests:
        trace = llamacpp.decode(llm, r.prompt_ids, s, eos)
        n = len(trace.tokens)
        out.append({"prompt_id": r.prompt_id, "new_tokens": n, "ttft_s": trace.ttft_s, "e2e_s": trace.wall_s,
                    "tpot_s": (trace.wall_s - trace.ttft_s) / (n - 1) if n > 1 else None,
                    "tokens_per_s": n / trace.wall_s, "token_ids": list(trace.tokens)})
    return out


async def measure(args, requests, gguf: str, c: int, logs: Path, llm, eos) -> dict:
    import httpx

    from specdec.engines import server
    from specdec.measure import metrics
    from specdec.run import serve

    specs = {kind: server.ServerSpec(model=gguf, spec=kind, draft_model=gguf if kind == "draft" else None,
                                     draft_max=args.k, slots=c, threads=args.threads, ctx_per_slot=1024)
             for kind in args.kinds}
    extra = {"cache_prompt": False, "return_tokens": True}
    rule = metrics.DegenerateRule()
    result = {kind: {"rows": [], "rounds": []} for kind in args.kinds}
    local: list[dict] = []
    with serve.Sides(specs, logs / f"c{c}", 300) as sides:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=c + 2), timeout=None) as client:
            for kind in args.kinds:  # all up, then one warm-up batch each
                warm = [requests[i % len(requests)] for i in range(c)]
                await serve.drive(sides.get(kind).url, warm, c, args.max_new_tokens, extra=extra, client=client)
            for i in range(args.repeats):
                for kind in (args.kinds if i % 2 == 0 else args.kinds[::-1]):
                    url = sides.get(kind).url
                    done = await serve.drive(url, requests, c, args.max_new_tokens, extra=extra, client=client)
                    rows = [serve.request_row(req, res, rule) for req, res in done]
                    failed = [r["error"] for r in rows if r["status"] != "ok"]
                    if failed:
                        raise SystemExit(f"C={c} {kind}: {len(failed)} requests failed, first: {failed[0]}")
                    span = max(r["done_s"] for r in rows) - min(r["sent_s"] for r in rows)
                    result[kind]["rounds"].append(sum(r["new_tokens"] for r in rows) / span)
                    for r in rows:
                        r["round"] = i
                    result[kind]["rows"] += rows
                if c == 1 and llm is not None:
                    local += in_process(llm, requests, args.max_new_tokens, eos)
    return {"by_kind": result, "in_process": local}


def summarise(kind_result: dict, plain_rows: list[dict]) -> dict:
    rows = kind_result["rows"]
    tpot = median_ci([r["tpot_s"] for r in rows if r["tpot_s"] is not None])
    plain = {(r["prompt_id"], r["round"]): r["token_hash"] for r in plain_rows}
    same = [r["token_hash"] == plain.get((r["prompt_id"], r["round"])) for r in rows]
    drafted = sum(r.get("proposed_tokens") or 0 for r in rows)
    accepted = sum(r.get("accepted_tokens") or 0 for r in rows)
    return {"tpot_median_s": tpot[0], "tpot_ci_s": tpot[1:], "requests": len(rows),
            "throughput_median": statistics.median(kind_result["rounds"]),
            "throughput_range": (min(kind_result["rounds"]), max(kind_result["rounds"])),
            "ttft_median_s": statistics.median(r["ttft_s"] for r in rows),
            "acceptance_rate": accepted / drafted if drafted else None, "drafted": drafted,
            "tokens_per_pass": statistics.median(r["mean_accepted_tokens"] for r in rows
                                                 if r.get("mean_accepted_tokens")) if drafted else None,
            "identical_share": sum(same) / len(same)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--kinds", default="off,ngram,draft")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-in-process", action="store_true", help="skip our in-process llamacpp-generate at C = 1")
    p.add_argument("--out", default="results/serving.json")
    p.add_argument("--figure", default=None, help="also draw median TPOT and throughput vs concurrency as SVG here")
    args = p.parse_args(argv)
    args.kinds = args.kinds.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if "off" not in args.kinds:
        raise SystemExit("--kinds must include off (plain decoding: the reference of every comparison)")

    from specdec.engines import llamacpp, server
    from specdec.measure import serving
    from specdec.model import models
    from specdec.prompts import load_prompts, select
    from specdec.run import serve
    from specdec.run.job import cpu_name

    server.find_binary("llama-server")  # a missing binary fails here, before anything loads
    registry = models.load_registry()
    gguf = str(llamacpp.gguf_file(registry["smollm2-135m"]))
    prompts = select(load_prompts(REPO / "prompts/suite.jsonl"), None, None, args.per_category)
    job = {"target": "smollm2-135m", "repeats": 1}
    requests = serve.encode_requests(job, registry, prompts)
    llm = eos = None
    if not args.no_in_process and 1 in concurrencies:
        loaded = llamacpp.load_model(registry["smollm2-135m"], threads=args.threads)
        llm, eos = loaded.model, set(loaded.eos_token_ids)
    load_before = Path("/proc/loadavg").read_text().split()[0]
    started = time.time()
    logs = Path(tempfile.mkdtemp(prefix="specdec-bench-serving-"))
    raw, table = {}, {}
    for c in concurrencies:
        raw[c] = asyncio.run(measure(args, requests, gguf, c, logs, llm, eos))
        plain_rows = raw[c]["by_kind"]["off"]["rows"]
        table[c] = {kind: summarise(raw[c]["by_kind"][kind], plain_rows) for kind in args.kinds}
        print(f"C={c} done ({time.time() - started:.0f} s)", flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[0]

    print(f"\nCPU: {cpu_name()}, {args.threads} threads per server; load average {load_before} before, {load_after} "
          f"after; {len(requests)} prompts x {args.repeats} rounds, {args.max_new_tokens} new tokens, k={args.k}")
    print("| kind | C | median TPOT ms [95 % CI] | throughput tok/s median [min-max] | median TTFT ms | "
          "acceptance | tokens/pass | identical to off |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        for c in concurrencies:
            t = table[c][kind]
            lo, hi = t["tpot_ci_s"]
            ci = f"[{lo * 1e3:.1f}, {hi * 1e3:.1f}]" if lo is not None else ""
            acc = f"{t['acceptance_rate']:.2f}" if t["acceptance_rate"] is not None else "-"
            tpp = f"{t['tokens_per_pass']:.2f}" if t["tokens_per_pass"] else "-"
            print(f"| {kind} | {c} | {t['tpot_median_s'] * 1e3:.1f} {ci} | {t['throughput_median']:.1f} "
                  f"[{t['throughput_range'][0]:.1f}-{t['throughput_range'][1]:.1f}] | {t['ttft_median_s'] * 1e3:.0f} | "
                  f"{acc} | {tpp} | {t['identical_share']:.2f} |")
    crossovers = {}
    for kind in args.kinds:
        if kind == "off":
            continue
        crossovers[kind] = serving.crossover({c: (table[c][kind]["tpot_median_s"], table[c]["off"]["tpot_median_s"])
                                              for c in concurrencies})
        where = f"C* = {crossovers[kind]}" if crossovers[kind] else "lowers median TPOT at every C measured"
        print(f"{kind}: {where}")
    local = {}
    if raw.get(1, {}).get("in_process"):
        rows = raw[1]["in_process"]
        local = {"tpot_median_s": statistics.median(r["tpot_s"] for r in rows if r["tpot_s"]),
                 "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rows)}
        srv = table[1]["off"]
        ratio = srv["tpot_median_s"] / local["tpot_median_s"]
        server_tps = statistics.median(r["tokens_per_s"] for r in raw[1]["by_kind"]["off"]["rows"])
        print(f"C=1 plain: server median TPOT {srv['tpot_median_s'] * 1e3:.1f} ms, in-process llamacpp-generate "
              f"{local['tpot_median_s'] * 1e3:.1f} ms (server/in-process {ratio:.2f}); per-request tok/s server "
              f"{server_tps:.1f}, in-process {local['tokens_per_s_median']:.1f}")
        local.update(server_over_in_process_tpot=ratio, server_tokens_per_s_median=server_tps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_name(), "args": vars(args), "load_before": load_before,
                               "load_after": load_after, "table": table, "crossover": crossovers,
                               "in_process": local, "raw": {c: raw[c]["by_kind"] for c in raw}}, default=str))
    if args.figure:
        draw(table, concurrencies, args.kinds, cpu_name(), Path(args.figure))
    print(f"wrote {out}")
    return 0


def draw(table: dict, concurrencies: list[int], kinds: list[str], cpu: str, path: Path) -> None:
    """db/report.py:serving_chart from the bench's table: median TPOT with its interval, and throughput."""
    import pandas as pd

    from specdec.db.report import serving_chart, to_svg

    rows = []
    for kind in kinds:
        for c in concurrencies:
            t = table[c][kind]
            lo, hi = t["tpot_ci_s"]
            rows.append({"concurrency": c, "series": f"speculation {kind}", "tpot_ms": t["tpot_median_s"] * 1e3,
                         "tpot_ci_low_ms": lo * 1e3 if lo is not None else None,
                         "tpot_ci_high_ms": hi * 1e3 if hi is not None else None,
                         "throughput_tok_s": t["throughput_median"]})
    chart = serving_chart(pd.DataFrame(rows)).properties(title=f"llama-server, SmolLM2-135M GGUF, {cpu}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_svg(chart))


if __name__ == "__main__":
    raise SystemExit(main())
