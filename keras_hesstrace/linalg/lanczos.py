"""Lanczos with full reorthogonalisation: extreme eigenpairs and Gauss quadrature."""

import numpy as np

from keras_hesstrace.linalg.common import check_finite, make_rng, orthogonalise

WHICH = ("LM", "LA")


class Lanczos:
    """Lanczos tridiagonalisation with full reorthogonalisation, one step at a time.

    After j steps, ``Q`` [j, n] holds orthonormal Lanczos vectors and T = Q A Q^T is the
    tridiagonal with diagonal ``alpha`` [j] and off-diagonal ``beta`` [j-1]. On breakdown
    (an invariant subspace: beta ~ 0) the iteration either stops (``restart=False``; the
    Ritz values are then exact eigenvalues of A on that subspace) or continues from a new
    random vector orthogonal to Q (``restart=True``; T becomes block-diagonal).

    Args:
        matvec: callable, flat vector [n] -> A v [n].
        v0: start vector [n] (any nonzero norm; it is normalised).
        max_steps: the most steps (clipped to n).
        restart: continue after a breakdown from a random orthogonal vector.
        seed: seed for restart vectors.
        dtype: numpy dtype of the stored basis (float64; float32 halves the memory of a
            large model's basis, ``max_steps * n`` numbers).
    """

    def __init__(self, matvec, v0, max_steps, restart=False, seed=None, dtype=np.float64):
        v0 = np.asarray(v0, dtype=np.float64)
        n = v0.shape[0]
        norm = np.linalg.norm(v0)
        if norm == 0.0:
            raise ValueError("The Lanczos start vector is zero.")
        self.matvec, self.n = matvec, n
        self.max_steps = min(int(max_steps), n)
        self.restart = restart
        self.rng, _ = make_rng(seed if seed is not None else 0)
        self.Q = np.zeros((self.max_steps, n), dtype=dtype)
        self.Q[0] = v0 / norm
        self.alpha, self.beta = [], []  # beta[j] couples steps j and j+1
        self.steps, self.num_matvecs = 0, 0
        self.broke_down = False
        self.block_start = 0  # first step of the current Krylov block (after restarts)
        self._scale = 0.0

    def step(self):
        """One Lanczos step; returns False when no further step is possible."""
        j = self.steps
        if j >= self.max_steps or self.broke_down:
            return False
        q = self.Q[j].astype(np.float64)
        w = np.asarray(self.matvec(q), dtype=np.float64)
        self.num_matvecs += 1
        check_finite(w)
        a = float(q @ w)
        w = w - a * q
        if j > 0:
            w = w - self.beta[j - 1] * self.Q[j - 1].astype(np.float64)
        w = orthogonalise(w, self.Q[: j + 1])
        b = float(np.linalg.norm(w))
        self.alpha.append(a)
        self.beta.append(b)
        self.steps = j + 1
        self._scale = max(self._scale, abs(a) + b + (self.beta[j - 1] if j > 0 else 0.0))
        if self.steps < self.max_steps:
            if b <= 1e-10 * max(self._scale, 1e-300):
                if not self.restart:
                    self.broke_down = True
                    return False
                self.beta[j] = 0.0
                self.block_start = j + 1
                r = orthogonalise(self.rng.standard_normal(self.n), self.Q[: j + 1])
                self.Q[j + 1] = r / np.linalg.norm(r)
            else:
                self.Q[j + 1] = w / b
        return True

    def tridiagonal(self):
        """T [j, j] as a dense matrix."""
        m = self.steps
        T = np.diag(np.array(self.alpha[:m]))
        if m > 1:
            off = np.array(self.beta[: m - 1])
            T += np.diag(off, 1) + np.diag(off, -1)
        return T

    def ritz(self):
        """(θ [j] ascending, S [j, j] eigenvectors of T, residual norms [j]).

        The residual of Ritz pair i, ||A Q^T s_i - θ_i Q^T s_i||, is |beta_j * S[j-1, i]|
        (zero after a breakdown, when the subspace is invariant).
        """
        theta, S = np.linalg.eigh(self.tridiagonal())
        last_beta = 0.0 if self.broke_down or self.steps == self.n else self.beta[self.steps - 1]
        return theta, S, np.abs(last_beta * S[-1, :])


def _select(theta, which, k):
    """Indices of the k wanted Ritz values, best first."""
    if which == "LM":
        order = np.argsort(-np.abs(theta), kind="stable")
    elif which == "LA":
        order = np.argsort(-theta, kind="stable")
    else:
        raise ValueError(f"which must be one of {WHICH}, not {which!r}.")
    return order[:k]


def lanczos_eigen(matvec, n, k=1, which="LM", max_iter=100, tol=1e-3, seed=None, dtype=np.float64):
    """Extreme eigenpairs by Lanczos with full reorthogonalisation.

    Runs Lanczos from a random Gaussian start (restarting on breakdown) and stops as soon as
    the k wanted Ritz pairs all have ``residual <= tol * max(|θ_i|, 1e-8 |θ_1|)``, after at most
    ``min(n, k * max_iter)`` steps (one matvec each). At n steps the result is exact.

    Args:
        matvec: callable, flat vector [n] -> A v [n] (A symmetric).
        n: dimension.
        k: number of eigenpairs.
        which: "LM" (largest magnitude) or "LA" (largest algebraic).
        max_iter: matvecs per eigenpair, pooled: one Lanczos run for all k pairs of at most
            ``min(n, k * max_iter)`` matvecs in total (power iteration's worst-case total).
        tol: relative residual tolerance.
        seed: int seed (None: fresh).
        dtype: dtype of the stored Lanczos basis.

    Returns:
        the dict of :func:`power_iteration` (eigenvalues ordered best first: by decreasing
        magnitude for "LM", decreasing value for "LA").
    """
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the dimension {n}, got {k}.")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, not {which!r}.")
    rng, seed = make_rng(seed)
    lz = Lanczos(matvec, rng.standard_normal(n), min(n, k * int(max_iter)), restart=True, seed=seed + 1, dtype=dtype)

    def check():
        theta, S, res = lz.ritz()
        idx = _select(theta, which, k)
        top = np.abs(theta[idx[0]])
        ok = res[idx] <= tol * np.maximum(np.abs(theta[idx]), 1e-8 * top)
        if lz.steps == n:
            ok[:] = True
        elif lz.block_start > 0 and ok.all():
            # After a breakdown every old Ritz pair is exact, which says nothing about the
            # part of the space not yet explored: also require the current Krylov block's
            # best Ritz pair to converge (then nothing better is left there, as in deflation).
            b = lz.block_start
            if b >= lz.steps:  # the new block is not explored yet
                ok[:] = False
            else:
                tb, Sb = np.linalg.eigh(lz.tridiagonal()[b:, b:])
                ib = _select(tb, which, 1)[0]
                rb = abs(lz.beta[lz.steps - 1] * Sb[-1, ib])
                if rb > tol * max(abs(tb[ib]), 1e-8 * top):
                    ok[:] = False
        return theta, S, res, idx, ok

    while lz.step():
        if lz.steps >= k and check()[-1].all():
            break
    theta, S, res, idx, converged = check()
    vectors = np.asarray(S[:, idx].T.astype(lz.Q.dtype) @ lz.Q[: lz.steps], dtype=np.float64)
    return {
        "eigenvalues": theta[idx],
        "eigenvectors": vectors,
        "residuals": res[idx],
        "converged": converged,
        "num_matvecs": lz.num_matvecs,
    }


def lanczos_quadrature(matvec, v0, steps, dtype=np.float64):
    """Gauss quadrature nodes and weights of the spectral measure of A seen from v0.

    With u = v0 / ||v0||, Σ_i w_i f(θ_i) ≈ u^T f(A) u, exactly for polynomials f of degree
    < 2 * (steps taken) (full reorthogonalisation keeps this true in floating point).

    Args:
        matvec: callable [n] -> [n].
        v0: start vector [n].
        steps: Lanczos steps m (clipped to n by the caller; stops early on breakdown,
            where the quadrature is already exact).

    Returns:
        (nodes [m'], weights [m'], num_matvecs): Ritz values (ascending) and the squared
        first components of T's eigenvectors (summing to 1); m' <= m.
    """
    lz = Lanczos(matvec, v0, steps, restart=False, dtype=dtype)
    while lz.step():
        pass
    theta, S, _ = lz.ritz()
    return theta, S[0, :] ** 2, lz.num_matvecs

