"""Per-run calibration (the conformal rule, monitor/conformal.py) and the ARL0 path's
report and memory bound (docs/monitoring.md, docs/method.md §7.4)."""

import json
import math
import tracemalloc

import numpy as np
import pytest

from keras_hesstrace.monitor import Calibration, calibrate_threshold, run_lengths
from keras_hesstrace.monitor import resampling
from keras_hesstrace.monitor.conformal import conformal_threshold, loo_max_statistics
from keras_hesstrace.monitor.resampling import Resampled, _IndexStream, loo_standardize


def clean_runs(model, rng, n, T):
    """n clean runs [n, T]: i.i.d. N(0,1); AR(1) phi 0.5 or 0.9 from a stationary start;
    or "offset": each run its own N(0,1) offset plus i.i.d. N(0,1) noise."""
    e = rng.normal(size=(n, T))
    if model == "iid":
        return e
    if model == "offset":
        return rng.normal(size=(n, 1)) + e
    phi = {"ar05": 0.5, "ar09": 0.9}[model]
    x = np.empty((n, T))
    x[:, 0] = e[:, 0] / math.sqrt(1 - phi**2)
    for t in range(1, T):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    return x


def fresh_alarm_rate(cal, fresh):
    """Share of fresh runs [n, T] that alert, scored as a new run is: the full-N
    baseline, the one recursion from g+ = g- = 0, the calibration's h."""
    r = cal["default"]
    z = (fresh - r.baseline.mean) / r.baseline.std
    return float(np.mean(~np.isnan(run_lengths(z, r.threshold, cal.delta))))


# 200 calibration sets per model (T = 30 snapshots, delta 0.5, alpha 0.1), 1000 fresh runs
# each. Measured (seed 1) mean / sd / min / max of the per-set false-alarm rate:
#   iid     N=10: 0.0738 / 0.089 / 0.0 / 0.465
#   ar05    N=10: 0.0825 / 0.082 / 0.0 / 0.408
#   ar09    N=10: 0.0804 / 0.098 / 0.0 / 0.463
#   offset  N=10: 0.0710 / 0.074 / 0.0 / 0.375
#   ar09    N=20: 0.0753 / 0.053 / 0.002 / 0.306
# k/(N+1) = 0.0909 (N=10) and 0.0952 (N=20). The spread is the Beta(k, N+1-k) spread
# the result reports (sd 0.083 for Beta(1, 10), 0.063 for Beta(2, 19)). The mean is below
# k/(N+1): the calibration runs are standardised with N-1 other runs, a new run with all
# N, whose z are a little less extreme (conservative by 10-25 % at N = 10).
@pytest.mark.parametrize("model, n_runs", [("iid", 10), ("ar05", 10), ("ar09", 10),
                                           ("offset", 10), ("ar09", 20)])
def test_fresh_runs_false_alarm_at_about_alpha(model, n_runs):
    alpha, T, sets, n_fresh = 0.1, 30, 200, 1000
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(sets):
        cal = calibrate_threshold(clean_runs(model, rng, n_runs, T), false_alarm_prob=alpha)
        rates.append(fresh_alarm_rate(cal, clean_runs(model, rng, n_fresh, T)))
    rates = np.array(rates)
    achieved = cal["default"].achieved_false_alarm_prob
    assert achieved == math.floor(alpha * (n_runs + 1)) / (n_runs + 1)
    se = rates.std(ddof=1) / math.sqrt(sets)  # Monte Carlo standard error of the mean
    assert abs(rates.mean() - alpha) <= 0.3 * alpha, (rates.mean(), se)
    # Never anti-conservative beyond Monte Carlo error: mean <= k/(N+1) + 3 SE.
    assert rates.mean() <= achieved + 3 * se, (rates.mean(), achieved, se)


def test_conformal_rule_and_report():
    rng = np.random.default_rng(3)
    runs = rng.normal(size=(19, 40))
    cal = calibrate_threshold(runs, false_alarm_prob=0.1, group="g", confidence=0.9)
    r = cal["g"]
    assert cal.target == "false_alarm_prob" and cal.false_alarm_prob == 0.1
    assert cal.target_arl0 is None and r.arl0 is None and cal.n_resamples is None
    m = loo_max_statistics(loo_standardize(runs), 0.5, 40)
    np.testing.assert_array_equal(r.loo_max_statistics, m)
    desc = np.sort(m)[::-1]
    assert r.threshold == desc[1]  # k = floor(0.1 * 20) = 2
    assert r.threshold_range == (desc[1], desc[0])
    assert r.achieved_false_alarm_prob == r.false_alarm_prob == 2 / 20
    from scipy.stats import beta
    assert r.false_alarm_prob_interval == pytest.approx(beta(2, 18).ppf([0.05, 0.95]))
    assert r.loo_false_alarms == 1 == sum(a is not None for a in r.loo_alert_indices)
    assert r.expected_false_alarm_prob(40) == 0.1
    with pytest.raises(ValueError, match="runs of 40 snapshots"):
        r.expected_false_alarm_prob(80)
    # Default target: false_alarm_prob = 0.1; a shorter horizon lowers M_i and h.
    assert calibrate_threshold(runs, group="g").thresholds == cal.thresholds
    short = calibrate_threshold(runs, group="g", horizon=20)["g"]
    assert short.horizon == 20 and short.threshold <= r.threshold
    assert "false_alarm_prob=0.1 (achieved 0.1" in repr(cal)
    assert cal.to_frame().loc[0, "target"] == "false_alarm_prob"
    # With a reference snapshot only the T - r - 1 scored snapshots count.
    ref = calibrate_threshold(np.exp(runs), transform="log", reference_snapshot=2,
                              group="g")["g"]
    manual = conformal_threshold(
        loo_max_statistics(loo_standardize(np.exp(runs), "log", reference=2), 0.5, 37), 0.1)
    assert ref.threshold == manual.threshold


def test_targets_errors_and_warning():
    runs = np.random.default_rng(0).normal(size=(10, 30))
    with pytest.raises(ValueError, match=r"target_arl0=300.*false_alarm_prob=0\.1.*not both"):
        calibrate_threshold(runs, 300, false_alarm_prob=0.1)
    with pytest.raises(ValueError, match=r"10 clean runs cannot calibrate false_alarm_prob="
                                         r"0\.05.*at least 19 clean runs"):
        calibrate_threshold(runs, false_alarm_prob=0.05)
    with pytest.raises(ValueError, match="false_alarm_prob must be in"):
        calibrate_threshold(runs, false_alarm_prob=1.5)
    # 12 runs, alpha 0.1: k = 1, achieved 1/13 = 0.077, 23 % below: warned, both named.
    with pytest.warns(UserWarning, match=r"target 0\.1, achieved 0\.07692 = 1/13"):
        calibrate_threshold(np.random.default_rng(1).normal(size=(12, 30)))


def test_arl0_jump_is_reported_and_warned():
    # Formerly silent: h = 8.0976 with ARL0 1281 for a target of 300. The empirical
    # ARL0(h) jumps from ~297 to 1281 at one run maximum that thousands of resampled
    # sequences share.
    runs = np.random.default_rng(0).normal(size=(10, 30))
    with pytest.warns(UserWarning, match=r"target_arl0 300, achieved ARL0 1281"):
        cal = calibrate_threshold(runs, 300)
    r = cal["default"]
    assert cal.target == "arl0" and cal.target_arl0 == 300 and cal.false_alarm_prob is None
    assert r.arl0 == pytest.approx(1281, abs=1) and r.threshold == pytest.approx(8.0976, abs=1e-3)
    lo, hi = r.threshold_range
    assert lo <= r.threshold < hi and hi - lo < 1e-3
    assert len(r.loo_max_statistics) == 10 and r.achieved_false_alarm_prob is None


def test_version_3_file_loads_as_arl0():
    base = {"group": "g", "transform": None, "reference": None,
            "mean": [0.0, 0.1, 0.2], "std": [1.0, 1.0, 1.5], "n_runs": [5, 5, 5]}
    group = {"group": "g", "threshold": 4.2, "arl0": 310.0, "baseline": base, "n_runs": 5,
             "n_z": 15, "horizon": 3, "false_alarm_prob": 0.0097, "loo_false_alarms": 0,
             "loo_false_alarm_rate": 0.0, "loo_false_alarm_ci": [0.0, 0.43],
             "loo_alert_indices": [None] * 5, "lag1_r": 0.01, "lag1_pvalue": 0.9,
             "censored_fraction": 0.0, "resampled_false_alarm_prob": 0.01}
    v3 = {"format": "keras-hesstrace-calibration", "version": 3, "groups": ["g"],
          "every_n_steps": 10, "target_arl0": 300.0, "delta": 0.5, "transform": None,
          "n_resamples": 4000, "max_length": 3000, "seed": 0, "confidence": 0.95,
          "block_length": None, "reference_snapshot": None, "results": {"g": group}}
    cal = Calibration.from_dict(json.loads(json.dumps(v3)))
    assert cal.target == "arl0" and cal.false_alarm_prob is None
    assert cal.threshold == 4.2 and cal["g"].threshold_range is None
    assert cal["g"].loo_max_statistics is None and cal.detector().threshold == 4.2
    again = Calibration.from_dict(cal.to_dict())
    assert again.to_dict() == cal.to_dict() and cal.to_dict()["version"] == 5


def test_save_load_per_run(tmp_path):
    cal = calibrate_threshold({"a": np.random.default_rng(2).lognormal(size=(10, 25))},
                              transform="log", every_n_steps=5)
    cal.save(tmp_path / "c.json")
    back = Calibration.load(tmp_path / "c.json")
    assert back.to_dict() == cal.to_dict()
    assert back["a"].threshold_range == cal["a"].threshold_range  # (h, inf) survives JSON
    assert math.isinf(back["a"].threshold_range[1])


def test_time_chunked_resampling_carries_the_state():
    # A sequence longer than time_chunk is simulated in pieces; g+, g-, the running
    # maximum and the stream position carry over: the same run lengths as the plain
    # recursion on the whole stream, for any piece size.
    rng = np.random.default_rng(0)
    runs = [rng.normal(size=30) for _ in range(10)]
    pool = np.concatenate(runs)
    for block_length in (None, 1, 4):
        stream = _IndexStream([30] * 10, block_length, np.random.default_rng(3))
        z = np.stack([pool[stream.take(1000)] for _ in range(20)])
        a = Resampled(runs, 0.5, 20, 1000, seed=3, block_length=block_length, time_chunk=37)
        b = Resampled(runs, 0.5, 20, 1000, seed=3, block_length=block_length, time_chunk=999)
        for h in (1.0, 3.0, 5.0, 8.0, 12.0):
            np.testing.assert_array_equal(a.run_lengths(h), b.run_lengths(h))
            np.testing.assert_array_equal(a.run_lengths(h), run_lengths(z, h, 0.5))


def test_arl0_memory_is_bounded(monkeypatch):
    # target_arl0 = 1e6: max_length 1e7 snapshots per sequence (formerly one 80 MB array
    # per intermediate: 1.66 GB peak). Simulated in pieces of _CHUNK_ELEMENTS. The full
    # simulation (1e9 snapshots) takes minutes, so it is stopped after three pieces; the
    # peak up to there is the peak of the whole run (every piece is alike).
    calls = []
    real = resampling.page_hinkley_statistics

    class Enough(Exception):
        pass

    def counted(z, *a, **k):
        calls.append(np.shape(z))
        if len(calls) > 3:
            raise Enough
        return real(z, *a, **k)

    monkeypatch.setattr(resampling, "page_hinkley_statistics", counted)
    runs = np.random.default_rng(0).normal(size=(10, 30))
    tracemalloc.start()
    try:
        with pytest.raises(Enough):
            calibrate_threshold(runs, 1e6, n_resamples=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(math.prod(s) <= resampling._CHUNK_ELEMENTS for s in calls), calls
    assert peak < 200e6, peak / 1e6
