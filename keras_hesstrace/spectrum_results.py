"""What the PyHessian toolset returns: :class:`EigenResult`, :class:`TraceEstimate`,
:class:`SpectralDensity` and :class:`DiagonalResult` (see :mod:`keras_hesstrace.spectrum`)."""

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from keras_hesstrace.linalg import common


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
        return float(m.mean()), common.stderr(m)

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
        rel_stderr_target: the target r of ``diagonal(rel_stderr=r)``, or None.
    """

    groups: tuple
    values: OrderedDict = field(repr=False)
    stderr: OrderedDict = field(repr=False)
    variables: OrderedDict = field(repr=False)
    num_probes: int
    loss: float
    seed: int = 0
    mode: str = "reverse"
    rel_stderr_target: float | None = None

    @property
    def rel_stderr(self) -> np.ndarray:
        """float64 [G]: each group's ‖stderr‖ / ‖diagonal‖ (2-norms over its entries; inf for a zero diagonal)."""
        out = []
        for g in self.groups:
            err = np.sqrt(sum(float(np.sum(np.square(a))) for a in self.stderr[g]))
            size = np.sqrt(sum(float(np.sum(np.square(a))) for a in self.values[g]))
            out.append(err / size if size > 0 else float("inf"))
        return np.array(out)

    @property
    def target_met(self) -> np.ndarray | None:
        """bool [G]: rel_stderr <= the target (None without one)."""
        if self.rel_stderr_target is None:
            return None
        with np.errstate(invalid="ignore"):
            return self.rel_stderr <= self.rel_stderr_target * (1 + 1e-12)

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
        frame = pd.DataFrame(rows, columns=["group", "diag_sum", "diag_mean", "diag_min", "diag_max", "num_params"]).set_index("group")
        frame["rel_stderr"] = self.rel_stderr
        if self.rel_stderr_target is not None:
            frame["target_met"] = self.target_met
        return frame

