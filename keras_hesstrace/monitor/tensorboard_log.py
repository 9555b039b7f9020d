"""The callback's TensorBoard scalars, as ``keras.callbacks.TensorBoard`` writes them."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import tensorflow as tf

if TYPE_CHECKING:
    from keras_hesstrace.monitor.page_hinkley import PageHinkley


def check_tensorboard() -> None:
    """Raise ``ImportError`` unless the ``tensorboard`` package is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ImportError(
            "log_dir needs the tensorboard package (pip install tensorboard): "
            "without it TensorFlow silently writes no scalars."
        ) from None


class TensorBoardScalars:
    """Scalars in ``log_dir/train``; the writer is made at the first write, not before."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._writer = None

    def write(self, step: int, values: dict[str, float], detectors: dict[str, PageHinkley]) -> None:
        """Traces (dict group -> value; non-finite ones left out) and each detector's
        statistic and alert flag (dict group -> PageHinkley), flushed."""
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        with self._writer.as_default(step=step):
            for g, value in values.items():
                if math.isfinite(value):
                    tf.summary.scalar(f"hessian_trace/{g}", value)
            for g, det in detectors.items():
                tf.summary.scalar(f"hessian_trace_detector/{g}", det.statistic)
                tf.summary.scalar(f"hessian_trace_alert/{g}", float(det.alerted))
        self._writer.flush()

    def close(self) -> None:
        """Close the writer, if one was made; a later write makes a new one."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
