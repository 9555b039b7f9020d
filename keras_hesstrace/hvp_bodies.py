"""The autodiff bodies of a Hessian-vector product (Pearlmutter), run inside a tf.function.

``hvp_body_many(objective, variables, x, y, vectors, mode)`` returns the loss, its
gradient and H·v for each vector, in one of the two modes ``keras_hesstrace.hvp``
describes: ``"reverse"`` (reverse-over-reverse, two nested GradientTapes; the P vectors
share one forward and first backward pass) or ``"forward"`` (forward-over-reverse, a
ForwardAccumulator around the gradient tape, one pass per vector). ``hvp_body`` is the
one-vector case. ``flat_hvp_body`` and ``flat_probe_body`` are the same on one flat
vector over all the variables (the estimators' float64 vectors; one transfer each way).
They hold no state and compile nothing: ``HessianOperator`` traces them.
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


def check_flat(variables, flat) -> tf.Tensor:
    """``flat`` as a tensor, or ValueError unless it is a float vector [n], n the variables' total size."""
    flat = tf.convert_to_tensor(flat)
    n = sum(int(np.prod(var.shape)) for var in variables)
    if flat.shape.rank != 1 or flat.shape[0] != n or not flat.dtype.is_floating:
        raise ValueError(f"flat must be a float vector of shape ({n},), not {flat.dtype.name} {flat.shape}.")
    return flat


def split_flat(variables, flat: tf.Tensor) -> list[tf.Tensor]:
    """A flat vector [n] (any float dtype) as tensors shaped and typed like ``variables``.

    Each part is cast to its variable's dtype (round to nearest, as ``tf.constant`` of a
    float64 array with a float32 dtype does).
    """
    sizes = [int(np.prod(var.shape)) for var in variables]
    parts = tf.split(flat, sizes) if len(sizes) > 1 else [flat]
    return [tf.cast(tf.reshape(p, var.shape), var.dtype) for p, var in zip(parts, variables)]


def concat_flat(tensors) -> tf.Tensor:
    """Tensors (any shapes and float dtypes) as one float64 vector [n], in order."""
    return tf.concat([tf.reshape(tf.cast(t, tf.float64), [-1]) for t in tensors], axis=0)


def flat_hvp_body(objective, variables, x, y, flat: tf.Tensor, mode: str) -> list[tf.Tensor]:
    """[Hv flat float64 [n], loss float64] for a flat vector ``flat`` [n]; runs inside a tf.function.

    ``flat`` is split into the variables' shapes and dtypes (:func:`split_flat`), the
    product is :func:`hvp_body`'s in ``mode``, and Hv comes back concatenated as float64.
    """
    loss, _, hv = hvp_body(objective, variables, x, y, split_flat(variables, flat), mode)
    return [concat_flat(hv), tf.cast(loss, tf.float64)]


def flat_probe_body(variables, seed: tf.Tensor, probe: str, streams) -> tf.Tensor:
    """The probe ``draw_probe(variables, seed, probe, streams)`` as one float64 vector [n].

    Casting a drawn entry (±1, or a normal in the variable's dtype) to float64 is exact, so
    the vector equals the eager draw's parts concatenated as float64, bit for bit.
    """
    return concat_flat(draw_probe(variables, seed, probe, streams=streams))


def random_vectors(variables, seeds, probe, streams=None):
    """P probe vectors from the stateless seeds [P, 2] (``keras_hesstrace.probes.draw_probe``,
    variable j drawn from stream ``streams[j]``, default j)."""
    return [draw_probe(variables, seeds[i], probe, streams) for i in range(int(seeds.shape[0]))]


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
