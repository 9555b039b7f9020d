"""The Gaussian-smoothed spectral density of stochastic Lanczos quadrature nodes and weights."""

import numpy as np


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
