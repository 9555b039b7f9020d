"""What ``HessianTraceCallback`` records and scores, resolved at the start of a fit.

The recorded groups (``resolve_groups``: the model's grouping, less ``"total"``, which
is the callback's name for the total trace), the detector of each
(``resolve_detectors``: from a ``Calibration``, one ``PageHinkley`` or a dict group ->
``PageHinkley``), and the check, before the first step, that the fit does not run past a
detector's baseline (``check_overrun``), and that a ``Calibration`` recording a model
fingerprint was made for the fitted model (``check_calibration_model``). Free functions
of the callback's settings: they keep no state.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from keras_hesstrace._validate import check_integer
from keras_hesstrace.groups import layer_groups, select_groups
from keras_hesstrace.hvp import check_mode
from keras_hesstrace.linalg.adaptive import check_target
from keras_hesstrace.identity import describe_mismatch, model_fingerprint
from keras_hesstrace.monitor.calibration import Calibration
from keras_hesstrace.monitor.csv_log import TOTAL
from keras_hesstrace.monitor.page_hinkley import PageHinkley

if TYPE_CHECKING:
    import keras


def check_arguments(every_n_steps, num_probes, probes_per_call, max_batch_size, seed, mode, rel_stderr, max_probes,
                    detector, on_alert) -> tuple:
    """Validate ``HessianTraceCallback``'s numeric settings, detector and hook before any fit.

    Returns:
        (seed, rel_stderr, max_probes), checked (max_probes defaulted with a target).
    """
    for name, value in (("every_n_steps", every_n_steps), ("num_probes", num_probes),
                        ("probes_per_call", probes_per_call)):
        check_integer(name, value)
    check_integer("max_batch_size", max_batch_size, none="no chunking")
    seed = check_integer("seed", seed, minimum=0, maximum=2**31 - 1)  # seed * 2**32 + step: int64
    check_mode(mode)
    rel_stderr, max_probes = check_target(rel_stderr, max_probes, int(num_probes))
    check_detector(detector)
    if rel_stderr is not None and isinstance(detector, Calibration):
        warnings.warn("rel_stderr with a Calibration detector: the calibration measured its false-alarm rate with a "
                      "fixed probe count, and a target changes each snapshot's noise, so that rate is not promised "
                      "here (calibrate with the same setting, or use num_probes).", UserWarning, stacklevel=3)
    if on_alert is not None and not callable(on_alert):
        raise TypeError("on_alert must be callable.")
    return seed, rel_stderr, max_probes


def check_detector(detector: Calibration | PageHinkley | dict[str, PageHinkley] | None) -> None:
    """Raise ``TypeError`` unless ``detector`` is a kind the callback takes."""
    if detector is not None and not isinstance(detector, (Calibration, PageHinkley, dict)):
        raise TypeError("detector must be None, a Calibration, a PageHinkley, or a dict "
                        "group -> PageHinkley.")


def check_calibration_model(detector, model: keras.Model) -> None:
    """Refuse a ``Calibration`` whose model fingerprint is not ``model``'s.

    Args:
        detector: the callback's ``detector``; anything but a ``Calibration`` with a
            ``model_fingerprint`` passes.
        model: the model being fitted.

    Raises:
        ValueError: naming the variables that differ.
    """
    if not isinstance(detector, Calibration) or detector.model_fingerprint is None:
        return
    difference = describe_mismatch({"model": detector.model_fingerprint},
                                   {"model": model_fingerprint(model)})
    if difference is not None:
        raise ValueError(
            f"detector: the Calibration was made for {difference}, not this model: its "
            "baselines and thresholds describe that model's traces. Calibrate on clean "
            "runs of this model."
        )


def resolve_groups(model: keras.Model, by, groups) -> list[str]:
    """The names of the groups to record (without ``"total"``), in the model's order."""
    mapping = layer_groups(model, by=by)
    if TOTAL in mapping:
        raise ValueError(
            f"A group is named {TOTAL!r}, the name the callback gives the total trace; "
            "rename the layer or use a grouping that avoids the name."
        )
    return list(select_groups(mapping, groups, by))


def resolve_detectors(detector: Calibration | PageHinkley | dict[str, PageHinkley] | None,
                      names: list[str], every_n_steps: int) -> dict[str, PageHinkley]:
    """dict group -> ``PageHinkley`` for the recorded ``names`` (and ``"total"``).

    Args:
        detector: the callback's ``detector`` argument (see ``HessianTraceCallback``).
        names: the recorded groups, without ``"total"``.
        every_n_steps: the callback's snapshot interval (a ``Calibration`` must match).
    """
    recordable = names + [TOTAL]
    if detector is None:
        return {}
    if isinstance(detector, Calibration):
        detector.check_compatible(recordable, every_n_steps)
        return detector.detectors()
    if isinstance(detector, PageHinkley):
        if len(names) != 1:
            raise ValueError(
                f"A single PageHinkley needs exactly one recorded group, got {names}; "
                "pass groups=[...] or a dict group -> PageHinkley."
            )
        return {names[0]: detector}
    unknown = [g for g in detector if g not in recordable]
    if unknown:
        raise ValueError(f"detector groups {unknown} are not recorded; recorded: "
                         f"{recordable}.")
    return dict(detector)


def check_overrun(detectors: dict[str, PageHinkley], params: dict, epoch: int, step: int,
                  last_recorded: int, every_n_steps: int) -> None:
    """Raise before the first step when the fit will outrun a detector's baseline.

    Args:
        detectors: dict group -> ``PageHinkley``; those with ``overrun="error"`` and a
            baseline are checked.
        params: the callback's ``params`` (Keras's ``steps`` per epoch and ``epochs``);
            without both nothing is checked.
        epoch: the epoch the fit starts at.
        step: the optimiser step the fit starts at.
        last_recorded: the step of the last snapshot recorded (-1: none).
        every_n_steps: the snapshot interval.
    """
    steps, epochs = params.get("steps"), params.get("epochs")
    if not steps or not epochs:
        return
    last = step + (int(epochs) - int(epoch)) * int(steps)
    n = every_n_steps
    future = last // n - step // n
    if step % n == 0 and step > last_recorded:
        future += 1
    for g, det in detectors.items():
        if det.baseline is None or det.overrun != "error":
            continue
        final = det.n_updates + future - 1
        if final >= len(det.baseline):
            raise ValueError(
                f"This fit runs to step {last}, snapshot {final} of group {g!r}, past "
                f"its detector's baseline (snapshots 0..{len(det.baseline) - 1}, every "
                f"{n} steps, up to step {(len(det.baseline) - 1) * n}). Calibrate on "
                "longer clean runs, fit fewer epochs, or build the detector with "
                "overrun='hold' (e.g. Calibration.detectors(overrun='hold'))."
            )
