"""Statistics of paired samples: correlations, ranks, sign agreement, bootstrap intervals.

For accuracy comparisons on the same rows: `paired_difference` (the mean
difference of per-row correctness with a paired bootstrap interval, over one or
several disjoint row sets averaged), `mcnemar` (exact two-sided test on the
discordant rows) and `t_interval` (mean over independent repeats: seeds, splits).

Inputs are 1-D sequences of numbers (lists, NumPy arrays or tensors), read in
float64. Undefined results (a constant input, fewer than two values, NaN) are
NaN; `undefined_reason` says why.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "average_ranks",
    "bootstrap_interval",
    "mcnemar",
    "paired_difference",
    "pearson",
    "sign_agreement",
    "spearman",
    "t_interval",
    "t_quantile",
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


def paired_difference(
    folds: Sequence[Tuple[Any, Any]],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Dict[str, float]:
    """Mean over `folds` of mean(new correct) - mean(old correct), with a paired bootstrap interval.

    Each fold is (new, old): per-row correctness (0/1) of two classifiers on the
    same rows. Rows are resampled with replacement within each fold (the same
    rows for both classifiers: the pairing), independently across folds, and the
    statistic is the mean of the folds' differences, as in the point estimate.
    Returns ``diff``, ``lo``, ``hi`` and ``n`` (rows in all folds).
    """
    if not folds:
        raise ValueError("paired_difference needs at least one fold")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    diffs, boot, rows = [], np.zeros(resamples), 0
    for new, old in folds:
        a, b = _pair(new, old)
        if a.size == 0:
            raise ValueError("a fold has no rows")
        d = a - b
        diffs.append(float(d.mean()))
        boot += d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
        rows += d.size
    boot /= len(folds)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    return {"diff": float(np.mean(diffs)), "lo": float(lo), "hi": float(hi), "n": rows}


def mcnemar(new: Any, old: Any) -> Dict[str, float]:
    """Exact two-sided McNemar test of two classifiers' per-row correctness on the same rows.

    ``b``: rows only `new` gets right, ``c``: rows only `old` gets right; under
    the null each discordant row is a fair coin, so p = P(Binomial(b + c, 1/2)
    at least as far from (b + c)/2 as observed), capped at 1 (1 with no
    discordant rows).
    """
    a, o = _pair(new, old)
    b = int(np.sum((a > 0.5) & (o <= 0.5)))
    c = int(np.sum((a <= 0.5) & (o > 0.5)))
    n, m = b + c, min(b, c)
    if n == 0:
        return {"b": b, "c": c, "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(m + 1)) / 2.0**n
    return {"b": b, "c": c, "p": min(1.0, 2.0 * tail)}


def t_interval(values: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """Mean of independent repeats with a Student-t interval (``lo``/``hi`` NaN below two values)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = float(x.mean())
    if x.size < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": 1}
    half = t_quantile(0.5 + level / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(x.size)}


def _t_cdf_above_half(x: float, df: int) -> float:
    """P(0 < T <= x) for Student's t with `df` degrees of freedom (x >= 0), Simpson's rule."""
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    grid = np.linspace(0.0, x, 4001)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(grid**2 / df))
    h = grid[1] - grid[0]
    return float(h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum()))


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile (0.5 < p < 1) of Student's t with `df` >= 1 degrees of freedom."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while 0.5 + _t_cdf_above_half(hi, df) < p:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + _t_cdf_above_half(mid, df) < p else (lo, mid)
    return (lo + hi) / 2
