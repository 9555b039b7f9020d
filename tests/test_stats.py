"""keras_hesstrace.stats: Wilson interval, Cohen's d, run lengths, lag-1 test."""

import math

import numpy as np
import pytest

from keras_hesstrace.stats import (
    cohens_d,
    lag1_autocorrelation,
    run_length_summary,
    wilson_interval,
)


@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
])
def test_wilson_interval_known_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_properties_and_errors():
    lo90, hi90 = wilson_interval(16, 120, confidence=0.90)
    lo99, hi99 = wilson_interval(16, 120, confidence=0.99)
    assert lo99 < lo90 < 16 / 120 < hi90 < hi99
    lo, hi = wilson_interval(3, 10)
    assert (lo, hi) == pytest.approx((1 - wilson_interval(7, 10)[1], 1 - wilson_interval(7, 10)[0]))
    for k, n in [(-1, 10), (11, 10), (0, 0), (1.5, 10)]:
        with pytest.raises(ValueError):
            wilson_interval(k, n)


def test_cohens_d_known_data():
    # means 3 and 5, both sample SDs sqrt(2.5): d = -2 / sqrt(2.5) = -1.2649.
    res = cohens_d([1, 2, 3, 4, 5], [3, 4, 5, 6, 7], n_boot=2000, seed=0)
    assert res.d == pytest.approx(-2 / math.sqrt(2.5))
    assert res.low < res.d < res.high and res.high < 0
    assert (res.n_a, res.n_b) == (5, 5)
    # Unequal sizes and SDs: variances 1 and 20/3, pooled ((3-1)*1 + (4-1)*20/3) / 5 = 4.4.
    a, b = [9.0, 10.0, 11.0], [0.0, 2.0, 4.0, 6.0]
    assert cohens_d(a, b).d == pytest.approx((10 - 3) / math.sqrt(4.4))
    assert cohens_d(b, a).d == pytest.approx(-cohens_d(a, b).d)
    assert cohens_d(a, b, seed=1) == cohens_d(a, b, seed=1)


def test_cohens_d_bootstrap_covers_true_effect():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, size=40), rng.normal(0.0, 1.0, size=40)
    res = cohens_d(a, b, n_boot=4000, seed=1)
    assert res.low < 1.0 < res.high
    assert 0.3 < res.high - res.low < 1.2  # SE of d at n = 40 + 40 is about 0.24
    with pytest.raises(ValueError, match="constant"):
        cohens_d([1.0, 1.0], [2.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        cohens_d([1.0], [2.0, 3.0])
    with pytest.raises(ValueError, match="1-D"):
        cohens_d(np.ones((2, 2)), [2.0, 3.0])


def test_run_length_summary():
    s = run_length_summary([12.0, 15.0, None, 9.0, np.nan])
    assert (s.n_runs, s.n_alerts, s.alert_rate) == (5, 3, 0.6)
    assert (s.mean, s.median) == (12.0, 12.0) and s.sd == pytest.approx(3.0)
    assert (s.alert_rate_low, s.alert_rate_high) == pytest.approx(wilson_interval(3, 5))
    none = run_length_summary([np.nan, np.nan])
    assert none.alert_rate == 0 and math.isnan(none.mean) and math.isnan(none.sd)
    assert math.isnan(run_length_summary([4.0]).sd)
    with pytest.raises(ValueError):
        run_length_summary([])


def test_lag1_rejects_ar1_and_not_white_noise():
    rng = np.random.default_rng(0)
    n = 500
    e = rng.normal(size=n)
    x = np.empty(n)
    x[0] = e[0]
    for t in range(1, n):
        x[t] = 0.5 * x[t - 1] + e[t]
    ar = lag1_autocorrelation(x)
    assert 0.4 < ar.r < 0.6 and ar.pvalue < 1e-10 and ar.n_pairs == n - 1
    white = lag1_autocorrelation(rng.normal(size=n))
    assert abs(white.r) < 3 / math.sqrt(n) and white.pvalue > 0.05
    # Under H0 the p-value is uniform: about 5% of white-noise series reject at 0.05.
    rejections = np.mean([lag1_autocorrelation(rng.normal(size=200)).pvalue < 0.05
                          for _ in range(400)])
    assert 0.02 < rejections < 0.09


def test_lag1_pairs_stay_inside_segments():
    # Mean 0, sum of squares 6; within-segment products -1 four times: r = -4/6.
    # Joining the segments would add the pair (1, -1) and give -5/6.
    res = lag1_autocorrelation([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]])
    assert res.r == pytest.approx(-4 / 6) and res.n_pairs == 4
    assert lag1_autocorrelation(np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])).r == \
        pytest.approx(-5 / 6)
    with pytest.raises(ValueError, match="constant"):
        lag1_autocorrelation(np.ones(10))
    with pytest.raises(ValueError, match="non-finite"):
        lag1_autocorrelation(np.array([1.0, np.nan, 2.0, 3.0, 4.0]))
