"""Variance of the Hutchinson estimators, anisotropy, and the probe budget (docs/method.md §3).

For a fixed symmetric H split into blocks H_lj and a Rademacher probe v:

- masked probe (v zero outside block l): Var[v_l^T H_ll v_l] = 2(‖H_ll‖_F² − Σ_i (H_ll)_ii²);
- single-pass probe (v over all parameters, s_l = <v_l, (Hv)_l>): the cross terms
  v_l^T H_lj v_j add their variance, Var[s_l] = 2(‖H_ll‖_F² − Σ_i (H_ll)_ii²) + Σ_{j≠l} ‖H_lj‖_F².
  The method paper states only the first term; the second is exact (tested).

Gaussian probes replace 2(‖B‖_F² − Σ B_ii²) by 2‖B‖_F². With M probes divide by M.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from keras_hesstrace.probes import check_probe


def _symmetric(matrix, name="block"):
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square matrix [n, n], got shape {a.shape}.")
    # v^T A v depends only on the symmetric part.
    return 0.5 * (a + a.T)


def hutchinson_variance(block, probe="rademacher"):
    """Per-probe variance of v^T B v for a probe restricted to the block (masked probe).

    Args:
        block: [n, n] symmetric matrix B = H_ll (a non-symmetric input is replaced by
            its symmetric part, which is all v^T B v sees).
        probe: "rademacher" or "gaussian".

    Returns:
        float: 2(‖B‖_F² − Σ B_ii²) for Rademacher, 2‖B‖_F² for Gaussian probes.
    """
    check_probe(probe)
    b = _symmetric(block)
    fro2 = float(np.sum(b * b))
    if probe == "gaussian":
        return 2.0 * fro2
    return 2.0 * (fro2 - float(np.sum(np.diag(b) ** 2)))


def _block_slices(group_sizes, n):
    sizes = np.asarray(group_sizes, dtype=np.int64)
    if sizes.ndim != 1 or np.any(sizes < 1):
        raise ValueError("group_sizes must be a 1-D sequence of positive block sizes.")
    if int(sizes.sum()) != n:
        raise ValueError(f"group_sizes sum to {int(sizes.sum())} but the matrix has {n} rows.")
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def single_pass_variance(H, group_sizes, probe="rademacher"):
    """Per-probe variance of each group's single-pass sample s_l = <v_l, (Hv)_l>.

    Args:
        H: [n, n] symmetric matrix, rows ordered group by group.
        group_sizes: [G] block sizes, summing to n.
        probe: "rademacher" or "gaussian".

    Returns:
        float64 [G]: Var[s_l] = hutchinson_variance(H_ll) + Σ_{j≠l} ‖H_lj‖_F².
    """
    check_probe(probe)
    h = _symmetric(H, "H")
    slices = _block_slices(group_sizes, h.shape[0])
    out = np.empty(len(slices))
    for l, sl in enumerate(slices):
        rows = h[sl]
        off = float(np.sum(rows * rows)) - float(np.sum(rows[:, sl] ** 2))
        out[l] = hutchinson_variance(h[sl, sl], probe) + off
    return out


def block_traces(H, group_sizes):
    """Exact tr(H_ll) of each diagonal block: float64 [G]."""
    h = np.asarray(H, dtype=np.float64)
    return np.array([np.trace(h[sl, sl]) for sl in _block_slices(group_sizes, h.shape[0])])


def anisotropy(block):
    """κ = ‖B‖_F² / tr(B)² = Σλ² / (Σλ)².

    The relative standard error of the masked-probe trace estimate with M probes is
    at most sqrt(2κ/M). For a PSD block of rank r, κ >= 1/r; for an indefinite block
    κ is unbounded (``inf`` when tr(B) = 0).

    Args:
        block: [n, n] symmetric matrix.

    Returns:
        float.
    """
    b = _symmetric(block)
    tr = float(np.trace(b))
    fro2 = float(np.sum(b * b))
    if tr == 0.0:
        return float("inf") if fro2 > 0 else float("nan")
    return fro2 / tr**2


@dataclass(frozen=True)
class ProbeBudget:
    """Mini-batch variance decomposition Var[t̂_l] = σ_v²/M + σ_B² per group.

    Attributes:
        groups: names [G].
        sigma_v2: float64 [G], per-probe variance given the batch (pooled within batches).
        sigma_b2: float64 [G], variance of the batch trace tr(H_B,ll) across batches
            (clipped at 0).
        critical_probes: float64 [G], M* = σ_v²/σ_B² (``inf`` where σ_B² = 0): beyond
            M*, more probes per batch hardly reduce the total variance.
        batch_means: float64 [B, G], each batch's trace estimate.
        num_probes: M used per batch.
    """

    groups: tuple
    sigma_v2: np.ndarray
    sigma_b2: np.ndarray
    critical_probes: np.ndarray
    batch_means: np.ndarray
    num_probes: int

    def to_frame(self):
        return pd.DataFrame(
            {
                "sigma_v2": self.sigma_v2,
                "sigma_b2": self.sigma_b2,
                "critical_probes": self.critical_probes,
                "mean_trace": self.batch_means.mean(axis=0),
            },
            index=pd.Index(list(self.groups), name="group"),
        )


def variance_components(samples):
    """One-way random-effects ANOVA of probe samples grouped by batch.

    Args:
        samples: float [B, M, G]: sample of probe m on batch b for group g (B >= 2, M >= 2).

    Returns:
        (sigma_v2 [G], sigma_b2 [G]): the within-batch (probe) variance and the
        between-batch variance of the batch traces, sigma_b2 clipped at 0.
    """
    s = np.asarray(samples, dtype=np.float64)
    if s.ndim != 3 or s.shape[0] < 2 or s.shape[1] < 2:
        raise ValueError(f"samples must be [B, M, G] with B >= 2 batches and M >= 2 probes, got {s.shape}.")
    b, m, _ = s.shape
    means = s.mean(axis=1)  # [B, G]
    msw = ((s - means[:, None, :]) ** 2).sum(axis=(0, 1)) / (b * (m - 1))
    msb = m * ((means - means.mean(axis=0)) ** 2).sum(axis=0) / (b - 1)
    return msw, np.maximum(0.0, (msb - msw) / m)


def probe_budget(model, batches, num_probes=10, by="layer", loss=None, seed=0, num_batches=None, verbose=0, groups=None):
    """σ_v², σ_B² and the critical probe count M* = σ_v²/σ_B² per group.

    Runs :func:`~keras_hesstrace.layer_traces` with ``num_probes`` probes on each of
    several batches (independent probes per batch) and splits the variance.

    Args:
        model: a built Keras model.
        batches: a ``tf.data.Dataset`` or iterable of (x, y) batches (at least 2).
        num_probes: probes per batch (at least 2).
        by, loss: as for ``layer_traces`` (a grouping given as ``groups=``, the old
            spelling, is taken as ``by=`` with a DeprecationWarning).
        seed: base seed; batch b uses seed + b.
        num_batches: how many batches to use (default: all).
        verbose: print one line per batch.

    Returns:
        :class:`ProbeBudget`.
    """
    from keras_hesstrace.batches import iterate_batches
    from keras_hesstrace.groups import split_grouping
    from keras_hesstrace.trace import layer_traces

    by, _ = split_grouping(by, groups, stacklevel=3)

    if int(num_probes) < 2:
        raise ValueError("probe_budget needs num_probes >= 2 to estimate the per-probe variance.")
    per_batch, names = [], None
    for b, (xb, yb) in enumerate(iterate_batches(batches, num_batches)):
        r = layer_traces(model, xb, yb, num_probes=num_probes, by=by, seed=seed + b, loss=loss, verbose=0)
        if not r.finite:
            raise ValueError(f"Batch {b} gave a non-finite Hessian trace; cannot split the variance.")
        per_batch.append(r.samples)
        names = r.groups
        if verbose:
            print(f"probe_budget: batch {b + 1}: total trace {r.total:.4g}")
    if len(per_batch) < 2:
        raise ValueError("probe_budget needs at least 2 batches.")
    s = np.stack(per_batch)
    sv, sb = variance_components(s)
    with np.errstate(divide="ignore"):
        mstar = np.where(sb > 0, sv / np.where(sb > 0, sb, 1.0), np.inf)
    return ProbeBudget(tuple(names), sv, sb, mstar, s.mean(axis=1), int(num_probes))
