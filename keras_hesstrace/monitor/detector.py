"""The two-sided Page-Hinkley (CUSUM) alert rule on standardised trace snapshots.

docs/method.md §7. Each snapshot value x_t is standardised with the clean-run baseline at
that snapshot, z_t = (T(x_t) - mu0_t) / sigma0_t (T is the identity or log), and fed to

    g+_t = max(0, g+_{t-1} + z_t - delta),   g-_t = max(0, g-_{t-1} - z_t - delta),

with g+_0 = g-_0 = 0. The rule alerts at the first t with max(g+_t, g-_t) > h.

Contents:
    Baseline            mu0_t, sigma0_t per snapshot of one group, from clean runs.
    PageHinkley         the online detector (update / skip / reset / get_state / from_state).
    PageHinkleyResult   what ``PageHinkley.update`` returns.
    page_hinkley_statistics, run_lengths
                        the same recursion vectorised over many trajectories.
    relative_to_reference
                        runs minus their own value at a reference snapshot.

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

import math
import warnings
from typing import NamedTuple, Optional

import numpy as np

from keras_hesstrace._validate import check_integer

TRANSFORMS = (None, "log")
OVERRUNS = ("error", "hold")


def check_transform(transform):
    """Return ``transform`` if it is one of ``TRANSFORMS``, else raise ``ValueError``."""
    if transform not in TRANSFORMS:
        raise ValueError(
            f"Unknown transform={transform!r}: use None (standardise the trace itself) "
            "or 'log' (standardise log(trace); every value must be > 0)."
        )
    return transform


def apply_transform(values, transform, what="value"):
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


def check_reference(reference, name="reference"):
    """Return ``reference`` (a snapshot index) as an int >= 0 or None; else ``ValueError``."""
    return check_integer(name, reference, minimum=0, none="no reference")


def first_scored(reference):
    """The first snapshot a rule with this ``reference`` scores: 0, or reference + 1."""
    return 0 if reference is None else reference + 1


def relative_to_reference(runs, reference):
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


def _as_trajectories(trajectories):
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
        >>> clean = [run_a, run_b, run_c]              # 1-D head-trace trajectories
        >>> base = Baseline.from_runs(clean, transform="log", group="dense_1")
        >>> z = base.standardize(new_run)              # doctest: +SKIP
    """

    def __init__(self, mean, std, n_runs=None, transform=None, group=None, reference=None):
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
    def first_scored(self):
        """The first snapshot index that is scored: 0, or reference + 1."""
        return first_scored(self.reference)

    def scored_snapshots(self, horizon):
        """How many of the first ``horizon`` snapshots of a run the rule scores."""
        return max(0, int(horizon) - self.first_scored)

    @classmethod
    def from_runs(cls, trajectories, transform=None, group=None, ddof=1, reference=None):
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
        runs = _as_trajectories(trajectories)
        runs = [apply_transform(r, transform, what=f"clean-run value") for r in runs]
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

    def __len__(self):
        return len(self.mean)

    @property
    def n_snapshots(self):
        """Number of snapshots the baseline covers."""
        return len(self.mean)

    def index(self, t, overrun="error"):
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

    def standardize(self, values, start=0, overrun="error", reference_value=None):
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

    def to_dict(self):
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
    def from_dict(cls, d):
        """Inverse of ``to_dict``."""
        def floats(a):
            return [np.nan if v is None else v for v in a]

        return cls(floats(d["mean"]), floats(d["std"]), n_runs=d.get("n_runs"),
                   transform=d.get("transform"), group=d.get("group"),
                   reference=d.get("reference"))

    def __eq__(self, other):
        if not isinstance(other, Baseline):
            return NotImplemented
        return (self.group == other.group and self.transform == other.transform
                and self.reference == other.reference
                and np.array_equal(self.mean, other.mean, equal_nan=True)
                and np.array_equal(self.std, other.std, equal_nan=True)
                and np.array_equal(self.n_runs, other.n_runs))

    def __repr__(self):
        ref = "" if self.reference is None else f", reference={self.reference}"
        return (f"Baseline(group={self.group!r}, n_snapshots={len(self)}, "
                f"transform={self.transform!r}{ref}, runs={int(self.n_runs.min())}.."
                f"{int(self.n_runs.max())})")


class PageHinkleyResult(NamedTuple):
    """One ``PageHinkley.update``.

    Attributes:
        index: 0-based snapshot index of this value (the number of earlier updates).
        step: the ``step`` passed to ``update`` (e.g. the optimiser step), or None.
        value: the raw value.
        z: the standardised value fed to the recursion (NaN at a snapshot at or before
            the reference snapshot: not scored).
        g_pos, g_neg: the two statistics after this update.
        statistic: max(g_pos, g_neg).
        alert: statistic > threshold at this update.
        first_alert: True only at the first update that alerts since the last reset.
    """

    index: int
    step: Optional[int]
    value: float
    z: float
    g_pos: float
    g_neg: float
    statistic: float
    alert: bool
    first_alert: bool


class PageHinkley:
    """Two-sided Page-Hinkley / CUSUM detector, standardised by a clean baseline.

    The recursion is docs/method.md §7.1 exactly (see the module docstring). The k-th call to
    ``update`` (k = 0, 1, ...) is snapshot k and is standardised with the baseline's
    mean and std at index k. The recursion keeps running after an alert: ``alert`` is
    True while the statistic stays above the threshold, ``first_alert`` only once, and
    ``alert_index``/``alert_step`` keep the first alert until ``reset``. With a reference
    snapshot r (the baseline's, or ``reference`` without a baseline), updates 0..r are
    not scored (z NaN, g+ and g- stay 0) and update r stores the run's reference value.

    Args:
        delta: allowance delta >= 0 (0.5 is tuned to a shift of one standard deviation).
        threshold: alert threshold h > 0, normally from ``calibrate_threshold``.
        baseline: a ``Baseline``; None feeds the (transformed) value itself as z.
        transform: only without a baseline: None or ``"log"``. With a baseline the
            baseline's transform is used; a different one here raises ``ValueError``.
        overrun: ``"error"`` (default) raises at a snapshot past the baseline's last
            one; ``"hold"`` reuses the last snapshot's baseline and warns once.
        reference: only without a baseline: None or a snapshot index r (z is then
            T(x_t) - T(x_r)). With a baseline the baseline's reference is used; a
            different one here raises ``ValueError``.

    Example:
        >>> ph = PageHinkley(delta=0.5, threshold=4.0)
        >>> [ph.update(z).alert for z in [0.0, 2.0, 2.0, 2.0]]
        [False, False, False, True]
    """

    def __init__(self, delta=0.5, threshold=None, baseline=None, transform=None,
                 overrun="error", reference=None):
        delta = float(delta)
        if not (math.isfinite(delta) and delta >= 0):
            raise ValueError(f"delta must be finite and >= 0, got {delta!r}.")
        if threshold is None:
            raise ValueError(
                "threshold is required: calibrate it on clean runs with "
                "keras_hesstrace.monitor.calibrate_threshold."
            )
        threshold = float(threshold)
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {threshold!r}.")
        if baseline is not None and not isinstance(baseline, Baseline):
            raise TypeError(f"baseline must be a Baseline or None, got {type(baseline)}.")
        check_transform(transform)
        if baseline is not None and transform is not None and transform != baseline.transform:
            raise ValueError(
                f"transform={transform!r} differs from the baseline's "
                f"{baseline.transform!r}; the detector uses the baseline's transform."
            )
        reference = check_reference(reference)
        if baseline is not None and reference is not None and reference != baseline.reference:
            raise ValueError(
                f"reference={reference!r} differs from the baseline's "
                f"{baseline.reference!r}; the detector uses the baseline's reference."
            )
        if overrun not in OVERRUNS:
            raise ValueError(f"overrun must be one of {OVERRUNS}, got {overrun!r}.")
        self.delta = delta
        self.threshold = threshold
        self.baseline = baseline
        self.transform = baseline.transform if baseline is not None else transform
        self.reference = baseline.reference if baseline is not None else reference
        self.overrun = overrun
        self.reset()

    def reset(self):
        """Back to g+ = g- = 0 at snapshot 0, with no alert."""
        self.n_updates = 0
        self.g_pos = 0.0
        self.g_neg = 0.0
        self.alert_index = None
        self.alert_step = None
        self.last_step = None
        self.reference_value = None  # transformed value at the reference snapshot
        self._warned_hold = False

    @property
    def reference_missing(self):
        """True once the reference snapshot has passed without a usable value (it was
        skipped): no later snapshot of this run can be scored."""
        return (self.reference is not None and self.n_updates > self.reference
                and self.reference_value is None)

    @property
    def statistic(self):
        """max(g+, g-) after the last update."""
        return max(self.g_pos, self.g_neg)

    @property
    def alerted(self):
        """Whether the rule has alerted since the last reset."""
        return self.alert_index is not None

    def standardize(self, value, index=None):
        """z for ``value`` at snapshot ``index`` (default: the next one); no state change.

        NaN at the unscored snapshots 0..reference.
        """
        index = self.n_updates if index is None else index
        return self._z(self._transformed(value, index), index)

    def _transformed(self, value, index):
        """T(value), after checking it is a finite real number (and > 0 under log)."""
        if isinstance(value, (bool, np.bool_)):
            raise TypeError("value must be a real number, got a bool.")
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"value must be a real number, got {value!r}.") from None
        if not math.isfinite(x):
            raise ValueError(
                f"non-finite value {x!r} at snapshot {index}: "
                "the trace estimate failed (overflow or NaN loss); the detector state "
                "is unchanged."
            )
        return float(apply_transform(x, self.transform))

    def _z(self, y, index):
        """z of the transformed value ``y`` at snapshot ``index``."""
        if self.reference is not None:
            if index <= self.reference:
                return float("nan")
            if self.reference_value is None:
                raise ValueError(
                    f"snapshot {index} cannot be scored: the reference snapshot "
                    f"{self.reference} had no usable value (it was skipped), and every "
                    "snapshot is scored relative to it. The detector state is unchanged."
                )
            y = y - self.reference_value
        if self.baseline is None:
            return y
        k = self.baseline.index(index, self.overrun)
        return (y - self.baseline.mean[k]) / self.baseline.std[k]

    def update(self, value, step=None):
        """Feed the next snapshot's value.

        Args:
            value: the raw trace (or other statistic) at this snapshot; finite.
            step: a label kept with the result and the alert (e.g. optimiser step).

        Returns:
            ``PageHinkleyResult``.

        Raises:
            ValueError: a non-finite value, a non-positive value under ``"log"``, a
                snapshot past the baseline with ``overrun="error"``, or a snapshot
                after a skipped reference snapshot. The state is not changed when it
                raises.
        """
        index = self.n_updates
        y = self._transformed(value, index)
        z = self._z(y, index)
        if (self.baseline is not None and self.overrun == "hold"
                and index >= len(self.baseline) and not self._warned_hold):
            warnings.warn(
                f"Snapshot {index} is past the baseline's last snapshot "
                f"{len(self.baseline) - 1}; holding its mean and std (overrun='hold').",
                stacklevel=2,
            )
            self._warned_hold = True
        if index == self.reference:
            self.reference_value = y
        if not math.isnan(z):  # NaN: an unscored snapshot before or at the reference
            self.g_pos = max(0.0, self.g_pos + z - self.delta)
            self.g_neg = max(0.0, self.g_neg - z - self.delta)
        self.n_updates = index + 1
        self.last_step = step
        stat = self.statistic
        alert = stat > self.threshold
        first = alert and self.alert_index is None
        if first:
            self.alert_index = index
            self.alert_step = step
        return PageHinkleyResult(index, step, float(value), z, self.g_pos, self.g_neg,
                                 stat, bool(alert), bool(first))

    def skip(self, step=None, value=float("nan")):
        """Pass over a snapshot whose value is unusable (non-finite, or <= 0 under ``"log"``).

        The snapshot index advances, so the next value is standardised with the baseline
        of the snapshot it really belongs to, but g+ and g- are left unchanged: a missing
        value neither raises nor lowers the evidence. No baseline lookup is made, so
        skipping past the baseline's end does not raise. Skipping the reference snapshot
        leaves the run without a reference: ``reference_missing`` becomes True and
        every later value is unusable.

        Args:
            step: a label kept with the result (e.g. optimiser step).
            value: the unusable value, kept in the result for the record.

        Returns:
            ``PageHinkleyResult`` with ``z`` NaN, the unchanged g+ and g-, ``alert``
            as the unchanged statistic says, and ``first_alert`` False.
        """
        index = self.n_updates
        self.n_updates = index + 1
        self.last_step = step
        stat = self.statistic
        return PageHinkleyResult(index, step, float(value), float("nan"), self.g_pos,
                                 self.g_neg, stat, bool(stat > self.threshold), False)

    def usable(self, value):
        """True when ``update(value)`` can take ``value``: finite, > 0 under ``"log"``, and
        not after a skipped reference snapshot (``reference_missing``)."""
        try:
            x = float(value)
        except (TypeError, ValueError):
            return False
        return (math.isfinite(x) and (self.transform is None or x > 0)
                and not self.reference_missing)

    def get_state(self):
        """JSON-compatible dict of configuration and state; see ``from_state``."""
        return {
            "delta": self.delta,
            "threshold": self.threshold,
            "transform": self.transform,
            "overrun": self.overrun,
            "reference": self.reference,
            "reference_value": self.reference_value,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "n_updates": self.n_updates,
            "g_pos": self.g_pos,
            "g_neg": self.g_neg,
            "alert_index": self.alert_index,
            "alert_step": _jsonable_step(self.alert_step),
            "last_step": _jsonable_step(self.last_step),
            "warned_hold": self._warned_hold,
        }

    @classmethod
    def from_state(cls, state):
        """Rebuild a detector, mid-run, from ``get_state()`` output."""
        baseline = state.get("baseline")
        baseline = None if baseline is None else Baseline.from_dict(baseline)
        ph = cls(delta=state["delta"], threshold=state["threshold"], baseline=baseline,
                 transform=state.get("transform") if baseline is None else None,
                 overrun=state.get("overrun", "error"),
                 reference=state.get("reference") if baseline is None else None)
        ph.n_updates = int(state["n_updates"])
        ph.g_pos = float(state["g_pos"])
        ph.g_neg = float(state["g_neg"])
        ph.alert_index = state.get("alert_index")
        ph.alert_step = state.get("alert_step")
        ph.last_step = state.get("last_step")
        ph.reference_value = state.get("reference_value")
        ph._warned_hold = bool(state.get("warned_hold", False))
        return ph

    def __repr__(self):
        return (f"PageHinkley(delta={self.delta}, threshold={self.threshold:.4g}, "
                f"baseline={self.baseline!r}, n_updates={self.n_updates}, "
                f"statistic={self.statistic:.4g}, alert_index={self.alert_index})")


def _jsonable_step(step):
    if isinstance(step, (np.integer,)):
        return int(step)
    if isinstance(step, (np.floating,)):
        return float(step)
    return step


def page_hinkley_statistics(z, delta=0.5):
    """g+ and g- for many trajectories at once (Lindley's closed form of the recursion).

    g+_t = W_t - min(0, min_{s<=t} W_s) with W_t = sum_{s<=t} (z_s - delta), which is
    max(0, g+_{t-1} + z_t - delta) unrolled; g- likewise with -z_s - delta.

    Args:
        z: float array [..., T] of standardised values, time on the last axis.
        delta: allowance >= 0.

    Returns:
        (g_pos, g_neg), float64 arrays [..., T].
    """
    z = np.asarray(z, dtype=np.float64)
    out = []
    for w in (np.cumsum(z - delta, axis=-1), np.cumsum(-z - delta, axis=-1)):
        low = np.minimum.accumulate(np.minimum(w, 0.0), axis=-1)
        out.append(w - low)
    return out[0], out[1]


def run_lengths(z, threshold, delta=0.5):
    """Run length (1-based snapshot of the first alert) of each trajectory.

    Args:
        z: float array [..., T] of standardised values, time on the last axis.
        threshold: h > 0.
        delta: allowance >= 0.

    Returns:
        float64 array [...]: t + 1 for the first 0-based t with max(g+_t, g-_t) > h,
        NaN where no alert happens within T (censored).
    """
    g_pos, g_neg = page_hinkley_statistics(z, delta)
    over = np.maximum(g_pos, g_neg) > threshold
    first = np.argmax(over, axis=-1) + 1.0
    return np.where(over.any(axis=-1), first, np.nan)
