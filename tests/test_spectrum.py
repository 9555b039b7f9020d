"""The PyHessian toolset on small float64 models against numpy.linalg.eigh of the exact Hessian.

(The algorithms on explicit matrices: tests/test_linalg.py.)
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_hesstrace import spectrum as sp
from keras_hesstrace.probes import draw_probe, probe_seed
import keras_hesstrace as kh
import models_for_tests as mt
from reference import exact_hessian, flatten, xent64


def test_auto_means_lanczos():
    # Lanczos needs fewer matvecs (tests/test_linalg.py; benchmarks/eigen_hvps.py).
    assert sp.AUTO_METHOD == "lanczos"


@pytest.fixture(scope="module")
def mlp_case():
    model = mt.mlp()
    x, y = mt.data(n=12)
    loss = xent64()
    H = exact_hessian(model, x, y, loss)
    return model, x, y, loss, H


def _lm_order(values):
    return values[np.argsort(-np.abs(values))]


@pytest.mark.parametrize("method", ["power", "lanczos", "auto"])
def test_top_eigenvalues_match_the_exact_hessian(mlp_case, method):
    model, x, y, loss, H = mlp_case
    exact = _lm_order(np.linalg.eigvalsh(H))[:3]
    r = sp.top_eigenvalues(model, x, y, k=3, max_iter=500, tol=1e-6, method=method, loss=loss, seed=0)
    assert r.method == ("lanczos" if method == "auto" else method)
    np.testing.assert_allclose(r.eigenvalues, exact, rtol=1e-5)
    assert r.converged.all() and r.num_hvps > 0
    assert r.dimension == H.shape[0]
    for value, vec in zip(r.eigenvalues, r.eigenvectors):
        assert [tuple(t.shape) for t in vec] == [tuple(v.shape) for v in model.trainable_variables]
        u = flatten(vec)
        assert np.linalg.norm(u) == pytest.approx(1.0)
        # Lanczos: the residual w.r.t. H; power: w.r.t. the deflated operator, which differs
        # from H's by the earlier pairs' own (tol-sized) errors.
        bound = 1.1e-6 if r.method == "lanczos" else 1e-5
        assert np.linalg.norm(H @ u - value * u) <= bound * abs(value)


def test_largest_algebraic_on_a_model(mlp_case):
    model, x, y, loss, H = mlp_case
    r = sp.top_eigenvalues(model, x, y, k=2, which="LA", tol=1e-8, loss=loss, seed=0)
    np.testing.assert_allclose(r.eigenvalues, np.sort(np.linalg.eigvalsh(H))[::-1][:2], rtol=1e-6)
    with pytest.raises(ValueError, match="largest-magnitude"):
        sp.top_eigenvalues(model, x, y, which="LA", method="power", loss=loss)


def _block(model, H, prefixes):
    mask = np.concatenate([np.full(int(np.prod(v.shape)), v.path.split("/")[0] in prefixes) for v in model.trainable_variables])
    return H[np.ix_(mask, mask)], mask


def test_one_probe_generator_for_layer_traces_hessian_trace_and_diagonal(mlp_case):
    model, x, y, loss, H = mlp_case
    num, seed = 5, 7
    lt = kh.layer_traces(model, x, y, num_probes=num, seed=seed, loss=loss, verbose=0)
    ht = sp.hessian_trace(model, x, y, num_probes=num, rel_stderr=None, loss=loss, seed=seed)
    np.testing.assert_allclose(ht.samples, lt.total_samples, rtol=1e-10)
    # Both are v^T H v on the independent reference Hessian with the package's probes.
    vs = [flatten(draw_probe(model.trainable_variables, probe_seed(seed, m))) for m in range(num)]
    np.testing.assert_allclose(ht.samples, [v @ H @ v for v in vs], rtol=1e-8)
    scale = 1e-10 * np.abs(H).max()
    d = sp.diagonal(model, x, y, num_probes=num, loss=loss, seed=seed)
    np.testing.assert_allclose(d.flat()[0], np.mean([v * (H @ v) for v in vs], axis=0), rtol=1e-8, atol=scale)
    # A block's probe is the whole model's probe restricted to the block.
    Hb, mask = _block(model, H, {"head"})
    head = sp.diagonal(model, x, y, num_probes=num, loss=loss, groups="head", seed=seed)
    np.testing.assert_allclose(head.flat()[0], np.mean([v[mask] * (Hb @ v[mask]) for v in vs], axis=0), rtol=1e-8, atol=scale)
    hb = sp.hessian_trace(model, x, y, num_probes=num, rel_stderr=None, loss=loss, groups="head", seed=seed)
    np.testing.assert_allclose(hb.samples, [v[mask] @ Hb @ v[mask] for v in vs], rtol=1e-8, atol=scale)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_restricted_block_equals_the_exact_sub_block(mlp_case, method):
    model, x, y, loss, H = mlp_case
    Hb, mask = _block(model, H, {"head"})
    exact = _lm_order(np.linalg.eigvalsh(Hb))[:2]
    r = sp.top_eigenvalues(model, x, y, k=2, tol=1e-6, max_iter=1000, method=method, loss=loss, groups="head", seed=1)
    np.testing.assert_allclose(r.eigenvalues, exact, rtol=1e-6)
    assert r.dimension == mask.sum() and r.groups == ("head",)
    u = flatten(r.eigenvectors[0])
    assert np.all(u[~mask] == 0.0)  # zero outside the block


def test_stage_block_from_a_pattern_grouping(mlp_case):
    model, x, y, loss, H = mlp_case
    Hb, _ = _block(model, H, {"hidden", "hidden2"})
    lam = np.linalg.eigvalsh(Hb)
    with pytest.warns(UserWarning, match="clipped"):
        r = sp.spectral_density(model, x, y, lanczos_steps=200, loss=loss, groups=["stage"], by={"hidden*": "stage"}, seed=0)
    assert r.dimension == Hb.shape[0] and r.lanczos_steps == Hb.shape[0]
    assert r.nodes[0].min() == pytest.approx(lam.min(), rel=1e-8, abs=1e-10)
    assert r.nodes[0].max() == pytest.approx(lam.max(), rel=1e-8)
    with pytest.raises(ValueError, match="Unknown group"):
        sp.top_eigenvalues(model, x, y, loss=loss, groups="nope")


def test_full_dataset_mode_is_the_hessian_of_the_mean_loss(mlp_case):
    model, x, y, loss, H = mlp_case
    exact = _lm_order(np.linalg.eigvalsh(H))[0]
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # unequal sizes: weighted by batch size
    r = sp.top_eigenvalues(model, batches, k=1, tol=1e-8, loss=loss, seed=0)
    assert r.eigenvalues[0] == pytest.approx(exact, rel=1e-7)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    t = sp.hessian_trace(model, ds, num_probes=5, rel_stderr=None, loss=loss, seed=0)
    t1 = sp.hessian_trace(model, x, y, num_probes=5, rel_stderr=None, loss=loss, seed=0)
    np.testing.assert_allclose(t.samples, t1.samples, rtol=1e-10)
    with pytest.raises(ValueError, match="one-shot"):
        sp.top_eigenvalues(model, iter(batches), loss=loss)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_hessian_trace_within_four_standard_errors(mlp_case, method):
    model, x, y, loss, H = mlp_case
    r = sp.hessian_trace(model, x, y, num_probes=60, rel_stderr=None, method=method, loss=loss, seed=3)
    assert r.num_hvps == 60
    assert abs(r.trace - np.trace(H)) <= 4 * r.stderr


def test_restricted_trace_is_the_block_trace(mlp_case):
    model, x, y, loss, H = mlp_case
    Hb, _ = _block(model, H, {"head"})
    r = sp.hessian_trace(model, x, y, num_probes=40, rel_stderr=None, loss=loss, groups="head", seed=0)
    assert abs(r.trace - np.trace(Hb)) <= 4 * r.stderr


def test_slq_moments_are_exact_per_start_vector(mlp_case):
    model, x, y, loss, H = mlp_case
    n = H.shape[0]
    for steps in (3, n):
        r = sp.spectral_density(model, x, y, num_runs=2, lanczos_steps=steps, loss=loss, seed=5)
        # Rebuild the start vectors from the seed: run r starts from the package's probe r.
        for run in range(2):
            v = flatten(draw_probe(model.trainable_variables, probe_seed(5, run)))
            for k in (0, 1, 2):
                exact = v @ np.linalg.matrix_power(H, k) @ v / n
                assert r.run_moments(k)[run] == pytest.approx(exact, rel=1e-8, abs=1e-12)
        assert all(np.isclose(w.sum(), 1.0) for w in r.weights)


def test_slq_moments_estimate_traces_of_powers(mlp_case):
    model, x, y, loss, H = mlp_case
    n = H.shape[0]
    r = sp.spectral_density(model, x, y, num_runs=30, lanczos_steps=4, loss=loss, seed=0)
    assert r.moment(0)[0] == pytest.approx(1.0)
    for k in (1, 2):
        mean, se = r.moment(k)
        exact = np.trace(np.linalg.matrix_power(H, k)) / n
        assert abs(mean - exact) <= 4 * se
    # The smoothed density carries the same moments (plus sigma² for k = 2).
    dx = r.grid[1] - r.grid[0]
    assert np.sum(r.density) * dx == pytest.approx(1.0, rel=1e-3)
    assert np.sum(r.grid * r.density) * dx == pytest.approx(r.moment(1)[0], rel=1e-3, abs=1e-6)
    m2 = np.sum(r.grid**2 * r.density) * dx
    assert m2 == pytest.approx(r.moment(2)[0] + r.sigma**2, rel=1e-3)


def test_ritz_values_reach_the_extreme_eigenvalues(mlp_case):
    model, x, y, loss, H = mlp_case
    lam = np.linalg.eigvalsh(H)
    exact = sp.spectral_density(model, x, y, lanczos_steps=H.shape[0], loss=loss, seed=1)
    assert exact.nodes[0].max() == pytest.approx(lam.max(), rel=1e-9)
    assert exact.nodes[0].min() == pytest.approx(lam.min(), rel=1e-7, abs=1e-9 * lam.max())
    short = sp.spectral_density(model, x, y, lanczos_steps=30, loss=loss, seed=1)
    assert short.nodes[0].max() == pytest.approx(lam.max(), rel=1e-6)
    assert short.nodes[0].min() <= lam.min() + 0.05 * (lam.max() - lam.min())


def test_lanczos_steps_beyond_the_dimension_are_clipped_with_a_note(mlp_case):
    model, x, y, loss, H = mlp_case
    with pytest.warns(UserWarning, match="clipped"):
        r = sp.spectral_density(model, x, y, lanczos_steps=1000, loss=loss, groups="head", seed=0)
    assert r.lanczos_steps == r.dimension == 15
    assert any("clipped" in note for note in r.notes)
    assert "clipped" in str(r)


def test_diagonal_within_four_standard_errors(mlp_case):
    model, x, y, loss, H = mlp_case
    r = sp.diagonal(model, x, y, num_probes=200, loss=loss, seed=0)
    assert r.groups == ("hidden", "hidden2", "head")
    for g, vs in r.values.items():
        assert [a.shape for a in vs] == [tuple(v.shape) for v in model.trainable_variables if v.path.startswith(g + "/")]
    est, err = r.flat()
    assert np.all(np.abs(est - np.diag(H)) <= 4 * err + 1e-12)
    assert r.to_frame().loc["head", "num_params"] == 15
    # Restricting to a block: the same target, smaller standard errors (no other blocks' terms).
    head = sp.diagonal(model, x, y, num_probes=200, loss=loss, groups="head", seed=0)
    assert head.groups == ("head",)
    h_est, h_err = head.flat()
    _, mask = _block(model, H, {"head"})
    assert np.all(np.abs(h_est - np.diag(H)[mask]) <= 4 * h_err + 1e-12)
    assert np.mean(h_err) < np.mean(err[mask])


def test_cnn_with_batchnorm_blocks_and_grouping_by_variable():
    model = mt.cnn_bn()
    x, y = mt.data(n=10, shape=(6, 6, 2))
    loss = xent64()
    H = exact_hessian(model, x, y, loss)
    r = sp.top_eigenvalues(model, x, y, k=2, tol=1e-8, loss=loss, seed=0)
    np.testing.assert_allclose(r.eigenvalues, _lm_order(np.linalg.eigvalsh(H))[:2], rtol=1e-6)
    names = [v.path for v in model.trainable_variables]
    kernel = [i for i, p in enumerate(names) if p == "conv/kernel"][0]
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    start = sum(sizes[:kernel])
    Hb = H[start : start + sizes[kernel], start : start + sizes[kernel]]
    rb = sp.top_eigenvalues(model, x, y, k=1, tol=1e-8, loss=loss, groups="conv/kernel", by="variable", seed=0)
    assert rb.eigenvalues[0] == pytest.approx(_lm_order(np.linalg.eigvalsh(Hb))[0], rel=1e-7)


def test_float32_model_runs_with_a_float32_basis():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = mt.data(n=16)
    H = sp.ModelHessian(model, x.astype("float32"), y)
    assert H.basis_dtype == np.float32
    dense = np.stack([H(e) for e in np.eye(H.n)])
    r = sp.top_eigenvalues(model, x.astype("float32"), y, k=1, tol=1e-4, seed=0)
    assert r.eigenvalues[0] == pytest.approx(_lm_order(np.linalg.eigvalsh(0.5 * (dense + dense.T)))[0], rel=1e-4)


def test_non_finite_hessian_raises_a_clear_error(mlp_case):
    model, x, y, loss, H = mlp_case
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        sp.top_eigenvalues(model, bad, y, loss=loss, seed=0)


def test_unconverged_eigenpairs_warn(mlp_case):
    model, x, y, loss, H = mlp_case
    with pytest.warns(RuntimeWarning, match="did not reach"):
        r = sp.top_eigenvalues(model, x, y, k=1, max_iter=2, tol=1e-12, method="power", loss=loss, seed=0)
    assert not r.converged[0] and r.num_hvps == 2
    assert "NOT CONVERGED" in str(r)
