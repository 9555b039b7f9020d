"""One group's calibration (``GroupCalibration``): its h, baseline and the numbers to judge
them; part of a ``Calibration`` (``keras_hesstrace.monitor.calibration_result``).
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from keras_hesstrace.monitor.baseline import Baseline


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
