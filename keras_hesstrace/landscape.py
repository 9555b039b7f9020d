"""The loss on a 1-D or 2-D grid around the current weights (PyHessian §III; Li et al. 2018).

L(θ + α d_1 + β d_2) for α, β on a grid, along the Hessian's top eigenvectors (unit norm)
or along filter-normalised random directions (Li, Xu, Taylor, Studer, Goldstein,
"Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018: each filter / output unit
of the random direction is rescaled to the norm of the same filter of the weights, so a
step of 1 is a step of the weights' own size; biases and normalisation parameters are not
perturbed by default, as in that paper).

The model's weights are changed in place while the grid is evaluated and restored
bit-identically afterwards, also when an error or KeyboardInterrupt interrupts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import keras

from keras_hesstrace._progress import progress_bar
from keras_hesstrace._validate import check_integer
from keras_hesstrace.hvp import DEFAULT_MODE, hessian_operator
from keras_hesstrace.linalg.common import make_rng
from keras_hesstrace.spectrum import block_indices, top_eigenvalues
from keras_hesstrace.batches import check_reiterable, resolve_data, to_tensors, weighted_mean

DIRECTIONS = ("top1", "top2", "random1", "random2", "random")


@dataclass(frozen=True)
class LandscapeResult:
    """The loss on a grid.

    Attributes:
        coordinates: tuple of 1 or 2 float64 arrays (α values, and β values for 2-D).
        losses: float64 [len(α)] or [len(α), len(β)]; losses[i, j] = L(θ + α_i d_1 + β_j d_2).
        origin_loss: L(θ) at the unperturbed weights.
        directions: list of 1 or 2 directions, each a list of float64 arrays shaped like
            ``model.trainable_variables`` (zero outside the block).
        kind: "top" (Hessian eigenvectors) , "random" (filter-normalised) or "given".
        eigenvalues: the eigenvalues of the "top" directions (else None).
        groups: the block's group names.
    """

    coordinates: tuple
    losses: np.ndarray
    origin_loss: float
    directions: list = field(repr=False)
    kind: str
    eigenvalues: np.ndarray = None
    groups: tuple = ()

    @property
    def ndim(self):
        return len(self.coordinates)

    def to_frame(self):
        """A long pandas table: alpha[, beta], loss."""
        import pandas as pd

        if self.ndim == 1:
            return pd.DataFrame({"alpha": self.coordinates[0], "loss": self.losses})
        a, b = np.meshgrid(self.coordinates[0], self.coordinates[1], indexing="ij")
        return pd.DataFrame({"alpha": a.ravel(), "beta": b.ravel(), "loss": self.losses.ravel()})

    def __str__(self):
        lo, hi = float(np.nanmin(self.losses)), float(np.nanmax(self.losses))
        shape = "x".join(str(len(c)) for c in self.coordinates) + ("-point" if self.ndim == 1 else "")
        extra = f", eigenvalues {np.array2string(self.eigenvalues, precision=4)}" if self.eigenvalues is not None else ""
        return (
            f"loss landscape ({self.kind} directions{extra}) on a {shape} grid over "
            f"[{self.coordinates[0][0]:.3g}, {self.coordinates[0][-1]:.3g}]: loss at origin {self.origin_loss:.6g}, "
            f"min {lo:.6g}, max {hi:.6g}"
        )


def filter_normalized_direction(variables, seed=None, ignore_1d=True):
    """A Gaussian direction rescaled filter by filter to the weights' norms (Li et al. 2018).

    Args:
        variables: the variables (or arrays) to perturb.
        seed: int seed (None: fresh).
        ignore_1d: give 1-D variables (biases, normalisation scales and offsets) a zero
            direction, as Li et al. do; False rescales each to the variable's norm.

    Returns:
        list of float64 arrays shaped like ``variables``. For a variable of rank >= 2 the
        last axis indexes filters / output units (Keras Dense and Conv kernels), and each
        slice d[..., f] gets the norm of w[..., f] (zero where the weights' filter is zero).
    """
    rng, _ = make_rng(seed)
    out = []
    for var in variables:
        w = np.asarray(var, dtype=np.float64)
        d = rng.standard_normal(w.shape)
        if w.ndim <= 1:
            if ignore_1d:
                d = np.zeros_like(w)
            else:
                nd = np.linalg.norm(d)
                d = d * (np.linalg.norm(w) / nd if nd > 0 else 0.0)
        else:
            axes = tuple(range(w.ndim - 1))
            wn = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
            dn = np.sqrt(np.sum(d * d, axis=axes, keepdims=True))
            d = d * np.where(dn > 0, wn / np.where(dn > 0, dn, 1.0), 0.0)
        out.append(d)
    return out


def _grid(grid, span):
    if np.ndim(grid) == 0:
        num = check_integer("grid (points per axis)", grid)
        coords = np.linspace(-float(span), float(span), num) if num > 1 else np.zeros(1)
        coords[np.abs(coords) < 1e-12 * max(float(span), 1e-300)] = 0.0  # the origin exactly
        return coords
    coords = np.asarray(grid, dtype=np.float64).ravel()
    if coords.size == 0:
        raise ValueError("grid is empty.")
    return coords


class _LossEvaluator:
    """The loss (same objective as the Hessian's) on one batch or a dataset, compiled once."""

    def __init__(self, model, x, y, loss, num_batches, mode=DEFAULT_MODE):
        x, y, self.dataset = resolve_data(x, y, "loss_landscape")
        self.op = hessian_operator(model, loss, None, mode)
        self.num_batches = num_batches
        if self.dataset:
            check_reiterable(x, "loss_landscape")
            self.data = x
        else:
            self.data = to_tensors(x, y)

    def _one(self, xb, yb):
        return float(self.op.loss_value(xb, yb))

    def __call__(self):
        if not self.dataset:
            return self._one(*self.data)
        return weighted_mean(self._one, self.data, self.num_batches)


def loss_landscape(
    model: keras.Model, x, y=None, directions: str = "top2", grid: int = 21, span: float = 1.0, loss=None,
    groups=None, by="layer", seed: int | None = None, num_batches: int | None = None, ignore_1d: bool = True,
    eigen_kwargs: dict | None = None, verbose: int | str = "auto", mode: str = DEFAULT_MODE,
) -> LandscapeResult:
    """The loss on a 1-D or 2-D grid along two directions through the current weights.

    Args:
        model: a built ``keras.Model`` (run with ``training=False``); its weights are
            restored bit-identically afterwards, also on error.
        x, y: one batch (``x, y``, or the tuple ``(x, y)`` as x), or x a ``tf.data.Dataset``
            / list of (x, y) batches (the loss is then the example-weighted mean over the
            batches); :func:`keras_hesstrace.batches.resolve_data` gives the rules.
        directions: "top2" / "top1": the Hessian's top eigenvectors (largest magnitude,
            unit norm, from :func:`keras_hesstrace.spectrum.top_eigenvalues`) for a 2-D / 1-D
            grid; "random2" (or "random") / "random1": filter-normalised Gaussian
            directions; or a list of 1 or 2 directions, each a list of arrays shaped like
            ``model.trainable_variables``.
        grid: points per axis (coordinates ``linspace(-span, span, grid)``, the origin
            included exactly when grid is odd) or an explicit 1-D array of coordinates.
        span: the half-width of the grid, in units of the directions (eigenvectors have
            norm 1 over the block; a filter-normalised direction has the weights' scale).
        loss: None for the compiled loss, or a Loss, a name or a callable.
        groups, by: perturb only this block (see :func:`keras_hesstrace.spectrum.top_eigenvalues`).
        seed: seed for the eigenvector start or the random directions.
        num_batches: batches used in the dataset mode.
        ignore_1d: random directions leave 1-D variables (biases, BN) unperturbed.
        eigen_kwargs: extra arguments for ``top_eigenvalues`` (max_iter, tol, method).
        verbose: 0, 1, or "auto" (a progress bar when more than 50 loss evaluations).
        mode: the HVP mode of the eigenvector search (see
            :func:`keras_hesstrace.hessian_operator`); ``eigen_kwargs["mode"]`` wins.

    Returns:
        :class:`LandscapeResult`.

    Example:
        >>> r = loss_landscape(model, x, y, directions="top2", grid=5, span=0.5, seed=0, verbose=0)
        >>> r.losses.shape
        (5, 5)
        >>> bool(np.isclose(r.losses[2, 2], r.origin_loss))   # the centre is the current weights
        True
    """
    x, y, _ = resolve_data(x, y, "loss_landscape")
    _, seed = make_rng(seed)
    _, indices = block_indices(model, groups, by)
    names = block_indices(model, groups, by)[0]
    variables = list(model.trainable_variables)
    block = set(indices)
    eigenvalues = None
    if isinstance(directions, str):
        if directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {DIRECTIONS} or a list of directions, not {directions!r}.")
        ndim = 1 if directions.endswith("1") else 2
        if directions.startswith("top"):
            kind = "top"
            kw = {"max_iter": 100, "tol": 1e-3, "mode": mode}
            kw.update(eigen_kwargs or {})
            eig = top_eigenvalues(model, x, y, k=ndim, loss=loss, groups=groups, by=by, seed=seed, num_batches=num_batches, **kw)
            eigenvalues = eig.eigenvalues
            dirs = [[np.asarray(t, dtype=np.float64) for t in vec] for vec in eig.eigenvectors]
        else:
            kind = "random"
            dirs = []
            for r in range(ndim):
                d = filter_normalized_direction(variables, seed + r, ignore_1d)
                dirs.append([di if i in block else np.zeros_like(di) for i, di in enumerate(d)])
    else:
        kind = "given"
        dirs = list(directions)
        if len(dirs) not in (1, 2):
            raise ValueError(f"Give 1 or 2 directions, got {len(dirs)}.")
        checked = []
        for j, d in enumerate(dirs):
            if len(d) != len(variables):
                raise ValueError(f"direction {j} has {len(d)} arrays; the model has {len(variables)} trainable variables.")
            arrays = []
            for i, (a, v) in enumerate(zip(d, variables)):
                a = np.asarray(a, dtype=np.float64)
                if a.shape != tuple(v.shape):
                    raise ValueError(f"direction {j}[{i}] has shape {a.shape}, variable {v.path} has {tuple(v.shape)}.")
                arrays.append(a if i in block else np.zeros_like(a))
            checked.append(arrays)
        dirs = checked
    ndim = len(dirs)
    axis = _grid(grid, span)
    coords = (axis,) if ndim == 1 else (axis, axis.copy())
    shape = tuple(len(c) for c in coords)
    evaluate = _LossEvaluator(model, x, y, loss, num_batches, mode)
    touched = [i for i in sorted(block) if any(np.any(d[i]) for d in dirs)]
    originals = {i: variables[i].numpy().copy() for i in touched}
    base = {i: originals[i].astype(np.float64) for i in touched}
    losses = np.full(shape, np.nan)
    total = int(np.prod(shape))
    batches = 1 if not evaluate.dataset else (num_batches or 1)
    show = verbose == 1 or (verbose == "auto" and total * batches > 50)
    bar = progress_bar(total, "point") if show else None
    try:
        origin_loss = evaluate()
        done = 0
        for index in np.ndindex(*shape):
            steps = [coords[a][index[a]] for a in range(ndim)]
            for i in touched:
                value = base[i] + sum(s * d[i] for s, d in zip(steps, dirs))
                variables[i].assign(value.astype(originals[i].dtype))
            losses[index] = evaluate()
            done += 1
            if bar is not None:
                bar.update(done)
    finally:
        for i in touched:
            variables[i].assign(originals[i])
    return LandscapeResult(
        coordinates=coords, losses=losses, origin_loss=origin_loss, directions=dirs, kind=kind,
        eigenvalues=eigenvalues, groups=names,
    )
