"""Hutchinson and Hutch++ estimates of the trace and of the diagonal of a symmetric matvec."""

import numpy as np

from keras_hesstrace._validate import check_integer
from keras_hesstrace.linalg.common import check_finite, make_rng, random_probe, stderr


def hutchinson_trace(matvec, n, max_iter=100, tol=1e-3, min_probes=10, probe="rademacher", seed=None):
    """Hutchinson's estimate of tr(A): the mean of v^T A v over random probes.

    Stops when the standard error of the mean is at most ``tol * |mean|`` after at least
    ``min_probes`` probes, or after ``max_iter`` probes (one matvec each).

    Returns:
        dict with ``trace``, ``stderr``, ``samples`` [M], ``num_matvecs``, ``converged``.
    """
    max_iter = check_integer("max_iter", max_iter)
    rng, _ = make_rng(seed)
    min_probes = max(2, min(int(min_probes), max_iter))
    samples, converged = [], False
    for m in range(max_iter):
        v = random_probe(rng, n, probe)
        w = np.asarray(matvec(v), dtype=np.float64)
        check_finite(w)
        samples.append(float(v @ w))
        if m + 1 >= min_probes:
            se = stderr(samples)
            if se <= tol * abs(np.mean(samples)):
                converged = True
                break
    samples = np.array(samples)
    return {
        "trace": float(samples.mean()),
        "stderr": stderr(samples),
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
    rng, _ = make_rng(seed)
    Y = np.empty((n, s))
    for j in range(s):
        Y[:, j] = np.asarray(matvec(random_probe(rng, n, "rademacher")), dtype=np.float64)
        check_finite(Y[:, j])
    Q, _ = np.linalg.qr(Y)
    low = 0.0
    for j in range(Q.shape[1]):
        low += float(Q[:, j] @ np.asarray(matvec(Q[:, j]), dtype=np.float64))
    budget = max_iter - s - Q.shape[1]
    min_probes = max(2, min(int(min_probes), budget))
    samples, converged = [], False
    for m in range(budget):
        g = random_probe(rng, n, probe)
        g = g - Q @ (Q.T @ g)
        w = np.asarray(matvec(g), dtype=np.float64)
        check_finite(w)
        samples.append(float(g @ w))
        if m + 1 >= min_probes and stderr(samples) <= tol * abs(low + np.mean(samples)):
            converged = True
            break
    samples = np.array(samples)
    return {
        "trace": low + float(samples.mean()),
        "stderr": stderr(samples),
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
    rng, _ = make_rng(seed)
    total = np.zeros(n)
    total_sq = np.zeros(n)
    for _ in range(num_probes):
        v = random_probe(rng, n, probe)
        w = np.asarray(matvec(v), dtype=np.float64)
        check_finite(w)
        s = v * w
        total += s
        total_sq += s * s
    mean = total / num_probes
    if num_probes < 2:
        return mean, np.full(n, np.nan)
    var = np.maximum(total_sq - num_probes * mean**2, 0.0) / (num_probes - 1)
    return mean, np.sqrt(var / num_probes)
