"""Calibrate the Page-Hinkley threshold h on clean runs (docs/method.md §7.4,
docs/monitoring.md).

``calibrate_threshold`` has two targets; both start from the leave-one-out z of the
clean runs: clean run i is standardised with the baseline (mu0_t, sigma0_t) of the
other N-1 runs, so its z are out-of-sample, as a new run's will be. With
``reference_snapshot=r`` every run is first replaced by its change since its own
snapshot r (T(x_t) - T(x_r), t > r); snapshots 0..r are not scored.

Per-run false-alarm probability (``false_alarm_prob=alpha``, the default, 0.1): each LOO
run is run through the recursion from its own start over the first ``horizon``
snapshots, M_i its largest max(g+, g-), and h is the k-th largest M_i with
k = floor(alpha (N + 1)): a fresh clean run of that length alerts with probability
k/(N+1) <= alpha (the conformal rule, ``keras_hesstrace.monitor.conformal``). This is
the number a user reads: "a clean run of this length alerts with probability alpha".

In-control ARL (``target_arl0``, for open-ended monitoring):

1. The LOO z runs are resampled into ``n_resamples`` long sequences: by default whole
   runs, each rotated by a random offset, concatenated (a circular block bootstrap with one
   run per block, which keeps each run's autocorrelation); ``block_length=k`` uses blocks of
   k snapshots within runs; ``block_length=1`` draws the pooled z i.i.d. (the method
   paper's rule, docs/method.md §7.6; with autocorrelated z it makes h too small, see
   docs/memorisation.md).
2. ARL0(h) is estimated by running the recursion on those sequences, each
   ``max_length`` snapshots (default 10 x target; a sequence that never alerts counts
   as censored and ARL0 = total snapshots observed / alerts, the geometric
   maximum-likelihood estimate). Memory is bounded whatever the length: long
   sequences are simulated in pieces, the recursion's state carried across
   (``keras_hesstrace.monitor.resampling``).
3. h is bisected until ARL0(h) = target. The resampled sequences are drawn once (fixed
   seed) and reused for every h, so ARL0(h) is a non-decreasing step function of h; the
   result reports the step it lands on (``threshold_range``, ``arl0``) and warns when
   that ARL0 is more than 10 % off the target.

Both report the LOO false-alarm rate of the real clean runs at h with its Wilson
interval, and the lag-1 autocorrelation of the pooled z with its test.

The result types (``Calibration``, ``GroupCalibration``) live in
``keras_hesstrace.monitor.calibration_result`` and are importable from here.
"""

import math
import warnings
from typing import Optional, Tuple

import numpy as np

from keras_hesstrace._validate import check_integer
from keras_hesstrace import stats
from keras_hesstrace.monitor.baseline import Baseline, check_reference, check_transform
from keras_hesstrace.monitor.calibration_result import (
    Calibration,
    GroupCalibration,
    check_fingerprint,
    false_alarm_prob_from_arl,
)
from keras_hesstrace.monitor.conformal import conformal_threshold, loo_max_statistics
from keras_hesstrace.monitor.page_hinkley import run_lengths
from keras_hesstrace.monitor.resampling import Resampled, bracket_threshold, loo_standardize

__all__ = ["Calibration", "GroupCalibration", "calibrate_threshold"]

_WARN_RELATIVE = 0.10  # warn when the achieved target is further off than this

def calibrate_threshold(clean_runs, target_arl0: Optional[float] = None, delta: float = 0.5,
                        *, false_alarm_prob: Optional[float] = None,
                        horizon: Optional[int] = None, transform: Optional[str] = None,
                        every_n_steps: Optional[int] = None, group: Optional[str] = None,
                        n_resamples: int = 4000, max_length: Optional[int] = None,
                        seed: int = 0, confidence: float = 0.95, ddof: int = 1,
                        tol: float = 1e-6, block_length: Optional[int] = None,
                        reference_snapshot: Optional[int] = None, model=None) -> Calibration:
    """Calibrate h for a per-run false-alarm probability (default) or an in-control ARL.

    Per-run (``false_alarm_prob=alpha``; the default when neither target is given,
    alpha = 0.1): h is the k-th largest of the clean runs' leave-one-out maximum
    statistics over ``horizon`` snapshots, k = floor(alpha (N + 1)), so that a clean run
    of ``horizon`` snapshots alerts with probability k/(N+1) <= alpha (module docstring).

    ARL0 (``target_arl0``; for open-ended monitoring): the leave-one-out z are resampled
    into long sequences on which ARL0(h) is estimated. By default whole runs are
    resampled (``block_length=None``): each sequence is a concatenation of randomly chosen
    LOO-standardised runs, each rotated by a random offset (circular block bootstrap, one
    run per block), so the serial dependence of real runs is kept. ``block_length=1``
    resamples the pooled z i.i.d. (the method paper's rule, docs/method.md §7.6): with
    autocorrelated z (``lag1_r`` > 0) it makes h too small.

    When the achieved rate (k/(N+1)) or ARL0 is more than 10 % from the target a
    ``UserWarning`` names both; the result always reports both.

    Args:
        clean_runs: a dict group -> trajectories, or trajectories of one group (then
            named ``group``, default ``"default"``). Trajectories: 2-D array [N, T]
            (trailing NaN pads shorter runs) or N 1-D arrays [T_i], one group's trace
            at snapshots 0, 1, ... of each clean run; N >= 3.
        target_arl0: target in-control average run length, in snapshots (> 1); selects
            the ARL0 calibration. Not together with ``false_alarm_prob``.
        delta: allowance of the recursion.
        false_alarm_prob: target probability alpha in (0, 1) that a clean run of
            ``horizon`` snapshots alerts; needs N >= ceil(1/alpha) - 1 runs.
        horizon: snapshots T of a run (counted from snapshot 0; with a reference r,
            T - r - 1 of them are scored): per-run calibrations are for runs of this
            length; ARL0 calibrations report their false-alarm probability for it.
            Default each group's baseline length.
        transform: None or ``"log"`` (see ``keras_hesstrace.monitor.baseline``).
        every_n_steps: optimiser steps between snapshots of the clean runs, recorded
            for ``check_compatible``.
        group: name for a single group's trajectories.
        n_resamples: ARL0 only: resampled sequences (Monte Carlo relative error of
            ARL0 about 1/sqrt(n_resamples): 1.6% at 4000).
        max_length: ARL0 only: snapshots per resampled sequence; default
            ceil(10 * target_arl0).
        seed: ARL0 only: resampling seed (the result is deterministic given it).
        confidence: level of the Wilson interval of the LOO false-alarm rate and of
            the Beta interval of the per-run rate.
        ddof: of the baselines' standard deviations.
        tol: ARL0 only: relative bisection tolerance on h.
        block_length: ARL0 only: None (default): resample whole LOO runs; an int
            k >= 1: circular blocks of k consecutive snapshots within runs (capped at
            each run's length); 1: i.i.d. from the pool.
        reference_snapshot: None (default: docs/method.md §7.3), or a snapshot index r:
            each run is scored by T(x_t) - T(x_r) at t > r, its change since its own
            snapshot r (snapshots 0..r are not scored). It removes run-level offsets
            the per-snapshot baseline cannot absorb (docs/memorisation.md).
        model: the model of the clean runs: a Keras model, or its fingerprint
            (``keras_hesstrace.identity.model_fingerprint``: ``[[variable path,
            shape], ...]``), recorded as ``Calibration.model_fingerprint`` so that
            ``HessianTraceCallback`` refuses the calibration on another model. Defaults
            to None: not recorded (any model is accepted).

    Returns:
        ``Calibration`` (``target`` says which of the two it holds).

    Raises:
        ValueError: both targets given; fewer than three runs; too few runs for
            alpha (the message says how many); a snapshot reached by fewer than two
            runs; zero spread; non-finite values; an unreachable ARL0 target.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> cal = calibrate_threshold(rng.normal(size=(19, 30)), false_alarm_prob=0.1,
        ...                           group="head", every_n_steps=50)
        >>> cal.target, cal["head"].achieved_false_alarm_prob   # k = 2 of N + 1 = 20
        ('false_alarm_prob', 0.1)
    """
    if target_arl0 is not None and false_alarm_prob is not None:
        raise ValueError(
            f"Give one target: target_arl0={target_arl0!r} (in-control run length) or "
            f"false_alarm_prob={false_alarm_prob!r} (per-run probability), not both."
        )
    per_run = target_arl0 is None
    if per_run:
        alpha = 0.1 if false_alarm_prob is None else float(false_alarm_prob)
        if not 0 < alpha < 1:
            raise ValueError(f"false_alarm_prob must be in (0, 1), got {false_alarm_prob!r}.")
    else:
        target_arl0 = float(target_arl0)
        if not (math.isfinite(target_arl0) and target_arl0 > 1):
            raise ValueError(f"target_arl0 must be a finite number of snapshots > 1, got "
                             f"{target_arl0!r}.")
    delta = float(delta)
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be finite and >= 0, got {delta!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    check_transform(transform)
    reference_snapshot = check_reference(reference_snapshot, "reference_snapshot")
    every_n_steps = check_integer("every_n_steps", every_n_steps, none="not recorded")
    block_length = check_integer("block_length", block_length, none="whole runs")
    horizon = check_integer("horizon", horizon, none="the baseline's length")
    fingerprint = check_fingerprint(model)
    if not per_run:
        if n_resamples < 100:
            raise ValueError(f"n_resamples must be >= 100, got {n_resamples}.")
        max_length = (int(math.ceil(10 * target_arl0)) if max_length is None
                      else int(max_length))
        if max_length < target_arl0:
            raise ValueError(f"max_length={max_length} must be at least target_arl0.")
    if isinstance(clean_runs, dict):
        if group is not None:
            raise ValueError("group= names a single group's trajectories; clean_runs is "
                             "already a dict group -> trajectories.")
        by_group = dict(clean_runs)
    else:
        by_group = {"default" if group is None else group: clean_runs}
    if not by_group:
        raise ValueError("clean_runs has no groups.")

    results = {}
    for g, traj in by_group.items():
        try:
            baseline = Baseline.from_runs(traj, transform=transform, group=g, ddof=ddof,
                                          reference=reference_snapshot)
            loo = loo_standardize(traj, transform=transform, ddof=ddof,
                                  reference=reference_snapshot)
            T = len(baseline) if horizon is None else horizon
            scored = baseline.scored_snapshots(T)
            if scored < 1:
                raise ValueError(f"horizon={T} scores no snapshot (the first scored "
                                 f"one is {baseline.first_scored}).")
            m = loo_max_statistics(loo, delta, scored)
            if per_run:
                results[g] = _per_run(g, baseline, loo, m, T, scored, alpha, delta,
                                      confidence)
            else:
                results[g] = _arl(g, baseline, loo, m, T, scored, target_arl0, delta,
                                  confidence, n_resamples, max_length, seed, tol,
                                  block_length)
        except ValueError as e:
            raise ValueError(f"group {g!r}: {e}") from None
    return Calibration(
        groups=tuple(by_group), every_n_steps=every_n_steps,
        target_arl0=None if per_run else target_arl0, delta=delta, transform=transform,
        n_resamples=None if per_run else int(n_resamples),
        max_length=None if per_run else max_length, seed=int(seed),
        confidence=float(confidence), results=results,
        block_length=None if per_run else block_length,
        reference_snapshot=reference_snapshot,
        target="false_alarm_prob" if per_run else "arl0",
        false_alarm_prob=alpha if per_run else None, model_fingerprint=fingerprint,
    )


def _loo_report(baseline, loo, h, delta, confidence, n_scored=None) -> dict:
    """The LOO false alarms at h (within ``n_scored`` z, or each run's length) and the
    lag-1 test: the fields both calibrations share."""
    rl = [run_lengths(z if n_scored is None else z[:n_scored], h, delta) for z in loo]
    off = baseline.first_scored  # z of snapshot off is loo[i][0]
    alerts = [None if np.isnan(v) else int(v) + off for v in rl]
    k = sum(a is not None for a in alerts)
    lag1 = stats.lag1_autocorrelation(loo)
    return dict(
        n_runs=len(loo), n_z=int(sum(len(z) for z in loo)),
        loo_false_alarms=k, loo_false_alarm_rate=k / len(loo),
        loo_false_alarm_ci=tuple(stats.wilson_interval(k, len(loo), confidence)),
        loo_alert_indices=alerts, lag1_r=float(lag1.r), lag1_pvalue=float(lag1.pvalue),
    )


def _per_run(g, baseline, loo, m, T, scored, alpha, delta, confidence) -> GroupCalibration:
    """The conformal h of one group for a per-run false-alarm probability alpha."""
    c = conformal_threshold(m, alpha, confidence)
    if abs(c.achieved - alpha) > _WARN_RELATIVE * alpha:
        n = len(m)
        warnings.warn(
            f"group {g!r}: false_alarm_prob target {alpha:g}, achieved {c.achieved:.4g} "
            f"= {c.k}/{n + 1} per run of {T} snapshots: with N = {n} clean runs the "
            f"achievable rates are multiples of 1/(N+1) = {1 / (n + 1):.3g}. Choose "
            "N + 1 a multiple of 1/alpha, or more runs.", UserWarning, stacklevel=3)
    return GroupCalibration(
        group=g, threshold=c.threshold, arl0=None, baseline=baseline, horizon=T,
        false_alarm_prob=c.achieved, censored_fraction=None,
        achieved_false_alarm_prob=c.achieved, false_alarm_prob_interval=c.interval,
        threshold_range=c.threshold_range, loo_max_statistics=[float(v) for v in m],
        **_loo_report(baseline, loo, c.threshold, delta, confidence, scored),
    )


def _arl_step(sim: Resampled, lo_b: float, h: float, tol: float) -> Tuple[float, float]:
    """(lo, hi): the record value where ARL0(h) crosses the target (the smallest above
    the bisection's lower end lo_b), and the next record value beyond h (past float
    rounding of equal statistics, relative ``tol``); inf when there is none."""
    v = sim.values
    crossing = v[(v > lo_b) & (v <= h)]
    beyond = v[v > h + tol * max(h, 1.0)]
    return (float(crossing.min()) if crossing.size else h,
            float(beyond.min()) if beyond.size else math.inf)


def _arl(g, baseline, loo, m, T, scored, target, delta, confidence, n_resamples,
         max_length, seed, tol, block_length) -> GroupCalibration:
    """The h of one group for an in-control ARL0 target (resampled LOO runs)."""
    sim = Resampled(loo, delta, n_resamples, max_length, seed, block_length=block_length)
    lo_b, h = bracket_threshold(sim, target, tol)
    arl0 = sim.arl(h)
    lo, hi = _arl_step(sim, lo_b, h, tol)
    if abs(arl0 - target) > _WARN_RELATIVE * target:
        warnings.warn(
            f"group {g!r}: target_arl0 {target:g}, achieved ARL0 {arl0:.4g}: the "
            f"empirical ARL0(h) of the resampled LOO runs jumps from {sim.arl(lo_b):.4g} "
            f"to {arl0:.4g} at h = {lo:.6g} (many resampled sequences share one run's "
            "maximum), so no h gives the target. More clean runs make the steps "
            "smaller; for a false-alarm probability per run use false_alarm_prob=.",
            UserWarning, stacklevel=3)
    return GroupCalibration(
        group=g, threshold=float(h), arl0=float(arl0), baseline=baseline, horizon=T,
        false_alarm_prob=false_alarm_prob_from_arl(arl0, scored),
        censored_fraction=sim.censored_fraction(h),
        resampled_false_alarm_prob=sim.alert_prob(h, scored),
        threshold_range=(lo, hi), loo_max_statistics=[float(v) for v in m],
        **_loo_report(baseline, loo, h, delta, confidence),
    )
