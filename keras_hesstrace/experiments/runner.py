"""The memorisation experiment (docs/method.md §8, the method paper's §5) as a resumable runner.

For every cell (architecture x dataset) of the config:

* Phase I: ``calibration_runs`` clean runs (eta = 0) record the layer-wise traces every
  ``every_n_steps`` optimiser steps with :class:`HessianTraceCallback` on a fixed batch of
  ``probe_batch_size`` training examples (their labels as trained on); the monitored
  groups' trajectories give the baseline and the calibrated threshold h
  (:func:`calibrate_threshold` on leave-one-out z: for the per-run false-alarm
  probability ``false_alarm_prob`` by the conformal rule, or for ``target_arl0`` by
  resampling whole runs so that their autocorrelation is kept; with
  ``reference_snapshot`` each run is scored by its change since its own snapshot r),
  saved to ``<cell>/calibration.json``.
* Phase II: ``noisy_runs`` runs at every rate in ``noise_rates`` and
  ``heldout_clean_runs`` clean runs that were not used for calibration (the false-alarm
  estimate). Each trajectory is run through the calibrated Page-Hinkley rule (the same
  recursion the callback runs online; done here from the CSV so that a resumed run and
  an uninterrupted one are scored identically). Every run also writes its
  ``trajectory.json`` (:mod:`~keras_hesstrace.experiments.recording`), from which the
  first-order baselines are scored on the same runs
  (:mod:`~keras_hesstrace.experiments.baselines`).
* Summary: ``summary.csv`` / ``summary.md`` (Table 1 of the paper: detection epoch mean
  +- sd, alert rate with its Wilson interval, h, Hedges' g with its noncentral t interval,
  clean test accuracy; ``summary.md`` adds the calibration table and the baselines'
  side-by-side table), ``detections.csv`` (one row per run and group),
  ``comparison.csv`` (one row per method and rate), ``stops.csv`` (one row per run and
  method) and PNG plots.

Files: the layout of ``out`` is in :mod:`keras_hesstrace.experiments.storage`; one run is
trained by :mod:`~keras_hesstrace.experiments.training`, scored by
:mod:`~keras_hesstrace.experiments.scoring` and reported by
:mod:`~keras_hesstrace.experiments.report`; the settings and the grid are
:mod:`~keras_hesstrace.experiments.config`.

Resuming: one runner at a time works in ``out``: it holds ``out/.keras-hesstrace.lock``
(:class:`keras_hesstrace.files.FolderLock`) from start to end, and a second runner on the
same ``out`` stops at once with :class:`~keras_hesstrace.files.LockedError` naming the
holder, before touching anything (a runner that was killed holds nothing: the system
releases its lock). On start the runner deletes the temporary files (``*.tmp<pid>``) that
killed processes left and the checkpoints of runs that had finished, and checks that
every ``result.json`` is its run's (its identity: cell, role, noise rate, seed, snapshot
interval), so a run folder copied from another run is refused, naming the file and what
differs, instead of adopted. A run with ``result.json`` is never redone. A run without
it restarts from its last epoch checkpoint (weights, optimiser slots and step counter,
all written by one atomic rename; refused if it is another run's), its CSV cut back to
the checkpoint's step, so nothing a killed process half-wrote is ever read; the
per-epoch data order and the probe seeds are functions of (seed, epoch) and
(seed, step), so a resumed run repeats what an uninterrupted one does.
"""

from __future__ import annotations

import os
import time

import numpy as np

from keras_hesstrace.experiments.config import cells, run_specs
from keras_hesstrace.experiments.report import summarize
from keras_hesstrace.experiments.scoring import calibrate_cell
from keras_hesstrace.experiments.storage import (
    check_config,
    check_identity,
    log,
    read_result,
    run_folder,
    run_identity,
)
from keras_hesstrace.experiments.training import train_run
from keras_hesstrace.files import FolderLock, remove_stale_temporaries


def tidy_out(config, out: str, specs: list, progress: bool = True) -> None:
    """Before any run: delete what killed processes left, and refuse another run's results.

    Deletes the ``*.tmp<pid>`` files of dead processes under ``out`` and the
    ``checkpoint.npz`` of every run that has its ``result.json`` (a kill between the two
    leaves one, 4 MB for a ResNet); checks every ``result.json`` first against its run's
    identity (``ValueError`` naming the file and what differs).
    """
    finished = []
    for spec in specs:
        result_path = os.path.join(run_folder(out, spec), "result.json")
        if os.path.exists(result_path):
            saved = read_result(result_path).get("identity")
            check_identity(result_path, saved, run_identity(config, spec))
            finished.append(spec)
    stale = remove_stale_temporaries(out)
    checkpoints = [os.path.join(run_folder(out, spec), "checkpoint.npz") for spec in finished]
    checkpoints = [p for p in checkpoints if os.path.exists(p)]
    for path in checkpoints:
        os.remove(path)
    if progress and (stale or checkpoints):
        log(f"removed {len(stale)} stale temporary file(s) of killed processes and "
            f"{len(checkpoints)} checkpoint(s) of finished runs from {out}")


def run_experiment(config, out, *, callbacks_for=None, progress=True, summary=True):
    """Run (or resume) the whole experiment into ``out``; return the summary frame.

    Args:
        config: ``ExperimentConfig`` (validated here).
        out: output folder; a rerun with the same config resumes, another config is refused.
        callbacks_for: optional ``f(spec) -> list`` of extra Keras callbacks per run.
        progress: print progress lines.
        summary: write the summary and plots at the end.

    Returns:
        pandas DataFrame of the summary (None when ``summary=False``).

    Raises:
        keras_hesstrace.files.LockedError: another runner works in ``out`` (nothing touched).
        ValueError: ``out`` holds another config's results, or a run's ``result.json`` or
            checkpoint is another run's or unreadable (the message names the file).
    """
    config.validate()
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    with FolderLock(out, what="--out"):  # raises LockedError while another runner works here
        return _run_locked(config, out, callbacks_for, progress, summary)


def _run_locked(config, out: str, callbacks_for, progress: bool, summary: bool):
    """``run_experiment`` once it holds ``out``'s lock."""
    check_config(out, config)
    all_specs = []
    for arch, dataset in cells(config):
        p1, p2 = run_specs(config, arch, dataset)
        all_specs += p1 + p2
    tidy_out(config, out, all_specs, progress=progress)
    total = len(all_specs)
    done_before = sum(os.path.exists(os.path.join(run_folder(out, s), "result.json"))
                      for s in all_specs)
    if progress:
        log(f"experiment {config.name!r}: {total} runs in {len(cells(config))} cell(s), "
             f"{done_before} already done; output in {out}")
    t_start = time.perf_counter()
    fresh_times = []
    k = 0

    def do(spec):
        nonlocal k
        k += 1
        run_dir = run_folder(out, spec)
        tag = f"[{k}/{total}] {spec.cell} {spec.role} eta={spec.noise_rate:.2f} seed={spec.seed}"
        if os.path.exists(os.path.join(run_dir, "result.json")):
            if progress:
                log(f"{tag}: done before, skipped")
            return
        if progress:
            log(f"{tag}: training")
        t = time.perf_counter()
        log_dir = (os.path.join(out, "tensorboard", spec.cell, spec.run_id)
                   if config.tensorboard else None)
        res = train_run(config, spec, run_dir, log_dir=log_dir,
                        callbacks=callbacks_for(spec) if callbacks_for else (),
                        progress=progress, prefix="    ")
        fresh_times.append(time.perf_counter() - t)
        if progress:
            left = sum(not os.path.exists(os.path.join(run_folder(out, s), "result.json"))
                       for s in all_specs)
            eta = left * float(np.mean(fresh_times))
            log(f"{tag}: done in {fresh_times[-1]:.0f} s, test acc "
                 f"{res['test_accuracy']:.3f}, train acc {res['train_accuracy']:.3f}; "
                 f"{left} runs left, about {eta / 60:.1f} min")

    for arch, dataset in cells(config):
        p1, p2 = run_specs(config, arch, dataset)
        for spec in p1:
            do(spec)
        cal = calibrate_cell(config, out, arch, dataset)
        if progress:
            for g in config.monitor:
                r = cal[g]
                target = (f"a per-run false-alarm probability {config.false_alarm_prob:g}"
                          if config.false_alarm_prob is not None else
                          f"ARL0 = {config.target_arl0:g} snapshots")
                log(f"calibrated {arch}-{dataset} group {g!r}: h = {r.threshold:.3f} for "
                     f"{target} (expected false-alarm probability per run "
                     f"{r.false_alarm_prob:.3f}; LOO false alarms "
                     f"{r.loo_false_alarms}/{r.n_runs}; lag-1 r = {r.lag1_r:.2f})")
        for spec in p2:
            do(spec)
    if progress:
        log(f"all {total} runs done ({(time.perf_counter() - t_start) / 60:.1f} min this "
             "session)")
    if not summary:
        return None
    return summarize(config, out, progress=progress)
