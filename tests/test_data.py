"""Label noise, the CIFAR loader (tfds mocked, offline) and the bundled 8x8 digits.

scipy is used for the binomial interval and the chi-square test: it is installed with
scikit-learn (a dependency of the package), not a dependency of its own.
"""

import socket
import threading
import time
import traceback

import numpy as np
import pytest
from scipy import stats

from keras_hesstrace.data import (
    CIFAR_STATS,
    DatasetNotPreparedError,
    digits_split_indices,
    load_cifar,
    load_digits,
    symmetric_label_noise,
)

import tensorflow_datasets as tfds  # a declared dependency: a missing one must fail, not skip


def binomial_interval(n, p, level=0.999):
    """Central interval of Binomial(n, p) holding at least ``level`` of the mass."""
    alpha = (1 - level) / 2
    return stats.binom.ppf(alpha, n, p), stats.binom.ppf(1 - alpha, n, p)


# ---------------------------------------------------------------- symmetric_label_noise


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.4, 0.6, 0.9])
def test_realised_rate_in_binomial_interval(rate):
    labels = np.random.default_rng(123).integers(0, 10, size=20_000)
    noisy, corrupted = symmetric_label_noise(labels, rate, 10, seed=7)
    lo, hi = binomial_interval(labels.size, rate)
    assert lo <= corrupted.sum() <= hi
    assert corrupted.dtype == bool and noisy.dtype == np.int64
    assert noisy.shape == corrupted.shape == labels.shape


def test_corrupted_labels_always_differ_and_others_are_kept():
    labels = np.random.default_rng(0).integers(0, 10, size=50_000)
    noisy, corrupted = symmetric_label_noise(labels, 0.5, 10, seed=1)
    assert np.all(noisy[corrupted] != labels[corrupted])
    assert np.all(noisy[~corrupted] == labels[~corrupted])
    np.testing.assert_array_equal(corrupted, noisy != labels)
    assert noisy.min() >= 0 and noisy.max() <= 9


def test_new_classes_uniform_over_the_other_classes_chi_square():
    k = 10
    labels = np.random.default_rng(5).integers(0, k, size=200_000)
    noisy, corrupted = symmetric_label_noise(labels, 0.4, k, seed=11)
    for c in range(k):  # for each original class: uniform over the other k - 1
        new = noisy[corrupted & (labels == c)]
        counts = np.bincount(new, minlength=k)
        assert counts[c] == 0
        p = stats.chisquare(np.delete(counts, c)).pvalue
        assert p > 1e-3, (c, counts, p)
    # CIFAR-100: the offset (new - old) mod 100 is uniform on 1..99.
    labels = np.random.default_rng(6).integers(0, 100, size=300_000)
    noisy, corrupted = symmetric_label_noise(labels, 0.5, 100, seed=12)
    offsets = (noisy[corrupted] - labels[corrupted]) % 100
    counts = np.bincount(offsets, minlength=100)
    assert counts[0] == 0
    assert stats.chisquare(counts[1:]).pvalue > 1e-3


def test_rate_zero_changes_nothing():
    labels = np.arange(100) % 10
    noisy, corrupted = symmetric_label_noise(labels, 0.0, 10, seed=3)
    np.testing.assert_array_equal(noisy, labels)
    assert not corrupted.any()
    noisy[0] = 5  # a copy, not a view of the input
    assert labels[0] == 0


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_rates_outside_0_1_are_refused(rate):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        symmetric_label_noise(np.zeros(10, int), rate, 10, seed=0)


@pytest.mark.parametrize(
    "labels, num_classes, match",
    [
        (np.array([0, 10]), 10, "lie in"),
        (np.array([-1, 2]), 10, "lie in"),
        (np.zeros((2, 3), int), 10, "1-D"),
        (np.array([0.5, 1.0]), 10, "integers"),
        (np.array([0, 1]), 1, "num_classes"),
    ],
)
def test_bad_labels_are_refused(labels, num_classes, match):
    with pytest.raises(ValueError, match=match):
        symmetric_label_noise(labels, 0.2, num_classes, seed=0)


def test_noise_is_deterministic_per_seed():
    labels = np.random.default_rng(0).integers(0, 10, size=1000)
    before = labels.copy()
    a = symmetric_label_noise(labels, 0.3, 10, seed=42)
    b = symmetric_label_noise(labels, 0.3, 10, seed=42)
    c = symmetric_label_noise(labels, 0.3, 10, seed=43)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    np.testing.assert_array_equal(labels, before)


# ---------------------------------------------------------------- load_cifar (mocked tfds)


def _batches(data):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in data.dataset])
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_load_cifar_shapes_dtypes_and_normalisation(name, classes):
    with tfds.testing.mock_data(num_examples=40):
        data = load_cifar(name, split="train", batch_size=16, shuffle=False)
    assert data.num_examples == 40 and data.num_classes == classes
    assert data.images.shape == (40, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.corrupted.shape == (40,)
    assert not data.corrupted.any()
    np.testing.assert_array_equal(data.labels, data.clean_labels)
    x, y = _batches(data)
    assert x.shape == (40, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int64
    first = next(iter(data.dataset))[0]
    assert first.shape == (16, 32, 32, 3)
    mean, std = CIFAR_STATS[name]
    expected = (data.images.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x, expected, atol=1e-5)
    np.testing.assert_array_equal(y, data.labels)
    xa, ya = data.arrays()
    np.testing.assert_allclose(xa, x, atol=1e-6)
    np.testing.assert_array_equal(ya, y)


def test_load_cifar_noise_mask():
    n = 2000
    with tfds.testing.mock_data(num_examples=n):
        data = load_cifar("cifar10", batch_size=500, noise_rate=0.4, noise_seed=3)
        again = load_cifar("cifar10", batch_size=500, noise_rate=0.4, noise_seed=3)
        with pytest.raises(ValueError, match="test set stays clean"):
            load_cifar("cifar10", split="test", noise_rate=0.2)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            load_cifar("cifar10", noise_rate=1.0)
        with pytest.raises(ValueError, match="name"):
            load_cifar("cifar11")
    assert data.corrupted.shape == (n,)
    lo, hi = binomial_interval(n, 0.4)
    assert lo <= data.corrupted.sum() <= hi
    np.testing.assert_array_equal(data.corrupted, data.labels != data.clean_labels)
    np.testing.assert_array_equal(data.corrupted, again.corrupted)
    np.testing.assert_array_equal(data.labels, again.labels)
    # The pipeline yields the noisy labels (shuffled: compare the multisets).
    _, y = _batches(data)
    np.testing.assert_array_equal(np.sort(y), np.sort(data.labels))
    x, yb, index = data.fixed_batch(64, seed=1)
    assert x.shape == (64, 32, 32, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(yb, data.labels[index])
    np.testing.assert_array_equal(index, data.fixed_batch(64, seed=1)[2])


def test_load_cifar_augment_is_a_shifted_or_flipped_crop():
    with tfds.testing.mock_data(num_examples=12):
        data = load_cifar("cifar10", batch_size=12, augment=True, shuffle=False, seed=4)
        same = load_cifar("cifar10", batch_size=12, augment=True, shuffle=False, seed=4)
    x = next(iter(data.dataset))[0].numpy()
    np.testing.assert_array_equal(x, next(iter(same.dataset))[0].numpy())
    assert not np.array_equal(x, next(iter(data.dataset))[0].numpy())  # redrawn each epoch
    assert x.shape == (12, 32, 32, 3) and np.isfinite(x).all()
    pixels = np.rint((x * data.std + data.mean) * 255).astype(np.int64)  # back to 0..255
    padded = np.pad(data.images.astype(np.int64), ((0, 0), (4, 4), (4, 4), (0, 0)))
    moved = 0
    for i in range(12):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if np.array_equal(
                pixels[i],
                (lambda c: c[:, ::-1] if flip else c)(padded[i, dy:dy + 32, dx:dx + 32]),
            )
        ]
        assert matches, f"image {i} is not a flipped/shifted crop of its padded original"
        moved += (4, 4, False) not in matches
    assert moved >= 6  # 162 equally likely crops: almost all differ from the original


def test_load_cifar_unprepared_raises_at_once_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_cifar tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    outcome = {}

    def call(name, data_dir):
        start = time.perf_counter()
        try:
            load_cifar(name, data_dir=str(data_dir))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome[name] = (e, time.perf_counter() - start)

    for name, data_dir in [("cifar10", tmp_path), ("cifar100", tmp_path / "missing")]:
        thread = threading.Thread(target=call, args=(name, data_dir), daemon=True)
        thread.start()
        thread.join(timeout=60)  # a download attempt would hang ~200 s: never wait for it
        assert not thread.is_alive(), "load_cifar did not return within 60 s"
        error, seconds = outcome[name]
        assert isinstance(error, DatasetNotPreparedError), repr(error)
        assert seconds < 30
        message = str(error)
        assert name in message and str(data_dir) in message
        assert "download_and_prepare" in message and "data_dir=DIR" in message
        assert error.__suppress_context__  # no chained tfds traceback
        frames = traceback.extract_tb(error.__traceback__)
        assert len(frames) <= 3 and "tensorflow_datasets" not in "".join(f.filename for f in frames)


# ---------------------------------------------------------------- load_digits


def test_load_digits_shapes_and_splits():
    train = load_digits("train", batch_size=32)
    test = load_digits("test", batch_size=32)
    assert (train.num_examples, test.num_examples) == (1400, 397)
    assert train.images.shape == (1400, 8, 8, 1) and test.images.shape == (397, 8, 8, 1)
    assert train.num_classes == test.num_classes == 10
    x, y = next(iter(train.dataset))
    assert x.shape == (32, 8, 8, 1) and x.dtype.name == "float32" and y.dtype.name == "int64"
    xa, ya = train.arrays()
    assert xa.min() == 0.0 and xa.max() == 1.0 and xa.dtype == np.float32
    assert set(np.unique(ya)) == set(range(10))
    tr, te = digits_split_indices()
    assert np.intersect1d(tr, te).size == 0 and np.union1d(tr, te).size == 1797
    from sklearn.datasets import load_digits as sk_digits

    sk = sk_digits()
    np.testing.assert_array_equal(train.clean_labels, sk.target[tr])
    np.testing.assert_allclose(test.images[..., 0], sk.images[te])
    x_all, y_all = _batches(test)  # test: not shuffled, in split order
    np.testing.assert_allclose(x_all[..., 0], sk.images[te] / 16.0, atol=1e-7)
    np.testing.assert_array_equal(y_all, sk.target[te])


def test_load_digits_is_deterministic():
    a, b = load_digits(seed=0), load_digits(seed=0)
    np.testing.assert_array_equal(a.images, b.images)
    xa, ya = next(iter(a.dataset))
    xb, yb = next(iter(b.dataset))
    np.testing.assert_array_equal(xa.numpy(), xb.numpy())
    np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    c = load_digits(seed=1)
    np.testing.assert_array_equal(a.images, c.images)  # same split whatever the seed
    assert not np.array_equal(next(iter(c.dataset))[1].numpy(), ya.numpy())  # other order


def test_load_digits_noise():
    data = load_digits(noise_rate=0.4, noise_seed=2)
    lo, hi = binomial_interval(1400, 0.4)
    assert lo <= data.corrupted.sum() <= hi
    assert np.all(data.labels[data.corrupted] != data.clean_labels[data.corrupted])
    np.testing.assert_array_equal(data.labels[~data.corrupted], data.clean_labels[~data.corrupted])
    np.testing.assert_array_equal(data.labels, load_digits(noise_rate=0.4, noise_seed=2).labels)
    assert not np.array_equal(data.labels, load_digits(noise_rate=0.4, noise_seed=3).labels)
    assert not load_digits(noise_rate=0.0).corrupted.any()
    with pytest.raises(ValueError, match="test set stays clean"):
        load_digits("test", noise_rate=0.2)
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")
    with pytest.raises(ValueError, match="batch_size"):
        load_digits(batch_size=0)


def test_digits_train_small_cnn_end_to_end():
    import keras

    from keras_hesstrace.models import small_cnn

    keras.utils.set_random_seed(0)
    train, test = load_digits("train", batch_size=32), load_digits("test", batch_size=128)
    model = small_cnn()
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train.dataset, epochs=2, verbose=0, shuffle=False)  # the pipeline shuffles
    _, accuracy = model.evaluate(test.dataset, verbose=0)
    assert accuracy > 0.8  # ~0.9+ after two epochs; chance is 0.1
