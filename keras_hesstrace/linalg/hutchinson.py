"""Hutchinson and Hutch++ estimates of the trace and of the diagonal of a symmetric matvec.

Probes come from a probe source ``draw(m) -> float64 [n]`` (probe number m; E[v v^T] = I).
By default :func:`~keras_hesstrace.linalg.common.numpy_probes` of ``probe`` and ``seed``;
the Keras functions pass the package's one TensorFlow generator, so the same seed gives the
same probes as :func:`keras_hesstrace.layer_traces`.
"""

import numpy as np

from keras_hesstrace._validate import check_integer
from keras_hesstrace.linalg.common import check_finite, numpy_probes, stderr, take_probe


def hutchinson_trace(matvec, n, max_iter=100, tol=1e-3, min_probes=10, probe="rademacher", seed=None, draw=None):
    """Hutchinson's estimate of tr(A): the mean of v^T A v over random probes.

    Stops when the standard error of the mean is at most ``tol * |mean|`` after at least
    ``min_probes`` probes, or after ``max_iter`` probes (one matvec each: ``max_iter`` is the
    total matvec budget). Sample m uses
    probe ``draw(m)`` (default: ``numpy_probes(n, probe, seed)``; given ``draw``, ``probe``
    and ``seed`` are not used).

    Returns:
        dict with ``trace``, ``stderr``, ``samples`` [M], ``num_matvecs``, ``converged``.
    """
    max_iter = check_integer("max_iter", max_iter)
    draw = numpy_probes(n, probe, seed) if draw is None else draw
    min_probes = max(2, min(int(min_probes), max_iter))
    samples, converged = [], False
    for m in range(max_iter):
        v = take_probe(draw, m, n)
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


def hutchpp_trace(
    matvec, n, max_iter=100, tol=1e-3, min_probes=10, probe="rademacher", seed=None, sketch_size=None, draw=None,
    sketch_draw=None,
):
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): exact trace of a low-rank part + Hutchinson on the rest.

    With s = ``sketch_size`` (default ``max_iter // 3``): Q = orth(A S) for an n x s random
    sign matrix S (s matvecs), ``tr(Q^T A Q)`` (s matvecs), then Hutchinson on the deflated
    operator (I - QQ^T) A (I - QQ^T) with the standard-error stop of
    :func:`hutchinson_trace` applied to the total, using the rest of the ``max_iter`` budget.
    ``max_iter`` is the total matvec budget, sketch included: s + s for the sketch and its
    trace (s clipped to n), then at most ``max_iter - 2 s`` Hutchinson samples (one each).
    The reported ``stderr`` is that of the deflated part, conditional on the sketch.

    Probe numbers: sketch column j is ``sketch_draw(j)`` (default Rademacher
    ``numpy_probes(n, "rademacher", seed)``), Hutchinson sample m uses ``draw(s + m)``
    (default ``numpy_probes(n, probe, seed)``): disjoint numbers, so sketch and samples are
    independent when both sources share a seed.

    Returns:
        dict as :func:`hutchinson_trace`, plus ``low_rank_trace`` and ``sketch_size``.
    """
    max_iter = int(max_iter)
    s = max(1, max_iter // 3) if sketch_size is None else int(sketch_size)
    s = min(s, n)
    if max_iter < 2 * s + 1:
        raise ValueError(f"hutch++ needs max_iter >= 2 * sketch_size + 1 = {2 * s + 1}, got {max_iter}.")
    draw = numpy_probes(n, probe, seed) if draw is None else draw
    sketch_draw = numpy_probes(n, "rademacher", seed) if sketch_draw is None else sketch_draw
    Y = np.empty((n, s))
    for j in range(s):
        Y[:, j] = np.asarray(matvec(take_probe(sketch_draw, j, n)), dtype=np.float64)
        check_finite(Y[:, j])
    Q, _ = np.linalg.qr(Y)
    low = 0.0
    for j in range(Q.shape[1]):
        low += float(Q[:, j] @ np.asarray(matvec(Q[:, j]), dtype=np.float64))
    budget = max_iter - s - Q.shape[1]
    min_probes = max(2, min(int(min_probes), budget))
    samples, converged = [], False
    for m in range(budget):
        g = take_probe(draw, s + m, n)
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


def hutchinson_diagonal(matvec, n, num_probes=100, probe="rademacher", seed=None, draw=None):
    """Hutchinson's estimate of diag(A): the mean of v ⊙ A v over probes ``draw(0), draw(1), ...``
    (default ``numpy_probes(n, probe, seed)``).

    Returns:
        (mean [n], stderr [n]) float64; stderr is NaN for one probe.
    """
    num_probes = check_integer("num_probes", num_probes)
    draw = numpy_probes(n, probe, seed) if draw is None else draw
    total = np.zeros(n)
    total_sq = np.zeros(n)
    for m in range(num_probes):
        v = take_probe(draw, m, n)
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
