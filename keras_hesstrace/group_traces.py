"""What ``layer_traces`` returns: each group's Hutchinson trace estimate (:class:`GroupTraces`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from keras_hesstrace.linalg.adaptive import relative_stderr
from keras_hesstrace.linalg.common import stderr as _stderr  # the one standard error (numpy core)


@dataclass(frozen=True)
class GroupTraces:
    """Per-group Hutchinson trace estimates: what :func:`layer_traces` returns.

    (Its earlier name ``TraceResult`` still works, with a DeprecationWarning. ``TraceEstimate`` is the one-number result of
    ``hessian_trace``.)

    Attributes:
        groups: group names, length G.
        samples: float64 [M, G]; samples[m, l] = <v_l, (H v)_l> for probe m
            (averaged over batches in the full-dataset mode).
        total_samples: float64 [M]; <v, H v> over all trainable variables
            (equals samples.sum(1) when the groups cover every variable).
        group_sizes: int [G], scalar parameters per group.
        loss: the loss at the parameters (mean over the batches used).
        num_batches: batches averaged over (1 for a single batch).
        probe: the probe distribution.
        seed: the base seed; probe m used the stateless seed (seed, m).
        mode: how the Hessian-vector products were computed ("forward" or "reverse";
            with ``mode="auto"`` the one the operator's check chose).
        gradient_norms: float64 [G], the L2 norm of each group's block of the loss's
            gradient on the same batch(es) (batch-weighted mean gradient), from the same
            pass as the products; None where not computed.
        gradient_norm: the L2 norm of the whole gradient (all the operator's variables).
        rel_stderr_target: the target r of ``layer_traces(rel_stderr=r)``, or None (a
            fixed probe count).
        target_met: bool [G], whether each group's relative standard error is at most
            r (None without a target).
        total_target_met: the same for the total (None without a target).
        schemes: with ``layer_traces(scheme=...)`` other than "single", the scheme that
            served each group ("single", "restricted" or "coordinates";
            :mod:`keras_hesstrace.schemes`); None: the single pass for all.
        probe_counts: int [G], the samples of each group (its column of ``samples`` is
            NaN below them); None: all M.
        num_hvps: int [G], the HVPs of the run that served each group (a shared run
            counted whole); None with the single pass for all.
        seconds: float64 [G], the measured time of those HVPs; None likewise.
        pooled_stderr: float64 [G] or None: where not NaN, the group's standard error
            pooled over its entries (the coordinate design's
            ``CoordinateDesign.sweep_variance``), reported instead of its samples' spread.
        hvps_drawn: every HVP the estimate drew, pilots that went unused included
            (``num_hvps_drawn``); None: ``num_probes``.
    """

    groups: tuple
    samples: np.ndarray
    total_samples: np.ndarray
    group_sizes: np.ndarray
    loss: float
    num_batches: int = 1
    probe: str = "rademacher"
    seed: int = 0
    mode: str = "reverse"
    gradient_norms: np.ndarray | None = None
    gradient_norm: float = float("nan")
    rel_stderr_target: float | None = None
    target_met: np.ndarray | None = None
    total_target_met: bool | None = None
    schemes: tuple | None = None
    probe_counts: np.ndarray | None = None
    num_hvps: np.ndarray | None = None
    seconds: np.ndarray | None = None
    hvps_drawn: int | None = None
    pooled_stderr: np.ndarray | None = None

    @property
    def num_probes(self) -> int:
        """M, the rows of ``samples`` (the most samples of any group)."""
        return int(self.samples.shape[0])

    @property
    def num_hvps_drawn(self) -> int:
        """Every HVP (one product over the batch or batches) the estimate drew."""
        return self.num_probes if self.hvps_drawn is None else int(self.hvps_drawn)

    def columns(self) -> list:
        """Each group's samples, float64 [M_l] (its first ``probe_counts[l]`` rows)."""
        counts = [self.num_probes] * len(self.groups) if self.probe_counts is None else self.probe_counts
        return [self.samples[:int(c), l] for l, c in enumerate(counts)]

    @property
    def trace(self) -> np.ndarray:
        """float64 [G]: the estimate of tr(H_ll), the mean of each group's samples."""
        if self.probe_counts is None:
            return self.samples.mean(axis=0)
        return np.array([c.mean() for c in self.columns()])

    @property
    def stderr(self) -> np.ndarray:
        """float64 [G]: the sample standard error of the mean over probes (NaN for M < 2)."""
        if self.probe_counts is None:
            return _stderr(self.samples)
        spread = np.array([_stderr(c) for c in self.columns()])
        if self.pooled_stderr is None:
            return spread
        return np.where(np.isnan(self.pooled_stderr), spread, self.pooled_stderr)

    @property
    def rel_stderr(self) -> np.ndarray:
        """float64 [G]: |stderr / trace| (inf where the trace is 0, NaN for M < 2)."""
        if self.probe_counts is None:
            return relative_stderr(self.samples)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.abs(self.stderr / self.trace)

    @property
    def total(self) -> float:
        """The estimate of the full trace tr(H)."""
        return float(self.total_samples.mean())

    @property
    def total_stderr(self) -> float:
        return float(_stderr(self.total_samples[:, None])[0])

    @property
    def finite(self) -> bool:
        """False when the loss or any sample is NaN or infinite: then the numbers mean nothing."""
        return bool(np.isfinite(self.loss) and all(np.all(np.isfinite(c)) for c in self.columns())
                    and np.all(np.isfinite(self.total_samples)))

    def __getitem__(self, group):
        """The trace estimate of one group, by name."""
        try:
            return float(self.trace[self.groups.index(group)])
        except ValueError:
            raise KeyError(f"No group {group!r}; groups are {list(self.groups)}") from None

    def to_frame(self) -> pd.DataFrame:
        """A pandas DataFrame indexed by group: trace, stderr, rel_stderr, num_params,
        num_probes, gradient_norm; with a target (``rel_stderr=``), also
        rel_stderr_target and target_met."""
        frame = pd.DataFrame(
            {
                "trace": self.trace,
                "stderr": self.stderr,
                "rel_stderr": self.rel_stderr,
                "num_params": self.group_sizes,
                "num_probes": self.num_probes if self.probe_counts is None else self.probe_counts,
                "gradient_norm": (np.full(len(self.groups), np.nan) if self.gradient_norms is None
                                  else self.gradient_norms),
            },
            index=pd.Index(list(self.groups), name="group"),
        )
        if self.rel_stderr_target is not None:
            frame["rel_stderr_target"] = float(self.rel_stderr_target)
            frame["target_met"] = np.asarray(self.target_met, dtype=bool)
        if self.schemes is not None:
            frame["scheme"] = list(self.schemes)
            frame["num_hvps"] = self.num_hvps
            frame["seconds"] = self.seconds
        return frame

    @property
    def missed_target(self) -> list:
        """The groups (and ``"total"``) whose relative standard error is above the target;
        empty without a target or when all met it."""
        if self.rel_stderr_target is None:
            return []
        return [n for n, ok in zip(self.groups, self.target_met) if not ok] + ([] if self.total_target_met else ["total"])

    def __str__(self):
        frame = self.to_frame()
        lines = [frame.to_string(float_format=lambda v: f"{v:.4g}")]
        lines.append(f"total trace {self.total:.6g} ± {self.total_stderr:.2g} (M={self.num_probes} probes, {self.num_batches} batch(es), loss {self.loss:.4g})")
        if self.rel_stderr_target is not None:
            missed = self.missed_target
            lines.append(f"target rel_stderr {self.rel_stderr_target:g}: " + ("met by every group and the total" if not missed
                                                                               else "NOT met by " + ", ".join(missed)))
        if not self.finite:
            lines.append("NOT FINITE: the loss or the Hessian has NaN/inf; these numbers are meaningless.")
        return "\n".join(lines)
