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

Mixed precision. For a model with a mixed policy (e.g. ``mixed_float16``: float32
variables, float16 compute), the snapshot switches every such layer to its variable dtype
while the curvature is computed, so the Hessian is float32 throughout, and switches it
back before returning. The float32 Hessian functions are traced once, at the first
snapshot, and kept by the callback (not in the model's operator cache, which keeps the
model's own-policy functions).

Resuming. The CSV is the detector's memory: at ``on_train_begin`` a callback pointed at
an existing CSV restores each detector (snapshot index = number of rows of its group,
g+ and g- from the last row, the first alert from the first row with alert = 1). Rows
past the step the fit resumes from (snapshots of a trajectory the restored checkpoint
discarded) are removed from the file, with a warning. With a ``tf.data.Dataset`` as
``data``, the dataset is advanced by the number of snapshots already recorded, so the
snapshot k uses the same batch as in an uninterrupted run.
"""

import contextlib
import csv
import logging
import math
import os
import time
import warnings

import numpy as np
import tensorflow as tf
import keras

from keras_hesstrace._validate import check_integer
from keras_hesstrace.groups import layer_groups
from keras_hesstrace.hvp import DEFAULT_MODE, _CACHE_ATTR, check_mode, resolve_loss
from keras_hesstrace.monitor.calibration import Calibration
from keras_hesstrace.monitor.detector import PageHinkley
from keras_hesstrace.trace import check_mean_reduction, layer_traces, resolve_data

TOTAL = "total"
_BASE_COLUMNS = ["step", "epoch", "group", "trace", "stderr", "num_probes", "probe_seed",
                 "wall_time", "status"]
_DETECTOR_COLUMNS = ["z", "g_pos", "g_neg", "alert"]
_NAN = float("nan")
_logger = logging.getLogger("keras_hesstrace")


def snapshot_seed(seed, step):
    """The probe seed of the snapshot at optimiser ``step``: distinct per snapshot."""
    return int(seed) * (2**32) + int(step)


def _say(message):
    """Print as Keras prints (stdout when interactive logging is on, else the logger)."""
    if keras.config.is_interactive_logging_enabled():
        print(message, flush=True)
    else:
        _logger.info(message)


def mixed_precision_layers(model):
    """The layers of ``model`` (itself and nested ones) whose compute dtype differs from
    their variable dtype, e.g. under the ``mixed_float16`` policy."""
    out = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer.dtype_policy, keras.dtype_policies.DTypePolicyMap):
            continue  # quantised per-path policies: left as they are
        if layer.compute_dtype != layer.variable_dtype:
            out.append(layer)
    return out


@contextlib.contextmanager
def float32_curvature(model, layers, cache):
    """Within the block, ``layers`` compute in their variable dtype and ``model``'s
    Hessian operators come from ``cache`` (a dict kept by the caller).

    Keras reads the dtype policy when a function is traced, not when it runs, so
    the operators traced here compute in float32 whatever the policy is later; the
    separate cache keeps them apart from the model's own mixed-precision operators.
    Policies and cache are restored on exit, also when the block raises.
    """
    saved_policies = [(layer, layer.dtype_policy) for layer in layers]
    saved_cache = model.__dict__.get(_CACHE_ATTR)
    object.__setattr__(model, _CACHE_ATTR, cache)
    try:
        for layer, policy in saved_policies:
            layer.dtype_policy = policy.variable_dtype
        yield
    finally:
        for layer, policy in saved_policies:
            layer.dtype_policy = policy
        if saved_cache is None:
            object.__delattr__(model, _CACHE_ATTR)
        else:
            object.__setattr__(model, _CACHE_ATTR, saved_cache)


class HessianTraceCallback(keras.callbacks.Callback):
    """Record layer-wise Hessian traces every ``every_n_steps`` optimiser steps.

    Args:
        data: a fixed ``(x, y)`` batch, or a ``tf.data.Dataset`` of ``(x, y)`` batches
            (the next batch at each snapshot, cycling when it ends).
        every_n_steps: optimiser steps between snapshots (>= 1).
        num_probes: Rademacher probes (HVPs) per snapshot (>= 1).
        groups: grouping passed to ``layer_traces`` (``"layer"``, ``"variable"``, ...).
        layers: names of the groups to record (default: all). The total trace over
            all trainable variables is always recorded too, as group ``"total"``.
        csv_path: tidy CSV, one row per (snapshot, group), flushed at every snapshot;
            a resumed fit appends to it and restores the detectors from it.
        log_dir: TensorBoard run directory (scalars under ``log_dir/train``, as
            ``keras.callbacks.TensorBoard`` writes them). Needs the ``tensorboard``
            package (without it TensorFlow writes no scalars and raises nothing).
        detector: None; a ``Calibration`` (one detector per calibrated group; refused
            if made for other groups or another ``every_n_steps``); a dict group ->
            ``PageHinkley``; or a ``PageHinkley`` when exactly one group is recorded.
            ``"total"`` can be a detector group.
        stop_on_alert: set ``model.stop_training`` at the first alert (Keras stops
            after the step in progress).
        on_alert: optional ``f(callback, group, step, result)`` called at each group's
            first alert.
        seed: base probe seed; the snapshot at step s uses ``snapshot_seed(seed, s)``.
        verbose: 1 prints alerts.
        loss: loss for the Hessian (default: the compiled loss).
        probes_per_call, max_batch_size, mode: passed to ``layer_traces`` (probes
            sharing one compiled call; the most examples per call, a larger ``data``
            batch being split into chunks averaged by size; the HVP mode). They
            change speed and memory, not the estimate.

    CSV columns: step, epoch, group, trace, stderr, num_probes, probe_seed, wall_time,
    status ("ok"; "nonfinite": the estimate was NaN/inf, written as NaN and skipped by
    the detector; "nonpositive": a value <= 0 that a ``transform="log"`` detector
    cannot take, kept in the CSV and skipped by the detector; "unreferenced": a value
    after a skipped reference snapshot, which a detector with a reference snapshot
    cannot score), then z, g_pos, g_neg, alert when a detector is set (empty for groups
    without one; z is NaN at the snapshots up to a detector's reference snapshot).

    Example:
        >>> cb = HessianTraceCallback((x[:256], y[:256]), every_n_steps=50,
        ...                           csv_path="traces.csv", log_dir="logs")
        >>> model.fit(x, y, epochs=5, callbacks=[cb])           # doctest: +SKIP
        >>> pandas.read_csv("traces.csv")                       # doctest: +SKIP
    """

    def __init__(self, data, every_n_steps=100, num_probes=10, groups="layer", layers=None,
                 csv_path=None, log_dir=None, detector=None, stop_on_alert=False,
                 on_alert=None, seed=0, verbose=1, loss=None, probes_per_call=1,
                 max_batch_size=None, mode=DEFAULT_MODE):
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("num_probes", num_probes),
                            ("probes_per_call", probes_per_call)):
            check_integer(name, value)
        check_integer("max_batch_size", max_batch_size, none="no chunking")
        check_mode(mode)
        if isinstance(data, tf.data.Dataset):
            if data.cardinality() == 0:
                raise ValueError("data is an empty tf.data.Dataset.")
        else:
            # The estimators' own rule for "one batch" (trace.resolve_data), so that what
            # layer_traces(model, data) reads as one batch is one batch here too.
            try:
                one_batch = not resolve_data(data, None, caller="layer_traces")[2]
            except ValueError:
                one_batch = False
            if not one_batch:
                raise ValueError(
                    f"data must be ONE fixed batch, the tuple (x, y), or a tf.data.Dataset of (x, y) "
                    f"batches (a new batch at each snapshot); got a {type(data).__name__}"
                    + (f" of {len(data)} elements" if isinstance(data, (tuple, list)) else "")
                    + ". Several batches: tf.data.Dataset.from_tensor_slices((x, y)).batch(B)."
                )
        if csv_path is not None:
            csv_path = os.fspath(csv_path)
            parent = os.path.dirname(os.path.abspath(csv_path))
            if not os.path.isdir(parent):
                raise ValueError(f"csv_path {csv_path!r}: directory {parent!r} does not exist.")
            target = csv_path if os.path.exists(csv_path) else parent
            if not os.access(target, os.W_OK) or os.path.isdir(csv_path):
                raise ValueError(f"csv_path {csv_path!r} is not writable.")
        if log_dir is not None:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ImportError(
                    "log_dir needs the tensorboard package (pip install tensorboard): "
                    "without it TensorFlow silently writes no scalars."
                ) from None
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
        self._trace_options = dict(probes_per_call=probes_per_call, max_batch_size=max_batch_size,
                                   mode=mode)
        self.detectors = None
        self.history = []  # one dict per snapshot: step, epoch, TraceResult
        self._iterator = None
        self._skip_batches = 0
        self._writer = None
        self._csv_file = None
        self._last_recorded = -1
        self._float32_cache = {}  # Hessian operators traced in float32 (mixed precision)
        self._mixed_layers = []

    # ------------------------------------------------------------------ setup

    def _resolve_groups(self):
        names = list(layer_groups(self.model, by=self.groups))
        if TOTAL in names:
            raise ValueError(
                f"A group is named {TOTAL!r}, the name the callback gives the total trace; "
                "rename the layer or use a grouping that avoids the name."
            )
        if self.layers is None:
            return names
        missing = [g for g in self.layers if g not in names]
        if missing:
            raise ValueError(f"layers {missing} are not groups of the model; groups: {names}.")
        return list(self.layers)

    def _resolve_detectors(self, names):
        det = self.detector
        recordable = names + [TOTAL]
        if det is None:
            return {}
        if isinstance(det, Calibration):
            det.check_compatible(recordable, self.every_n_steps)
            return det.detectors()
        if isinstance(det, PageHinkley):
            if len(names) != 1:
                raise ValueError(
                    f"A single PageHinkley needs exactly one recorded group, got {names}; "
                    "pass layers=[...] or a dict group -> PageHinkley."
                )
            return {names[0]: det}
        unknown = [g for g in det if g not in recordable]
        if unknown:
            raise ValueError(f"detector groups {unknown} are not recorded; recorded: "
                             f"{recordable}.")
        return dict(det)

    def _next_batch(self):
        if not isinstance(self.data, tf.data.Dataset):
            return self.data
        for attempt in range(2):
            if self._iterator is None:
                data = self.data
                if self._skip_batches:  # line up with the snapshots already recorded
                    card = int(data.cardinality())
                    skip = self._skip_batches % card if card > 0 else self._skip_batches
                    data = data.skip(skip)
                    self._skip_batches = 0
                self._iterator = iter(data)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                continue
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError("data must yield (x, y) batches.")
            return batch
        raise ValueError("data (tf.data.Dataset) yielded no batch.")

    def _columns(self):
        return _BASE_COLUMNS + (_DETECTOR_COLUMNS if self.detectors else [])

    def _open_csv(self, step):
        """Open the CSV for appending; on resume restore the detectors from it.

        Returns the last recorded step (-1 for a new file).
        """
        columns = self._columns()
        rows = []
        if os.path.exists(self.csv_path) and os.path.getsize(self.csv_path) > 0:
            with open(self.csv_path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader)
                if header != columns:
                    raise ValueError(
                        f"{self.csv_path!r} has columns {header}, this callback writes "
                        f"{columns}: use another csv_path."
                    )
                rows = [dict(zip(columns, row)) for row in reader if row]
            later = [r for r in rows if int(r["step"]) > step]
            if later:
                rows = [r for r in rows if int(r["step"]) <= step]
                warnings.warn(
                    f"{self.csv_path!r} holds snapshots up to step "
                    f"{max(int(r['step']) for r in later)} but the fit resumes from step "
                    f"{step}: removing the {len(later)} rows after step {step} (a trajectory "
                    "the restored checkpoint discarded).",
                    stacklevel=3,
                )
                tmp = self.csv_path + ".tmp"
                with open(tmp, "w", newline="") as f:
                    writer = csv.writer(f)
                    writer.writerow(columns)
                    writer.writerows([r[c] for c in columns] for r in rows)
                os.replace(tmp, self.csv_path)
            self._restore(rows)
        new = not rows and not (os.path.exists(self.csv_path)
                                and os.path.getsize(self.csv_path) > 0)
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv_writer = csv.writer(self._csv_file)
        if new:
            self._csv_writer.writerow(columns)
            self._csv_file.flush()
        return max((int(r["step"]) for r in rows), default=-1)

    def _restore(self, rows):
        """Detector state and dataset position from the CSV rows of earlier fits."""
        if not rows:
            return
        expected = set(self._names) | {TOTAL}
        found = {r["group"] for r in rows}
        if found != expected:
            raise ValueError(
                f"{self.csv_path!r} records groups {sorted(found)}, this callback records "
                f"{sorted(expected)}: use another csv_path, or the same groups/layers."
            )
        self._skip_batches = len({r["step"] for r in rows})
        for g, det in self.detectors.items():
            mine = [r for r in rows if r["group"] == g]
            if any(r["g_pos"].strip() in ("", "nan") for r in mine):
                raise ValueError(
                    f"{self.csv_path!r} has rows of group {g!r} written without a detector "
                    "on it, so its detector cannot be restored: use another csv_path."
                )
            # Replay the recorded values: restores g+, g-, the first alert and a
            # reference snapshot's value exactly (the CSV holds the floats' repr).
            det.reset()
            replayed, problem = [], None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an overrun="hold" warning was given then
                for r in mine:
                    step = int(r["step"])
                    try:
                        if r["status"] == "ok":
                            det.update(float(r["trace"]), step=step)
                        else:
                            det.skip(step, float(r["trace"]))
                    except ValueError as e:
                        problem = f"at step {step} this detector refuses the recorded value ({e})"
                        break
                    replayed.append((det.g_pos, det.g_neg))
            if problem is None:
                recorded = np.array([(float(r["g_pos"]), float(r["g_neg"])) for r in mine])
                close = np.all(np.isclose(np.array(replayed), recorded, rtol=1e-9, atol=1e-12),
                               axis=1)
                if not close.all():
                    i = int(np.argmin(close))
                    problem = (f"at step {mine[i]['step']} replaying gives g+, g- = "
                               f"{replayed[i][0]:.6g}, {replayed[i][1]:.6g}, the CSV says "
                               f"{recorded[i][0]:.6g}, {recorded[i][1]:.6g}")
            if problem is not None:
                raise ValueError(
                    f"{self.csv_path!r}: group {g!r}'s rows were written with another "
                    f"detector (calibration): {problem}. Use another csv_path, or the same "
                    "detector."
                )

    def _check_overrun(self, epoch):
        """Raise before the first step when the fit will outrun a detector's baseline."""
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        if not steps or not epochs:
            return
        last = self._step + (int(epochs) - int(epoch)) * int(steps)
        n = self.every_n_steps
        future = last // n - self._step // n
        if self._step % n == 0 and self._step > self._last_recorded:
            future += 1
        for g, det in self.detectors.items():
            if det.baseline is None or det.overrun != "error":
                continue
            final = det.n_updates + future - 1
            if final >= len(det.baseline):
                raise ValueError(
                    f"This fit runs to step {last}, snapshot {final} of group {g!r}, past "
                    f"its detector's baseline (snapshots 0..{len(det.baseline) - 1}, every "
                    f"{n} steps, up to step {(len(det.baseline) - 1) * n}). Calibrate on "
                    "longer clean runs, fit fewer epochs, or build the detector with "
                    "overrun='hold' (e.g. Calibration.detectors(overrun='hold'))."
                )

    def on_train_begin(self, logs=None):
        names = self._resolve_groups()
        if self._trace_options["max_batch_size"] is not None:
            check_mean_reduction(resolve_loss(self.model, self.loss), "max_batch_size")
        if self.detectors is None:
            self.detectors = self._resolve_detectors(names)
        self._names = names
        self._mixed_layers = mixed_precision_layers(self.model)
        # One read of the step counter per fit; afterwards the step is counted in Python.
        self._step = int(self.model.optimizer.iterations.numpy())
        # A dataset restarts at each fit: skip the batches of the snapshots already taken
        # (counted by this callback, or restored from the CSV below).
        self._skip_batches = len(self.history)
        if self.csv_path is not None:
            self._last_recorded = self._open_csv(self._step)
        if self.log_dir is not None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        if isinstance(self.data, tf.data.Dataset):
            self._next_batch_cache = self._next_batch()  # fails now on an empty dataset
        self._epoch = None
        self._first_epoch = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start_step = self._step
        if self._first_epoch:
            self._first_epoch = False
            self._check_overrun(epoch)
            if self._step % self.every_n_steps == 0:
                self._snapshot(self._step)

    def on_train_batch_begin(self, batch, logs=None):
        self._advance(self._epoch_start_step + batch)

    def on_epoch_end(self, epoch, logs=None):
        # One read per epoch: the step after the epoch's last execution.
        self._advance(int(self.model.optimizer.iterations.numpy()))

    def _advance(self, step):
        previous, self._step = self._step, step
        if step // self.every_n_steps > previous // self.every_n_steps:
            self._snapshot(step)

    def on_train_end(self, logs=None):
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._iterator = None

    # --------------------------------------------------------------- snapshot

    def _traces(self, x, y, probe_seed):
        with warnings.catch_warnings():
            # A non-finite estimate is reported once, by _snapshot, with the step.
            warnings.filterwarnings("ignore", message="Non-finite Hessian trace",
                                    category=RuntimeWarning)
            if not self._mixed_layers:
                return layer_traces(self.model, x, y, num_probes=self.num_probes,
                                    groups=self.groups, seed=probe_seed, loss=self.loss,
                                    verbose=0, **self._trace_options)
            with float32_curvature(self.model, self._mixed_layers, self._float32_cache):
                return layer_traces(self.model, x, y, num_probes=self.num_probes,
                                    groups=self.groups, seed=probe_seed, loss=self.loss,
                                    verbose=0, **self._trace_options)

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
        result = self._traces(x, y, probe_seed)
        wall = time.time()
        values = {g: (float(result.trace[result.groups.index(g)]),
                      float(result.stderr[result.groups.index(g)])) for g in self._names}
        values[TOTAL] = (result.total, result.total_stderr)
        rows, alerts, bad = [], [], []
        for g in self._names + [TOTAL]:
            value, err = values[g]
            status = "ok" if math.isfinite(value) else "nonfinite"
            if status != "ok":
                value, err = _NAN, _NAN
                bad.append(g)
            row = [step, self._epoch, g, value, err, self.num_probes, probe_seed, wall]
            extra = []
            if self.detectors:
                det = self.detectors.get(g)
                if det is None:
                    extra = ["", "", "", ""]
                else:
                    if status == "ok" and not det.usable(value):
                        status = "unreferenced" if det.reference_missing else "nonpositive"
                        bad.append(g)
                    r = det.update(value, step=step) if status == "ok" else det.skip(step, value)
                    extra = [r.z, r.g_pos, r.g_neg, int(r.alert)]
                    if r.first_alert:
                        alerts.append((g, r))
            rows.append(row + [status] + extra)
        self.history.append({"step": step, "epoch": self._epoch, "result": result})
        self._last_recorded = step
        if self._csv_file is not None:
            self._csv_writer.writerows(rows)
            self._csv_file.flush()
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for g in self._names + [TOTAL]:
                    if math.isfinite(values[g][0]):
                        tf.summary.scalar(f"hessian_trace/{g}", values[g][0])
                for g, det in (self.detectors or {}).items():
                    tf.summary.scalar(f"hessian_trace_detector/{g}", det.statistic)
                    tf.summary.scalar(f"hessian_trace_alert/{g}", float(det.alerted))
            self._writer.flush()
        if bad:
            warnings.warn(
                f"HessianTraceCallback: step {step} (epoch {self._epoch}): unusable trace "
                f"for group(s) {bad} (loss {result.loss:.4g}); written with status "
                "'nonfinite' (trace NaN), 'nonpositive' or 'unreferenced' (after a skipped "
                "reference snapshot), and skipped by the detector (snapshot index "
                "advanced, g+ and g- unchanged).",
                RuntimeWarning,
                stacklevel=2,
            )
        for g, r in alerts:
            if self.verbose:
                _say(
                    f"\nHessianTraceCallback: alert on group {g!r} at step {step} "
                    f"(epoch {self._epoch}): statistic {r.statistic:.3f} > "
                    f"{self.detectors[g].threshold:.3f}."
                )
            if self.on_alert is not None:
                self.on_alert(self, g, step, r)
            if self.stop_on_alert:
                self.model.stop_training = True
