"""Attention helpers shared by our forward (llama_forward) and transformers' path (kernels.sdpa_gqa_attention):
verify passes row by row (the opt-in $SPECDEC_EXACT_ATTENTION=1: `attend_rows`; why: kernels.attention_row_by_row),
query heads folded into rows for SDPA (`grouped_rows`), and the mask our few-row kernel reads
(`transposed_mask`; the kernel: kernels.few_row_attention)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

FEW_ROWS = 16  # passes of up to this many query rows (steps and verify passes) go to our attention kernel


def exact_rows_requested() -> bool:
    """$SPECDEC_EXACT_ATTENTION=1: verify passes compute attention row by row (`attention_row_by_row`); 0 or
    unset: not. Anything else is a ValueError naming the variable (runner.check_settings asks before loading)."""
    value = os.environ.get("SPECDEC_EXACT_ATTENTION", "0").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"SPECDEC_EXACT_ATTENTION must be 0 or 1, got '{value}'")
    return value == "1"


def visible_keys(mask_row: torch.Tensor) -> torch.Tensor | int:
    """The key positions one query row may attend to, from its row of a bool ("may attend") or additive mask: an
    int n when they are the prefix 0..n-1 (then a slice keeps the cache's own view), else an index tensor."""
    visible = mask_row if mask_row.dtype == torch.bool else mask_row == 0
    n = int(visible.sum())
    return n if bool(visible[:n].all()) else visible.nonzero().flatten()


def attend_rows(query, key, value, mask, one_row, dim: int = 2):
    """A masked multi-row pass's attention computed row by row, each row exactly as its one-row step computes it:
    `one_row(q, k, v)` over one query and the keys its row of `mask` (bool or additive [1, 1, rows, keys]) lets it
    see, with no mask; the rows are concatenated along `dim` (where one_row's output has its query axis)."""
    rows = []
    for r in range(query.shape[2]):
        keep = visible_keys(mask[0, 0, r])
        k, v = (key[:, :, :keep], value[:, :, :keep]) if isinstance(keep, int) else (key[:, :, keep], value[:, :, keep])
        rows.append(one_row(query[:, :, r:r + 1], k, v))
    return torch.cat(rows, dim=dim)


def sdpa_one_row(query, key, value, scaling):
    """Our forward's one-row attention: SDPA with shared KV heads, no mask."""
    return F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)


def fold_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """A pass's mask [1, 1, rows, keys] for `grouped_rows`: repeated once per query head of a KV head."""
    return mask.repeat(1, 1, groups, 1) if groups > 1 else mask


def grouped_rows(query, key, value, folded_mask, scaling):
    """SDPA of a masked multi-row pass with grouped KV heads (query [1, heads, rows, dim], key and value
    [1, kv_heads, keys, dim], `folded_mask` from fold_mask): each KV head's query heads go in as its rows, so SDPA
    runs one attention per KV head over groups × rows queries instead of sharing heads (enable_gqa). Same numbers
    in fewer, fuller blocks: on 2 EPYC cores 12 rows at 300 keys 138 -> 109 µs per layer, at 700 keys 257 -> 237."""
    _, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    folded = query.reshape(1, kv_heads, heads // kv_heads * rows, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=folded_mask, scale=scaling)
    return out.view(1, heads, rows, dim)


def transposed_mask(mask: torch.Tensor) -> torch.Tensor:
    """A pass's mask [1, 1, rows, keys] (bool "may attend" or additive float) as the additive float32 [keys, rows]
    matrix our few-row attention kernel reads (one per pass: every layer shares it)."""
    m = mask[0, 0]
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float32).masked_fill_(~m, torch.finfo(torch.float32).min)
    return m.to(torch.float32).t().contiguous()


def few_rows_fit(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether our few-row kernel (kernels.few_row_attention) computes this attention (query [1, H, R, D], key
    [1, KVH, T, D], mask None or [1, 1, R, T]): float32 on the CPU, one sequence, 1..FEW_ROWS rows, head dimension
    64 or 128, whole groups of query heads; a multi-row pass needs its mask (a causal prompt without one stays on
    SDPA)."""
    _, heads, rows, dim = query.shape
    return (query.shape[0] == 1 and key.shape[0] == 1 and query.dtype == torch.float32
            and query.device.type == "cpu" and few_rows_shape_fit(rows, key.shape[2], heads, key.shape[1], dim, mask))


def few_rows_shape_fit(rows: int, keys: int, heads: int, kv_heads: int, dim: int, mask: torch.Tensor | None) -> bool:
    """few_rows_fit's conditions on the shapes, known before a pass's queries and keys are: 1..FEW_ROWS rows over
    `keys` positions, head dimension 64 or 128, whole groups of query heads, a mask for a multi-row pass."""
    return (rows <= FEW_ROWS and dim in (64, 128) and heads % kv_heads == 0
            and (rows == 1 if mask is None
                 else mask.dim() == 4 and mask.shape[:3] == (1, 1, rows) and mask.shape[3] == keys))
