"""mode="auto": the one-time forward-vs-reverse check, its decisions, and the moments swap."""

import warnings

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hesstrace as kh
import models_for_tests as mt
from keras_hesstrace import _second_order
from keras_hesstrace.hvp import DEFAULT_MODE, MODES, hessian_operator
from keras_hesstrace.hvp_bodies import hvp_body
from keras_hesstrace.losses import make_objective
from reference import xent64

F64 = "float64"


def _grouped_conv(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5, 5, 4), dtype=F64)
    h = keras.layers.Conv2D(4, 3, groups=2, activation="tanh", dtype=F64, name="grouped")(inp)
    h = keras.layers.Flatten(dtype=F64)(h)
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    return keras.Model(inp, out)


def _rnn(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4, 3), dtype=F64)
    h = keras.layers.SimpleRNN(3, dtype=F64, name="rnn")(inp)
    out = keras.layers.Dense(3, dtype=F64, name="head")(h)
    return keras.Model(inp, out)


def test_auto_is_the_default_everywhere():
    assert DEFAULT_MODE == "auto" and set(MODES) == {"auto", "forward", "reverse"}
    with pytest.raises(ValueError, match="mode must be one of"):
        hessian_operator(mt.mlp(), xent64(), mode="sideways")


def test_auto_keeps_forward_where_it_agrees_and_records_the_check():
    model = mt.mlp()
    x, y = mt.data()
    loss = xent64()
    op = hessian_operator(model, loss)
    assert op.mode is None and op.requested_mode == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when forward mode is right
        result = kh.layer_traces(model, x, y, num_probes=2, seed=0, loss=loss)
    assert op.mode == "forward" and result.mode == "forward"
    check = op.mode_check
    assert check.mode == "forward" and check.relative_difference <= check.tolerance == 1e-6
    assert check.seconds > 0 and check.layers == ()


def test_auto_falls_back_to_reverse_on_a_grouped_convolution_and_names_the_layer():
    model = _grouped_conv()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5, 5, 4)), rng.integers(0, 3, 6)
    loss = xent64()
    v = [rng.normal(size=w.shape) for w in model.trainable_variables]
    with pytest.warns(RuntimeWarning, match=r"Conv2D\(.*grouped"):
        auto = kh.hvp(model, x, y, v, loss=loss)
    op = hessian_operator(model, loss)
    assert op.mode == "reverse" and op.mode_check.relative_difference > 0.1
    reverse = kh.hvp(model, x, y, v, loss=loss, mode="reverse")
    flat = lambda t: np.concatenate([np.ravel(a) for a in t])  # noqa: E731
    np.testing.assert_array_equal(flat(auto), flat(reverse))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per operator, not at every call
        kh.hvp(model, x, y, v, loss=loss)
    # An explicit mode="forward" knows the layer and uses reverse too, with a warning.
    with pytest.warns(RuntimeWarning, match=r"grouped convolutions \(Conv2D\(.*grouped"):
        forward = kh.hvp(model, x, y, v, loss=loss, mode="forward")
    np.testing.assert_array_equal(flat(forward), flat(reverse))
    assert hessian_operator(model, loss, mode="forward").mode == "reverse"
    # The reason: TensorFlow's own forward-over-reverse is wrong here, silently.
    variables = model.trainable_variables
    objective = make_objective(model, loss)
    vector = [tf.constant(a) for a in v]
    raw = tf.function(lambda: hvp_body(objective, variables, tf.constant(x), tf.constant(y), vector, "forward")[2])()
    assert np.linalg.norm(flat(raw) - flat(reverse)) > 0.1 * np.linalg.norm(flat(reverse))


def test_auto_falls_back_to_reverse_where_forward_mode_fails():
    model = _rnn()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 4, 3)), rng.integers(0, 3, 5)
    loss = xent64()
    result = kh.layer_traces(model, x, y, num_probes=2, seed=0, loss=loss)
    op = hessian_operator(model, loss)
    assert result.mode == "reverse" and op.mode_check.reason.startswith("forward mode failed")
    assert np.isnan(op.mode_check.relative_difference)
    # An explicit mode="forward" falls back on its first call, never a crash.
    v = [np.ones(w.shape) for w in model.trainable_variables]
    with pytest.warns(RuntimeWarning, match="mode='forward' failed on this model.*without handle data"):
        forward = kh.hvp(model, x, y, v, loss=loss, mode="forward")
    reverse = kh.hvp(model, x, y, v, loss=loss, mode="reverse")
    for f, r in zip(forward, reverse):
        np.testing.assert_array_equal(f, r)
    assert hessian_operator(model, loss, mode="forward").mode == "reverse"


def test_errors_of_the_model_itself_are_raised_not_hidden_by_the_check():
    model = mt.mlp()
    x, y = mt.data()
    with pytest.raises(ValueError, match="not a scalar"):
        kh.hvp(model, x, y, [np.ones(w.shape) for w in model.trainable_variables],
               loss=keras.losses.MeanSquaredError(reduction=None, dtype=F64))


def test_moments_swap_keeps_forward_values_and_is_restored_on_error():
    keras.utils.set_random_seed(0)
    layer = keras.layers.LayerNormalization(dtype=F64)
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 7)) * 3 + 1)
    plain = layer(x).numpy()
    original = _second_order._tf_nn._compute_moments
    with _second_order.exact_moments() as swapped:
        assert swapped and _second_order._tf_nn._compute_moments is not original
        inside = layer(x).numpy()
    np.testing.assert_array_equal(inside, plain)
    with pytest.raises(RuntimeError):
        with _second_order.exact_moments():
            raise RuntimeError("boom")
    assert _second_order._tf_nn._compute_moments is original


def test_moments_swap_gives_the_true_second_derivative():
    # var(x) = mean((x - mean x)^2): its Hessian in x is (2/n)(I - 11^T/n); tf.nn.moments,
    # through stop_gradient(mean), gives (2/n) I.
    n = 5
    x = tf.Variable(np.random.default_rng(2).normal(size=(n,)))

    def hessian():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                _, var = keras.ops.moments(x, axes=[0])
            g = inner.gradient(var, x)
        return outer.jacobian(g, x).numpy()

    exact = 2.0 / n * (np.eye(n) - np.ones((n, n)) / n)
    assert np.abs(hessian() - exact).max() > 0.05  # Keras's own moments on TensorFlow
    with _second_order.exact_moments():
        np.testing.assert_allclose(hessian(), exact, atol=1e-14)
