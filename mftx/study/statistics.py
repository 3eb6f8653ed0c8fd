"""Statistics of paired samples: correlations, ranks, sign agreement, bootstrap intervals.

Inputs are 1-D sequences of numbers (lists, NumPy arrays or tensors), read in
float64. Undefined results (a constant input, fewer than two values, NaN) are
NaN; `undefined_reason` says why.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import numpy as np

__all__ = [
    "average_ranks",
    "bootstrap_interval",
    "pearson",
    "sign_agreement",
    "spearman",
    "undefined_reason",
]


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _pair(x: Any, y: Any) -> Tuple[np.ndarray, np.ndarray]:
    a, b = _as_array(x), _as_array(y)
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    return a, b


def undefined_reason(x: Any, y: Any, finite: bool = True) -> Optional[str]:
    """Why a correlation of `x` and `y` is undefined, or None when it is defined.

    `finite`: infinities make it undefined too (Pearson); Spearman ranks them.
    """
    a, b = _pair(x, y)
    if a.size < 2:
        return f"fewer than two values ({a.size})"
    bad = (lambda v: ~np.isfinite(v)) if finite else np.isnan
    if bad(a).any() or bad(b).any():
        return "non-finite values" if finite else "NaN values"
    if np.all(a == a[0]) or np.all(b == b[0]):
        return "a constant input"
    return None


def _pearson_arrays(a: np.ndarray, b: np.ndarray) -> float:
    if undefined_reason(a, b) is not None:
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
    if denom == 0.0:
        return math.nan
    return float(min(1.0, max(-1.0, float(np.dot(da, db)) / denom)))


def average_ranks(x: Any) -> np.ndarray:
    """1-based ranks of `x`, tied values sharing the mean of their ranks (float64)."""
    a = _as_array(x)
    n = a.size
    order = np.argsort(a, kind="mergesort")
    ordered = a[order]
    starts_mask = np.empty(n, dtype=bool)
    starts_mask[:1] = True
    starts_mask[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(starts_mask) - 1
    starts = np.flatnonzero(starts_mask)
    ends = np.append(starts[1:], n)
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of two equal-length sequences.

    NaN when either input is constant, has fewer than two values, or holds a
    non-finite value.
    """
    return _pearson_arrays(*_pair(x, y))


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties share their mean rank).

    NaN when either input is constant, has fewer than two values, or holds NaN;
    infinities rank as the extremes.
    """
    a, b = _pair(x, y)
    if undefined_reason(a, b, finite=False) is not None:
        return math.nan
    return _pearson_arrays(average_ranks(a), average_ranks(b))


def sign_agreement(x: Any, y: Any) -> float:
    """Share of pairs whose signs agree (zero matches zero only); NaN for empty input."""
    a, b = _pair(x, y)
    if a.size == 0:
        return math.nan
    return float(np.mean(np.sign(a) == np.sign(b)))


def bootstrap_interval(
    statistic: Callable[..., float],
    *samples: Any,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*samples)` over paired resamples.

    The samples are equal-length sequences resampled together (the same rows
    drawn with replacement from each); `resamples` draws from a generator
    seeded with `seed`. Resamples where the statistic is NaN are dropped; the
    interval is (NaN, NaN) when none is left.
    """
    arrays = [_as_array(s) for s in samples]
    if not arrays:
        raise ValueError("bootstrap_interval needs at least one sample")
    n = arrays[0].size
    if any(a.size != n for a in arrays):
        raise ValueError(f"samples must have the same length, got {[a.size for a in arrays]}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for i in range(resamples):
        rows = rng.integers(0, n, size=n)
        values[i] = statistic(*(a[rows] for a in arrays))
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi)
