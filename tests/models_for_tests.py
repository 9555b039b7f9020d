"""Small float64 models covering the structures the estimator must handle."""

import numpy as np
import keras

F64 = "float64"


def mlp(seed=0, l2=0.0):
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(l2) if l2 else None
    inp = keras.Input((5,), dtype=F64)
    h = keras.layers.Dense(6, activation="tanh", kernel_regularizer=reg, dtype=F64, name="hidden")(inp)
    h = keras.layers.Dense(4, activation="tanh", dtype=F64, name="hidden2")(h)
    out = keras.layers.Dense(3, kernel_regularizer=reg, dtype=F64, name="head")(h)
    return keras.Model(inp, out, name="mlp")


def cnn_bn(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 2), dtype=F64)
    h = keras.layers.Conv2D(3, 3, dtype=F64, name="conv")(inp)
    h = keras.layers.BatchNormalization(dtype=F64, name="bn")(h)
    h = keras.layers.Activation("tanh", dtype=F64)(h)
    h = keras.layers.Flatten(dtype=F64)(h)
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    model = keras.Model(inp, out, name="cnn")
    bn = model.get_layer("bn")
    rng = np.random.default_rng(seed)
    bn.moving_mean.assign(rng.normal(size=3))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=3))
    bn.gamma.assign(rng.uniform(0.5, 1.5, size=3))
    return model


def shared(seed=0, activation="tanh"):
    """One Dense layer called twice: its variables are one group."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,), dtype=F64)
    layer = keras.layers.Dense(4, activation=activation, dtype=F64, name="shared")
    h = layer(layer(inp))
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    return keras.Model(inp, out, name="shared_model")


def unrolled_copy(model):
    """The shared model with the shared layer unrolled into two independent copies."""
    inp = keras.Input((4,), dtype=F64)
    activation = model.get_layer("shared").activation
    first = keras.layers.Dense(4, activation=activation, dtype=F64, name="call1")
    second = keras.layers.Dense(4, activation=activation, dtype=F64, name="call2")
    head = keras.layers.Dense(3, dtype=F64, name="head")
    out = head(second(first(inp)))
    copy = keras.Model(inp, out)
    w = model.get_layer("shared").get_weights()
    first.set_weights(w)
    second.set_weights(w)
    head.set_weights(model.get_layer("head").get_weights())
    return copy


def nested(seed=0):
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential(
        [keras.Input((6,), dtype=F64), keras.layers.Dense(5, activation="tanh", dtype=F64, name="d1"),
         keras.layers.Dense(4, activation="tanh", dtype=F64, name="d2")],
        name="inner",
    )
    inp = keras.Input((5,), dtype=F64)
    h = keras.layers.Dense(6, activation="tanh", dtype=F64, name="stem")(inp)
    h = inner(h)
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    return keras.Model(inp, out, name="outer")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed", dtype=F64)
        self.a = keras.layers.Dense(6, activation="tanh", dtype=F64, name="a")
        self.b = keras.layers.Dense(3, dtype=F64, name="b")
        self.scale = self.add_weight(shape=(3,), initializer="ones", dtype=F64, name="scale")

    def call(self, x, training=False):
        return self.b(self.a(x)) * self.scale


def subclassed(seed=0):
    keras.utils.set_random_seed(seed)
    model = Subclassed()
    model(np.zeros((1, 5)))
    model.scale.assign(np.linspace(0.5, 1.5, 3))
    return model


def data(seed=0, n=12, shape=(5,), classes=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + tuple(shape)), rng.integers(0, classes, size=n)


class Scale(keras.layers.Layer):
    """Elementwise learned scale x * s (one weight vector)."""

    def build(self, input_shape):
        self.s = self.add_weight(shape=(input_shape[-1],), initializer="ones", dtype=F64, name="s")

    def call(self, x):
        return x * self.s


def shared_scale(seed=2, unrolled=False):
    """A Scale layer called twice around a tanh (strong cross-instance curvature).

    With ``unrolled=True`` the two calls are two independent layers ("shared", "shared2")
    holding the same values: the unrolled model of the same function.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,), dtype=F64)
    first = Scale(dtype=F64, name="shared")
    second = Scale(dtype=F64, name="shared2") if unrolled else first
    h = keras.layers.Dense(4, activation="tanh", dtype=F64, name="mix")(inp)
    h = second(keras.layers.Activation("tanh", dtype=F64)(first(h)))
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    model = keras.Model(inp, out, name="shared_scale")
    s = np.random.default_rng(seed).uniform(0.5, 2.0, 4)
    for layer in (first, second):
        layer.s.assign(s)
    return model


def copy_weights(source, target):
    """Copy weights layer by layer (by name) from source into target."""
    for layer in source.layers:
        if layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())


# ------------------------------------------------ float32 classifier for callback tests


def training_classifier(seed=0, hidden=8):
    """A compiled float32 classifier [*, 4] -> 3 logits (layers "hidden", "head"), SGD 0.05:
    the model the callback tests train."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(hidden, activation="tanh", name="hidden"),
                              keras.layers.Dense(3, name="head")])
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def training_data(n=64, seed=0):
    """x float32 [n, 4] (standard normal), y int [n] in 0..2, for :func:`training_classifier`."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, size=n)
