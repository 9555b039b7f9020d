"""Statistics for reporting the alert rule: effect sizes, proportions, run lengths.

Pure numpy/scipy functions on arrays (shapes in each docstring):

    cohens_d(a, b, ci=0.95, n_boot=2000, seed=0)   -> EffectSize
    wilson_interval(k, n, confidence=0.95)          -> (low, high)
    run_length_summary(alert_times, confidence=0.95)-> RunLengthSummary
    lag1_autocorrelation(z)                          -> Lag1Test
"""

import math
from typing import NamedTuple

import numpy as np
from scipy import stats as _sps

from keras_hesstrace._validate import check_integer


class EffectSize(NamedTuple):
    """Cohen's d with a bootstrap percentile interval.

    Attributes:
        d: (mean(a) - mean(b)) / pooled SD.
        low, high: bootstrap percentile interval at level ``ci``.
        n_a, n_b: sample sizes.
        n_boot: bootstrap resamples with a defined d (resamples with zero pooled SD,
            possible with few runs, are left out).
    """

    d: float
    low: float
    high: float
    n_a: int
    n_b: int
    n_boot: int


def _as_1d(x, name, min_n=1):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per run), got shape {x.shape}.")
    if x.size < min_n:
        raise ValueError(f"{name} needs at least {min_n} values, got {x.size}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite values.")
    return x


def _pooled_d(mean_a, var_a, n_a, mean_b, var_b, n_b):
    pooled = np.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pooled > 0, (mean_a - mean_b) / np.where(pooled > 0, pooled, 1.0),
                        np.nan)


def cohens_d(a, b, ci=0.95, n_boot=2000, seed=0):
    """Cohen's d between two groups of runs, pooled SD, bootstrap CI resampling runs.

    d = (mean(a) - mean(b)) / s_p, s_p^2 = ((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a+n_b-2),
    s^2 the sample variance (ddof=1). The interval resamples the runs of each group
    with replacement, independently, ``n_boot`` times, and takes percentiles of d.

    Args:
        a: array [n_a], one value per run (e.g. noisy runs' trace averaged over an
            epoch window); n_a >= 2.
        b: array [n_b], likewise (e.g. clean runs); n_b >= 2.
        ci: interval level in (0, 1).
        n_boot: bootstrap resamples (>= 100).
        seed: seed of the bootstrap generator.

    Returns:
        ``EffectSize(d, low, high, n_a, n_b, n_boot)``.

    Raises:
        ValueError: fewer than two runs in a group, non-finite values, zero pooled SD.

    Example:
        >>> cohens_d([1, 2, 3, 4, 5], [3, 4, 5, 6, 7]).d    # doctest: +ELLIPSIS
        -1.264...
    """
    a = _as_1d(a, "a", 2)
    b = _as_1d(b, "b", 2)
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}.")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot}.")
    d = float(_pooled_d(a.mean(), a.var(ddof=1), a.size, b.mean(), b.var(ddof=1), b.size))
    if math.isnan(d):
        raise ValueError("Both groups are constant (pooled SD = 0): Cohen's d is undefined.")
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, a.size, size=(n_boot, a.size))]
    rb = b[rng.integers(0, b.size, size=(n_boot, b.size))]
    boot = _pooled_d(ra.mean(1), ra.var(1, ddof=1), a.size, rb.mean(1), rb.var(1, ddof=1),
                     b.size)
    boot = boot[np.isfinite(boot)]
    alpha = (1 - ci) / 2
    low, high = (np.quantile(boot, [alpha, 1 - alpha]) if boot.size else (np.nan, np.nan))
    return EffectSize(d, float(low), float(high), int(a.size), int(b.size), int(boot.size))


def wilson_interval(k, n, confidence=0.95):
    """Wilson score interval for a binomial proportion k/n.

    low, high = (p + c/2n -/+ z sqrt(p(1-p)/n + c/4n^2)) / (1 + c/n), c = z^2,
    z the two-sided normal quantile. Unlike the Wald interval it stays inside [0, 1]
    and is not degenerate at k = 0 or k = n.

    Args:
        k: successes, integer 0 <= k <= n (e.g. runs that alerted).
        n: trials, integer >= 1.
        confidence: level in (0, 1).

    Returns:
        (low, high) floats.

    Example:
        >>> [round(v, 4) for v in wilson_interval(81, 263)]
        [0.2553, 0.3662]
    """
    n = check_integer("n (trials)", n)
    k = check_integer("k (successes, at most n)", k, 0, n)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    z = float(_sps.norm.ppf(0.5 + confidence / 2))
    p = k / n
    c = z * z
    centre = (p + c / (2 * n)) / (1 + c / n)
    half = z * math.sqrt(p * (1 - p) / n + c / (4 * n * n)) / (1 + c / n)
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


class RunLengthSummary(NamedTuple):
    """Detection times of several runs, as in Table 1 of the method paper.

    Attributes:
        n_runs: runs summarised.
        n_alerts: runs that alerted.
        alert_rate: n_alerts / n_runs (power for noisy runs, false-alarm rate for clean).
        alert_rate_low, alert_rate_high: its Wilson interval.
        mean, sd, median: of the detection times of the runs that alerted (sd with
            ddof=1; NaN when fewer than one, resp. two, runs alerted).
    """

    n_runs: int
    n_alerts: int
    alert_rate: float
    alert_rate_low: float
    alert_rate_high: float
    mean: float
    sd: float
    median: float


def run_length_summary(alert_times, confidence=0.95):
    """Alert rate and mean/sd/median detection time over runs.

    Args:
        alert_times: array [n_runs] of each run's first alert time (step, epoch or
            snapshot: any unit), NaN or None for a run that never alerted.
        confidence: level of the Wilson interval of the alert rate.

    Returns:
        ``RunLengthSummary``.

    Example:
        >>> s = run_length_summary([12.0, 15.0, None, 9.0])
        >>> s.alert_rate, s.mean, s.median
        (0.75, 12.0, 12.0)
    """
    t = np.array([np.nan if v is None else v for v in np.ravel(np.asarray(alert_times,
                                                                        dtype=object))],
                 dtype=np.float64)
    if t.size == 0:
        raise ValueError("alert_times is empty.")
    if np.any(np.isinf(t)):
        raise ValueError("alert_times has infinite values; use NaN for 'no alert'.")
    hit = t[~np.isnan(t)]
    k, n = int(hit.size), int(t.size)
    low, high = wilson_interval(k, n, confidence)
    return RunLengthSummary(
        n_runs=n, n_alerts=k, alert_rate=k / n, alert_rate_low=low, alert_rate_high=high,
        mean=float(hit.mean()) if k else float("nan"),
        sd=float(hit.std(ddof=1)) if k >= 2 else float("nan"),
        median=float(np.median(hit)) if k else float("nan"),
    )


class Lag1Test(NamedTuple):
    """Lag-1 autocorrelation and its test of independence.

    Attributes:
        r: lag-1 autocorrelation coefficient.
        pvalue: two-sided p-value of H0 "independent values".
        n_pairs: adjacent pairs used (within segments).
    """

    r: float
    pvalue: float
    n_pairs: int


def lag1_autocorrelation(z):
    """Lag-1 autocorrelation with the large-sample (Bartlett / Box-Pierce) test.

    r = sum_pairs (z_t - m)(z_{t+1} - m) / sum_all (z_t - m)^2, m the mean of all
    values, pairs (t, t+1) taken within each segment only (never across the boundary
    between two runs). Under H0 (independent, identically distributed values)
    sqrt(n_pairs) * r is approximately N(0, 1) (Bartlett's variance 1/n; this is the
    Box-Pierce test at lag 1, Q = n_pairs r^2 ~ chi2(1)), so
    p = 2 (1 - Phi(sqrt(n_pairs) |r|)). Good for the hundreds to thousands of pooled
    values a calibration sees; only approximate below ~50 pairs.

    Args:
        z: array [T] (one series) or a sequence of 1-D arrays [T_i] (segments, e.g.
            the standardised clean runs); finite values.

    Returns:
        ``Lag1Test(r, pvalue, n_pairs)``.

    Raises:
        ValueError: fewer than 3 pairs, non-finite values, or constant values.
    """
    if isinstance(z, np.ndarray) and z.ndim == 1 and z.dtype != object:
        segments = [z.astype(np.float64)]
    else:
        segments = [np.asarray(s, dtype=np.float64) for s in z]
    for s in segments:
        if s.ndim != 1:
            raise ValueError(f"each segment must be 1-D, got shape {s.shape}.")
        if not np.all(np.isfinite(s)):
            raise ValueError("z has non-finite values.")
    allz = np.concatenate(segments) if segments else np.zeros(0)
    n_pairs = int(sum(max(len(s) - 1, 0) for s in segments))
    if n_pairs < 3:
        raise ValueError(f"need at least 3 adjacent pairs, got {n_pairs}.")
    m = allz.mean()
    denom = float(np.sum((allz - m) ** 2))
    if denom == 0:
        raise ValueError("z is constant: the autocorrelation is undefined.")
    num = float(sum(np.sum((s[:-1] - m) * (s[1:] - m)) for s in segments if len(s) > 1))
    r = num / denom
    p = float(2 * _sps.norm.sf(math.sqrt(n_pairs) * abs(r)))
    return Lag1Test(r, p, n_pairs)
