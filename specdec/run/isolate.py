"""A native crash stays in the process that had it: a segfault in llama.cpp, our C++ kernels or any extension kills
one child, and its parent, which loaded nothing native, says what died and how.

`run_child` runs a command whose process calls `enable_crash_dump` (faulthandler writes the Python frames of a
fatal signal to a file the parent names in $SPECDEC_CRASH_DUMP) and returns, for a child that died of a signal,
the signal and the innermost Python frame. The parent forwards SIGTERM, SIGINT and SIGHUP to the child, and a
child stopped that way is not a crash. `run_job_isolated` is `specdec run-job`: the cell runs in a child, and a
child that dies of a signal still leaves the cell's result file, every row failed with a one-line reason.

Standard library only, so a parent costs a Python start-up (tens of milliseconds), not torch's import.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CRASH_DUMP_ENV = "SPECDEC_CRASH_DUMP"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_dump_file = None  # the open dump file of this process (faulthandler writes to its descriptor)


def in_child() -> bool:
    return bool(os.environ.get(CRASH_DUMP_ENV))


def enable_crash_dump() -> None:
    """In a child of run_child: on SIGSEGV, SIGBUS, SIGFPE, SIGABRT or SIGILL write every Python thread's frames
    to the parent's dump file before dying."""
    global _dump_file
    path = os.environ.get(CRASH_DUMP_ENV)
    if path:
        _dump_file = open(path, "w")
        faulthandler.enable(_dump_file, all_threads=True)


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def crashing_frame(dump: str) -> str | None:
    """The innermost Python frame of a faulthandler dump: of the thread that received the signal where it is a
    Python thread ('Current thread ...'), else of the first thread listed (a native thread of a library crashed:
    the Python thread waiting on it, e.g. in Llama.eval)."""
    lines = dump.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), 0)
    return next((line.strip() for line in lines[start:] if line.strip().startswith("File ")), None)


def run_child(cmd: list[str], **popen) -> tuple[int, dict | None]:
    """Run `cmd` to the end → (returncode, crash). crash is None unless the child died of a signal this process
    did not forward; then {'signal': 'SIGSEGV', 'frame': 'File "...", line N in f' or None, 'dump': text}.
    A forwarded stop makes this process exit with 128 + the signal once the child is gone."""
    fd, dump = tempfile.mkstemp(prefix="specdec-crash-", suffix=".txt")
    os.close(fd)
    stopped: list[int] = []
    proc = subprocess.Popen(cmd, env={**os.environ, **popen.pop("env", {}), CRASH_DUMP_ENV: dump}, **popen)

    def forward(signum, frame):
        stopped.append(signum)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        returncode = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        text = Path(dump).read_text(errors="replace")
        os.unlink(dump)
    if stopped:
        sys.exit(128 + stopped[0])
    if returncode >= 0:
        return returncode, None
    return returncode, {"signal": signal_name(returncode), "frame": crashing_frame(text), "dump": text}


def run_job_isolated(spec: str, out: str) -> int:
    """`specdec run-job`: the cell in a child process (`specdec run-job` again, which runs it). A child that dies
    of a signal before writing its result leaves one all the same (job.crashed_document), and this returns 0 so
    the workflow runs on; one that dies after writing it (a crash on exit) keeps what it measured."""
    started = time.time_ns()
    returncode, crash = run_child([sys.executable, "-m", "specdec.cli", "run-job", "--job", spec, "--out", out])
    if crash is None:
        return returncode
    sys.stderr.write(crash["dump"])
    if Path(out).is_file() and Path(out).stat().st_mtime_ns >= started:
        print(f"specdec: the cell's process died of {crash['signal']} after writing {out}; its results are kept",
              file=sys.stderr)
        return 0
    from specdec.run.job import crashed_document, read_job, write_atomic  # torch and co: only after a crash

    job = read_job(spec)
    document = crashed_document(job, crash)
    write_atomic(out, document)
    print(f"specdec: cell {job['cell'] or job['strategy']} CRASHED, stored as failed in {out}: "
          f"{document['run']['error']}", file=sys.stderr)
    return 0
