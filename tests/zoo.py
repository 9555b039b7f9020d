"""A zoo of tiny float64 Keras models, each with its objective written out by hand.

Every case is a :class:`Case`: ``build()`` returns ``(model, x, y)`` with the model built,
its weights fixed by a seed and compiled (``model.compile(loss=..., loss_weights=...)``),
so the package's default ``loss=None`` path is what the tests exercise; ``objective(model,
x, y)`` is the same scalar written out independently of keras_hesstrace and of Keras's
compiled loss (hand-written cross-entropy / squared error, loss weights, regularisers).

The models hold a few hundred parameters at most (the full Hessian is a reference), except
the ``keras.applications`` case (``reference=None``), on which only H·v for one vector is
checked against finite differences. ``reference="fd"`` marks models where ``tape.jacobian``
is no reference: TensorFlow's second derivatives through ``tf.nn.moments`` (LayerNormalization,
GroupNormalization) are wrong because it stops the gradient through the mean, and its pfor
fails on grouped convolutions; for them the tests build the Hessian from central differences
of the (exact) gradient instead.

Regulariser factors are exact in float32 (Keras keeps them as float32 even in float64 models).
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import tensorflow as tf
import keras

import models_for_tests as mt

F64 = "float64"
BATCH = 8
L2_KERNEL = 0.03125  # 2**-5, exact in float32
L2_ACTIVITY = 0.0625  # 2**-4
SGD_RATE = 0.01


@dataclass(frozen=True)
class Case:
    """One zoo model.

    Attributes:
        name: the test id.
        build: ``() -> (model, x, y)``; deterministic (same weights and data every call).
        objective: ``(model, x, y) -> scalar float64 tensor``, written out by hand.
        reference: how the tests get the full Hessian: ``"jacobian"`` (tape.jacobian of
            the gradient, exact to round-off where TensorFlow's second derivatives are
            right), ``"fd"`` (central differences of the gradient, column by column:
            where tape.jacobian is wrong or fails), or ``None`` (too big: only H·v for
            one vector against finite differences).
        why: why the reference is not tape.jacobian.
        fd_eps: the relative finite-difference step (smaller where ReLU kinks are near).
    """

    name: str
    build: Callable
    objective: Callable
    reference: str = "jacobian"
    why: str = ""
    fd_eps: float = 1e-4

    @property
    def big(self):
        return self.reference is None

    def __repr__(self):
        return f"Case({self.name})"


MOMENTS = "tf.nn.moments stops the gradient through the mean: tape.jacobian's second derivatives are wrong"
GROUPED = "tape.jacobian (pfor) fails on the grouped Conv2DBackpropFilter"


# ------------------------------------------------------------------ hand-written losses


def xent(y, logits):
    """Mean sparse softmax cross-entropy from logits, in float64."""
    logits = tf.cast(logits, tf.float64)
    y = tf.cast(y, tf.int32)
    return tf.reduce_mean(tf.reduce_logsumexp(logits, axis=-1) - tf.gather(logits, y, axis=-1, batch_dims=1))


def xent_probs(y, probs):
    """Mean sparse cross-entropy of softmax probabilities (far from Keras's 1e-7 clipping here)."""
    probs = tf.cast(probs, tf.float64)
    y = tf.cast(y, tf.int32)
    return -tf.reduce_mean(tf.math.log(tf.gather(probs, y, axis=-1, batch_dims=1)))


def mse(y, pred):
    pred = tf.cast(pred, tf.float64)
    return tf.reduce_mean(tf.square(pred - tf.cast(y, tf.float64)))


def xent_objective(model, x, y):
    return xent(y, model(x, training=False))


def _scce64():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)


def _compile(model, loss, **kwargs):
    model.compile(optimizer=keras.optimizers.SGD(SGD_RATE), loss=loss, jit_compile=False, **kwargs)
    return model


def _labels(rng, n=BATCH, classes=3):
    return rng.integers(0, classes, size=n)


def _randomise(layer, rng, scale=0.3):
    """Give a normalisation layer's scale and offset generic values (not 1 and 0)."""
    layer.gamma.assign(rng.uniform(0.5, 1.5, size=layer.gamma.shape))
    layer.beta.assign(scale * rng.normal(size=layer.beta.shape))


# ----------------------------------------------------------------------- today's models


def _today(factory, shape):
    def build():
        model = factory()
        x, y = mt.data(shape=shape, n=BATCH)
        return _compile(model, _scce64()), x, y

    return build


# ------------------------------------------------------------------------- recurrent


def _embedding_rnn(cell, loss):
    def build(seed=1):
        keras.utils.set_random_seed(seed)
        inp = keras.Input((5,), dtype="int32")
        h = keras.layers.Embedding(
            10, 3, embeddings_initializer=keras.initializers.RandomNormal(stddev=0.7, seed=seed), dtype=F64, name="embed"
        )(inp)
        h = cell(4, dtype=F64, name="rnn")(h)
        out = keras.layers.Dense(3, dtype=F64, name="head")(h)
        model = keras.Model(inp, out, name=f"embedding_{cell.__name__.lower()}")
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 10, size=(BATCH, 5)).astype("int32")
        return _compile(model, loss()), x, _labels(rng)

    return build


def build_bidirectional_gru(seed=2):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4, 2), dtype=F64)
    h = keras.layers.Bidirectional(keras.layers.GRU(3, dtype=F64), dtype=F64, name="bigru")(inp)
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    model = keras.Model(inp, out, name="bidirectional_gru")
    rng = np.random.default_rng(seed)
    return _compile(model, _scce64()), rng.normal(size=(BATCH, 4, 2)), _labels(rng)


def build_simple_rnn(seed=3):
    """SimpleRNN with a softmax head, compiled with the loss *name* (probabilities, not logits)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5, 2), dtype=F64)
    h = keras.layers.SimpleRNN(4, dtype=F64, name="rnn")(inp)
    out = keras.layers.Dense(3, activation="softmax", dtype=F64, name="head")(h)
    model = keras.Model(inp, out, name="simple_rnn")
    rng = np.random.default_rng(seed)
    return _compile(model, "sparse_categorical_crossentropy"), rng.normal(size=(BATCH, 5, 2)), _labels(rng)


def simple_rnn_objective(model, x, y):
    return xent_probs(y, model(x, training=False))


# ----------------------------------------------------------------------- normalisation


def build_transformer(seed=4):
    """One Transformer encoder block: self-attention and a GELU feed-forward, each + residual + LayerNorm."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4, 4), dtype=F64)
    att = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, dtype=F64, name="mha")(inp, inp)
    h = keras.layers.LayerNormalization(dtype=F64, name="ln1")(keras.layers.Add(dtype=F64)([inp, att]))
    f = keras.layers.Dense(8, activation="gelu", dtype=F64, name="ff1")(h)
    f = keras.layers.Dense(4, dtype=F64, name="ff2")(f)
    h = keras.layers.LayerNormalization(dtype=F64, name="ln2")(keras.layers.Add(dtype=F64)([h, f]))
    h = keras.layers.GlobalAveragePooling1D(dtype=F64)(h)
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    model = keras.Model(inp, out, name="transformer")
    rng = np.random.default_rng(seed)
    for name in ("ln1", "ln2"):
        _randomise(model.get_layer(name), rng)
    return _compile(model, _scce64()), rng.normal(size=(6, 4, 4)), _labels(rng, 6)


def build_groupnorm_cnn(seed=5):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5, 5, 2), dtype=F64)
    h = keras.layers.Conv2D(4, 3, dtype=F64, name="conv")(inp)
    h = keras.layers.GroupNormalization(groups=2, dtype=F64, name="gn")(h)
    h = keras.layers.Activation("tanh", dtype=F64)(h)
    h = keras.layers.Flatten(dtype=F64)(h)
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    model = keras.Model(inp, out, name="groupnorm_cnn")
    rng = np.random.default_rng(seed)
    _randomise(model.get_layer("gn"), rng)
    return _compile(model, _scce64()), rng.normal(size=(BATCH, 5, 5, 2)), _labels(rng)


def build_layernorm_mlp(seed=6):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,), dtype=F64)
    h = keras.layers.Dense(6, dtype=F64, name="hidden")(inp)
    h = keras.layers.LayerNormalization(dtype=F64, name="ln")(h)
    h = keras.layers.Activation("tanh", dtype=F64)(h)
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    model = keras.Model(inp, out, name="layernorm_mlp")
    rng = np.random.default_rng(seed)
    _randomise(model.get_layer("ln"), rng)
    return _compile(model, _scce64()), rng.normal(size=(BATCH, 5)), _labels(rng)


def layer_norm(h, gamma, beta, epsilon):
    """LayerNormalization over the last axis, written out: the variance keeps the mean's gradient."""
    mean = tf.reduce_mean(h, axis=-1, keepdims=True)
    var = tf.reduce_mean(tf.square(h - mean), axis=-1, keepdims=True)
    return (h - mean) / tf.sqrt(var + epsilon) * gamma + beta


def layernorm_mlp_by_hand(model, x, y):
    """The layernorm_mlp's objective with its forward pass written out (hand-written LayerNorm)."""
    hidden, ln, head = (model.get_layer(n) for n in ("hidden", "ln", "head"))
    h = tf.matmul(tf.cast(x, tf.float64), hidden.kernel) + hidden.bias
    h = tf.tanh(layer_norm(h, ln.gamma, ln.beta, ln.epsilon))
    return xent(y, tf.matmul(h, head.kernel) + head.bias)


# ------------------------------------------------------------------------ convolutions


def _conv_model(name, input_shape, layer, pool, seed):
    def build():
        keras.utils.set_random_seed(seed)
        inp = keras.Input(input_shape, dtype=F64)
        h = layer()(inp)
        h = (keras.layers.Flatten(dtype=F64) if pool == "flatten" else keras.layers.GlobalAveragePooling2D(dtype=F64))(h)
        out = keras.layers.Dense(3, dtype=F64, name="head")(h)
        model = keras.Model(inp, out, name=name)
        rng = np.random.default_rng(seed)
        return _compile(model, _scce64()), rng.normal(size=(BATCH,) + input_shape), _labels(rng)

    return build


def build_conv1d(seed=7):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 2), dtype=F64)
    h = keras.layers.Conv1D(3, 3, activation="tanh", dtype=F64, name="conv")(inp)
    h = keras.layers.Flatten(dtype=F64)(h)
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    model = keras.Model(inp, out, name="conv1d")
    rng = np.random.default_rng(seed)
    return _compile(model, _scce64()), rng.normal(size=(BATCH, 6, 2)), _labels(rng)


# --------------------------------------------------------------------------- losses


def build_multi_output(seed=8):
    """Two heads, a dict of outputs, compiled with a loss dict and loss_weights (dict targets)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,), dtype=F64)
    h = keras.layers.Dense(6, activation="tanh", dtype=F64, name="trunk")(inp)
    cls = keras.layers.Dense(3, dtype=F64, name="cls")(h)
    reg = keras.layers.Dense(2, dtype=F64, name="reg")(h)
    model = keras.Model(inp, {"cls": cls, "reg": reg}, name="multi_output")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, 5))
    y = {"cls": _labels(rng), "reg": rng.normal(size=(BATCH, 2))}
    _compile(
        model,
        {"cls": _scce64(), "reg": keras.losses.MeanSquaredError(dtype=F64)},
        loss_weights={"cls": 0.75, "reg": 0.5},
    )
    return model, x, y


def multi_output_objective(model, x, y):
    out = model(x, training=False)
    return 0.75 * xent(y["cls"], out["cls"]) + 0.5 * mse(y["reg"], out["reg"])


def build_loss_weight_single(seed=9):
    model = mt.mlp(seed=seed)
    x, y = mt.data(seed=seed, n=BATCH)
    return _compile(model, _scce64(), loss_weights=[0.25]), x, y


def loss_weight_single_objective(model, x, y):
    return 0.25 * xent_objective(model, x, y)


def build_regularised(seed=10):
    """Kernel L2 on both layers and an L2 activity regulariser on the hidden layer."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,), dtype=F64)
    h = keras.layers.Dense(
        6, activation="tanh", kernel_regularizer=keras.regularizers.L2(L2_KERNEL),
        activity_regularizer=keras.regularizers.L2(L2_ACTIVITY), dtype=F64, name="hidden",
    )(inp)
    out = keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(L2_KERNEL), dtype=F64, name="head")(h)
    model = keras.Model(inp, out, name="regularised")
    rng = np.random.default_rng(seed)
    # Keras 3.15's CompileLoss takes its dtype from floatx() when compile() runs: compiled
    # under float32 it casts the data loss to float32, and model.compute_loss (so model.fit)
    # of a float64 model with regularisers fails adding the float64 regularisation losses.
    previous = keras.config.floatx()
    keras.config.set_floatx(F64)
    try:
        _compile(model, _scce64())
    finally:
        keras.config.set_floatx(previous)
    return model, rng.normal(size=(BATCH, 5)), _labels(rng)


def regularised_objective(model, x, y):
    """Data loss + λ_k (‖W_hidden‖² + ‖W_head‖²) + λ_a Σ h² / batch (Keras divides activity losses by the batch)."""
    hidden, head = model.get_layer("hidden"), model.get_layer("head")
    x = tf.cast(x, tf.float64)
    h = tf.tanh(tf.matmul(x, hidden.kernel) + hidden.bias)
    logits = tf.matmul(h, head.kernel) + head.bias
    kernel = L2_KERNEL * (tf.reduce_sum(tf.square(hidden.kernel)) + tf.reduce_sum(tf.square(head.kernel)))
    activity = L2_ACTIVITY * tf.reduce_sum(tf.square(h)) / tf.cast(tf.shape(x)[0], tf.float64)
    return xent(y, logits) + kernel + activity


# ---------------------------------------------------------------------- at scale


def build_mobilenet_v3(seed=11):
    """keras.applications.MobileNetV3Small (weights=None, float64, 32x32, alpha 0.75, minimalistic) + a Dense head."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(F64)
    try:
        keras.utils.set_random_seed(seed)
        base = keras.applications.MobileNetV3Small(
            input_shape=(32, 32, 3), alpha=0.75, minimalistic=True, include_top=False, weights=None, pooling="avg",
        )
        out = keras.layers.Dense(3, dtype=F64, name="head")(base.output)
        model = keras.Model(base.input, out, name="mobilenet_v3_small")
    finally:
        keras.config.set_dtype_policy(previous)
    rng = np.random.default_rng(seed)
    # Generic BatchNorm statistics and offsets: at Keras's initial values (0 and 1) whole
    # channels are exactly zero before a ReLU, a kink that every finite step crosses.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            _randomise(layer, rng, scale=0.1)
            layer.moving_mean.assign(0.1 * rng.normal(size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=layer.moving_variance.shape))
    x = rng.uniform(0.0, 255.0, size=(4, 32, 32, 3))
    return _compile(model, _scce64()), x, _labels(rng, 4)


# ----------------------------------------------------------------------------- the zoo


CASES = [
    # today's models (tests/models_for_tests.py)
    Case("mlp", _today(mt.mlp, (5,)), xent_objective),
    Case("cnn_bn", _today(mt.cnn_bn, (6, 6, 2)), xent_objective),
    Case("shared", _today(mt.shared, (4,)), xent_objective),
    Case("nested", _today(mt.nested, (5,)), xent_objective),
    Case("subclassed", _today(mt.subclassed, (5,)), xent_objective),
    # recurrent (not unrolled) and embeddings
    Case("embedding_lstm", _embedding_rnn(keras.layers.LSTM, _scce64), xent_objective),
    # a float64 model compiled with a default (float32) Loss object
    Case("embedding_gru", _embedding_rnn(keras.layers.GRU, lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)), xent_objective),
    Case("bidirectional_gru", build_bidirectional_gru, xent_objective),
    Case("simple_rnn", build_simple_rnn, simple_rnn_objective),
    # normalisation whose moments TensorFlow differentiates twice wrongly
    Case("transformer", build_transformer, xent_objective, "fd", MOMENTS),
    Case("groupnorm_cnn", build_groupnorm_cnn, xent_objective, "fd", MOMENTS),
    Case("layernorm_mlp", build_layernorm_mlp, xent_objective, "fd", MOMENTS),
    # convolutions
    Case("depthwise_conv2d", _conv_model(
        "depthwise_conv2d", (6, 6, 2),
        lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="tanh", dtype=F64, name="conv"), "flatten", 12),
        xent_objective),
    Case("separable_conv2d", _conv_model(
        "separable_conv2d", (6, 6, 2),
        lambda: keras.layers.SeparableConv2D(4, 3, activation="tanh", dtype=F64, name="conv"), "avg", 13),
        xent_objective),
    Case("grouped_conv2d", _conv_model(
        "grouped_conv2d", (6, 6, 4),
        lambda: keras.layers.Conv2D(4, 3, groups=2, activation="tanh", dtype=F64, name="conv"), "flatten", 14),
        xent_objective, "fd", GROUPED),
    Case("conv1d", build_conv1d, xent_objective),
    # compiled losses
    Case("multi_output", build_multi_output, multi_output_objective),
    Case("loss_weight_single", build_loss_weight_single, loss_weight_single_objective),
    Case("regularised", build_regularised, regularised_objective),
    # at scale: H·v against finite differences only
    # (ReLU everywhere: steps of 1e-4 cross kinks; at 1e-6 central differences agree with
    # reverse-over-reverse to 6e-11, and the test checks two steps agree)
    Case("mobilenet_v3_small", build_mobilenet_v3, xent_objective, None, "265,419 parameters", fd_eps=1e-6),
]

BY_NAME = {case.name: case for case in CASES}
