"""Calibrate the Page-Hinkley threshold h on clean runs (docs/method.md §7.4).

For each monitored group:

1. Leave-one-out standardisation: clean run i is standardised with the baseline
   (mu0_t, sigma0_t) of the other N-1 runs, so its z are out-of-sample, as a new run's
   will be. With ``reference_snapshot=r`` every run is first replaced by its change since
   its own snapshot r (T(x_t) - T(x_r), t > r); snapshots 0..r are not scored.
2. The LOO z runs are resampled into ``n_resamples`` long sequences: by default whole
   runs, each rotated by a random offset, concatenated (a circular block bootstrap with one
   run per block, which keeps each run's autocorrelation); ``block_length=k`` uses blocks of
   k snapshots within runs; ``block_length=1`` draws the pooled z i.i.d. (the method paper's
   rule, docs/method.md §7.6; with autocorrelated z it makes h too small, see docs/memorisation.md).
3. The in-control average run length ARL0(h) is estimated by running the recursion on
   those sequences, each ``max_length`` snapshots (default 10 x target; a sequence that never alerts counts as
   censored and ARL0 = total snapshots observed / alerts, the geometric maximum-likelihood
   estimate, which is unbiased for censoring that rare).
4. h is bisected until ARL0(h) = target. The resampled sequences are drawn once (fixed
   seed) and reused for every h, so ARL0(h) is monotone in h and the bisection is exact
   for that sample.

The ``Calibration`` also reports what a user needs to judge the threshold: the expected
false-alarm probability within a run of T snapshots, 1 - (1 - 1/ARL0)^T; the empirical
LOO false-alarm rate of the real clean runs with its Wilson interval; and the lag-1
autocorrelation of the pooled z with its test (the i.i.d. resampling assumes none;
with ``block_length=1`` a small p-value means real runs will false-alarm more often
than ARL0 says; whole-run resampling accounts for it).
"""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from keras_hesstrace._validate import check_integer
from keras_hesstrace import stats
from keras_hesstrace.monitor.baseline import Baseline, check_reference, check_transform
from keras_hesstrace.monitor.page_hinkley import PageHinkley, run_lengths
from keras_hesstrace.monitor.resampling import Resampled, bisect_threshold, loo_standardize

_FORMAT = "keras-hesstrace-calibration"
_VERSION = 3  # 2 added block_length (version 1 files were i.i.d.: block_length 1);
#               3 added reference_snapshot (earlier files: None)


@dataclass
class GroupCalibration:
    """Calibration results for one group.

    Attributes:
        group: the group name.
        threshold: the calibrated h.
        arl0: ARL0(h) estimated on the resamples (equals the target up to bisection
            tolerance and the step size of the empirical ARL0(h)).
        baseline: ``Baseline`` from all N clean runs (what the detector uses).
        n_runs: N, clean runs.
        n_z: pooled leave-one-out z values.
        horizon: T, snapshots of a run for the false-alarm probability (the baseline's
            length unless given). With a reference snapshot r only T - r - 1 of them
            are scored, and the probabilities below count those.
        false_alarm_prob: expected false-alarm probability within T snapshots,
            1 - (1 - 1/arl0)^T' (T' scored snapshots).
        loo_false_alarms: clean runs whose LOO z alert within their length.
        loo_false_alarm_rate: loo_false_alarms / n_runs.
        loo_false_alarm_ci: Wilson interval of that rate at the calibration's confidence.
        loo_alert_indices: per run, the 1-based snapshot of its LOO false alarm or None
            (counted from snapshot 0 of the run, also with a reference).
        lag1_r, lag1_pvalue: lag-1 autocorrelation of the pooled z (pairs within runs)
            and the p-value of the Bartlett/Box-Pierce test of independence.
        censored_fraction: share of resampled sequences without an alert within
            ``max_length`` at h (should be ~0).
        resampled_false_alarm_prob: share of the resampled sequences that alert within
            their first ``horizon`` snapshots (from a zero start, as a new run does):
            the false-alarm probability per run the resampling predicts, without the
            geometric approximation of ``false_alarm_prob``. None in files written
            before it existed.
    """

    group: str
    threshold: float
    arl0: float
    baseline: Baseline
    n_runs: int
    n_z: int
    horizon: int
    false_alarm_prob: float
    loo_false_alarms: int
    loo_false_alarm_rate: float
    loo_false_alarm_ci: Tuple[float, float]
    loo_alert_indices: list
    lag1_r: float
    lag1_pvalue: float
    censored_fraction: float
    resampled_false_alarm_prob: Optional[float] = None

    def expected_false_alarm_prob(self, horizon):
        """1 - (1 - 1/ARL0)^T' for a run of ``horizon`` snapshots, T' of them scored."""
        return _false_alarm_prob(self.arl0, self.baseline.scored_snapshots(horizon))

    def to_dict(self):
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "baseline"}
        d["loo_false_alarm_ci"] = list(self.loo_false_alarm_ci)
        d["baseline"] = self.baseline.to_dict()
        return d

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["baseline"] = Baseline.from_dict(d["baseline"])
        d["loo_false_alarm_ci"] = tuple(d["loo_false_alarm_ci"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _false_alarm_prob(arl0, horizon):
    if math.isinf(arl0):
        return 0.0
    return float(1.0 - (1.0 - 1.0 / arl0) ** horizon)


@dataclass
class Calibration:
    """Calibrated thresholds and baselines for one or more groups.

    Made by ``calibrate_threshold``; ``save``/``load`` as JSON. The detector for a
    group is ``calibration.detector(group)``. ``check_compatible`` refuses use with
    other groups or another snapshot interval.

    Attributes:
        groups: calibrated group names, in order.
        every_n_steps: optimiser steps between the snapshots of the clean runs (None if
            not given: then any interval is accepted).
        target_arl0: target in-control ARL, in snapshots.
        delta: the allowance used.
        transform: None or ``"log"``.
        n_resamples, max_length, seed, confidence: the calibration's settings.
        results: group -> ``GroupCalibration``.
        block_length: how the LOO z were resampled: None = whole runs (circular block
            bootstrap with one run per block), k >= 1 = circular blocks of k snapshots
            within runs, 1 = i.i.d. from the pool (files of version 1).
        reference_snapshot: None, or the snapshot r every run is scored relative to
            (files before version 3: None).

    Example:
        >>> cal = calibrate_threshold({"dense_1": clean_runs}, target_arl0=500,
        ...                           every_n_steps=100)        # doctest: +SKIP
        >>> cal.thresholds, cal.save("head.json")              # doctest: +SKIP
        >>> ph = Calibration.load("head.json").detector("dense_1")  # doctest: +SKIP
    """

    groups: Tuple[str, ...]
    every_n_steps: Optional[int]
    target_arl0: float
    delta: float
    transform: Optional[str]
    n_resamples: int
    max_length: int
    seed: int
    confidence: float
    results: Dict[str, GroupCalibration] = field(default_factory=dict)
    block_length: Optional[int] = None
    reference_snapshot: Optional[int] = None

    def __getitem__(self, group):
        try:
            return self.results[group]
        except KeyError:
            raise KeyError(f"No calibration for group {group!r}; calibrated groups: "
                           f"{list(self.groups)}.") from None

    @property
    def thresholds(self):
        """dict group -> h."""
        return {g: self.results[g].threshold for g in self.groups}

    def _only(self):
        if len(self.groups) != 1:
            raise ValueError(f"This calibration has {len(self.groups)} groups "
                             f"{list(self.groups)}: name one.")
        return self.groups[0]

    @property
    def threshold(self):
        """h of the only group (ValueError when there are several)."""
        return self.results[self._only()].threshold

    def detector(self, group=None, overrun="error"):
        """A fresh ``PageHinkley`` with the group's h and baseline.

        Args:
            group: group name; may be omitted when only one group was calibrated.
            overrun: passed to ``PageHinkley``.
        """
        group = self._only() if group is None else group
        res = self[group]
        return PageHinkley(delta=self.delta, threshold=res.threshold,
                           baseline=res.baseline, overrun=overrun)

    def detectors(self, overrun="error"):
        """dict group -> fresh ``PageHinkley`` for every calibrated group."""
        return {g: self.detector(g, overrun) for g in self.groups}

    def check_compatible(self, groups, every_n_steps):
        """Raise ``ValueError`` unless the calibration fits this monitoring setup.

        Compatible means: every calibrated group is among ``groups`` (the groups the
        caller records; extra recorded groups are fine, they just have no detector),
        and ``every_n_steps`` equals the calibration's interval (when the calibration
        recorded one).

        Args:
            groups: iterable of group names the caller records.
            every_n_steps: the caller's snapshot interval in optimiser steps.

        Raises:
            ValueError: naming the missing group(s) and/or both intervals.
        """
        available = list(groups)
        problems = []
        missing = [g for g in self.groups if g not in set(available)]
        if missing:
            problems.append(
                f"it was made for group(s) {missing} that are not recorded here "
                f"(recorded groups: {available})"
            )
        if self.every_n_steps is not None and every_n_steps != self.every_n_steps:
            problems.append(
                f"it was made with snapshots every {self.every_n_steps} steps, but "
                f"snapshots here are every {every_n_steps} steps (the baseline is "
                "indexed by snapshot, so the intervals must match)"
            )
        if problems:
            raise ValueError("Calibration does not fit: " + "; and ".join(problems) + ".")

    def to_dict(self):
        """JSON-compatible dict; ``Calibration.from_dict`` inverts it."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "groups": list(self.groups),
            "every_n_steps": self.every_n_steps,
            "target_arl0": self.target_arl0,
            "delta": self.delta,
            "transform": self.transform,
            "n_resamples": self.n_resamples,
            "max_length": self.max_length,
            "seed": self.seed,
            "confidence": self.confidence,
            "block_length": self.block_length,
            "reference_snapshot": self.reference_snapshot,
            "results": {g: self.results[g].to_dict() for g in self.groups},
        }

    @classmethod
    def from_dict(cls, d):
        if d.get("format") != _FORMAT:
            raise ValueError(f"Not a keras-hesstrace calibration (format={d.get('format')!r}).")
        if d.get("version") not in (1, 2, _VERSION):
            raise ValueError(f"Unsupported calibration version {d.get('version')!r}; "
                             f"this package reads versions 1 to {_VERSION}.")
        return cls(
            groups=tuple(d["groups"]), every_n_steps=d["every_n_steps"],
            target_arl0=d["target_arl0"], delta=d["delta"], transform=d["transform"],
            n_resamples=d["n_resamples"], max_length=d["max_length"], seed=d["seed"],
            confidence=d["confidence"],
            results={g: GroupCalibration.from_dict(r) for g, r in d["results"].items()},
            block_length=d["block_length"] if d["version"] >= 2 else 1,
            reference_snapshot=d["reference_snapshot"] if d["version"] >= 3 else None,
        )

    def save(self, path):
        """Write the calibration as JSON to ``path``."""
        path = os.fspath(path)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False)

    @classmethod
    def load(cls, path):
        """Read a calibration written by ``save``."""
        with open(os.fspath(path), encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_frame(self):
        """One row per group: h, ARL0, false-alarm probabilities and the lag-1 test."""
        import pandas as pd

        rows = []
        for g in self.groups:
            r = self.results[g]
            rows.append({
                "group": g, "h": r.threshold, "target_arl0": self.target_arl0,
                "arl0": r.arl0, "horizon": r.horizon,
                "false_alarm_prob": r.false_alarm_prob,
                "loo_false_alarms": r.loo_false_alarms, "n_runs": r.n_runs,
                "loo_false_alarm_rate": r.loo_false_alarm_rate,
                "loo_ci_low": r.loo_false_alarm_ci[0], "loo_ci_high": r.loo_false_alarm_ci[1],
                "lag1_r": r.lag1_r, "lag1_pvalue": r.lag1_pvalue,
            })
        return pd.DataFrame(rows)

    def __repr__(self):
        parts = ", ".join(f"{g}: h={self.results[g].threshold:.3f}" for g in self.groups)
        ref = ("" if self.reference_snapshot is None
               else f"reference_snapshot={self.reference_snapshot}, ")
        return (f"Calibration(target_arl0={self.target_arl0}, delta={self.delta}, "
                f"transform={self.transform!r}, {ref}every_n_steps={self.every_n_steps}, {parts})")


def calibrate_threshold(clean_runs, target_arl0, delta=0.5, *, transform=None,
                        every_n_steps=None, group=None, horizon=None, n_resamples=4000,
                        max_length=None, seed=0, confidence=0.95, ddof=1, tol=1e-6,
                        block_length=None, reference_snapshot=None):
    """Calibrate h so that the in-control ARL on clean runs equals ``target_arl0``.

    The leave-one-out z of the clean runs are resampled into long sequences on which
    ARL0(h) is estimated. By default whole runs are resampled (``block_length=None``):
    each sequence is a concatenation of randomly chosen LOO-standardised runs, each
    rotated by a random offset (circular block bootstrap, one run per block), so the
    serial dependence of real runs (a clean run that stays above the baseline for many
    snapshots) is kept. ``block_length=1`` resamples the pooled z i.i.d. (the method
    paper's rule, docs/method.md §7.6): with autocorrelated z (``lag1_r`` > 0) it makes h too small and real
    runs false-alarm more often than ARL0 says (docs/memorisation.md, tests).

    Args:
        clean_runs: a dict group -> trajectories, or trajectories of one group (then
            named ``group``, default ``"default"``). Trajectories: 2-D array [N, T]
            (trailing NaN pads shorter runs) or N 1-D arrays [T_i], one group's trace
            at snapshots 0, 1, ... of each clean run; N >= 3.
        target_arl0: target in-control average run length, in snapshots (> 1).
        delta: allowance of the recursion.
        transform: None or ``"log"`` (see ``keras_hesstrace.monitor.baseline``).
        every_n_steps: optimiser steps between snapshots of the clean runs, recorded
            for ``check_compatible``.
        group: name for a single group's trajectories.
        horizon: snapshots T of a run for the expected false-alarm probability;
            default each group's baseline length.
        n_resamples: resampled sequences (the Monte Carlo relative error of ARL0 is
            about 1/sqrt(n_resamples): 1.6% at 4000).
        max_length: snapshots per resampled sequence; default ceil(10 * target_arl0).
        seed: resampling seed (the result is deterministic given it).
        confidence: level of the Wilson interval of the LOO false-alarm rate.
        ddof: of the baselines' standard deviations.
        tol: relative bisection tolerance on h.
        block_length: None (default): resample whole LOO runs; an int k >= 1: circular
            blocks of k consecutive snapshots within runs (capped at each run's
            length); 1: i.i.d. from the pool.
        reference_snapshot: None (default: docs/method.md §7.3), or a snapshot index r: each
            run is scored by T(x_t) - T(x_r) at t > r, its change since its own
            snapshot r (snapshots 0..r are not scored). It removes run-level offsets
            the per-snapshot baseline cannot absorb (docs/memorisation.md).

    Returns:
        ``Calibration``.

    Raises:
        ValueError: fewer than three runs, a snapshot reached by fewer than two runs,
            zero spread, non-finite values, an unreachable target.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> cal = calibrate_threshold(rng.normal(size=(20, 300)), target_arl0=100,
        ...                           group="head", every_n_steps=50)
        >>> round(cal.threshold, 1)                              # doctest: +SKIP
        3.6
    """
    target_arl0 = float(target_arl0)
    if not (math.isfinite(target_arl0) and target_arl0 > 1):
        raise ValueError(f"target_arl0 must be a finite number of snapshots > 1, got "
                         f"{target_arl0!r}.")
    delta = float(delta)
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be finite and >= 0, got {delta!r}.")
    check_transform(transform)
    reference_snapshot = check_reference(reference_snapshot, "reference_snapshot")
    every_n_steps = check_integer("every_n_steps", every_n_steps, none="not recorded")
    block_length = check_integer("block_length", block_length, none="whole runs")
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be >= 100, got {n_resamples}.")
    max_length = int(math.ceil(10 * target_arl0)) if max_length is None else int(max_length)
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
        except ValueError as e:
            raise ValueError(f"group {g!r}: {e}") from None
        sim = Resampled(loo, delta, n_resamples, max_length, seed, block_length=block_length)
        h = bisect_threshold(sim, target_arl0, tol)
        arl0 = sim.arl(h)
        # LOO false alarms: each real clean run, standardised without itself.
        loo_rl = [run_lengths(z, h, delta) for z in loo]
        off = baseline.first_scored  # z of snapshot off is loo[i][0]
        alerts = [None if np.isnan(v) else int(v) + off for v in loo_rl]
        k = sum(a is not None for a in alerts)
        lag1 = stats.lag1_autocorrelation(loo)
        T = len(baseline) if horizon is None else int(horizon)
        scored = baseline.scored_snapshots(T)
        results[g] = GroupCalibration(
            group=g, threshold=float(h), arl0=float(arl0), baseline=baseline,
            n_runs=len(loo), n_z=int(sum(len(z) for z in loo)), horizon=T,
            false_alarm_prob=_false_alarm_prob(arl0, scored),
            loo_false_alarms=k, loo_false_alarm_rate=k / len(loo),
            loo_false_alarm_ci=tuple(stats.wilson_interval(k, len(loo), confidence)),
            loo_alert_indices=alerts, lag1_r=float(lag1.r), lag1_pvalue=float(lag1.pvalue),
            censored_fraction=sim.censored_fraction(h),
            resampled_false_alarm_prob=sim.alert_prob(h, scored),
        )
    return Calibration(
        groups=tuple(by_group), every_n_steps=every_n_steps,
        target_arl0=target_arl0, delta=delta, transform=transform,
        n_resamples=int(n_resamples), max_length=max_length, seed=int(seed),
        confidence=float(confidence), results=results, block_length=block_length,
        reference_snapshot=reference_snapshot,
    )
