"""PNG plots of the toolset's results (matplotlib, no display needed).

Each ``plot_*`` function writes one PNG and returns its path; the matching ``*_figure``
function returns the ``matplotlib.figure.Figure`` instead (for tests, or to draw more on
it). They take the result objects of ``keras_hesstrace.spectrum``,
``keras_hesstrace.landscape`` and ``layer_traces``. Figures are
``matplotlib.figure.Figure`` objects drawn straight to the file, not through pyplot: the
process's matplotlib backend and pyplot's figure list are left as they are.

Every figure can carry a ``caption``: one small line (wrapped) at the bottom naming what
made it (model, data, loss, probes, seed, mode, batch; :func:`caption_from_meta` builds
it from the CLI's run description). Titles state what the data show, scales are
logarithmic where the values span decades, and every mark has a legend entry.
"""

import os
import textwrap

import numpy as np

CAPTION_FONTSIZE = 7


def new_figure(**kwargs):
    """A ``matplotlib.figure.Figure`` not registered with pyplot (``figsize``, ``dpi``, ...)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def add_caption(fig, text):
    """Write ``text`` small at the bottom of ``fig`` (wrapped to its width); returns the Text."""
    if not text:
        return None
    width_in = fig.get_figwidth()
    chars = max(40, int(width_in * 72 / (0.6 * CAPTION_FONTSIZE)))
    wrapped = "\n".join(textwrap.fill(part, chars) for part in str(text).split("\n"))
    artist = fig.text(0.01, 0.006, wrapped, fontsize=CAPTION_FONTSIZE, ha="left", va="bottom", color="0.25")
    artist.set_gid("caption")
    return artist


def caption_of(fig):
    """The caption text of ``fig`` ("" without one)."""
    for t in fig.texts:
        if t.get_gid() == "caption":
            return t.get_text()
    return ""


def save_figure(fig, path, dpi="figure"):
    """Lay out ``fig`` (leaving room for its caption), write it to ``path`` (PNG), return ``path``."""
    import warnings

    caption = caption_of(fig)
    bottom = 0.0
    if caption:
        lines = caption.count("\n") + 1
        bottom = min(0.3, (lines * CAPTION_FONTSIZE * 1.35 + 6) / 72 / fig.get_figheight())
    with warnings.catch_warnings():
        # 3-D axes are not tight_layout-compatible; the 2-D ones still get laid out.
        warnings.filterwarnings("ignore", message=".*[Tt]ight.*")
        fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=dpi)
    return path


def caption_from_meta(meta, **settings):
    """A caption from the CLI's run description (``cli_commands.prepare``'s ``meta``).

    Names the model file, the data (examples and batch size), the loss, the grouping and
    block, the seed and HVP mode, then the ``settings`` given (``probes=10``, ...), in order.
    """
    meta = dict(meta or {})
    parts = []
    if meta.get("model"):
        parts.append(f"model {os.path.basename(str(meta['model']))}")
    if meta.get("data"):
        data = f"data {meta['data']}"
        if meta.get("num_examples") is not None:
            data += f" ({meta['num_examples']} examples, batch {meta.get('batch_size', meta['num_examples'])})"
        parts.append(data)
    if meta.get("loss"):
        parts.append(f"loss {meta['loss']}")
    for key, value in settings.items():
        if value is not None:
            parts.append(f"{key.replace('_', ' ')} {value}")
    if meta.get("by"):
        parts.append(f"groups by {meta['by']}")
    if meta.get("block"):
        parts.append("block " + ", ".join(map(str, meta["block"])))
    if meta.get("seed") is not None:
        parts.append(f"seed {meta['seed']}")
    if meta.get("mode"):
        parts.append(f"HVP mode {meta['mode']}")
    return " · ".join(parts)


def spans_decades(values, decades=1.5):
    """True when every value is finite and > 0 and max/min exceeds 10**decades."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2 or np.any(v <= 0):
        return False
    return bool(np.log10(v.max() / v.min()) > decades)


def nice_log_ticks(lo, hi, max_ticks=8):
    """Readable ticks (1-2-5 per decade, thinned to ``max_ticks``) between ``lo`` and ``hi`` > 0."""
    lo, hi = float(lo), float(hi)
    ticks = []
    for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1):
        for m in (1, 2, 5):
            t = m * 10.0 ** e
            if lo <= t <= hi:
                ticks.append(t)
    if len(ticks) > max_ticks:
        ticks = [t for t in ticks if np.isclose(t / 10 ** np.floor(np.log10(t)), 1.0)] or ticks[:: len(ticks) // max_ticks + 1]
    if len(ticks) < 3:
        ticks = sorted(set(ticks) | {lo, hi})
    return ticks


def _fmt(v):
    return f"{v:.3g}"


# ------------------------------------------------------------------ per-group traces


def traces_figure(frame, title=None, num_se=2.0, caption=None, total=None, total_stderr=None, by="group"):
    """Per-group trace estimates as points with ±num_se standard-error bars.

    Args:
        frame: a DataFrame indexed by group with columns ``trace`` and ``stderr``
            (``GroupTraces.to_frame()``); a ``"total"`` row, if any, is drawn apart.
        num_se: error bar half-width in standard errors.
        caption: the run's settings, written small at the bottom.
        total, total_stderr: the whole-model trace (named in the title when given).
        by: what a row is ("layer", "variable"; the title and axis say it).

    The x axis is logarithmic when every estimate is positive and they span decades.
    """
    if "total" in [str(n) for n in frame.index]:
        row = frame.loc["total"]
        total = float(row["trace"]) if total is None else total
        total_stderr = float(row["stderr"]) if total_stderr is None else total_stderr
        frame = frame.drop(index="total")
    names = [str(n) for n in frame.index]
    height = max(3.2, 0.35 * len(names) + 2.0)
    fig = new_figure(figsize=(7.5, height), dpi=110)
    ax = fig.subplots()
    y = np.arange(len(names))
    trace = frame["trace"].to_numpy(dtype=float)
    err = np.nan_to_num(frame["stderr"].to_numpy(dtype=float) * num_se)
    log = spans_decades(trace)
    if log:
        lower = np.minimum(err, trace * (1 - 1e-3))  # a log axis cannot show the bar below 0
        xerr = np.vstack([lower, err])
    else:
        xerr = err
    ax.errorbar(trace, y, xerr=xerr, fmt="o", color="C0", ecolor="k", capsize=3, ms=6,
                label=f"Hutchinson estimate ± {num_se:g} SE")
    if not log:
        ax.axvline(0.0, color="grey", lw=0.8)
    else:
        ax.set_xscale("log")
    ax.set_yticks(y, names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel(f"tr(H_ll) per {by}" + (" (log scale)" if log else ""))
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3, which="both" if log else "major")
    if title is None:
        title = f"Per-{by} Hessian trace"
        if len(trace) and np.isfinite(trace).any():
            k = int(np.nanargmax(trace))
            title += f": largest {names[k]!r} ({_fmt(trace[k])})"
    if total is not None and np.isfinite(total):
        title += f"\ntotal tr(H) = {_fmt(total)}" + (f" ± {total_stderr:.2g} (1 SE)" if total_stderr is not None and np.isfinite(total_stderr) else "")
    ax.set_title(title, fontsize=10)
    add_caption(fig, caption)
    return fig


def plot_traces(frame, path, title=None, num_se=2.0, caption=None, total=None, total_stderr=None, by="group"):
    """:func:`traces_figure` written to ``path`` (PNG); returns ``path``."""
    return save_figure(traces_figure(frame, title, num_se, caption, total, total_stderr, by), path)


# ------------------------------------------------------------------ top eigenvalues


def eigen_figure(result, title=None, caption=None):
    """The top-k eigenvalues as a stem plot, the residual ||Hu - λu|| as error bars.

    An eigenvalue of H lies within its residual of each Ritz value; converged and
    unconverged pairs are told apart in the legend. Log y axis when all are positive and
    span decades.

    Args:
        result: a :class:`keras_hesstrace.spectrum_results.EigenResult`.
    """
    lam = np.asarray(result.eigenvalues, dtype=float)
    res = np.asarray(result.residuals, dtype=float)
    conv = np.asarray(result.converged, dtype=bool)
    k = np.arange(1, len(lam) + 1)
    fig = new_figure(figsize=(6.5, 4.2), dpi=110)
    ax = fig.subplots()
    log = spans_decades(lam)
    ax.vlines(k, 0 if not log else np.nanmin(lam) / 3, lam, color="0.6", lw=1.2)
    for mask, colour, marker, label in ((conv, "C0", "o", "converged"), (~conv, "C3", "s", "not converged")):
        if mask.any():
            err = res[mask]
            yerr = np.vstack([np.minimum(err, lam[mask] * (1 - 1e-3)), err]) if log else err
            ax.errorbar(k[mask], lam[mask], yerr=yerr, fmt=marker, color=colour, ecolor="k", capsize=4, ms=7,
                        label=f"λ_i, {label} (bar: residual ||Hu − λu||)")
    if log:
        ax.set_yscale("log")
    else:
        ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(k)
    ax.set_xlabel("i (eigenvalue rank)")
    ax.set_ylabel("eigenvalue λ_i" + (" (log scale)" if log else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title is None:
        which = {"LM": "largest |λ|", "LA": "largest λ"}.get(getattr(result, "which", ""), "")
        done = "all converged" if conv.all() else f"{int((~conv).sum())} of {len(lam)} not converged"
        title = (f"Top-{len(lam)} Hessian eigenvalues ({which}, {result.method}): λ₁ = {_fmt(lam[0]) if len(lam) else 'n/a'}"
                 f"\n{done}, {result.num_hvps} HVPs, dimension {result.dimension:,}")
    ax.set_title(title, fontsize=10)
    add_caption(fig, caption)
    return fig


def plot_eigenvalues(result, path, title=None, caption=None):
    """:func:`eigen_figure` written to ``path`` (PNG); returns ``path``."""
    return save_figure(eigen_figure(result, title, caption), path)


# ------------------------------------------------------------------ spectral density


def density_figure(result, title=None, caption=None):
    """The SLQ density on a log scale, with the Ritz values as ticks (in the legend).

    Args:
        result: a :class:`keras_hesstrace.spectrum.SpectralDensity`.
    """
    fig = new_figure(figsize=(7, 4.4), dpi=110)
    ax = fig.subplots()
    # Six decades below the peak: deeper troughs between isolated Ritz values are noise.
    floor = max(float(result.density.max()) * 1e-6, 1e-300)
    ax.semilogy(result.grid, np.maximum(result.density, floor), lw=1.2, color="C0",
                label=f"density (Gaussian kernel σ = {result.sigma:.2g})")
    for i, nodes in enumerate(result.nodes):
        ax.plot(nodes, np.full(len(nodes), floor), "|", color="C3", ms=10, alpha=0.6,
                label=f"Ritz values (Lanczos nodes, {result.num_runs} run(s))" if i == 0 else None)
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue λ of the Hessian")
    ax.set_ylabel("density (log scale)")
    ax.legend(fontsize=8, loc="upper right")
    if title is None:
        allnodes = np.concatenate([np.asarray(n, dtype=float) for n in result.nodes]) if len(result.nodes) else np.array([])
        title = f"Hessian eigenvalue density (SLQ, {result.num_runs} run(s) x {result.lanczos_steps} steps)"
        if allnodes.size:
            title += (f"\nRitz values from {_fmt(allnodes.min())} to {_fmt(allnodes.max())} "
                      f"({int(np.sum(allnodes < 0))} of {allnodes.size} below 0)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    add_caption(fig, caption)
    return fig


def plot_density(result, path, title=None, caption=None):
    """:func:`density_figure` written to ``path`` (PNG); returns ``path``."""
    return save_figure(density_figure(result, title, caption), path)


# ------------------------------------------------------------------ loss landscape


def landscape_figure(result, title=None, caption=None):
    """A 1-D loss curve, or for 2-D a filled contour map and a 3-D surface side by side.

    The loss is drawn on a log scale (log colour norm, log z) when it spans more than a
    decade over the grid. The trained weights (the origin) are marked and in the legend,
    as is the grid's lowest loss.

    Args:
        result: a :class:`keras_hesstrace.landscape.LandscapeResult`.
    """
    from matplotlib import colors, ticker

    label = {"top": "top eigenvector", "random": "filter-normalised random direction", "given": "direction"}[result.kind]
    losses = np.asarray(result.losses, dtype=float)
    log = spans_decades(losses, decades=1.0)
    finite = losses[np.isfinite(losses)]
    if result.ndim == 1:
        fig = new_figure(figsize=(6.5, 4.4), dpi=110)
        ax = fig.subplots()
        ax.plot(result.coordinates[0], losses, "o-", ms=3, label="loss on the line")
        ax.axvline(0.0, color="grey", lw=0.8, ls=":")
        ax.plot([0.0], [result.origin_loss], "r+", ms=14, mew=2, label=f"trained weights (loss {_fmt(result.origin_loss)})")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(f"α along the {label}")
        ax.set_ylabel("loss" + (" (log scale)" if log else ""))
        ax.grid(alpha=0.3, which="both" if log else "major")
        ax.legend(fontsize=8)
    else:
        fig = new_figure(figsize=(11, 4.9), dpi=110)
        a, b = np.meshgrid(result.coordinates[0], result.coordinates[1], indexing="ij")
        ax = fig.add_subplot(1, 2, 1)
        if log:
            lo, hi = float(finite.min()), float(finite.max())
            levels = np.geomspace(lo, hi, 21)
            norm = colors.LogNorm(vmin=lo, vmax=hi)
            cs = ax.contourf(a, b, losses, levels=levels, norm=norm, cmap="viridis")
            ax.contour(a, b, losses, levels=levels, colors="k", linewidths=0.3)
            cb = fig.colorbar(cs, ax=ax, label="loss (log colour scale)")
            cb.set_ticks(nice_log_ticks(lo, hi))
            cb.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _fmt(v)))
            cb.ax.yaxis.set_minor_locator(ticker.NullLocator())
        else:
            cs = ax.contourf(a, b, losses, levels=20, cmap="viridis")
            ax.contour(a, b, losses, levels=20, colors="k", linewidths=0.3)
            fig.colorbar(cs, ax=ax, label="loss")
        ax.plot([0], [0], "r+", ms=14, mew=2, label=f"trained weights (loss {_fmt(result.origin_loss)})")
        if finite.size:
            i, j = np.unravel_index(np.nanargmin(np.where(np.isfinite(losses), losses, np.inf)), losses.shape)
            ax.plot([a[i, j]], [b[i, j]], "wx", ms=9, mew=2, mec="k", label=f"lowest on the grid ({_fmt(losses[i, j])})")
        ax.legend(fontsize=7, loc="upper right", framealpha=0.85)
        ax.set_xlabel(f"α (1st {label})")
        ax.set_ylabel(f"β (2nd {label})")
        ax3 = fig.add_subplot(1, 2, 2, projection="3d")
        z = np.log10(losses) if log else losses
        ax3.plot_surface(a, b, z, cmap="viridis", linewidth=0, antialiased=True)
        ax3.set_xlabel("α")
        ax3.set_ylabel("β")
        ax3.set_zlabel("log10 loss" if log else "loss")
    if title is None:
        extra = ""
        if result.eigenvalues is not None:
            extra = " (λ = " + ", ".join(f"{v:.3g}" for v in np.atleast_1d(result.eigenvalues)) + ")"
        span = max(float(np.max(np.abs(c))) for c in result.coordinates)
        title = f"Loss landscape around the trained weights along the {label}s{extra}"
        if finite.size:
            title += (f"\nloss {_fmt(result.origin_loss)} at the weights, {_fmt(finite.min())} to {_fmt(finite.max())}"
                      f" within ±{span:g}")
    fig.suptitle(title, fontsize=10)
    add_caption(fig, caption)
    return fig


def plot_landscape(result, path, title=None, caption=None):
    """:func:`landscape_figure` written to ``path`` (PNG); returns ``path``."""
    return save_figure(landscape_figure(result, title, caption), path)
