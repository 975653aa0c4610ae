"""Entry point of every tensor-parallel rank: `python -m specdec.run.tp_worker JOB OUT`, started by torchrun from
parallel.run_under_torchrun. Each rank runs the cell (job.run_cell); rank 0 writes the result document."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from specdec.run.job import one_line, read_job, run_cell, write_atomic
from specdec.run.parallel import rank


def worker_main(argv: list[str]) -> int:
    """Entry point of every rank (python -m specdec.run.tp_worker JOB OUT under torchrun)."""
    job_path, out = argv
    out = Path(out)
    try:
        job = read_job(job_path)
        progress = None
        if rank() == 0:
            def progress(row):
                status = f"{row['tokens_per_s']:6.1f} tok/s" if row["status"] == "ok" else f"FAILED {row['error']}"
                print(f"  {job['cell'] or job['strategy']}  {row['prompt_id']:<10} r{row['repeat']}  {status}",
                      file=sys.stderr, flush=True)
        document = run_cell(job, progress)
        if rank() == 0:
            write_atomic(out, document)
    except BaseException as exc:
        traceback.print_exc()
        (out.parent / f"rank{rank()}.error").write_text(f"rank {rank()}: {one_line(exc)}")
        return 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
