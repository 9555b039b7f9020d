"""Exact references for the tests, written independently of the package's code paths.

The full Hessian comes from ``tape.jacobian`` of the flattened gradient; the loss is
written out here (data loss + model.losses) rather than taken from keras_hesstrace.
"""

import numpy as np
import tensorflow as tf
import keras


def objective(model, x, y, loss, include_regularisers=True):
    value = loss(y, model(x, training=False))
    if include_regularisers and model.losses:
        value = value + tf.add_n(model.losses)
    return value


def exact_hessian(model, x, y, loss, include_regularisers=True):
    """The full Hessian [n, n] (numpy float64) over model.trainable_variables, in order."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = objective(model, x, y, loss, include_regularisers)
        grads = inner.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
    jac = outer.jacobian(flat, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    n = int(flat.shape[0])
    return np.concatenate([tf.reshape(j, [n, -1]).numpy() for j in jac], axis=1).astype(np.float64)


def flatten(tensors):
    return np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in tensors])


def unflatten(vector, variables):
    out, start = [], 0
    for v in variables:
        size = int(np.prod(v.shape))
        out.append(np.asarray(vector[start : start + size]).reshape(v.shape))
        start += size
    return out


def sizes(variables):
    return [int(np.prod(v.shape)) for v in variables]


def group_block_sizes(groups):
    return [sum(int(np.prod(v.shape)) for v in vs) for vs in groups.values()]


def xent64():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
