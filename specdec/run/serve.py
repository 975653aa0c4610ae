"""A serving cell: the cell's prompts sent to a server process by concurrent HTTP clients, speculation on and off.

Workload (`drive`): the prompts of one round go out at a fixed concurrency C — C client tasks, each sending its
next prompt when its last one finished — or, with a request rate, at Poisson arrivals (seeded exponential gaps)
with at most C in flight. Every request is greedy (temperature 0, the job's seed) with the same max tokens.

Pairing (`run_server_cell`): the cell's server (speculation as its strategy says) and its paired plain server
(`server-plain`, same model, slots and threads) both run for the whole job on two ports of 127.0.0.1; an idle
llama-server holds no core. Rounds alternate ABBA (round i: cell first when i is even), each round all prompts
once; a warm-up round per side runs first and is not stored. vLLM cannot hold two engines on one GPU, so there each
side's server is started at its turn and stopped at the next switch (the ABBA order stays). A server given by URL
(`server_url`, and `server_baseline_url` for its plain twin) is driven as it is: specdec cannot set its
speculation, the strategy only names it.

Rows: one per request (prompt × repeat) and side, in the result file's measurement format (docs/results.md):
client-side ttft_s, tpot_s, wall_s (end to end) and tokens_per_s, ITL quantiles, the server's own draft counts
(llama-server's per-request timings: draft_n, draft_n_accepted), the output's ids and hash. Per side the run holds
`serving`: the cell metrics (specdec.measure.serving.cell_metrics) and the growth of the server's /metrics counters
over the measured rounds. A server that does not start fails the whole cell before any request (nothing
half-measured is stored); a request that fails is a failed row.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

from specdec.engines import llamacpp, server
from specdec.measure import metrics, serving
from specdec.model import models

SERVER_DEFAULTS = dict(kind="llama-server", url=None, baseline_url=None, binary=None, extra_args=[],
                       ready_timeout=300.0, tpot_slo_ms=None, ctx_per_slot=2048, model_name=None)


@dataclass
class Request:
    prompt_id: str
    category: str
    repeat: int
    prompt_ids: list[int]
    user_ids: list[list[int]]


async def drive(url: str, requests: list[Request], concurrency: int, max_tokens: int, *, rate: float | None = None,
                seed: int = 0, extra: dict | None = None, model: str | None = None, client=None):
    """Send every request; returns [(request, RequestResult)] in request order."""
    import httpx

    results: list = [None] * len(requests)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    own = client is None
    client = client or httpx.AsyncClient(limits=limits, timeout=None)
    try:
        async def send(i: int) -> None:
            results[i] = (requests[i], await server.complete(client, url, requests[i].prompt_ids, max_tokens,
                                                             model=model, seed=seed, extra=extra))

        if rate is None:  # closed loop: C clients, each with its next prompt when the last one finished
            queue = list(range(len(requests)))

            async def client_task() -> None:
                while queue:
                    await send(queue.pop(0))

            await asyncio.gather(*(client_task() for _ in range(min(concurrency, len(requests)))))
        else:  # open loop: Poisson arrivals, at most C in flight
            gate = asyncio.Semaphore(concurrency)
            gaps = random.Random(seed)
            start = time.perf_counter()
            arrivals, t = [], 0.0
            for _ in requests:
                t += gaps.expovariate(rate)
                arrivals.append(t)

            async def arrive(i: int) -> None:
                await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
                async with gate:
                    await send(i)

            await asyncio.gather(*(arrive(i) for i in range(len(requests))))
    finally:
        if own:
            await client.aclose()
    return results


def request_row(request: Request, result, rule: metrics.DegenerateRule) -> dict:
    """One request as a measurement row (docs/results.md), from what the client saw and the server's timings."""
    row = {"prompt_id": request.prompt_id, "category": request.category, "repeat": request.repeat,
           "prompt_tokens": len(request.prompt_ids), "attempts": result.attempts}
    if result.error:
        return {**row, "status": "failed", "error": result.error}
    n = result.new_tokens
    row.update(status="ok", error=None, new_tokens=n, text=result.text,
               stop_reason="eos" if result.finish_reason == "stop" else "max_new_tokens")
    row.update(serving.request_metrics(result.sent, result.first, result.done, result.arrivals, n))
    row["sent_s"], row["done_s"] = result.sent, result.done
    if result.token_ids is not None:
        row.update(token_ids=result.token_ids, token_hash=metrics.token_hash(result.token_ids))
        row.update(metrics.degeneracy(result.token_ids, request.user_ids, rule))
    else:  # a server that streams no ids: outputs are compared by text
        row["token_hash"] = metrics.token_hash([ord(c) for c in result.text])
    timings = result.timings or {}
    drafted, accepted = timings.get("draft_n"), timings.get("draft_n_accepted")
    if drafted is not None and accepted is not None:
        row.update(proposed_tokens=int(drafted), accepted_tokens=int(accepted),
                   acceptance_rate=accepted / drafted if drafted else None)
        # target passes after the prompt: every pass yields its accepted drafts plus one token of its own
        passes = n - int(accepted)
        row["mean_accepted_tokens"] = n / passes if passes > 0 else None
        row["target_forward_passes"] = passes + 1
    if timings.get("predicted_per_second"):
        row["server_tokens_per_s"] = float(timings["predicted_per_second"])
    return row


def server_specs(job: dict, registry: dict, strategy: str, cfg: dict):
    """(cell side, plain side) ServerSpecs of a job."""
    from specdec.strategies import STRATEGIES

    st = STRATEGIES[strategy]
    target = registry[job["target"]]
    kind = cfg["kind"]
    if kind == "llama-server":
        model = str(llamacpp.gguf_file(target))
        draft = str(llamacpp.gguf_file(registry[job["draft"]])) if st.needs_draft else None
    else:
        model = cfg["model_name"] or target.path or target.hub or target.alias
        draft = None
        if st.needs_draft:
            d = registry[job["draft"]]
            draft = d.path or d.hub or d.alias
    common = dict(kind=kind, model=model, slots=job["concurrency"], threads=job["threads"],
                  binary=cfg["binary"], extra_args=tuple(cfg["extra_args"] or ()),
                  ctx_per_slot=cfg["ctx_per_slot"], ngram_max=job["ngram_max"])
    cell = server.ServerSpec(**common, spec=st.serve, draft_model=draft, draft_max=job["k"] or 4,
                             url=cfg["url"])
    plain = server.ServerSpec(**common, spec="off", url=cfg["baseline_url"] if kind == "url" else None)
    return cell, plain


def encode_requests(job: dict, registry: dict, prompts: list[dict]) -> list[Request]:
    """The prompts as the target's chat-formatted token ids (the same ids our engines decode); first turns only."""
    spec = registry[job["target"]]
    if models.is_gguf(spec):
        tokenizer = llamacpp.load_tokenizer(spec, models.gguf_path(spec))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.path or spec.hub, revision=spec.revision,
                                                  trust_remote_code=spec.trust_remote_code)
    loaded = models.LoadedModel(spec=spec, model=None, tokenizer=tokenizer, device="cpu")
    out = []
    for repeat in range(job["repeats"]):
        for p in prompts:
            out.append(Request(p["id"], p["category"], repeat, models.encode_prompt(loaded, p["prompt"]),
                               metrics.user_token_ids(tokenizer, p["prompt"])))
    return out


def metric_growth(before: dict | None, after: dict | None) -> dict | None:
    """The counters' growth between two /metrics reads (gauges too: their last value minus their first)."""
    if before is None or after is None:
        return None
    return {k: after[k] - before.get(k, 0.0) for k in sorted(after)}


def add_growth(total: dict | None, growth: dict | None) -> dict | None:
    if growth is None:
        return total
    total = dict(total or {})
    for k, v in growth.items():
        total[k] = total.get(k, 0.0) + v
    return total


class Sides:
    """The servers of a job by side ('cell', 'baseline'): all kept up, or (vLLM: one engine per GPU) one at a
    time, restarted at each switch. Stopped on leaving, whatever happens."""

    def __init__(self, specs: dict, log_dir: Path, ready_timeout: float):
        self.specs, self.log_dir, self.ready_timeout = specs, log_dir, ready_timeout
        self.exclusive = any(s.kind == "vllm" for s in specs.values())
        self.up: dict = {}
        self.start_s: dict = {}
        self.argv: dict = {}

    def get(self, side: str) -> server.Server:
        if side not in self.up:
            if self.exclusive:
                self.close()
            srv = server.start_spec(self.specs[side], self.log_dir / f"{side}.log", self.ready_timeout)
            self.start_s.setdefault(side, srv.start_s)
            self.argv.setdefault(side, srv.argv)
            self.up[side] = srv
        return self.up[side]

    def close(self) -> None:
        for srv in self.up.values():
            server.stop(srv)
        self.up.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def run_rounds(sides: Sides, requests: list[Request], job: dict, cfg: dict, paired: bool, rule, order,
                     progress=None) -> tuple[dict, dict]:
    """Warm-up per side, then one round per repeat in `order(i, paired)` (job.unit_order: ABBA). Returns (rows by
    side, the growth of each side's /metrics counters)."""
    import httpx

    extra = {"cache_prompt": False, "return_tokens": True} if cfg["kind"] == "llama-server" else None
    kw = dict(rate=job["request_rate"], seed=job["seed"], extra=extra, model=cfg["model_name"])
    c = job["concurrency"]
    rows = {"cell": [], "baseline": []}
    growth: dict = {"cell": None, "baseline": None}
    index = 0
    by_repeat = [[r for r in requests if r.repeat == repeat] for repeat in range(job["repeats"])]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=c + 2), timeout=None) as client:
        for side in order(0, paired):  # warm-up: one concurrent batch per side, not stored
            if job["warmup"]:
                warm = [by_repeat[0][i % len(by_repeat[0])] for i in range(c * job["warmup"])]
                done = await drive(sides.get(side).url, warm, c, job["max_new_tokens"], client=client,
                                   **{**kw, "rate": None})
                failed = [res.error for _, res in done if res.error]
                if failed:
                    raise server.ServerError(f"warm-up request to the {side} server failed: {failed[0]}")
        for i, batch in enumerate(by_repeat):
            for side in order(i, paired):
                url = sides.get(side).url
                before = await server.read_metrics(client, url)
                done = await drive(url, batch, c, job["max_new_tokens"], client=client, **kw)
                growth[side] = add_growth(growth[side], metric_growth(before, await server.read_metrics(client, url)))
                for request, result in done:
                    row = request_row(request, result, rule)
                    row.update(decode_index=index, concurrency=c)
                    index += 1
                    rows[side].append(row)
                    if progress:
                        progress(row if side == "cell" else {**row, "paired_baseline": True})
    return rows, growth


def mark_identity(rows: dict) -> None:
    """Each cell row's `matches_plain`: its output equals the plain side's for the same prompt and repeat."""
    plain = {(r["prompt_id"], r["repeat"]): r.get("token_hash") for r in rows["baseline"] if r["status"] == "ok"}
    for r in rows["cell"]:
        other = plain.get((r["prompt_id"], r["repeat"]))
        r["matches_plain"] = None if r["status"] != "ok" or other is None else r.get("token_hash") == other


def summarise(rows: list[dict], growth: dict | None, slo_ms: float | None, start_s: float | None) -> dict:
    summary = serving.cell_metrics(rows, slo_ms / 1000 if slo_ms else None)
    identical = [r["matches_plain"] for r in rows if r.get("matches_plain") is not None]
    if identical:
        summary["identical_share"] = sum(identical) / len(identical)
    drafted = sum(r.get("proposed_tokens") or 0 for r in rows)
    if drafted:
        summary["acceptance_rate"] = sum(r.get("accepted_tokens") or 0 for r in rows) / drafted
    summary["server_start_s"] = start_s
    summary["server_metrics"] = growth
    return summary


def run_server_cell(job: dict, registry: dict, prompts: list[dict], paired: bool, rule, log_dir: Path, order,
                    progress=None) -> tuple[list[dict], list[dict], dict]:
    """The job's rows (cell, paired baseline) and serving summaries by side. Raises (ServerError, ModelError) when a
    server cannot start or cannot be warmed up: the caller fails the whole cell."""
    cfg = {**SERVER_DEFAULTS, **(job.get("server") or {})}
    cell_spec, plain_spec = server_specs(job, registry, job["strategy"], cfg)
    server.check_spec(cell_spec)
    if paired:
        if cfg["kind"] == "url" and not cfg["baseline_url"]:
            raise server.ServerError("a paired server cell given by URL needs server.baseline_url (the same model "
                                     "served without speculation), or baseline: shared")
        server.check_spec(plain_spec)
    requests = encode_requests(job, registry, prompts)
    specs = {"cell": cell_spec, **({"baseline": plain_spec} if paired else {})}
    with Sides(specs, log_dir, cfg["ready_timeout"]) as sides:
        for side in specs:  # every server up (or, one at a time, startable) before the first measured request
            sides.get(side)
        rows, growth = asyncio.run(run_rounds(sides, requests, job, cfg, paired, rule, order, progress))
        argv = dict(sides.argv)
        start_s = dict(sides.start_s)
    mark_identity(rows)
    summaries = {side: summarise(rows[side], growth[side], cfg["tpot_slo_ms"], start_s.get(side))
                 for side in specs}
    for side in specs:
        summaries[side]["argv"] = argv.get(side)
    for side_rows in rows.values():  # absolute clocks were only for the cell metrics
        for r in side_rows:
            r.pop("sent_s", None)
            r.pop("done_s", None)
            r.pop("itl_s", None)
    return rows["cell"], rows["baseline"], summaries
