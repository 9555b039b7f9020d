"""The algorithms of keras_hesstrace.linalg on explicit numpy matrices (the spectrum is known by construction)."""

import ast
import pathlib
import sys

import numpy as np
import pytest

from keras_hesstrace import linalg as la


def _matrix(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    n = len(eigenvalues)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (Q * np.asarray(eigenvalues, dtype=float)) @ Q.T


def _spectrum(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([[10.0, -8.5, 7.0, 6.0], rng.normal(size=n - 4)])


def test_linalg_imports_only_numpy_and_itself():
    """The core algorithms know nothing about Keras or TensorFlow, nor anything above them
    (the standard library is allowed)."""
    allowed = ("numpy", "keras_hesstrace.linalg", "keras_hesstrace._validate")
    for path in pathlib.Path(la.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            for name in names:
                standard = name.split(".")[0] in sys.stdlib_module_names
                assert standard or any(name == a or name.startswith(a + ".") for a in allowed), (path.name, name)


@pytest.mark.parametrize("fn", [la.power_iteration, la.lanczos_eigen])
def test_largest_magnitude_eigenpairs_of_a_matrix(fn):
    lam = _spectrum()
    A = _matrix(lam)
    out = fn(lambda v: A @ v, A.shape[0], k=3, max_iter=1000, tol=1e-8, seed=1)
    # LM order: by decreasing magnitude, negative ones included.
    np.testing.assert_allclose(out["eigenvalues"], [10.0, -8.5, 7.0], rtol=1e-7)
    assert out["converged"].all()
    for value, vec in zip(out["eigenvalues"], out["eigenvectors"]):
        assert np.isclose(np.linalg.norm(vec), 1.0)
        assert np.linalg.norm(A @ vec - value * vec) <= 1e-7 * abs(value) * 1.01
    assert out["num_matvecs"] >= 3


def test_lanczos_largest_algebraic_skips_negative_eigenvalues():
    lam = _spectrum()
    A = _matrix(lam)
    out = la.lanczos_eigen(lambda v: A @ v, 50, k=3, which="LA", tol=1e-8, seed=0)
    np.testing.assert_allclose(out["eigenvalues"], np.sort(lam)[::-1][:3], rtol=1e-7)


def test_lanczos_needs_fewer_matvecs_than_power_iteration():
    A = _matrix(_spectrum())
    kw = dict(k=3, max_iter=1000, tol=1e-6, seed=0)
    power = la.power_iteration(lambda v: A @ v, 50, **kw)
    lanczos = la.lanczos_eigen(lambda v: A @ v, 50, **kw)
    assert lanczos["num_matvecs"] < power["num_matvecs"]  # why spectrum.AUTO_METHOD is "lanczos"


def test_lanczos_restarts_on_breakdown_to_find_repeated_eigenvalues():
    # rank 2 plus a repeated eigenvalue: the Krylov space from one vector breaks down.
    lam = np.array([5.0, 5.0, 5.0, 1.0] + [0.0] * 16)
    A = _matrix(lam, seed=3)
    out = la.lanczos_eigen(lambda v: A @ v, 20, k=4, tol=1e-10, seed=0)
    np.testing.assert_allclose(out["eigenvalues"], [5, 5, 5, 1], rtol=1e-8)


def test_quadrature_is_exact_for_low_moments_per_start_vector():
    A = _matrix(_spectrum())
    rng = np.random.default_rng(0)
    v = rng.choice([-1.0, 1.0], size=50)
    u = v / np.linalg.norm(v)
    for steps in (2, 5, 50):
        nodes, weights, count = la.lanczos_quadrature(lambda x: A @ x, v, steps)
        assert count == steps
        for k in range(0, min(2 * steps, 6)):
            exact = u @ np.linalg.matrix_power(A, k) @ u
            assert np.isclose(np.sum(weights * nodes**k), exact, rtol=1e-9, atol=1e-9 * 10**k)


def test_quadrature_stops_at_breakdown_with_exact_nodes():
    lam = np.array([3.0, 1.0, -2.0] + [0.0] * 27)
    A = _matrix(lam)
    v = np.ones(30)
    nodes, weights, count = la.lanczos_quadrature(lambda x: A @ x, v, 20)
    assert count <= 5  # an invariant subspace of dimension <= 4 is found
    assert np.isclose(weights.sum(), 1.0)
    big = nodes[weights > 1e-10]
    for value in big:
        assert np.min(np.abs(lam - value)) < 1e-8


def test_hutchpp_has_lower_variance_than_hutchinson_on_a_low_rank_matrix():
    lam = np.concatenate([np.linspace(10, 1, 8), np.zeros(112)])
    A = _matrix(lam, seed=1) + 1e-3 * _matrix(np.random.default_rng(2).normal(size=120), seed=2)
    exact = np.trace(A)
    plain = np.array([la.hutchinson_trace(lambda v: A @ v, 120, max_iter=30, tol=0.0, seed=s)["trace"] for s in range(200)])
    plus = np.array([la.hutchpp_trace(lambda v: A @ v, 120, max_iter=30, tol=0.0, seed=s)["trace"] for s in range(200)])
    assert abs(plain.mean() - exact) < 4 * plain.std() / np.sqrt(200)
    assert abs(plus.mean() - exact) < 4 * plus.std() / np.sqrt(200) + 1e-9
    assert plus.var() < 0.01 * plain.var()


def test_trace_stop_rule_uses_the_standard_error():
    A = _matrix(np.linspace(1, 2, 40))
    out = la.hutchinson_trace(lambda v: A @ v, 40, max_iter=500, tol=0.02, min_probes=10, seed=0)
    assert out["converged"]
    assert out["stderr"] <= 0.02 * abs(out["trace"])
    assert 10 <= out["num_matvecs"] < 500
    assert abs(out["trace"] - np.trace(A)) < 5 * out["stderr"]
    # tol=0 never stops early: exactly max_iter probes.
    assert la.hutchinson_trace(lambda v: A @ v, 40, max_iter=17, tol=0.0, seed=0)["num_matvecs"] == 17


def test_one_stderr_for_samples_and_sample_matrices():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(7, 3))
    expected = s.std(axis=0, ddof=1) / np.sqrt(7)
    np.testing.assert_allclose(la.stderr(s), expected, rtol=1e-14)
    assert isinstance(la.stderr(s[:, 0]), float)
    assert la.stderr(s[:, 0]) == pytest.approx(expected[0], rel=1e-14)
    assert np.isnan(la.stderr([1.0]))
    assert la.stderr(s[:1]).shape == (3,) and np.isnan(la.stderr(s[:1])).all()


def test_probe_sources_number_the_probes():
    n = 30
    draw = la.numpy_probes(n, "rademacher", seed=4)
    np.testing.assert_array_equal(draw(3), la.numpy_probes(n, "rademacher", seed=4)(3))  # a function of (seed, m)
    assert set(np.unique(draw(0))) <= {-1.0, 1.0} and not np.array_equal(draw(0), draw(1))
    A = _matrix(np.arange(1.0, n + 1.0), seed=3)
    vs = [draw(m) for m in range(6)]
    out = la.hutchinson_trace(lambda v: A @ v, n, max_iter=5, tol=0.0, min_probes=5, draw=draw)
    np.testing.assert_allclose(out["samples"], [v @ A @ v for v in vs[:5]], rtol=1e-12)
    mean, _, _ = la.hutchinson_diagonal(lambda v: A @ v, n, num_probes=5, draw=draw)
    np.testing.assert_allclose(mean, np.mean([v * (A @ v) for v in vs[:5]], axis=0), rtol=1e-12)
    # Hutch++: sketch columns are sketch_draw(0..s-1), the samples draw(s), draw(s + 1), ...
    s = 3
    out = la.hutchpp_trace(lambda v: A @ v, n, max_iter=10, tol=0.0, min_probes=2, sketch_size=s, draw=draw, sketch_draw=draw)
    Q, _ = np.linalg.qr(np.stack([A @ vs[j] for j in range(s)], axis=1))
    g = [draw(s + m) - Q @ (Q.T @ draw(s + m)) for m in range(10 - 2 * s)]
    np.testing.assert_allclose(out["samples"], [u @ A @ u for u in g], rtol=1e-10)
    with pytest.raises(ValueError, match="shape"):
        la.hutchinson_trace(lambda v: A @ v, n, max_iter=2, draw=lambda m: np.ones(n - 1))


def test_hutchinson_diagonal_of_a_matrix_within_four_standard_errors():
    A = _matrix(_spectrum())
    mean, err, used = la.hutchinson_diagonal(lambda v: A @ v, 50, num_probes=300, seed=0)
    assert used == 300
    assert np.all(np.abs(mean - np.diag(A)) <= 4 * err)


def test_gaussian_density_integrates_to_one_with_the_pyhessian_width():
    nodes = [np.array([-1.0, 0.0, 3.0]), np.array([0.5, 2.0])]
    weights = [np.array([0.2, 0.5, 0.3]), np.array([0.6, 0.4])]
    grid, density, sigma = la.gaussian_density(nodes, weights)
    assert sigma == pytest.approx(np.sqrt(1e-5 * 4.0))
    assert grid.size == 10000
    dx = grid[1] - grid[0]
    assert np.sum(density) * dx == pytest.approx(1.0, abs=1e-3)
    mean = 0.5 * (np.sum(nodes[0] * weights[0]) + np.sum(nodes[1] * weights[1]))
    assert np.sum(grid * density) * dx == pytest.approx(mean, abs=1e-3)
