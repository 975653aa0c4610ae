"""Real-browser test of the dashboard: `specdec dashboard` on the fixture store, every page loaded in headless
Chromium, a screenshot of each saved under test-output/dashboard/.

Streamlit renders in the browser after the script has run on the server and sent its output over a websocket, so
`chromium --dump-dom --virtual-time-budget` returns an empty app (virtual time does not wait for websocket
messages). Instead the test drives Chromium over the DevTools protocol (the `websockets` client ships with
Streamlit) and polls the page until the script has finished and every chart has drawn.

Skipped, not failed, only when no Chromium binary is found (`apt-get install chromium`; .ci/run installs it).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from dashboard_fixture import BEST, build_fixture_db, make_result, write_results
from specdec.db import report
from specdec.db.store import ingest

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "test-output" / "dashboard"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1000", "--remote-debugging-port=0")
# Text Streamlit puts on the page when the script raised or the server went away.
FAILURE_TEXT = ("Traceback (most recent call last)", "StreamlitAPIException", "Connection error",
                "Is Streamlit still running?")
PAGE_HEADERS = {"overview": "Overview", "leaderboard": "Leaderboard", "speedup": "Speedup vs draft length", "acceptance": "Acceptance",
                "predicted": "Predicted vs measured speedup", "latency": "Latency and memory",
                "scaling": "Scaling with GPU count", "losslessness": "Losslessness",
                "engines": "Engines and weight formats", "runs": "Runs", "sql": "SQL console"}
# Charts each page draws on the fixture store (the SQL console and runs pages draw none).
PAGE_CHARTS = {"overview": 0, "leaderboard": 0, "speedup": 1, "acceptance": 4, "predicted": 1, "latency": 1,
               "scaling": 2, "losslessness": 1, "engines": 1, "runs": 0, "sql": 0}

# Polled in the page: the app's run state, the charts and whether each has drawn, and any exception boxes.
PAGE_STATE_JS = """(() => {
  const app = document.querySelector('[data-testid="stApp"]');
  const charts = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')];
  const drawn = charts.filter(c => [...c.querySelectorAll('canvas, svg')]
    .some(e => e.getBoundingClientRect().width > 50));
  const main = document.querySelector('[data-testid="stMainBlockContainer"]');
  return {
    script: app ? app.getAttribute('data-test-script-state') : null,
    connection: app ? app.getAttribute('data-test-connection-state') : null,
    headings: [...document.querySelectorAll('[data-testid="stMain"] h1, [data-testid="stMain"] h2')]
      .map(h => h.innerText),
    charts: charts.length, drawn: drawn.length,
    exceptions: [...document.querySelectorAll('[data-testid="stException"]')].map(e => e.innerText),
    metrics: Object.fromEntries([...document.querySelectorAll('[data-testid="stMetric"]')].map(m => [
      m.querySelector('[data-testid="stMetricLabel"]')?.innerText.trim(),
      m.querySelector('[data-testid="stMetricValue"]')?.innerText.trim()])),
    // card labels/values cut short with an ellipsis (text wider than its box)
    cut: [...document.querySelectorAll('[data-testid="stMetric"] *')]
      .filter(e => getComputedStyle(e).textOverflow === 'ellipsis' && e.scrollWidth > e.clientWidth + 1)
      .map(e => e.innerText),
    text: document.body.innerText,
    height: main ? Math.ceil(main.scrollHeight) : 0,
    search: window.location.search,
  };
})()"""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


class DevTools:
    """A headless Chromium and a DevTools-protocol session on its one page."""

    def __init__(self, binary: str):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="specdec-chromium-")
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"{binary} did not open a DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        # entered by hand (closed in close()): a fixture owns the session across tests, not one `with` block
        self.ws = connect(page["webSocketDebuggerUrl"], proxy=None, max_size=None, open_timeout=30).__enter__()
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # skip events; answers come back in order
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def load_app_page(self, url: str, timeout: float = 90.0) -> dict:
        """Open `url` and wait until the script has finished, every chart has drawn and nothing changed for two
        polls in a row; then make the viewport as tall as the page (so the screenshot shows all of it) and wait
        for the charts to redraw at that size."""
        self.resize(1400, 1000)
        self.call("Page.navigate", url=url)
        state = self._settle(timeout)
        self.resize(1400, max(1000, min(state["height"] + 160, 7000)))
        return self._settle(timeout)

    def _settle(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        previous, state = None, None
        while time.monotonic() < deadline:
            time.sleep(0.4)
            state = self.evaluate(PAGE_STATE_JS) or {}
            ready = (state.get("script") == "notRunning" and state.get("connection") == "CONNECTED"
                     and state.get("headings") and state["drawn"] == state["charts"])
            key = (state.get("script"), state.get("charts"), state.get("drawn"), state.get("height"),
                   len(state.get("text", "")))
            if ready and key == previous:
                return state
            previous = key if ready else None
            if state.get("exceptions"):  # no point waiting for a page that has failed
                return state
        raise TimeoutError(f"page did not finish rendering in {timeout:g} s; last state: "
                           f"{ {k: v for k, v in (state or {}).items() if k != 'text'} }")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def chromium():
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium found (apt-get install chromium); the real-browser test needs one")
    browser = DevTools(binary)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`specdec dashboard --db FIXTURE --port N`, the way a user starts it (the launcher runs streamlit in its own
    process, so the whole process group is stopped at the end)."""
    db = build_fixture_db(tmp_path_factory.mktemp("browser"))
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "dashboard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "specdec.cli", "dashboard", "--db", str(db),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        try:
            wait_for(f"http://localhost:{port}/_stcore/health", 60, proc)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"dashboard did not start: {exc}\n{log.read_text(errors='replace')[-2000:]}")
        yield f"http://localhost:{port}/", db
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def check_no_failure(state: dict, what: str) -> None:
    assert not state["exceptions"], f"{what}: exception on the page: {state['exceptions'][0][:500]}"
    for marker in FAILURE_TEXT:
        assert marker not in state["text"], f"{what}: {marker!r} on the page"


@pytest.mark.parametrize("page", list(PAGE_HEADERS))
def test_page_renders_in_chromium(chromium, app_url, page):
    url, _ = app_url
    state = chromium.load_app_page(f"{url}?page={page}")
    chromium.screenshot(OUT / f"{page}.png")  # saved before the checks, so a failing page can be looked at
    check_no_failure(state, page)
    assert PAGE_HEADERS[page] in state["headings"], state["headings"]
    assert state["charts"] == PAGE_CHARTS[page], f"{page}: {state['charts']} charts drawn"
    assert f"page={page}" in state["search"]  # the page is in the URL, so it can be shared
    if page == "overview":  # the headline cards as the browser shows them
        assert state["metrics"]["Best speedup"] == f"{BEST['speedup']:.2f}×", state["metrics"]
        assert state["metrics"]["Draft length k"] == str(BEST["k"])
        assert state["metrics"]["Strategy"] == BEST["strategy"]
        assert state["metrics"]["Pair (target ← draft)"] == f"{BEST['target']} ← {BEST['draft']}"
        assert not state["cut"], f"cards cut short: {state['cut']}"
    if page == "losslessness":
        assert "Mismatches (1)" in state["text"]


def test_shared_url_restores_filters_in_chromium(chromium, app_url):
    """A link with filters opens with those filters selected (and they stay in the URL)."""
    url, _ = app_url
    state = chromium.load_app_page(f"{url}?page=speedup&strategy=ngram&k=2&k=4")
    chromium.screenshot(OUT / "speedup-filtered.png")
    check_no_failure(state, "filtered speedup page")
    sidebar = chromium.evaluate("""[...document.querySelectorAll('[data-testid="stMultiSelect"]')]
        .map(m => m.innerText).join('\\n')""")
    assert "ngram" in sidebar and "speculative" not in sidebar
    assert "strategy=ngram" in state["search"] and "k=2" in state["search"] and "k=4" in state["search"]
    assert state["charts"] == 1


# The text of every chart's axes and legends (Vega draws SVG here: its text is in the DOM).
CHART_TEXT_JS = """[...document.querySelectorAll('[data-testid="stVegaLiteChart"]')].map(c =>
  [...c.querySelectorAll('svg text')].map(t => t.textContent))"""


@pytest.mark.parametrize("name, query, check", [
    # one GPU count: the x axis is labelled with that count, not with "0.000000"-style ticks
    ("scaling-one-gpu-count", "page=scaling&gpus=1", lambda texts: "1" in texts[0] and not any(
        "." in t and t.replace(".", "").isdigit() and t.endswith("0000") for t in texts[0])),
    # acceptance by category: both category names under each of the two heat maps, legend titles whole
    ("acceptance-filtered", "page=acceptance&strategy=speculative&strategy=ngram", lambda texts: (
        texts[0].count("code") == 2 and texts[0].count("summarisation") == 2
        and "mean acceptedtokens per step(median)" in texts[0])),  # one text element, a line per tspan
])
def test_chart_text_in_chromium(chromium, app_url, name, query, check):
    """Axis labels and titles as the browser draws them (screenshots under test-output/dashboard/)."""
    url, _ = app_url
    state = chromium.load_app_page(f"{url}?{query}")
    chromium.screenshot(OUT / f"{name}.png")
    check_no_failure(state, name)
    texts = chromium.evaluate(CHART_TEXT_JS)
    assert texts and check(texts), texts


def test_ingest_while_the_dashboard_is_open(chromium, app_url, tmp_path):
    """The server holds no connection between queries, so an ingest in another process succeeds while the app is
    open, and the next page load shows the new run (the query cache is keyed on the file's mtime and size).
    Last in this module: it changes the shared store."""
    url, db = app_url
    assert chromium.load_app_page(f"{url}?page=overview")["metrics"]["Best speedup"] == "2.00×"
    faster = make_result(host="lab-a", target=BEST["target"], draft=BEST["draft"], strategy="speculative", k=6,
                         speed=3.0, alpha=0.8)
    ingest(db, write_results([faster], tmp_path))
    state = chromium.load_app_page(f"{url}?page=overview")
    check_no_failure(state, "overview after ingest")
    assert state["metrics"]["Best speedup"] == "3.00×" and state["metrics"]["Draft length k"] == "6"


REPORT_STATE_JS = """(() => ({
  ready: document.readyState,
  figures: [...document.querySelectorAll('figure svg')].map(e => Math.round(e.getBoundingClientRect().width)),
  marks: document.querySelectorAll('figure svg path, figure svg line').length,
  tables: [...document.querySelectorAll('table')].map(t => t.rows.length),
  // anything the page fetched (it must need nothing: one self-contained file)
  fetched: performance.getEntriesByType('resource').map(e => e.name),
  height: Math.ceil(document.documentElement.scrollHeight),
  wide: [...document.querySelectorAll('.scroll')].filter(d => d.scrollWidth > d.clientWidth + 1).length,
  text: document.body.innerText,
}))()"""


def test_report_html_renders_in_chromium(chromium, tmp_path):
    """`specdec report`'s HTML opened from disk with no server: the leaderboard and provenance tables, both figures
    drawn at full size, nothing fetched. The screenshot is saved as test-output/report/report.png."""
    built = report.collect(build_fixture_db(tmp_path))
    out = OUT.parent / "report"
    report.write_report(built, out)
    chromium.resize(1400, 1000)
    chromium.call("Page.navigate", url=(out / "report.html").as_uri())
    deadline = time.monotonic() + 30
    while (state := chromium.evaluate(REPORT_STATE_JS) or {}).get("ready") != "complete":
        assert time.monotonic() < deadline, "report.html did not finish loading"
        time.sleep(0.2)
    chromium.resize(1400, min(state["height"] + 40, 7000))
    chromium.screenshot(out / "report.png")
    assert state["fetched"] == []
    assert len(state["figures"]) == 2 and min(state["figures"]) > 500, state["figures"]
    assert state["marks"] > 50  # lines, points and axes were drawn, not an empty frame
    assert state["tables"] == [len(built.table) + 1, len(built.provenance) + 1]
    assert f"{BEST['strategy']}\t{BEST['draft']}\t{BEST['k']}" in state["text"]
