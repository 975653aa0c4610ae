"""A stand-in OpenAI-compatible server for the serving tests: stdlib http.server on 127.0.0.1, streaming
`/v1/completions` as server-sent events the way llama-server does (one chunk per token, `timings` and `usage` in
the last chunk), with knobs for the protocol's failure modes. Run as a script it serves until killed (the
start/stop tests launch it as a server process: `python standin_server.py PORT`)."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Behaviour:
    def __init__(self, tokens=("Hello", " world", "!"), first_delay=0.05, gap=0.02, busy_first=0, status=200,
                 break_after=None, error_event=False, timings=True, token_ids=True):
        self.tokens, self.first_delay, self.gap = list(tokens), first_delay, gap
        self.busy_first, self.status, self.break_after = busy_first, status, break_after
        self.error_event, self.timings, self.token_ids = error_event, timings, token_ids
        self.requests, self.in_flight, self.max_in_flight, self.bodies = 0, 0, 0, []
        self.lock = threading.Lock()


def make_handler(b: Behaviour):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, b'{"status": "ok"}')
            elif self.path == "/metrics":
                self.reply(200, f"# TYPE requests counter\nstandin:requests_total {b.requests}\n".encode(),
                           "text/plain")
            else:
                self.reply(404, b'{"error": {"message": "not found"}}')

        def reply(self, code, body, kind="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with b.lock:
                b.requests += 1
                b.bodies.append(body)
                n = b.requests
                b.in_flight += 1
                b.max_in_flight = max(b.max_in_flight, b.in_flight)
            try:
                if n <= b.busy_first:
                    return self.reply(503, b'{"error": {"message": "Loading model", "code": 503}}')
                if b.status != 200:
                    return self.reply(b.status, json.dumps({"error": {"message": "bad prompt: too long"}}).encode())
                self.stream(body)
            finally:
                with b.lock:
                    b.in_flight -= 1

        def event(self, obj) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        def stream(self, body):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            tokens = b.tokens[:body.get("max_tokens", len(b.tokens))]
            time.sleep(b.first_delay)
            for i, text in enumerate(tokens):
                if i:
                    time.sleep(b.gap)
                if b.break_after is not None and i == b.break_after:
                    self.wfile.write(b"data: {\"choices\": [{\"te")  # cut mid-event, then the connection closes
                    return
                chunk = {"choices": [{"text": text, "index": 0, "finish_reason": None}]}
                if b.token_ids and body.get("return_tokens"):
                    chunk["tokens"] = [100 + b.tokens.index(text)]
                self.event(chunk)
            if b.error_event:
                self.event({"error": {"message": "slot crashed"}})
                return
            last = {"choices": [{"text": "", "index": 0, "finish_reason": "length"}],
                    "usage": {"completion_tokens": len(tokens), "prompt_tokens": len(body["prompt"])}}
            if b.timings:
                last["timings"] = {"predicted_n": len(tokens), "draft_n": 4, "draft_n_accepted": 1,
                                   "predicted_per_second": 50.0}
            self.event(last)
            self.wfile.write(b"data: [DONE]\n\n")

    return Handler


def serve(behaviour: Behaviour, port: int = 0) -> ThreadingHTTPServer:
    """Start in a daemon thread; returns the server (its port: server.server_address[1]; stop: shutdown())."""
    httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(behaviour))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


if __name__ == "__main__":
    serve(Behaviour(), int(sys.argv[1]))
    print("listening", flush=True)
    while True:
        time.sleep(3600)
