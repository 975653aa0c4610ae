"""Tensor-parallel cells: the target sharded over N GPUs by transformers' tensor-parallel plan, under torchrun.

`specdec run-job` stays one command per cell. With `gpu_mode: tensor` and `gpus: N > 1` it claims the GPUs and
checks memory as for any cell, then re-runs the cell under `torch.distributed.run` with nproc = N and
CUDA_VISIBLE_DEVICES = the claimed devices (`run_under_torchrun`); rank 0 writes the result document, which the
parent returns as the cell's result.

Every rank runs the same decoding loop. The target's forward passes are collective (each rank holds 1/N of every
sharded Linear; transformers inserts the all-reduces and gathers the logits), so every rank sees the same logits,
draws the same tokens from identically seeded generators, and stops at the same step. The draft is not sharded: it
lives whole on rank 0's device and its logits are broadcast to the other ranks (`RankZeroDraft`), as vLLM runs a
small draft at tensor-parallel size 1. A failure on any rank ends that rank with an error file; torchrun then stops
the others and the parent stores the first error as the cell's failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from specdec.model.models import LoadedModel, load_model, resolve, shared_logit_rows
from specdec.run.runner import Pair, load_pair

WORKER_ENV = "SPECDEC_TP_WORKER"


class ParallelError(RuntimeError):
    """The tensor-parallel workers failed (one-line message with the first rank's error)."""


def in_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1" and "RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def worker_device() -> str:
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def init_worker() -> str:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and return this rank's device."""
    import torch.distributed as dist

    device = worker_device()
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device


class RankZeroDraft:
    """The draft model as every rank sees it: rank 0 runs the real model and broadcasts its logits (float32,
    [1, n, rows]); the other ranks hold no weights and receive them. The caller's bookkeeping (cache lengths,
    rollbacks) is identical on all ranks; on ranks > 0 the cache simply stays empty."""

    def __init__(self, model, rows: int, device: str):
        self.model, self.rows, self.device = model, rows, device
        self.config = getattr(model, "config", None)
        self.dtype = getattr(model, "dtype", None) or torch.float32  # tree masks are built in it on every rank

    def parameters(self):
        return self.model.parameters() if self.model is not None else iter(())

    def state_dict(self, *args, **kwargs):  # devices.loaded_bytes counts saved buffers too; ranks > 0 hold none
        return self.model.state_dict(*args, **kwargs) if self.model is not None else {}

    def __getattr__(self, name):
        # Everything but the forward call is the real model's (on rank 0), e.g. for decoding.prepare_model.
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(name)
        return getattr(model, name)

    def __call__(self, input_ids, logits_to_keep=1, **kwargs):
        import torch.distributed as dist

        if self.model is not None:  # kwargs: cache, positions and tree masks, as decoding.forward passes them
            out = self.model(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
            logits = out.logits[:, -logits_to_keep:].float().contiguous()
        else:
            logits = torch.empty(1, logits_to_keep, self.rows, dtype=torch.float32, device=self.device)
        dist.broadcast(logits, src=0)
        return SimpleNamespace(logits=logits)


def load_pair_tensor_parallel(target_alias: str, draft_alias: str | None, registry: dict):
    """Inside a worker: the target sharded over all ranks, the draft whole on rank 0 (see RankZeroDraft)."""
    import torch.distributed as dist

    device = init_worker()
    target = load_pair(target_alias, None, registry, device=device, tp_plan="auto").target
    if not draft_alias:
        return Pair(target)
    spec = resolve(draft_alias, registry)
    meta = torch.zeros(3, dtype=torch.long, device=device)  # ok, draft logit rows, shared vocab (0 = all rows)
    draft, error = None, None
    if rank() == 0:
        try:
            draft = load_model(spec, device=device)
            rows = draft.model.get_output_embeddings().out_features
            meta = torch.tensor([1, rows, shared_logit_rows(target, draft) or 0], device=device)
        except Exception as exc:  # tell the other ranks before raising, so none waits for a draft that never comes
            error = exc
    dist.broadcast(meta, src=0)
    ok, rows, vocab = meta.tolist()
    if not ok:
        raise error if error is not None else ParallelError(f"rank 0 could not load the draft '{draft_alias}'")
    wrapped = RankZeroDraft(draft.model if draft else None, rows, device)
    loaded = LoadedModel(spec=spec, model=wrapped, tokenizer=draft.tokenizer if draft else None, device=device,
                         load_s=draft.load_s if draft else 0.0, eos_token_ids=target.eos_token_ids)
    return Pair(target, loaded, vocab or None)


def gather(value) -> list:
    """One value from every rank, in rank order (on every rank)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def child_visible_devices(indices: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for the workers: the claimed indices, translated through the parent's own mask."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent is None:
        return ",".join(str(i) for i in indices)
    entries = [e.strip() for e in parent.split(",") if e.strip()]
    return ",".join(entries[i] for i in indices)


def run_under_torchrun(job: dict, nproc: int, indices: list[int]) -> dict:
    """Run the cell on `nproc` ranks and return rank 0's result document; ParallelError if the workers fail."""
    tmp = Path(tempfile.mkdtemp(prefix="specdec-tp-"))
    try:
        job_path, out = tmp / "job.json", tmp / "result.json"
        job_path.write_text(json.dumps(job))
        env = {**os.environ, WORKER_ENV: "1"}
        if indices:
            env["CUDA_VISIBLE_DEVICES"] = child_visible_devices(indices)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "specdec.run.tp_worker", str(job_path), str(out)]
        code = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode
        if code != 0 or not out.is_file():
            errors = sorted(tmp.glob("rank*.error"))
            first = errors[0].read_text().strip() if errors else "no rank reported an error (see the job's log)"
            raise ParallelError(f"tensor-parallel workers failed (torchrun exit {code}): {first}")
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
