"""The scalar objective whose Hessian is taken: the loss exactly as Keras computes it.

L(θ) = Σ_k w_k loss_k(y_k, f_k(x; θ)) + Σ model.losses, with ``model(x, training=False)``:
one term per output of a multi-output model (a loss dict or list given to
``model.compile``, weighted by its ``loss_weights``), a single output's
``loss_weights`` included, and the regularisation losses added. This is
``model.compute_loss`` on the same batch, computed in the model's float dtype: a
float64 model gets a float64 loss (Keras builds its losses in ``floatx()``, float32,
which would make a float64 Hessian only float32-accurate).

Keras's own loss container (``CompileLoss``) matches targets to outputs and applies
the weights; this module builds a private copy of it whose losses compute in the
model's dtype, so the model's own container (and its loss metrics) are left alone.
"""

from __future__ import annotations

import copy
import json
import re

import tensorflow as tf

import keras
from keras.src.trainers.compile_utils import CompileLoss

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


class FunctionLoss(keras.losses.Loss):
    """A callable ``f(y_true, y_pred)`` as a Keras Loss reduced as Keras reduces it.

    The callable's output (per-example values, or already a scalar) is reduced by
    its mean over all elements ("sum_over_batch_size"), as ``model.compile(loss=f)``
    does. ``y_true`` and ``y_pred`` may be nests (dicts of outputs).
    """

    def __init__(self, fn, dtype):
        name = getattr(fn, "__name__", "")
        # Keras uses the name as a TF name scope: keep it a valid one ("<lambda>" is not).
        name = name if re.fullmatch(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*", name) else "loss"
        super().__init__(name=name, dtype=dtype)
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def loss_dtype(model: keras.Model) -> str:
    """float64 for float64 models, else float32 (also under mixed precision)."""
    return "float64" if any(v.dtype == "float64" for v in model.trainable_variables) else "float32"


def _set_dtype(loss, dtype):
    """``loss`` (a Loss we own) made to compute in ``dtype``; returns it.

    Keras fixes a Loss's compute dtype at construction (floatx) and has no setter.
    """
    loss._dtype_policy = keras.dtype_policies.get(dtype)
    loss._dtype = loss._dtype_policy.compute_dtype
    return loss


def _in_dtype(loss, dtype):
    """A copy of one loss (Loss, name or callable) that computes in ``dtype``."""
    if isinstance(loss, keras.losses.Loss):
        if loss.dtype == dtype:
            return loss
        return _set_dtype(copy.copy(loss), dtype)
    if isinstance(loss, str):
        try:
            fn = keras.losses.get(loss)
        except ValueError as err:
            raise ValueError(f"Unknown loss {loss!r}: {err}") from None
        return _in_dtype(fn, dtype)
    if callable(loss):
        return FunctionLoss(loss, dtype)
    if loss is None:
        return None
    raise TypeError(f"loss must be None, a keras.losses.Loss, a name or a callable, not {type(loss).__name__}.")


def _container(model, losses, loss_weights, dtype):
    """A private CompileLoss over ``losses`` (a nest) computing in ``dtype``."""
    resolved = tf.nest.map_structure(lambda leaf: _in_dtype(leaf, dtype), losses)
    output_names = getattr(getattr(model, "_compile_loss", None), "output_names", None)
    if output_names is None:
        output_names = getattr(model, "output_names", None)
    return _set_dtype(CompileLoss(resolved, loss_weights, output_names=output_names), dtype)


def resolve_loss(model: keras.Model, loss=None) -> keras.losses.Loss:
    """The data-loss function ``(y_true, y_pred) -> scalar`` used for the Hessian.

    Args:
        model: the Keras model.
        loss: ``None`` for the model's compiled loss (with its ``loss_weights``; one
            loss or one per output); a ``keras.losses.Loss``; a loss name
            (``"sparse_categorical_crossentropy"``); a callable ``f(y_true, y_pred)``,
            reduced by its mean over all elements as ``model.compile`` does (it
            receives the nests as given: dicts for dict outputs); or a dict/list of
            these, one per output.

    Returns:
        a ``keras.losses.Loss`` computing in the model's float dtype (a private copy:
        the model's own loss objects are not changed).
    """
    dtype = loss_dtype(model)
    if loss is None:
        compiled = getattr(model, "_compile_loss", None)
        if compiled is None or getattr(model, "loss", None) is None:
            raise ValueError(
                f"Model {model.name!r} has no compiled loss: compile it "
                "(model.compile(loss=...)) or pass loss= (a keras.losses.Loss, a name, or a callable)."
            )
        return _container(model, compiled._user_loss, compiled._user_loss_weights, dtype)
    if isinstance(loss, (dict, list, tuple)):
        return _container(model, loss, None, dtype)
    return _in_dtype(loss, dtype)


def loss_key(model, loss):
    """A hashable key telling apart the losses a compiled function was built for."""
    if loss is None:
        # model.compile makes a new container: a recompiled model gets new functions.
        return ("compiled", id(getattr(model, "_compile_loss", None)))
    if isinstance(loss, str):
        return ("given", loss)
    if isinstance(loss, keras.losses.Loss):
        # By what it computes, so a new but equal Loss object reuses the compiled functions.
        try:
            config = json.dumps(loss.get_config(), sort_keys=True, default=repr)
        except (NotImplementedError, TypeError, ValueError):
            return ("given", loss)
        return ("given", type(loss).__module__, type(loss).__qualname__, config)
    # A callable: the object itself (the key keeps it alive, so its id is never reused).
    return ("given", loss)


def make_objective(model: keras.Model, loss=None):
    """The scalar objective ``(x, y) -> L`` (data loss + regularisation losses).

    Equals ``model.compute_loss(x, y, model(x, training=False))`` in the model's dtype.
    Raises ValueError at trace time when the loss is not a scalar.
    """
    loss_fn = resolve_loss(model, loss)
    dtype = loss_dtype(model)

    def objective(x, y):
        y_pred = model(x, training=False)
        # Mixed precision: the loss in float32.
        y_pred = tf.nest.map_structure(lambda t: tf.cast(t, dtype) if t.dtype.is_floating and t.dtype != dtype else t, y_pred)
        value = tf.convert_to_tensor(loss_fn(y, y_pred))
        if value.shape.rank is None or value.shape.rank != 0:
            raise ValueError(
                f"The loss returned shape {value.shape}, not a scalar: use a reducing loss "
                "(a keras.losses.Loss with its default reduction, or a callable reduced with a mean)."
            )
        value = _unscale_for_replicas(loss_fn, tf.cast(value, dtype))
        regularisers = model.losses
        if regularisers:
            value = value + tf.add_n([tf.reduce_sum(tf.cast(r, dtype)) for r in regularisers])
        return value

    return objective


def is_mean_reduced(loss_fn):
    """True when ``loss_fn`` is a mean over examples (so chunks of a batch can be averaged).

    For a multi-output container every per-output loss must be one.
    """
    if isinstance(loss_fn, CompileLoss):
        leaves = [leaf for leaf in tf.nest.flatten(loss_fn._user_loss) if leaf is not None]
        return all(is_mean_reduced(leaf) for leaf in leaves)
    return getattr(loss_fn, "reduction", None) in _MEAN_REDUCTIONS


def _unscale_for_replicas(loss_fn, value):
    """Undo the 1/num_replicas factor Keras mean-reducing losses apply in a replica context.

    Keras divides a mean-reduced loss by the replica count so that summed gradients
    average; the operator here averages the replicas' results explicitly instead.
    """
    if is_mean_reduced(loss_fn):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = value * tf.cast(replicas, value.dtype)
    return value


def check_mean_reduction(loss_fn, what):
    """Raise unless ``loss_fn`` is a mean over examples (averaging chunks needs that)."""
    reduction = getattr(loss_fn, "reduction", None)
    if not is_mean_reduced(loss_fn):
        raise ValueError(
            f"{what} splits the batch and averages the chunks weighted by size, which needs a "
            f"loss that is a mean over examples; this loss has reduction={reduction!r}. "
            "Use the default reduction ('sum_over_batch_size') or leave max_batch_size=None."
        )
