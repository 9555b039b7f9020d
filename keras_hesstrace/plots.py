"""PNG plots of the toolset's results (matplotlib, no display needed).

Each function writes one PNG and returns its path. They take the result objects of
``keras_hesstrace.spectrum``, ``keras_hesstrace.landscape`` and ``layer_traces``.
Figures are ``matplotlib.figure.Figure`` objects drawn straight to the file, not
through pyplot: the process's matplotlib backend and pyplot's figure list are left
as they are.
"""

import numpy as np


def new_figure(**kwargs):
    """A ``matplotlib.figure.Figure`` not registered with pyplot (``figsize``, ``dpi``, ...)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_figure(fig, path, dpi="figure"):
    """Lay out ``fig``, write it to ``path`` (PNG) and return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def plot_density(result, path, title=None):
    """The SLQ density on a log scale, with the Ritz values as ticks.

    Args:
        result: a :class:`keras_hesstrace.spectrum.SpectralDensity`.
        path: the PNG file to write.
    """
    fig = new_figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    # Six decades below the peak: deeper troughs between isolated Ritz values are noise.
    floor = max(float(result.density.max()) * 1e-6, 1e-300)
    ax.semilogy(result.grid, np.maximum(result.density, floor), lw=1.2, color="C0")
    for nodes in result.nodes:
        ax.plot(nodes, np.full(len(nodes), floor), "|", color="C3", ms=10, alpha=0.6)
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue λ of the Hessian")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title or f"Eigenvalue density (SLQ, {result.num_runs} run(s) x {result.lanczos_steps} steps, σ={result.sigma:.2g})")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_landscape(result, path, title=None):
    """A 1-D loss curve, or for 2-D a filled contour map and a 3-D surface side by side.

    Args:
        result: a :class:`keras_hesstrace.landscape.LandscapeResult`.
        path: the PNG file to write.
    """
    label = {"top": "top eigenvector", "random": "filter-normalised random direction", "given": "direction"}[result.kind]
    if result.ndim == 1:
        fig = new_figure(figsize=(6, 4), dpi=110)
        ax = fig.subplots()
        ax.plot(result.coordinates[0], result.losses, "o-", ms=3)
        ax.axvline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"α along the {label}")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    else:
        fig = new_figure(figsize=(11, 4.5), dpi=110)
        a, b = np.meshgrid(result.coordinates[0], result.coordinates[1], indexing="ij")
        ax = fig.add_subplot(1, 2, 1)
        cs = ax.contourf(a, b, result.losses, levels=20, cmap="viridis")
        ax.contour(a, b, result.losses, levels=20, colors="k", linewidths=0.3)
        fig.colorbar(cs, ax=ax, label="loss")
        ax.plot([0], [0], "r+", ms=12)
        ax.set_xlabel(f"α (1st {label})")
        ax.set_ylabel(f"β (2nd {label})")
        ax3 = fig.add_subplot(1, 2, 2, projection="3d")
        ax3.plot_surface(a, b, result.losses, cmap="viridis", linewidth=0, antialiased=True)
        ax3.set_xlabel("α")
        ax3.set_ylabel("β")
        ax3.set_zlabel("loss")
    extra = ""
    if result.eigenvalues is not None:
        extra = " (λ = " + ", ".join(f"{v:.3g}" for v in result.eigenvalues) + ")"
    fig.suptitle(title or f"Loss landscape around the weights{extra}")
    return save_figure(fig, path)


def plot_traces(frame, path, title=None, num_se=2.0):
    """Per-group trace estimates as bars with ±num_se standard-error bars.

    Args:
        frame: a DataFrame indexed by group with columns ``trace`` and ``stderr``
            (``GroupTraces.to_frame()``).
        path: the PNG file to write.
        num_se: error bar half-width in standard errors.
    """
    names = [str(n) for n in frame.index]
    height = max(3.0, 0.35 * len(names) + 1.5)
    fig = new_figure(figsize=(7.5, height), dpi=110)
    ax = fig.subplots()
    y = np.arange(len(names))
    err = np.nan_to_num(frame["stderr"].to_numpy(dtype=float) * num_se)
    ax.barh(y, frame["trace"].to_numpy(dtype=float), xerr=err, color="C0", ecolor="k", capsize=3)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel(f"tr(H_ll), Hutchinson estimate ± {num_se:g} SE")
    ax.set_title(title or "Per-layer Hessian trace")
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)
