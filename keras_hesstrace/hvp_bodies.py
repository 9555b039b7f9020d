"""The autodiff bodies of a Hessian-vector product (Pearlmutter), run inside a tf.function.

``hvp_body_many(objective, variables, x, y, vectors, mode)`` returns the loss, its
gradient and H·v for each vector, in one of the two modes ``keras_hesstrace.hvp``
describes: ``"reverse"`` (reverse-over-reverse, two nested GradientTapes; the P vectors
share one forward and first backward pass) or ``"forward"`` (forward-over-reverse, a
ForwardAccumulator around the gradient tape, one pass per vector). ``hvp_body`` is the
one-vector case. They hold no state and compile nothing: ``HessianOperator`` traces them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_hesstrace.probes import draw_probe

_ZERO = tf.UnconnectedGradients.ZERO


def hvp_body(objective, variables, x, y, vector, mode):
    """(loss, grads, Hv) for one vector; runs inside a tf.function.

    Args:
        objective: ``(x, y) -> scalar``.
        variables: list of Keras variables (the block the Hessian is taken over).
        vector: list of tensors shaped like ``variables``.
        mode: "reverse" or "forward".
    """
    loss, grads, hvs = hvp_body_many(objective, variables, x, y, [vector], mode)
    return loss, grads, hvs[0]


def hvp_body_many(objective, variables, x, y, vectors, mode):
    """(loss, grads, [Hv_1, ..., Hv_P]) for P vectors; runs inside a tf.function.

    In reverse mode the forward pass and the first backward pass are recorded once and
    shared by the P second backward passes (a persistent outer tape); in forward mode
    each vector needs its own forward-over-reverse pass.
    """
    if mode == "reverse":
        with tf.GradientTape(persistent=len(vectors) > 1) as outer:
            with tf.GradientTape() as inner:
                loss = objective(x, y)
            grads = _dense(inner.gradient(loss, variables, unconnected_gradients=_ZERO))
            gvs = [tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vec)]) for vec in vectors]
        hvs = [_dense(outer.gradient(gv, variables, unconnected_gradients=_ZERO)) for gv in gvs]
        return loss, grads, hvs
    if mode != "forward":
        raise ValueError(f"hvp_body_many needs a resolved mode ('forward' or 'reverse'), not {mode!r}.")
    # Keras 3 variables are not accepted as primals: pass the tf.Variables.
    primals = [getattr(var, "value", var) for var in variables]
    hvs = []
    for vec in vectors:
        with tf.autodiff.ForwardAccumulator(primals, list(vec)) as acc:
            with tf.GradientTape() as tape:
                loss = objective(x, y)
            # Densified inside the accumulator: it cannot follow an IndexedSlices (Embedding).
            grads = _dense(tape.gradient(loss, variables, unconnected_gradients=_ZERO))
        hvs.append(_dense(acc.jvp(grads, unconnected_gradients=_ZERO)))
    return loss, grads, hvs


def random_vectors(variables, seeds, probe, support=None):
    """P probe vectors from the stateless seeds [P, 2] (``keras_hesstrace.probes.draw_probe``);
    ``support`` float32 [len(variables)] of 0/1 zeroes the variables of 0."""
    vectors = [draw_probe(variables, seeds[i], probe) for i in range(int(seeds.shape[0]))]
    if support is not None:
        vectors = [[v * tf.cast(support[j], v.dtype) for j, v in enumerate(vec)] for vec in vectors]
    return vectors


def coordinate_vectors(variables, index, sign):
    """P vectors, each zero but for one signed entry per variable.

    Args:
        index: int32 [P, V]: the flat entry of variable j in vector p (-1: none).
        sign: float32 [P, V]: its value.
    """
    out = []
    for p in range(int(index.shape[0])):
        vec = []
        for j, var in enumerate(variables):
            dtype = tf.as_dtype(var.dtype)
            size = int(np.prod(var.shape))
            flat = tf.one_hot(index[p, j], size, dtype=dtype) * tf.cast(sign[p, j], dtype)
            vec.append(tf.reshape(flat, var.shape))
        out.append(vec)
    return out


def _dense(tensors):
    """Gradients as dense tensors (an Embedding's gradient is a tf.IndexedSlices)."""
    return [tf.convert_to_tensor(t) for t in tensors]
