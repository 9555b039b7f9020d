"""The PyHessian toolset: top eigenvalues, trace, spectral density and diagonal of the Hessian.

Two layers:

1. Algorithms on any symmetric linear operator given as a callable
   ``matvec(v) -> A v`` on flat numpy vectors of length n (``power_iteration``,
   ``lanczos_eigen``, ``lanczos_quadrature``, ``hutchinson_trace``, ``hutchpp_trace``,
   ``hutchinson_diagonal``, ``gaussian_density``). They can be checked on explicit
   matrices and know nothing about Keras.
2. Model-level functions (``top_eigenvalues``, ``hessian_trace``, ``spectral_density``,
   ``diagonal``) that wrap the model's Hessian, or a block of it, as such a callable.

Every model-level function takes ``model, x, y=None``: one batch ``x, y`` (or the tuple
``(x, y)`` as ``x``), or ``x`` a ``tf.data.Dataset`` / list of ``(x, y)`` batches (rules:
``keras_hesstrace.trace.resolve_data``; the full-dataset mode: each Hv is the
batch-size-weighted average over the batches, the HVP of the mean loss over all their
examples). ``groups=`` restricts the Hessian to the block of those groups of
``layer_groups(model, by)``: v is zero outside the block and only the block of Hv is kept
(H_SS, computed with the gradient w.r.t. the block's variables only).

Stopping rules (documented choices, different from PyHessian's relative change
``|mean - prev| / (|prev| + 1e-6) < tol``, which can stop after two probes):

- eigenvalues: a Ritz pair (θ, u) with residual ``r = A u - θ u`` has an eigenvalue of A
  within ``||r||`` of θ (symmetric A). We stop when ``||r|| <= tol * |θ|`` for every wanted
  pair: a guaranteed relative eigenvalue accuracy of ``tol`` (the true error is usually
  far smaller, about ``||r||² / gap``). The same rule for power iteration and Lanczos.
- trace: stop when the standard error of the mean is at most ``tol * |mean|`` (after at
  least ``min_probes`` probes), or at ``max_iter`` HVPs.
"""

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
import keras

from keras_hesstrace._validate import check_integer
from keras_hesstrace.groups import group_indices, layer_groups
from keras_hesstrace.hvp import DEFAULT_MODE, hessian_operator, to_tensors
from keras_hesstrace.trace import resolve_data

WHICH = ("LM", "LA")
EIGEN_METHODS = ("auto", "power", "lanczos")
TRACE_METHODS = ("hutchinson", "hutch++")
PROBES = ("rademacher", "gaussian")

# Measured by benchmarks/eigen_hvps.py (fewest HVPs to reach a given error of the top-k
# eigenvalues against the exact spectrum, 4 float64 models of 79-2410 parameters): for
# k = 1 Lanczos needed 1.3-3.6x fewer HVPs than power iteration (e.g. 14 vs 50 on the
# BN CNN for 1e-6), for k = 3 3.4-15x fewer (17 vs 261 on the digits MLP). So "auto"
# means Lanczos; power iteration stays for PyHessian parity.
AUTO_METHOD = "lanczos"


# =========================================================================== helpers


def _rng(seed):
    """(numpy Generator, int seed); ``None`` draws a fresh seed and reports it."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**62))
    return np.random.default_rng(int(seed)), int(seed)


def _probe(rng, n, probe, dtype=np.float64):
    """One probe of length n with E[v v^T] = I."""
    if probe == "rademacher":
        return (2.0 * rng.integers(0, 2, size=n) - 1.0).astype(dtype)
    if probe == "gaussian":
        return rng.standard_normal(n).astype(dtype)
    raise ValueError(f"probe must be one of {PROBES}, not {probe!r}.")


def _check_finite(w):
    if not np.all(np.isfinite(w)):
        raise FloatingPointError(
            "The Hessian-vector product is not finite (NaN or inf): the loss or the model's "
            "weights are not finite at this point, so no spectrum can be computed."
        )


def _stderr(samples):
    samples = np.asarray(samples, dtype=np.float64)
    if samples.shape[0] < 2:
        return np.nan
    return float(samples.std(ddof=1) / np.sqrt(samples.shape[0]))


def _orthogonalise(w, basis):
    """w minus its projection on the orthonormal rows of ``basis`` (twice: 'twice is enough')."""
    if basis is None or len(basis) == 0:
        return w
    for _ in range(2):  # in the basis' dtype: no float64 copy of a float32 basis
        coeffs = basis @ w.astype(basis.dtype, copy=False)
        w = w - np.asarray(basis.T @ coeffs, dtype=np.float64)
    return w


# ====================================================== algorithms on a matvec callable


def power_iteration(matvec, n, k=1, max_iter=100, tol=1e-3, seed=None, dtype=np.float64):
    """Largest-magnitude eigenpairs by power iteration with deflation (PyHessian's method).

    Eigenpair i starts from a Gaussian vector; each step orthogonalises the iterate and
    A v against the i pairs already found (Gram-Schmidt deflation) and stops when the
    residual of the Rayleigh quotient satisfies ``||A v - θ v|| <= tol * max(|θ|, 1e-8 |θ_1|)``.

    Args:
        matvec: callable, flat float vector [n] -> A v [n] (A symmetric).
        n: dimension.
        k: number of eigenpairs.
        max_iter: maximum matvecs per eigenpair.
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
    rng, _ = _rng(seed)
    vectors = np.zeros((0, n), dtype=dtype)
    values, residuals, converged = [], [], []
    count = 0
    for i in range(k):
        v = _orthogonalise(rng.standard_normal(n).astype(dtype), vectors)
        v /= np.linalg.norm(v)
        theta, res, done = 0.0, np.inf, False
        for _ in range(max_iter):
            w = np.asarray(matvec(v), dtype=np.float64)
            count += 1
            _check_finite(w)
            w = _orthogonalise(w, vectors)
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
        self.rng, _ = _rng(seed if seed is not None else 0)
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
        _check_finite(w)
        a = float(q @ w)
        w = w - a * q
        if j > 0:
            w = w - self.beta[j - 1] * self.Q[j - 1].astype(np.float64)
        w = _orthogonalise(w, self.Q[: j + 1])
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
                r = _orthogonalise(self.rng.standard_normal(self.n), self.Q[: j + 1])
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
        max_iter: budget per eigenpair (the same as power iteration's).
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
    rng, seed = _rng(seed)
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


def hutchinson_trace(matvec, n, max_iter=100, tol=1e-3, min_probes=10, probe="rademacher", seed=None):
    """Hutchinson's estimate of tr(A): the mean of v^T A v over random probes.

    Stops when the standard error of the mean is at most ``tol * |mean|`` after at least
    ``min_probes`` probes, or after ``max_iter`` probes (one matvec each).

    Returns:
        dict with ``trace``, ``stderr``, ``samples`` [M], ``num_matvecs``, ``converged``.
    """
    max_iter = check_integer("max_iter", max_iter)
    rng, _ = _rng(seed)
    min_probes = max(2, min(int(min_probes), max_iter))
    samples, converged = [], False
    for m in range(max_iter):
        v = _probe(rng, n, probe)
        w = np.asarray(matvec(v), dtype=np.float64)
        _check_finite(w)
        samples.append(float(v @ w))
        if m + 1 >= min_probes:
            se = _stderr(samples)
            if se <= tol * abs(np.mean(samples)):
                converged = True
                break
    samples = np.array(samples)
    return {
        "trace": float(samples.mean()),
        "stderr": _stderr(samples),
        "samples": samples,
        "num_matvecs": len(samples),
        "converged": converged,
    }


def hutchpp_trace(matvec, n, max_iter=100, tol=1e-3, min_probes=10, probe="rademacher", seed=None, sketch_size=None):
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): exact trace of a low-rank part + Hutchinson on the rest.

    With s = ``sketch_size`` (default ``max_iter // 3``): Q = orth(A S) for an n x s random
    sign matrix S (s matvecs), ``tr(Q^T A Q)`` (s matvecs), then Hutchinson on the deflated
    operator (I - QQ^T) A (I - QQ^T) with the standard-error stop of
    :func:`hutchinson_trace` applied to the total, using the rest of the ``max_iter`` budget.
    The reported ``stderr`` is that of the deflated part, conditional on the sketch.

    Returns:
        dict as :func:`hutchinson_trace`, plus ``low_rank_trace`` and ``sketch_size``.
    """
    max_iter = int(max_iter)
    s = max(1, max_iter // 3) if sketch_size is None else int(sketch_size)
    s = min(s, n)
    if max_iter < 2 * s + 1:
        raise ValueError(f"hutch++ needs max_iter >= 2 * sketch_size + 1 = {2 * s + 1}, got {max_iter}.")
    rng, _ = _rng(seed)
    Y = np.empty((n, s))
    for j in range(s):
        Y[:, j] = np.asarray(matvec(_probe(rng, n, "rademacher")), dtype=np.float64)
        _check_finite(Y[:, j])
    Q, _ = np.linalg.qr(Y)
    low = 0.0
    for j in range(Q.shape[1]):
        low += float(Q[:, j] @ np.asarray(matvec(Q[:, j]), dtype=np.float64))
    budget = max_iter - s - Q.shape[1]
    min_probes = max(2, min(int(min_probes), budget))
    samples, converged = [], False
    for m in range(budget):
        g = _probe(rng, n, probe)
        g = g - Q @ (Q.T @ g)
        w = np.asarray(matvec(g), dtype=np.float64)
        _check_finite(w)
        samples.append(float(g @ w))
        if m + 1 >= min_probes and _stderr(samples) <= tol * abs(low + np.mean(samples)):
            converged = True
            break
    samples = np.array(samples)
    return {
        "trace": low + float(samples.mean()),
        "stderr": _stderr(samples),
        "samples": samples,
        "num_matvecs": s + Q.shape[1] + len(samples),
        "converged": converged,
        "low_rank_trace": low,
        "sketch_size": s,
    }


def hutchinson_diagonal(matvec, n, num_probes=100, probe="rademacher", seed=None):
    """Hutchinson's estimate of diag(A): the mean of v ⊙ A v over probes.

    Returns:
        (mean [n], stderr [n]) float64; stderr is NaN for one probe.
    """
    num_probes = check_integer("num_probes", num_probes)
    rng, _ = _rng(seed)
    total = np.zeros(n)
    total_sq = np.zeros(n)
    for _ in range(num_probes):
        v = _probe(rng, n, probe)
        w = np.asarray(matvec(v), dtype=np.float64)
        _check_finite(w)
        s = v * w
        total += s
        total_sq += s * s
    mean = total / num_probes
    if num_probes < 2:
        return mean, np.full(n, np.nan)
    var = np.maximum(total_sq - num_probes * mean**2, 0.0) / (num_probes - 1)
    return mean, np.sqrt(var / num_probes)


def default_sigma(nodes):
    """PyHessian's kernel width: sigma² = 1e-5 * max(1, λ_max - λ_min) over all nodes."""
    flat = np.concatenate([np.ravel(x) for x in nodes])
    spread = float(flat.max() - flat.min()) if flat.size else 0.0
    return float(np.sqrt(1e-5 * max(1.0, spread)))


def gaussian_density(nodes, weights, sigma=None, grid=10000, pad=5.0):
    """The smoothed spectral density (1/R) Σ_runs Σ_i w_i N(λ; θ_i, σ²) on a grid.

    Args:
        nodes, weights: lists over R runs of arrays [m_r] (Ritz values, quadrature weights).
        sigma: kernel standard deviation (None: :func:`default_sigma`).
        grid: number of grid points, or an explicit increasing array of λ values.
        pad: the default grid spans [min θ - pad σ, max θ + pad σ].

    Returns:
        (grid [G], density [G], sigma). Each Gaussian is normalised exactly, so the
        density integrates to ~1 when the grid covers the nodes and resolves sigma.
    """
    if sigma is None:
        sigma = default_sigma(nodes)
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}.")
    if np.ndim(grid) == 0:
        flat = np.concatenate([np.ravel(x) for x in nodes])
        grid = np.linspace(flat.min() - pad * sigma, flat.max() + pad * sigma, int(grid))
    grid = np.asarray(grid, dtype=np.float64)
    density = np.zeros_like(grid)
    for theta, w in zip(nodes, weights):
        z = (grid[:, None] - np.asarray(theta)[None, :]) / sigma
        density += np.exp(-0.5 * z * z) @ np.asarray(w)
    density /= len(nodes) * sigma * np.sqrt(2.0 * np.pi)
    return grid, density, sigma


# ======================================================== the model's Hessian as a matvec


def block_indices(model, groups=None, by="layer"):
    """(names, sorted variable indices) of the block made of ``groups`` of ``layer_groups(model, by)``.

    Args:
        groups: None (the whole model), a group name, or a list of group names.
        by: the grouping (see :func:`keras_hesstrace.layer_groups`).
    """
    mapping = layer_groups(model, by=by)
    names, indices = group_indices(model, mapping)
    if groups is None:
        return names, tuple(range(len(model.trainable_variables)))
    wanted = [groups] if isinstance(groups, str) else list(groups)
    if not wanted:
        raise ValueError("groups is empty: pass a group name, a list of names, or None for the whole model.")
    missing = [g for g in wanted if g not in names]
    if missing:
        raise ValueError(f"Unknown group(s) {missing}; the groups (by={by!r}) are: {list(names)}")
    chosen = sorted({i for g in wanted for i in indices[names.index(g)]})
    return tuple(wanted), tuple(chosen)


class ModelHessian:
    """The Hessian (block) of a model's loss as a callable on flat float64 numpy vectors.

    Args:
        model, x, y: the model and one batch (``x, y`` or the tuple ``(x, y)`` as x), or x a
            dataset / list of (x, y) batches (:func:`keras_hesstrace.trace.resolve_data`).
        loss: None (compiled loss), a Loss, a name or a callable.
        groups, by: the block (see :func:`block_indices`).
        num_batches: batches used in the dataset mode (default all).
        mode, jit_compile: HVP settings (see :func:`keras_hesstrace.hessian_operator`).
        verbose: show a keras Progbar counting HVPs.
        caller: the public function's name, for the messages that refuse ``x, y``.

    Attributes:
        n: the block's dimension; ``num_hvps``: products computed (one per batch pass);
        ``loss``: the loss seen at the first product.

    Every result below records ``mode``: how its products were computed ("forward" or
    "reverse"; for ``mode="auto"`` the one the operator's one-time check chose).
    """

    def __init__(self, model, x, y=None, loss=None, groups=None, by="layer", num_batches=None, mode=DEFAULT_MODE, jit_compile=False, verbose=0, caller="ModelHessian"):
        x, y, self.dataset = resolve_data(x, y, caller)
        self.model = model
        self.group_names, self.indices = block_indices(model, groups, by)
        self.restricted = groups is not None
        self.op = hessian_operator(model, loss, self.indices if self.restricted else None, mode, jit_compile)
        self.variables = list(self.op.variables)
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.offsets = np.cumsum([0] + self.sizes)
        self.n = int(self.offsets[-1])
        if self.dataset:
            if not isinstance(x, tf.data.Dataset) and iter(x) is x:
                raise ValueError(
                    "x is a one-shot iterator (a generator?): these methods pass over the data once per "
                    "Hessian-vector product; pass a tf.data.Dataset or a list of (x, y) batches."
                )
            self.data = x
        else:
            self.data = to_tensors(x, y)
        self.num_batches = num_batches
        self.basis_dtype = np.float64 if all(v.dtype == "float64" for v in self.variables) else np.float32
        self.num_hvps = 0
        self.loss = None
        self._bar = keras.utils.Progbar(None, unit_name="hvp") if verbose else None

    def unflatten(self, vector):
        """Flat [n] -> list of tensors shaped (and typed) like the block's variables."""
        vector = np.asarray(vector)
        return [
            tf.constant(vector[a:b].reshape(v.shape), dtype=v.dtype)
            for v, a, b in zip(self.variables, self.offsets[:-1], self.offsets[1:])
        ]

    def full_vector(self, vector):
        """Flat block vector [n] -> tensors shaped like ALL model.trainable_variables (zero outside the block)."""
        parts = dict(zip(self.indices, self.unflatten(vector)))
        return [parts[i] if i in parts else tf.zeros(v.shape, dtype=v.dtype) for i, v in enumerate(self.model.trainable_variables)]

    def __call__(self, vector):
        tensors = self.unflatten(vector)
        if self.dataset:
            hv, loss = self.op.matvec_data(self.data, tensors, self.num_batches)
        else:
            hv, loss = self.op.matvec(self.data[0], self.data[1], tensors)
        self.num_hvps += 1
        if self.loss is None:
            self.loss = float(loss)
        if self._bar is not None:
            self._bar.update(self.num_hvps)
        return np.concatenate([np.asarray(h, dtype=np.float64).ravel() for h in hv])

    def close(self):
        if self._bar is not None:
            self._bar.update(self.num_hvps, finalize=True)


def _paths(variables):
    return tuple(getattr(v, "path", v.name) for v in variables)


# ============================================================ model-level functions


@dataclass(frozen=True)
class EigenResult:
    """Top eigenpairs of a model's Hessian (or block).

    Attributes:
        eigenvalues: float64 [k], best first: decreasing |λ| for which="LM",
            decreasing λ for which="LA".
        eigenvectors: k lists of tensors shaped like ``model.trainable_variables``
            (unit norm over the block, zero outside it).
        residuals: float64 [k], ||H u - λ u||: an eigenvalue of H lies within it (for
            method="power", of the operator deflated by the earlier pairs).
        converged: bool [k], residual <= tol * |λ|.
        num_hvps: Hessian-vector products used (one pass over the data each).
        method: "power" or "lanczos"; which: "LM" or "LA".
        groups: the block's group names (all groups when not restricted); dimension: n.
        loss: the loss at the current weights.
    """

    eigenvalues: np.ndarray
    eigenvectors: list = field(repr=False)
    residuals: np.ndarray
    converged: np.ndarray
    num_hvps: int
    method: str
    which: str
    groups: tuple
    dimension: int
    loss: float
    seed: int = 0
    mode: str = "reverse"

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {"eigenvalue": self.eigenvalues, "residual": self.residuals, "converged": self.converged},
            index=pd.RangeIndex(1, len(self.eigenvalues) + 1, name="rank"),
        )

    def __str__(self):
        lines = [self.to_frame().to_string(float_format=lambda v: f"{v:.6g}")]
        lines.append(f"{self.method}, which={self.which}, {self.num_hvps} HVPs, dimension {self.dimension}, loss {self.loss:.4g}")
        if not self.converged.all():
            lines.append("NOT CONVERGED: raise max_iter or tol; the residual bounds the error.")
        return "\n".join(lines)


def top_eigenvalues(
    model, x, y=None, k=1, max_iter=100, tol=1e-3, method="auto", which="LM", loss=None, groups=None, by="layer",
    seed=None, num_batches=None, mode=DEFAULT_MODE, jit_compile=False, verbose=0,
):
    """The k extreme eigenvalues of the Hessian and their eigenvectors.

    Args:
        model: a built ``keras.Model`` (run with ``training=False``).
        x, y: one batch [batch, ...] (or the tuple ``(x, y)`` as x, y omitted), or x a
            ``tf.data.Dataset`` / list of (x, y) batches.
        k: number of eigenpairs.
        max_iter: HVP budget per eigenpair (power: per pair; Lanczos: k * max_iter in all).
        tol: relative residual tolerance: stop when ||H u - λ u|| <= tol |λ| for all k pairs
            (an eigenvalue of H is then within tol |λ| of each λ).
        method: "power" (PyHessian's power iteration with deflation), "lanczos" (full
            reorthogonalisation) or "auto" (Lanczos: it needed fewer HVPs in our
            measurements; power only for which="LM").
        which: "LM", the largest in magnitude (what PyHessian's power iteration finds;
            near a minimum the same as the largest), or "LA", the algebraically largest
            (Lanczos only).
        loss: None for the compiled loss, or a Loss, a name or a callable.
        groups, by: restrict to the block of these groups of ``layer_groups(model, by)``.
        seed: int seed of the start vectors (None: fresh, kept in the result).
        num_batches: batches used in the dataset mode.
        mode, jit_compile: HVP settings.
        verbose: 1 shows a progress bar counting HVPs.

    Returns:
        :class:`EigenResult`. A warning is issued when a pair did not converge.

    Example:
        >>> r = top_eigenvalues(model, x, y, k=2, seed=0)   # doctest: +SKIP
        >>> r.eigenvalues, r.num_hvps
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"method must be one of {EIGEN_METHODS}, not {method!r}.")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, not {which!r}.")
    if method == "auto":
        method = AUTO_METHOD
    if method == "power" and which != "LM":
        raise ValueError("Power iteration finds the largest-magnitude eigenvalues only: use which='LM' or method='lanczos'.")
    H = ModelHessian(model, x, y, loss, groups, by, num_batches, mode, jit_compile, verbose, caller="top_eigenvalues")
    _, seed = _rng(seed)
    try:
        if method == "power":
            out = power_iteration(H, H.n, k, max_iter, tol, seed, H.basis_dtype)
        else:
            out = lanczos_eigen(H, H.n, k, which, max_iter, tol, seed, H.basis_dtype)
    finally:
        H.close()
    result = EigenResult(
        eigenvalues=np.asarray(out["eigenvalues"], dtype=np.float64),
        eigenvectors=[H.full_vector(v) for v in out["eigenvectors"]],
        residuals=out["residuals"],
        converged=out["converged"],
        num_hvps=H.num_hvps,
        method=method,
        which=which,
        groups=H.group_names,
        dimension=H.n,
        loss=H.loss,
        seed=seed,
        mode=H.op.mode,
    )
    if not result.converged.all():
        warnings.warn(
            f"top_eigenvalues: {int((~result.converged).sum())} of {k} eigenpairs did not reach tol={tol} "
            f"in {result.num_hvps} HVPs (residuals {result.residuals}).",
            RuntimeWarning,
            stacklevel=2,
        )
    return result


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic estimate of tr(H) (or of a block's trace).

    Attributes:
        trace: the estimate; stderr: its standard error (for hutch++, of the deflated part
            given the sketch); samples: the Hutchinson samples [M] (hutch++: of the deflated part).
        num_hvps: HVPs used; converged: stderr <= tol |trace| was reached.
        method, groups, dimension, loss, seed: as in :class:`EigenResult`.
    """

    trace: float
    stderr: float
    samples: np.ndarray = field(repr=False)
    num_hvps: int
    converged: bool
    method: str
    groups: tuple
    dimension: int
    loss: float
    seed: int = 0
    mode: str = "reverse"

    def __str__(self):
        return (
            f"trace {self.trace:.6g} ± {self.stderr:.2g} ({self.method}, {self.num_hvps} HVPs, "
            f"dimension {self.dimension}, loss {self.loss:.4g}{'' if self.converged else ', tol not reached'})"
        )


def hessian_trace(
    model, x, y=None, max_iter=100, tol=1e-3, method="hutchinson", min_probes=10, probe="rademacher", loss=None,
    groups=None, by="layer", seed=None, num_batches=None, mode=DEFAULT_MODE, jit_compile=False, verbose=0,
):
    """tr(H) of the whole model (or a block) by Hutchinson or Hutch++, with a standard-error stop.

    Args:
        model, x, y, loss, groups, by, seed, num_batches, mode, jit_compile, verbose: as in
            :func:`top_eigenvalues`.
        max_iter: the most HVPs.
        tol: stop when the standard error is at most ``tol * |trace|`` (after ``min_probes``
            probes). tol=0 runs exactly max_iter HVPs.
        method: "hutchinson" (one HVP per probe) or "hutch++" (max_iter // 3 HVPs on a
            random sketch and max_iter // 3 on its exact trace, the rest on Hutchinson for
            the deflated remainder: much lower variance when H has a few dominant
            eigenvalues, as network Hessians do).
        min_probes: the fewest probes before the stop rule is tried.
        probe: "rademacher" or "gaussian".

    Returns:
        :class:`TraceEstimate`.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, not {method!r}.")
    H = ModelHessian(model, x, y, loss, groups, by, num_batches, mode, jit_compile, verbose, caller="hessian_trace")
    _, seed = _rng(seed)
    try:
        if method == "hutchinson":
            out = hutchinson_trace(H, H.n, max_iter, tol, min_probes, probe, seed)
        else:
            out = hutchpp_trace(H, H.n, max_iter, tol, min_probes, probe, seed)
    finally:
        H.close()
    return TraceEstimate(
        trace=out["trace"], stderr=out["stderr"], samples=out["samples"], num_hvps=H.num_hvps,
        converged=out["converged"], method=method, groups=H.group_names, dimension=H.n, loss=H.loss, seed=seed,
        mode=H.op.mode,
    )


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature of the Hessian's eigenvalue density.

    Attributes:
        nodes, weights: lists over runs of float64 arrays [m_r]: Ritz values (ascending)
            and quadrature weights (squared first components, summing to 1 per run).
        grid, density: float64 [G]: the Gaussian-smoothed density (1/R) Σ Σ w N(λ; θ, σ²).
        sigma: the kernel's standard deviation.
        lanczos_steps: steps per run actually used (after clipping to the dimension).
        num_hvps, groups, dimension, loss, seed: as elsewhere.
        notes: messages about adjustments made (clipping), also issued as warnings.
    """

    nodes: list
    weights: list
    grid: np.ndarray = field(repr=False)
    density: np.ndarray = field(repr=False)
    sigma: float
    lanczos_steps: int
    num_hvps: int
    groups: tuple
    dimension: int
    loss: float
    seed: int = 0
    notes: tuple = ()
    mode: str = "reverse"

    @property
    def num_runs(self):
        return len(self.nodes)

    def run_moments(self, k):
        """float64 [R]: Σ_i w_i θ_i^k per run, an estimate of tr(H^k) / n (exact in expectation for k < 2m)."""
        return np.array([float(np.sum(w * np.asarray(t, dtype=np.float64) ** k)) for t, w in zip(self.nodes, self.weights)])

    def moment(self, k):
        """(mean over runs, standard error) of :meth:`run_moments`."""
        m = self.run_moments(k)
        return float(m.mean()), _stderr(m)

    def to_frame(self):
        """Nodes and weights as a long pandas table (run, node, weight)."""
        import pandas as pd

        rows = [(r, float(t), float(w)) for r, (ts, ws) in enumerate(zip(self.nodes, self.weights)) for t, w in zip(ts, ws)]
        return pd.DataFrame(rows, columns=["run", "node", "weight"])

    def __str__(self):
        lo = min(float(np.min(t)) for t in self.nodes)
        hi = max(float(np.max(t)) for t in self.nodes)
        m1, se1 = self.moment(1)
        lines = [
            f"SLQ: {self.num_runs} run(s) x {self.lanczos_steps} Lanczos steps, {self.num_hvps} HVPs, dimension {self.dimension}",
            f"Ritz values in [{lo:.6g}, {hi:.6g}]; sigma {self.sigma:.3g}; tr(H)/n ≈ {m1:.6g}"
            + (f" ± {se1:.2g}" if np.isfinite(se1) else "") + f"; loss {self.loss:.4g}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def spectral_density(
    model, x, y=None, num_runs=1, lanczos_steps=90, sigma=None, grid=10000, loss=None, groups=None, by="layer",
    seed=None, num_batches=None, mode=DEFAULT_MODE, jit_compile=False, verbose=0,
):
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature (SLQ).

    Each run starts Lanczos (full reorthogonalisation) from a Rademacher vector v and takes
    ``lanczos_steps`` HVPs; its Ritz values θ_i with weights w_i = (first component of T's
    i-th eigenvector)² form a quadrature with Σ w_i θ_i^k = v^T H^k v / n exactly for
    k < 2 * steps, whose expectation is tr(H^k) / n. The density is smoothed with a
    Gaussian kernel (PyHessian's width by default).

    Args:
        model, x, y, loss, groups, by, seed, num_batches, mode, jit_compile, verbose: as in
            :func:`top_eigenvalues`.
        num_runs: independent start vectors (the density averages them).
        lanczos_steps: steps per run; larger than the dimension n is clipped to n (with a
            note and a warning): n steps already give the exact spectrum seen from v.
        sigma: kernel standard deviation; None: sqrt(1e-5 * max(1, λ_max - λ_min)).
        grid: number of grid points (spanning the nodes ± 5 sigma), or an array of λ values.

    Returns:
        :class:`SpectralDensity`.
    """
    num_runs = check_integer("num_runs", num_runs)
    lanczos_steps = check_integer("lanczos_steps", lanczos_steps)
    H = ModelHessian(model, x, y, loss, groups, by, num_batches, mode, jit_compile, verbose, caller="spectral_density")
    rng, seed = _rng(seed)
    notes = []
    if lanczos_steps > H.n:
        notes.append(f"lanczos_steps={lanczos_steps} is more than the dimension {H.n}; clipped to {H.n} (exact quadrature).")
        warnings.warn(notes[-1], UserWarning, stacklevel=2)
        lanczos_steps = H.n
    nodes, weights = [], []
    try:
        for _ in range(num_runs):
            theta, w, _ = lanczos_quadrature(H, _probe(rng, H.n, "rademacher"), lanczos_steps, H.basis_dtype)
            nodes.append(theta)
            weights.append(w)
    finally:
        H.close()
    grid, density, sigma = gaussian_density(nodes, weights, sigma, grid)
    spacing = float(grid[1] - grid[0]) if grid.size > 1 else 0.0
    if spacing > sigma:
        notes.append(
            f"the grid spacing {spacing:.3g} is wider than the kernel sigma {sigma:.3g}: the plotted density "
            "under-resolves its peaks; pass more grid points or a larger sigma (nodes and weights are exact)."
        )
    return SpectralDensity(
        nodes=nodes, weights=weights, grid=grid, density=density, sigma=sigma, lanczos_steps=lanczos_steps,
        num_hvps=H.num_hvps, groups=H.group_names, dimension=H.n, loss=H.loss, seed=seed, notes=tuple(notes),
        mode=H.op.mode,
    )


@dataclass(frozen=True)
class DiagonalResult:
    """Hutchinson estimate of the Hessian's diagonal, per group.

    Attributes:
        groups: group names G.
        values: ``OrderedDict`` group -> list of float64 arrays shaped like that group's
            variables: the estimate of diag(H) on them.
        stderr: the same structure: each entry's standard error over probes.
        variables: ``OrderedDict`` group -> the variables' paths.
        num_probes: HVPs used; loss, seed as elsewhere.
    """

    groups: tuple
    values: OrderedDict = field(repr=False)
    stderr: OrderedDict = field(repr=False)
    variables: OrderedDict = field(repr=False)
    num_probes: int
    loss: float
    seed: int = 0
    mode: str = "reverse"

    def flat(self):
        """(values [n], stderr [n]) concatenated in group order."""
        vals = [a.ravel() for g in self.groups for a in self.values[g]]
        errs = [a.ravel() for g in self.groups for a in self.stderr[g]]
        return np.concatenate(vals), np.concatenate(errs)

    def to_frame(self):
        """Per group: the sum of the diagonal (= the group's trace), its mean, min, max."""
        import pandas as pd

        rows = []
        for g in self.groups:
            v = np.concatenate([a.ravel() for a in self.values[g]])
            rows.append((g, v.sum(), v.mean(), v.min(), v.max(), v.size))
        return pd.DataFrame(rows, columns=["group", "diag_sum", "diag_mean", "diag_min", "diag_max", "num_params"]).set_index("group")


def diagonal(
    model, x, y=None, num_probes=100, groups=None, by="layer", probe="rademacher", loss=None, seed=None,
    num_batches=None, mode=DEFAULT_MODE, jit_compile=False, verbose=0,
):
    """Hutchinson estimate of the Hessian diagonal, E[v ⊙ H v], per group.

    Args:
        num_probes: HVPs (probes); the standard error falls as 1 / sqrt(num_probes).
        groups: None for every group of ``layer_groups(model, by)``, or a name / list of
            names. Restricting is not only cheaper to read: the probe is then zero outside
            the block, which removes the other blocks' off-diagonal terms from the variance
            (diag(H_SS) = diag(H) on S, so the target is the same).
        Other arguments: as in :func:`top_eigenvalues`.

    Returns:
        :class:`DiagonalResult`.
    """
    H = ModelHessian(model, x, y, loss, groups, by, num_batches, mode, jit_compile, verbose, caller="diagonal")
    _, seed = _rng(seed)
    try:
        mean, err = hutchinson_diagonal(H, H.n, num_probes, probe, seed)
    finally:
        H.close()
    mapping = layer_groups(model, by=by)
    names, indices = group_indices(model, mapping)
    position = {idx: p for p, idx in enumerate(H.indices)}
    values, stderr, paths = OrderedDict(), OrderedDict(), OrderedDict()
    for name, idx in zip(names, indices):
        if not all(i in position for i in idx):
            continue
        vs, es = [], []
        for i in idx:
            p = position[i]
            a, b = H.offsets[p], H.offsets[p + 1]
            shape = tuple(H.variables[p].shape)
            vs.append(mean[a:b].reshape(shape))
            es.append(err[a:b].reshape(shape))
        values[name], stderr[name] = vs, es
        paths[name] = _paths([model.trainable_variables[i] for i in idx])
    return DiagonalResult(
        groups=tuple(values), values=values, stderr=stderr, variables=paths, num_probes=int(num_probes), loss=H.loss, seed=seed,
        mode=H.op.mode,
    )
