"""Second-order-correct moments while the Hessian functions are traced.

``keras.ops.moments`` on TensorFlow is ``tf.nn.moments``, which computes the variance
against ``stop_gradient(mean)``. Its first derivative is exact (the derivative of the
variance with respect to the mean is zero at the mean), its second derivative is not:
LayerNormalization, GroupNormalization and training-mode BatchNormalization then give
Hessian-vector products off by several percent (measured against central differences
of the gradient: 4.1 % for a LayerNorm MLP, 5.1 % GroupNorm, 6.9 % a Transformer block).

:func:`exact_moments` swaps in a moments function without the ``stop_gradient`` for
as long as a Hessian function is being traced, and restores Keras's own afterwards,
also on error. The forward values are the same numbers (mean of squared deviations
from the mean, computed the same way); only the graph of derivatives differs.
"""

import contextlib
import threading

import tensorflow as tf
from keras.src.backend.tensorflow import nn as _tf_nn

_LOCK = threading.RLock()
_PATCHED_NAME = "_compute_moments"


def _moments_with_exact_derivatives(x, axes, keepdims):
    """Mean and (biased) variance of ``x`` over ``axes``, differentiable to any order."""
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axis=axes, keepdims=True)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


def patch_available():
    """True when this Keras version computes moments through the function we swap."""
    return callable(getattr(_tf_nn, _PATCHED_NAME, None))


@contextlib.contextmanager
def exact_moments():
    """Within the block, Keras's TensorFlow moments have exact second derivatives.

    Only the Python function Keras calls is swapped, so the effect reaches the graphs
    traced inside the block and nothing else; re-entrant and restored on error.
    """
    if not patch_available():
        yield False
        return
    with _LOCK:
        original = getattr(_tf_nn, _PATCHED_NAME)
        setattr(_tf_nn, _PATCHED_NAME, _moments_with_exact_derivatives)
        try:
            yield True
        finally:
            setattr(_tf_nn, _PATCHED_NAME, original)
