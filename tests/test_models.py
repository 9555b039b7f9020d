"""Model builders: exact parameter counts, a few training steps, per-stage flags, names."""

import numpy as np
import pytest

import keras
import tensorflow as tf

from keras_hesstrace import layer_groups
from keras_hesstrace import models


def n_trainable(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def leaf_layers(model, prefix=""):
    """[(path, layer)] of every non-model layer, paths joined with '/' through sub-models."""
    out = []
    for layer in model.layers:
        path = f"{prefix}/{layer.name}" if prefix else layer.name
        if isinstance(layer, keras.Model):
            out.extend(leaf_layers(layer, path))
        elif not isinstance(layer, keras.layers.InputLayer):
            out.append((path, layer))
    return out


@pytest.fixture(scope="module")
def resnet20():
    return models.cifar_resnet(20)


# The standard figures of the PyTorch reference implementations (10 classes); ResNet-20/56
# are PyHessian's models (projection shortcuts), computed by hand in the docstring.
@pytest.mark.parametrize(
    "build, expected",
    [
        (models.resnet18, 11_173_962),
        (models.resnet34, 21_282_122),
        (models.vgg11, 9_231_114),
        (lambda: models.cifar_resnet(20), 272_474),
        (lambda: models.cifar_resnet(56), 855_770),
        (models.small_cnn, 544_522),
    ],
    ids=["resnet18", "resnet34", "vgg11", "resnet20", "resnet56", "small_cnn"],
)
def test_trainable_parameter_counts(build, expected):
    assert n_trainable(build()) == expected


def test_resnet20_count_by_hand(resnet20):
    # stem 3*16*9 + BN 2*16; stage 1: 3 blocks of two 16->16 convs + 2 BN;
    # stages 2, 3: projection block (conv s, conv, 1x1 shortcut, 3 BN) + 2 plain blocks; head.
    stem = 3 * 16 * 9 + 32
    stage1 = 3 * (2 * 16 * 16 * 9 + 2 * 32)

    def stage(c_in, c):
        first = c_in * c * 9 + c * c * 9 + c_in * c + 3 * 2 * c
        return first + 2 * (2 * c * c * 9 + 2 * 2 * c)

    head = 64 * 10 + 10
    assert n_trainable(resnet20) == stem + stage1 + stage(16, 32) + stage(32, 64) + head


def test_num_classes_and_input_shape():
    m = models.resnet18(num_classes=100)
    assert n_trainable(m) == 11_173_962 + 512 * 90 + 90
    assert m.output_shape == (None, 100)
    m = models.cifar_resnet(32, num_classes=7, input_shape=(16, 16, 1))
    assert m.output_shape == (None, 7)
    assert models.vgg11(num_classes=100).output_shape == (None, 100)
    assert models.small_cnn(num_classes=3).output_shape == (None, 3)


def _train_steps(model, x, y, steps=3, lr=1e-3, momentum=0.0):
    """Eager SGD steps (no tracing: fast for a tiny batch); returns the losses."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
            if model.losses:
                loss = loss + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        assert all(g is not None for g in grads)
        opt.apply(grads, model.trainable_variables)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.resnet18(weight_decay=5e-4),
        lambda: models.resnet34(),
        lambda: models.vgg11(weight_decay=5e-4),
        lambda: models.cifar_resnet(20, weight_decay=5e-4),
        lambda: models.cifar_resnet(20, batch_norm=False, residual=False),
        lambda: models.cifar_resnet(56, batch_norm=[True, True, False], residual=[True, False, True]),
    ],
    ids=["resnet18", "resnet34", "vgg11", "resnet20", "resnet20-plain-noBN", "resnet56-mixed"],
)
def test_trains_a_few_steps_with_finite_loss(build):
    # A small learning rate: residual stages without BN (He init, as PyHessian) amplify
    # activations about 2x in variance per block (ResNet-56 logits ~1e3-1e4 at init).
    model = build()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    y = np.array([3, 7])
    losses = _train_steps(model, x, y, steps=2)
    assert np.all(np.isfinite(losses))
    out = model(x, training=False)
    assert out.shape == (2, 10) and np.all(np.isfinite(out))


def test_small_cnn_memorises_a_tiny_batch():
    keras.utils.set_random_seed(0)
    model = models.small_cnn()
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(8, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=8)  # arbitrary labels: only memorisation fits them
    losses = _train_steps(model, x, y, steps=30, lr=0.05, momentum=0.9)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.1 * losses[0]


def test_weight_decay_is_half_lambda_squared_norm_on_kernels():
    wd = 5e-4
    model = models.cifar_resnet(20, weight_decay=wd)
    kernels = [v for v in model.trainable_variables if v.name == "kernel"]
    assert len(kernels) == 19 + 2 + 1  # 19 3x3 convs, 2 shortcuts, the head
    assert len(model.losses) == len(kernels)
    expected = wd / 2 * sum(float(tf.reduce_sum(tf.square(k))) for k in kernels)
    np.testing.assert_allclose(float(tf.add_n(model.losses)), expected, rtol=1e-5)
    for build in (models.resnet18, models.vgg11, models.small_cnn):
        assert build(weight_decay=0.0).losses == []
    with pytest.raises(ValueError, match="weight_decay"):
        models.small_cnn(weight_decay=-1.0)


def test_layer_paths_show_the_structure(resnet20):
    names = list(layer_groups(resnet20))
    assert names[:2] == ["stem/conv", "stem/bn"]
    assert names[-1] == "head"
    for name in [
        "stage1/block1/conv1",
        "stage2/block1/conv2",
        "stage2/block1/bn1",
        "stage2/block1/shortcut_conv",
        "stage2/block1/shortcut_bn",
        "stage3/block3/bn2",
    ]:
        assert name in names
    assert "stage1/block1/shortcut_conv" not in names  # identity: shape kept
    assert len(names) == 1 + 1 + 3 * 3 * 4 + 2 * 2 + 1
    assert isinstance(resnet20.get_layer("head"), keras.layers.Dense)

    vgg = list(layer_groups(models.vgg11()))
    assert vgg[:2] == ["stage1/conv1", "stage1/bn1"]
    assert "stage3/conv2" in vgg and "stage5/bn2" in vgg and vgg[-1] == "head"
    assert list(layer_groups(models.small_cnn())) == ["conv1", "conv2", "dense", "head"]


def test_stage_patterns_give_stage_groups(resnet20):
    groups = layer_groups(resnet20, {"stem/*": "stem", "stage1/*": "stage1", "stage2*": "stage2",
                                     "stage3/*": "stage3", "head": "head"})
    assert list(groups) == ["stem", "stage1", "stage2", "stage3", "head"]
    total = sum(int(np.prod(v.shape)) for vs in groups.values() for v in vs)
    assert total == n_trainable(resnet20)  # a partition of every trainable variable
    stage2 = sum(int(np.prod(v.shape)) for v in groups["stage2"])
    assert stage2 == (16 * 32 * 9 + 32 * 32 * 9 + 16 * 32 + 3 * 64) + 2 * (2 * 32 * 32 * 9 + 2 * 64)
    # One pattern for "stage 2", identical whether written stage2/* or stage2*.
    alt = layer_groups(resnet20, {"stage2/*": "s2"})
    assert [id(v) for v in alt["s2"]] == [id(v) for v in groups["stage2"]]
    blocks = layer_groups(resnet20, {"stage3/block1/*": "first", "stage3/*": "rest"})
    assert len(blocks["first"]) == 3 + 3 * 2  # 3 conv kernels, 3 BN x (gamma, beta)


def test_per_stage_batch_norm_flags():
    model = models.cifar_resnet(20, batch_norm=[True, True, False])
    paths = [(p, l) for p, l in leaf_layers(model)]
    bn = [p for p, l in paths if isinstance(l, keras.layers.BatchNormalization)]
    assert bn and not any(p.startswith("stage3/") for p in bn)
    assert any(p.startswith("stage2/") for p in bn) and "stem/bn" in bn
    assert "stage3/block1/shortcut_conv" in [p for p, _ in paths]  # residual kept
    # Removing BN from stage 3 removes 2 * (7 BN layers of 64 channels) parameters.
    assert n_trainable(models.cifar_resnet(20)) - n_trainable(model) == 7 * 2 * 64

    none = models.cifar_resnet(20, batch_norm=False)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for _, l in leaf_layers(none))
    stem_only = models.cifar_resnet(20, batch_norm=False, stem_batch_norm=True)
    assert [p for p, l in leaf_layers(stem_only) if isinstance(l, keras.layers.BatchNormalization)] == ["stem/bn"]


def test_per_stage_residual_flags():
    model = models.cifar_resnet(20, residual=[True, False, True])
    paths = [p for p, _ in leaf_layers(model)]
    adds = [p for p, l in leaf_layers(model) if isinstance(l, keras.layers.Add)]
    assert len(adds) == 6 and not any(p.startswith("stage2/") for p in adds)
    assert "stage2/block1/shortcut_conv" not in paths and "stage3/block1/shortcut_conv" in paths
    full = models.cifar_resnet(20)
    assert n_trainable(full) - n_trainable(model) == 16 * 32 + 2 * 32
    plain = models.cifar_resnet(20, residual=False)
    assert not any(isinstance(l, keras.layers.Add) for _, l in leaf_layers(plain))


def test_resnet18_34_structure():
    names18 = list(layer_groups(models.resnet18()))
    assert names18.count("head") == 1 and "stage4/block2/conv2" in names18
    assert sum(n.endswith("shortcut_conv") for n in names18) == 3
    assert sum("conv" in n.split("/")[-1] for n in names18) == 1 + 16 + 3  # stem, 8 blocks x 2, 3 shortcuts
    names34 = list(layer_groups(models.resnet34()))
    assert "stage3/block6/conv2" in names34 and "stage3/block7/conv1" not in names34


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=21), "6n"),
        (dict(depth=2), "6n"),
        (dict(depth=20, batch_norm=[True, False]), "one per stage"),
        (dict(depth=20, residual=[1, 1, 1]), "bools"),
        (dict(depth=20, num_classes=1), "num_classes"),
        (dict(depth=20, input_shape=(32, 32)), "input_shape"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.cifar_resnet(**kwargs)
