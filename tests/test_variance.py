"""Closed-form variances against empirical probe variances; anisotropy; probe budget."""

import numpy as np
import pytest
import tensorflow as tf

import keras_hesstrace as kh
import models_for_tests as mt
from keras_hesstrace.hvp import hessian_operator
from keras_hesstrace.probes import probe_seed
from keras_hesstrace.variance import (
    anisotropy,
    block_traces,
    hutchinson_variance,
    single_pass_variance,
    variance_components,
)
from reference import exact_hessian, group_block_sizes, xent64


def _within_sampling_error(samples, expected_var, k=5.0):
    """|S² − σ²| < k · SE(S²), SE from the sample's own fourth central moment."""
    s = np.asarray(samples, dtype=np.float64)
    n = s.shape[0]
    d = s - s.mean(axis=0)
    s2 = (d**2).sum(axis=0) / (n - 1)
    m4 = (d**4).mean(axis=0)
    se = np.sqrt(np.maximum(m4 - s2**2 * (n - 3) / (n - 1), 0) / n)
    assert np.all(np.abs(s2 - expected_var) < k * se), (s2, expected_var, se)
    # The check is not vacuous: the error bar is a small fraction of the value.
    assert np.all(k * se < 0.5 * np.abs(expected_var))


def test_closed_forms_on_a_random_matrix_match_numpy_probes():
    rng = np.random.default_rng(0)
    sizes = [3, 5, 4]
    a = rng.normal(size=(12, 12))
    H = a + a.T
    n = 20000
    v = rng.choice([-1.0, 1.0], size=(n, 12))
    hv = v @ H
    edges = np.cumsum([0] + sizes)
    single = np.stack([(v[:, a:b] * hv[:, a:b]).sum(1) for a, b in zip(edges[:-1], edges[1:])], 1)
    _within_sampling_error(single, single_pass_variance(H, sizes))
    masked = np.stack(
        [np.einsum("ni,ij,nj->n", v[:, a:b], H[a:b, a:b], v[:, a:b]) for a, b in zip(edges[:-1], edges[1:])], 1
    )
    _within_sampling_error(masked, [hutchinson_variance(H[a:b, a:b]) for a, b in zip(edges[:-1], edges[1:])])
    g = rng.normal(size=(n, 12))
    _within_sampling_error(np.einsum("ni,ij,nj->n", g, H, g), hutchinson_variance(H, "gaussian"))
    # The single-pass variance exceeds the masked one by the off-diagonal blocks.
    extra = single_pass_variance(H, sizes) - [hutchinson_variance(H[a:b, a:b]) for a, b in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(extra[0], (H[0:3, 3:] ** 2).sum())


def test_model_probes_match_both_closed_forms():
    model = mt.mlp()
    x, y = mt.data()
    H = exact_hessian(model, x, y, xent64())
    mapping = kh.layer_groups(model)
    sizes = group_block_sizes(mapping)
    r = kh.layer_traces(model, x, y, num_probes=1500, seed=21, loss=xent64())
    _within_sampling_error(r.samples, single_pass_variance(H, sizes))
    # Masked probe on the head block: the restricted operator H_SS v_S.
    head = list(mapping).index("head")
    start = sum(sizes[:head])
    block = H[start : start + sizes[head], start : start + sizes[head]]
    positions = [i for i, v in enumerate(model.trainable_variables) if v.path.startswith("head/")]
    op = hessian_operator(model, xent64(), variable_indices=positions)
    everything = (tuple(range(len(positions))),)
    masked = np.array(
        [op.probe_contractions(tf.constant(x), tf.constant(y), probe_seed(5, m)[None], "rademacher", everything)[0].numpy()[0]
         for m in range(1500)]
    )
    _within_sampling_error(masked, [hutchinson_variance(block)])
    assert abs(masked.mean() - np.trace(block)) < 4 * masked.std(ddof=1) / np.sqrt(1500)


def test_anisotropy_of_known_spectra():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    lam = np.array([4.0, 3.0, 2.0, 1.0, 0.0, 0.0])
    B = q @ np.diag(lam) @ q.T
    assert anisotropy(B) == pytest.approx((lam**2).sum() / lam.sum() ** 2, rel=1e-12)
    # PSD of rank r: kappa >= 1/r, with equality for equal eigenvalues.
    P = q[:, :3] @ q[:, :3].T
    assert anisotropy(P) == pytest.approx(1 / 3, rel=1e-12)
    indefinite = q @ np.diag([1.0, -1.0, 0, 0, 0, 0]) @ q.T
    assert anisotropy(indefinite) > 1e20 or np.isinf(anisotropy(indefinite))
    with pytest.raises(ValueError, match="square"):
        anisotropy(np.ones((2, 3)))


def test_block_traces_and_size_checks():
    H = np.arange(16.0).reshape(4, 4)
    np.testing.assert_allclose(block_traces(H, [1, 3]), [0.0, 5 + 10 + 15])
    with pytest.raises(ValueError, match="sum to 3"):
        single_pass_variance(np.eye(4), [1, 2])


def test_variance_components_recover_known_components():
    rng = np.random.default_rng(3)
    B, M, G = 400, 8, 2
    sigma_b = np.array([2.0, 0.5])
    sigma_v = np.array([3.0, 1.0])
    batch = rng.normal(size=(B, 1, G)) * sigma_b
    s = batch + rng.normal(size=(B, M, G)) * sigma_v
    sv, sb = variance_components(s)
    np.testing.assert_allclose(sv, sigma_v**2, rtol=0.05)
    np.testing.assert_allclose(sb, sigma_b**2, rtol=0.2)
    with pytest.raises(ValueError, match="B >= 2"):
        variance_components(s[:1])


def test_probe_budget_on_a_model():
    model = mt.mlp()
    x, y = mt.data(n=40, seed=1)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    budget = kh.variance.probe_budget(model, ds, num_probes=6, loss=xent64())
    frame = budget.to_frame()
    assert list(frame.index) == ["hidden", "hidden2", "head"]
    assert budget.batch_means.shape == (5, 3)
    assert np.all(budget.sigma_v2 > 0) and np.all(budget.sigma_b2 >= 0)
    ratio = np.where(budget.sigma_b2 > 0, budget.sigma_v2 / np.maximum(budget.sigma_b2, 1e-300), np.inf)
    np.testing.assert_allclose(budget.critical_probes, ratio)
    with pytest.raises(ValueError, match="num_probes >= 2"):
        kh.variance.probe_budget(model, ds, num_probes=1, loss=xent64())
