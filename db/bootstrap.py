"""The 95 % bootstrap interval of a median, exactly: which order statistics of the sorted sample are its ends.

A percentile bootstrap resamples the n values with replacement many times and takes the 2.5 % and 97.5 %
quantiles of the resamples' medians. For a median that distribution is known in closed form, so no resampling is
needed: the r-th smallest value of a resample is at most x_(j) (the j-th smallest of the sample) exactly when at
least r of its n draws fall among x_(1..j), which has probability P(Binomial(n, j/n) >= r). The q-quantile of the
resample's r-th order statistic is therefore x_(j) for the smallest j with P(Binomial(n, j/n) >= r) >= q.

This is the bootstrap with B -> infinity: deterministic (no seed, no resampling error) and, in SQL, as cheap as a
sort, where drawing B = 1000 resamples of every cell cost minutes on a store of 100 000 rows. The median of an even
number of values is the mean of the two middle ones (DuckDB's `median`); its interval ends are taken as the mean of
the two middle order statistics' ends (for odd n both are the median itself). That is exact for odd n and, for even
n, slightly wider than a Monte Carlo percentile interval of the averaged median (by ~14 % at n = 16, ~8 % at
n = 50, less beyond): it errs on the side of caution.

The store keeps the exact ranks for n <= MAX_EXACT in the table `median_ci_ranks` (filled by init_db); above
that, db/views.sql uses the normal approximation of the binomial, which is within one rank of the exact answer
there (tests/test_paired.py checks it).
"""

from __future__ import annotations

import math

import numpy as np

MAX_EXACT = 200
LEVEL = 0.95


def binomial_tails(n: int, r: int) -> np.ndarray:
    """P(Binomial(n, j/n) >= r) for j = 0..n."""
    k = np.arange(n + 1)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    log_comb = log_fact[n] - log_fact[k] - log_fact[n - k]
    p = np.arange(n + 1)[:, None] / n
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pmf = log_comb + k * np.log(p) + (n - k) * np.log1p(-p)
    pmf = np.nan_to_num(np.exp(log_pmf))  # 0 * log 0 at p = 0 or 1
    pmf[0, 0] = pmf[n, n] = 1.0
    return pmf[:, r:].sum(axis=1)


def quantile_rank(n: int, r: int, q: float) -> int:
    """The j (1-based) of the q-quantile of a resample's r-th order statistic."""
    tails = binomial_tails(n, r)
    return int(np.argmax(tails >= q - 1e-12))  # tails rise with j; index j is rank j (index 0: j = 0, never >= q)


def median_ci_ranks(n: int) -> tuple[int, int, int, int]:
    """(low_a, low_b, high_a, high_b): the interval is [(x_(low_a) + x_(low_b)) / 2, (x_(high_a) + x_(high_b)) / 2]
    for a sorted sample x_(1..n), a and b being the lower and upper middle order statistics."""
    a, b = (n + 1) // 2, n // 2 + 1
    q_low, q_high = (1 - LEVEL) / 2, (1 + LEVEL) / 2
    return (quantile_rank(n, a, q_low), quantile_rank(n, b, q_low),
            quantile_rank(n, a, q_high), quantile_rank(n, b, q_high))


def approx_rank(n: int, r: int, z: float) -> int:
    """The normal approximation db/views.sql uses above MAX_EXACT (same formula as its ci_rank macro)."""
    return max(1, min(n, math.ceil(r - 0.5 + z * math.sqrt(r * (n - r) / n))))


def rank_rows(max_n: int = MAX_EXACT) -> list[dict]:
    return [dict(zip(("n", "low_a", "low_b", "high_a", "high_b"), (n, *median_ci_ranks(n))))
            for n in range(1, max_n + 1)]
