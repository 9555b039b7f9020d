"""Hessian-vector products of a Keras model's loss (Pearlmutter), compiled once per model.

The loss is L(θ) = loss(y, model(x, training=False)) + sum(model.losses), exactly as
Keras computes it (``keras_hesstrace.losses``). Normalisation layers run in inference
mode, so BatchNorm uses its moving statistics and leaves them unchanged; the moments
that LayerNormalization and GroupNormalization compute get exact second derivatives
while the functions are traced (``keras_hesstrace._second_order``).

Two ways to differentiate twice, which give the same vector where both are right:
  - ``mode="forward"``: forward-over-reverse, a ForwardAccumulator around the gradient
    tape (the JVP of the gradient along v); as fast as reverse and about half its
    memory (ResNet-18, batch 128, CPU: 1.31x a gradient's peak memory against 2.39x);
  - ``mode="reverse"``: reverse-over-reverse, ∇_θ(∇_θ L · v), two nested GradientTapes;
    right on every layer Keras ships, and several probes can share one forward and
    first backward pass (``probes_per_call``).
  - ``mode="auto"`` (the default): when the operator first sees a batch it computes one
    H·v in both modes on a fixed random vector. Forward mode is used when it runs and
    agrees with reverse to float tolerance; otherwise reverse, with one warning naming
    the layers (TensorFlow's forward mode cannot differentiate through the while loop
    of a non-unrolled RNN, and is silently wrong through grouped convolutions). The
    choice and the check are recorded on the operator (``op.mode``, ``op.mode_check``)
    and on the results.

The two bodies themselves are in ``keras_hesstrace.hvp_bodies``; ``HessianOperator``
(``keras_hesstrace.hessian_products``, also importable from here) compiles them; this
module caches the operators on the model (``hessian_operator``) and offers the one-call
product (``hvp``).
"""

from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf
import keras

from keras_hesstrace.distribute import effective_strategy
from keras_hesstrace.groups import check_model
from keras_hesstrace.hessian_products import DEFAULT_MODE, MODES, HessianOperator, check_mode
from keras_hesstrace.losses import loss_key

__all__ = ["DEFAULT_MODE", "MODES", "HessianOperator", "check_mode", "hessian_operator", "hvp"]


# The attribute of a model that holds its cached operators (hessian_operator); the callback
# swaps it to keep a mixed-precision model's float32 operators apart.
OPERATOR_CACHE_ATTR = "_hesstrace_operators"
# Operators kept per model (least recently used dropped first): bounds the memory of
# compiled functions when a caller keeps asking for new losses or blocks.
OPERATOR_CACHE_SIZE = 16
# Block operators (a Hessian over some variables: ``layer_traces(scheme="restricted")`` makes
# one per layer) are kept apart, up to this many per model, so a deep network's layers do not
# push out each other or the whole-model operators.
BLOCK_OPERATOR_CACHE_SIZE = 512


def hessian_operator(
    model: keras.Model,
    loss=None,
    variable_indices: tuple[int, ...] | None = None,
    mode: str = DEFAULT_MODE,
    jit_compile: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> HessianOperator:
    """The cached :class:`HessianOperator` for these settings (built on first use).

    ``strategy``: a ``tf.distribute.Strategy`` (default: the one the model was built
    under, if any); one with a single replica runs the plain path.

    The cache lives on the model object (not in a module-level registry), so it is
    freed with the model and holds no hidden global state. It is keyed by what the loss
    computes (a ``keras.losses.Loss`` by its class and config, so a new but equal loss
    object reuses the compiled functions) and holds at most ``OPERATOR_CACHE_SIZE``
    whole-model and ``BLOCK_OPERATOR_CACHE_SIZE`` block operators per model, the least
    recently used of each kind dropped first, with a warning.
    """
    check_model(model)
    per_model = model.__dict__.get(OPERATOR_CACHE_ATTR)
    if per_model is None:
        per_model = {}
        # Bypass Keras attribute tracking: this is not model state to save.
        object.__setattr__(model, OPERATOR_CACHE_ATTR, per_model)
    strategy = effective_strategy(model, strategy)
    block = None if variable_indices is None else tuple(variable_indices)
    key = (loss_key(model, loss), block, mode, bool(jit_compile), id(strategy))
    op = per_model.pop(key, None)
    if op is None:
        limit = OPERATOR_CACHE_SIZE if block is None else BLOCK_OPERATOR_CACHE_SIZE
        same_kind = [k for k in per_model if (k[1] is None) == (block is None)]
        if len(same_kind) >= limit:
            per_model.pop(same_kind[0])  # the least recently used of its kind
            warnings.warn(
                f"hessian_operator: more than {limit} {'whole-model' if block is None else 'block'} operators on "
                "this model (losses, blocks or modes); the least recently used was dropped and will be "
                "traced again if used. Pass the same loss (or an equal keras.losses.Loss) "
                "to reuse compiled functions.", RuntimeWarning, stacklevel=2)
        op = HessianOperator(model, loss, variable_indices, mode, jit_compile, strategy)
    per_model[key] = op  # most recently used last
    return op


def hvp(
    model: keras.Model,
    x,
    y,
    vector: list,
    loss=None,
    mode: str = DEFAULT_MODE,
    jit_compile: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> list[tf.Tensor]:
    """Hessian-vector product H v of the model's loss on one batch.

    Args:
        model: a built ``keras.Model``; it runs with ``training=False``.
        x: inputs, shape [batch, ...] (array, tensor or a nest of them).
        y: targets, shape [batch, ...].
        vector: list of arrays shaped like ``model.trainable_variables``.
        loss: ``None`` (the compiled loss), a ``keras.losses.Loss``, a name or a
            callable ``(y_true, y_pred)``; ``model.losses`` (regularisers) are added.
        mode: "auto" (the default: forward-over-reverse where a one-time check shows it
            agrees with reverse-over-reverse, else reverse), "forward" or "reverse".
        jit_compile: compile the product with XLA.
        strategy: a ``tf.distribute.Strategy`` to split the batch over its replicas
            (default: the one the model was built under, if any).

    Returns:
        list of tensors shaped like ``model.trainable_variables``: H v.

    Example (x [8, 4], y [8] labels, a compiled classifier):
        >>> v = [tf.ones_like(w) for w in model.trainable_variables]
        >>> hv = keras_hesstrace.hvp(model, x, y, v)
        >>> [tuple(h.shape) for h in hv] == [tuple(w.shape) for w in model.trainable_variables]
        True
        >>> keras_hesstrace.hessian_operator(model).mode   # what mode="auto" chose for this model
        'forward'
    """
    op = hessian_operator(model, loss, None, mode, jit_compile, strategy)
    hv, loss_value = op.matvec(x, y, vector)
    if not np.isfinite(float(loss_value)):
        warnings.warn(f"The loss is not finite ({float(loss_value)}): the Hessian-vector product is meaningless.", RuntimeWarning, stacklevel=2)
    return hv
