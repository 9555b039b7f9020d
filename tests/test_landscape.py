"""loss_landscape: the origin is the model's loss, weights restored bit-identically (also on error)."""

import numpy as np
import pytest

from keras_hesstrace import landscape as ls
import models_for_tests as mt
from reference import exact_hessian, objective, xent64


def _weights(model):
    return [w.numpy().copy() for w in model.weights]


def _assert_bit_identical(before, model):
    after = [w.numpy() for w in model.weights]
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert b.dtype == a.dtype and b.tobytes() == a.tobytes()


def test_top2_landscape_origin_curvature_and_restored_weights():
    model = mt.cnn_bn()
    x, y = mt.data(n=10, shape=(6, 6, 2))
    loss = xent64()
    before = _weights(model)
    r = ls.loss_landscape(model, x, y, directions="top2", grid=5, span=0.02, loss=loss, seed=0, eigen_kwargs={"tol": 1e-8})
    _assert_bit_identical(before, model)
    assert r.losses.shape == (5, 5) and r.kind == "top" and len(r.eigenvalues) == 2
    assert r.coordinates[0][2] == 0.0
    exact_loss = float(objective(model, x, y, loss))
    assert r.origin_loss == pytest.approx(exact_loss, rel=1e-12)
    assert r.losses[2, 2] == pytest.approx(exact_loss, rel=1e-12)
    # Second difference along the top eigenvector ~ its eigenvalue.
    h = r.coordinates[0][1] - r.coordinates[0][2]
    curv = (r.losses[1, 2] - 2 * r.losses[2, 2] + r.losses[3, 2]) / h**2
    assert curv == pytest.approx(r.eigenvalues[0], rel=1e-2)
    frame = r.to_frame()
    assert list(frame.columns) == ["alpha", "beta", "loss"] and len(frame) == 25


def test_random_filter_normalised_1d_landscape_of_a_block():
    model = mt.mlp()
    x, y = mt.data(n=12)
    loss = xent64()
    before = _weights(model)
    r = ls.loss_landscape(model, x, y, directions="random1", grid=[-0.5, 0.0, 0.5], loss=loss, groups="head", seed=0)
    _assert_bit_identical(before, model)
    assert r.losses.shape == (3,) and r.losses[1] == pytest.approx(r.origin_loss, rel=1e-14)
    d = r.directions[0]
    for v, di in zip(model.trainable_variables, d):
        if not v.path.startswith("head/") or v.path.endswith("bias"):
            assert not np.any(di)  # outside the block, and 1-D variables, unperturbed
    kernel = model.get_layer("head").kernel.numpy()
    dk = d[[i for i, v in enumerate(model.trainable_variables) if v.path == "head/kernel"][0]]
    np.testing.assert_allclose(np.linalg.norm(dk, axis=0), np.linalg.norm(kernel, axis=0), rtol=1e-12)


def test_filter_normalisation_per_output_unit_of_a_conv_kernel():
    w = np.random.default_rng(0).normal(size=(3, 3, 2, 4))
    w[..., 1] = 0.0
    (d, b) = ls.filter_normalized_direction([w, np.ones(4)], seed=0)
    norms = np.sqrt((d**2).sum(axis=(0, 1, 2)))
    np.testing.assert_allclose(norms, np.sqrt((w**2).sum(axis=(0, 1, 2))), rtol=1e-12)
    assert not np.any(b)
    (_, b2) = ls.filter_normalized_direction([w, np.ones(4)], seed=0, ignore_1d=False)
    assert np.linalg.norm(b2) == pytest.approx(2.0)


class _FailingBatches:
    """A re-iterable list of batches whose third pass raises (an interrupted run)."""

    def __init__(self, x, y):
        self.batches = [(x[:6], y[:6]), (x[6:], y[6:])]
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        if self.passes == 3:
            raise RuntimeError("injected failure")
        return iter(self.batches)


def test_weights_are_restored_when_an_error_interrupts_the_grid():
    model = mt.mlp()
    x, y = mt.data(n=12)
    before = _weights(model)
    with pytest.raises(RuntimeError, match="injected failure"):
        ls.loss_landscape(model, _FailingBatches(x, y), directions="random2", grid=3, loss=xent64(), seed=0)
    _assert_bit_identical(before, model)


def test_given_directions_and_dataset_mode():
    model = mt.mlp()
    x, y = mt.data(n=12)
    loss = xent64()
    H = exact_hessian(model, x, y, loss)
    lam, vecs = np.linalg.eigh(H)
    from reference import unflatten

    d = unflatten(vecs[:, -1], model.trainable_variables)
    r = ls.loss_landscape(model, [(x[:5], y[:5]), (x[5:], y[5:])], directions=[d], grid=3, span=1e-3, loss=loss)
    assert r.kind == "given" and r.ndim == 1
    assert r.origin_loss == pytest.approx(float(objective(model, x, y, loss)), rel=1e-12)
    curv = (r.losses[0] - 2 * r.losses[1] + r.losses[2]) / 1e-6
    assert curv == pytest.approx(lam[-1], rel=1e-3)
    with pytest.raises(ValueError, match="directions must be"):
        ls.loss_landscape(model, x, y, directions="top3", loss=loss)
