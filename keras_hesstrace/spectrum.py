"""The PyHessian toolset: top eigenvalues, trace, spectral density and diagonal of the Hessian.

The model-level functions (``top_eigenvalues``, ``hessian_trace``, ``spectral_density``,
``diagonal``) wrap the model's Hessian, or a block of it, as a matvec
(:class:`~keras_hesstrace.model_hessian.ModelHessian`) and run the algorithms of
:mod:`keras_hesstrace.linalg` on it (their stopping rules are documented there); they
return the types of :mod:`keras_hesstrace.spectrum_results`.

Every model-level function takes ``model, x, y=None``: one batch ``x, y`` (or the tuple
``(x, y)`` as ``x``), or ``x`` a ``tf.data.Dataset`` / list of ``(x, y)`` batches (rules:
``keras_hesstrace.batches.resolve_data``; the full-dataset mode: each Hv is the
batch-size-weighted average over the batches, the HVP of the mean loss over all their
examples). ``groups=`` restricts the Hessian to the block of those groups of
``layer_groups(model, by)``: v is zero outside the block and only the block of Hv is kept
(H_SS, computed with the gradient w.r.t. the block's variables only).

Probes (``hessian_trace``, ``diagonal``, the start vectors of ``spectral_density``) come from
the package's one generator, :func:`keras_hesstrace.probes.draw_probe` with the stateless
seed ``(seed, m)`` (:meth:`ModelHessian.probe_source`): the same seed gives the same probes
as ``layer_traces``, and a block's probe is the whole model's restricted to the block.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import keras
import numpy as np

from keras_hesstrace._validate import check_integer
from keras_hesstrace.linalg.adaptive import check_target
from keras_hesstrace.groups import group_indices, layer_groups
from keras_hesstrace.hvp import DEFAULT_MODE
from keras_hesstrace.linalg.common import PROBES, make_rng
from keras_hesstrace.linalg.density import gaussian_density
from keras_hesstrace.linalg.hutchinson import hutchinson_diagonal, hutchinson_trace, hutchpp_trace
from keras_hesstrace.linalg.lanczos import WHICH, lanczos_eigen, lanczos_quadrature
from keras_hesstrace.linalg.power import power_iteration
from keras_hesstrace.model_hessian import ModelHessian, block_indices, variable_paths
from keras_hesstrace.spectrum_results import DiagonalResult, EigenResult, SpectralDensity, TraceEstimate

EIGEN_METHODS = ("auto", "power", "lanczos")
TRACE_METHODS = ("hutchinson", "hutch++")

# Measured by benchmarks/eigen_hvps.py (fewest HVPs to reach a given error of the top-k
# eigenvalues against the exact spectrum, 4 float64 models of 79-2410 parameters): for
# k = 1 Lanczos needed 1.3-3.6x fewer HVPs than power iteration (e.g. 14 vs 50 on the
# BN CNN for 1e-6), for k = 3 3.4-15x fewer (17 vs 261 on the digits MLP). So "auto"
# means Lanczos; power iteration stays for PyHessian parity.
AUTO_METHOD = "lanczos"


def top_eigenvalues(
    model: keras.Model, x, y=None, k: int = 1, max_iter: int = 100, tol: float = 1e-3, method: str = "auto",
    which: str = "LM", loss=None, groups=None, by="layer", seed: int | None = None, num_batches: int | None = None,
    mode: str = DEFAULT_MODE, jit_compile: bool = False, verbose: int = 0,
) -> EigenResult:
    """The k extreme eigenvalues of the Hessian and their eigenvectors.

    Args:
        model: a built ``keras.Model`` (run with ``training=False``).
        x, y: one batch [batch, ...] (or the tuple ``(x, y)`` as x, y omitted), or x a
            ``tf.data.Dataset`` / list of (x, y) batches.
        k: number of eigenpairs.
        max_iter: HVPs per eigenpair (one HVP: one product H v, over the ``num_batches``
            batches in the dataset mode). Power: at most max_iter for each pair, so at most
            k * max_iter in total; Lanczos: one run for all pairs of at most
            min(dimension, k * max_iter) HVPs in total.
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
        >>> r = top_eigenvalues(model, x, y, k=2, seed=0)
        >>> r.eigenvalues.shape, bool(r.converged.all())
        ((2,), True)
        >>> H = r.eigenvalues[0]   # the largest |eigenvalue|; r.residuals bound the error
        >>> bool(abs(H) >= abs(r.eigenvalues[1]))
        True
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"method must be one of {EIGEN_METHODS}, not {method!r}.")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, not {which!r}.")
    if method == "auto":
        method = AUTO_METHOD
    if method == "power" and which != "LM":
        raise ValueError("Power iteration finds the largest-magnitude eigenvalues only: use which='LM' or method='lanczos'.")
    _, seed = make_rng(seed)
    H = ModelHessian(model, x, y, loss, groups, by, num_batches, mode, jit_compile, verbose, caller="top_eigenvalues")
    H.expect(k * max_iter if method == "power" else min(H.n, k * max_iter))  # the HVP budget
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


def hessian_trace(
    model: keras.Model, x, y=None, num_probes: int = 10, rel_stderr: float | None = 1e-3, max_probes: int | None = 100,
    method: str = "hutchinson", probe: str = "rademacher", loss=None, groups=None, by="layer", seed: int | None = None,
    num_batches: int | None = None, mode: str = DEFAULT_MODE, jit_compile: bool = False, verbose: int = 0,
    max_iter: int | None = None, tol: float | None = None, min_probes: int | None = None,
) -> TraceEstimate:
    """tr(H) of the whole model (or a block) by Hutchinson or Hutch++, to a target relative standard error.

    The defaults are PyHessian's (at most 100 probes, stop at a relative standard error of
    1e-3), in the vocabulary of :func:`keras_hesstrace.layer_traces`.

    Args:
        model, x, y, loss, groups, by, seed, num_batches, mode, jit_compile, verbose: as in
            :func:`top_eigenvalues`.
        num_probes: with ``rel_stderr``, the pilot (at least 2); without, exactly this many
            HVPs. Defaults to 10.
        rel_stderr: the target r in (0, 1): after the pilot, probes are drawn in rounds (the
            rule of ``layer_traces(rel_stderr=...)``, docs/method.md §3) until the standard
            error is at most r·|trace| (``result.converged``) or ``max_probes`` HVPs. None:
            exactly ``num_probes``. Defaults to 1e-3.
        max_probes: with ``rel_stderr``, the most HVPs in all (with "hutch++" the sketch's
            count too). Defaults to 100 (None: 1000).
        method: "hutchinson" (one HVP per probe) or "hutch++" (a third of the budget on a
            random sketch, a third on its exact trace, the rest on Hutchinson for the deflated
            remainder: much lower variance when H has a few dominant eigenvalues).
        probe: "rademacher" or "gaussian". Probe m is the one :func:`keras_hesstrace.layer_traces`
            draws for the same ``seed`` (restricted to the block), so with method="hutchinson"
            on the whole model ``samples`` equals its ``total_samples``.
        max_iter, tol, min_probes: PyHessian's names, deprecated: ``max_probes`` (or
            ``num_probes`` with ``tol=0``), ``rel_stderr`` (0: None) and ``num_probes``.

    Returns:
        :class:`TraceEstimate`.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, not {method!r}.")
    num_probes, rel_stderr, max_probes = _trace_budget(num_probes, rel_stderr, max_probes, max_iter, tol, min_probes)
    _, seed = make_rng(seed)
    H = ModelHessian(model, x, y, loss, groups, by, num_batches, mode, jit_compile, verbose, caller="hessian_trace")
    budget = num_probes if rel_stderr is None else max_probes
    H.expect(budget)
    tol_value = 0.0 if rel_stderr is None else rel_stderr
    try:
        if method == "hutchinson":
            out = hutchinson_trace(H, H.n, budget, tol_value, num_probes, draw=H.probe_source(seed, probe))
        else:
            out = hutchpp_trace(H, H.n, budget, tol_value, num_probes, draw=H.probe_source(seed, probe),
                                sketch_draw=H.probe_source(seed, "rademacher"))
    finally:
        H.close()
    return TraceEstimate(
        trace=out["trace"], stderr=out["stderr"], samples=out["samples"], num_hvps=H.num_hvps,
        converged=out["converged"], method=method, groups=H.group_names, dimension=H.n, loss=H.loss, seed=seed,
        mode=H.op.mode,
    )


def _trace_budget(num_probes, rel_stderr, max_probes, max_iter, tol, min_probes):
    """(num_probes, rel_stderr or None, max_probes or None) of hessian_trace, PyHessian's names mapped."""
    if max_iter is not None or tol is not None or min_probes is not None:
        warnings.warn("hessian_trace(max_iter=, tol=, min_probes=) are now max_probes= (num_probes= with tol=0), "
                      "rel_stderr= (None for tol=0) and num_probes=.", DeprecationWarning, stacklevel=3)
        if tol is not None:
            rel_stderr = None if tol == 0 else tol
        if min_probes is not None:
            num_probes = min_probes
        if max_iter is not None:
            max_iter = check_integer("max_iter", max_iter)
            if rel_stderr is None:
                num_probes = max_iter
            else:
                max_probes, num_probes = max_iter, max(2, min(num_probes, max_iter))
    num_probes = check_integer("num_probes", num_probes)
    rel_stderr, max_probes = check_target(rel_stderr, None if rel_stderr is None else max_probes, num_probes)
    return num_probes, rel_stderr, max_probes


def spectral_density(
    model: keras.Model, x, y=None, num_runs: int = 1, lanczos_steps: int = 90, sigma: float | None = None,
    grid: int = 10000, loss=None, groups=None, by="layer", seed: int | None = None, num_batches: int | None = None,
    mode: str = DEFAULT_MODE, jit_compile: bool = False, verbose: int = 0,
) -> SpectralDensity:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature (SLQ).

    Run r starts Lanczos (full reorthogonalisation) from Rademacher probe r of the package's
    generator (the probe ``layer_traces`` draws for the same seed) and takes
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
    _, seed = make_rng(seed)
    H = ModelHessian(model, x, y, loss, groups, by, num_batches, mode, jit_compile, verbose, caller="spectral_density")
    start = H.probe_source(seed, "rademacher")
    notes = []
    if lanczos_steps > H.n:
        notes.append(f"lanczos_steps={lanczos_steps} is more than the dimension {H.n}; clipped to {H.n} (exact quadrature).")
        warnings.warn(notes[-1], UserWarning, stacklevel=2)
        lanczos_steps = H.n
    H.expect(num_runs * lanczos_steps)
    nodes, weights = [], []
    try:
        for run in range(num_runs):
            theta, w, _ = lanczos_quadrature(H, start(run), lanczos_steps, H.basis_dtype)
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


def diagonal(
    model: keras.Model, x, y=None, num_probes: int = 100, groups=None, by="layer", probe: str = "rademacher",
    loss=None, seed: int | None = None, num_batches: int | None = None, mode: str = DEFAULT_MODE,
    jit_compile: bool = False, verbose: int = 0, rel_stderr: float | None = None, max_probes: int | None = None,
) -> DiagonalResult:
    """Hutchinson estimate of the Hessian diagonal, E[v ⊙ H v], per group.

    Args:
        num_probes: HVPs (probes); the standard error falls as 1 / sqrt(num_probes). Probe m
            is the one :func:`keras_hesstrace.layer_traces` draws for the same ``seed``. With
            ``rel_stderr``, the pilot (at least 2). Defaults to 100.
        groups: None for every group of ``layer_groups(model, by)``, or a name / list of
            names. Restricting is not only cheaper to read: the probe is then zero outside
            the block, which removes the other blocks' off-diagonal terms from the variance
            (diag(H_SS) = diag(H) on S, so the target is the same).
        rel_stderr: a target r in (0, 1): probes are added in rounds until every reported
            group's diagonal has ‖stderr‖ <= r·‖diagonal‖ (2-norms over the group's entries:
            ``result.rel_stderr``, ``result.target_met``), or ``max_probes``. Defaults to
            None (exactly ``num_probes``).
        max_probes: with ``rel_stderr``, the most probes. Defaults to 1000.
        Other arguments: as in :func:`top_eigenvalues`.

    Returns:
        :class:`DiagonalResult`.
    """
    num_probes = check_integer("num_probes", num_probes)
    rel_stderr, max_probes = check_target(rel_stderr, max_probes, num_probes)
    _, seed = make_rng(seed)
    H = ModelHessian(model, x, y, loss, groups, by, num_batches, mode, jit_compile, verbose, caller="diagonal")
    mapping = layer_groups(model, by=by)
    names, indices = group_indices(model, mapping)
    position = {idx: p for p, idx in enumerate(H.indices)}
    reported = [(name, idx) for name, idx in zip(names, indices) if all(i in position for i in idx)]
    blocks = [[(H.offsets[position[i]], H.offsets[position[i] + 1]) for i in idx] for _, idx in reported]
    H.expect(num_probes if rel_stderr is None else max_probes)
    try:
        mean, err, used = hutchinson_diagonal(H, H.n, num_probes, draw=H.probe_source(seed, probe), rel_stderr=rel_stderr,
                                              max_probes=max_probes, blocks=blocks)
    finally:
        H.close()
    values, stderr, paths = OrderedDict(), OrderedDict(), OrderedDict()
    for (name, idx), block in zip(reported, blocks):
        values[name] = [mean[a:b].reshape(H.variables[position[i]].shape) for i, (a, b) in zip(idx, block)]
        stderr[name] = [err[a:b].reshape(H.variables[position[i]].shape) for i, (a, b) in zip(idx, block)]
        paths[name] = variable_paths([model.trainable_variables[i] for i in idx])
    result = DiagonalResult(
        groups=tuple(values), values=values, stderr=stderr, variables=paths, num_probes=int(used), loss=H.loss, seed=seed,
        mode=H.op.mode, rel_stderr_target=rel_stderr,
    )
    if rel_stderr is not None and not all(result.target_met):
        missed = [g for g, ok in zip(result.groups, result.target_met) if not ok]
        warnings.warn(f"diagonal: rel_stderr={rel_stderr:g} not met after max_probes={max_probes} probes by: "
                      f"{', '.join(missed)}.", RuntimeWarning, stacklevel=2)
    return result


__all__ = [
    "AUTO_METHOD",
    "EIGEN_METHODS",
    "PROBES",
    "TRACE_METHODS",
    "WHICH",
    "DiagonalResult",
    "EigenResult",
    "ModelHessian",
    "SpectralDensity",
    "TraceEstimate",
    "block_indices",
    "diagonal",
    "hessian_trace",
    "spectral_density",
    "top_eigenvalues",
]
