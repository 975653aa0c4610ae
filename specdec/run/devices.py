"""Claiming GPUs for a job and planning where models go.

Snakemake counts `resources: gpu=N` but does not tell a local job *which* GPUs are its own, so a job claims N
distinct devices itself with exclusive, non-blocking `flock`s on one lock file per device. Locks are keyed by
the device's UUID (stable whatever CUDA_VISIBLE_DEVICES says) and vanish when the process exits, even if killed.

Before any weights load, `plan_placement` estimates what the pair needs on each claimed device (weights at the
configured dtype from a meta-device model, plus a KV cache) and refuses a cell that cannot fit, naming the
estimate and the memory available. Modes for a target over N > 1 GPUs: `pipeline` (layers split by accelerate,
balanced by memory) and `tensor` (transformers' tensor-parallel plan under torchrun, see parallel.py). The draft
always sits whole on the first device.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from specdec.model import models
from specdec.measure.metrics import peak_memory

GPU_MODES = ("pipeline", "tensor")
GiB = 1 << 30
RESERVE_FRACTION = 0.1       # of each device's free memory, kept for activations and allocator slack
CUDA_OVERHEAD = 512 << 20    # CUDA context + cuBLAS workspace per device, outside torch's allocator
PROMPT_ALLOWANCE = 2048      # prompt tokens assumed when sizing the KV cache (prompts are not tokenised yet)


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
    free_bytes: int | None = None  # None: unknown, assume the whole device is free

    @property
    def available_bytes(self) -> int:
        return self.total_bytes if self.free_bytes is None else min(self.free_bytes, self.total_bytes)


def _nvidia_smi_free() -> dict[str, int]:
    """Free bytes per GPU UUID from nvidia-smi: asking torch (mem_get_info) would create a CUDA context on every
    device, which a parent process that only launches torchrun workers would then hold for the whole run."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    free = {}
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        uuid, _, mib = line.partition(",")
        if mib.strip().isdigit():
            free[_uuid_key(uuid)] = int(mib) << 20
    return free


def _uuid_key(uuid: str) -> str:
    return uuid.strip().lower().removeprefix("gpu-")


def visible_gpus() -> list[DeviceInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    free = _nvidia_smi_free()
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", i))
        out.append(DeviceInfo(i, uuid, props.name, int(props.total_memory), free.get(_uuid_key(uuid))))
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


# ------------------------------------------------------------------------------------------- memory planning

def dtype_bytes(spec, config) -> int:
    import torch

    name = spec.dtype
    if name == "auto":  # what from_pretrained(dtype="auto") picks: the checkpoint's dtype, float32 if unrecorded
        name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return torch.empty((), dtype=getattr(torch, name.removeprefix("torch."))).element_size()


def weight_bytes(spec, config) -> int:
    """Bytes of the weights at the alias's dtype: parameters of a meta-device model built from the config."""
    import torch
    from transformers import AutoModelForCausalLM

    if config is None:  # a GGUF file: count its tensors' elements (dequantised on load)
        import gguf

        return sum(int(t.n_elements) for t in gguf.GGUFReader(models.gguf_path(spec)).tensors) * dtype_bytes(spec, None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    return sum(p.numel() for p in model.parameters()) * dtype_bytes(spec, config)


def kv_cache_bytes(config, tokens: int, element_bytes: int) -> int:
    """Keys and values of every layer for `tokens` positions (batch 1)."""
    if config is None:
        return 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", 0) or 0
    heads = getattr(text, "num_attention_heads", 1) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * tokens * element_bytes


def model_bytes(spec, max_new_tokens: int, k: int = 0) -> tuple[int, object]:
    """Estimated bytes to hold a model and its KV cache for one generation; also returns its config."""
    config = models.model_config(spec)
    tokens = PROMPT_ALLOWANCE + max_new_tokens + k + 1
    return weight_bytes(spec, config) + kv_cache_bytes(config, tokens, dtype_bytes(spec, config)), config


@dataclass
class Placement:
    """Where a cell's models go and what that is estimated to cost on each device (bytes, per device)."""
    mode: str                    # cpu | single | pipeline | tensor
    devices: list[str]
    need_bytes: list[int]
    usable_bytes: list[int]
    max_memory: dict | None = None   # pipeline: accelerate's per-device budget for the target's layers

    def record(self) -> dict:
        return {"mode": self.mode, "devices": self.devices, "estimated_bytes": self.need_bytes,
                "usable_bytes": self.usable_bytes}


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def usable_bytes(gpu: DeviceInfo, reserve_fraction: float = RESERVE_FRACTION) -> int:
    return max(0, int(gpu.available_bytes * (1 - reserve_fraction)) - CUDA_OVERHEAD)


def host_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def plan_placement(mode: str, claim: Claim, inventory: list[DeviceInfo], target_bytes: int, draft_bytes: int = 0,
                   reserve_fraction: float = RESERVE_FRACTION, label: str = "the models") -> Placement:
    """Decide where the target and draft go on the claimed devices, or raise DeviceError (estimate vs available).

    pipeline: the draft on the first device, the target's layers spread over all of them with each device's
    budget (max_memory) less what the draft takes there. tensor: each device holds 1/N of the target; the first
    also holds the draft. The estimate is rough (weights + KV cache + a reserve), meant to catch cells that cannot
    fit before minutes of loading, not to pack devices tightly.
    """
    if mode not in GPU_MODES:
        raise DeviceError(f"gpu_mode must be one of {', '.join(GPU_MODES)}, got {mode!r}")
    total = target_bytes + draft_bytes
    if not claim.indices:
        have = host_available_bytes()
        if total > have:
            raise DeviceError(f"{label} need an estimated {_gib(total)} but the host has {_gib(have)} of memory "
                              "available; use a smaller model or dtype, or run on GPUs (gpus: 1)")
        return Placement("cpu", ["cpu"], [total], [have])
    by_index = {g.index: g for g in inventory}
    gpus = [by_index[i] for i in claim.indices]
    usable = [usable_bytes(g, reserve_fraction) for g in gpus]
    names = claim.devices
    n = len(gpus)
    where = (f"{n} claimed GPU(s) ({', '.join(sorted(set(g.name for g in gpus)))}, {_gib(sum(usable))} usable: "
             f"{round(reserve_fraction * 100)}% of free memory and {_gib(CUDA_OVERHEAD)} per device kept back)")
    advice = "; use more GPUs, a smaller dtype, or a smaller model"
    if draft_bytes > usable[0]:
        raise DeviceError(f"the draft needs an estimated {_gib(draft_bytes)} on {names[0]} but only "
                          f"{_gib(usable[0])} is usable there{advice}")
    if n == 1:
        if total > usable[0]:
            raise DeviceError(f"{label} need an estimated {_gib(total)} but the {where} have too little"
                              f"{advice}")
        return Placement("single", names, [total], usable)
    if mode == "pipeline":
        budget = [u - (draft_bytes if i == 0 else 0) for i, u in enumerate(usable)]
        if target_bytes > sum(budget):
            raise DeviceError(f"{label} need an estimated {_gib(total)} but the {where} have too little"
                              f"{advice}")
        need = [int(target_bytes * b / sum(budget)) + (draft_bytes if i == 0 else 0) for i, b in enumerate(budget)]
        return Placement("pipeline", names, need, usable, {i: b for i, b in zip(claim.indices, budget)})
    need = [target_bytes // n + (draft_bytes if i == 0 else 0) for i in range(n)]
    for name, want, have in zip(names, need, usable):
        if want > have:
            raise DeviceError(f"tensor parallel over {n} GPUs puts an estimated {_gib(want)} on {name} (1/{n} of the "
                              f"target{' + the draft' if name == names[0] and draft_bytes else ''}) but only "
                              f"{_gib(have)} is usable there{advice}")
    return Placement("tensor", names, need, usable)


def peak_memory_per_device(devices: list[str]) -> list[int]:
    """Peak bytes allocated by torch on each device since its last reset (CPU: the process's peak resident set)."""
    import torch

    return [int(torch.cuda.max_memory_allocated(torch.device(d))) if d.startswith("cuda") else peak_memory(d)[0]
            for d in devices]


def reset_peak_memory(devices: list[str]) -> None:
    import torch

    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(torch.device(d))


def tensor_parallel_problem(config, n: int) -> str | None:
    """Why a model cannot be split n ways by transformers' tensor parallelism, or None if it can."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "base_model_tp_plan", None):
        return (f"{type(config).__name__} has no tensor-parallel plan in transformers (base_model_tp_plan); "
                "use gpu_mode: pipeline for this target")
    heads = getattr(text, "num_attention_heads", 0) or 0
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % n or kv_heads % n:
        return (f"tensor parallel over {n} GPUs needs the attention heads ({heads}) and key/value heads "
                f"({kv_heads}) to divide by {n}; use gpus that divide both, or gpu_mode: pipeline")
    return None


def plan_cell(target_spec, draft_spec, mode: str, claim: Claim, inventory: list[DeviceInfo], max_new_tokens: int,
              k: int = 0) -> Placement:
    """The memory check and placement of one cell, from configs only (no weights are read)."""
    n = len(claim.indices)
    if n > 1 and models.is_gguf(target_spec):
        raise DeviceError(f"target '{target_spec.alias}' is a GGUF file, which loads on one device only; splitting "
                          "it over GPUs needs a transformers checkpoint (hub id or directory): use gpus: 1")
    target_bytes, config = model_bytes(target_spec, max_new_tokens, k)
    if n > 1 and mode == "tensor":
        problem = tensor_parallel_problem(config, n)
        if problem:
            raise DeviceError(f"target '{target_spec.alias}': {problem}")
    draft_bytes = model_bytes(draft_spec, max_new_tokens, k)[0] if draft_spec else 0
    label = f"the models (target '{target_spec.alias}'" + (f", draft '{draft_spec.alias}')" if draft_spec else ")")
    return plan_placement(mode, claim, inventory, target_bytes, draft_bytes, label=label)


def loaded_bytes(models: list, used: list[str]) -> list[int]:
    """Bytes of weights actually resident on each used device (a sharded tensor counts its local shard only),
    so the record shows how a pipeline or tensor-parallel split really came out, next to the estimate. Saved
    buffers count too (quantised weights are buffers; rotary tables are not saved); a llama.cpp model counts its
    tensors' bytes on the CPU."""
    totals = dict.fromkeys(used, 0)
    seen = set()
    for model in models:
        if not hasattr(model, "parameters"):  # llama_cpp.Llama
            if "cpu" in totals:
                totals["cpu"] += int(model._model.size())
            continue
        for param in model.state_dict(keep_vars=True).values():
            if id(param) in seen:
                continue
            seen.add(id(param))
            local = param.to_local() if hasattr(param, "to_local") else param
            device = str(local.device)
            if device in totals:
                totals[device] += local.numel() * local.element_size()
    return [totals[d] for d in used]
