"""scripts/gpu-check.sh: its dry run on this CPU (what CI keeps working), the test selection it runs on a GPU, the
memory reading on $SPECDEC_TEST_DEVICE and the CUDA-event timing's comparison."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from specdec.measure.metrics import peak_memory, reset_peak_memory
from specdec.model.decoding import Clock, DecodeSettings, Trace, baseline_decode
from specdec.run.bench_measure import event_gap, rss_resolution_bytes
from specdec.run.devices import peak_memory_per_device
from specdec.strategies import STRATEGIES
from tiny import EOS, prompts

ROOT = Path(__file__).resolve().parent.parent


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_the_gpu_selection_decodes_every_strategy_of_ours_and_names_real_tests():
    check = load_check()
    ours = {name for name, st in STRATEGIES.items() if st.engine == "specdec"}
    assert set(check.GREEDY_TESTS) == ours
    for node in list(check.GREEDY_TESTS.values()) + check.OTHER_TESTS:
        path, _, name = node.partition("::")
        assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", (ROOT / path).read_text(), re.M), node


def test_dry_run_passes_what_needs_no_gpu_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "SPECDEC_BUNDLE_STASH": str(tmp_path / "stash")}
    done = subprocess.run(["bash", "scripts/gpu-check.sh", str(out), "--dry-run", "--bundle", str(tmp_path / "none")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    status = {m[2]: m[1] for m in (re.match(r"(PASS|FAIL|SKIP) (\S+) ", line) for line in lines) if m}
    assert status == {"bundle": "SKIP", "install": "PASS", "engine-tests": "SKIP", "model": "SKIP", "bench": "SKIP",
                      "matrix": "SKIP", "parallel": "SKIP"}, done.stdout
    assert "no bundle" in done.stdout and "needs a GPU" in done.stdout
    # the CPU variants ran: the test selection was collected, Snakemake planned the matrix, the lock files worked
    assert re.search(r"SKIP engine-tests .*dry run: \d+ test ids collected", done.stdout)
    assert "Snakemake planned the matrix" in done.stdout and "a second claim blocked" in done.stdout
    assert lines[-1] == "1 passed, 0 failed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and [s["step"] for s in summary["steps"]][0] == "bundle"
    assert summary["claim"]["second_claim_blocked"] and summary["claim"]["claimed_after_release"]


def fake_bundle(root: Path, files: dict[str, bytes], part_bytes: int) -> list[str]:
    """A bundle as scripts/gpu-bundle.sh lays it out (a tar split into parts, manifest.sha256); returns part names."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    (root / "parts").mkdir(parents=True)
    names, lines = [], ["# parts"]
    for i in range(0, len(data), part_bytes):
        name = f"bundle.tar.part-a{chr(ord('a') + i // part_bytes)}"
        (root / "parts" / name).write_bytes(data[i:i + part_bytes])
        names.append(name)
        lines.append(f"{hashlib.sha256(data[i:i + part_bytes]).hexdigest()}  parts/{name}")
    lines += ["# files"] + [f"{hashlib.sha256(d).hexdigest()}  {n}" for n, d in files.items()]
    (root / "manifest.sha256").write_text("\n".join(lines) + "\n")
    return names


def test_parts_carried_in_separate_runs_are_stashed_joined_and_checked(tmp_path, monkeypatch):
    check = load_check()
    monkeypatch.setattr(check, "STASH", tmp_path / "stash")
    files = {"wheels/a-1.0-py3-none-any.whl": b"wheel" * 3000, "model/x.gguf": bytes(range(256)) * 40}
    bundle = tmp_path / "bundle"
    names = fake_bundle(bundle, files, 10_000)
    assert len(names) >= 3  # tar headers and padding add to the files' bytes
    carried = {name: (bundle / "parts" / name).read_bytes() for name in names}
    for name in names:  # each run carries one part: the others are not in its copy of the repository
        for other in names:
            (bundle / "parts" / other).unlink(missing_ok=True)
        (bundle / "parts" / name).write_bytes(carried[name])
        parts, missing = check.stash_parts(bundle)
        assert missing == names[names.index(name) + 1:]
    run = check.Check(out=tmp_path / "out", dry_run=True, bundle=bundle, python=sys.executable)
    assert f"{len(names)} part(s) joined, 2 files match their sha256" in check.step_bundle(run)
    assert (check.bundle_tree() / "model" / "x.gguf").read_bytes() == files["model/x.gguf"]
    (check.STASH / names[1]).write_bytes(b"damaged on the way")
    with pytest.raises(check.StepFailed, match=f"stashed part {names[1]} does not match its sha256"):
        check.step_bundle(run)
    (bundle / "parts" / names[0]).write_bytes(b"not what the manifest says")
    with pytest.raises(check.StepFailed, match=f"part {names[0]} does not match its sha256 in the manifest"):
        check.stash_parts(bundle)


def test_peak_memory_reads_what_the_device_allocated(target):
    """The peak reading after a generation on $SPECDEC_TEST_DEVICE covers the weights and a known allocation:
    exactly on CUDA (the allocator's counters), from the process's peak RSS on the CPU."""
    device = str(target.device)
    reset_peak_memory(device)
    weights = sum(p.numel() * p.element_size() for p in target.parameters())
    baseline_decode(target, prompts(1)[0], DecodeSettings(max_new_tokens=8), {EOS})
    block = torch.ones(16 * 2**20, dtype=torch.float32, device=device)  # 64 MiB, touched
    peak, kind = peak_memory(device)
    if target.device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device)
        assert kind == "cuda_max_allocated" and allocated >= weights + block.nbytes
        assert allocated <= peak <= allocated + 64 * 2**20  # the generation's transient tensors, far below 64 MiB
    else:
        import psutil

        # the peak is an approximate per-CPU read, the RSS an exact one (bench_measure.rss_resolution_bytes)
        assert kind == "process_rss_peak" and peak >= psutil.Process().memory_info().rss - rss_resolution_bytes()
    assert peak_memory_per_device([device]) == [peak]
    del block


def test_event_gap_compares_cuda_event_time_with_wall_time_only_where_measured():
    assert event_gap([Trace(wall_s=1.0, event_s=1.03), Trace(wall_s=2.0, event_s=1.98)]) == pytest.approx(0.03)
    assert event_gap([Trace(wall_s=1.0)]) is None  # the CPU: no events
    clock = Clock("cpu")
    clock(), clock()
    assert clock.event_s() is None
