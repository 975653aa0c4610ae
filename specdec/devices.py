"""Claiming GPUs for a job and planning where models go.

Snakemake counts `resources: gpu=N` but does not tell a local job *which* GPUs are its own, so a job claims N
distinct devices itself with exclusive, non-blocking `flock`s on one lock file per device. Locks are keyed by
the device's UUID (stable whatever CUDA_VISIBLE_DEVICES says) and vanish when the process exits, even if killed.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


class DeviceError(RuntimeError):
    """Not enough devices for a job (one-line message with what was asked and what exists)."""


@dataclass
class Claim:
    indices: list[int]
    names: list[str]
    handles: list = field(default_factory=list, repr=False)

    @property
    def devices(self) -> list[str]:
        return [f"cuda:{i}" for i in self.indices] if self.indices else ["cpu"]

    def release(self) -> None:
        for handle in self.handles:
            handle.close()
        self.handles.clear()


@dataclass
class DeviceInfo:
    index: int
    uuid: str
    name: str
    total_bytes: int


def visible_gpus() -> list[DeviceInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(DeviceInfo(i, str(getattr(props, "uuid", i)), props.name, int(props.total_memory)))
    return out


def lock_dir() -> Path:
    path = Path(os.environ.get("SPECDEC_GPU_LOCK_DIR", "/tmp/specdec-gpu-locks"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def claim_gpus(n: int, inventory: list[DeviceInfo] | None = None, timeout_s: float = 3600.0,
               poll_s: float = 2.0) -> Claim:
    """Claim n distinct devices, waiting (up to timeout_s) while other jobs hold them. n = 0 means the CPU."""
    if n == 0:
        return Claim([], [])
    gpus = visible_gpus() if inventory is None else inventory
    if n > len(gpus):
        raise DeviceError(f"the job asks for {n} GPU(s) but this machine has {len(gpus)} visible "
                          f"({', '.join(g.name for g in gpus) or 'no CUDA device'}); lower `gpus` in the config "
                          "or run on a node with more GPUs")
    deadline = time.monotonic() + timeout_s
    while True:
        held = []
        for gpu in gpus:
            handle = open(lock_dir() / f"gpu-{gpu.uuid}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            held.append((gpu, handle))
            if len(held) == n:
                return Claim([g.index for g, _ in held], [g.name for g, _ in held], [h for _, h in held])
        for _, handle in held:
            handle.close()
        if time.monotonic() > deadline:
            raise DeviceError(f"could not claim {n} free GPU(s) within {timeout_s:.0f} s: other jobs hold them")
        time.sleep(poll_s)


def pipeline_device_map_memory(claim: Claim, inventory: list[DeviceInfo], reserve_fraction: float = 0.1) -> dict:
    """max_memory for accelerate's balanced placement over the claimed devices only (layers split by memory),
    keeping a share of each device free for activations and the KV cache."""
    by_index = {g.index: g for g in inventory}
    return {i: int(by_index[i].total_bytes * (1 - reserve_fraction)) for i in claim.indices}
