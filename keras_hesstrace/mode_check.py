"""``mode="auto"``: which way of differentiating twice is right for this model.

TensorFlow's forward mode (a ForwardAccumulator around a GradientTape) cannot follow
a non-unrolled RNN's while loop, and is silently wrong through grouped convolutions
(``Conv2D(groups>1)`` on CPU: 53-74 % relative error, plain TensorFlow reproduces it).
Reverse-over-reverse is right on every layer Keras ships. The check computes one H·v
in both modes on a fixed random vector when an operator first sees a batch.
"""

import time
import warnings
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from keras_hesstrace.errors import error_summary

# The agreement bound, relative to |Hv|: round-off of two differently ordered
# computations in the dtype, far below the 50-70 % error seen on grouped convolutions.
TOLERANCE = {"float64": 1e-6, "float32": 1e-2}


@dataclass(frozen=True)
class ModeCheck:
    """How ``mode="auto"`` chose: one H·v in both modes on a fixed random vector.

    Attributes:
        mode: the mode chosen ("forward" or "reverse").
        reason: why, in words.
        relative_difference: ||Hv_forward - Hv_reverse|| / ||Hv_reverse|| (NaN when
            forward mode failed).
        tolerance: the agreement bound used for this dtype.
        seconds: wall time of the check, tracing both products included.
        layers: the layers (class and path) whose products differed, if any.
    """

    mode: str
    reason: str
    relative_difference: float
    tolerance: float
    seconds: float
    layers: tuple = ()


def forward_unsafe_layers(model):
    """Layers through which TensorFlow's forward mode is known to be wrong: grouped convolutions.

    Returns:
        tuple of "Class(path)" strings (empty when forward mode is safe to try).
    """
    import keras

    convs = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    return tuple(
        _label(layer)
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, convs) and int(getattr(layer, "groups", 1) or 1) > 1
    )


def forward_fallback(err, tolerance=float("nan"), seconds=0.0):
    """The :class:`ModeCheck` of a forward mode that failed: reverse, with the cause."""
    cause = f"{type(err).__name__}: {error_summary(err)}"
    return ModeCheck("reverse", f"forward mode failed ({cause[:200]})", float("nan"), tolerance, seconds)


def _label(layer):
    """ "Class(path)" of a layer, as the warnings name it."""
    return f"{type(layer).__name__}({getattr(layer, 'path', layer.name)})"


def _layer_of_variable(model):
    """{id(variable): "Class(path)"} for the innermost layer owning each trainable variable."""
    owners = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for v in layer.trainable_weights:
            owners[id(v)] = _label(layer)
    return owners


def check_modes(op, x, y):
    """Compare forward- and reverse-mode H·v of ``op`` on one batch; return a :class:`ModeCheck`.

    Args:
        op: a :class:`keras_hesstrace.hvp.HessianOperator` (its ``_matvec_in`` runs
            one product in a given mode, compiled and cached like any other).
        x, y: one batch, as tensors.

    Errors of reverse mode are raised (they are the model's or the loss's, not the
    mode's); an error of forward mode only makes reverse the choice.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    vector = [tf.constant(rng.standard_normal(tuple(v.shape)), dtype=v.dtype) for v in op.variables]
    dtype = "float64" if all(v.dtype == "float64" for v in op.variables) else "float32"
    tolerance = TOLERANCE[dtype]
    try:
        forward, _ = op._matvec_in("forward", x, y, vector)
        failure = None
    except Exception as err:  # noqa: BLE001 - any failure of forward mode means: use reverse
        forward, failure = None, err
    reverse, _ = op._matvec_in("reverse", x, y, vector)
    rev = [np.asarray(h, dtype=np.float64) for h in reverse]
    if failure is not None:
        return forward_fallback(failure, tolerance, time.perf_counter() - start)
    fwd = [np.asarray(h, dtype=np.float64) for h in forward]
    norm = np.sqrt(sum(float(np.sum(r * r)) for r in rev))
    diff = np.sqrt(sum(float(np.sum((f - r) ** 2)) for f, r in zip(fwd, rev)))
    relative = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
    seconds = time.perf_counter() - start
    if not np.isfinite(relative):
        return ModeCheck("reverse", "the check's products are not finite: reverse, right on every layer", float(relative), tolerance, seconds)
    if relative <= tolerance:
        return ModeCheck("forward", "forward and reverse agree", float(relative), tolerance, seconds)
    owners = _layer_of_variable(op.model)
    layers = []
    for var, f, r in zip(op.variables, fwd, rev):
        scale = max(float(np.linalg.norm(r)), norm * tolerance)
        if float(np.linalg.norm(f - r)) > tolerance * scale:
            name = owners.get(id(var), getattr(var, "path", var.name))
            if name not in layers:
                layers.append(name)
    warnings.warn(
        f"Forward-mode Hessian-vector products differ from reverse mode by {relative:.2g} (relative) on "
        f"this model, in the variables of {', '.join(layers)}: TensorFlow's forward mode is wrong "
        "through some layers (grouped convolutions). Using mode='reverse' for this model.",
        RuntimeWarning,
        stacklevel=3,
    )
    return ModeCheck("reverse", f"forward differs from reverse by {relative:.2g}", float(relative), tolerance, seconds, tuple(layers))
