"""Data given the same way to every estimator: ``x, y``, the tuple ``(x, y)``, or a dataset.

``keras_hesstrace.batches.resolve_data`` is the one place that decides; every consumer must
give identical results for ``f(model, x, y)`` and ``f(model, (x, y))``, and refuse the
ambiguous forms with a message that shows the right call.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hesstrace as kh
from keras_hesstrace import landscape as ls
from keras_hesstrace import spectrum as sp
from keras_hesstrace.batches import resolve_data
import models_for_tests as mt


def xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")


@pytest.fixture(scope="module")
def problem():
    model = mt.mlp(seed=3)
    x, y = mt.data(seed=3, n=12)
    return model, x, y


def _flat(*arrays):
    return np.concatenate([np.ravel(np.asarray(a, dtype=np.float64)) for a in arrays])


# Each consumer reduced to the numbers it returns (seeded, so two calls are comparable).
CONSUMERS = {
    "layer_traces": lambda m, *d: kh.layer_traces(m, *d, num_probes=3, seed=0, loss=xent(), verbose=0).samples,
    "top_eigenvalues": lambda m, *d: sp.top_eigenvalues(m, *d, k=2, max_iter=40, seed=0, loss=xent()).eigenvalues,
    "hessian_trace": lambda m, *d: sp.hessian_trace(m, *d, num_probes=4, rel_stderr=None, seed=0, loss=xent()).samples,
    "diagonal": lambda m, *d: sp.diagonal(m, *d, num_probes=3, seed=0, loss=xent()).flat()[0],
    "spectral_density": lambda m, *d: _flat(
        *sp.spectral_density(m, *d, num_runs=1, lanczos_steps=6, seed=0, loss=xent()).nodes,
        *sp.spectral_density(m, *d, num_runs=1, lanczos_steps=6, seed=0, loss=xent()).weights),
    "loss_landscape (random)": lambda m, *d: ls.loss_landscape(
        m, *d, directions="random1", grid=3, span=0.1, seed=0, loss=xent(), verbose=0).losses,
    "loss_landscape (top)": lambda m, *d: ls.loss_landscape(
        m, *d, directions="top1", grid=3, span=0.1, seed=0, loss=xent(), verbose=0,
        eigen_kwargs={"max_iter": 30}).losses,
}


@pytest.mark.parametrize("name", list(CONSUMERS))
def test_an_x_y_tuple_is_one_batch_with_the_same_result(problem, name):
    model, x, y = problem
    consumer = CONSUMERS[name]
    separate = np.asarray(consumer(model, x, y))
    together = np.asarray(consumer(model, (x, y)))
    assert np.all(np.isfinite(separate)) and np.any(separate != 0)
    np.testing.assert_array_equal(together, separate)


def test_a_list_of_two_batches_stays_the_dataset_mode(problem):
    model, x, y = problem
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    as_list = kh.layer_traces(model, batches, num_probes=2, seed=0, loss=xent(), verbose=0)
    as_dataset = kh.layer_traces(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(6),
                                 num_probes=2, seed=0, loss=xent(), verbose=0)
    assert as_list.num_batches == 2 and as_dataset.num_batches == 2
    whole = kh.layer_traces(model, (x, y), num_probes=2, seed=0, loss=xent(), verbose=0)
    assert whole.num_batches == 1
    # Batches weighted by size: the same estimate as the whole batch, up to round-off.
    np.testing.assert_allclose(as_list.samples, whole.samples, rtol=1e-10)
    np.testing.assert_allclose(as_dataset.samples, whole.samples, rtol=1e-10)


# ============================================================ the rules, in one place


def test_resolve_data_reads_one_batch_in_every_spelling():
    x, y = np.zeros((4, 3)), np.zeros(4)
    for given in [(x, y), [x, y]]:
        bx, by, dataset = resolve_data(given)
        assert bx is x and by is y and dataset is False
    inputs = {"a": x, "b": x}
    assert resolve_data((inputs, y))[:3] == (inputs, y, False)
    pair_of_inputs = (x, x)  # a model with two inputs
    bx, by, dataset = resolve_data((pair_of_inputs, y))
    assert bx is pair_of_inputs and by is y and not dataset
    tx = tf.constant(x)
    assert resolve_data((tx, y))[0] is tx
    assert resolve_data(x, y)[:3] == (x, y, False)


def test_resolve_data_reads_a_dataset():
    x, y = np.zeros((4, 3)), np.zeros(4)
    batches = [(x, y), (x, y)]
    assert resolve_data(batches) == (batches, None, True)
    assert resolve_data([(x, y)])[2] is True
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    assert resolve_data(ds) == (ds, None, True)
    generator = ((x, y) for _ in range(2))
    assert resolve_data(generator)[2] is True


@pytest.mark.parametrize(
    "make, messages",
    [
        (lambda x, y, ds: (x, None), ["y is missing", "layer_traces(model, x, y)", "layer_traces(model, (x, y))"]),
        (lambda x, y, ds: ((x,), None), ["one array and no y", "layer_traces(model, x, y)"]),
        (lambda x, y, ds: ((x, y, np.ones(4)), None), ["sample weights", "layer_traces(model, x, y)"]),
        (lambda x, y, ds: (((x, x), (y, y)), None), ["tuple of two sequences", "layer_traces(model, x, y)",
                                                    "layer_traces(model, [(x1, y1), (x2, y2)])"]),
        (lambda x, y, ds: (ds, y), ["y must be omitted", "layer_traces(model, dataset)"]),
        (lambda x, y, ds: ([], None), ["empty list"]),
        (lambda x, y, ds: (5, None), ["not a int"]),
    ],
)
def test_resolve_data_refuses_the_ambiguous_with_the_right_call(make, messages):
    x, y = np.zeros((4, 3)), np.zeros(4)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    given_x, given_y = make(x, y, ds)
    with pytest.raises(ValueError) as exc:
        resolve_data(given_x, given_y, "layer_traces")
    for message in messages:
        assert message in str(exc.value)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m, x, y: kh.layer_traces(m, (x, y, np.ones(len(y))), loss=xent()), "layer_traces"),
        (lambda m, x, y: sp.top_eigenvalues(m, x, loss=xent()), "top_eigenvalues"),
        (lambda m, x, y: sp.hessian_trace(m, (x,), loss=xent()), "hessian_trace"),
        (lambda m, x, y: sp.diagonal(m, ((x, x), (y, y)), loss=xent()), "diagonal"),
        (lambda m, x, y: sp.spectral_density(m, x, loss=xent()), "spectral_density"),
        (lambda m, x, y: ls.loss_landscape(m, x, directions="random1", loss=xent()), "loss_landscape"),
    ],
)
def test_every_consumer_refuses_with_its_own_name(problem, call, name):
    model, x, y = problem
    with pytest.raises(ValueError, match=rf"{name}\(model, x, y\)"):
        call(model, x, y)
