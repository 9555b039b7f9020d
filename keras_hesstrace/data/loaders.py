"""Data loaders: CIFAR-10/100 through tensorflow-datasets (never downloading) and the 8x8
digits bundled with scikit-learn, both with optional symmetric label noise.

Both loaders read a whole split into memory once (CIFAR-10 train: 50,000 x 32 x 32 x 3
uint8, 150 MB), inject the noise once on the whole label array, and return a
:class:`LoadedData`: a batched ``tf.data`` pipeline of normalised float32 images and int64
labels, plus the arrays (for the fixed batch a Hessian estimator needs) and which labels
were corrupted.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from keras_hesstrace._validate import check_integer
from keras_hesstrace.data.noise import check_noise_rate, symmetric_label_noise

# Per-channel mean and standard deviation of the training images in [0, 1] (the figures
# commonly published for these sets; used to standardise every split).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_PAD = 4  # pixels of zero padding before the random crop (augment=True)

DIGITS_TEST_FRACTION = 0.221  # 397 of the 1,797 digits -> 1,400 train / 397 test
_DIGITS_SPLIT_SEED = 0  # the train/test partition is fixed: it never depends on `seed`


class DatasetNotPreparedError(FileNotFoundError):
    """A tensorflow-datasets dataset is not prepared in the data directory (nothing is
    downloaded at load time; the message says how to prepare it)."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedData:
    """One split of a dataset, in memory, with its input pipeline.

    Attributes:
        dataset: ``tf.data.Dataset`` of ``(images, labels)`` batches: float32
            [batch, H, W, C] normalised images and int64 [batch] labels (the noisy ones
            where corrupted). Shuffled and augmented as asked; the last batch may be smaller.
        images: uint8 array [N, H, W, C], the raw pixels in split order.
        labels: int64 array [N], the labels the pipeline yields (after noise).
        clean_labels: int64 array [N], the original labels.
        corrupted: bool array [N], True where ``labels != clean_labels`` (all False
            without noise).
        num_classes: int, number of classes.
        num_examples: int, N.
        name: str, the dataset (``"cifar10"``, ``"cifar100"``, ``"digits"``).
        split: str, the split as requested.
        pixel_scale, mean, std: normalisation ``(images * pixel_scale - mean) / std`` with
            float32 ``mean`` and ``std`` of shape [C].
    """

    dataset: tf.data.Dataset
    images: np.ndarray
    labels: np.ndarray
    clean_labels: np.ndarray
    corrupted: np.ndarray
    num_classes: int
    num_examples: int
    name: str
    split: str
    pixel_scale: float
    mean: np.ndarray
    std: np.ndarray

    def normalize(self, images):
        """Raw pixels [..., H, W, C] (uint8) -> normalised float32 of the same shape."""
        x = np.asarray(images, dtype=np.float32) * np.float32(self.pixel_scale)
        return (x - self.mean) / self.std

    def arrays(self):
        """The whole split as numpy: (x float32 [N, H, W, C] normalised, labels int64 [N]).

        Allocates 4 bytes per pixel (600 MB for CIFAR-10 train); for a fixed batch use
        :meth:`fixed_batch`.
        """
        return self.normalize(self.images), self.labels.copy()

    def fixed_batch(self, size, seed=0):
        """A fixed batch for Hessian estimates: ``size`` examples drawn without replacement.

        Args:
            size: int in [1, N].
            seed: int, seed of the ``numpy.random.Generator`` choosing the examples.

        Returns:
            (x, y, index): x float32 [size, H, W, C] normalised images, y int64 [size]
            labels as trained on (noisy where corrupted), index int64 [size] positions in
            the split (``corrupted[index]`` says which of them are noisy).

        Raises:
            ValueError: ``size`` outside [1, N].
        """
        size = check_integer("size", size, 1, self.num_examples)
        index = np.random.default_rng(seed).choice(self.num_examples, size=int(size), replace=False)
        index = index.astype(np.int64)
        return self.normalize(self.images[index]), self.labels[index], index


def _check_batch_size(batch_size):
    return check_integer("batch_size", batch_size)


def _is_test_split(split):
    return split.split("[")[0].strip() == "test"


def _apply_noise(labels, noise_rate, noise_seed, num_classes, split):
    if float(noise_rate) != 0.0 and _is_test_split(split):
        raise ValueError(
            f"noise_rate={noise_rate!r} on the {split!r} split: label noise is for training "
            "data; the test set stays clean."
        )
    return symmetric_label_noise(labels, noise_rate, num_classes, noise_seed)


def pad_crop_flip(image, seed, pad=CIFAR_PAD):
    """The standard CIFAR augmentation of one image, reproducible from a stateless seed.

    Zero-pads ``pad`` pixels on each side, takes a random crop of the original size, then
    a random horizontal flip; crop and flip use the two halves of ``stateless_split(seed)``.

    Args:
        image: [H, W, C] tensor.
        seed: int tensor [2], the example's stateless seed.
        pad: pixels of zero padding per side. Defaults to 4 (``CIFAR_PAD``).

    Returns:
        [H, W, C] tensor, the augmented image (same dtype).
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    size = tuple(image.shape) if image.shape.is_fully_defined() else tf.shape(image)
    image = tf.image.stateless_random_crop(padded, size, seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _pipeline(images, labels, *, pixel_scale, mean, std, batch_size, shuffle, augment, seed):
    """Batched tf.data pipeline: (optional) shuffle, (optional) pad-crop-flip, normalise."""
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    mean_t = tf.constant(mean, tf.float32)
    std_t = tf.constant(std, tf.float32)

    def normalize(image):
        return (tf.cast(image, tf.float32) * pixel_scale - mean_t) / std_t

    if augment:
        # One stateless seed pair per example from a seeded random stream, fresh each epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))

        def augment_fn(example, pair):
            image, label = example
            return normalize(pad_crop_flip(image, pair)), label

        ds = ds.map(augment_fn, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda image, label: (normalize(image), label), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _not_prepared_message(name, builder_dir, data_dir):
    where = data_dir if data_dir is not None else os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return (
        f"{name} is not prepared in the tensorflow-datasets directory {where!s} (looked for "
        f"{builder_dir}). keras-hesstrace never downloads at load time. To prepare it, on a "
        "machine with internet run\n"
        f"    python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"\n"
        f"(or `tfds build {name} --data_dir DIR`; the tfds 4.9 command line needs apache-beam "
        f"installed), then copy DIR/{name} to this machine and pass data_dir=DIR to load_cifar "
        "(or set TFDS_DATA_DIR=DIR)."
    )


def prepared_dataset(name, split, data_dir=None):
    """A tensorflow-datasets split as a ``tf.data.Dataset`` of (image, label), never downloaded.

    The one place the package reads tfds: building the builder object reads no data and
    touches no network (the dataset is defined in tfds's code); ``as_dataset`` fails fast
    when the files are missing, while ``tfds.load`` would try to download and, offline,
    hang for minutes.

    Args:
        name: a tfds dataset name (``"cifar10"``).
        split: a tfds split (``"train"``, ``"test[:512]"``).
        data_dir: the tfds data directory; None: tfds's default.

    Returns:
        ``(builder, dataset)``.

    Raises:
        DatasetNotPreparedError: the dataset is not prepared in ``data_dir`` (the message
            says how to prepare it).
        tfds's own error for a name it does not know.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    try:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except AssertionError:
        if builder.is_prepared():
            raise
        raise DatasetNotPreparedError(_not_prepared_message(name, builder.data_dir, data_dir)) from None
    return builder, ds


def load_cifar(
    name="cifar10",
    split="train",
    data_dir=None,
    batch_size=128,
    noise_rate=0.0,
    noise_seed=0,
    augment=False,
    shuffle=None,
    seed=0,
):
    """CIFAR-10 or CIFAR-100 from a prepared tensorflow-datasets directory.

    Nothing is downloaded: if the dataset is not prepared in ``data_dir`` a
    :class:`DatasetNotPreparedError` saying how to prepare it is raised at once.

    Args:
        name: ``"cifar10"`` or ``"cifar100"`` (fine labels, 100 classes).
        split: a tfds split, ``"train"``, ``"test"`` or a slice such as ``"train[:45000]"``.
        data_dir: the tfds data directory (holding ``cifar10/3.0.2/``); None uses tfds's
            default (``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        batch_size: int >= 1, examples per batch of the pipeline.
        noise_rate: float in [0, 1), symmetric label noise injected once on the split's
            whole label array (see :func:`symmetric_label_noise`); refused (ValueError) on
            a test split.
        noise_seed: int, the noise seed: same seed, same corrupted labels.
        augment: bool, random crop of the image zero-padded by 4 pixels, then a random
            horizontal flip (the standard CIFAR augmentation), freshly drawn every epoch.
        shuffle: bool or None; None shuffles training splits and keeps others in order.
            The shuffle buffer holds the whole split; reshuffled every epoch.
        seed: int, seed of the shuffle and of the augmentation.

    Returns:
        :class:`LoadedData`; images are normalised per channel with the training-set mean
        and standard deviation (``CIFAR_STATS``): ``(pixels / 255 - mean) / std``.

    Raises:
        ValueError: unknown ``name``, bad ``batch_size`` or ``noise_rate``, noise on a
            test split.
        DatasetNotPreparedError: the dataset is not prepared in ``data_dir``.
    """
    if name not in CIFAR_STATS:
        raise ValueError(f"name must be one of {sorted(CIFAR_STATS)}, got {name!r}.")
    batch_size = _check_batch_size(batch_size)
    rate = check_noise_rate(noise_rate)

    import tensorflow_datasets as tfds  # imported here: only the CIFAR path needs it

    builder, ds = prepared_dataset(name, split, data_dir)
    num_classes = int(builder.info.features["label"].num_classes)

    image_chunks, label_chunks = [], []
    for images, labels in tfds.as_numpy(ds.batch(10_000)):
        image_chunks.append(images)
        label_chunks.append(labels)
    if not label_chunks:
        raise ValueError(f"The split {split!r} of {name} is empty.")
    images = np.concatenate(image_chunks).astype(np.uint8, copy=False)
    clean = np.concatenate(label_chunks).astype(np.int64)

    noisy, corrupted = _apply_noise(clean, rate, noise_seed, num_classes, split)
    mean, std = (np.asarray(v, np.float32) for v in CIFAR_STATS[name])
    if shuffle is None:
        shuffle = not _is_test_split(split)
    pipeline = _pipeline(
        images, noisy, pixel_scale=1.0 / 255.0, mean=mean, std=std,
        batch_size=batch_size, shuffle=bool(shuffle), augment=bool(augment), seed=seed,
    )
    return LoadedData(
        dataset=pipeline, images=images, labels=noisy, clean_labels=clean, corrupted=corrupted,
        num_classes=num_classes, num_examples=int(clean.shape[0]), name=name, split=split,
        pixel_scale=1.0 / 255.0, mean=mean, std=std,
    )


def digits_split_indices(test_fraction=DIGITS_TEST_FRACTION, num_examples=1797):
    """The fixed train/test partition of the digits: (train_index, test_index) int64 arrays.

    A permutation drawn once from ``numpy.random.default_rng(0)``; the test part is its
    first ``round(test_fraction * num_examples)`` entries (397 at the default), each part
    sorted. Independent of every other seed, so a train and a test split never overlap.
    """
    f = float(test_fraction)
    n_test = int(round(f * num_examples))
    if not (0.0 < f < 1.0) or not (1 <= n_test < num_examples):
        raise ValueError(f"test_fraction must leave both splits non-empty, got {test_fraction!r}.")
    perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(num_examples)
    return np.sort(perm[n_test:]).astype(np.int64), np.sort(perm[:n_test]).astype(np.int64)


def load_digits(
    split="train",
    batch_size=32,
    noise_rate=0.0,
    noise_seed=0,
    test_fraction=DIGITS_TEST_FRACTION,
    seed=0,
    shuffle=None,
):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), offline.

    The data ship inside scikit-learn (``sklearn.datasets.load_digits``): nothing is
    downloaded. Same return type as :func:`load_cifar`, so a demo can swap the two.

    Args:
        split: ``"train"`` (1,400 images at the default fraction) or ``"test"`` (397).
        batch_size: int >= 1.
        noise_rate: float in [0, 1), symmetric label noise on the training labels (refused
            on ``"test"``), injected once on the split's whole label array.
        noise_seed: int, the noise seed.
        test_fraction: float in (0, 1), share of the 1,797 images in the test split; the
            partition itself is fixed (:func:`digits_split_indices`).
        seed: int, seed of the pipeline's shuffle (not of the partition).
        shuffle: bool or None; None shuffles ``"train"`` only.

    Returns:
        :class:`LoadedData` with uint8 ``images`` of shape [N, 8, 8, 1] holding the raw
        intensities 0..16; the pipeline yields them scaled to [0, 1] (``pixel_scale`` 1/16,
        mean 0, std 1) as float32.

    Raises:
        ValueError: a split other than "train"/"test", bad batch size, rate or fraction,
            noise on the test split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    batch_size = _check_batch_size(batch_size)
    rate = check_noise_rate(noise_rate)
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    all_images = np.rint(bunch.images).astype(np.uint8)[..., None]  # [1797, 8, 8, 1], 0..16
    all_labels = bunch.target.astype(np.int64)
    train_index, test_index = digits_split_indices(test_fraction, len(all_labels))
    index = train_index if split == "train" else test_index
    images, clean = all_images[index], all_labels[index]
    num_classes = 10
    noisy, corrupted = _apply_noise(clean, rate, noise_seed, num_classes, split)
    mean, std = np.zeros(1, np.float32), np.ones(1, np.float32)
    if shuffle is None:
        shuffle = split == "train"
    pipeline = _pipeline(
        images, noisy, pixel_scale=1.0 / 16.0, mean=mean, std=std,
        batch_size=batch_size, shuffle=bool(shuffle), augment=False, seed=seed,
    )
    return LoadedData(
        dataset=pipeline, images=images, labels=noisy, clean_labels=clean, corrupted=corrupted,
        num_classes=num_classes, num_examples=int(len(clean)), name="digits", split=split,
        pixel_scale=1.0 / 16.0, mean=mean, std=std,
    )
