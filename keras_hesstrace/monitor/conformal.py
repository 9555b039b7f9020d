"""Per-run calibration of h: the conformal rule on leave-one-out clean runs
(docs/monitoring.md, docs/method.md §7.4).

Each clean run i, standardised with the other runs' baseline (``loo_standardize``), is
run through the recursion from its own start over the first ``horizon`` snapshots;
M_i is the largest max(g+, g-) it reaches. A new clean run of that length alerts iff
its own M exceeds h. With N runs and k = floor(alpha (N + 1)), h = the k-th largest M_i:
for exchangeable runs the rank of a new run's M among the N + 1 is uniform, so it
exceeds h with probability k / (N + 1) <= alpha, averaged over calibration sets. Given
one calibration set the probability is random: for continuous M it is Beta(k, N + 1 - k)
distributed across calibration sets (Vovk 2012; Angelopoulos and Bates 2021, §3.2).

Contents:
    loo_max_statistics      M_i of each leave-one-out run over the horizon.
    conformal_rank          k = floor(alpha (N + 1)), with the error when it is 0.
    ConformalThreshold      what ``conformal_threshold`` returns.
    conformal_threshold     h, the achieved rate, its interval and the range of h.
"""

import math
from typing import List, NamedTuple, Sequence, Tuple

import numpy as np
from scipy import stats as _sps

from keras_hesstrace.monitor.page_hinkley import page_hinkley_statistics


def loo_max_statistics(loo: Sequence[np.ndarray], delta: float, n_scored: int) -> np.ndarray:
    """Largest max(g+, g-) of each run over its first ``n_scored`` z.

    Args:
        loo: N 1-D float arrays [T_i'], each run's leave-one-out z at its scored
            snapshots (``loo_standardize``); a run shorter than ``n_scored`` uses what
            it has.
        delta: allowance >= 0.
        n_scored: scored snapshots of the horizon (>= 1).

    Returns:
        float64 array [N] of M_i >= 0 (the recursion starts at g+ = g- = 0 at the start
        of each run, as a new run's does).
    """
    out = np.zeros(len(loo))
    for i, z in enumerate(loo):
        z = np.asarray(z, dtype=np.float64)[:n_scored]
        if z.size:
            g_pos, g_neg = page_hinkley_statistics(z, delta)  # the one recursion
            out[i] = max(float(g_pos.max()), float(g_neg.max()))
    return out


def conformal_rank(n_runs: int, alpha: float) -> int:
    """k = floor(alpha (N + 1)), the rank (from the top) of the M_i that is h.

    Raises:
        ValueError: k = 0: N runs cannot calibrate a rate below 1 / (N + 1); the
            message says how many runs alpha needs, ceil(1 / alpha) - 1.
    """
    k = int(math.floor(alpha * (n_runs + 1) + 1e-9))
    if k == 0:
        need = int(math.ceil(1.0 / alpha - 1e-9)) - 1
        raise ValueError(
            f"{n_runs} clean runs cannot calibrate false_alarm_prob={alpha:g}: with N "
            f"runs the smallest per-run false-alarm probability the conformal rule "
            f"reaches is 1/(N+1) = {1.0 / (n_runs + 1):.3g}. false_alarm_prob={alpha:g} "
            f"needs at least {need} clean runs (ceil(1/alpha) - 1); or use a larger "
            "false_alarm_prob."
        )
    return min(k, n_runs)


class ConformalThreshold(NamedTuple):
    """The conformal h of one group.

    Attributes:
        threshold: h, the k-th largest M_i.
        k: its rank from the top; N = ``len(max_statistics)``.
        achieved: k / (N + 1), the expected per-run false-alarm probability.
        interval: central ``confidence`` interval of the per-run rate across
            calibration sets, Beta(k, N + 1 - k) quantiles.
        threshold_range: (h, the next larger M_i, or inf): every h' in this range
            counts the same leave-one-out alarms (M_i > h').
        exceed: M_i > h of the calibration runs (k - 1 without ties).
    """

    threshold: float
    k: int
    achieved: float
    interval: Tuple[float, float]
    threshold_range: Tuple[float, float]
    exceed: List[bool]


def conformal_threshold(max_statistics: np.ndarray, alpha: float,
                        confidence: float = 0.95) -> ConformalThreshold:
    """h from the M_i of N clean runs for a per-run false-alarm probability alpha.

    Args:
        max_statistics: float array [N], M_i of each leave-one-out run.
        alpha: target per-run false-alarm probability, in (0, 1).
        confidence: level of the interval of the per-run rate.

    Returns:
        ``ConformalThreshold``.

    Raises:
        ValueError: alpha below 1 / (N + 1) (see ``conformal_rank``), or h = 0 (no
            clean run moves the statistic: nothing to calibrate on).

    Example:
        >>> r = conformal_threshold(np.arange(1.0, 11.0), 0.1)  # N = 10: k = 1
        >>> r.threshold, r.k, round(r.achieved, 4), r.threshold_range
        (10.0, 1, 0.0909, (10.0, inf))
    """
    m = np.asarray(max_statistics, dtype=np.float64)
    n = m.size
    k = conformal_rank(n, alpha)
    desc = np.sort(m)[::-1]
    h = float(desc[k - 1])
    if not h > 0:
        raise ValueError(
            f"The {k}-th largest maximum statistic of the clean runs is {h!r}: the "
            "leave-one-out runs never move max(g+, g-) above 0 (delta too large for "
            "their spread?), so no threshold h > 0 can be calibrated."
        )
    larger = desc[desc > h]
    hi = float(larger.min()) if larger.size else math.inf
    tail = (1.0 - confidence) / 2.0
    dist = _sps.beta(k, n + 1 - k)
    interval = (float(dist.ppf(tail)), float(dist.ppf(1.0 - tail)))
    return ConformalThreshold(h, k, k / (n + 1), interval, (h, hi), [bool(v > h) for v in m])
