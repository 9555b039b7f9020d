"""Power iteration with deflation on a symmetric matvec (PyHessian's eigenvalue method)."""

import numpy as np

from keras_hesstrace._validate import check_integer
from keras_hesstrace.linalg.common import check_finite, make_rng, orthogonalise


def power_iteration(matvec, n, k=1, max_iter=100, tol=1e-3, seed=None, dtype=np.float64):
    """Largest-magnitude eigenpairs by power iteration with deflation (PyHessian's method).

    Eigenpair i starts from a Gaussian vector; each step orthogonalises the iterate and
    A v against the i pairs already found (Gram-Schmidt deflation) and stops when the
    residual of the Rayleigh quotient satisfies ``||A v - θ v|| <= tol * max(|θ|, 1e-8 |θ_1|)``.

    Args:
        matvec: callable, flat float vector [n] -> A v [n] (A symmetric).
        n: dimension.
        k: number of eigenpairs.
        max_iter: the most matvecs per eigenpair (each pair runs its own iteration), so at
            most ``k * max_iter`` in total.
        tol: relative residual tolerance (see the module docstring).
        seed: int seed of the start vectors (None: fresh).
        dtype: numpy dtype of the stored vectors.

    Returns:
        dict with ``eigenvalues`` [k] (ordered as found: decreasing magnitude),
        ``eigenvectors`` [k, n] (unit rows), ``residuals`` [k] (||A' v - θ v|| for the
        deflated operator A' = (I - P) A (I - P), P the projector on the earlier pairs: it
        differs from A's residual by about the earlier pairs' own errors),
        ``converged`` [k] bool, ``num_matvecs`` int.
    """
    k = check_integer("k (eigenpairs, at most the dimension)", k, 1, n)
    max_iter = check_integer("max_iter", max_iter)
    rng, _ = make_rng(seed)
    vectors = np.zeros((0, n), dtype=dtype)
    values, residuals, converged = [], [], []
    count = 0
    for i in range(k):
        v = orthogonalise(rng.standard_normal(n).astype(dtype), vectors)
        v /= np.linalg.norm(v)
        theta, res, done = 0.0, np.inf, False
        for _ in range(max_iter):
            w = np.asarray(matvec(v), dtype=np.float64)
            count += 1
            check_finite(w)
            w = orthogonalise(w, vectors)
            theta = float(v @ w)
            res = float(np.linalg.norm(w - theta * v))
            scale = max(abs(theta), 1e-8 * abs(values[0])) if values else abs(theta)
            if res <= tol * scale:
                done = True
                break
            norm = np.linalg.norm(w)
            if norm == 0.0:  # v is in the null space of the deflated operator: θ = 0 exactly
                done = True
                break
            v = (w / norm).astype(dtype)
        values.append(theta)
        residuals.append(res)
        converged.append(done)
        vectors = np.vstack([vectors, v[None, :]])
    return {
        "eigenvalues": np.array(values),
        "eigenvectors": vectors,
        "residuals": np.array(residuals),
        "converged": np.array(converged, dtype=bool),
        "num_matvecs": count,
    }
