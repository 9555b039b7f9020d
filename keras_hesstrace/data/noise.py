"""Symmetric label noise: each label, with probability ``rate``, becomes another class."""

import numpy as np

from keras_hesstrace._validate import check_integer


def check_noise_rate(rate, name="noise_rate"):
    """``rate`` as a float in [0, 1) (the probability that a label is corrupted), else ValueError."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {rate!r}.") from None
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must lie in [0, 1) (the probability that a label is corrupted), got {rate!r}.")
    return value


def symmetric_label_noise(labels, rate, num_classes, seed):
    """Corrupt labels symmetrically, once, deterministically.

    Each label independently, with probability ``rate``, is replaced by a class drawn
    uniformly from the ``num_classes - 1`` OTHER classes, so a corrupted label always
    differs from its original and the realised corruption rate is Binomial(N, rate) / N.

    Args:
        labels: int array-like of shape [N], classes in ``[0, num_classes)``.
        rate: float in [0, 1), the corruption probability eta.
        num_classes: int >= 2.
        seed: int seed of the ``numpy.random.Generator`` (PCG64); the same seed, labels
            and rate give the same result on every platform.

    Returns:
        (noisy_labels, corrupted): ``noisy_labels`` int64 array [N] (a new array; the input
        is not modified) and ``corrupted`` bool array [N], True where the label changed.

    Raises:
        ValueError: ``rate`` outside [0, 1), ``num_classes`` < 2, labels not a 1-D int
            array or out of range.
    """
    rate_f = check_noise_rate(rate)
    num_classes = check_integer("num_classes", num_classes, minimum=2)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {y.shape}.")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}.")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]."
        )
    rng = np.random.default_rng(seed)
    corrupted = rng.random(y.shape[0]) < rate_f
    # Draw an offset in 1..K-1 and add it modulo K: uniform over the other K-1 classes.
    offsets = rng.integers(1, num_classes, size=y.shape[0])
    noisy = np.where(corrupted, (y + offsets) % num_classes, y)
    return noisy.astype(np.int64), corrupted
