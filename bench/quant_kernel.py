"""Our int8/int4 kernels (csrc/quant_linear.cpp, quant.WeightOnlyLinear with kernels.quant_ops) against torch's
packed weight-only kernels (the path before them) and our float32 panel kernel, A/B in one process; where the CPU
has AMX, our kernels twice: on AVX-512 VNNI alone ("ours") and with many-row passes on the AMX tiles ("amx").
Random weights in SmolLM2-135M's shapes as our engine holds them (30 layers of fused q|k|v, o, fused gate|up,
down), so the weights stream from memory as in decoding, and the int8 output head; the kernels interleaved per row
count, medians over repeats. Prints the CPU model and ms per pass over all decoder layers (and the head), per row
count, and each kernel's time relative to its own one-row pass. `--weights cached`: one layer's four matrices
called 30 times over instead (about 1 MB per core in int4: they stay in the cores' caches), so the same calls
without the memory traffic: what each row costs in arithmetic alone.

    python bench/quant_kernel.py [--rows 1,2,4,8,16,32,64] [--repeats 7] [--threads 2] [--weights streaming|cached]
"""

from __future__ import annotations

import statistics

import torch
from panel_kernel import kernel_args, timed  # bench/: the kernel A/B scripts' shared parts

from specdec.model import kernels, quant
from specdec.run.job import cpu_name

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 576, 1536, 49152, 30
SHAPES = [(960, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]  # (out, in)


def layers(fmt: str, ops, head: bool = False, cached: bool = False) -> list:
    """The kernel calls of every decoder matrix (or of the head) in `fmt`, on random weights; cached: one layer's
    matrices, called once per layer."""
    gen = torch.Generator().manual_seed(0)
    calls = []
    for out, inp in [(VOCAB, HIDDEN)] if head else [s for _ in range(1 if cached else LAYERS) for s in SHAPES]:
        linear = torch.nn.Linear(inp, out, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out, inp, generator=gen))
        if fmt == "float32":
            calls.append(kernels.PanelLinear(linear).kernel())
        else:
            calls.append(quant.WeightOnlyLinear(linear, fmt, ops=ops).kernel())
    return calls * LAYERS if cached and not head else calls


def main() -> None:
    args = kernel_args(__doc__, "1,2,4,8,16,32,64", weights="streaming")
    if args.weights not in ("streaming", "cached"):
        raise SystemExit(f"--weights {args.weights}: choose streaming or cached")
    cached = args.weights == "cached"
    problem = kernels.quant_kernel_problem()
    if problem:
        raise SystemExit(f"our int8/int4 kernels cannot run here: {problem}")
    ours = kernels.panel_extension()
    decoder = {"int4 ours": layers("int4", ours, cached=cached), "int4 torch": layers("int4", None, cached=cached),
               "int8 ours": layers("int8", ours, cached=cached), "int8 torch": layers("int8", None, cached=cached),
               "float32 panels": layers("float32", None, cached=cached)}
    head = {"ours": layers("int8", ours, head=True)[0], "torch": layers("int8", None, head=True)[0]}
    amx = kernels.amx_problem() is None
    if amx:  # the same layers, the tile switch on while they run
        decoder.update({"int4 amx": decoder["int4 ours"], "int8 amx": decoder["int8 ours"]})
        head["amx"] = head["ours"]
    row_counts = [int(r) for r in args.rows.split(",")]
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.repeats):
        for rows in row_counts:
            x = {width: torch.randn(rows, width) for width in (HIDDEN, INTERMEDIATE)}
            inputs = [x[i] for _ in range(LAYERS) for _, i in SHAPES]
            for name, calls in decoder.items():
                ours.quant_amx(name.endswith("amx"))
                times.setdefault((rows, name), []).append(timed(lambda: [c(a) for c, a in zip(calls, inputs)]))
            for name, call in head.items():
                ours.quant_amx(name == "amx")
                times.setdefault((rows, f"head int8 {name}"), []).append(timed(lambda: call(x[HIDDEN])))
    ours.quant_amx(False)
    med = {key: 1e3 * statistics.median(v) for key, v in times.items()}
    columns = list(decoder) + [f"head int8 {name}" for name in head]
    print(f"{cpu_name()}, {args.threads} threads, medians of {args.repeats} (ms per pass; decoder: all "
          f"{LAYERS * len(SHAPES)} fused matrices, weights {args.weights}; in brackets: x its own 1-row pass)")
    print(f"{'rows':>5}  " + "  ".join(f"{c:>20}" for c in columns))
    first = row_counts[0]
    for rows in row_counts:
        cells = [f"{med[rows, c]:8.2f} ({med[rows, c] / med[first, c]:5.2f}x)" for c in columns]
        print(f"{rows:>5}  " + "  ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
