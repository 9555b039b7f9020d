"""First-order baselines on the same runs as the curvature rule, and what a stop is worth.

Every method here answers the same question from a run's ``trajectory.json``
(:mod:`keras_hesstrace.experiments.recording`): when would it have stopped the run, and
what would the model have been worth then?

* Page–Hinkley baselines (:data:`SIGNALS`): the curvature rule's recursion on a
  first-order signal, calibrated exactly as the curvature rule is (the same
  ``calibrate_threshold`` target, allowance and leave-one-out clean calibration runs;
  the log transform for a positive signal; each run relative to its own early value when
  the curvature rule is: snapshot ``reference_snapshot`` for per-snapshot signals, the
  first epoch's value for per-epoch ones).
* Keras ``EarlyStopping`` on the noisy validation loss with each patience of
  ``config.early_stopping_patience`` (replayed by
  :func:`~keras_hesstrace.experiments.early_stop.early_stopping_epoch`; not calibrated:
  it stops every run sooner or later, and its stops on clean runs are counted as its
  false alarms).

What a stop is worth (:func:`worth`): the clean test accuracy and the memorised share
(accuracy on the corrupted training examples w.r.t. their noisy labels) at the end of
the epoch in which the stop falls (so up to one epoch after an alert mid-epoch), beside
the run's best clean test accuracy over its epochs (an oracle stop) and its final one.
A run that never alerts is trained to the end.
"""

import math
import os
import warnings
from typing import NamedTuple, Optional

import numpy as np

from keras_hesstrace.experiments.config import run_specs
from keras_hesstrace.experiments.early_stop import early_stopping_epoch
from keras_hesstrace.experiments.recording import read_trajectory_file
from keras_hesstrace.experiments.scoring import score_trajectory, target_of
from keras_hesstrace.experiments.storage import load_result, run_folder


class Signal(NamedTuple):
    """A first-order signal the Page–Hinkley rule can watch."""

    per: str  # "snapshot" or "epoch"
    transform: Optional[str]  # "log" or None
    label: str


SIGNALS = {
    "probe_loss": Signal("snapshot", "log", "PH on log probe-batch loss"),
    "gradient_norm": Signal("snapshot", "log", "PH on log gradient norm"),
    "train_loss": Signal("epoch", "log", "PH on log training loss"),
    "val_loss": Signal("epoch", "log", "PH on log noisy-validation loss"),
    "gap": Signal("epoch", None, "PH on validation − training loss"),
}
CURVATURE = "curvature"


def early_stopping_name(patience):
    return f"early_stopping_p{int(patience)}"


def signal_values(traj, name, steps_per_epoch):
    """(epochs float [T], values float [T]) of one signal of one run.

    Per-snapshot signals are indexed by the snapshots' epochs (step / steps per epoch,
    from 0); per-epoch ones by epochs completed (1, 2, ..., E).
    """
    if SIGNALS[name].per == "snapshot":
        return traj["steps"] / float(steps_per_epoch), traj[name]
    epochs = traj["epoch"]
    if name == "gap":
        return epochs, traj["val_loss"] - traj["train_loss"]
    return epochs, traj[name]


def signal_reference(config, name):
    """The reference index of a signal: None when the curvature rule has none."""
    if config.reference_snapshot is None:
        return None
    return config.reference_snapshot if SIGNALS[name].per == "snapshot" else 0


def calibrate_signal(config, name, clean_trajectories, steps_per_epoch):
    """The ``Calibration`` of signal ``name`` on the clean calibration runs' trajectories."""
    from keras_hesstrace.monitor import calibrate_threshold

    runs = [signal_values(t, name, steps_per_epoch)[1] for t in clean_trajectories]
    return calibrate_threshold(runs, **target_of(config), delta=config.delta, group=name,
                               transform=SIGNALS[name].transform, seed=0,
                               reference_snapshot=signal_reference(config, name))


def alert_epoch(cal, name, epochs, values):
    """The epoch of the calibrated rule's first alert on one run's signal, or None."""
    _, index = score_trajectory(cal, name, np.arange(len(values)), values)
    return None if index is None else float(epochs[index])


def worth(traj, stop_epoch):
    """What the model is worth when training stops at ``stop_epoch`` (None: never).

    Returns:
        dict: ``stop_epoch`` (the epoch-end the numbers are read at: ceil of the
        alert's epoch, at least 1; the last epoch for None), ``test_accuracy`` and
        ``memorised_fraction`` there, the run's ``best_test_accuracy`` (oracle stop)
        and ``final_test_accuracy``.
    """
    test = traj["test_accuracy"]
    last = len(test)
    at = last if stop_epoch is None else min(max(int(math.ceil(stop_epoch - 1e-9)), 1), last)
    return {"stop_epoch": at, "test_accuracy_at_stop": float(test[at - 1]),
            "memorised_at_stop": float(traj["memorised_fraction"][at - 1]),
            "best_test_accuracy": float(np.max(test)),
            "final_test_accuracy": float(test[-1])}


def method_records(config, out, arch, dataset, curvature):
    """One record per (Phase II run, method): when it stops the run and what that is worth.

    Args:
        config: ``ExperimentConfig``.
        out: the experiment folder.
        arch, dataset: the cell.
        curvature: the cell's detections (``scoring.detections``) for the curvature
            rule's first monitored group.

    Returns:
        (records, calibrations): list of dicts, and dict signal -> ``Calibration``.
    """
    phase1, phase2 = run_specs(config, arch, dataset)
    traj = {}
    for spec in phase1 + phase2:
        res = load_result(out, spec)
        if res is not None and res.get("trajectory"):
            traj[spec.run_id] = (spec, res, read_trajectory_file(
                os.path.join(run_folder(out, spec), res["trajectory"])))
    clean = [traj[s.run_id][2] for s in phase1 if s.run_id in traj]
    if len(clean) < len(phase1):
        return [], {}
    spe = traj[phase1[0].run_id][1]["steps_per_epoch"]
    cals = {}
    for name in SIGNALS:
        try:
            cals[name] = calibrate_signal(config, name, clean, spe)
        except ValueError as e:  # e.g. too few epochs to score: left out, said so
            warnings.warn(f"baseline {name!r} left out of {phase1[0].cell}: {e}",
                          RuntimeWarning, stacklevel=2)
    group = config.monitor[0]
    curv = {r["run_id"]: r["alert_epoch"] for r in curvature if r["group"] == group}
    records = []
    for spec in phase2:
        if spec.run_id not in traj:
            continue
        _, res, t = traj[spec.run_id]
        stops = {CURVATURE: curv.get(spec.run_id)}
        for name in cals:
            stops[name] = alert_epoch(cals[name], name, *signal_values(t, name, spe))
        for p in config.early_stopping_patience:
            e = early_stopping_epoch(t["val_loss"], p) if np.all(np.isfinite(t["val_loss"])) else None
            stops[early_stopping_name(p)] = None if e is None else float(e)
        for method, epoch in stops.items():
            rec = {"cell": spec.cell, "run_id": spec.run_id, "role": spec.role,
                   "noise_rate": spec.noise_rate, "seed": spec.seed, "method": method,
                   "alert": int(epoch is not None), "alert_epoch": epoch}
            rec.update(worth(t, epoch))
            records.append(rec)
    return records, cals


def methods(config):
    """Method names in table order: the curvature rule, the PH baselines, EarlyStopping."""
    return [CURVATURE, *SIGNALS, *(early_stopping_name(p) for p in config.early_stopping_patience)]


def method_label(config, method):
    if method == CURVATURE:
        return f"PH on {config.transform + ' ' if config.transform else ''}Hessian trace " \
               f"({config.monitor[0]}; this package)"
    if method in SIGNALS:
        return SIGNALS[method].label
    return f"Keras EarlyStopping(val_loss, patience={method.rsplit('_p', 1)[1]})"
