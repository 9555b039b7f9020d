"""What ``calibrate_threshold`` returns: the calibrated h and baseline of each group,
with the numbers to judge them, and the calibration file (JSON) they are saved in.

Contents:
    GroupCalibration    one group's h, baseline and report (defined in
                        ``keras_hesstrace.monitor.group_calibration``).
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
false_alarm_prob_interval, threshold_range and loo_max_statistics (earlier: None); 5
added model_fingerprint (earlier files: None).
"""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from keras_hesstrace._validate import check_integer
from keras_hesstrace.files import atomic_write_text
from keras_hesstrace.identity import model_fingerprint as fingerprint_of_model
from keras_hesstrace.monitor.group_calibration import GroupCalibration, false_alarm_prob_from_arl
from keras_hesstrace.monitor.page_hinkley import PageHinkley

__all__ = ["Calibration", "GroupCalibration", "false_alarm_prob_from_arl", "check_fingerprint"]

_FORMAT = "keras-hesstrace-calibration"
_VERSION = 5
TARGETS = ("false_alarm_prob", "arl0")


def check_fingerprint(model) -> Optional[List[list]]:
    """The model fingerprint a calibration records: None, from a model, or as given.

    Args:
        model: None; a built Keras model; or a fingerprint as
            ``keras_hesstrace.identity.model_fingerprint`` returns it (a list of
            ``[variable path, shape]`` pairs, shape a list of ints).

    Returns:
        None, or the fingerprint as a list of ``[str, list[int]]``.

    Raises:
        ValueError: anything else, named as ``model``.
    """
    if model is None:
        return None
    if hasattr(model, "trainable_variables"):
        return fingerprint_of_model(model)
    try:
        fingerprint = [[path, [int(d) for d in shape]] for path, shape in model]
        valid = all(isinstance(path, str) for path, _ in fingerprint) and all(
            float(d).is_integer() and d >= 0 for _, shape in model for d in shape)
    except (TypeError, ValueError):
        valid = False
    if not valid or not fingerprint:
        raise ValueError("model must be None, a Keras model or a non-empty model fingerprint "
                         "([[variable path, [dims]], ...]), got "
                         f"{type(model).__name__} {str(model)[:80]}.")
    return fingerprint


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
        model_fingerprint: the clean runs' model as ``[[variable path, shape], ...]``
            (``keras_hesstrace.identity.model_fingerprint``), or None when not given
            (and in files before version 5). ``HessianTraceCallback`` refuses a
            calibration whose fingerprint is not its model's.

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
    model_fingerprint: Optional[List[list]] = None

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
            "model_fingerprint": self.model_fingerprint,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        if d.get("format") != _FORMAT:
            raise ValueError(f"Not a keras-hesstrace calibration (format={d.get('format')!r}).")
        version = d.get("version")
        if version not in (1, 2, 3, 4, _VERSION):
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
            model_fingerprint=(check_fingerprint(d["model_fingerprint"]) if version >= 5
                               else None),
        )

    def save(self, path) -> None:
        """Write the calibration as JSON to ``path``, whole or not at all (atomically)."""
        atomic_write_text(os.fspath(path), json.dumps(self.to_dict(), indent=1, allow_nan=False))

    @classmethod
    def load(cls, path) -> "Calibration":
        """Read a calibration written by ``save`` (any version 1 to 5).

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
