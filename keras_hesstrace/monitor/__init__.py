"""Training-time monitoring: the Page-Hinkley alert rule and its calibration.

Public API:
    Baseline, PageHinkley, PageHinkleyResult, page_hinkley_statistics, run_lengths
    calibrate_threshold, Calibration, GroupCalibration
    HessianTraceCallback

Modules: baseline (Baseline, the transform, the reference snapshot), page_hinkley (the
rule), calibration (calibrate_threshold: h for a per-run false-alarm probability or an
in-control ARL), conformal (the per-run rule), resampling (leave-one-out z, block
bootstrap, ARL0), calibration_result (Calibration, GroupCalibration and the calibration
file), callback (HessianTraceCallback) with callback_setup (its groups and detectors),
snapshot_scoring (a snapshot's CSV rows and alerts), csv_log, tensorboard_log,
snapshot_data and precision.
"""

from keras_hesstrace.monitor.baseline import Baseline
from keras_hesstrace.monitor.callback import HessianTraceCallback
from keras_hesstrace.monitor.calibration import (
    Calibration,
    GroupCalibration,
    calibrate_threshold,
)
from keras_hesstrace.monitor.page_hinkley import (
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
