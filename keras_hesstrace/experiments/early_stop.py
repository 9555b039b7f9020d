"""When Keras's EarlyStopping would have stopped a run, from its logged per-epoch values.

:func:`early_stopping_epoch` replays ``keras.callbacks.EarlyStopping`` (Keras 3,
``keras/src/callbacks/early_stopping.py``) on a recorded curve, e.g. the validation loss
of a run trained for a fixed number of epochs, to compare its stopping epoch with the
trace alert's detection epoch without retraining. Pure numpy; no Keras import.

The rule, as Keras applies it at the end of each epoch (0-based index i, value v):

* epochs with i < ``start_from_epoch`` are ignored entirely (no best, no counting);
* otherwise the wait counter goes up by one, then v is compared with the best so far:
  it improves on it if v + |min_delta| < best (``mode="min"``) or v - |min_delta| > best
  (``mode="max"``); the first counted epoch always improves (there is no best yet);
* on an improvement v becomes the best, and the counter goes back to 0 only if v also
  improves on ``baseline`` in the same sense (or there is no baseline); either way the
  epoch ends there, so training never stops on an improving epoch;
* otherwise training stops if the counter is >= ``patience`` (and i > 0).

Keras compares in its float type: the logs ``fit`` passes are Python floats, which
``keras.ops.less`` / ``greater`` turn into ``floatx`` (float32 by default) tensors, after
the shift by min_delta is done in float64. The replay does the same in float32, so values
that differ only beyond float32 precision count as ties, as they do in Keras.
"""

from typing import Optional

import numpy as np

from keras_hesstrace._validate import check_integer


def _improves(value, reference, shift, mode):
    """Keras's improvement test: (value - shift) vs reference, compared in float32."""
    if reference is None:
        return True
    left, right = np.float32(value - shift), np.float32(reference)
    return bool(left < right) if mode == "min" else bool(left > right)


def early_stopping_epoch(values, patience, *, min_delta=0.0, mode="min", start_from_epoch=0,
                         baseline=None) -> Optional[int]:
    """The epoch at which ``keras.callbacks.EarlyStopping`` would stop, or None.

    Same arguments and meaning as ``keras.callbacks.EarlyStopping(monitor=...,
    patience=..., min_delta=..., mode=..., start_from_epoch=..., baseline=...)``; only
    ``mode="auto"`` is not offered (Keras infers it from the metric's name: pass
    ``"min"`` for a loss, ``"max"`` for an accuracy). ``restore_best_weights`` does not
    change when training stops.

    Args:
        values: array [E], float, the monitored quantity after epochs 1..E (units of the
            metric, e.g. validation loss); NaN is allowed and, as in Keras, never improves
            on anything (though a NaN first value becomes the best, and nothing after it
            improves).
        patience: int >= 0, epochs without improvement tolerated.
        min_delta: smallest change that counts as an improvement, in the metric's units;
            its sign is ignored (Keras takes abs).
        mode: ``"min"`` (lower is better) or ``"max"``.
        start_from_epoch: int >= 0, epochs of warm-up not monitored at all (the first
            ``start_from_epoch`` values are skipped).
        baseline: float or None. If given, an improving epoch resets the patience
            counter only if it also beats the baseline (by min_delta).

    Returns:
        The number of epochs trained when training stops: the 1-based epoch at whose end
        ``model.stop_training`` becomes True (an int in 2..E); None if it would not stop
        within the E epochs.

    Raises:
        ValueError: values not 1-D, mode not "min"/"max", negative patience or
            start_from_epoch.

    Example:
        >>> val_loss = [1.00, 0.80, 0.81, 0.82, 0.79, 0.90]
        >>> early_stopping_epoch(val_loss, patience=2)      # 0.80 at epoch 2, then 2 worse
        4
        >>> print(early_stopping_epoch(val_loss, patience=3))
        None
        >>> slow = [1.00, 0.97, 0.95, 0.94]                  # steps below min_delta
        >>> early_stopping_epoch(slow, patience=1, min_delta=0.05), early_stopping_epoch(slow, 1)
        (2, None)
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D (one value per epoch), got shape {v.shape}.")
    if mode not in ("min", "max"):
        raise ValueError(f'mode must be "min" or "max", got {mode!r} (Keras\'s "auto" picks '
                         'from the metric name: "min" for a loss).')
    patience = check_integer("patience", patience, 0)
    start_from_epoch = check_integer("start_from_epoch", start_from_epoch, 0)
    # Keras keeps min_delta signed so that "value - shift" is the value made harder to
    # count as better: +|min_delta| added in min mode, subtracted in max mode.
    shift = -abs(float(min_delta)) if mode == "min" else abs(float(min_delta))
    base = None if baseline is None else float(baseline)

    best = None
    waited = 0
    for epoch in range(start_from_epoch, v.size):  # 0-based, as Keras's epoch argument
        current = float(v[epoch])
        waited += 1
        if _improves(current, best, shift, mode):
            best = current
            if base is None or _improves(current, base, shift, mode):
                waited = 0
            continue
        if waited >= patience and epoch > 0:
            return epoch + 1
    return None
