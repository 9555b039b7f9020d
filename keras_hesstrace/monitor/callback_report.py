"""What ``HessianTraceCallback`` says: its epoch convention, alert and summary lines.

Epoch convention. Everywhere the callback gives an epoch (its CSV's ``epoch`` column,
``history``, alert and summary lines, the TensorBoard alert text) it is the number of
epochs completed at the snapshot, fractional: ``epoch + (step - epoch's first step) /
steps_per_epoch`` with ``epoch`` Keras's 0-based index of the epoch in progress, i.e.
``step / steps_per_epoch`` for a fit that started at step 0 (as the experiments' summaries
give a detection epoch). A snapshot at the end of epoch index 0 is at epoch 1.0. When Keras
does not know the steps per epoch (a dataset of unknown length) the first epoch's count is
used once it has ended; before, the epoch is whole (the index in progress, or index + 1 at
the epoch's end).

Printing. Lines go through ``keras.utils.io_utils.print_msg``, as
``keras.callbacks.EarlyStopping`` prints (stdout when interactive logging is on, else the
absl logger); a line printed while Keras's progress bar is mid-line (``verbose=1`` in
``fit``, after an epoch's first batch) starts on a new line, as ``ModelCheckpoint``'s do.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import keras
from keras.src.utils import io_utils

from keras_hesstrace.monitor.csv_log import TOTAL

if TYPE_CHECKING:
    from keras_hesstrace.monitor.page_hinkley import PageHinkley


def epochs_completed(epoch: int | None, step: int, epoch_start_step: int,
                     steps_per_epoch: int | None, at_epoch_end: bool = False) -> float:
    """Epochs completed at optimiser ``step`` (see the module docstring).

    Args:
        epoch: Keras's 0-based index of the epoch in progress (None before the first).
        step: the snapshot's optimiser step.
        epoch_start_step: the optimiser step at that epoch's start.
        steps_per_epoch: optimiser steps an epoch, or None when unknown.
        at_epoch_end: the snapshot is taken at the epoch's end (used when
            ``steps_per_epoch`` is unknown).

    Returns:
        float, rounded to 6 decimals.
    """
    epoch = 0 if epoch is None else int(epoch)
    if steps_per_epoch:
        return round(epoch + (step - epoch_start_step) / steps_per_epoch, 6)
    return float(epoch + 1 if at_epoch_end else epoch)


def say(message: str, mid_line: bool = False) -> None:
    """Print ``message`` as Keras's callbacks do; on a new line when ``mid_line`` (the
    progress bar has an unfinished line)."""
    if mid_line and keras.config.is_interactive_logging_enabled():
        message = "\n" + message
    io_utils.print_msg(message)
    if keras.config.is_interactive_logging_enabled():
        sys.stdout.flush()


def unusable_text(step: int, epoch: float, bad: list[str], loss: float) -> str:
    """The warning of a snapshot whose value is unusable for some groups."""
    return (
        f"HessianTraceCallback: step {step} (epoch {epoch:.2f}): unusable trace "
        f"for group(s) {bad} (loss {loss:.4g}); written with status "
        "'nonfinite' (trace NaN), 'nonpositive' or 'unreferenced' (after a skipped "
        "reference snapshot), and skipped by the detector (snapshot index "
        "advanced, g+ and g- unchanged)."
    )


def summary_text(steps: list[int], last_values: dict[str, float] | None,
                 detectors: dict[str, PageHinkley], epoch_of, every_n_steps: int,
                 most_groups: int = 6) -> str:
    """The end-of-training line.

    Args:
        steps: the steps of the snapshots this fit took.
        last_values: dict group -> trace at the last snapshot recorded (None: none).
        detectors: dict group -> ``PageHinkley`` (empty: no detector).
        epoch_of: ``f(step) -> epoch`` for an alert's step (None when unknown).
        every_n_steps: the snapshot interval.
        most_groups: groups whose last value is listed (then "...").
    """
    n = len(steps)
    span = f" (steps {steps[0]}..{steps[-1]}, every {every_n_steps})" if n else ""
    parts = [f"HessianTraceCallback: {n} snapshot{'s' if n != 1 else ''} this fit{span}"]
    if last_values:
        groups = [g for g in last_values if g != TOTAL][:most_groups]
        listed = ", ".join(f"{g} {_fmt(last_values[g])}" for g in groups)
        more = ", ..." if len(last_values) - 1 > len(groups) else ""
        parts.append(f"{len(last_values) - 1} group(s) + total; last traces: "
                     f"total {_fmt(last_values[TOTAL])}" + (f", {listed}" if listed else "")
                     + more)
    if not detectors:
        parts.append("no detector")
    else:
        alerted = [(g, d) for g, d in detectors.items() if d.alerted]
        if not alerted:
            worst = max(detectors, key=lambda g: detectors[g].statistic / detectors[g].threshold
                        if detectors[g].threshold > 0 else math.inf)
            d = detectors[worst]
            parts.append(f"no alert on {sorted(detectors)} (closest: {worst!r}, statistic "
                         f"{d.statistic:.3f} of h = {d.threshold:.3f})")
        else:
            said = []
            for g, d in alerted:
                epoch = epoch_of(d.alert_step) if d.alert_step is not None else None
                where = f" (epoch {epoch:.2f})" if epoch is not None else ""
                said.append(f"{g!r} at step {d.alert_step}{where}")
            parts.append("ALERT: " + ", ".join(said))
    return "; ".join(parts) + "."


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def target_missed_text(step: int, epoch: float, result, max_probes: int) -> str:
    """The warning for the first snapshot of a fit that missed ``rel_stderr``."""
    return (f"HessianTraceCallback: the snapshot at step {step} (epoch {epoch:.2f}) did not reach "
            f"rel_stderr={result.rel_stderr_target:g} within max_probes={max_probes} for: {', '.join(result.missed_target)} "
            "(its traces are recorded with their larger stderr; a trace near 0 never meets a relative target). "
            "Later snapshots of this fit are not warned about.")
