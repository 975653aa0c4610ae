"""The machine's limits, measured: memory bandwidth (a streaming read of a buffer far larger than the caches) and
peak float32 multiply-add and int8 VNNI rates on the threads torch uses (csrc/machine_probe.cpp), so a decoding
pass's time can be set against its roofline bound: max(bytes read / bandwidth, operations / peak).

The probe takes about 2 s and is cached per host, CPU and thread count in $SPECDEC_CACHE_DIR (default
~/.cache/specdec)/machine.json; `specdec bench` prints it and each runner's pass time against its bound
(docs/kernels.md). On a busy machine the probe reads low, so each probe stores the load average it ran under: a cached
probe taken with more runnable processes than cores is measured again as soon as the machine is quieter, and each
figure keeps its best (delete the file to start over).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specdec.model import kernels

PROBE_BYTES = 1 << 30  # read: far beyond any L3 this project meets (256 MiB on the largest EPYCs)
FMA_ITERATIONS, VNNI_ITERATIONS = 20_000_000, 20_000_000  # per thread: ~0.1-0.3 s each
FMA_OPS = 16 * 16 * 2   # per iteration: 16 vector FMAs x 16 float32 lanes x (multiply, add)
VNNI_OPS = 16 * 64 * 2  # per iteration: 16 vpdpbusd x 64 int8 products x (multiply, add)


@dataclass(frozen=True)
class Machine:
    host: str
    cpu: str
    threads: int
    bandwidth_gb_s: float          # streaming read, 1e9 bytes per second
    float32_gflop_s: float         # fused multiply-add peak, 1e9 operations per second (a multiply-add = 2)
    int8_gop_s: float | None       # vpdpbusd peak; None where the CPU has no AVX-512 VNNI
    load_average: float | None = None  # /proc/loadavg's 1-minute figure when probed (None: not recorded)


def best_seconds(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls (the machine's limit is what it reaches at best)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def probe(cpu: str) -> Machine:
    """Measure now, on torch's current thread count (about 2 s plus allocating the buffer)."""
    ext = kernels.panel_extension()  # PanelKernelError where it cannot build: the caller says why
    buffer = torch.ones(PROBE_BYTES, dtype=torch.uint8)  # written once: the pages are real, not the zero page
    ext.probe_read(buffer)
    read_s = best_seconds(lambda: ext.probe_read(buffer))
    del buffer
    threads = torch.get_num_threads()
    fma_s = best_seconds(lambda: ext.probe_compute(FMA_ITERATIONS, False))
    vnni = kernels.quant_kernel_problem() is None
    vnni_s = best_seconds(lambda: ext.probe_compute(VNNI_ITERATIONS, True)) if vnni else None
    return Machine(host=socket.gethostname(), cpu=cpu, threads=threads, load_average=load_average(),
                   bandwidth_gb_s=round(PROBE_BYTES / read_s / 1e9, 2),
                   float32_gflop_s=round(threads * FMA_ITERATIONS * FMA_OPS / fma_s / 1e9, 1),
                   int8_gop_s=round(threads * VNNI_ITERATIONS * VNNI_OPS / vnni_s / 1e9, 1) if vnni else None)


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def busy(load: float | None) -> bool:
    """More runnable processes than cores: a probe then measures the other processes as well as the machine."""
    return load is not None and load > (os.cpu_count() or 1)


def best_of(old: Machine, new: Machine) -> Machine:
    """Each limit's higher figure (a limit is what the machine reaches at best), with the newer probe's load."""
    best = lambda a, b: b if a is None else a if b is None else max(a, b)  # noqa: E731
    return Machine(host=new.host, cpu=new.cpu, threads=new.threads, load_average=new.load_average,
                   bandwidth_gb_s=max(old.bandwidth_gb_s, new.bandwidth_gb_s),
                   float32_gflop_s=max(old.float32_gflop_s, new.float32_gflop_s),
                   int8_gop_s=best(old.int8_gop_s, new.int8_gop_s))


def cache_file() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE_DIR") or Path.home() / ".cache" / "specdec") / "machine.json"


def read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def cache_key(cpu: str, threads: int) -> str:
    return f"{socket.gethostname()}|{cpu}|{threads}"


def cached_limits(cpu: str, threads: int, cached: dict | None = None) -> tuple[Machine | None, bool]:
    """(this host's cached limits for `threads`, or None; whether to probe now): a missing probe, or one taken on a
    busy machine (or before loads were recorded) while this one is not busy."""
    entry = (read_cache() if cached is None else cached).get(cache_key(cpu, threads))
    try:
        old = Machine(**entry) if entry else None
    except TypeError:  # written by another version of this record: probe again
        old = None
    doubtful = old is not None and (old.load_average is None or busy(old.load_average))
    return old, old is None or (doubtful and not busy(load_average()))


def machine_limits(cpu: str) -> Machine:
    """This host's limits on torch's current thread count: from the cache, else probed and cached; a cached probe
    taken on a busy machine is probed again once the machine is not busy, keeping each figure's best."""
    cached, threads = read_cache(), torch.get_num_threads()
    old, stale = cached_limits(cpu, threads, cached)
    if not stale:
        return old
    machine = probe(cpu) if old is None else best_of(old, probe(cpu))
    cached[cache_key(cpu, threads)] = asdict(machine)
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cached, indent=1))
    tmp.replace(path)  # atomic: concurrent jobs never read half a file
    return machine


def roofline_ms(machine: Machine, bytes_read: float, ops: float, integer: bool) -> dict:
    """A pass's bound: memory (bytes / bandwidth) and compute (ops / the float32 or int8 peak), ms each, and the
    larger as the bound."""
    memory = 1e3 * bytes_read / (machine.bandwidth_gb_s * 1e9)
    peak = machine.int8_gop_s if integer and machine.int8_gop_s else machine.float32_gflop_s
    compute = 1e3 * ops / (peak * 1e9)
    return {"memory_ms": memory, "compute_ms": compute, "bound_ms": max(memory, compute)}


def run_record(cpu: str, threads: int) -> dict | None:
    """This host's limits as every CPU run of the workflow stores them (the run's `machine`, in extra_json): from
    the cache, else probed in a child process (the probe reads a 1 GiB buffer, which would otherwise count in the
    run's own peak memory) and cached. None where the probe cannot run here (no AVX-512 or no compiler for our
    kernels) or $SPECDEC_MACHINE_PROBE=off."""
    if os.environ.get("SPECDEC_MACHINE_PROBE", "on") == "off":
        return None
    old, stale = cached_limits(cpu, threads)
    if not stale:
        return asdict(old)
    if kernels.panel_kernel_problem() is not None:
        return None
    return probe_in_child(cpu, threads)


def probe_in_child(cpu: str, threads: int) -> dict | None:
    """machine_limits on `threads` in a fresh process (probed there and cached, or read from the cache)."""
    try:  # a probe that cannot run leaves the run without `machine`; it never fails the cell
        out = subprocess.run([sys.executable, "-m", "specdec.measure.machine", cpu, str(threads)],
                             capture_output=True, text=True, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":  # run_record's child: probe (or read the cache) on the given thread count, print JSON
    torch.set_num_threads(int(sys.argv[2]))
    print(json.dumps(asdict(machine_limits(sys.argv[1]))))
