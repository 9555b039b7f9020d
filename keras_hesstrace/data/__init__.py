"""Datasets for the experiments: CIFAR-10/100 via tensorflow-datasets (offline, never
downloading), scikit-learn's bundled 8x8 digits, and symmetric label noise."""

from keras_hesstrace.data.loaders import (
    CIFAR_STATS,
    DatasetNotPreparedError,
    LoadedData,
    digits_split_indices,
    load_cifar,
    load_digits,
)
from keras_hesstrace.data.noise import symmetric_label_noise

__all__ = [
    "symmetric_label_noise",
    "load_cifar",
    "load_digits",
    "digits_split_indices",
    "LoadedData",
    "DatasetNotPreparedError",
    "CIFAR_STATS",
]
