"""The memorisation experiment (docs/method.md §8, the method paper's §5) as a resumable runner.

For every cell (architecture x dataset) of the config:

* Phase I: ``calibration_runs`` clean runs (eta = 0) record the layer-wise traces every
  ``every_n_steps`` optimiser steps with :class:`HessianTraceCallback` on a fixed batch of
  ``probe_batch_size`` training examples (their labels as trained on); the monitored
  groups' trajectories give the baseline and the calibrated threshold h
  (:func:`calibrate_threshold`: leave-one-out z, whole runs resampled so that their
  autocorrelation is kept; with ``reference_snapshot`` each run is scored by its change
  since its own snapshot r), saved to ``<cell>/calibration.json``.
* Phase II: ``noisy_runs`` runs at every rate in ``noise_rates`` and
  ``heldout_clean_runs`` clean runs that were not used for calibration (the false-alarm
  estimate). Each trajectory is run through the calibrated Page-Hinkley rule (the same
  recursion the callback runs online; done here from the CSV so that a resumed run and
  an uninterrupted one are scored identically).
* Summary: ``summary.csv`` / ``summary.md`` (Table 1 of the paper: detection epoch mean
  +- sd, alert rate with its Wilson interval, h, Cohen's d with a bootstrap interval,
  clean test accuracy), ``detections.csv`` (one row per run and group) and PNG plots.

Layout of ``out``::

    config.json                         the resolved config (a rerun must match it)
    <arch>-<dataset>/runs/<run_id>/traces.csv     the callback's trajectory CSV
    <arch>-<dataset>/runs/<run_id>/result.json    written last, by atomic rename: "done"
    <arch>-<dataset>/runs/<run_id>/checkpoint.npz  weights + optimiser state, each epoch
    <arch>-<dataset>/calibration.json
    summary.csv, summary.md, detections.csv, plots/*.png

Resuming: a run with ``result.json`` is never redone. A run without it restarts from its
last epoch checkpoint (weights, optimiser slots and step counter, all written by one
atomic rename), its CSV cut back to the checkpoint's step, so nothing a killed process
half-wrote is ever read; the per-epoch data order and the probe seeds are functions of
(seed, epoch) and (seed, step), so a resumed run repeats what an uninterrupted one does.
"""

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from keras_hesstrace._validate import check_integer

ROLES = ("calibration", "clean", "noisy")
ARCHS = ("small_cnn", "resnet18", "resnet34", "vgg11")
DATASETS = ("digits", "cifar10", "cifar100")
_DATASET_SIZES = {"digits": 1400, "cifar10": 50000, "cifar100": 50000}


# --------------------------------------------------------------------------- config


@dataclass
class ExperimentConfig:
    """Settings of the memorisation experiment (every field is a CLI flag ``--field-name``).

    Attributes:
        name: a label for the outputs.
        archs: architectures (``small_cnn``, ``resnet18``, ``resnet34``, ``vgg11``).
        datasets: ``digits`` (bundled, offline), ``cifar10``, ``cifar100`` (prepared
            tensorflow-datasets directory ``data_dir``; never downloaded).
        noise_rates: the noisy rates eta > 0 of Phase II (eta = 0 is the clean row).
        calibration_runs: Phase I clean runs per cell (>= 3: leave-one-out needs it).
        heldout_clean_runs: Phase II clean runs per cell (the false-alarm estimate).
        noisy_runs: seeds per noisy rate and cell.
        epochs, batch_size, learning_rate, momentum, weight_decay: SGD training;
            ``weight_decay`` is the L2 coefficient lambda (gradient lambda * W).
        schedule: ``"cosine"`` (decay to 0 over the run) or ``"constant"``.
        augment: random crop (pad 4) + horizontal flip, redrawn per epoch (CIFAR only).
        every_n_steps: K, optimiser steps between trace snapshots.
        num_probes: M, Rademacher probes per snapshot.
        probe_batch_size: the fixed batch of training examples the traces are taken on.
        probe_batch_seed: which examples: the same ones in every run (chosen with this
            seed; their labels are each run's, noisy where corrupted), or None for a
            different batch per run (seeded by the run's seed). A batch per run adds a
            persistent run-level offset to the trace that the per-snapshot baseline
            cannot absorb, and false alarms rise (docs/memorisation.md).
        groups: grouping of the parameters (``"layer"``: one group per layer).
        monitor: the groups the alert rule watches (the paper: the classifier ``head``;
            ``"total"`` is the whole model's trace, which the callback always records).
        transform: ``"log"`` (standardise log(trace); the trace spans decades) or None.
        reference_snapshot: None (docs/method.md §7: each snapshot against the clean
            baseline), or a snapshot index r: each run is scored by its change since
            its own snapshot r, T(x_t) - T(x_r) for t > r (``calibrate_threshold``).
        log_floor: with ``"log"``: trace estimates below it are raised to it before the
            rule sees them (a single-pass estimate of a small trace can come out <= 0;
            with weight decay lambda the head's true trace is >= lambda * its parameter
            count, so a floor well below that only touches probe noise). None: a value
            <= 0 is an error in calibration and ends the rule in Phase II.
        target_arl0: in-control average run length, in snapshots, h is calibrated to.
        delta: Page-Hinkley allowance.
        effect_window: [first, last] epoch (fractional, inclusive) averaged for Cohen's
            d; None: the second half of training.
        train_examples: use only this many training examples (None: all); for tests.
        data_dir: tensorflow-datasets directory holding prepared CIFAR.
        tensorboard: also write each run's traces as TensorBoard scalars.
        seed_offset: added to every seed (a second, independent replicate of the grid).
        n_resamples: resampled sequences of the threshold calibration.
    """

    name: str = "custom"
    archs: List[str] = field(default_factory=lambda: ["small_cnn"])
    datasets: List[str] = field(default_factory=lambda: ["digits"])
    noise_rates: List[float] = field(default_factory=lambda: [0.2, 0.4, 0.6])
    calibration_runs: int = 8
    heldout_clean_runs: int = 8
    noisy_runs: int = 5
    epochs: int = 16
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"
    augment: bool = False
    every_n_steps: int = 22
    num_probes: int = 10
    probe_batch_size: int = 256
    probe_batch_seed: Optional[int] = 0
    groups: str = "layer"
    monitor: List[str] = field(default_factory=lambda: ["head"])
    transform: Optional[str] = "log"
    reference_snapshot: Optional[int] = None
    log_floor: Optional[float] = None
    target_arl0: float = 300.0
    delta: float = 0.5
    effect_window: Optional[List[float]] = None
    train_examples: Optional[int] = None
    data_dir: Optional[str] = None
    tensorboard: bool = False
    seed_offset: int = 0
    n_resamples: int = 4000

    def validate(self):
        """Raise ``ValueError`` naming the first bad setting; return self."""
        for a in self.archs:
            if a not in ARCHS:
                raise ValueError(f"unknown arch {a!r}; choose from {ARCHS}.")
        for d in self.datasets:
            if d not in DATASETS:
                raise ValueError(f"unknown dataset {d!r}; choose from {DATASETS}.")
        if not self.archs or not self.datasets:
            raise ValueError("archs and datasets must not be empty.")
        for r in self.noise_rates:
            if not 0.0 < float(r) < 1.0:
                raise ValueError(f"noise_rates are the noisy rates, each in (0, 1); got {r!r} "
                                 "(eta = 0 is the clean row, run by calibration/heldout runs).")
        if self.calibration_runs < 3:
            raise ValueError(f"calibration_runs must be >= 3 (leave-one-out), got "
                             f"{self.calibration_runs}.")
        for name in ("heldout_clean_runs", "noisy_runs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0.")
        for name in ("epochs", "batch_size", "every_n_steps", "num_probes", "probe_batch_size"):
            check_integer(name, getattr(self, name))
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}.")
        if self.transform not in (None, "log"):
            raise ValueError(f"transform must be None or 'log', got {self.transform!r}.")
        if not self.monitor:
            raise ValueError("monitor must name at least one group (e.g. ['head']).")
        if self.reference_snapshot is not None:
            from keras_hesstrace.monitor.detector import check_reference

            check_reference(self.reference_snapshot, "reference_snapshot")
            per_run = min((self.epochs * steps_per_epoch(self, d)) // self.every_n_steps + 1
                          for d in self.datasets)
            if self.reference_snapshot > per_run - 2:
                raise ValueError(
                    f"reference_snapshot={self.reference_snapshot} leaves nothing to score: "
                    f"a run has about {per_run} snapshots (every {self.every_n_steps} steps).")
        if self.augment and "digits" in self.datasets:
            raise ValueError("augment is the CIFAR crop+flip; it makes no sense for 8x8 digits.")
        if self.effect_window is not None and len(self.effect_window) != 2:
            raise ValueError("effect_window is [first_epoch, last_epoch].")
        if self.log_floor is not None and not self.log_floor > 0:
            raise ValueError(f"log_floor must be > 0 or None, got {self.log_floor!r}.")
        if self.train_examples is not None and self.train_examples < self.probe_batch_size:
            raise ValueError("train_examples must be >= probe_batch_size.")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(names)}.")
        return cls(**d)

    @classmethod
    def from_file(cls, path):
        """A JSON file holding some or all fields (the rest keep their defaults), or
        ``{"preset": name, ...overrides}``."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if "preset" in d:
            d = dict(d)
            return preset(d.pop("preset"), **d)
        return cls.from_dict(d)

    def window(self):
        if self.effect_window is not None:
            return float(self.effect_window[0]), float(self.effect_window[1])
        return self.epochs / 2.0, float(self.epochs)


PRESETS = {
    # Digits + small CNN, sized to finish within 30 minutes on 2 CPU cores (33 runs of
    # 16 epochs x 44 steps, 33 snapshots of M = 10 probes each). 10 calibration runs:
    # with 8 the leave-one-out z are heavy-tailed (7 runs per baseline sd) and h large.
    # See docs/memorisation.md.
    "cpu-small": dict(
        name="cpu-small", archs=["small_cnn"], datasets=["digits"],
        noise_rates=[0.2, 0.4, 0.6], calibration_runs=10, heldout_clean_runs=8,
        noisy_runs=5, epochs=16, batch_size=32, learning_rate=0.05, momentum=0.9,
        weight_decay=5e-4, schedule="constant", every_n_steps=22, num_probes=10,
        probe_batch_size=256, target_arl0=300.0, log_floor=0.05,
        # The whole model's trace, each run relative to its own value at epoch 1
        # (snapshot 2): on the digits a noisy run's trace first dips below the clean
        # runs' the more the higher eta, which delays the absolute rule's alerts at high
        # eta; referencing each run to itself removes the dip (docs/memorisation.md).
        monitor=["total"], reference_snapshot=2,
    ),
    # The paper's grid (docs/method.md §8): for a GPU machine with CIFAR prepared.
    # 391 steps/epoch x 60 epochs / K=100 -> 235 snapshots; target ARL0 2000 snapshots
    # gives an expected false-alarm probability of 1 - (1 - 1/2000)^235 = 0.11 per run.
    "paper": dict(
        name="paper", archs=["resnet18", "resnet34", "vgg11"], datasets=["cifar10", "cifar100"],
        noise_rates=[0.2, 0.4, 0.6], calibration_runs=10, heldout_clean_runs=10,
        noisy_runs=10, epochs=60, batch_size=128, learning_rate=0.1, momentum=0.9,
        weight_decay=5e-4, schedule="cosine", every_n_steps=100, num_probes=10,
        probe_batch_size=256, target_arl0=2000.0,
    ),
    # Seconds: for tests and a smoke check of an installation.
    "tiny": dict(
        name="tiny", archs=["small_cnn"], datasets=["digits"], noise_rates=[0.6],
        calibration_runs=3, heldout_clean_runs=1, noisy_runs=1, epochs=2, batch_size=32,
        every_n_steps=4, num_probes=2, probe_batch_size=32, train_examples=256,
        target_arl0=20.0, n_resamples=500, log_floor=0.05,
        # M = 2 probes on 32 images: several runs' step-0 estimates fall below the floor;
        # on one shared batch they would tie at the floor (zero spread): one batch per run.
        probe_batch_seed=None,
    ),
}


def preset(name, **overrides):
    """The named preset (``cpu-small``, ``paper``, ``tiny``) with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}.")
    d = dict(PRESETS[name])
    d.update(overrides)
    return ExperimentConfig.from_dict(d).validate()


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    arch: str
    dataset: str
    role: str  # "calibration" | "clean" | "noisy"
    noise_rate: float
    seed: int

    @property
    def cell(self):
        return f"{self.arch}-{self.dataset}"

    @property
    def run_id(self):
        return f"{self.role}-eta{self.noise_rate:.2f}-seed{self.seed}"


def cells(config):
    return [(a, d) for a in config.archs for d in config.datasets]


def run_specs(config, arch, dataset):
    """(phase1, phase2) lists of ``RunSpec`` of one cell, in the order they run.

    Seeds: calibration runs 0..N-1, held-out clean runs N..N+H-1, noisy runs
    N+H..N+H+S-1 at every rate (paired across rates: same initialisation and data order,
    different corrupted labels), all plus ``seed_offset``.
    """
    o, n, h = config.seed_offset, config.calibration_runs, config.heldout_clean_runs
    phase1 = [RunSpec(arch, dataset, "calibration", 0.0, o + i) for i in range(n)]
    phase2 = [RunSpec(arch, dataset, "clean", 0.0, o + n + i) for i in range(h)]
    for rate in sorted(float(r) for r in config.noise_rates):
        phase2 += [RunSpec(arch, dataset, "noisy", rate, o + n + h + i)
                   for i in range(config.noisy_runs)]
    return phase1, phase2


def steps_per_epoch(config, dataset):
    n = _DATASET_SIZES[dataset] if config.train_examples is None else config.train_examples
    return math.ceil(n / config.batch_size)


def plan(config, seconds_per_step=None, seconds_per_hvp=None):
    """What the config costs: runs, optimiser steps, snapshots, HVPs (and time, if given).

    Args:
        config: ``ExperimentConfig``.
        seconds_per_step, seconds_per_hvp: measured costs of one optimiser step and one
            probe (HVP on the probe batch) for the grid's models on the target machine;
            a dict arch -> seconds or one number for all.

    Returns:
        dict with per-cell and total counts (and ``hours`` when both costs are given).
    """
    out = {"cells": [], "runs": 0, "steps": 0, "snapshots": 0, "hvps": 0}
    total_s = 0.0
    for arch, dataset in cells(config):
        p1, p2 = run_specs(config, arch, dataset)
        spe = steps_per_epoch(config, dataset)
        steps = spe * config.epochs
        snaps = steps // config.every_n_steps + 1
        runs = len(p1) + len(p2)
        c = {"cell": f"{arch}-{dataset}", "runs": runs, "steps_per_epoch": spe,
             "steps_per_run": steps, "snapshots_per_run": snaps,
             "hvps_per_run": snaps * config.num_probes}
        if seconds_per_step is not None and seconds_per_hvp is not None:
            s = seconds_per_step[arch] if isinstance(seconds_per_step, dict) else seconds_per_step
            v = seconds_per_hvp[arch] if isinstance(seconds_per_hvp, dict) else seconds_per_hvp
            c["seconds_per_run"] = steps * s + snaps * config.num_probes * v
            total_s += runs * c["seconds_per_run"]
        out["cells"].append(c)
        out["runs"] += runs
        out["steps"] += runs * steps
        out["snapshots"] += runs * snaps
        out["hvps"] += runs * snaps * config.num_probes
    if seconds_per_step is not None and seconds_per_hvp is not None:
        out["hours"] = total_s / 3600.0
    return out


# ----------------------------------------------------------------------------- data

_CLEAN_CACHE = {}


def _clean_data(config, dataset):
    """(train LoadedData, test LoadedData, train index) without noise; cached per process."""
    key = (dataset, config.data_dir, config.train_examples)
    if key not in _CLEAN_CACHE:
        from keras_hesstrace.data import load_cifar, load_digits

        if dataset == "digits":
            train, test = load_digits("train"), load_digits("test")
        else:
            train = load_cifar(dataset, "train", data_dir=config.data_dir)
            test = load_cifar(dataset, "test", data_dir=config.data_dir)
        index = np.arange(train.num_examples)
        if config.train_examples is not None:
            index = np.sort(np.random.default_rng(0).choice(
                train.num_examples, size=int(config.train_examples), replace=False))
        _CLEAN_CACHE.clear()  # one dataset in memory at a time (CIFAR is 150 MB)
        _CLEAN_CACHE[key] = (train, test, index)
    return _CLEAN_CACHE[key]


class _RunData:
    """A run's training arrays with its noisy labels, its fixed probe batch, its test set."""

    def __init__(self, config, spec):
        from keras_hesstrace.data import symmetric_label_noise

        train, test, index = _clean_data(config, spec.dataset)
        self.loaded = train
        self.images = train.images[index]
        self.clean_labels = train.clean_labels[index]
        self.labels, self.corrupted = symmetric_label_noise(
            self.clean_labels, spec.noise_rate, train.num_classes, spec.seed)
        self.num_classes = train.num_classes
        self.test = test
        self.n = len(self.labels)
        pick_seed = (spec.seed + 7919 if config.probe_batch_seed is None
                     else config.probe_batch_seed)
        rng = np.random.default_rng(pick_seed)
        pick = rng.choice(self.n, size=config.probe_batch_size, replace=False)
        self.probe_x = train.normalize(self.images[pick])
        self.probe_y = self.labels[pick]
        self.probe_corrupted = int(self.corrupted[pick].sum())

    def epoch_dataset(self, config, seed, epoch):
        """The epoch's batches: order (and augmentation) a function of (seed, epoch) only."""
        import tensorflow as tf

        perm = np.random.default_rng([seed, epoch]).permutation(self.n)
        images = tf.constant(self.images)
        labels = tf.constant(self.labels)
        scale = np.float32(self.loaded.pixel_scale)
        mean = tf.constant(self.loaded.mean)
        std = tf.constant(self.loaded.std)
        augment = bool(config.augment)
        base = np.int64(seed) * 100_003 + epoch
        shape = self.images.shape[1:]

        def example(i, pos):
            image = tf.gather(images, i)
            if augment:
                pair = tf.stack([tf.constant(base, tf.int64), tf.cast(pos, tf.int64)])
                crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(pair, 2))
                padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
                image = tf.image.stateless_random_crop(padded, shape, seed=crop_seed)
                image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
            x = (tf.cast(image, tf.float32) * scale - mean) / std
            return x, tf.gather(labels, i)

        ds = tf.data.Dataset.from_tensor_slices((perm, np.arange(self.n)))
        ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)

    def train_x(self):
        return self.loaded.normalize(self.images)


def _build_model(config, spec, data):
    import keras
    from keras_hesstrace import models

    shape = data.images.shape[1:]
    if spec.arch == "small_cnn":
        model = models.small_cnn(shape, data.num_classes, config.weight_decay)
    else:
        model = getattr(models, spec.arch)(data.num_classes, shape, config.weight_decay)
    total = steps_per_epoch(config, spec.dataset) * config.epochs
    lr = config.learning_rate
    if config.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=total)
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=config.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


# ------------------------------------------------------------------------ atomic files


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path, obj):
    _atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


def _save_checkpoint(path, model, meta):
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)})
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path, model):
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        weights = [z[f"w{i}"] for i in range(sum(k.startswith("w") for k in z.files))]
        opt = [z[f"o{i}"] for i in range(sum(k.startswith("o") for k in z.files))]
    model.set_weights(weights)
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    if len(opt) != len(optimizer.variables):
        raise ValueError(f"checkpoint {path} holds {len(opt)} optimiser variables, the "
                         f"optimiser has {len(optimizer.variables)}: not this config's run.")
    for v, a in zip(optimizer.variables, opt):
        v.assign(a)
    return meta


def _truncate_csv(path, last_step):
    """Keep the header and the complete rows with step <= last_step (atomically)."""
    if not os.path.exists(path):
        return 0
    with open(path, newline="") as f:
        text = f.read()
    lines = text.split("\n")
    complete = lines[:-1]  # the text after the last newline is a half-written row
    if not complete:
        os.remove(path)
        return 0
    header = next(csv.reader([complete[0]]))
    kept = [complete[0]]
    for line in complete[1:]:
        row = next(csv.reader([line]), None)
        if row and len(row) == len(header) and int(row[0]) <= last_step:
            kept.append(line)
    _atomic_write_text(path, "\n".join(kept) + "\n")
    return len(kept) - 1


# --------------------------------------------------------------------------- training


def _log(msg, stream=None):
    print(msg, file=stream or sys.stdout, flush=True)


def train_run(config, spec, run_dir, *, detector=None, log_dir=None, callbacks=(),
              resume=True, progress=True, prefix=""):
    """Train one run with the trace callback, resumably; return its result dict.

    Args:
        config: ``ExperimentConfig``.
        spec: ``RunSpec``.
        run_dir: the run's folder (``traces.csv``, ``checkpoint.npz``, ``result.json``).
        detector: passed to ``HessianTraceCallback`` (online alerts). A run with a
            detector is restarted from scratch rather than from a checkpoint (the online
            detector state is not checkpointed).
        log_dir: TensorBoard folder of the run, or None.
        callbacks: extra Keras callbacks (tests use one to interrupt a run).
        resume: restart from the checkpoint if there is one; False starts over.
        progress: print a line per epoch.
        prefix: printed before each progress line.

    Returns:
        The result dict (also in ``run_dir/result.json``).
    """
    import keras

    from keras_hesstrace.monitor import HessianTraceCallback

    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, "checkpoint.npz")
    csv_path = os.path.join(run_dir, "traces.csv")
    spe = steps_per_epoch(config, spec.dataset)

    keras.backend.clear_session()
    keras.utils.set_random_seed(spec.seed)
    data = _RunData(config, spec)
    model = _build_model(config, spec, data)

    start_epoch, elapsed_before, segments = 0, 0.0, 1
    if resume and detector is None and os.path.exists(ckpt_path):
        meta = _load_checkpoint(ckpt_path, model)
        start_epoch = int(meta["epochs_done"])
        elapsed_before = float(meta["elapsed"])
        segments = int(meta["segments"]) + 1
        kept = _truncate_csv(csv_path, int(meta["last_step"]))
        if progress:
            _log(f"{prefix}resuming from the checkpoint after epoch {start_epoch} "
                 f"(step {meta['last_step']}, {kept} trace rows kept)")
    else:
        for p in (ckpt_path, csv_path):
            if os.path.exists(p):
                os.remove(p)
        if log_dir is not None and os.path.isdir(log_dir):
            shutil.rmtree(log_dir)

    trace_cb = HessianTraceCallback(
        (data.probe_x, data.probe_y), every_n_steps=config.every_n_steps,
        num_probes=config.num_probes, groups=config.groups, csv_path=csv_path,
        log_dir=log_dir, detector=detector, seed=spec.seed,
        verbose=1 if (detector is not None and progress) else 0,
    )
    t0 = time.perf_counter()
    monitor = list(config.monitor)

    class _EpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            elapsed = elapsed_before + time.perf_counter() - t0
            _save_checkpoint(ckpt_path, self.model, {
                "epochs_done": epoch + 1, "last_step": step, "elapsed": elapsed,
                "segments": segments, "run_id": spec.run_id})
            if progress:
                last = trace_cb.history[-1]["result"] if trace_cb.history else None
                tr = ""
                if last is not None:
                    tr = " ".join(f"{g} {last.total if g == 'total' else last[g]:.3g}"
                                  for g in monitor if g == "total" or g in last.groups)
                    tr = f" | trace {tr}"
                logs = logs or {}
                _log(f"{prefix}epoch {epoch + 1:>3}/{config.epochs} loss "
                     f"{logs.get('loss', float('nan')):.3f} acc "
                     f"{logs.get('accuracy', float('nan')):.3f}{tr} ({elapsed:.0f} s)")

    end_cb = _EpochEnd()
    for epoch in range(start_epoch, config.epochs):
        model.fit(data.epoch_dataset(config, spec.seed, epoch), initial_epoch=epoch,
                  epochs=epoch + 1, verbose=0, shuffle=False, callbacks=[trace_cb, end_cb, *callbacks])

    # Final evaluation: clean test accuracy, fit to the labels trained on, memorisation.
    test_x, test_y = data.test.arrays()
    test_pred = _predict(model, test_x)
    train_pred = _predict(model, data.train_x())
    corrupted = data.corrupted
    n_snap_expected = (spe * config.epochs) // config.every_n_steps + 1
    n_rows = _count_snapshots(csv_path)
    if n_rows != n_snap_expected:
        raise RuntimeError(f"{csv_path}: {n_rows} snapshots, expected {n_snap_expected}.")
    elapsed = elapsed_before + time.perf_counter() - t0
    result = {
        "run_id": spec.run_id, "cell": spec.cell, "arch": spec.arch, "dataset": spec.dataset,
        "role": spec.role, "noise_rate": spec.noise_rate, "seed": spec.seed,
        "epochs": config.epochs, "steps_per_epoch": spe, "every_n_steps": config.every_n_steps,
        "num_probes": config.num_probes, "n_snapshots": n_rows,
        "n_train": int(data.n), "n_corrupted": int(corrupted.sum()),
        "probe_batch_corrupted": data.probe_corrupted,
        "test_accuracy": float(np.mean(test_pred == test_y)),
        "train_accuracy": float(np.mean(train_pred == data.labels)),
        "clean_train_accuracy": float(np.mean(train_pred == data.clean_labels)),
        "memorised_fraction": (float(np.mean(train_pred[corrupted] == data.labels[corrupted]))
                               if corrupted.any() else float("nan")),
        "wall_time_s": elapsed, "segments": segments, "trace_csv": "traces.csv",
    }
    _atomic_write_json(result_path, result)  # the run is done from here on
    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    return result


def _predict(model, x, batch_size=512):
    """Predicted classes (inference mode), without Keras's per-model predict function."""
    out = [np.argmax(np.asarray(model(x[i:i + batch_size], training=False)), axis=1)
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def _count_snapshots(csv_path):
    if not os.path.exists(csv_path):
        return 0
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    return len({r[0] for r in rows[1:] if r})


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
        from keras_hesstrace.monitor.detector import first_scored, relative_to_reference

        y = np.concatenate([np.full(first_scored(r), np.nan), relative_to_reference([y], r)[0]])
    return y


def scale_name(config):
    """Words for ``rule_scale``: e.g. "log trace minus the run's own value at snapshot 2"."""
    what = ("log " if config.transform == "log" else "") + "trace"
    if config.reference_snapshot is not None:
        what += f" minus the run's own value at snapshot {config.reference_snapshot}"
    return what


def read_trajectory(csv_path, group):
    """The ``group``'s rows of a callback CSV in step order: (steps int [T], traces [T])."""
    import pandas as pd

    frame = pd.read_csv(csv_path)
    frame = frame[frame["group"] == group].sort_values("step")
    if frame.empty:
        raise ValueError(f"{csv_path}: no rows for group {group!r}.")
    return frame["step"].to_numpy(np.int64), frame["trace"].to_numpy(np.float64)


# ---------------------------------------------------------------------- orchestration


def _check_config(out, config):
    path = os.path.join(out, "config.json")
    current = config.to_dict()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(
                f"{out!r} holds results of another config (differs in {diff}). Use another "
                "--out, or the same settings to resume."
            )
    else:
        os.makedirs(out, exist_ok=True)
        _atomic_write_json(path, current)


def _run_dir(out, spec):
    return os.path.join(out, spec.cell, "runs", spec.run_id)


def calibrate_cell(config, out, arch, dataset):
    """Calibrate h for the cell from its finished Phase I runs; save and return it."""
    from keras_hesstrace.monitor import calibrate_threshold

    phase1, _ = run_specs(config, arch, dataset)
    trajectories = {g: [] for g in config.monitor}
    for spec in phase1:
        csv_path = os.path.join(_run_dir(out, spec), "traces.csv")
        for g in config.monitor:
            trajectories[g].append(rule_values(config, read_trajectory(csv_path, g)[1]))
    cal = calibrate_threshold(trajectories, config.target_arl0, config.delta,
                              transform=config.transform, every_n_steps=config.every_n_steps,
                              n_resamples=config.n_resamples, seed=0,
                              reference_snapshot=config.reference_snapshot)
    path = os.path.join(out, f"{arch}-{dataset}", "calibration.json")
    _atomic_write_json(path, cal.to_dict())
    return cal


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
    """
    config.validate()
    out = os.fspath(out)
    _check_config(out, config)
    all_specs = []
    for arch, dataset in cells(config):
        p1, p2 = run_specs(config, arch, dataset)
        all_specs += p1 + p2
    total = len(all_specs)
    done_before = sum(os.path.exists(os.path.join(_run_dir(out, s), "result.json"))
                      for s in all_specs)
    if progress:
        _log(f"experiment {config.name!r}: {total} runs in {len(cells(config))} cell(s), "
             f"{done_before} already done; output in {out}")
    t_start = time.perf_counter()
    fresh_times = []
    k = 0

    def do(spec):
        nonlocal k
        k += 1
        run_dir = _run_dir(out, spec)
        tag = f"[{k}/{total}] {spec.cell} {spec.role} eta={spec.noise_rate:.2f} seed={spec.seed}"
        if os.path.exists(os.path.join(run_dir, "result.json")):
            if progress:
                _log(f"{tag}: done before, skipped")
            return
        if progress:
            _log(f"{tag}: training")
        t = time.perf_counter()
        log_dir = (os.path.join(out, "tensorboard", spec.cell, spec.run_id)
                   if config.tensorboard else None)
        res = train_run(config, spec, run_dir, log_dir=log_dir,
                        callbacks=callbacks_for(spec) if callbacks_for else (),
                        progress=progress, prefix="    ")
        fresh_times.append(time.perf_counter() - t)
        if progress:
            left = sum(not os.path.exists(os.path.join(_run_dir(out, s), "result.json"))
                       for s in all_specs)
            eta = left * float(np.mean(fresh_times))
            _log(f"{tag}: done in {fresh_times[-1]:.0f} s, test acc "
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
                _log(f"calibrated {arch}-{dataset} group {g!r}: h = {r.threshold:.3f} for "
                     f"ARL0 = {config.target_arl0:g} snapshots (expected false-alarm "
                     f"probability per run {r.false_alarm_prob:.3f}; LOO false alarms "
                     f"{r.loo_false_alarms}/{r.n_runs}; lag-1 r = {r.lag1_r:.2f})")
        for spec in p2:
            do(spec)
    if progress:
        _log(f"all {total} runs done ({(time.perf_counter() - t_start) / 60:.1f} min this "
             "session)")
    if not summary:
        return None
    return summarize(config, out, progress=progress)


# ---------------------------------------------------------------------------- summary


def _load_result(out, spec):
    path = os.path.join(_run_dir(out, spec), "result.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def detections(config, out, arch, dataset, cal):
    """One record per (finished run, monitored group): the rule applied to its trajectory.

    Phase II runs are standardised with the baseline of all calibration runs; calibration
    runs get their leave-one-out result (as in the calibration's LOO false-alarm rate).
    """
    phase1, phase2 = run_specs(config, arch, dataset)
    lo, hi = config.window()
    records = []
    for spec in phase1 + phase2:
        res = _load_result(out, spec)
        if res is None:
            continue
        spe = res["steps_per_epoch"]
        csv_path = os.path.join(_run_dir(out, spec), res["trace_csv"])
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


SUMMARY_COLUMNS = [
    "arch", "dataset", "group", "noise_rate", "n_runs", "n_alerts", "alert_rate",
    "alert_rate_low", "alert_rate_high", "det_epoch_mean", "det_epoch_sd", "det_epoch_median",
    "h", "target_arl0", "expected_false_alarm", "cohens_d", "cohens_d_low", "cohens_d_high",
    "test_acc_mean", "test_acc_sd", "train_acc_mean", "memorised_mean", "runs_source",
]
DETECTION_COLUMNS = [
    "cell", "arch", "dataset", "run_id", "role", "noise_rate", "seed", "group", "n_snapshots",
    "n_floored", "alert", "alert_snapshot", "alert_step", "alert_epoch", "window_mean", "test_accuracy",
    "train_accuracy", "memorised_fraction", "wall_time_s",
]


def _summary_rows(config, cal, records):
    from keras_hesstrace import stats

    rows = []
    for g in config.monitor:
        recs = [r for r in records if r["group"] == g]
        clean_all = [r for r in recs if r["noise_rate"] == 0.0]
        calib = [r for r in recs if r["role"] == "calibration"]
        heldout = [r for r in recs if r["role"] == "clean"]
        for rate in [0.0] + sorted(float(x) for x in config.noise_rates):
            if rate == 0.0:
                group_runs, source = (heldout, "heldout") if heldout else (calib, "loo")
                ref = calib if heldout else []
            else:
                group_runs = [r for r in recs if r["noise_rate"] == rate]
                source, ref = "noisy", clean_all
            if not group_runs:
                continue
            times = [r["alert_epoch"] if r["alert"] else None for r in group_runs]
            s = stats.run_length_summary(times, confidence=cal.confidence)
            d = lo_d = hi_d = float("nan")
            a = [r["window_mean"] for r in group_runs if np.isfinite(r["window_mean"])]
            b = [r["window_mean"] for r in ref if np.isfinite(r["window_mean"])]
            if len(a) >= 2 and len(b) >= 2:
                try:
                    e = stats.cohens_d(a, b)
                    d, lo_d, hi_d = e.d, e.low, e.high
                except ValueError:
                    pass
            acc = np.array([r["test_accuracy"] for r in group_runs])
            gc = cal[g]
            rows.append({
                "arch": group_runs[0]["arch"], "dataset": group_runs[0]["dataset"], "group": g,
                "noise_rate": rate, "n_runs": s.n_runs, "n_alerts": s.n_alerts,
                "alert_rate": s.alert_rate, "alert_rate_low": s.alert_rate_low,
                "alert_rate_high": s.alert_rate_high, "det_epoch_mean": s.mean,
                "det_epoch_sd": s.sd, "det_epoch_median": s.median, "h": gc.threshold,
                "target_arl0": cal.target_arl0,
                "expected_false_alarm": gc.expected_false_alarm_prob(group_runs[0]["n_snapshots"]),
                "cohens_d": d, "cohens_d_low": lo_d, "cohens_d_high": hi_d,
                "test_acc_mean": float(acc.mean()),
                "test_acc_sd": float(acc.std(ddof=1)) if acc.size > 1 else float("nan"),
                "train_acc_mean": float(np.mean([r["train_accuracy"] for r in group_runs])),
                "memorised_mean": (float(np.nanmean([r["memorised_fraction"] for r in group_runs]))
                                   if rate > 0 else float("nan")),
                "runs_source": source,
            })
    return rows


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return format(v, spec)


def summary_markdown(frame, calibrations, config):
    """Table 1 as markdown, then each cell's calibration diagnostics."""
    lines = [
        f"# Memorisation experiment `{config.name}`",
        "",
        "| arch | dataset | group | η | runs | det. epoch (mean ± sd) | alert rate [95% Wilson] "
        "| h | Cohen's d [95% bootstrap] | clean test acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in frame.iterrows():
        det = (f"{_fmt(r.det_epoch_mean, '.1f')} ± {_fmt(r.det_epoch_sd, '.1f')}"
               if r.n_alerts else "–")
        rate = (f"{r.alert_rate:.2f} [{r.alert_rate_low:.2f}, {r.alert_rate_high:.2f}]"
                f" ({int(r.n_alerts)}/{int(r.n_runs)})")
        d = (f"{_fmt(r.cohens_d, '.2f')} [{_fmt(r.cohens_d_low, '.2f')}, "
             f"{_fmt(r.cohens_d_high, '.2f')}]")
        acc = f"{r.test_acc_mean:.3f} ± {_fmt(r.test_acc_sd, '.3f')}"
        lines.append(f"| {r.arch} | {r.dataset} | {r.group} | {r.noise_rate:.1f} | "
                     f"{int(r.n_runs)} | {det} | {rate} | {r.h:.2f} | {d} | {acc} |")
    lo, hi = config.window()
    lines += [
        "",
        f"The rule standardises the {scale_name(config)} of the group in each row. "
        "Detection epoch: training epochs completed at the first alert (step / steps per "
        "epoch), over the runs that alerted. η = 0 rows: held-out clean runs standardised "
        "with the baseline of the calibration runs (alert rate = false-alarm rate); "
        f"η > 0 rows: noisy runs (alert rate = power). Cohen's d on the mean "
        f"{scale_name(config)} over epochs {lo:g}–{hi:g}, "
        "noisy runs vs all clean runs (η = 0: held-out vs calibration runs).",
        "",
        "## Calibration",
        "",
        "| cell | group | h | target ARL0 | achieved ARL0 | expected false-alarm prob. per run "
        "(geometric; resampled) | LOO false alarms | lag-1 r (p) | runs | resampling |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, cal in calibrations.items():
        for g in cal.groups:
            r = cal[g]
            resampled = ("" if r.resampled_false_alarm_prob is None
                         else f"; {r.resampled_false_alarm_prob:.3f}")
            how = ("whole runs" if cal.block_length is None else
                   "i.i.d. z" if cal.block_length == 1 else f"blocks of {cal.block_length}")
            lines.append(
                f"| {cell} | {g} | {r.threshold:.3f} | {cal.target_arl0:g} | {r.arl0:.0f} | "
                f"{r.false_alarm_prob:.3f}{resampled} (T = {r.horizon}) | "
                f"{r.loo_false_alarms}/{r.n_runs} "
                f"[{r.loo_false_alarm_ci[0]:.2f}, {r.loo_false_alarm_ci[1]:.2f}] | "
                f"{r.lag1_r:.2f} ({r.lag1_pvalue:.2g}) | {r.n_runs} | {how} |")
    return "\n".join(lines) + "\n"


def summarize(config, out, progress=True):
    """Write detections.csv, summary.csv, summary.md and the plots from finished runs.

    Only runs with ``result.json`` are read. Returns the summary DataFrame.
    """
    import pandas as pd

    from keras_hesstrace.monitor import Calibration

    out = os.fspath(out)
    all_rows, all_records, calibrations = [], [], {}
    for arch, dataset in cells(config):
        cal_path = os.path.join(out, f"{arch}-{dataset}", "calibration.json")
        if not os.path.exists(cal_path):
            continue
        cal = Calibration.load(cal_path)
        calibrations[f"{arch}-{dataset}"] = cal
        records = detections(config, out, arch, dataset, cal)
        all_records += records
        all_rows += _summary_rows(config, cal, records)
        plot_cell(config, out, arch, dataset, cal, records)
    frame = pd.DataFrame(all_rows, columns=SUMMARY_COLUMNS)
    det = pd.DataFrame([{k: r[k] for k in DETECTION_COLUMNS} for r in all_records],
                       columns=DETECTION_COLUMNS)
    buf = io.StringIO()
    det.to_csv(buf, index=False)
    _atomic_write_text(os.path.join(out, "detections.csv"), buf.getvalue())
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    _atomic_write_text(os.path.join(out, "summary.csv"), buf.getvalue())
    md = summary_markdown(frame, calibrations, config)
    _atomic_write_text(os.path.join(out, "summary.md"), md)
    if progress:
        _log("\n" + md)
        _log(f"wrote {os.path.join(out, 'summary.md')}, summary.csv, detections.csv and "
             f"plots/ in {out}")
    return frame


# ------------------------------------------------------------------------------ plots


def plot_cell(config, out, arch, dataset, cal, records):
    """Two PNGs per monitored group: trajectories with alerts, and the PH statistic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_hesstrace.plots import save_figure

    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    rates = sorted(float(x) for x in config.noise_rates)
    cmap = plt.get_cmap("autumn_r")
    colour = {r: cmap(0.35 + 0.65 * i / max(len(rates) - 1, 1)) for i, r in enumerate(rates)}
    paths = []
    log = config.transform == "log"

    def shown(y):  # the rule's scale back on the trace's scale (a ratio with a reference)
        return np.exp(y) if log else y

    for g in config.monitor:
        recs = [r for r in records if r["group"] == g]
        base = cal[g].baseline
        fig, ax = plt.subplots(figsize=(9, 5.5))
        seen = set()

        def label(key, text):
            if key in seen:
                return None
            seen.add(key)
            return text

        for r in recs:
            if r["role"] == "calibration":
                kw = dict(color="0.6", lw=0.8, alpha=0.8,
                          label=label("cal", f"clean, calibration ({cal[g].n_runs} runs)"))
            elif r["role"] == "clean":
                kw = dict(color="tab:blue", lw=1.2,
                          label=label("clean", "clean, held out"))
            else:
                kw = dict(color=colour[r["noise_rate"]], lw=1.2,
                          label=label(r["noise_rate"], f"noisy η = {r['noise_rate']:.1f}"))
            ax.plot(r["_epochs"], shown(r["_scale"]), **kw)
            if r["alert"] and r["role"] != "calibration":
                i = r["alert_snapshot"]
                ax.plot(r["_epochs"][i], shown(r["_scale"][i]), marker="v", ms=9,
                        color=kw["color"], mec="black", zorder=5,
                        label=label("alert", "first alert"))
        spe_epochs = recs[0]["_epochs"][: len(base)] if recs else None
        if spe_epochs is not None and len(spe_epochs) == len(base):
            lo, hi = shown(base.mean - 2 * base.std), shown(base.mean + 2 * base.std)
            mid = shown(base.mean)
            ax.fill_between(spe_epochs, lo, hi, color="0.85", alpha=0.6, zorder=0,
                            label="clean baseline ± 2 sd")
            ax.plot(spe_epochs, mid, color="black", lw=1, ls="--", label="clean baseline mean")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        what = "model" if g == "total" else f"layer '{g}'"
        floor = (f"; floored at {config.log_floor:g}" if log and config.log_floor is not None
                 else "")
        if config.reference_snapshot is None:
            ax.set_ylabel(f"Hessian trace of {what} (fixed batch){floor}")
        else:
            at = config.reference_snapshot * config.every_n_steps / steps_per_epoch(config, dataset)
            ax.set_ylabel(f"Hessian trace of {what} "
                          + ("/" if log else "−") + f" the run's own at epoch {at:g}{floor}")
        ax.set_title(f"{arch} on {dataset}: clean vs noisy-label runs; triangles = first "
                     f"alert (h = {cal[g].threshold:.2f})", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        paths.append(save_figure(
            fig, os.path.join(out, "plots", f"{arch}-{dataset}-{_safe(g)}-trajectories.png"), dpi=110))

        fig, ax = plt.subplots(figsize=(9, 5))
        seen.clear()
        h = cal[g].threshold
        for r in recs:
            if r["role"] == "calibration":
                continue
            if r["role"] == "clean":
                kw = dict(color="tab:blue", lw=1.2, label=label("clean", "clean, held out"))
            else:
                kw = dict(color=colour[r["noise_rate"]], lw=1.2,
                          label=label(r["noise_rate"], f"noisy η = {r['noise_rate']:.1f}"))
            ax.plot(r["_epochs"], r["_statistic"], **kw)
            if r["alert"]:
                i = r["alert_snapshot"]
                ax.plot(r["_epochs"][i], r["_statistic"][i], marker="v", ms=9,
                        color=kw["color"], mec="black", zorder=5,
                        label=label("alert", "first alert"))
        ax.axhline(h, color="black", ls="--", lw=1.2, label=f"threshold h = {h:.2f}")
        ax.set_ylim(0, 4 * h)
        ax.set_xlabel("epoch")
        ax.set_ylabel("Page–Hinkley statistic max(g⁺, g⁻)")
        ax.set_title(f"{arch} on {dataset}, group '{g}': detection statistic of the Phase II "
                     "runs (axis cut at 4h)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        paths.append(save_figure(
            fig, os.path.join(out, "plots", f"{arch}-{dataset}-{_safe(g)}-statistic.png"), dpi=110))
    return paths


def _safe(name):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
