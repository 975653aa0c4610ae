"""The machine probe (specdec/measure/machine.py): positive rates from the real loops, cached per host and thread
count, and the roofline arithmetic; bench_measure.pass_cost counts what a pass reads and multiplies."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.measure import machine
from specdec.model import quant
from specdec.model.kernels import prepare_model, quant_ops
from specdec.run.bench_measure import pass_cost
from tiny import needs_panels, needs_vnni, tiny_target


@needs_panels
def test_the_probe_measures_and_is_cached_per_host_and_threads(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(machine, "PROBE_BYTES", 64 << 20)  # small and short: a test, not a measurement
    monkeypatch.setattr(machine, "FMA_ITERATIONS", 200_000)
    monkeypatch.setattr(machine, "VNNI_ITERATIONS", 200_000)
    first = machine.machine_limits("some CPU")
    assert first.bandwidth_gb_s > 0 and first.float32_gflop_s > 0 and first.threads == torch.get_num_threads()
    assert (first.int8_gop_s is None) == (machine.kernels.quant_kernel_problem() is not None)
    monkeypatch.setattr(machine, "probe", lambda cpu: pytest.fail("probed again instead of reading the cache"))
    assert machine.machine_limits("some CPU") == first
    stored = json.loads((tmp_path / "machine.json").read_text())
    assert list(stored) == [f"{first.host}|some CPU|{first.threads}"]


def test_a_probe_taken_on_a_busy_machine_is_taken_again_when_it_is_quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    cores = machine.os.cpu_count() or 1
    loads = iter([cores + 3.0, 0.5, 0.5])  # probed busy; quiet on the next call (probed again); quiet after
    monkeypatch.setattr(machine, "load_average", lambda: next(loads))
    probes = iter([(5.0, 50.0, 200.0), (30.0, 40.0, 800.0)])

    def fake_probe(cpu):
        read, fma, vnni = next(probes)
        return machine.Machine(host="h", cpu=cpu, threads=2, bandwidth_gb_s=read, float32_gflop_s=fma,
                               int8_gop_s=vnni, load_average=machine.load_average())

    monkeypatch.setattr(machine, "probe", fake_probe)
    busy = machine.machine_limits("c")
    assert busy.bandwidth_gb_s == 5.0 and busy.load_average == cores + 3.0
    quiet = machine.machine_limits("c")  # the busy probe is replaced; each figure keeps its best
    assert (quiet.bandwidth_gb_s, quiet.float32_gflop_s, quiet.int8_gop_s, quiet.load_average) == (30.0, 50.0, 800.0, 0.5)
    assert machine.machine_limits("c") == quiet  # quiet now and then: read from the cache (a third probe would raise)


def test_roofline_is_the_larger_of_memory_and_compute_time():
    m = machine.Machine(host="h", cpu="c", threads=2, bandwidth_gb_s=20.0, float32_gflop_s=100.0, int8_gop_s=400.0)
    one = machine.roofline_ms(m, bytes_read=100e6, ops=2e9, integer=False)
    assert one == {"memory_ms": pytest.approx(5.0), "compute_ms": pytest.approx(20.0), "bound_ms": pytest.approx(20.0)}
    assert machine.roofline_ms(m, 100e6, 2e9, integer=True)["bound_ms"] == pytest.approx(5.0)  # int8 peak: 5 ms
    no_vnni = machine.Machine(**{**m.__dict__, "int8_gop_s": None})
    assert machine.roofline_ms(no_vnni, 100e6, 2e9, integer=True)["compute_ms"] == pytest.approx(20.0)


@needs_vnni
def test_pass_cost_counts_each_linear_layer_once():
    model = tiny_target(dtype=torch.float32)
    cfg = model.config
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size //
                                                                                 cfg.num_attention_heads)
    macs = cfg.num_hidden_layers * (h * h + 2 * h * kv + h * h + 3 * h * i) + h * cfg.vocab_size
    read, counted = pass_cost(model)
    assert counted == macs and read == 4 * macs  # float32 weights, the embedding table left out
    int4 = prepare_model(quant.apply_weights(tiny_target(dtype=torch.float32), "int4", quant_ops("int4")))
    read4, counted4 = pass_cost(int4)  # fused projections counted once; int4 decoder, int8 head
    assert counted4 == macs and macs / 2 < read4 < macs
