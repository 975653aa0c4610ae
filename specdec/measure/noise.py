"""What else loads the machine while a cell runs: readings taken in the background, summarised per run.

A speedup is a ratio of two speeds measured on a machine that may be shared. Paired baselines (specdec/run/job.py)
cancel slow drift, but not load that comes and goes within seconds, and nothing cancels a machine that is simply
too busy to measure on. So every cell samples, every SAMPLE_S seconds while it decodes:

- the 1-minute load average (/proc/loadavg) — recorded, not judged: it counts the cell's own threads too;
- CPU time used by *other* processes: all CPUs' busy time from /proc/stat minus the CPU time of this process tree
  (the job and its children, e.g. tensor-parallel ranks), as cores kept busy on average;
- CPU steal (/proc/stat): time a hypervisor gave this VM's CPUs to someone else, as a share of all CPU time;
- on GPUs, compute processes on the claimed devices that are not ours (nvidia-smi --query-compute-apps).

The readings and the spread of the paired baseline's tok/s over repeats are stored per run; the store's
`run_noise` view (db/views.sql) flags a run `noisy` when one passes its threshold (config `noise:`, defaults in
THRESHOLDS), so a changed threshold re-judges stored runs without measuring them again.

Everything that touches the real machine is a function passed in (`read`, `clock`, `query_gpus`), so tests
inject readings and never depend on the clock or the load of the machine running them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SAMPLE_S = 2.0  # seconds between readings: a few per prompt, cheap (three small /proc reads)

# Defaults of the config's `noise:` thresholds (workflow/schemas/config.schema.yaml repeats them for the docs).
# A run is noisy when a reading is above its threshold:
THRESHOLDS = {
    "other_cpu_cores": 0.25,  # cores kept busy by other processes, on average over the cell
    "steal_share": 0.05,  # share of CPU time stolen by the hypervisor
    "gpu_other_processes": 0,  # compute processes of others on a claimed GPU (most seen at once)
    # paired baseline tok/s: (max − min) ÷ median over repeats, median over prompts. Calibrated on a 2-core AMD EPYC
    # VM (2026-12-01, 3 repeats of 64 tokens): quiet runs spread 1–31 % (2-s decodes vary that much with nothing
    # else running), runs under a CPU hog 42–81 %; the CPU readings above catch foreign load more surely.
    "baseline_spread": 0.35,
}


@dataclass(frozen=True)
class Reading:
    """One sample. CPU figures are cumulative seconds (since boot, or since the process started), so a window's
    use is the difference of two readings."""

    t: float  # clock seconds (monotonic)
    busy_s: float  # all CPUs: user + nice + system + irq + softirq (guest time is inside user)
    steal_s: float  # all CPUs: steal
    total_s: float  # all CPUs: every state, idle and iowait included
    own_s: float  # this process tree: user + system, children included
    load1: float | None = None  # 1-minute load average
    gpu_other: int | None = None  # others' compute processes on the claimed GPUs; None when not checked


# ---------------------------------------------------------------------------------------------------- parsing

def parse_proc_stat(text: str, ticks_per_s: float = 100.0) -> tuple[float, float, float]:
    """(busy, steal, total) seconds of all CPUs from /proc/stat's first (`cpu`) line."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            # user nice system idle iowait irq softirq steal guest guest_nice (guest is already inside user)
            values = [float(v) / ticks_per_s for v in fields[1:11]] + [0.0] * 10
            user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
            return user + nice + system + irq + softirq, steal, user + nice + system + idle + iowait + irq + softirq + steal
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def parse_loadavg(text: str) -> float:
    return float(text.split()[0])


def parse_compute_apps(text: str, uuids: list[str], own_pids: set[int]) -> int:
    """Processes on the GPUs `uuids` that are not ours, from the CSV of
    `nvidia-smi --query-compute-apps=gpu_uuid,pid --format=csv,noheader`. A process on two claimed GPUs counts
    once. In a container without the host's PID namespace nvidia-smi shows host PIDs, so our own processes can
    look foreign there: raise `noise.gpu_other_processes` for such machines."""
    wanted = {_uuid_key(u) for u in uuids}
    others = set()
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[1].isdigit():
            continue  # a header, "No running processes found", or "[N/A]"
        if _uuid_key(parts[0]) in wanted and int(parts[1]) not in own_pids:
            others.add(int(parts[1]))
    return len(others)


def _uuid_key(uuid: str) -> str:
    return uuid.strip().lower().removeprefix("gpu-")


# ---------------------------------------------------------------------------------------------------- reading

def own_tree_cpu_s(pid: int | None = None) -> tuple[float, set[int]]:
    """CPU seconds of a process and all its live descendants, and their pids. Each process's `children_*` times
    hold its exited, waited-for children, so every process of the tree is counted exactly once."""
    import psutil

    root = psutil.Process(pid)
    total, pids = 0.0, set()
    for proc in [root] + root.children(recursive=True):
        try:
            t = proc.cpu_times()
        except psutil.Error:  # exited between listing and reading: its parent's children_* has it next time
            continue
        total += t.user + t.system + t.children_user + t.children_system
        pids.add(proc.pid)
    return total, pids


def query_compute_apps() -> str:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    return out.stdout if out.returncode == 0 else ""


def read_machine(gpu_uuids: list[str] | None = None, clock: Callable[[], float] = time.monotonic,
                 query_gpus: Callable[[], str] = query_compute_apps) -> Reading:
    """One reading of this machine (Linux /proc), with the GPUs `gpu_uuids` checked for other processes."""
    busy, steal, total = parse_proc_stat(Path("/proc/stat").read_text(), os.sysconf("SC_CLK_TCK"))
    load1 = parse_loadavg(Path("/proc/loadavg").read_text())
    own, pids = own_tree_cpu_s()
    gpu_other = None
    if gpu_uuids:
        try:
            gpu_other = parse_compute_apps(query_gpus(), gpu_uuids, pids)
        except (OSError, subprocess.SubprocessError):
            gpu_other = None  # no nvidia-smi: not checked, rather than "nobody there"
    return Reading(clock(), busy, steal, total, own, load1, gpu_other)


class Sampler:
    """Takes a reading now, then every `interval` seconds on a daemon thread until stop(), then one more.

        sampler = Sampler(lambda: read_machine(uuids)).start()
        ...decode...
        readings = sampler.stop()

    `read` is any function returning a Reading (tests pass canned ones). A failing read ends the sampling quietly:
    noise figures are then computed from the readings taken so far, or left out."""

    def __init__(self, read: Callable[[], Reading], interval: float = SAMPLE_S):
        self.read, self.interval = read, interval
        self.readings: list[Reading] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _take(self) -> bool:
        try:
            self.readings.append(self.read())
            return True
        except Exception:  # noqa: BLE001 — a reading is never worth failing the cell for
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval) and self._take():
            pass

    def start(self) -> "Sampler":
        if self._take():
            self._thread = threading.Thread(target=self._loop, name="specdec-noise", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> list[Reading]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._take()
        return self.readings


# ---------------------------------------------------------------------------------------------------- figures

def summarise(readings: list[Reading]) -> dict:
    """The run's noise fields from its readings (None where fewer than two readings make no window):
    `other_cpu_cores`, `steal_share`, `load_avg` (mean 1-minute load), `gpu_other_processes` (most at once),
    `noise_samples` (readings taken)."""
    loads = [r.load1 for r in readings if r.load1 is not None]
    gpus = [r.gpu_other for r in readings if r.gpu_other is not None]
    out = {"other_cpu_cores": None, "steal_share": None, "load_avg": statistics.fmean(loads) if loads else None,
           "gpu_other_processes": max(gpus, default=None), "noise_samples": len(readings)}
    if len(readings) >= 2:
        first, last = readings[0], readings[-1]
        seconds = last.t - first.t
        if seconds > 0:
            # clamp at 0: our tree's counters and /proc/stat tick at different moments, so a quiet machine can
            # come out a hair negative
            out["other_cpu_cores"] = max(0.0, (last.busy_s - first.busy_s) - (last.own_s - first.own_s)) / seconds
        if last.total_s > first.total_s:
            out["steal_share"] = (last.steal_s - first.steal_s) / (last.total_s - first.total_s)
    return out


def repeat_spread(rows: list[dict]) -> float | None:
    """How much one prompt's tok/s varies between repeats: (max − min) ÷ median over the ok repeats of each
    prompt, then the median over prompts (robust to one odd prompt). None without a prompt measured twice —
    with `repeats: 1` there is nothing to compare."""
    by_prompt: dict[str, list[float]] = {}
    for row in rows:
        if row.get("status") == "ok" and row.get("tokens_per_s"):
            by_prompt.setdefault(row["prompt_id"], []).append(row["tokens_per_s"])
    spreads = [(max(v) - min(v)) / statistics.median(v) for v in by_prompt.values() if len(v) >= 2]
    return statistics.median(spreads) if spreads else None


def check_thresholds(values: dict | None) -> dict[str, float]:
    """The config's `noise:` merged over THRESHOLDS; unknown names or negative values are a ValueError."""
    values = values or {}
    unknown = sorted(set(values) - set(THRESHOLDS))
    if unknown:
        raise ValueError(f"noise: unknown threshold(s) {unknown}; known: {', '.join(THRESHOLDS)}")
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"noise.{name}: must be a number >= 0, got {value!r}")
    return {**THRESHOLDS, **{k: float(v) for k, v in values.items()}}
