"""The clean-run baseline a Page-Hinkley rule standardises with (docs/method.md §7.3).

Each snapshot value x_t is standardised with the clean-run baseline at that snapshot,
z_t = (T(x_t) - mu0_t) / sigma0_t (T is the identity or log); the rule itself is in
``keras_hesstrace.monitor.page_hinkley``.

Contents:
    Baseline            mu0_t, sigma0_t per snapshot of one group, from clean runs.
    check_transform, apply_transform
                        the transform T.
    check_reference, first_scored, relative_to_reference
                        runs minus their own value at a reference snapshot.
    as_trajectories     clean runs as a list of 1-D arrays (trailing NaN is padding).

Transform. ``transform=None`` (the default) standardises the trace itself, exactly as
the method paper writes it (docs/method.md §7.6), and accepts any real value: the single-pass estimate of a small
trace can be negative, and a rule that raised on such a snapshot would stop a fit.
``transform="log"`` standardises log(trace) instead; it is the better choice when every
clean and monitored value is positive and the trace spans decades (docs/tensorflow-notes.md §7: clean and
noisy head traces separate by orders of magnitude), because a per-snapshot mean and
standard deviation of a few right-skewed runs are dominated by the largest run. A
non-positive value under ``"log"`` raises ``ValueError``. The transform belongs to the
``Baseline``; a ``PageHinkley`` with a baseline always uses the baseline's transform.

Reference snapshot. ``reference=r`` (an integer >= 0, default None) scores each run
relative to itself: the monitored value at snapshot t > r is T(x_t) - T(x_r), the run's
change since its own snapshot r, and snapshots 0..r are not scored (z is NaN there and
g+ and g- stay 0). It removes a run-level offset the per-snapshot baseline cannot absorb
(an early dip of a noisy run, a run whose trace starts high; docs/memorisation.md). The
reference belongs to the ``Baseline`` like the transform; its ``mean`` and ``std`` are
NaN at the unscored snapshots.

Runs longer than the baseline. ``overrun="error"`` (the default) raises ``ValueError``
at the first snapshot past the baseline's last one: the calibrated threshold holds only
for the snapshots the clean runs covered. ``overrun="hold"`` keeps standardising with the
last snapshot's (mu0, sigma0) and warns once; use it when traces have plateaued.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from keras_hesstrace._validate import check_integer

TRANSFORMS = (None, "log")
OVERRUNS = ("error", "hold")


def check_transform(transform: str | None) -> str | None:
    """Return ``transform`` if it is one of ``TRANSFORMS``, else raise ``ValueError``."""
    if transform not in TRANSFORMS:
        raise ValueError(
            f"Unknown transform={transform!r}: use None (standardise the trace itself) "
            "or 'log' (standardise log(trace); every value must be > 0)."
        )
    return transform


def apply_transform(values: np.ndarray | float, transform: str | None, what: str = "value") -> np.ndarray:
    """Apply ``transform`` to a float array; raise on values it cannot take.

    Args:
        values: float array, any shape; must be finite (NaN padding is the caller's job).
        transform: None or ``"log"``.
        what: how to name the values in an error message.

    Returns:
        float64 array of the same shape.
    """
    values = np.asarray(values, dtype=np.float64)
    if transform is None:
        return values
    bad = ~(values > 0)
    if np.any(bad):
        first = np.argwhere(bad)[0]
        where = f" at index {tuple(int(i) for i in first)}" if values.ndim else ""
        raise ValueError(
            f"transform='log' needs every {what} > 0, got {float(values[tuple(first)])!r}{where}. "
            "A single-pass trace estimate can be zero or negative when the trace is "
            "small: use transform=None, or more probes."
        )
    return np.log(values)


def check_reference(reference: int | None, name: str = "reference") -> int | None:
    """Return ``reference`` (a snapshot index) as an int >= 0 or None; else ``ValueError``."""
    return check_integer(name, reference, minimum=0, none="no reference")


def first_scored(reference: int | None) -> int:
    """The first snapshot a rule with this ``reference`` scores: 0, or reference + 1."""
    return 0 if reference is None else reference + 1


def relative_to_reference(runs: Sequence[np.ndarray], reference: int | None) -> list[np.ndarray]:
    """Each run's values after snapshot ``reference`` minus its value at ``reference``.

    Args:
        runs: list of 1-D float arrays [T_i] (already transformed), snapshots 0..T_i-1.
        reference: snapshot index r >= 0, or None (the runs are returned unchanged).

    Returns:
        list of float64 arrays [T_i - r - 1]: entry j is run[r + 1 + j] - run[r], the
        value at snapshot r + 1 + j.

    Raises:
        ValueError: a run with fewer than r + 2 snapshots (nothing left to score).
    """
    if reference is None:
        return list(runs)
    out = []
    for i, r in enumerate(runs):
        if len(r) < reference + 2:
            raise ValueError(
                f"run {i} has {len(r)} snapshot(s); with reference={reference} a run needs "
                f"at least {reference + 2} (the reference snapshot and one scored after it)."
            )
        out.append(r[reference + 1:] - r[reference])
    return out


def as_trajectories(trajectories: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Runs as a list of 1-D float arrays; trailing NaN is padding and is removed.

    Accepts a 2-D array [N, T] (NaN-padded for unequal lengths, as a pandas pivot
    gives) or a sequence of 1-D arrays of any lengths.
    """
    if isinstance(trajectories, np.ndarray) and trajectories.ndim == 2:
        rows = list(trajectories)
    elif isinstance(trajectories, np.ndarray) and trajectories.ndim == 1 and (
        trajectories.dtype != object
    ):
        raise ValueError(
            "trajectories must be several runs: a 2-D array [runs, snapshots] or a "
            "list of 1-D arrays; got one 1-D array."
        )
    else:
        rows = list(trajectories)
    runs = []
    for i, row in enumerate(rows):
        row = np.asarray(row, dtype=np.float64)
        if row.ndim != 1:
            raise ValueError(f"run {i} must be 1-D (snapshots), got shape {row.shape}.")
        finite = np.isfinite(row)
        n = len(row)
        while n and np.isnan(row[n - 1]):
            n -= 1
        if not np.all(finite[:n]):
            t = int(np.argmin(finite[:n]))
            raise ValueError(
                f"run {i} has a non-finite value {float(row[t])!r} at snapshot {t} "
                "(only trailing NaN is accepted, as padding of a shorter run)."
            )
        if n == 0:
            raise ValueError(f"run {i} is empty.")
        runs.append(row[:n])
    return runs


class Baseline:
    """Per-snapshot mean and standard deviation of one group's clean trajectories.

    ``mean[t]`` and ``std[t]`` are mu0_t and sigma0_t of docs/method.md §7.3 (on the
    transformed scale), from the ``n_runs[t]`` clean runs that reach snapshot t. With a
    ``reference`` r they describe T(x_t) - T(x_r) and are NaN at snapshots t <= r.

    Args:
        mean: array [T], mu0_t.
        std: array [T], sigma0_t; every scored entry finite and > 0.
        n_runs: int array [T], runs behind each snapshot (informational).
        transform: None or ``"log"``; applied to values before standardising.
        group: name of the group the baseline belongs to (informational).
        reference: None, or the snapshot r (0 <= r <= T - 2) each run is scored
            relative to (see the module docstring); entries 0..r of ``mean`` and
            ``std`` are ignored and set to NaN.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> clean = [1.0 + rng.random(20) for _ in range(3)]  # 1-D head-trace trajectories
        >>> base = Baseline.from_runs(clean, transform="log", group="dense_1")
        >>> base.standardize(1.0 + rng.random(20)).shape
        (20,)
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, n_runs: np.ndarray | None = None,
                 transform: str | None = None, group: str | None = None,
                 reference: int | None = None) -> None:
        mean = np.array(mean, dtype=np.float64)
        std = np.array(std, dtype=np.float64)
        if mean.ndim != 1 or mean.shape != std.shape or mean.size == 0:
            raise ValueError(
                f"mean and std must be 1-D of the same non-zero length, got shapes "
                f"{mean.shape} and {std.shape}."
            )
        reference = check_reference(reference)
        off = first_scored(reference)
        if off >= mean.size:
            raise ValueError(
                f"reference={reference} leaves no scored snapshot in a baseline of "
                f"{mean.size} snapshot(s); it must be at most {mean.size - 2}."
            )
        mean[:off] = np.nan
        std[:off] = np.nan
        if not (np.all(np.isfinite(mean[off:])) and np.all(np.isfinite(std[off:]))):
            raise ValueError("Baseline mean and std must be finite"
                             + (" after the reference snapshot." if off else "."))
        zero = off + np.flatnonzero(~(std[off:] > 0))
        if zero.size:
            raise ValueError(
                f"Baseline standard deviation is {float(std[zero[0]])!r} at snapshot(s) "
                f"{zero.tolist()[:10]}: the clean runs are identical there, so no value "
                "can be standardised. Use more runs or a different snapshot schedule."
            )
        if n_runs is None:
            n_runs = np.full(mean.shape, -1, dtype=np.int64)
        n_runs = np.asarray(n_runs, dtype=np.int64)
        if n_runs.shape != mean.shape:
            raise ValueError(f"n_runs must have shape {mean.shape}, got {n_runs.shape}.")
        self.mean = mean
        self.std = std
        self.n_runs = n_runs
        self.transform = check_transform(transform)
        self.group = group
        self.reference = reference

    @property
    def first_scored(self) -> int:
        """The first snapshot index that is scored: 0, or reference + 1."""
        return first_scored(self.reference)

    def scored_snapshots(self, horizon: int) -> int:
        """How many of the first ``horizon`` snapshots of a run the rule scores."""
        return max(0, int(horizon) - self.first_scored)

    @classmethod
    def from_runs(cls, trajectories: np.ndarray | Sequence[np.ndarray], transform: str | None = None,
                  group: str | None = None, ddof: int = 1, reference: int | None = None) -> Baseline:
        """Baseline from clean runs; each snapshot uses the runs that reach it.

        Args:
            trajectories: 2-D array [N, T] (trailing NaN pads shorter runs) or a
                sequence of N 1-D arrays [T_i]: one group's value at snapshots
                0..T_i-1 of each clean run. Non-finite values other than trailing
                NaN padding raise ``ValueError``.
            transform: None or ``"log"`` (see the module docstring).
            group: the group's name, kept for messages and serialisation.
            ddof: delta degrees of freedom of the standard deviation (1: sample SD).
            reference: None, or the snapshot r each run is scored relative to: the
                baseline then describes T(x_t) - T(x_r) for t > r (every run needs
                at least r + 2 snapshots).

        Returns:
            ``Baseline`` of length max_i T_i.

        Raises:
            ValueError: a snapshot reached by fewer than two runs (name and count
                given), zero spread at a snapshot, non-finite or (with ``"log"``)
                non-positive values, a run too short for the reference.
        """
        check_transform(transform)
        reference = check_reference(reference)
        runs = as_trajectories(trajectories)
        runs = [apply_transform(r, transform, what="clean-run value") for r in runs]
        if len(runs) < 2:
            raise ValueError(
                f"A baseline needs at least two clean runs, got {len(runs)}."
            )
        off = first_scored(reference)
        lengths = np.array([len(r) for r in runs])
        scored = relative_to_reference(runs, reference)
        T = int(lengths.max())
        n_at = (lengths[:, None] > np.arange(T)[None, :]).sum(axis=0)
        short = off + np.flatnonzero(n_at[off:] < 2)
        if short.size:
            raise ValueError(
                f"Snapshot {int(short[0])} (and {short.size - 1} after it) is reached by "
                f"{int(n_at[short[0]])} clean run(s); a baseline needs at least two runs "
                f"at every snapshot. Run lengths: {lengths.tolist()}. Truncate the "
                "longest run(s) or add runs."
            )
        padded = np.full((len(runs), T - off), np.nan)
        for i, r in enumerate(scored):
            padded[i, : len(r)] = r
        mean = np.concatenate([np.full(off, np.nan), np.nanmean(padded, axis=0)])
        std = np.concatenate([np.full(off, np.nan), np.nanstd(padded, axis=0, ddof=ddof)])
        return cls(mean, std, n_runs=n_at, transform=transform, group=group,
                   reference=reference)

    def __len__(self) -> int:
        return len(self.mean)

    @property
    def n_snapshots(self) -> int:
        """Number of snapshots the baseline covers."""
        return len(self.mean)

    def index(self, t: int, overrun: str = "error") -> int:
        """The baseline index used for snapshot ``t`` (0-based), per ``overrun``."""
        if overrun not in OVERRUNS:
            raise ValueError(f"overrun must be one of {OVERRUNS}, got {overrun!r}.")
        if t < 0:
            raise ValueError(f"snapshot index must be >= 0, got {t}.")
        if t < len(self.mean):
            return t
        if overrun == "hold":
            return len(self.mean) - 1
        raise ValueError(
            f"Snapshot {t} is past the baseline's last snapshot {len(self.mean) - 1}"
            f"{' of group ' + repr(self.group) if self.group is not None else ''}: the "
            "run is longer than the clean runs it was calibrated on. Calibrate on "
            "longer clean runs, or pass overrun='hold' to reuse the last snapshot's "
            "baseline."
        )

    def standardize(self, values: np.ndarray, start: int = 0, overrun: str = "error",
                    reference_value: float | None = None) -> np.ndarray:
        """z for a trajectory whose first value is snapshot ``start``.

        Args:
            values: array [T'] of raw (untransformed) finite values.
            start: snapshot index of ``values[0]``.
            overrun: ``"error"`` or ``"hold"`` for snapshots past the baseline.
            reference_value: with a ``reference`` r and ``start > r`` only: the run's
                raw value at snapshot r (otherwise it is taken from ``values``).

        Returns:
            float64 array [T'] of z; NaN at the unscored snapshots <= reference.
        """
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"values must be 1-D, got shape {values.shape}.")
        if not np.all(np.isfinite(values)):
            t = int(np.argmin(np.isfinite(values)))
            raise ValueError(f"non-finite value {float(values[t])!r} at position {t}.")
        x = apply_transform(values, self.transform)
        if values.size == 0:
            return x
        self.index(start + len(values) - 1, overrun)  # raises if it overruns
        idx = np.minimum(np.arange(start, start + len(values)), len(self.mean) - 1)
        ref = self.reference
        if ref is not None:
            if start <= ref < start + len(values):
                if reference_value is not None:
                    raise ValueError(f"values include the reference snapshot {ref}; do not "
                                     "also pass reference_value.")
                x = x - x[ref - start]
            elif reference_value is None:
                raise ValueError(
                    f"values start at snapshot {start}, after the reference snapshot {ref}: "
                    f"pass reference_value= (the run's raw value at snapshot {ref})."
                )
            else:
                x = x - float(apply_transform(float(reference_value), self.transform,
                                              what="reference value"))
        with np.errstate(invalid="ignore"):
            return (x - self.mean[idx]) / self.std[idx]

    def to_dict(self) -> dict:
        """JSON-compatible dict (NaN entries as None); ``Baseline.from_dict`` inverts it."""
        def floats(a):
            return [float(v) if np.isfinite(v) else None for v in a]

        return {
            "group": self.group,
            "transform": self.transform,
            "reference": self.reference,
            "mean": floats(self.mean),
            "std": floats(self.std),
            "n_runs": [int(v) for v in self.n_runs],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Baseline:
        """Inverse of ``to_dict``."""
        def floats(a):
            return [np.nan if v is None else v for v in a]

        return cls(floats(d["mean"]), floats(d["std"]), n_runs=d.get("n_runs"),
                   transform=d.get("transform"), group=d.get("group"),
                   reference=d.get("reference"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Baseline):
            return NotImplemented
        return (self.group == other.group and self.transform == other.transform
                and self.reference == other.reference
                and np.array_equal(self.mean, other.mean, equal_nan=True)
                and np.array_equal(self.std, other.std, equal_nan=True)
                and np.array_equal(self.n_runs, other.n_runs))

    def __repr__(self) -> str:
        ref = "" if self.reference is None else f", reference={self.reference}"
        return (f"Baseline(group={self.group!r}, n_snapshots={len(self)}, "
                f"transform={self.transform!r}{ref}, runs={int(self.n_runs.min())}.."
                f"{int(self.n_runs.max())})")
