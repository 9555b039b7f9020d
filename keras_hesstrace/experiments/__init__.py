"""Experiments: the memorisation experiment of the method paper (§5) and the offline demo.

Public API:
    ExperimentConfig, PRESETS, preset      the experiment's settings
    run_experiment(config, out)            Phase I + calibration + Phase II + summary, resumable
    summarize(config, out)                 the Table-1 summary and plots from finished runs
    plan(config)                           runs, optimiser steps and HVPs the config costs
    run_demo(out, ...)                     the README's offline demo on the bundled digits
"""

from keras_hesstrace.experiments.memorisation import (
    PRESETS,
    ExperimentConfig,
    plan,
    preset,
    run_experiment,
    summarize,
)
from keras_hesstrace.experiments.demo import run_demo

__all__ = ["ExperimentConfig", "PRESETS", "preset", "plan", "run_experiment", "summarize",
           "run_demo"]
