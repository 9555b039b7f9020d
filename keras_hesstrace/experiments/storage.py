"""The experiment's folder on disk: its layout, atomic writes, checkpoints and the trace CSVs.

Layout of ``out``::

    .keras-hesstrace.lock               held by the one runner working in ``out``
    config.json                         the resolved config (a rerun must match it)
    <arch>-<dataset>/runs/<run_id>/traces.csv     the callback's trajectory CSV
    <arch>-<dataset>/runs/<run_id>/trajectory.json  traces and first-order records
    <arch>-<dataset>/runs/<run_id>/result.json    written last, by atomic rename: "done"
    <arch>-<dataset>/runs/<run_id>/checkpoint.npz  weights + optimiser state, each epoch;
                                                   deleted once result.json is written
    <arch>-<dataset>/calibration.json
    summary.csv, summary.md, detections.csv, comparison.csv, stops.csv, plots/*.png

One runner at a time: :func:`~keras_hesstrace.experiments.runner.run_experiment` holds
the lock file (:class:`keras_hesstrace.files.FolderLock`, released by the system if the
runner dies) and refuses an ``out`` another runner holds. Every file is written to a
temporary name (``<name>.tmp<pid>``) and renamed into place, so a killed process never
leaves a half-written one; the runner deletes the temporaries of dead processes, and
the checkpoints of finished runs, when it starts. The JSON files are strict JSON (NaN
written as ``null``, read back as NaN by :func:`load_result`). A CSV the callback appends
to is cut back to a checkpoint's step on resume (:func:`truncate_csv`, which drops a
torn last line). ``result.json`` and the checkpoint carry the run's identity
(:func:`run_identity`); a file whose identity is another run's is refused
(:func:`check_identity`), never adopted. :func:`export_round` copies what a documented
round commits (report and trajectories).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import zipfile
from typing import Any

import numpy as np

from keras_hesstrace.files import atomic_write, atomic_write_json, atomic_write_text, read_json
from keras_hesstrace.identity import describe_mismatch, model_fingerprint
from keras_hesstrace.monitor.csv_log import cut_back

# result.json's numbers that may be NaN (written as null in strict JSON)
RESULT_FLOAT_FIELDS = ("test_accuracy", "train_accuracy", "clean_train_accuracy",
                       "memorised_fraction", "wall_time_s")


def log(msg, stream=None):
    """Print one progress line, flushed (stdout unless ``stream``)."""
    print(msg, file=stream or sys.stdout, flush=True)


# ------------------------------------------------------------------ run identity


def run_identity(config, spec, model=None) -> dict[str, Any]:
    """What a run's files belong to: its cell, role, noise rate, seed, snapshot interval
    and, given the built ``model``, the model's fingerprint
    (:func:`keras_hesstrace.identity.model_fingerprint`)."""
    identity = {"cell": spec.cell, "role": spec.role, "noise_rate": float(spec.noise_rate),
                "seed": int(spec.seed), "every_n_steps": int(config.every_n_steps)}
    if model is not None:
        identity["model"] = model_fingerprint(model)
    return identity


def check_identity(path: str, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse the file ``path`` whose identity ``saved`` is another run's (``ValueError``
    naming the file and what differs); a file without an identity (older) is accepted."""
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ValueError(f"{path!r}: its identity is not an object ({saved!r}).")
    mismatch = describe_mismatch(saved, current)
    if mismatch is not None:
        raise ValueError(
            f"{path!r} belongs to another run ({mismatch}); it is not adopted. Delete the "
            "run's folder to redo the run, or use the --out it came from.")


def save_checkpoint(path, model, meta):
    """Weights, optimiser variables and ``meta`` (a JSON-able dict) in one atomic ``.npz``.

    Written to ``<path>.tmp<pid>`` first, the name
    :func:`keras_hesstrace.files.remove_stale_temporaries` recognises.
    """
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)})
    arrays["meta"] = np.array(json.dumps(meta))
    atomic_write(path, lambda f: np.savez(f, **arrays), binary=True, what="the checkpoint ")


def load_checkpoint(path, model, identity: dict[str, Any] | None = None):
    """Restore what ``save_checkpoint`` wrote into the compiled ``model``; return its meta.

    Args:
        path: the checkpoint.
        model: the run's compiled model.
        identity: the run's :func:`run_identity`; a checkpoint of another run is refused
            (``ValueError`` naming the file and what differs) before anything is restored.
    """
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            weights = [z[f"w{i}"] for i in range(sum(k.startswith("w") for k in z.files))]
            opt = [z[f"o{i}"] for i in range(sum(k.startswith("o") for k in z.files))]
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path!r} is not a readable checkpoint ({e}); delete it to "
                         "restart the run from scratch.") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path!r} is not a readable checkpoint (its meta is not an object).")
    if identity is not None:
        check_identity(path, meta.get("identity"), identity)
    if len(weights) != len(model.weights):
        raise ValueError(f"checkpoint {path!r} holds {len(weights)} weights, the model has "
                         f"{len(model.weights)}: not this config's run.")
    model.set_weights(weights)
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    if len(opt) != len(optimizer.variables):
        raise ValueError(f"checkpoint {path!r} holds {len(opt)} optimiser variables, the "
                         f"optimiser has {len(optimizer.variables)}: not this config's run.")
    for v, a in zip(optimizer.variables, opt):
        v.assign(a)
    return meta


def truncate_csv(path, last_step):
    """Keep the header and the complete rows with step <= last_step (atomically); the count kept.

    The one cut-back of a snapshot CSV (:func:`keras_hesstrace.monitor.csv_log.cut_back`),
    which drops a torn last line.
    """
    return len(cut_back(path, last_step)[1])


def count_snapshots(csv_path):
    """The number of distinct steps (snapshots) in a callback CSV; 0 if there is none."""
    if not os.path.exists(csv_path):
        return 0
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    return len({r[0] for r in rows[1:] if r})


def read_trajectory(csv_path, group):
    """The ``group``'s rows of a callback CSV in step order: (steps int [T], traces [T])."""
    import pandas as pd

    try:
        frame = pd.read_csv(csv_path)
        frame = frame[frame["group"] == group].sort_values("step")
        steps, traces = frame["step"].to_numpy(np.int64), frame["trace"].to_numpy(np.float64)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, ValueError,
            TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.fspath(csv_path)!r} is not a readable trace CSV ({e!r}).") from e
    if frame.empty:
        raise ValueError(f"{os.fspath(csv_path)!r}: no rows for group {group!r}.")
    return steps, traces


# ------------------------------------------------------------------ the run folders


def check_config(out, config):
    """Refuse an ``out`` that holds another config's results; write ``config.json`` if new."""
    path = os.path.join(out, "config.json")
    current = config.to_dict()
    if os.path.exists(path):
        saved = read_json(path)
        if not isinstance(saved, dict):
            raise ValueError(f"{path!r} does not hold a config (a JSON object).")
        saved = type(config).upgraded(saved)  # a folder written by an earlier version
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(
                f"{out!r} holds results of another config (differs in {diff}, {path!r}). "
                "Use another "
                "--out, or the same settings to resume."
            )
    else:
        os.makedirs(out, exist_ok=True)
        atomic_write_json(path, current)


def run_folder(out, spec):
    """The folder of the run ``spec`` (a ``RunSpec``) under ``out``."""
    return os.path.join(out, spec.cell, "runs", spec.run_id)


def read_result(path: str) -> dict[str, Any]:
    """A ``result.json``: its numbers written as ``null`` (strict JSON for NaN) read as NaN.

    Raises:
        ValueError: naming the file, when it is not JSON or not an object.
    """
    result = read_json(path)
    if not isinstance(result, dict):
        raise ValueError(f"{path!r} does not hold a run's result (a JSON object).")
    for key in RESULT_FLOAT_FIELDS:
        if key in result and result[key] is None:
            result[key] = math.nan
    return result


def load_result(out, spec):
    """The run's ``result.json`` as a dict (:func:`read_result`), or None while the run is
    not finished."""
    path = os.path.join(run_folder(out, spec), "result.json")
    if not os.path.exists(path):
        return None
    return read_result(path)


def export_round(out, dest):
    """Copy a finished experiment's report and per-run trajectories to ``dest``.

    What a documented round commits: ``config.json``, the summaries (``summary.md``,
    ``summary.csv``, ``detections.csv``, ``comparison.csv``, ``stops.csv``), each cell's
    ``calibration.json`` (as ``<cell>-calibration.json``), ``plots/*.png`` and every
    finished run's ``trajectory.json`` as ``trajectories/<cell>/<run_id>.json`` (about
    12 kB a run): everything the tables are computed from, without checkpoints or CSVs.

    Returns:
        the number of trajectories copied.
    """
    import glob
    import shutil

    out, dest = os.fspath(out), os.fspath(dest)
    os.makedirs(dest, exist_ok=True)
    for name in ("config.json", "summary.md", "summary.csv", "detections.csv",
                 "comparison.csv", "stops.csv"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copyfile(os.path.join(out, name), os.path.join(dest, name))
    for path in glob.glob(os.path.join(out, "*", "calibration.json")):
        cell = os.path.basename(os.path.dirname(path))
        shutil.copyfile(path, os.path.join(dest, f"{cell}-calibration.json"))
    plots = sorted(glob.glob(os.path.join(out, "plots", "*.png")))
    if plots:
        os.makedirs(os.path.join(dest, "plots"), exist_ok=True)
        for path in plots:
            shutil.copyfile(path, os.path.join(dest, "plots", os.path.basename(path)))
    copied = 0
    for path in sorted(glob.glob(os.path.join(out, "*", "runs", "*", "trajectory.json"))):
        run_dir = os.path.dirname(path)
        if not os.path.exists(os.path.join(run_dir, "result.json")):
            continue
        cell = os.path.basename(os.path.dirname(os.path.dirname(run_dir)))
        target = os.path.join(dest, "trajectories", cell)
        os.makedirs(target, exist_ok=True)
        shutil.copyfile(path, os.path.join(target, os.path.basename(run_dir) + ".json"))
        copied += 1
    return copied


def restore_round(dest, out):
    """Rebuild an experiment folder from a round exported by :func:`export_round`.

    Each ``trajectories/<cell>/<run_id>.json`` becomes ``out/<cell>/runs/<run_id>/`` with
    its ``result.json``, its ``trajectory.json`` and a ``traces.csv`` holding the columns the
    scoring reads (step, epoch, group, trace), so that calibrating and summarising ``out``
    recomputes the round's documented numbers from the committed data alone.

    Returns:
        the config (``ExperimentConfig``) of the round.
    """
    import glob
    import shutil

    from keras_hesstrace.experiments.config import ExperimentConfig

    dest, out = os.fspath(dest), os.fspath(out)
    config = ExperimentConfig.from_dict(read_json(os.path.join(dest, "config.json")))
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(os.path.join(dest, "config.json"), os.path.join(out, "config.json"))
    for path in sorted(glob.glob(os.path.join(dest, "trajectories", "*", "*.json"))):
        cell = os.path.basename(os.path.dirname(path))
        run_dir = os.path.join(out, cell, "runs", os.path.splitext(os.path.basename(path))[0])
        os.makedirs(run_dir, exist_ok=True)
        traj = read_json(path)
        result = traj["result"]
        spe = result["steps_per_epoch"]
        lines = ["step,epoch,group,trace"]
        for i, step in enumerate(traj["snapshots"]["step"]):
            for group, values in traj["snapshots"]["trace"].items():
                lines.append(f"{step},{step // spe},{group},{values[i]!r}")
        atomic_write_text(os.path.join(run_dir, result["trace_csv"]), "\n".join(lines) + "\n")
        shutil.copyfile(path, os.path.join(run_dir, result["trajectory"]))
        atomic_write_json(os.path.join(run_dir, "result.json"), result)
    return config
