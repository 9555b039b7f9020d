"""ResNets for 32x32 inputs: ResNet-18/34 (CIFAR variants) and PyHessian's ResNet-20..56.

Every model is a functional ``keras.Model`` (channels-last) returning logits. Layer paths
(see :func:`keras_hesstrace.groups.layer_groups`) read::

    stem/conv, stem/bn,
    stage{s}/block{b}/conv1, .../bn1, .../conv2, .../bn2,
    stage{s}/block1/shortcut_conv, stage{s}/block1/shortcut_bn   (projection blocks only)
    head                                                           (the Dense classifier)

so a stage is the pattern ``"stage2/*"`` and the classifier is ``"head"``.
"""

import keras

from keras_hesstrace.models.blocks import (
    batch_norm as _bn,
    check_common,
    conv as _conv,
    kernel_regularizer,
    per_stage,
    submodel,
)


def _basic_block(name, input_shape, filters, stride, *, use_bn, residual, regularizer):
    """One BasicBlock as a nested model: conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) - ReLU.

    The shortcut is the identity when the shape is kept, otherwise a projection: a 1x1
    convolution with ``stride`` (no bias), followed by BN when ``use_bn``. Without
    ``residual`` there is no shortcut at all (a plain two-convolution block).
    Convolutions have no bias, with or without BN (as PyHessian's models).
    """
    in_channels = input_shape[-1]

    def build(x):
        y = _conv(filters, 3, "conv1", strides=stride, use_bias=False, regularizer=regularizer)(x)
        if use_bn:
            y = _bn("bn1")(y)
        y = keras.layers.ReLU(name="relu1")(y)
        y = _conv(filters, 3, "conv2", use_bias=False, regularizer=regularizer)(y)
        if use_bn:
            y = _bn("bn2")(y)
        if residual:
            shortcut = x
            if stride != 1 or in_channels != filters:
                shortcut = _conv(
                    filters, 1, "shortcut_conv", strides=stride, use_bias=False, regularizer=regularizer
                )(x)
                if use_bn:
                    shortcut = _bn("shortcut_bn")(shortcut)
            y = keras.layers.Add(name="add")([y, shortcut])
        return keras.layers.ReLU(name="relu2")(y)

    return submodel(name, input_shape, build)


def _resnet(
    name,
    blocks_per_stage,
    widths,
    *,
    num_classes,
    input_shape,
    weight_decay,
    batch_norm,
    residual,
    stem_batch_norm,
):
    """Stem conv3x3 (+BN) + ReLU, BasicBlock stages, global average pool, Dense head."""
    input_shape = check_common(num_classes, input_shape)
    num_stages = len(blocks_per_stage)
    bn_flags = per_stage(batch_norm, num_stages, "batch_norm")
    res_flags = per_stage(residual, num_stages, "residual")
    stem_bn = bn_flags[0] if stem_batch_norm is None else per_stage(stem_batch_norm, 1, "stem_batch_norm")[0]
    reg = kernel_regularizer(weight_decay)

    def build_stem(x):
        y = _conv(widths[0], 3, "conv", use_bias=False, regularizer=reg)(x)
        if stem_bn:
            y = _bn("bn")(y)
        return keras.layers.ReLU(name="relu")(y)

    inputs = keras.Input(shape=input_shape, name="images")
    x = submodel("stem", input_shape, build_stem)(inputs)
    for s, (n_blocks, width) in enumerate(zip(blocks_per_stage, widths), start=1):
        stage_input_shape = tuple(x.shape[1:])

        def build_stage(h, s=s, n_blocks=n_blocks, width=width):
            for b in range(1, n_blocks + 1):
                stride = 2 if (b == 1 and s > 1) else 1
                block = _basic_block(
                    f"block{b}",
                    tuple(h.shape[1:]),
                    width,
                    stride,
                    use_bn=bn_flags[s - 1],
                    residual=res_flags[s - 1],
                    regularizer=reg,
                )
                h = block(h)
            return h

        x = submodel(f"stage{s}", stage_input_shape, build_stage)(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=reg, name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def resnet18(num_classes=10, input_shape=(32, 32, 3), weight_decay=0.0, *, batch_norm=True, residual=True):
    """ResNet-18, CIFAR variant: 3x3 stem of 64 without max-pool, BasicBlocks [2, 2, 2, 2].

    Widths 64/128/256/512; the first block of stages 2-4 halves the resolution and has a
    projection shortcut (1x1 conv + BN). 11,173,962 trainable parameters for 10 classes,
    as the usual PyTorch CIFAR implementation.

    Args:
        num_classes: int >= 2, outputs of the ``head`` Dense layer (logits, no softmax).
        input_shape: (height, width, channels) of one image, channels-last.
        weight_decay: float >= 0; L2 penalty ``weight_decay / 2 * ||W||^2`` on every conv
            and dense kernel (gradient ``weight_decay * W``, as SGD weight decay), collected
            in ``model.losses``; 0 adds no regulariser. Biases and BN are not decayed.
        batch_norm: bool, or 4 bools (one per stage): BN after each convolution there.
            Convolutions never have a bias. The stem follows stage 1.
        residual: bool, or 4 bools: shortcut connections in that stage's blocks.

    Returns:
        A built functional ``keras.Model`` named ``"resnet18"``
        mapping [batch, H, W, C] float images to [batch, num_classes] logits.
    """
    return _resnet(
        "resnet18", (2, 2, 2, 2), (64, 128, 256, 512),
        num_classes=num_classes, input_shape=input_shape, weight_decay=weight_decay,
        batch_norm=batch_norm, residual=residual, stem_batch_norm=None,
    )


def resnet34(num_classes=10, input_shape=(32, 32, 3), weight_decay=0.0, *, batch_norm=True, residual=True):
    """ResNet-34, CIFAR variant: as :func:`resnet18` with BasicBlocks [3, 4, 6, 3].

    21,282,122 trainable parameters for 10 classes. Arguments and return value as
    :func:`resnet18`; the model is named ``"resnet34"``.
    """
    return _resnet(
        "resnet34", (3, 4, 6, 3), (64, 128, 256, 512),
        num_classes=num_classes, input_shape=input_shape, weight_decay=weight_decay,
        batch_norm=batch_norm, residual=residual, stem_batch_norm=None,
    )


def cifar_resnet(
    depth,
    batch_norm=True,
    residual=True,
    *,
    num_classes=10,
    input_shape=(32, 32, 3),
    weight_decay=0.0,
    stem_batch_norm=None,
):
    """The CIFAR ResNets of PyHessian's study (He et al.'s 6n+2 family): depth 20, 32, 38, 56.

    3x3 stem of 16 channels, three stages of n = (depth - 2) / 6 BasicBlocks of widths
    16/32/64 (stages 2 and 3 start with stride 2), global average pool, Dense head.
    Where a block changes shape its shortcut is a projection (1x1 conv, plus BN when the
    stage has BN): PyHessian's choice ("option B"), not the zero-padded identity of the
    original paper ("option A"), so removing BN or residuals matches PyHessian's models.
    Trainable parameters for 10 classes: ResNet-20 272,474; ResNet-56 855,770.

    Args:
        depth: int, 6n + 2 with n >= 1 (20, 32, 38, 56, ...).
        batch_norm: bool, or 3 bools (one per stage): BN after every convolution of that
            stage, shortcut projection included. ``[True, True, False]`` is "BN removed
            from stage 3". Convolutions never have a bias (as in PyHessian).
        residual: bool, or 3 bools: shortcut connections in that stage's blocks;
            ``[True, False, True]`` is "residual removed from stage 2" (no projection
            convolution there either).
        num_classes: int >= 2, outputs of the ``head`` Dense layer (logits).
        input_shape: (height, width, channels), channels-last.
        weight_decay: float >= 0, as in :func:`resnet18`.
        stem_batch_norm: bool or None: BN after the stem convolution; None follows stage 1's
            ``batch_norm`` flag (so ``batch_norm=False`` removes every BN, as PyHessian's
            ``batch_norm_not=False``).

    Returns:
        A functional ``keras.Model`` named ``f"resnet{depth}"``: images -> logits.

    Raises:
        ValueError: a depth that is not 6n + 2, flags of the wrong length, bad shapes.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 38, 56, ...), got {depth!r}.")
    n = (depth - 2) // 6
    return _resnet(
        f"resnet{depth}", (n, n, n), (16, 32, 64),
        num_classes=num_classes, input_shape=input_shape, weight_decay=weight_decay,
        batch_norm=batch_norm, residual=residual, stem_batch_norm=stem_batch_norm,
    )
