"""One snapshot of ``HessianTraceCallback``, from its ``GroupTraces`` to CSV rows and alerts.

``group_values`` picks each recorded group's (trace, stderr) and the total's;
``score_snapshot`` feeds them to the detectors and lays out the CSV rows (the columns
of ``keras_hesstrace.monitor.csv_log.csv_columns``), giving each value its status:
"ok"; "nonfinite" (NaN/inf, written as NaN and skipped by the detector); "nonpositive"
(a value a ``transform="log"`` detector cannot take) or "unreferenced" (a value after a
skipped reference snapshot), both kept in the CSV and skipped by the detector.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

from keras_hesstrace.monitor.csv_log import TOTAL
from keras_hesstrace.monitor.precision import float32_curvature
from keras_hesstrace.trace import layer_traces

if TYPE_CHECKING:
    from keras_hesstrace.monitor.page_hinkley import PageHinkley, PageHinkleyResult
    from keras_hesstrace.group_traces import GroupTraces

_NAN = float("nan")


def snapshot_traces(model, x, y, mixed_layers: list, float32_cache: dict, **options) -> GroupTraces:
    """``layer_traces(model, x, y, verbose=0, **options)``, in float32 for the layers
    ``mixed_layers`` (mixed precision; ``float32_cache`` keeps the functions traced).

    The "Non-finite Hessian trace" and "rel_stderr ... not met" warnings are silenced:
    the callback reports each once, with its step.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Non-finite Hessian trace",
                                category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="rel_stderr=.* not met", category=RuntimeWarning)
        if not mixed_layers:
            return layer_traces(model, x, y, verbose=0, **options)
        with float32_curvature(model, mixed_layers, float32_cache):
            return layer_traces(model, x, y, verbose=0, **options)


def group_values(result: GroupTraces, names: list[str]) -> dict[str, tuple[float, float]]:
    """dict group -> (trace, stderr) of the groups ``names`` and ``"total"``."""
    values = {g: (float(result.trace[result.groups.index(g)]),
                  float(result.stderr[result.groups.index(g)])) for g in names}
    values[TOTAL] = (result.total, result.total_stderr)
    return values


def score_snapshot(
    detectors: dict[str, PageHinkley], step: int, epoch: float, values: dict[str, tuple[float, float]],
    num_probes: int, probe_seed: int, wall: float,
) -> tuple[list[list], list[tuple[str, PageHinkleyResult]], list[str]]:
    """The CSV rows of one snapshot, its first alerts and its unusable groups.

    Updates (or skips) the detector of each group that has one, in place.

    Args:
        detectors: dict group -> ``PageHinkley`` (empty: no detector columns).
        step, epoch, num_probes, probe_seed, wall: the snapshot's CSV fields (``epoch``:
            epochs completed, ``keras_hesstrace.monitor.callback_report.epochs_completed``).
        values: dict group -> (trace, stderr), from :func:`group_values`.

    Returns:
        (rows, alerts, bad): one CSV row per group; (group, result) at each group's
        first alert; the groups whose value was unusable.
    """
    rows, alerts, bad = [], [], []
    for g, (value, err) in values.items():
        status = "ok" if math.isfinite(value) else "nonfinite"
        if status != "ok":
            value, err = _NAN, _NAN
            bad.append(g)
        row = [step, epoch, g, value, err, num_probes, probe_seed, wall]
        extra = []
        if detectors:
            det = detectors.get(g)
            if det is None:
                extra = ["", "", "", "", ""]
            else:
                if status == "ok" and not det.usable(value):
                    status = "unreferenced" if det.reference_missing else "nonpositive"
                    bad.append(g)
                r = det.update(value, step=step) if status == "ok" else det.skip(value, step=step)
                extra = [det.threshold, r.z, r.g_pos, r.g_neg, int(r.alert)]
                if r.first_alert:
                    alerts.append((g, r))
        rows.append(row + [status] + extra)
    return rows, alerts, bad
