"""Our few-row attention kernel (kernels.few_row_attention) against torch's SDPA as our forward calls it without
the kernel (one row: enable_gqa; a masked pass: query heads folded into rows, attention.grouped_rows), A/B in one
process. SmolLM2-135M's attention shape (9 query heads over 3 KV heads of 64) for all 30 layers, keys read from
a cache buffer as in decoding, a tree mask over the pass's own keys; the two kernels interleaved per setting,
medians over repeats. Prints the CPU model and ms per pass over all layers, per row count and key count.

    python bench/few_row_attention.py [--rows 1,4,8,12,14,16] [--keys 200,400,700] [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import statistics

import torch
from panel_kernel import kernel_args, timed  # bench/: the kernel A/B scripts' shared parts

from specdec.model import kernels
from specdec.model.attention import fold_mask, grouped_rows, transposed_mask
from specdec.run.job import cpu_name

HEADS, KV_HEADS, DIM, LAYERS = 9, 3, 64, 30


def main() -> None:
    args = kernel_args(__doc__, "1,4,8,12,14,16", keys="200,400,700")
    row_counts = [int(r) for r in args.rows.split(",")]
    key_counts = [int(k) for k in args.keys.split(",")]
    scale = DIM ** -0.5
    # one cache buffer per layer, longer than the keys used, as decoding's KV arena
    caches = [torch.randn(2, KV_HEADS, max(key_counts) + 64, DIM) for _ in range(LAYERS)]
    times: dict[tuple[int, int, str], list[float]] = {}
    for _ in range(args.repeats):
        for keys in key_counts:
            for rows in row_counts:
                query = [torch.randn(rows, HEADS, DIM).transpose(0, 1) for _ in range(LAYERS)]  # [H, R, D] views
                kv = [(c[0, :, :keys], c[1, :, :keys]) for c in caches]
                mask = None
                if rows > 1:  # a tree over the pass's own keys: each row sees the cache, its parent chain, itself
                    attend = torch.ones(rows, keys, dtype=torch.bool)
                    attend[:, keys - rows:] = torch.eye(rows, dtype=torch.bool) | (torch.rand(rows, rows) < 0.3)
                    mask = torch.zeros(rows, keys).masked_fill_(~attend, torch.finfo(torch.float32).min)[None, None]

                def ours():
                    mask_t = None if mask is None else transposed_mask(mask)  # once per pass, as our forward
                    for q, (k, v) in zip(query, kv):
                        kernels.few_row_attention(q, k, v, mask_t, scale)

                def sdpa():
                    folded = None if mask is None else fold_mask(mask, HEADS // KV_HEADS)
                    for q, (k, v) in zip(query, kv):
                        if mask is None:
                            out = torch.nn.functional.scaled_dot_product_attention(
                                q[None], k[None], v[None], scale=scale, enable_gqa=True)
                        else:
                            out = grouped_rows(q[None], k[None], v[None], folded, scale)
                        out[0].transpose(0, 1).reshape(rows, HEADS * DIM)

                for name, fn in (("sdpa", sdpa), ("ours", ours)):
                    times.setdefault((keys, rows, name), []).append(timed(fn))
    print(f"{cpu_name()}, {args.threads} threads, {LAYERS} layers of {HEADS} query heads over {KV_HEADS} KV heads "
          f"of {DIM}, medians of {args.repeats} (ms per pass)")
    print(f"{'keys':>5}  {'rows':>4}  {'SDPA':>6}  {'ours':>6}  {'SDPA / ours':>11}")
    for keys in key_counts:
        for rows in row_counts:
            a, b = (1e3 * statistics.median(times[(keys, rows, n)]) for n in ("sdpa", "ours"))
            print(f"{keys:>5}  {rows:>4}  {a:>6.2f}  {b:>6.2f}  {a / b:>11.2f}")


if __name__ == "__main__":
    main()
