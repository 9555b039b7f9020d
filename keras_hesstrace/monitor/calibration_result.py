"""What ``calibrate_threshold`` returns: the calibrated h and baseline of each group,
with the numbers to judge them, and the calibration file (JSON) they are saved in.

Contents:
    GroupCalibration    one group's h, baseline and report.
    Calibration         all groups; ``detector``, ``check_compatible``, ``save``/``load``,
                        ``to_frame``.

A calibration holds one of two targets (``Calibration.target``):

* ``"false_alarm_prob"`` (the default of ``calibrate_threshold``): h makes a clean run of
  ``horizon`` snapshots alert with probability ``false_alarm_prob`` (the conformal rule,
  ``keras_hesstrace.monitor.conformal``);
* ``"arl0"``: h makes the in-control average run length ``target_arl0`` snapshots
  (``keras_hesstrace.monitor.resampling``); for open-ended monitoring.

File versions: 2 added block_length (version 1 files were i.i.d.: block_length 1); 3
added reference_snapshot (earlier files: None); 4 added target and false_alarm_prob
(earlier files are ARL0 calibrations) and the groups' achieved_false_alarm_prob,
false_alarm_prob_interval, threshold_range and loo_max_statistics (earlier: None).
"""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from keras_hesstrace._validate import check_integer
from keras_hesstrace.monitor.baseline import Baseline
from keras_hesstrace.monitor.page_hinkley import PageHinkley

_FORMAT = "keras-hesstrace-calibration"
_VERSION = 4
TARGETS = ("false_alarm_prob", "arl0")


@dataclass
class GroupCalibration:
    """Calibration results for one group.

    Attributes:
        group: the group name.
        threshold: the calibrated h.
        arl0: ARL0 calibrations: the achieved ARL0(h) on the resamples (the target up
            to the step size of the empirical ARL0(h): see ``threshold_range``). None
            for a per-run calibration.
        baseline: ``Baseline`` from all N clean runs (what the detector uses).
        n_runs: N, clean runs.
        n_z: pooled leave-one-out z values.
        horizon: T, snapshots of a run the false-alarm probability is for (the
            baseline's length unless given). With a reference snapshot r only T - r - 1
            of them are scored, and the probabilities below count those.
        false_alarm_prob: expected false-alarm probability of a clean run within T
            snapshots: per-run calibrations, k/(N+1) (= ``achieved_false_alarm_prob``);
            ARL0 calibrations, 1 - (1 - 1/arl0)^T' (T' scored snapshots).
        loo_false_alarms: clean runs whose LOO z alert at h (per-run calibrations:
            within the horizon, i.e. M_i > h; ARL0: within their length).
        loo_false_alarm_rate: loo_false_alarms / n_runs.
        loo_false_alarm_ci: Wilson interval of that rate at the calibration's confidence.
        loo_alert_indices: per run, the 1-based snapshot of its LOO false alarm or None
            (counted from snapshot 0 of the run, also with a reference).
        lag1_r, lag1_pvalue: lag-1 autocorrelation of the pooled z (pairs within runs)
            and the p-value of the Bartlett/Box-Pierce test of independence.
        censored_fraction: ARL0 calibrations: share of resampled sequences without an
            alert within ``max_length`` at h (should be ~0). None for per-run ones.
        resampled_false_alarm_prob: ARL0 calibrations: share of the resampled sequences
            that alert within their first ``horizon`` snapshots (from a zero start, as
            a new run does). None for per-run ones and in files before it existed.
        achieved_false_alarm_prob: per-run calibrations: k/(N+1), the probability that
            a fresh clean run of ``horizon`` snapshots alerts, in expectation over
            calibration sets (<= the target). None for ARL0 calibrations.
        false_alarm_prob_interval: per-run calibrations: central ``confidence``
            interval of the per-run rate given one calibration set, across calibration
            sets: quantiles of Beta(k, N+1-k). None for ARL0 calibrations.
        threshold_range: (lo, hi): per-run calibrations, (h, the next larger M_i or
            inf): every h' in [lo, hi) counts the same LOO false alarms; ARL0
            calibrations, the bracket where the empirical ARL0(h) crosses the target:
            below lo it is under the target, at lo it jumps to about ``arl0`` and no
            resampled run length changes before hi. hi may be inf. None in files
            before version 4.
        loo_max_statistics: M_i, the largest max(g+, g-) of each LOO run over the
            horizon (list [N]). None in files before version 4.
    """

    group: str
    threshold: float
    arl0: Optional[float]
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
    censored_fraction: Optional[float]
    resampled_false_alarm_prob: Optional[float] = None
    achieved_false_alarm_prob: Optional[float] = None
    false_alarm_prob_interval: Optional[Tuple[float, float]] = None
    threshold_range: Optional[Tuple[float, float]] = None
    loo_max_statistics: Optional[List[float]] = None

    def expected_false_alarm_prob(self, horizon: int) -> float:
        """Expected false-alarm probability of a clean run of ``horizon`` snapshots.

        ARL0 calibrations: 1 - (1 - 1/ARL0)^T', T' of the snapshots scored. Per-run
        calibrations hold for their own horizon only: ``achieved_false_alarm_prob``
        there, ``ValueError`` for another horizon (calibrate again with it).
        """
        scored = self.baseline.scored_snapshots(horizon)
        if self.arl0 is None:
            if scored != self.baseline.scored_snapshots(self.horizon):
                raise ValueError(
                    f"This per-run calibration is for runs of {self.horizon} snapshots; "
                    f"it says nothing exact about {horizon}. Calibrate with horizon="
                    f"{horizon}, or use a target_arl0 calibration for open-ended runs."
                )
            return float(self.achieved_false_alarm_prob)
        return false_alarm_prob_from_arl(self.arl0, scored)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "baseline"}
        d["loo_false_alarm_ci"] = list(self.loo_false_alarm_ci)
        for k in ("false_alarm_prob_interval", "threshold_range"):
            if d[k] is not None:  # JSON has no inf: None stands for it
                d[k] = [None if math.isinf(v) else float(v) for v in d[k]]
        if d["arl0"] is not None and math.isinf(d["arl0"]):
            raise ValueError("Cannot save a calibration with an infinite ARL0.")
        d["baseline"] = self.baseline.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GroupCalibration":
        d = dict(d)
        d["baseline"] = Baseline.from_dict(d["baseline"])
        d["loo_false_alarm_ci"] = tuple(d["loo_false_alarm_ci"])
        if d.get("false_alarm_prob_interval") is not None:
            d["false_alarm_prob_interval"] = tuple(d["false_alarm_prob_interval"])
        if d.get("threshold_range") is not None:
            lo, hi = d["threshold_range"]
            d["threshold_range"] = (lo, math.inf if hi is None else hi)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def false_alarm_prob_from_arl(arl0: float, horizon: int) -> float:
    """1 - (1 - 1/ARL0)^horizon: a geometric run length's chance to end within it."""
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
        target_arl0: ARL0 calibrations: the target in-control ARL, in snapshots; None
            for per-run ones.
        delta: the allowance used.
        transform: None or ``"log"``.
        n_resamples, max_length, seed, confidence: the calibration's settings
            (``n_resamples`` and ``max_length`` are None for per-run calibrations,
            which do not resample).
        results: group -> ``GroupCalibration``.
        block_length: ARL0 calibrations: how the LOO z were resampled: None = whole
            runs (circular block bootstrap with one run per block), k >= 1 = circular
            blocks of k snapshots within runs, 1 = i.i.d. from the pool (files of
            version 1). None for per-run calibrations.
        reference_snapshot: None, or the snapshot r every run is scored relative to
            (files before version 3: None).
        target: ``"false_alarm_prob"`` (h for a per-run false-alarm probability) or
            ``"arl0"`` (h for an in-control ARL; every file before version 4).
        false_alarm_prob: per-run calibrations: the target alpha; None for ARL0 ones.

    Example:
        >>> cal = calibrate_threshold({"dense_1": clean_runs}, false_alarm_prob=0.1,
        ...                           every_n_steps=100)        # doctest: +SKIP
        >>> cal.thresholds, cal.save("head.json")              # doctest: +SKIP
        >>> ph = Calibration.load("head.json").detector("dense_1")  # doctest: +SKIP
    """

    groups: Tuple[str, ...]
    every_n_steps: Optional[int]
    target_arl0: Optional[float]
    delta: float
    transform: Optional[str]
    n_resamples: Optional[int]
    max_length: Optional[int]
    seed: int
    confidence: float
    results: Dict[str, GroupCalibration] = field(default_factory=dict)
    block_length: Optional[int] = None
    reference_snapshot: Optional[int] = None
    target: str = "arl0"
    false_alarm_prob: Optional[float] = None

    def __getitem__(self, group: str) -> GroupCalibration:
        try:
            return self.results[group]
        except KeyError:
            raise KeyError(f"No calibration for group {group!r}; calibrated groups: "
                           f"{list(self.groups)}.") from None

    @property
    def thresholds(self) -> Dict[str, float]:
        """dict group -> h."""
        return {g: self.results[g].threshold for g in self.groups}

    def _only(self) -> str:
        if len(self.groups) != 1:
            raise ValueError(f"This calibration has {len(self.groups)} groups "
                             f"{list(self.groups)}: name one.")
        return self.groups[0]

    @property
    def threshold(self) -> float:
        """h of the only group (ValueError when there are several)."""
        return self.results[self._only()].threshold

    def detector(self, group: Optional[str] = None, overrun: str = "error") -> PageHinkley:
        """A fresh ``PageHinkley`` with the group's h and baseline.

        Args:
            group: group name; may be omitted when only one group was calibrated.
            overrun: passed to ``PageHinkley``.
        """
        group = self._only() if group is None else group
        res = self[group]
        return PageHinkley(delta=self.delta, threshold=res.threshold,
                           baseline=res.baseline, overrun=overrun)

    def detectors(self, overrun: str = "error") -> Dict[str, PageHinkley]:
        """dict group -> fresh ``PageHinkley`` for every calibrated group."""
        return {g: self.detector(g, overrun) for g in self.groups}

    def check_compatible(self, groups, every_n_steps) -> None:
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

    def to_dict(self) -> dict:
        """JSON-compatible dict; ``Calibration.from_dict`` inverts it."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "groups": list(self.groups),
            "every_n_steps": self.every_n_steps,
            "target": self.target,
            "false_alarm_prob": self.false_alarm_prob,
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
    def from_dict(cls, d: dict) -> "Calibration":
        if d.get("format") != _FORMAT:
            raise ValueError(f"Not a keras-hesstrace calibration (format={d.get('format')!r}).")
        version = d.get("version")
        if version not in (1, 2, 3, _VERSION):
            raise ValueError(f"Unsupported calibration version {version!r}; "
                             f"this package reads versions 1 to {_VERSION}.")
        every_n_steps = d["every_n_steps"]
        if every_n_steps is not None:
            every_n_steps = check_integer("every_n_steps", every_n_steps)
        groups = d["groups"]
        if not (isinstance(groups, list) and all(isinstance(g, str) for g in groups)):
            raise ValueError(f"groups must be a list of group names, got {groups!r}.")
        if set(d["results"]) != set(groups):
            raise ValueError(f"results hold groups {sorted(d['results'])}, the file names "
                             f"{sorted(groups)}.")
        return cls(
            groups=tuple(groups), every_n_steps=every_n_steps,
            target_arl0=d["target_arl0"], delta=d["delta"], transform=d["transform"],
            n_resamples=d["n_resamples"], max_length=d["max_length"], seed=d["seed"],
            confidence=d["confidence"],
            results={g: GroupCalibration.from_dict(r) for g, r in d["results"].items()},
            block_length=d["block_length"] if version >= 2 else 1,
            reference_snapshot=d["reference_snapshot"] if version >= 3 else None,
            target=d["target"] if version >= 4 else "arl0",
            false_alarm_prob=d["false_alarm_prob"] if version >= 4 else None,
        )

    def save(self, path) -> None:
        """Write the calibration as JSON to ``path``."""
        path = os.fspath(path)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False)

    @classmethod
    def load(cls, path) -> "Calibration":
        """Read a calibration written by ``save`` (any version 1 to 4).

        Raises:
            ValueError: naming the file, when it is not JSON, not UTF-8, not a
                calibration, or damaged (a missing or malformed field).
        """
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable calibration file (not UTF-8 JSON: "
                             f"{e}).") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a keras-hesstrace calibration (a JSON "
                             f"{type(d).__name__}, not an object).")
        try:
            return cls.from_dict(d)
        except KeyError as e:
            raise ValueError(f"{path}: damaged calibration file: field {e} is missing.") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: damaged calibration file: {e}") from None

    def to_frame(self):
        """One row per group: the target and what was achieved, h and its range, the
        false-alarm probabilities, the LOO false alarms and the lag-1 test."""
        import pandas as pd

        rows = []
        for g in self.groups:
            r = self.results[g]
            lo, hi = r.threshold_range if r.threshold_range is not None else (None, None)
            interval = r.false_alarm_prob_interval or (None, None)
            rows.append({
                "group": g, "target": self.target, "h": r.threshold, "h_low": lo,
                "h_high": hi, "target_false_alarm_prob": self.false_alarm_prob,
                "target_arl0": self.target_arl0, "arl0": r.arl0, "horizon": r.horizon,
                "false_alarm_prob": r.false_alarm_prob,
                "false_alarm_prob_low": interval[0], "false_alarm_prob_high": interval[1],
                "loo_false_alarms": r.loo_false_alarms, "n_runs": r.n_runs,
                "loo_false_alarm_rate": r.loo_false_alarm_rate,
                "loo_ci_low": r.loo_false_alarm_ci[0], "loo_ci_high": r.loo_false_alarm_ci[1],
                "lag1_r": r.lag1_r, "lag1_pvalue": r.lag1_pvalue,
            })
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        parts = ", ".join(f"{g}: h={self.results[g].threshold:.3f}" for g in self.groups)
        ref = ("" if self.reference_snapshot is None
               else f"reference_snapshot={self.reference_snapshot}, ")
        if self.target == "false_alarm_prob":
            achieved = ", ".join(
                f"{self.results[g].achieved_false_alarm_prob:.3g}" for g in self.groups)
            goal = (f"false_alarm_prob={self.false_alarm_prob} (achieved {achieved} per "
                    f"run of {self.results[self.groups[0]].horizon} snapshots)")
        else:
            goal = f"target_arl0={self.target_arl0}"
        return (f"Calibration({goal}, delta={self.delta}, "
                f"transform={self.transform!r}, {ref}every_n_steps={self.every_n_steps}, {parts})")
