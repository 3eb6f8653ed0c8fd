"""mftx.study.statistics: correlations against hand computations and scipy, bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mftx.study import statistics
from mftx.study.statistics import (
    average_ranks,
    bootstrap_interval,
    pearson,
    sign_agreement,
    spearman,
    undefined_reason,
)


def test_pearson_hand_computed() -> None:
    # x - mean = (-1, 0, 1), y - mean = (-2, -1, 3): r = 5 / sqrt(2 * 14)
    assert pearson([1, 2, 3], [1, 2, 6]) == pytest.approx(5 / math.sqrt(28))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_with_ties_hand_computed() -> None:
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 2, 3, 4): deviations (-1.5, 0, 0, 1.5) and
    # (-1.5, -0.5, 0.5, 1.5): r = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    np.testing.assert_array_equal(average_ranks([3, 1, 3, 2]), [3.5, 1, 3.5, 2])


def test_constant_and_degenerate_input_is_nan_with_a_reason() -> None:
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert undefined_reason([1, 1, 1], [1, 2, 3]) == "a constant input"
    assert math.isnan(pearson([1, 2, 3], [0.1, 0.1, 0.1]))
    assert math.isnan(pearson([1.0], [2.0]))
    assert undefined_reason([1.0], [2.0]) == "fewer than two values (1)"
    assert math.isnan(spearman([1, math.nan, 3], [1, 2, 3]))
    assert undefined_reason([1, math.inf, 3], [1, 2, 3]) == "non-finite values"
    # Spearman ranks infinities; Pearson cannot use them.
    assert spearman([1, math.inf, 3], [1, 3, 2]) == pytest.approx(1.0)
    assert undefined_reason([1, math.inf, 3], [1, 3, 2], finite=False) is None
    assert undefined_reason([1, 2, 3], [1, 3, 2]) is None
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2], [1, 2, 3])


def test_accepts_tensors() -> None:
    torch = pytest.importorskip("torch")
    x = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float32)
    assert spearman(x, torch.tensor([3.0, 1.0, 2.0])) == pytest.approx(1.0)


def test_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 6, size=40).astype(float)  # many ties
        y = x + rng.normal(size=40)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)


def test_sign_agreement() -> None:
    assert sign_agreement([1, -2, 0, 3], [2, -1, 0, -3]) == 0.75
    assert math.isnan(sign_agreement([], []))


def test_bootstrap_interval_of_the_mean_matches_the_normal_approximation() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 1.0, size=400)
    lo, hi = bootstrap_interval(np.mean, x, resamples=2000, seed=3)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert lo < x.mean() < hi
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.2 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.2 * se)
    assert bootstrap_interval(np.mean, x, resamples=200, seed=3) == bootstrap_interval(
        np.mean, x, resamples=200, seed=3
    )


def test_bootstrap_resamples_pairs_together() -> None:
    x = np.arange(30.0)
    # Paired rows keep a perfect rank correlation in every resample.
    lo, hi = bootstrap_interval(spearman, x, 2 * x + 1, resamples=100)
    assert lo == hi == pytest.approx(1.0)
    # A constant statistic: a degenerate interval; all-NaN: (nan, nan).
    assert bootstrap_interval(lambda a: 5.0, x, resamples=10) == (5.0, 5.0)
    assert all(math.isnan(v) for v in bootstrap_interval(spearman, x, np.ones(30), resamples=10))
    with pytest.raises(ValueError, match="same length"):
        bootstrap_interval(pearson, x, x[:3])
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(np.mean, x, level=1.0)


def test_bootstrap_interval_covers_the_truth_about_as_often_as_it_says() -> None:
    rng = np.random.default_rng(7)
    hits = 0
    for trial in range(200):
        x = rng.exponential(1.0, size=60)  # skewed: the percentile interval is approximate
        lo, hi = bootstrap_interval(np.mean, x, resamples=300, level=0.9, seed=trial)
        hits += lo <= 1.0 <= hi
    assert 0.8 <= hits / 200 <= 0.96


# --------------------------------------------------------------- paired accuracy comparisons


def test_paired_difference_equals_a_brute_force_bootstrap():
    rng = np.random.default_rng(5)
    folds = [(rng.integers(0, 2, 40), rng.integers(0, 2, 40)),
             (rng.integers(0, 2, 30), rng.integers(0, 2, 30))]  # fmt: skip
    got = statistics.paired_difference(folds, resamples=300, seed=9)
    # Brute force: the same generator stream, one resample at a time, fold by fold.
    gen = np.random.default_rng(9)
    draws = [gen.integers(0, len(a), size=(300, len(a))) for a, _ in folds]
    boot = [np.mean([np.mean(a[d[i]] - b[d[i]]) for (a, b), d in zip(folds, draws)])
            for i in range(300)]  # fmt: skip
    lo, hi = np.quantile(boot, [0.025, 0.975])
    want = np.mean([np.mean(a - b) for a, b in folds])
    assert got["diff"] == pytest.approx(want) and got["n"] == 70
    assert (got["lo"], got["hi"]) == pytest.approx((lo, hi))
    assert got["lo"] <= got["diff"] <= got["hi"]


def test_paired_difference_of_identical_classifiers_is_exactly_zero():
    a = np.array([1, 0, 1, 1, 0])
    got = statistics.paired_difference([(a, a)], resamples=50)
    assert (got["diff"], got["lo"], got["hi"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="at least one fold"):
        statistics.paired_difference([])


def test_mcnemar_exact_by_hand():
    new = np.array([1] * 7 + [0] * 1 + [1] * 10)
    old = np.array([0] * 7 + [1] * 1 + [1] * 10)
    got = statistics.mcnemar(new, old)
    # b = 7, c = 1: p = 2 * P(X <= 1), X ~ Binomial(8, 1/2) = 2 * 9 / 256
    assert (got["b"], got["c"]) == (7, 1) and got["p"] == pytest.approx(18 / 256)
    assert statistics.mcnemar(new, new)["p"] == 1.0


def test_t_interval_by_hand():
    x = [1.0, 2.0, 4.0]
    got = statistics.t_interval(x)
    sd = np.std(x, ddof=1)
    half = 4.302652729749464 * sd / np.sqrt(3)  # t_{0.975, 2}
    assert (got["mean"], got["lo"], got["hi"]) == pytest.approx((7 / 3, 7 / 3 - half, 7 / 3 + half))
    assert np.isnan(statistics.t_interval([1.0])["lo"])
    assert statistics.t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-5)


def test_per_row_encoding_round_trips_and_refuses_what_does_not_fit():
    from mftx.study.heldout import decode_rows, encode_rows

    v = torch.tensor([0, 1, 1, 0, 2, 255])
    assert decode_rows(encode_rows(v)).tolist() == v.tolist()
    with pytest.raises(ValueError, match=r"0\.\.255"):
        encode_rows(torch.tensor([256]))
