"""Training-time monitoring: the Page-Hinkley alert rule and its calibration.

Public API:
    Baseline, PageHinkley, PageHinkleyResult, page_hinkley_statistics, run_lengths
    calibrate_threshold, Calibration, GroupCalibration
    HessianTraceCallback
"""

from keras_hesstrace.monitor.callback import HessianTraceCallback
from keras_hesstrace.monitor.calibration import (
    Calibration,
    GroupCalibration,
    calibrate_threshold,
)
from keras_hesstrace.monitor.detector import (
    Baseline,
    PageHinkley,
    PageHinkleyResult,
    page_hinkley_statistics,
    run_lengths,
)

__all__ = [
    "Baseline",
    "Calibration",
    "GroupCalibration",
    "HessianTraceCallback",
    "PageHinkley",
    "PageHinkleyResult",
    "calibrate_threshold",
    "page_hinkley_statistics",
    "run_lengths",
]
