"""HessianTraceCallback: layer-wise Hessian traces during ``model.fit``, to CSV and TensorBoard.

Snapshots are taken at the optimiser step the fit starts from (when it is a multiple of
``every_n_steps``, e.g. step 0) and whenever the step crosses a multiple of
``every_n_steps``; with ``steps_per_execution > 1`` the hook runs once per execution
and the crossing is detected on the step count, not on a batch counter. Between
snapshots the hook does integer arithmetic only.
"""

import csv
import os
import time

import numpy as np
import tensorflow as tf
import keras
from keras.src.utils import io_utils

from keras_hesstrace.groups import layer_groups
from keras_hesstrace.monitor.calibration import Calibration
from keras_hesstrace.monitor.detector import PageHinkley
from keras_hesstrace.trace import layer_traces

_BASE_COLUMNS = ["step", "epoch", "group", "trace", "stderr", "num_probes", "probe_seed",
                 "wall_time"]
_DETECTOR_COLUMNS = ["z", "g_pos", "g_neg", "alert"]


def snapshot_seed(seed, step):
    """The probe seed of the snapshot at optimiser ``step``: distinct per snapshot."""
    return int(seed) * (2**32) + int(step)


class HessianTraceCallback(keras.callbacks.Callback):
    """Record layer-wise Hessian traces every ``every_n_steps`` optimiser steps.

    Args:
        data: a fixed ``(x, y)`` batch, or a ``tf.data.Dataset`` of ``(x, y)`` batches
            (the next batch at each snapshot, cycling when it ends).
        every_n_steps: optimiser steps between snapshots (>= 1).
        num_probes: Rademacher probes (HVPs) per snapshot (>= 1).
        groups: grouping passed to ``layer_traces`` (``"layer"``, ``"variable"``, ...).
        layers: names of the groups to record (default: all).
        csv_path: tidy CSV, one row per (snapshot, group); appended to on resume.
        log_dir: TensorBoard run directory (scalars under ``log_dir/train``, as
            ``keras.callbacks.TensorBoard`` writes them).
        detector: None; a ``Calibration`` (one detector per calibrated group; refused
            if made for other groups or another ``every_n_steps``); a dict group ->
            ``PageHinkley``; or a ``PageHinkley`` when exactly one group is recorded.
        stop_on_alert: set ``model.stop_training`` at the first alert.
        on_alert: optional ``f(callback, group, step, result)`` called at each group's
            first alert.
        seed: base probe seed; the snapshot at step s uses ``snapshot_seed(seed, s)``.
        verbose: 1 prints alerts.
        loss: loss for the Hessian (default: the compiled loss).

    Example:
        >>> cb = HessianTraceCallback((x[:256], y[:256]), every_n_steps=50,
        ...                           csv_path="traces.csv", log_dir="logs")
        >>> model.fit(x, y, epochs=5, callbacks=[cb])           # doctest: +SKIP
        >>> pandas.read_csv("traces.csv")                       # doctest: +SKIP
    """

    def __init__(self, data, every_n_steps=100, num_probes=10, groups="layer", layers=None,
                 csv_path=None, log_dir=None, detector=None, stop_on_alert=False,
                 on_alert=None, seed=0, verbose=1, loss=None):
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("num_probes", num_probes)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if isinstance(data, tf.data.Dataset):
            if data.cardinality() == 0:
                raise ValueError("data is an empty tf.data.Dataset.")
        elif not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise ValueError("data must be an (x, y) batch or a tf.data.Dataset of (x, y).")
        if csv_path is not None:
            csv_path = os.fspath(csv_path)
            parent = os.path.dirname(os.path.abspath(csv_path))
            if not os.path.isdir(parent):
                raise ValueError(f"csv_path {csv_path!r}: directory {parent!r} does not exist.")
            target = csv_path if os.path.exists(csv_path) else parent
            if not os.access(target, os.W_OK) or os.path.isdir(csv_path):
                raise ValueError(f"csv_path {csv_path!r} is not writable.")
        if detector is not None and not isinstance(detector, (Calibration, PageHinkley, dict)):
            raise TypeError("detector must be None, a Calibration, a PageHinkley, or a dict "
                            "group -> PageHinkley.")
        if on_alert is not None and not callable(on_alert):
            raise TypeError("on_alert must be callable.")
        self.data = data
        self.every_n_steps = int(every_n_steps)
        self.num_probes = int(num_probes)
        self.groups = groups
        self.layers = None if layers is None else list(layers)
        self.csv_path = csv_path
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.detector = detector
        self.stop_on_alert = bool(stop_on_alert)
        self.on_alert = on_alert
        self.seed = int(seed)
        self.verbose = verbose
        self.loss = loss
        self.detectors = None
        self.history = []  # one dict per snapshot: step, epoch, TraceResult
        self._iterator = None
        self._writer = None
        self._csv_file = None
        self._last_recorded = -1

    # ------------------------------------------------------------------ setup

    def _resolve_groups(self):
        names = list(layer_groups(self.model, by=self.groups))
        if self.layers is None:
            return names
        missing = [g for g in self.layers if g not in names]
        if missing:
            raise ValueError(f"layers {missing} are not groups of the model; groups: {names}.")
        return list(self.layers)

    def _resolve_detectors(self, names):
        det = self.detector
        if det is None:
            return {}
        if isinstance(det, Calibration):
            det.check_compatible(names, self.every_n_steps)
            return det.detectors()
        if isinstance(det, PageHinkley):
            if len(names) != 1:
                raise ValueError(
                    f"A single PageHinkley needs exactly one recorded group, got {names}; "
                    "pass layers=[...] or a dict group -> PageHinkley."
                )
            return {names[0]: det}
        unknown = [g for g in det if g not in names]
        if unknown:
            raise ValueError(f"detector groups {unknown} are not recorded; recorded: {names}.")
        return dict(det)

    def _next_batch(self):
        if not isinstance(self.data, tf.data.Dataset):
            return self.data
        for attempt in range(2):
            if self._iterator is None:
                self._iterator = iter(self.data)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                continue
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError("data must yield (x, y) batches.")
            return batch
        raise ValueError("data (tf.data.Dataset) yielded no batch.")

    def _open_csv(self):
        columns = _BASE_COLUMNS + (_DETECTOR_COLUMNS if self.detectors else [])
        last = -1
        if os.path.exists(self.csv_path) and os.path.getsize(self.csv_path) > 0:
            with open(self.csv_path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader)
                if header != columns:
                    raise ValueError(
                        f"{self.csv_path!r} has columns {header}, this callback writes "
                        f"{columns}: use another csv_path."
                    )
                for row in reader:
                    if row:
                        last = max(last, int(row[0]))
            new = False
        else:
            new = True
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv_writer = csv.writer(self._csv_file)
        if new:
            self._csv_writer.writerow(columns)
            self._csv_file.flush()
        return last

    def on_train_begin(self, logs=None):
        names = self._resolve_groups()
        if self.detectors is None:
            self.detectors = self._resolve_detectors(names)
        self._names = names
        self._last_recorded = max(self._last_recorded, -1)
        if self.csv_path is not None:
            self._last_recorded = max(self._last_recorded, self._open_csv())
        if self.log_dir is not None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        if isinstance(self.data, tf.data.Dataset):
            self._next_batch_cache = self._next_batch()  # fails now on an empty dataset
        # One read of the step counter per fit; afterwards the step is counted in Python.
        self._step = int(self.model.optimizer.iterations.numpy())
        self._epoch = 0
        if self._step % self.every_n_steps == 0:
            self._snapshot(self._step)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start_step = self._step

    def on_train_batch_end(self, batch, logs=None):
        previous = self._step
        self._step = self._epoch_start_step + batch + 1
        if self._step // self.every_n_steps > previous // self.every_n_steps:
            self._snapshot(self._step)

    def on_train_end(self, logs=None):
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._iterator = None

    # --------------------------------------------------------------- snapshot

    def _snapshot(self, step):
        if step <= self._last_recorded:
            return  # already in the CSV (a resumed fit)
        cached = getattr(self, "_next_batch_cache", None)
        if cached is not None:
            x, y = cached
            self._next_batch_cache = None
        else:
            x, y = self._next_batch()
        probe_seed = snapshot_seed(self.seed, step)
        result = layer_traces(self.model, x, y, num_probes=self.num_probes, groups=self.groups,
                              seed=probe_seed, loss=self.loss, verbose=0)
        wall = time.time()
        trace, stderr = result.trace, result.stderr
        rows, alerts = [], []
        for g in self._names:
            i = result.groups.index(g)
            row = [step, self._epoch, g, float(trace[i]), float(stderr[i]), self.num_probes,
                   probe_seed, wall]
            if self.detectors:
                det = self.detectors.get(g)
                if det is None or not np.isfinite(trace[i]):
                    row += ["", "", "", ""]
                else:
                    r = det.update(float(trace[i]), step=step)
                    row += [r.z, r.g_pos, r.g_neg, int(r.alert)]
                    if r.first_alert:
                        alerts.append((g, r))
            rows.append(row)
        self.history.append({"step": step, "epoch": self._epoch, "result": result})
        self._last_recorded = step
        if self._csv_file is not None:
            self._csv_writer.writerows(rows)
            self._csv_file.flush()
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for g in self._names:
                    tf.summary.scalar(f"hessian_trace/{g}", float(trace[result.groups.index(g)]))
                tf.summary.scalar("hessian_trace/total", result.total)
                for g, det in (self.detectors or {}).items():
                    tf.summary.scalar(f"hessian_trace_detector/{g}", det.statistic)
                    tf.summary.scalar(f"hessian_trace_alert/{g}", float(det.alerted))
            self._writer.flush()
        for g, r in alerts:
            if self.verbose:
                io_utils.print_msg(
                    f"\nHessianTraceCallback: alert on group {g!r} at step {step} "
                    f"(epoch {self._epoch}): statistic {r.statistic:.3f} > "
                    f"{self.detectors[g].threshold:.3f}."
                )
            if self.on_alert is not None:
                self.on_alert(self, g, step, r)
            if self.stop_on_alert:
                self.model.stop_training = True
