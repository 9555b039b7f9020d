"""Settings of PyHessian's architecture study (issue 16): :class:`StudyConfig`, its presets
and :func:`study_plan` (what a config costs). No TensorFlow is imported here, so the
command line checks its flags and prints a plan in a fraction of a second.

A *variant* is named ``resnet<depth>[-<change>]``:

* ``resnet20``         BN and residual connections everywhere (the baseline);
* ``resnet20-nobn``    no batch normalisation anywhere (stem included);
* ``resnet20-nores``   no residual connections (BN kept);
* ``resnet20-nobn2``   BN removed from stage 2 only (stage s in 1..3).

:func:`variant_flags` turns a name into ``cifar_resnet``'s ``(depth, batch_norm, residual)``.
"""

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional

from keras_hesstrace._validate import check_integer
from keras_hesstrace.experiments.config import SettingsDict, check_sgd

STUDY_DATASETS = ("digits16", "cifar10", "cifar100")
STAGES = ("stage1", "stage2", "stage3")
# The groups of one layer_traces call: every trainable variable of cifar_resnet is in one.
PARTS = ("stem",) + STAGES + ("head",)
_TRAIN_SIZES = {"digits16": 1400, "cifar10": 50000, "cifar100": 50000}
_VARIANT = re.compile(r"^resnet(\d+)(?:-(nobn|nores|nobn[123]))?$")


def variant_flags(name):
    """``(depth, batch_norm, residual)`` of a variant name; ``ValueError`` naming a bad one."""
    m = _VARIANT.match(name) if isinstance(name, str) else None
    depth = int(m.group(1)) if m else 0
    if not m or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"unknown variant {name!r} in variants: use resnet<depth>[-nobn|-nores|-nobn<stage>] "
                         "with depth 6n + 2 (e.g. resnet20, resnet32-nobn, resnet20-nobn2).")
    change = m.group(2)
    if change is None:
        return depth, True, True
    if change == "nobn":
        return depth, False, True
    if change == "nores":
        return depth, True, False
    stage = int(change[-1])
    return depth, [s != stage for s in (1, 2, 3)], True


def describe_variant(name):
    """The summary's columns of a variant: depth, batch_norm, residual (as text)."""
    depth, bn, residual = variant_flags(name)
    if isinstance(bn, list):
        bn = "stages " + "+".join(str(s) for s, on in zip((1, 2, 3), bn) if on)
    return {"depth": depth, "batch_norm": str(bn).lower(), "residual": str(residual).lower()}


@dataclass
class StudyConfig(SettingsDict):
    """Settings of the architecture study.

    Attributes:
        name: a label for the outputs.
        variants: the models (see the module docstring), trained and measured in order.
        dataset: ``digits16`` (the bundled 8x8 digits upsampled x2 to 16x16x1, offline),
            ``cifar10`` or ``cifar100`` (a prepared tensorflow-datasets ``data_dir``).
        epochs, batch_size, learning_rate, momentum, weight_decay, schedule: SGD training
            (``schedule`` ``"cosine"`` or ``"constant"``; ``weight_decay`` the L2 lambda).
        augment: random crop (pad 4) + horizontal flip per epoch (CIFAR only).
        checkpoints: the epochs (1..epochs, the last one included) measured.
        hessian_batch_size: the fixed training examples every measurement is taken on
            (the same examples for every variant and checkpoint).
        top_k: eigenvalues of the whole model (Lanczos, algebraically largest).
        eigen_iters: HVPs per eigenpair (``top_eigenvalues(max_iter=)``), also per stage.
        trace_probes: Hutchinson probes of the whole-model trace and of the per-stage traces.
        density_runs, density_steps: SLQ start vectors and Lanczos steps per run.
        landscape_grid, landscape_span: the final 2-D loss landscape along the top-2
            eigenvectors: points per axis and half-width.
        train_examples: use only this many training examples (None: all); for tests.
        data_dir: tensorflow-datasets directory holding prepared CIFAR.
        seed: seed of the weights, the data order, the Hessian batch and the probes.
    """

    name: str = "custom"
    variants: List[str] = field(default_factory=lambda: ["resnet20", "resnet20-nobn", "resnet20-nores"])
    dataset: str = "digits16"
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: bool = False
    checkpoints: List[int] = field(default_factory=lambda: [10])
    hessian_batch_size: int = 256
    top_k: int = 2
    eigen_iters: int = 20
    trace_probes: int = 30
    density_runs: int = 1
    density_steps: int = 30
    landscape_grid: int = 11
    landscape_span: float = 0.5
    train_examples: Optional[int] = None
    data_dir: Optional[str] = None
    seed: int = 0

    def validate(self):
        """Raise ``ValueError`` naming the first bad setting; return self."""
        if not self.variants:
            raise ValueError("variants must name at least one model.")
        for v in self.variants:
            variant_flags(v)
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants has a repeated name: {self.variants!r}.")
        if self.dataset not in STUDY_DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {STUDY_DATASETS}.")
        for name in ("epochs", "batch_size", "hessian_batch_size", "top_k", "eigen_iters",
                     "density_runs", "density_steps", "landscape_grid"):
            check_integer(name, getattr(self, name))
        check_integer("trace_probes", self.trace_probes, minimum=2)
        check_integer("seed", self.seed, minimum=0)
        check_integer("train_examples", self.train_examples, none="all examples")
        if not self.checkpoints:
            raise ValueError("checkpoints must name at least one epoch (the last one).")
        for e in self.checkpoints:
            check_integer("checkpoints", e, minimum=1, maximum=self.epochs)
        if sorted(set(self.checkpoints)) != list(self.checkpoints) or self.checkpoints[-1] != self.epochs:
            raise ValueError(f"checkpoints must be increasing and end at epochs={self.epochs}, got "
                             f"{self.checkpoints!r}.")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}.")
        check_sgd(self.learning_rate, self.momentum, self.weight_decay)
        span = self.landscape_span
        if not (isinstance(span, (int, float)) and not isinstance(span, bool)
                and math.isfinite(span) and span > 0):
            raise ValueError(f"landscape_span must be a finite number > 0, got {span!r}.")
        if self.augment and self.dataset == "digits16":
            raise ValueError("augment is the CIFAR crop+flip; it makes no sense for the digits.")
        n_train = _TRAIN_SIZES[self.dataset] if self.train_examples is None else self.train_examples
        if self.hessian_batch_size > n_train:
            raise ValueError(f"hessian_batch_size={self.hessian_batch_size} is more than the "
                             f"{n_train} training examples.")
        return self


_PYHESSIAN_VARIANTS = ["resnet20", "resnet20-nobn", "resnet20-nores",
                       "resnet32", "resnet32-nobn", "resnet32-nores",
                       "resnet20-nobn1", "resnet20-nobn2", "resnet20-nobn3"]

PRESETS = {
    # seconds: the tests' end-to-end run (two ResNet-8s, a few hundred digits, 2 epochs)
    "tiny": dict(name="tiny", variants=["resnet8", "resnet8-nobn"], epochs=2, batch_size=32,
                 learning_rate=0.05, checkpoints=[1, 2], train_examples=256,
                 hessian_batch_size=32, top_k=2, eigen_iters=6, trace_probes=8,
                 density_runs=1, density_steps=6, landscape_grid=3, landscape_span=0.5),
    # offline on 2 CPU cores: PyHessian's nine variants on the digits at 16x16x1 (not yet run)
    "cpu-small": dict(name="cpu-small", variants=list(_PYHESSIAN_VARIANTS), epochs=20,
                      batch_size=64, learning_rate=0.05, checkpoints=[5, 20],
                      hessian_batch_size=128, top_k=2, eigen_iters=15, trace_probes=20,
                      density_runs=1, density_steps=20, landscape_grid=9, landscape_span=0.5),
    # PyHessian's study on CIFAR-10 (prepared tensorflow-datasets data; never downloaded)
    "paper": dict(name="paper", variants=list(_PYHESSIAN_VARIANTS), dataset="cifar10",
                  epochs=160, batch_size=128, learning_rate=0.1, augment=True,
                  checkpoints=[10, 40, 80, 160], hessian_batch_size=512, top_k=2,
                  eigen_iters=50, trace_probes=100, density_runs=3, density_steps=90,
                  landscape_grid=21, landscape_span=1.0),
}


def study_preset(name, **overrides):
    """A preset's :class:`StudyConfig` (validated), with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}.")
    return StudyConfig(**{**PRESETS[name], **overrides}).validate()


def hvps_per_checkpoint(config):
    """The most HVPs one checkpoint's measurements take (Lanczos may stop earlier)."""
    return (config.top_k * config.eigen_iters          # top-k eigenvalues, whole model
            + config.trace_probes                      # hessian_trace
            + config.trace_probes                      # layer_traces by part
            + len(STAGES) * config.eigen_iters         # each stage's top eigenvalue
            + config.density_runs * config.density_steps)  # SLQ


def study_plan(config, seconds_per_step=None, seconds_per_hvp=None):
    """What ``config`` costs: optimiser steps, HVPs (upper bounds) and loss evaluations.

    With measured ``seconds_per_step`` and ``seconds_per_hvp`` (one HVP on the Hessian
    batch) for the target machine, also ``hours`` (for the deepest variant's costs, an
    upper bound for the others).
    """
    n_train = _TRAIN_SIZES[config.dataset] if config.train_examples is None else config.train_examples
    steps = math.ceil(n_train / config.batch_size) * config.epochs
    per_ckpt = hvps_per_checkpoint(config)
    landscape_hvps = 2 * config.eigen_iters
    variants = len(config.variants)
    out = {"variants": variants, "dataset": config.dataset, "steps_per_variant": steps,
           "checkpoints_per_variant": len(config.checkpoints),
           "hvps_per_checkpoint": per_ckpt, "landscape_hvps": landscape_hvps,
           "landscape_losses": config.landscape_grid ** 2,
           "steps": variants * steps,
           "hvps": variants * (len(config.checkpoints) * per_ckpt + landscape_hvps),
           "hessian_batch_size": config.hessian_batch_size}
    if seconds_per_step is not None and seconds_per_hvp is not None:
        out["hours"] = round((out["steps"] * seconds_per_step + out["hvps"] * seconds_per_hvp) / 3600.0, 3)
    return out
