"""Experiments: the memorisation experiment of the method paper (§5) and the offline demo.

Public API:
    ExperimentConfig, PRESETS, preset      the experiment's settings
    run_experiment(config, out)            Phase I + calibration + Phase II + summary, resumable
    summarize(config, out)                 the Table-1 summary and plots from finished runs
    plan(config)                           runs, optimiser steps and HVPs the config costs
    run_demo(out, ...)                     the README's offline demo on the bundled digits
    StudyConfig, study_preset, study_plan  PyHessian's architecture study: settings and cost
    run_study(config, out)                 the study: train, measure, summarise, resumable

Modules of the memorisation experiment:
    config      ExperimentConfig, the presets, the run grid (RunSpec, run_specs, plan)
    storage     the output folder: layout, atomic writes, checkpoints, the trace CSVs
    training    one run: its data, model, training with the trace callback, resuming
    scoring     the alert rule on the stored trajectories: calibration, detections
    recording   what a run records beside its traces (probe loss, gradient norms,
                per-epoch losses and accuracies, memorisation): trajectory.json
    baselines   first-order baselines calibrated like the curvature rule; what a stop is worth
    early_stop  Keras EarlyStopping replayed on a logged curve
    comparison  the side-by-side table of the curvature rule and the baselines
    report      summary.csv / summary.md / detections.csv / comparison.csv and the plots
    runner      run_experiment: the protocol, run by run, resumable
"""

import importlib as _importlib

from keras_hesstrace.experiments.config import PRESETS, ExperimentConfig, plan, preset
from keras_hesstrace.experiments.study_config import StudyConfig, study_plan, study_preset

# The settings (config) need no TensorFlow: the command line builds its flags from them in a
# fraction of a second. What trains, scores and reports is imported on first use (PEP 562).
_LAZY = {
    "summarize": "keras_hesstrace.experiments.report",
    "run_experiment": "keras_hesstrace.experiments.runner",
    "run_demo": "keras_hesstrace.experiments.demo",
    "run_study": "keras_hesstrace.experiments.study",
}


def __getattr__(name):
    if name in _LAZY:
        from keras_hesstrace import _backend

        _backend.check_backend()
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = ["ExperimentConfig", "PRESETS", "preset", "plan", "run_experiment", "summarize",
           "run_demo", "StudyConfig", "study_preset", "study_plan", "run_study"]
