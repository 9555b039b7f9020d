"""What a run records beside its traces: the first-order view of training.

Per snapshot (from the trace callback's own pass on the fixed probe batch): the probe
batch's loss and the loss's gradient norm, whole model and per group. Per epoch: the
training loss and accuracy as Keras logs them (epoch means, noisy labels, training
mode), the validation split's loss and accuracy (noisy labels, inference mode, Keras's
``val_`` logs), the clean test accuracy, and the memorised share: accuracy on the
corrupted training examples with respect to their noisy labels.

Everything goes into the run's ``trajectory.json`` (:func:`write_trajectory`) with the
traces of every recorded group, about 15 kB a run: what the first-order baselines and
the "what an alert is worth" columns are computed from
(:mod:`keras_hesstrace.experiments.baselines`), and what docs/ commits per run.
"""

import os

import numpy as np

from keras_hesstrace.experiments.storage import RESULT_FLOAT_FIELDS
from keras_hesstrace.files import atomic_write_json, read_json

EPOCH_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                "test_accuracy", "memorised_fraction")
_NAN = float("nan")


def predict_classes(model, x, batch_size=512):
    """Predicted classes int [N] (inference mode), without Keras's predict function."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    out = [np.argmax(np.asarray(model(x[i:i + batch_size], training=False)), axis=1)
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def epoch_record(model, data, epoch, logs):
    """One epoch's first-order record (a dict with ``EPOCH_FIELDS``).

    Args:
        model: the model after the epoch.
        data: the run's data (``training._RunData``).
        epoch: 0-based epoch just finished (recorded 1-based: epochs completed).
        logs: the ``logs`` Keras passes to ``on_epoch_end`` (``loss``, ``accuracy`` and,
            with a validation split, ``val_loss``, ``val_accuracy``).
    """
    logs = logs or {}
    test_x, test_y = data.test_arrays()
    memorised = _NAN
    if data.corrupted.any():
        corrupted_x, noisy_y = data.corrupted_arrays()
        memorised = float(np.mean(predict_classes(model, corrupted_x) == noisy_y))
    return {
        "epoch": int(epoch) + 1,
        "train_loss": float(logs.get("loss", _NAN)),
        "train_accuracy": float(logs.get("accuracy", _NAN)),
        "val_loss": float(logs.get("val_loss", _NAN)),
        "val_accuracy": float(logs.get("val_accuracy", _NAN)),
        "test_accuracy": float(np.mean(predict_classes(model, test_x) == test_y)),
        "memorised_fraction": memorised,
    }


def snapshot_record(entry):
    """The first-order record of one trace-callback history entry.

    Args:
        entry: ``{"step", "epoch", "result"}`` from ``HessianTraceCallback.history``.

    Returns:
        dict: ``step``, ``probe_loss`` (the loss on the probe batch), ``gradient_norm``
        (L2 norm of the whole gradient there) and ``gradient_norms`` (group -> norm).
    """
    r = entry["result"]
    norms = r.gradient_norms if r.gradient_norms is not None else [np.nan] * len(r.groups)
    return {"step": int(entry["step"]), "probe_loss": float(r.loss),
            "gradient_norm": float(r.gradient_norm),
            "gradient_norms": {g: float(v) for g, v in zip(r.groups, norms)}}


def write_trajectory(path, result, csv_path, snapshots, epochs):
    """The run's ``trajectory.json``: its result, traces and first-order records, as strict
    JSON (NaN written as ``null``).

    Args:
        path: where to write (atomically).
        result: the run's result dict.
        csv_path: its trace CSV (every recorded group's trace and standard error).
        snapshots: list of ``snapshot_record`` dicts, one per snapshot, in step order.
        epochs: list of ``epoch_record`` dicts, one per epoch, in order.
    """
    import pandas as pd

    frame = pd.read_csv(csv_path).sort_values(["step", "group"], kind="stable")
    steps = sorted(frame["step"].unique().tolist())
    snap_steps = [s["step"] for s in snapshots]
    if snap_steps != steps:
        raise RuntimeError(f"{csv_path}: trace steps {steps[:3]}... differ from the "
                           f"first-order records' {snap_steps[:3]}...")
    traces = {g: rows.set_index("step").loc[steps, "trace"].tolist()
              for g, rows in frame.groupby("group", sort=False)}
    groups = list(snapshots[0]["gradient_norms"]) if snapshots else []
    atomic_write_json(path, {
        "result": result,
        "snapshots": {
            "step": steps,
            "trace": traces,
            "probe_loss": [s["probe_loss"] for s in snapshots],
            "gradient_norm": [s["gradient_norm"] for s in snapshots],
            "gradient_norms": {g: [s["gradient_norms"][g] for s in snapshots] for g in groups},
        },
        "epochs": {k: [e[k] for e in epochs] for k in EPOCH_FIELDS},
    })


def read_trajectory_file(path):
    """A ``trajectory.json`` as a dict with numpy arrays (NaN where the file has ``null``, or
    a bare ``NaN`` as files written before strict JSON have); a ``ValueError`` names the
    file when it is not JSON."""
    d = read_json(os.fspath(path))
    snaps = d["snapshots"]
    result = dict(d["result"])
    for key in RESULT_FLOAT_FIELDS:
        if key in result and result[key] is None:
            result[key] = float("nan")
    out = {"result": result, "steps": np.asarray(snaps["step"], dtype=np.int64),
           "trace": {g: np.asarray(v, dtype=np.float64) for g, v in snaps["trace"].items()},
           "probe_loss": np.asarray(snaps["probe_loss"], dtype=np.float64),
           "gradient_norm": np.asarray(snaps["gradient_norm"], dtype=np.float64),
           "gradient_norms": {g: np.asarray(v, dtype=np.float64)
                              for g, v in snaps["gradient_norms"].items()}}
    out.update({k: np.asarray(v, dtype=np.float64) for k, v in d["epochs"].items()})
    return out
