"""HessianTraceCallback: layer-wise Hessian traces during ``model.fit``, to CSV and TensorBoard.

When snapshots are taken. ``step`` is the optimiser step (``optimizer.iterations``): the
number of updates applied so far. A snapshot is taken at the step a fit starts from when
it is a multiple of ``every_n_steps`` (e.g. step 0), and whenever the step crosses a
multiple of ``every_n_steps``. The check runs in ``on_train_batch_begin`` (the weights
there are those after ``step`` updates) and once more in ``on_epoch_end`` (for the last
step of an epoch). With ``steps_per_execution = k > 1`` Keras calls the hooks once per
execution, so the snapshot lands on the first execution boundary at or after the multiple
(e.g. every_n_steps=4, k=3: steps 0, 6, ...), recorded with its true step. Between
snapshots the hook does integer arithmetic only, reads nothing from the device and does
not override ``on_train_batch_end``, so Keras keeps its asynchronous batch-end dispatch.

Mixed precision (e.g. ``mixed_float16``): the curvature is computed in float32
(``keras_hesstrace.monitor.precision``), its functions traced once and kept.

Files. Nothing is opened at construction. At ``on_train_begin`` the callback takes an
exclusive lock on the CSV (``<csv_path>.lock``, released at ``on_train_end`` and by
``close()``): a second fit writing the same ``csv_path`` meanwhile, in this process or
another, is refused with an error naming the holder. The CSV
(``keras_hesstrace.monitor.csv_log``) is then prepared and written through: each
snapshot's rows are appended and the file closed again, so a fit that raises leaves a
closed CSV holding every finished snapshot. A new CSV gets a sidecar
``<csv_path>.identity.json`` naming what wrote it (the model's variables and shapes, the
recorded groups, ``by``, ``seed``, ``every_n_steps``, ``num_probes``). The TensorBoard
writer is created at the first snapshot and closed in ``on_train_end``; Keras calls no
``on_train_end`` when ``fit`` raises, so close it with ``close()`` in a ``finally`` or
use the callback as a context manager (``with HessianTraceCallback(...) as cb:
model.fit(..., callbacks=[cb])``); a writer left open by a failed fit is also closed at
the next ``on_train_begin``.

Resuming. The CSV is the detector's memory: at ``on_train_begin`` a callback pointed at
an existing CSV checks its sidecar against its own model and settings (refusing another
run's file; adopting, with a warning, an older version's without one), removes rows past
the step the fit resumes from, a torn last line and the rows of an incomplete last
snapshot (retaken when the fit resumes at its step, refused when later), each with a
warning, and restores each detector by replaying its group's rows. A ``tf.data.Dataset``
``data`` is advanced by the number of snapshots recorded. docs/monitoring.md, "Resuming
a fit", has the details.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import keras

from keras_hesstrace.files import FolderLock
from keras_hesstrace.groups import split_grouping
from keras_hesstrace.hvp import DEFAULT_MODE
from keras_hesstrace.losses import check_mean_reduction, resolve_loss
from keras_hesstrace.monitor.callback_setup import (
    check_arguments,
    check_calibration_model,
    check_overrun,
    resolve_detectors,
    resolve_groups,
)
from keras_hesstrace.monitor.callback_report import (epochs_completed, say, summary_text, target_missed_text,
                                                     unusable_text)
from keras_hesstrace.monitor.csv_log import (TOTAL, check_csv_path, csv_columns, csv_identity,
                                              older_csv_columns, open_snapshot_csv, replay_detectors)
from keras_hesstrace.monitor.precision import mixed_precision_layers
from keras_hesstrace.monitor.snapshot_data import SnapshotBatches, check_snapshot_data
from keras_hesstrace.monitor.snapshot_scoring import group_values, score_snapshot, snapshot_traces
from keras_hesstrace.monitor.tensorboard_log import TensorBoardScalars, alert_text, check_tensorboard

if TYPE_CHECKING:
    from keras_hesstrace.monitor.calibration import Calibration
    from keras_hesstrace.monitor.page_hinkley import PageHinkley

def snapshot_seed(seed: int, step: int) -> int:
    """The probe seed of the snapshot at optimiser ``step``: distinct per snapshot."""
    return int(seed) * (2**32) + int(step)


class HessianTraceCallback(keras.callbacks.Callback):
    """Record layer-wise Hessian traces every ``every_n_steps`` optimiser steps.

    Args:
        data: a fixed ``(x, y)`` batch, or a ``tf.data.Dataset`` of ``(x, y)`` batches
            (the next batch at each snapshot, cycling when it ends).
        every_n_steps: optimiser steps between snapshots (>= 1).
        num_probes: Rademacher probes (HVPs) per snapshot (>= 1); with ``rel_stderr``,
            each snapshot's pilot (>= 2). Defaults to 10.
        rel_stderr: a target r in (0, 1) instead of a fixed count: each snapshot draws
            probes until every recorded group and the total has stderr <= r·|trace|
            (``layer_traces(rel_stderr=r)``), or ``max_probes``; the CSV's ``num_probes``
            says how many each snapshot took, and a snapshot that misses the target is
            warned about once per fit. A ``Calibration`` detector was calibrated with
            fixed counts: a target changes each snapshot's noise, so its false-alarm rate
            is not promised (a warning says so). Defaults to None.
        max_probes: with ``rel_stderr``, the most probes per snapshot. Defaults to 1000.
        by: how to group the variables, as ``layer_traces`` takes it (``"layer"``,
            ``"variable"``, path patterns, ...). Defaults to ``"layer"``.
        groups: names of the groups to record (default: all). The total trace over
            all trainable variables is always recorded too, as group ``"total"``.
            (``layers=`` is the older name of this argument, and a grouping passed as
            ``groups=`` is taken as ``by=``; both with a DeprecationWarning.)
        csv_path: tidy CSV, one row per (snapshot, group), flushed at every snapshot;
            a resumed fit appends to it and restores the detectors from it. Locked
            while a fit runs; its directory must be writable (the sidecar
            ``<csv_path>.identity.json`` and the lock file ``<csv_path>.lock`` lie
            there). Defaults to None: no CSV.
        log_dir: TensorBoard run directory (scalars under ``log_dir/train``, as
            ``keras.callbacks.TensorBoard`` writes them). Needs the ``tensorboard``
            package (without it TensorFlow writes no scalars and raises nothing).
        detector: None; a ``Calibration`` (one detector per calibrated group; refused
            if made for other groups, another ``every_n_steps`` or, when it records
            one, another model's fingerprint); a dict group ->
            ``PageHinkley``; or a ``PageHinkley`` when exactly one group is recorded.
            ``"total"`` can be a detector group.
        stop_on_alert: set ``model.stop_training`` at the first alert (Keras stops
            after the step in progress).
        on_alert: optional ``f(callback, group, step, result)`` called at each group's
            first alert.
        seed: base probe seed, an integer in [0, 2**31 - 1]; the snapshot at step s
            uses ``snapshot_seed(seed, s)``. Defaults to 0.
        verbose: 1 prints each alert and, at the end of each fit, a summary line
            (snapshots taken, groups, last traces, alert or not), as Keras's callbacks
            print (``keras.utils.io_utils.print_msg``); 0 prints nothing.
        summary: with ``verbose``, print the end-of-fit summary line. Defaults to True;
            False for a loop that calls ``fit`` once an epoch and reports progress itself
            (the experiment runner and the demo).
        loss: loss for the Hessian (default: the compiled loss).
        probes_per_call, max_batch_size, mode: passed to ``layer_traces`` (probes
            sharing one compiled call; the most examples per call, a larger ``data``
            batch being split into chunks averaged by size; the HVP mode). They
            change speed and memory, not the estimate.

    Epochs: the ``epoch`` of the CSV, ``history`` and the printed lines is the number
    of epochs completed at the snapshot, fractional (``step / steps_per_epoch`` for a
    fit from step 0; ``keras_hesstrace.monitor.callback_report``).

    CSV columns: step, epoch, group, trace, stderr, num_probes, probe_seed, wall_time,
    status ("ok"; "nonfinite": the estimate was NaN/inf, written as NaN and skipped by
    the detector; "nonpositive": a value <= 0 that a ``transform="log"`` detector
    cannot take, kept in the CSV and skipped by the detector; "unreferenced": a value
    after a skipped reference snapshot, which a detector with a reference snapshot
    cannot score), then h (the threshold), z, g_pos, g_neg, alert (0 or 1) when a
    detector is set (empty for groups without one; z is NaN at the snapshots up to a
    detector's reference snapshot). A CSV written before the h column resumes in its
    own layout.

    Reusing one instance across fits. A fit that starts, on the same model, at or after
    the last snapshot this instance recorded continues its record (``history``, the
    detectors' state, the dataset's position), as a second ``fit`` call continuing the
    same run does. A fit on another model, or one starting before that snapshot (a
    reset optimiser, an earlier checkpoint), starts fresh: ``history`` is cleared, the
    detectors are reset and the dataset starts from its first batch. With ``csv_path``
    the CSV then decides what is restored (see the module docstring: rows past the
    start step are removed, the detectors and the dataset position are restored from the
    rest).

    Closing. ``on_train_end`` closes the TensorBoard writer. When ``fit`` raises Keras
    calls no ``on_train_end``: call ``close()`` (e.g. in a ``finally``) or use the
    callback as a context manager. The CSV is closed after every snapshot anyway.

    Example:
        >>> cb = HessianTraceCallback((x[:256], y[:256]), every_n_steps=50,
        ...                           csv_path="traces.csv", log_dir="logs")
        >>> model.fit(x, y, epochs=5, callbacks=[cb])           # doctest: +SKIP
        >>> pandas.read_csv("traces.csv")                       # doctest: +SKIP
    """

    def __init__(self, data, every_n_steps: int = 100, num_probes: int = 10, by="layer", groups=None,
                 csv_path: str | os.PathLike | None = None, log_dir: str | os.PathLike | None = None,
                 detector: Calibration | PageHinkley | dict[str, PageHinkley] | None = None,
                 stop_on_alert: bool = False, on_alert: Callable | None = None, seed: int = 0,
                 verbose: int = 1, loss=None, probes_per_call: int = 1,
                 max_batch_size: int | None = None, mode: str = DEFAULT_MODE, layers=None,
                 summary: bool = True, rel_stderr: float | None = None, max_probes: int | None = None) -> None:
        super().__init__()
        seed, rel_stderr, max_probes = check_arguments(every_n_steps, num_probes, probes_per_call, max_batch_size,
                                                       seed, mode, rel_stderr, max_probes, detector, on_alert)
        check_snapshot_data(data)
        csv_path = None if csv_path is None else check_csv_path(csv_path)
        if log_dir is not None:
            check_tensorboard()
        self.data = data
        self.every_n_steps = int(every_n_steps)
        self.num_probes = int(num_probes)
        self.rel_stderr = rel_stderr
        self.max_probes = max_probes
        if layers is not None:
            if groups is not None:
                raise ValueError("pass the groups to record as groups= (layers= is its older name), not both.")
            warnings.warn("layers= is now groups= (the groups to record).", DeprecationWarning, stacklevel=2)
            groups = layers
        self.by, groups = split_grouping(by, groups, stacklevel=2)
        self.groups = None if groups is None else ([groups] if isinstance(groups, str) else list(groups))
        self.csv_path = csv_path
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.detector = detector
        self.stop_on_alert = bool(stop_on_alert)
        self.on_alert = on_alert
        self.seed = seed
        self.verbose = verbose
        self.summary = bool(summary)
        self.loss = loss
        self._trace_options = dict(probes_per_call=probes_per_call, max_batch_size=max_batch_size,
                                   mode=mode)
        # State across fits (see "Reusing one instance across fits").
        self.detectors = None  # dict group -> PageHinkley, resolved at the first fit
        self.history = []  # one dict per snapshot: step, epoch, GroupTraces
        self._recorded_model = None  # the model the history belongs to
        self._last_recorded = -1  # step of the last snapshot recorded (-1: none)
        self._float32_cache = {}  # Hessian operators traced in float32 (mixed precision)
        # Outputs: the CSV is written through; the TensorBoard writer is made lazily.
        self._csv = None
        # Held from on_train_begin to on_train_end / close(): one writer of the CSV at a time.
        self._csv_lock = None if csv_path is None else FolderLock(csv_path, what="csv_path")
        self._tensorboard = None if self.log_dir is None else TensorBoardScalars(self.log_dir)
        # State of the current fit, set at on_train_begin.
        self._names = []  # the recorded groups, without "total"
        self._mixed_layers = []
        self._step = 0  # the optimiser step, counted in Python between reads
        self._epoch = None
        self._epoch_start_step = 0
        self._steps_per_epoch = None  # Keras's params["steps"], or the first epoch's count
        self._mid_line = False  # Keras's progress bar has an unfinished line
        self._fit_steps = []  # steps of the snapshots this fit took
        self._target_warned = False  # a snapshot of this fit missed rel_stderr (warned once)
        self._epoch_at = {}  # step -> epoch of the recorded snapshots
        self._first_epoch = True
        self._batches = SnapshotBatches(data)  # the dataset's position
        self._skip_batches = 0  # batches the next fit skips (snapshots already recorded)

    # -------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Close the TensorBoard writer and release the CSV's lock (the CSV itself is
        closed after every snapshot).

        ``on_train_end`` calls it; call it yourself when ``fit`` raises, or use the
        callback as a context manager. Idempotent; a later fit reopens what it needs.
        """
        if self._tensorboard is not None:
            self._tensorboard.close()
        self._batches.close()
        if self._csv_lock is not None:
            self._csv_lock.release()

    def __enter__(self) -> HessianTraceCallback:
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    # ------------------------------------------------------------------ setup

    def _start_fresh_if_new_run(self, step):
        """Clear the record when this fit is not a continuation of the recorded one."""
        if self._recorded_model is self.model and step >= self._last_recorded:
            return
        self.history = []
        self._last_recorded = -1
        for det in self.detectors.values():
            det.reset()
        self._recorded_model = self.model

    def _open_csv(self, step):
        """Prepare the CSV; on resume restore the detectors and dataset position from it.

        Returns the last recorded step (-1 when the file holds no snapshot).
        """
        groups = self._names + [TOTAL]
        identity = csv_identity(self.model, groups, self.by, self.seed, self.every_n_steps,
                                self.num_probes, self.rel_stderr, self.max_probes)
        with_detectors = bool(self.detectors)
        self._csv, rows = open_snapshot_csv(self.csv_path, csv_columns(with_detectors), identity,
                                            step, self.every_n_steps,
                                            older_csv_columns(with_detectors))
        self._epoch_at.update({int(r["step"]): float(r["epoch"]) for r in rows})
        if rows:
            replay_detectors(self.csv_path, rows, self.detectors, self._names)
            self._skip_batches = len({r["step"] for r in rows})
        return max((int(r["step"]) for r in rows), default=-1)

    # ------------------------------------------------------------------ hooks

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.close()  # whatever a fit that raised left open
        if self._csv_lock is not None:
            self._csv_lock.acquire()  # before any file is touched; LockedError names the holder
        try:
            self._begin()
        except BaseException:
            self.close()  # Keras calls no on_train_end: release the lock now
            raise

    def _begin(self):
        check_calibration_model(self.detector, self.model)
        names = resolve_groups(self.model, self.by, self.groups)
        if self._trace_options["max_batch_size"] is not None:
            check_mean_reduction(resolve_loss(self.model, self.loss), "max_batch_size")
        if self.detectors is None:
            self.detectors = resolve_detectors(self.detector, names, self.every_n_steps)
        self._names = names
        self._mixed_layers = mixed_precision_layers(self.model)
        # One read of the step counter per fit; afterwards the step is counted in Python.
        self._step = int(self.model.optimizer.iterations.numpy())
        self._start_fresh_if_new_run(self._step)
        # A dataset restarts at each fit: skip the batches of the snapshots already taken
        # (counted by this callback, or restored from the CSV below).
        self._skip_batches = len(self.history)
        if self.csv_path is not None:
            self._last_recorded = self._open_csv(self._step)
        self._batches.restart(self._skip_batches)  # fails now on an empty dataset
        self._epoch = None
        self._first_epoch = True
        self._fit_steps = []
        self._target_warned = False
        self._steps_per_epoch = (self.params or {}).get("steps") or None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._epoch_start_step = self._step
        self._mid_line = False
        if self._first_epoch:
            self._first_epoch = False
            check_overrun(self.detectors, self.params, epoch, self._step, self._last_recorded,
                          self.every_n_steps)
            if self._step % self.every_n_steps == 0:
                self._snapshot(self._step)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._mid_line = batch > 0 and (self.params or {}).get("verbose") == 1
        self._advance(self._epoch_start_step + batch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # One read per epoch: the step after the epoch's last execution.
        step = int(self.model.optimizer.iterations.numpy())
        if not self._steps_per_epoch and step > self._epoch_start_step:
            self._steps_per_epoch = step - self._epoch_start_step  # length unknown to Keras
        self._mid_line = (self.params or {}).get("verbose") == 1  # Keras ends the bar's line next
        self._advance(step, at_epoch_end=True)

    def _advance(self, step, at_epoch_end=False):
        previous, self._step = self._step, step
        if step // self.every_n_steps > previous // self.every_n_steps:
            self._snapshot(step, at_epoch_end)

    def on_train_end(self, logs: dict | None = None) -> None:
        try:
            if self.verbose and self.summary:
                last = group_values(self.history[-1]["result"], self._names) if self.history else None
                say(summary_text(self._fit_steps,
                                 None if last is None else {g: v for g, (v, _) in last.items()},
                                 self.detectors or {}, self._epoch_at.get, self.every_n_steps))
        finally:
            self.close()

    # --------------------------------------------------------------- snapshot

    def _snapshot(self, step, at_epoch_end=False):
        """Measure, score, record, then warn and alert: one snapshot at ``step``."""
        if step <= self._last_recorded:
            return  # already recorded (a resumed or continued fit)
        probe_seed = snapshot_seed(self.seed, step)
        result = self._traces(*self._batches.next(), probe_seed)
        wall = time.time()
        values = group_values(result, self._names)
        epoch = epochs_completed(self._epoch, step, self._epoch_start_step,
                                 self._steps_per_epoch, at_epoch_end)
        rows, alerts, bad = score_snapshot(self.detectors, step, epoch, values,
                                           result.num_probes, probe_seed, wall)
        self.history.append({"step": step, "epoch": epoch, "result": result})
        self._epoch_at[step] = epoch
        self._fit_steps.append(step)
        self._last_recorded = step
        self._record(step, rows, values)
        if not self._target_warned and result.missed_target and result.finite:
            self._target_warned = True
            warnings.warn(target_missed_text(step, epoch, result, self.max_probes), RuntimeWarning, stacklevel=3)
        if bad:
            self._warn_unusable(step, bad, result.loss)
        for g, r in alerts:
            self._alert(step, g, r)

    def _traces(self, x, y, probe_seed):
        return snapshot_traces(self.model, x, y, self._mixed_layers, self._float32_cache,
                               num_probes=self.num_probes, by=self.by, seed=probe_seed,
                               loss=self.loss, **self._trace_options,
                               **({} if self.rel_stderr is None else dict(
                                   rel_stderr=self.rel_stderr, max_probes=self.max_probes, groups=self._names)))

    def _record(self, step, rows, values):
        if self._csv is not None:
            self._csv.append(rows)
        if self._tensorboard is not None:
            self._tensorboard.write(step, {g: v for g, (v, _) in values.items()},
                                    self.detectors or {})

    def _warn_unusable(self, step, bad, loss):
        warnings.warn(unusable_text(step, self._epoch_at[step], bad, loss), RuntimeWarning,
                      stacklevel=3)

    def _alert(self, step, g, r):
        text = alert_text(g, step, self._epoch_at[step], r.statistic, self.detectors[g].threshold)
        if self._tensorboard is not None:
            self._tensorboard.write_alert(step, text)
        if self.verbose:
            say(text, mid_line=self._mid_line)
            self._mid_line = False
        if self.on_alert is not None:
            self.on_alert(self, g, step, r)
        if self.stop_on_alert:
            self.model.stop_training = True
