"""keras_hesstrace.experiments.early_stop: the offline replay stops where Keras's
EarlyStopping does, on random curves driven through the real callback."""

import itertools
import warnings

import numpy as np
import pytest
import keras

from keras_hesstrace.experiments.early_stop import early_stopping_epoch


class _StandIn:
    """What EarlyStopping touches on the model when restore_best_weights is off."""

    stop_training = False


def keras_stop_epoch(values, patience, min_delta, mode, start_from_epoch, baseline):
    """The real callback fed the values as fit feeds it (Python floats, epochs 0-based)."""
    cb = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                       min_delta=min_delta, mode=mode,
                                       start_from_epoch=start_from_epoch, baseline=baseline)
    model = _StandIn()
    cb.set_model(model)
    cb.on_train_begin()
    for epoch, v in enumerate(values):
        cb.on_epoch_end(epoch, logs={"val_loss": float(v)})
        if model.stop_training:
            return epoch + 1
    return None


def _curve(rng, kind, n):
    if kind == "walk":  # rounded to 0.01: exact ties and steps of exactly min_delta
        return np.round(rng.uniform(0.05, 1.0) + np.cumsum(rng.normal(0, 0.015, n)), 2)
    if kind == "plateau":  # a few levels, each held for several epochs
        levels = np.round(rng.uniform(0.3, 0.7, rng.integers(1, 5)), 2)
        return np.repeat(levels, rng.integers(1, 8, levels.size))[:n]
    if kind == "ties":
        return rng.choice([0.49, 0.5, 0.5, 0.51, 0.52], n)
    if kind == "loss":  # falls, then rises (overfitting), noisy
        t = np.arange(n)
        return 1.0 / (1 + 0.3 * t) + 0.004 * t + rng.normal(0, 0.01, n)
    v = rng.normal(0.5, 0.05, n)  # "nan": a run that diverges at some epoch
    v[rng.integers(0, n):] = np.nan
    return v


SETTINGS = list(itertools.product(range(6), (0.0, 0.01), (0, 2), ("min", "max"),
                                  (False, True)))  # patience, min_delta, start, mode, baseline
KINDS = ("walk", "plateau", "ties", "loss", "nan")


def test_matches_keras_callback_on_random_curves():
    rng = np.random.default_rng(7)
    checked, stopped = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(2 * len(SETTINGS) * len(KINDS) // 2):  # 480 curves, 4 per setting
            patience, min_delta, start, mode, use_base = SETTINGS[i % len(SETTINGS)]
            kind = KINDS[i % len(KINDS)]
            values = _curve(rng, kind, int(rng.integers(1, 30)))
            baseline = (float(np.round(np.nanmean(values[:3]) + rng.normal(0, 0.02), 2))
                        if use_base and not np.all(np.isnan(values[:3])) else None)
            want = keras_stop_epoch(values, patience, min_delta, mode, start, baseline)
            got = early_stopping_epoch(values, patience, min_delta=min_delta, mode=mode,
                                       start_from_epoch=start, baseline=baseline)
            assert got == want, (kind, values.tolist(), patience, min_delta, mode, start,
                                 baseline)
            checked += 1
            stopped += want is not None
    assert checked == 480 and 100 < stopped < 460  # both outcomes well represented


@pytest.mark.parametrize("values, kwargs, expected", [
    ([1.0, 0.8, 0.81, 0.82, 0.79, 0.9], dict(patience=2), 4),
    ([1.0, 0.8, 0.81, 0.82, 0.79, 0.9], dict(patience=3), None),
    ([0.5], dict(patience=0), None),                    # the first epoch never stops
    ([0.5, 0.5], dict(patience=0), 2),                  # a tie is no improvement
    ([0.5, 0.49], dict(patience=0, min_delta=0.01), 2),  # 0.49 + 0.01 < 0.5 is False
    ([0.5, 0.49], dict(patience=0, min_delta=-0.005), None),  # |min_delta| is used
    ([0.5, 0.6, 0.7], dict(patience=0, mode="max"), None),
    ([0.9, 0.9, 0.9, 0.9], dict(patience=1, start_from_epoch=2), 4),  # epochs 1-2 ignored
    ([1.0, 1.0 - 1e-9], dict(patience=0), 2),           # equal in float32, as Keras sees it
    ([0.07, 0.06], dict(patience=0, min_delta=0.01), 2),  # 0.06 + 0.01 < 0.07 in float64 only
    # Improving but never beating the baseline: the counter is not reset, yet an
    # improving epoch never stops training; the first non-improving one does.
    ([0.9, 0.85, 0.8, 0.8], dict(patience=1, baseline=0.5), 4),
    ([0.9, 0.85, 0.8, 0.75], dict(patience=1, baseline=0.5), None),
    ([0.4, 0.45, 0.46], dict(patience=1, baseline=0.5), 2),  # 0.4 beat it: as without
    ([np.nan, 0.5, 0.4], dict(patience=1), 2),          # a NaN best is never beaten
])
def test_hand_cases_agree_with_keras(values, kwargs, expected):
    assert early_stopping_epoch(values, **kwargs) == expected
    full = dict(patience=0, min_delta=0.0, mode="min", start_from_epoch=0, baseline=None)
    full.update(kwargs)
    assert keras_stop_epoch(values, **full) == expected


def test_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        early_stopping_epoch([1.0, 2.0], 1, mode="auto")
    with pytest.raises(ValueError, match="1-D"):
        early_stopping_epoch(np.ones((2, 2)), 1)
    with pytest.raises(ValueError, match="patience"):
        early_stopping_epoch([1.0, 2.0], -1)
    with pytest.raises(ValueError, match="start_from_epoch"):
        early_stopping_epoch([1.0, 2.0], 1, start_from_epoch=-1)
    assert early_stopping_epoch([], 0) is None
