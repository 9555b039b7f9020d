"""Exact references for the tests, written independently of the package's code paths.

The full Hessian comes from ``tape.jacobian`` of the flattened gradient; the loss is
written out here (data loss + model.losses) rather than taken from keras_hesstrace.
A second reference, central differences of the gradient (``fd_hvp``, ``fd_hessian``),
takes first derivatives only, so it also holds where TensorFlow's second derivatives do
not (LayerNormalization / GroupNormalization through tf.nn.moments).
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


# ------------------------------------------------------------- central finite differences
#
# A second reference that shares nothing with the package's (or tape.jacobian's) second
# derivatives: the Hessian-vector product as central differences of the gradient,
#   D(h) = (g(θ + h v) − g(θ − h v)) / 2h = H v + h² c₃ + h⁴ c₅ + ...,
# with Richardson's extrapolation R = (4 D(h/2) − D(h)) / 3 = H v + O(h⁴). Only first
# derivatives are taken (one tf.GradientTape), and those are exact even where TensorFlow's
# second derivatives are not (tf.nn.moments' stop_gradient on the mean). Measured on the mlp
# and cnn_bn models against tape.jacobian (relative error of H·v, random v):
#   eps        1e-2     1e-3     1e-4     1e-5     1e-6
#   central    2e-3     2e-5     2e-7     2e-9     4e-11     (mlp)
#   Richardson 1e-6     1e-10    1e-12    1e-11    9e-11     (mlp)
#   Richardson 3e-5     3e-9     1e-12    9e-12    1e-10     (cnn_bn)
# so the default is Richardson at eps = 1e-4: truncation (eps⁴) and round-off (~1e-16/eps)
# balance there.

FD_EPS = 1e-4


class FlatGradient:
    """The gradient of ``objective()`` w.r.t. ``model.trainable_variables``, flat float64 numpy.

    ``objective`` is a zero-argument callable returning the scalar (a closure over the model
    and the batch), written out in the test. The gradient is compiled once (first order
    only); IndexedSlices (Embedding) are densified.
    """

    def __init__(self, model, objective):
        self.model = model
        self.variables = list(model.trainable_variables)
        variables = self.variables

        @tf.function
        def gradient():
            with tf.GradientTape() as tape:
                value = objective()
            grads = tape.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float64), [-1]) for g in grads], axis=0)

        self._gradient = gradient

    def __call__(self):
        return self._gradient().numpy()


def _as_flat(vector, variables):
    if isinstance(vector, (list, tuple)):
        return flatten(vector)
    vector = np.asarray(vector, dtype=np.float64).ravel()
    if vector.size != sum(sizes(variables)):
        raise ValueError(f"vector has {vector.size} entries; the variables hold {sum(sizes(variables))}.")
    return vector


def fd_step(variables, v, eps=FD_EPS):
    """The step h for direction v: eps times the weights' RMS (at least 1) over v's RMS."""
    theta = flatten(variables)
    rms = lambda a: float(np.sqrt(np.mean(np.square(a))))  # noqa: E731
    return eps * max(1.0, rms(theta)) / rms(v)


def fd_hvp(model, objective, v, eps=FD_EPS, richardson=True, step=None, gradient=None):
    """H·v of ``objective()`` at the current weights by central differences of the gradient.

    Args:
        model: the Keras model; its trainable variables are set to θ ± h v and restored
            (bit-identically, also on error).
        objective: zero-argument callable -> scalar tensor (ignored when ``gradient`` is given).
        v: flat array [n] or a list of arrays shaped like ``model.trainable_variables``.
        eps: relative step (see :func:`fd_step`).
        richardson: extrapolate from steps h and h/2 (error O(h⁴)) instead of one central
            difference (O(h²)).
        step: an absolute step h instead of eps.
        gradient: a :class:`FlatGradient` to reuse (saves compiling one per call).

    Returns:
        float64 numpy [n]: H v.
    """
    variables = list(model.trainable_variables)
    grad = gradient if gradient is not None else FlatGradient(model, objective)
    v = _as_flat(v, variables)
    h = fd_step(variables, v, eps) if step is None else float(step)
    theta = [var.numpy().copy() for var in variables]
    parts = unflatten(v, variables)

    def gradient_at(s):
        for var, t, d in zip(variables, theta, parts):
            var.assign((t.astype(np.float64) + s * d).astype(t.dtype))
        return grad()

    def central(s):
        return (gradient_at(s) - gradient_at(-s)) / (2.0 * s)

    try:
        if not richardson:
            return central(h)
        return (4.0 * central(h / 2.0) - central(h)) / 3.0
    finally:
        for var, t in zip(variables, theta):
            var.assign(t)


def fd_hessian(model, objective, eps=FD_EPS, gradient=None):
    """The full Hessian [n, n] by central differences (Richardson), one column per coordinate.

    Column i is fd_hvp along e_i with the step eps * max(1, RMS(θ)); the result is
    symmetrised, (H + Hᵀ) / 2 (the asymmetry of :func:`fd_hessian_raw` measures the error).
    """
    H = fd_hessian_raw(model, objective, eps, gradient)
    return (H + H.T) / 2.0


def fd_hessian_raw(model, objective, eps=FD_EPS, gradient=None):
    """The finite-difference Hessian before symmetrising (column i = H e_i)."""
    variables = list(model.trainable_variables)
    grad = gradient if gradient is not None else FlatGradient(model, objective)
    n = sum(sizes(variables))
    step = eps * max(1.0, float(np.sqrt(np.mean(np.square(flatten(variables))))))
    H = np.empty((n, n))
    e = np.zeros(n)
    for i in range(n):
        e[i] = 1.0
        H[:, i] = fd_hvp(model, None, e, step=step, gradient=grad)
        e[i] = 0.0
    return H


def exact_hessian_of(model, objective):
    """tape.jacobian of the gradient of a zero-argument ``objective`` (as :func:`exact_hessian`)."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = objective()
        grads = inner.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        flat = tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in grads], axis=0)
    jac = outer.jacobian(flat, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    n = int(flat.shape[0])
    return np.concatenate([tf.reshape(tf.convert_to_tensor(j), [n, -1]).numpy() for j in jac], axis=1).astype(np.float64)


def relative_error(a, b):
    """‖a − b‖ / ‖b‖ (b the reference)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
