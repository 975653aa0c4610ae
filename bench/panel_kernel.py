"""Our AVX-512 linear kernel (kernels.PanelLinear) against pre-packed oneDNN (kernels.PackedLinear's call) and,
for the output head, oneDNN on the dense weight (DenseOneDNNLinear's call), A/B in one process. Random float32
weights in SmolLM2-135M's shapes for all its decoder layers (30 × q, k, v, o, gate, up, down), so the weights
stream from memory as in decoding; the two kernels interleaved per row count, medians over repeats. Prints the
CPU model and ms per pass over all decoder layers and for the head, per row count.

    python bench/panel_kernel.py [--rows 1,2,4,8,12,16,300] [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdec.model import kernels
from specdec.run.job import cpu_name

HIDDEN, KV, INTERMEDIATE, VOCAB, LAYERS = 576, 192, 1536, 49152, 30
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN),
          (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]  # (out, in) of q, k, v, o, gate, up, down


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kernel_args(doc: str, rows: str, **more: str) -> argparse.Namespace:
    """The kernel A/B scripts' command line (--rows, --repeats, --threads and `more` comma lists), with the
    threads set and the kernels built, or a one-line exit where they cannot run."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rows", default=rows)
    for name, default in more.items():
        p.add_argument(f"--{name}", default=default)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    problem = kernels.panel_kernel_problem()
    if problem:
        raise SystemExit(f"our kernels cannot run here: {problem}")
    return args


def main() -> None:
    args = kernel_args(__doc__, "1,2,4,8,12,16,300")
    dense = [torch.randn(o, i) for _ in range(LAYERS) for o, i in SHAPES]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 4) for w in dense]
    panels = [kernels.pack_panels(w) for w in dense]
    del dense
    head = torch.randn(VOCAB, HIDDEN)
    head_panels = kernels.pack_panels(head)
    times: dict[tuple[int, str, str], list[float]] = {}
    row_counts = [int(r) for r in args.rows.split(",")]
    for _ in range(args.repeats):
        for rows in row_counts:
            x = {width: torch.randn(rows, width) for width in (HIDDEN, INTERMEDIATE)}
            inputs = [x[i] for _ in range(LAYERS) for _, i in SHAPES]
            runs = {
                ("decoder", "oneDNN"): lambda: [kernels.onednn_linear(a, w, None) for a, w in zip(inputs, onednn)],
                ("decoder", "ours"): lambda: [kernels.panel_linear(a, w, None) for a, w in zip(inputs, panels)],
                ("head", "oneDNN"): lambda: kernels.onednn_linear(x[HIDDEN], head, None),
                ("head", "ours"): lambda: kernels.panel_linear(x[HIDDEN], head_panels, None),
            }
            for (part, kernel), fn in runs.items():
                times.setdefault((rows, part, kernel), []).append(timed(fn))
    print(f"{cpu_name()}, {args.threads} threads, medians of {args.repeats} (ms)")
    print(f"{'rows':>5}  {'decoder oneDNN':>14}  {'decoder ours':>12}  {'head oneDNN':>11}  {'head ours':>9}")
    for rows in row_counts:
        med = {k: 1e3 * statistics.median(times[(rows, *k)]) for k in
               (("decoder", "oneDNN"), ("decoder", "ours"), ("head", "oneDNN"), ("head", "ours"))}
        print(f"{rows:>5}  {med['decoder', 'oneDNN']:>14.2f}  {med['decoder', 'ours']:>12.2f}  "
              f"{med['head', 'oneDNN']:>11.2f}  {med['head', 'ours']:>9.2f}")


if __name__ == "__main__":
    main()
