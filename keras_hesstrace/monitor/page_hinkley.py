"""The two-sided Page-Hinkley (CUSUM) alert rule on standardised trace snapshots.

docs/method.md §7. Each snapshot value x_t is standardised with the clean-run baseline at
that snapshot (``keras_hesstrace.monitor.baseline``), z_t = (T(x_t) - mu0_t) / sigma0_t,
and fed to

    g+_t = max(0, g+_{t-1} + z_t - delta),   g-_t = max(0, g-_{t-1} - z_t - delta),

with g+_0 = g-_0 = 0. The rule alerts at the first t with max(g+_t, g-_t) > h.

Contents:
    PageHinkley         the online detector (update / skip / reset / get_state / from_state).
    PageHinkleyResult   what ``PageHinkley.update`` returns.
    page_hinkley_statistics, run_lengths
                        the same recursion vectorised over many trajectories (the one
                        array implementation, which the calibration's resampling uses too).

The transform, the reference snapshot and ``overrun`` belong to the ``Baseline``; see
``keras_hesstrace.monitor.baseline``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import numpy as np

from keras_hesstrace.monitor.baseline import (
    OVERRUNS,
    Baseline,
    apply_transform,
    check_reference,
    check_transform,
)


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

    def __init__(self, delta: float = 0.5, threshold: float | None = None,
                 baseline: Baseline | None = None, transform: str | None = None,
                 overrun: str = "error", reference: int | None = None) -> None:
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

    def reset(self) -> None:
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
    def reference_missing(self) -> bool:
        """True once the reference snapshot has passed without a usable value (it was
        skipped): no later snapshot of this run can be scored."""
        return (self.reference is not None and self.n_updates > self.reference
                and self.reference_value is None)

    @property
    def statistic(self) -> float:
        """max(g+, g-) after the last update."""
        return max(self.g_pos, self.g_neg)

    @property
    def alerted(self) -> bool:
        """Whether the rule has alerted since the last reset."""
        return self.alert_index is not None

    def standardize(self, value: float, index: int | None = None) -> float:
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

    def update(self, value: float, step: int | None = None) -> PageHinkleyResult:
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

    def skip(self, value: float = float("nan"), *, step: int | None = None) -> PageHinkleyResult:
        """Pass over a snapshot whose value is unusable (non-finite, or <= 0 under ``"log"``).

        The snapshot index advances, so the next value is standardised with the baseline
        of the snapshot it really belongs to, but g+ and g- are left unchanged: a missing
        value neither raises nor lowers the evidence. No baseline lookup is made, so
        skipping past the baseline's end does not raise. Skipping the reference snapshot
        leaves the run without a reference: ``reference_missing`` becomes True and
        every later value is unusable.

        The arguments are in ``update``'s order, value then step; ``step`` is keyword-only,
        so a call in the former order ``skip(step, value)`` raises ``TypeError``.

        Args:
            value: the unusable value, kept in the result for the record.
            step: a label kept with the result (e.g. optimiser step).

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

    def usable(self, value: float) -> bool:
        """True when ``update(value)`` can take ``value``: finite, > 0 under ``"log"``, and
        not after a skipped reference snapshot (``reference_missing``)."""
        try:
            x = float(value)
        except (TypeError, ValueError):
            return False
        return (math.isfinite(x) and (self.transform is None or x > 0)
                and not self.reference_missing)

    def get_state(self) -> dict:
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
    def from_state(cls, state: dict) -> PageHinkley:
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

    def __repr__(self) -> str:
        return (f"PageHinkley(delta={self.delta}, threshold={self.threshold:.4g}, "
                f"baseline={self.baseline!r}, n_updates={self.n_updates}, "
                f"statistic={self.statistic:.4g}, alert_index={self.alert_index})")


def _jsonable_step(step):
    if isinstance(step, (np.integer,)):
        return int(step)
    if isinstance(step, (np.floating,)):
        return float(step)
    return step


def page_hinkley_statistics(
    z: np.ndarray, delta: float = 0.5,
    initial: tuple[float | np.ndarray, float | np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """g+ and g- for many trajectories at once (Lindley's closed form of the recursion).

    g+_t = W_t - min(0, min_{s<=t} W_s) with W_t = g+_init + sum_{s<=t} (z_s - delta),
    which is max(0, g+_{t-1} + z_t - delta) unrolled from g+_init (0 by default); g-
    likewise with -z_s - delta.

    Args:
        z: float array [..., T] of standardised values, time on the last axis.
        delta: allowance >= 0.
        initial: None (g+ = g- = 0 before the first value), or (g_pos0, g_neg0), each
            >= 0, a float or an array [...]: the statistics carried over from earlier
            values of the same trajectories (to run a long trajectory in pieces).

    Returns:
        (g_pos, g_neg), float64 arrays [..., T].
    """
    z = np.asarray(z, dtype=np.float64)
    start = (0.0, 0.0) if initial is None else initial
    out = []
    for sign, g0 in zip((1.0, -1.0), start):
        w = np.cumsum(sign * z - delta, axis=-1)
        if initial is not None:
            w += np.asarray(g0, dtype=np.float64)[..., None]
        low = np.minimum.accumulate(np.minimum(w, 0.0, out=np.empty_like(w)), axis=-1)
        w -= low
        out.append(w)
    return out[0], out[1]


def run_lengths(z: np.ndarray, threshold: float, delta: float = 0.5) -> np.ndarray:
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
