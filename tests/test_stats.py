"""keras_hesstrace.stats: Wilson interval, Hedges' g, run lengths, lag-1 test."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from keras_hesstrace.stats import (
    cohens_d,
    hedges_correction,
    hedges_g,
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


def test_hedges_g_known_data():
    # means 3 and 5, both sample SDs sqrt(2.5): d = -2 / sqrt(2.5) = -1.2649, df = 8.
    res = hedges_g([1, 2, 3, 4, 5], [3, 4, 5, 6, 7])
    assert res.d == pytest.approx(-2 / math.sqrt(2.5))
    j8 = math.gamma(4) / (math.sqrt(4) * math.gamma(3.5))
    assert res.g == pytest.approx(j8 * res.d)
    assert (res.n_a, res.n_b) == (5, 5)
    assert res.low < res.g < res.high and res.low < 0 < res.high  # t(8) = -2.0, p = 0.08
    # The limits are the noncentralities whose CDF at the observed t is 0.975 / 0.025.
    t, scale = res.d * math.sqrt(2.5), math.sqrt(2.5)
    assert sps.nct.cdf(t, 8, res.low * scale) == pytest.approx(0.975, abs=1e-9)
    assert sps.nct.cdf(t, 8, res.high * scale) == pytest.approx(0.025, abs=1e-9)
    # Unequal sizes and SDs: variances 1 and 20/3, pooled ((3-1)*1 + (4-1)*20/3) / 5 = 4.4.
    a, b = [9.0, 10.0, 11.0], [0.0, 2.0, 4.0, 6.0]
    assert hedges_g(a, b).d == pytest.approx((10 - 3) / math.sqrt(4.4))
    ab, ba = hedges_g(a, b), hedges_g(b, a)
    assert (ba.g, ba.low, ba.high) == pytest.approx((-ab.g, -ab.high, -ab.low))
    narrow = hedges_g(a, b, ci=0.5)
    assert ab.low < narrow.low < narrow.high < ab.high


def test_hedges_correction():
    # Exact gamma form against the usual approximation 1 - 3 / (4 df - 1).
    for df in (6, 8, 21, 43, 200):
        assert hedges_correction(df) == pytest.approx(1 - 3 / (4 * df - 1), abs=1e-3)
    assert hedges_correction(2) == pytest.approx(1 / math.sqrt(math.pi))
    with pytest.raises(ValueError):
        hedges_correction(1)


def test_hedges_g_errors_and_deprecated_alias():
    with pytest.raises(ValueError, match="constant"):
        hedges_g([1.0, 1.0], [2.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        hedges_g([1.0], [2.0, 3.0])
    with pytest.raises(ValueError, match="1-D"):
        hedges_g(np.ones((2, 2)), [2.0, 3.0])
    with pytest.raises(ValueError, match="ci"):
        hedges_g([1.0, 2.0], [2.0, 4.0], ci=1.0)
    with pytest.warns(DeprecationWarning, match="hedges_g"):
        old = cohens_d([1, 2, 3, 4, 5], [3, 4, 5, 6, 7], n_boot=2000, seed=0)
    assert old == hedges_g([1, 2, 3, 4, 5], [3, 4, 5, 6, 7])


R = 2000  # replications per case; Monte Carlo s.e. of a 0.95 coverage: sqrt(.95 .05 / R)


@pytest.mark.parametrize("n_a, n_b", [(5, 18), (5, 40), (10, 10)])
def test_hedges_g_coverage_and_bias_by_simulation(n_a, n_b):
    """Normal groups, sigma 1, true delta 0, 1, 5: the 95% interval covers delta within
    3 Monte Carlo s.e. of 0.95, and g's mean is within 3 s.e. of delta.

    Measured (delta 0, 1, 5): (5, 18) 0.948 0.948 0.956; (5, 40) 0.945 0.957 0.950;
    (10, 10) 0.944 0.943 0.941 (tolerance +-0.0146). g's mean is off delta by at most
    2.1 s.e.; d's misses delta = 5 by 0.10-0.23 (6-10 s.e.).
    """
    rng = np.random.default_rng([2024, n_a, n_b])
    tol = 3 * math.sqrt(0.95 * 0.05 / R)
    for delta in (0.0, 1.0, 5.0):
        a = rng.normal(delta, 1.0, size=(R, n_a))
        b = rng.normal(0.0, 1.0, size=(R, n_b))
        res = [hedges_g(x, y) for x, y in zip(a, b)]
        g = np.array([r.g for r in res])
        covered = np.mean([r.low <= delta <= r.high for r in res])
        assert abs(covered - 0.95) <= tol, (n_a, n_b, delta, covered)
        assert abs(g.mean() - delta) <= 3 * g.std(ddof=1) / math.sqrt(R), (n_a, n_b, delta,
                                                                           g.mean())


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
