"""The memorisation experiment's settings and the grid of runs they define.

:class:`ExperimentConfig` (every field a CLI flag) with its validation, the named
``PRESETS``, and the run grid: :class:`RunSpec` (one training run), :func:`cells`,
:func:`run_specs` (the seeds of Phase I and Phase II), :func:`steps_per_epoch` and
:func:`plan` (what a config costs). The protocol itself is in
:mod:`keras_hesstrace.experiments.runner`.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import List, Optional

from keras_hesstrace._validate import check_integer

ROLES = ("calibration", "clean", "noisy")
ARCHS = ("small_cnn", "resnet18", "resnet34", "vgg11")
DATASETS = ("digits", "cifar10", "cifar100")
_DATASET_SIZES = {"digits": 1400, "cifar10": 50000, "cifar100": 50000}


# --------------------------------------------------------------------------- config


def _finite(value):
    """A real number (not bool) that is finite."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_sgd(learning_rate, momentum, weight_decay):
    """Refuse SGD settings that are not finite numbers in range (``ValueError`` naming the
    setting): learning_rate > 0, momentum in [0, 1), weight_decay >= 0. Shared by the
    memorisation experiment's and the architecture study's configs."""
    if not (_finite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}.")
    if not (_finite(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    if not (_finite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")


class SettingsDict:
    """``to_dict`` / ``from_dict`` of a settings dataclass: a dict written by an earlier
    version is brought to today's field names (``upgraded``; none by default), and an
    unknown key is refused with the known ones listed."""

    def to_dict(self):
        return dataclasses.asdict(self)

    @staticmethod
    def upgraded(d):
        return dict(d)

    @classmethod
    def from_dict(cls, d):
        d = cls.upgraded(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(names)}.")
        return cls(**d)


@dataclass
class ExperimentConfig(SettingsDict):
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
        by: how the parameters are grouped, as ``layer_traces(by=...)`` takes it
            (``"layer"``: one group per layer). Files written before it was named ``by``
            call it ``groups``; they still load.
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
        false_alarm_prob: the per-run false-alarm probability alpha h is calibrated to
            (a clean run of this length alerts with probability about alpha; the
            conformal rule of ``calibrate_threshold``). Defaults to 0.1.
        target_arl0: instead of ``false_alarm_prob``: the in-control average run
            length, in snapshots, h is calibrated to (open-ended monitoring; older
            configs). Exactly one of the two is set.
        delta: Page-Hinkley allowance.
        effect_window: [first, last] epoch (fractional, inclusive) averaged for Hedges'
            g; None: the second half of training.
        train_examples: use only this many training examples (None: all); for tests.
        data_dir: tensorflow-datasets directory holding prepared CIFAR.
        tensorboard: also write each run's traces as TensorBoard scalars.
        seed_offset: added to every seed (a second, independent replicate of the grid).
        n_resamples: resampled sequences of an ARL0 calibration.
        validation_fraction: share of the training examples held out of training as a
            validation split (labels noised at the run's eta, like the rest): the
            first-order baselines' validation loss. The same examples in every run.
        early_stopping_patience: patiences of the Keras ``EarlyStopping`` baselines
            (on the noisy validation loss), replayed from the logged curve.
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
    by: str = "layer"
    monitor: List[str] = field(default_factory=lambda: ["head"])
    transform: Optional[str] = "log"
    reference_snapshot: Optional[int] = None
    log_floor: Optional[float] = None
    false_alarm_prob: Optional[float] = 0.1
    target_arl0: Optional[float] = None
    delta: float = 0.5
    effect_window: Optional[List[float]] = None
    train_examples: Optional[int] = None
    data_dir: Optional[str] = None
    tensorboard: bool = False
    seed_offset: int = 0
    n_resamples: int = 4000
    validation_fraction: float = 0.0
    early_stopping_patience: List[int] = field(default_factory=lambda: [2, 5])

    def validate(self):
        """Raise ``ValueError`` naming the first bad setting; return self."""
        for a in self.archs:
            if a not in ARCHS:
                raise ValueError(f"unknown arch {a!r} in archs; choose from {ARCHS}.")
        for d in self.datasets:
            if d not in DATASETS:
                raise ValueError(f"unknown dataset {d!r} in datasets; choose from {DATASETS}.")
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
            # monitor.baseline.check_reference's rule, without importing the monitor (TensorFlow)
            check_integer("reference_snapshot", self.reference_snapshot, minimum=0, none="no reference")
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
        if (self.false_alarm_prob is None) == (self.target_arl0 is None):
            raise ValueError("set exactly one of false_alarm_prob (per-run false-alarm "
                             f"probability, got {self.false_alarm_prob!r}) and target_arl0 "
                             f"(in-control ARL in snapshots, got {self.target_arl0!r}).")
        if self.false_alarm_prob is not None and not 0.0 < self.false_alarm_prob < 1.0:
            raise ValueError(f"false_alarm_prob must be in (0, 1), got {self.false_alarm_prob!r}.")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ValueError(f"validation_fraction must be in [0, 0.5), got "
                             f"{self.validation_fraction!r}.")
        for p in self.early_stopping_patience:
            check_integer("early_stopping_patience", p, minimum=0)
        # The rest of the settings, checked here so that a bad one is refused before Phase I
        # trains (the callback and calibrate_threshold would refuse them only when used).
        if self.target_arl0 is not None and not (_finite(self.target_arl0) and self.target_arl0 > 1):
            raise ValueError(f"target_arl0 must be a finite number of snapshots > 1, got {self.target_arl0!r}.")
        if not (_finite(self.delta) and self.delta >= 0):
            raise ValueError(f"delta (the Page-Hinkley allowance) must be finite and >= 0, got {self.delta!r}.")
        check_integer("n_resamples", self.n_resamples, minimum=100)
        check_sgd(self.learning_rate, self.momentum, self.weight_decay)
        check_integer("seed_offset", self.seed_offset, minimum=0)
        check_integer("train_examples", self.train_examples, none="all examples")
        check_integer("probe_batch_seed", self.probe_batch_seed, minimum=0, none="a batch per run")
        if self.effect_window is not None and not (
                all(_finite(e) for e in self.effect_window) and self.effect_window[0] <= self.effect_window[1]):
            raise ValueError(f"effect_window is [first_epoch, last_epoch] with first <= last, got "
                             f"{self.effect_window!r}.")
        return self

    @staticmethod
    def upgraded(d):
        """A config dict written by an earlier version, in today's field names."""
        d = dict(d)
        if "groups" in d and "by" not in d:
            d["by"] = d.pop("groups")  # the grouping was called groups= before
        if d.get("target_arl0") is not None and "false_alarm_prob" not in d:
            d["false_alarm_prob"] = None  # a config written before false_alarm_prob existed
        return d

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


_CPU_SMALL = dict(
    archs=["small_cnn"], datasets=["digits"],
    noise_rates=[0.2, 0.4, 0.6], calibration_runs=20, heldout_clean_runs=40,
    noisy_runs=5, epochs=16, batch_size=32, learning_rate=0.05, momentum=0.9,
    weight_decay=5e-4, schedule="constant", every_n_steps=22, num_probes=10,
    probe_batch_size=256, false_alarm_prob=0.1, target_arl0=None, log_floor=0.05,
    # The whole model's trace, each run relative to its own value at snapshot 2 (about
    # epoch 1): on the digits a noisy run's trace first dips below the clean runs' the
    # more the higher eta, which delays the absolute rule's alerts at high eta;
    # referencing each run to itself removes the dip (docs/memorisation.md).
    monitor=["total"], reference_snapshot=2,
    # 10 % of the training digits held out (noised like the rest): the first-order
    # baselines' validation loss; Keras EarlyStopping on it with patience 2 and 5.
    validation_fraction=0.1, early_stopping_patience=[2, 5],
)

PRESETS = {
    # Digits + small CNN on 2 CPU cores: 20 calibration runs (h for a per-run
    # false-alarm probability 0.1: k = 2 of 21, expected 0.095), 40 held-out clean runs
    # (the false-alarm estimate: 0/40 bounds it below 0.09), 5 noisy runs per eta; 75
    # runs of 16 epochs x 40 steps, about 45 s each. See docs/memorisation.md.
    "cpu-small": dict(name="cpu-small", **_CPU_SMALL),
    # The confirmatory grid of issue 13: cpu-small's settings, frozen before it was run,
    # on seeds never used before (5000...; earlier rounds used 0-74 and 1000-1032).
    "cpu-confirm": dict(name="cpu-confirm", seed_offset=5000, **_CPU_SMALL),
    # The paper's grid (docs/method.md §8): for a GPU machine with CIFAR prepared.
    # 352 steps/epoch (10 % held out) x 60 epochs / K=100 -> 212 snapshots; h for a
    # per-run false-alarm probability 0.1 over them.
    "paper": dict(
        name="paper", archs=["resnet18", "resnet34", "vgg11"], datasets=["cifar10", "cifar100"],
        noise_rates=[0.2, 0.4, 0.6], calibration_runs=10, heldout_clean_runs=10,
        noisy_runs=10, epochs=60, batch_size=128, learning_rate=0.1, momentum=0.9,
        weight_decay=5e-4, schedule="cosine", every_n_steps=100, num_probes=10,
        probe_batch_size=256, false_alarm_prob=0.1, target_arl0=None,
        validation_fraction=0.1,
    ),
    # Seconds: for tests and a smoke check of an installation.
    "tiny": dict(
        name="tiny", archs=["small_cnn"], datasets=["digits"], noise_rates=[0.6],
        calibration_runs=3, heldout_clean_runs=1, noisy_runs=1, epochs=2, batch_size=32,
        every_n_steps=4, num_probes=2, probe_batch_size=32, train_examples=256,
        false_alarm_prob=0.25, target_arl0=None, log_floor=0.05, validation_fraction=0.1,
        # M = 2 probes on 32 images: several runs' step-0 estimates fall below the floor;
        # on one shared batch they would tie at the floor (zero spread): one batch per run.
        probe_batch_seed=None,
    ),
}


def preset(name, **overrides):
    """The named preset (``cpu-small``, ``cpu-confirm``, ``paper``, ``tiny``) with fields
    overridden."""
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


def validation_size(config, n):
    """Examples of ``n`` held out as the validation split (``validation_fraction``)."""
    return int(round(config.validation_fraction * n))


def steps_per_epoch(config, dataset):
    n = _DATASET_SIZES[dataset] if config.train_examples is None else config.train_examples
    return math.ceil((n - validation_size(config, n)) / config.batch_size)


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
