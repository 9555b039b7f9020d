"""The callback's TensorBoard summaries, in the run ``keras.callbacks.TensorBoard`` writes to.

Everything is written under ``log_dir/train`` at x = the optimiser step, the x axis of
Keras's own ``batch_*`` scalars (``keras.callbacks.TensorBoard(update_freq=<int>)``);
Keras's ``epoch_*`` scalars are at x = the epoch index. Tags (docs/monitoring.md,
"TensorBoard tags"):

- ``hessian_trace/<group>``: the trace (left out when not finite);
- ``hessian_trace_detector/<group>``: the detector's statistic max(g+, g-);
- ``hessian_trace_threshold/<group>``: its threshold h (alert when the statistic > h);
- ``hessian_trace_alerts`` (text): one line per first alert of a group, at its step;
- a custom-scalars layout (written once per writer): one chart per detector group
  with its statistic and h, under the category "Hessian trace detector".

Every scalar carries a description (TensorBoard shows it beside the chart).
"""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING

import tensorflow as tf

if TYPE_CHECKING:
    from keras_hesstrace.monitor.page_hinkley import PageHinkley

TRACE_TAG = "hessian_trace/{}"
DETECTOR_TAG = "hessian_trace_detector/{}"
THRESHOLD_TAG = "hessian_trace_threshold/{}"
ALERT_TAG = "hessian_trace_alerts"
LAYOUT_CATEGORY = "Hessian trace detector"

_TRACE_TEXT = ("Hutchinson estimate of the trace of the Hessian block of group {!r} "
               "(HessianTraceCallback), at x = optimiser step.")
_DETECTOR_TEXT = ("Page-Hinkley statistic max(g+, g-) of group {!r} after the snapshot at x "
                  "= optimiser step; the detector alerts when it exceeds "
                  "hessian_trace_threshold/{}.")
_THRESHOLD_TEXT = ("Threshold h of the Page-Hinkley detector of group {!r} (constant): "
                   "the alert fires when hessian_trace_detector/{} exceeds it.")
_ALERT_TEXT = "HessianTraceCallback's alerts: one line per group's first alert, at its step."


def check_tensorboard() -> None:
    """Raise ``ImportError`` unless the ``tensorboard`` package is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ImportError(
            "log_dir needs the tensorboard package (pip install tensorboard): "
            "without it TensorFlow silently writes no scalars."
        ) from None


def detector_layout(groups: list[str]):
    """The custom-scalars layout (a ``tensorboard`` ``Layout`` proto): one chart per
    detector group, its statistic and threshold h on the same axes."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    charts = [
        layout_pb2.Chart(
            title=f"{g}: statistic and threshold h",
            multiline=layout_pb2.MultilineChartContent(
                tag=[f"^{re.escape(DETECTOR_TAG.format(g))}$",
                     f"^{re.escape(THRESHOLD_TAG.format(g))}$"]),
        )
        for g in groups
    ]
    return layout_pb2.Layout(category=[layout_pb2.Category(title=LAYOUT_CATEGORY, chart=charts)])


def alert_text(group: str, step: int, epoch: float, statistic: float, threshold: float) -> str:
    """The alert's one line, as the callback prints it and TensorBoard shows it."""
    return (f"HessianTraceCallback: alert on group {group!r} at step {step} "
            f"(epoch {epoch:.2f}): statistic {statistic:.3f} > h = {threshold:.3f}.")


class TensorBoardScalars:
    """Summaries in ``log_dir/train``; the writer is made at the first write, not before."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._writer = None
        self._layout_written = False

    def _open(self, detectors):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        if detectors and not self._layout_written:
            from tensorboard.plugins.custom_scalar import summary as custom_scalar

            pb = custom_scalar.pb(detector_layout(list(detectors)))
            with self._writer.as_default(step=0):
                tf.summary.experimental.write_raw_pb(pb.SerializeToString(), step=0)
            self._layout_written = True

    def write(self, step: int, values: dict[str, float], detectors: dict[str, PageHinkley]) -> None:
        """Traces (dict group -> value; non-finite ones left out) and each detector's
        statistic and threshold h (dict group -> PageHinkley), flushed."""
        self._open(detectors)
        with self._writer.as_default(step=step):
            for g, value in values.items():
                if math.isfinite(value):
                    tf.summary.scalar(TRACE_TAG.format(g), value, description=_TRACE_TEXT.format(g))
            for g, det in detectors.items():
                tf.summary.scalar(DETECTOR_TAG.format(g), det.statistic,
                                  description=_DETECTOR_TEXT.format(g, g))
                tf.summary.scalar(THRESHOLD_TAG.format(g), det.threshold,
                                  description=_THRESHOLD_TEXT.format(g, g))
        self._writer.flush()

    def write_alert(self, step: int, text: str) -> None:
        """The alert's line as a text summary at ``step`` (no smoothing smears it)."""
        self._open({})
        with self._writer.as_default(step=step):
            tf.summary.text(ALERT_TAG, text, description=_ALERT_TEXT)
        self._writer.flush()

    def close(self) -> None:
        """Close the writer, if one was made; a later write makes a new one (and the
        layout is not written again)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
