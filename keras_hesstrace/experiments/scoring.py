"""The alert rule applied to the stored trajectories: calibration and scoring.

:func:`rule_values` (what the rule sees: the floored traces), :func:`rule_scale` (the
scale it standardises, for plots and effect sizes), :func:`calibrate_cell` (h from a
cell's Phase I runs), :func:`score_trajectory` (the calibrated Page-Hinkley rule over one
run, as the callback runs it online) and :func:`detections` (one record per finished run
and monitored group). Everything here reads the runs' CSVs, so a resumed run and an
uninterrupted one are scored identically, and a finished experiment can be re-scored
without retraining (``examples/rescore_experiment.py``).
"""

import os

import numpy as np

from keras_hesstrace.experiments.config import run_specs
from keras_hesstrace.experiments.storage import load_result, read_trajectory, run_folder
from keras_hesstrace.files import atomic_write_json


def rule_values(config, values):
    """The trace values the rule sees: floored at ``log_floor`` under the log transform."""
    values = np.asarray(values, dtype=np.float64)
    if config.transform == "log" and config.log_floor is not None:
        return np.where(np.isfinite(values), np.maximum(values, config.log_floor), values)
    return values


def rule_scale(config, values):
    """The per-run scale the rule standardises, for plots and effect sizes.

    Args:
        config: ``ExperimentConfig``.
        values: float array [T] of one run's rule values (``rule_values``).

    Returns:
        float64 array [T]: log(value) under the log transform (NaN where value <= 0 or
        non-finite), the value itself otherwise; with a ``reference_snapshot`` r, minus
        the run's own entry at r, and NaN at snapshots 0..r (not scored).
    """
    values = np.asarray(values, dtype=np.float64)
    if config.transform == "log":
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(values > 0, np.log(np.where(values > 0, values, 1.0)), np.nan)
    else:
        y = values.copy()
    r = config.reference_snapshot
    if r is not None:
        from keras_hesstrace.monitor.baseline import first_scored, relative_to_reference

        y = np.concatenate([np.full(first_scored(r), np.nan), relative_to_reference([y], r)[0]])
    return y


def scale_name(config):
    """Words for ``rule_scale``: e.g. "log trace minus the run's own value at snapshot 2"."""
    what = ("log " if config.transform == "log" else "") + "trace"
    if config.reference_snapshot is not None:
        what += f" minus the run's own value at snapshot {config.reference_snapshot}"
    return what


def target_of(config):
    """The calibration target keywords of ``calibrate_threshold`` for the config."""
    if config.false_alarm_prob is not None:
        return {"false_alarm_prob": config.false_alarm_prob}
    return {"target_arl0": config.target_arl0, "n_resamples": config.n_resamples}


def clean_runs_model(config, out, arch, dataset) -> list | None:
    """The model fingerprint the cell's Phase I runs record in their ``result.json``
    identity; None when a run has none (written before identities) or they differ."""
    phase1, _ = run_specs(config, arch, dataset)
    fingerprints = []
    for spec in phase1:
        result = load_result(out, spec) or {}
        fingerprints.append((result.get("identity") or {}).get("model"))
    if fingerprints and fingerprints[0] is not None and all(
            f == fingerprints[0] for f in fingerprints):
        return fingerprints[0]
    return None


def calibrate_cell(config, out, arch, dataset):
    """Calibrate h for the cell from its finished Phase I runs; save and return it.

    The calibration records the runs' model fingerprint (:func:`clean_runs_model`), so
    the callback refuses it on another model.
    """
    from keras_hesstrace.monitor import calibrate_threshold

    phase1, _ = run_specs(config, arch, dataset)
    trajectories = {g: [] for g in config.monitor}
    for spec in phase1:
        csv_path = os.path.join(run_folder(out, spec), "traces.csv")
        for g in config.monitor:
            trajectories[g].append(rule_values(config, read_trajectory(csv_path, g)[1]))
    cal = calibrate_threshold(trajectories, **target_of(config), delta=config.delta,
                              transform=config.transform, every_n_steps=config.every_n_steps,
                              seed=0, reference_snapshot=config.reference_snapshot,
                              model=clean_runs_model(config, out, arch, dataset))
    path = os.path.join(out, f"{arch}-{dataset}", "calibration.json")
    atomic_write_json(path, cal.to_dict())
    return cal


def detections(config, out, arch, dataset, cal):
    """One record per (finished run, monitored group): the rule applied to its trajectory.

    Phase II runs are standardised with the baseline of all calibration runs; calibration
    runs get their leave-one-out result (as in the calibration's LOO false-alarm rate).
    """
    phase1, phase2 = run_specs(config, arch, dataset)
    lo, hi = config.window()
    records = []
    for spec in phase1 + phase2:
        res = load_result(out, spec)
        if res is None:
            continue
        spe = res["steps_per_epoch"]
        csv_path = os.path.join(run_folder(out, spec), res["trace_csv"])
        for g in config.monitor:
            steps, raw = read_trajectory(csv_path, g)
            values = rule_values(config, raw)
            epochs = steps / spe
            rec = {"cell": spec.cell, "arch": arch, "dataset": dataset, "run_id": spec.run_id,
                   "role": spec.role, "noise_rate": spec.noise_rate, "seed": spec.seed,
                   "group": g, "n_snapshots": len(values),
                   "n_floored": int(np.sum(values != raw))}
            if spec.role == "calibration":
                statistic = np.full(len(values), np.nan)
                i = phase1.index(spec)
                idx = cal[g].loo_alert_indices[i]  # 1-based snapshot or None
                alert_index = None if idx is None else idx - 1
            else:
                statistic, alert_index = score_trajectory(cal, g, steps, values)
            scale = rule_scale(config, values)
            w = scale[(epochs >= lo) & (epochs <= hi) & np.isfinite(scale)]
            rec.update({
                "alert": int(alert_index is not None),
                "alert_snapshot": alert_index,
                "alert_step": None if alert_index is None else int(steps[alert_index]),
                "alert_epoch": None if alert_index is None else float(epochs[alert_index]),
                "window_mean": float(np.mean(w)) if w.size else float("nan"),
                "test_accuracy": res["test_accuracy"], "train_accuracy": res["train_accuracy"],
                "memorised_fraction": res["memorised_fraction"],
                "wall_time_s": res["wall_time_s"],
            })
            rec["_steps"], rec["_epochs"], rec["_values"], rec["_statistic"] = (
                steps, epochs, values, statistic)
            rec["_scale"] = scale
            records.append(rec)
    return records


def score_trajectory(cal, group, steps, values):
    """The calibrated rule run over one run's values, as the callback runs it online.

    Args:
        cal: ``Calibration``.
        group: the monitored group.
        steps: int array [T], the snapshots' optimiser steps.
        values: float array [T], the run's rule values (``rule_values``).

    Returns:
        (statistic, alert_index): float array [T] of max(g+, g-) after each snapshot
        (NaN from the first value the rule cannot take: non-finite, <= 0 under the log
        transform, or after an unusable reference snapshot; the rule stops there), and
        the 0-based snapshot of the first alert or None.
    """
    det = cal.detector(group, overrun="hold")
    statistic = np.full(len(values), np.nan)
    for t, (s, v) in enumerate(zip(steps, values)):
        if not det.usable(v):
            break
        statistic[t] = det.update(float(v), step=int(s)).statistic
    return statistic, det.alert_index
