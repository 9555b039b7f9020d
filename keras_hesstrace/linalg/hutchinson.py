"""Hutchinson and Hutch++ estimates of the trace and of the diagonal of a symmetric matvec.

Probes come from a probe source ``draw(m) -> float64 [n]`` (probe number m; E[v v^T] = I).
By default :func:`~keras_hesstrace.linalg.common.numpy_probes` of ``probe`` and ``seed``;
the Keras functions pass the package's one TensorFlow generator, so the same seed gives the
same probes as :func:`keras_hesstrace.layer_traces`.
"""

import numpy as np

from keras_hesstrace._validate import check_integer
from keras_hesstrace.linalg.adaptive import next_round, run_until_met, target_met
from keras_hesstrace.linalg.common import check_finite, numpy_probes, stderr, take_probe


def hutchinson_trace(matvec, n, max_iter=100, tol=1e-3, min_probes=10, probe="rademacher", seed=None, draw=None):
    """Hutchinson's estimate of tr(A): the mean of v^T A v over random probes.

    ``tol`` > 0 is a target for the relative standard error: after a pilot of
    ``min_probes`` probes, rounds are drawn by the rule of
    :func:`keras_hesstrace.linalg.adaptive.run_until_met` (each sized from the sample variance so
    far) until the standard error of the mean is at most ``tol * |mean|``, or ``max_iter``
    probes (one matvec each: ``max_iter`` is the total matvec budget). ``tol=0``: exactly
    ``max_iter`` probes. Sample m uses probe ``draw(m)`` (default:
    ``numpy_probes(n, probe, seed)``; given ``draw``, ``probe`` and ``seed`` are not used).

    Returns:
        dict with ``trace``, ``stderr``, ``samples`` [M], ``num_matvecs``, ``converged``
        (the target was met; False with ``tol=0``).
    """
    max_iter = check_integer("max_iter", max_iter)
    draw = numpy_probes(n, probe, seed) if draw is None else draw
    min_probes = max(2, min(int(min_probes), max_iter))

    def samples_of(lo, hi):
        out = []
        for m in range(lo, hi):
            v = take_probe(draw, m, n)
            w = np.asarray(matvec(v), dtype=np.float64)
            check_finite(w)
            out.append([float(v @ w)])
        return np.array(out)

    if tol > 0 and max_iter >= 2:
        samples = run_until_met(samples_of, min_probes, tol, max_iter)[:, 0]
        converged = bool(target_met(samples[:, None], tol)[0])
    else:
        samples, converged = samples_of(0, max_iter)[:, 0], False
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


def hutchinson_diagonal(matvec, n, num_probes=100, probe="rademacher", seed=None, draw=None, rel_stderr=None,
                        max_probes=None, blocks=None):
    """Hutchinson's estimate of diag(A): the mean of v ⊙ A v over probes ``draw(0), draw(1), ...``
    (default ``numpy_probes(n, probe, seed)``).

    With ``rel_stderr`` r: ``num_probes`` is a pilot; then probes are added in rounds (each
    at least a tenth more, sized from the variances so far) until every block b of
    ``blocks`` (a list of blocks, each a list of (start, stop) slices; default one block,
    the whole vector) has ‖stderr_b‖ <= r ‖mean_b‖ (the block's relative standard error in
    the 2-norm), or ``max_probes`` probes.

    Returns:
        (mean [n], stderr [n], num_probes): float64 arrays (stderr NaN for one probe) and
        the probes used.
    """
    num_probes = check_integer("num_probes", num_probes)
    draw = numpy_probes(n, probe, seed) if draw is None else draw
    blocks = [[(0, n)]] if blocks is None else [[(int(a), int(b)) for a, b in block] for block in blocks]
    total = np.zeros(n)
    total_sq = np.zeros(n)
    m, target = 0, num_probes
    while True:
        for m in range(m, target):
            v = take_probe(draw, m, n)
            w = np.asarray(matvec(v), dtype=np.float64)
            check_finite(w)
            s = v * w
            total += s
            total_sq += s * s
        m = target
        mean = total / m
        if m < 2:
            return mean, np.full(n, np.nan), m
        var = np.maximum(total_sq - m * mean**2, 0.0) / (m - 1)
        if rel_stderr is None or m >= max_probes:
            return mean, np.sqrt(var / m), m
        need = []
        for block in blocks:
            spread = sum(var[a:b].sum() for a, b in block)
            size = sum(mean[a:b] @ mean[a:b] for a, b in block)
            need.append(spread / (rel_stderr**2 * size) if size > 0 else np.inf)
        if max(need) <= m:
            return mean, np.sqrt(var / m), m
        target = next_round(m, max(need), max_probes)
