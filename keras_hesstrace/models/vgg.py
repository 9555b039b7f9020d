"""VGG-11 with BatchNorm for 32x32 inputs (the CIFAR variant).

Layer paths: ``stage{s}/conv{i}``, ``stage{s}/bn{i}`` for the five stages separated by the
max-pools (widths 64 | 128 | 256, 256 | 512, 512 | 512, 512), then ``head``.
"""

import keras

from keras_hesstrace.models.blocks import (
    batch_norm as _bn,
    check_common,
    conv as _conv,
    kernel_regularizer,
    submodel,
)

# Convolution widths per stage; each stage ends with a 2x2 max-pool
# (the configuration [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]).
VGG11_STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def vgg11(num_classes=10, input_shape=(32, 32, 3), weight_decay=0.0):
    """VGG-11 with BN: eight conv3x3 (with bias) - BN - ReLU, five max-pools, flatten, Dense head.

    For 32x32 inputs the last pool leaves 1x1x512, so the head is a single Dense layer of
    512 -> num_classes: 9,231,114 trainable parameters for 10 classes, as the usual PyTorch
    CIFAR implementation. Larger inputs work too: the head then sees
    floor(H/32) * floor(W/32) * 512 features.

    Args:
        num_classes: int >= 2, outputs of the ``head`` Dense layer (logits, no softmax).
        input_shape: (height, width, channels), channels-last; H and W at least 32.
        weight_decay: float >= 0; L2 penalty ``weight_decay / 2 * ||W||^2`` on every conv
            and dense kernel (gradient ``weight_decay * W``), in ``model.losses``; 0 adds none.

    Returns:
        A built functional ``keras.Model`` named ``"vgg11"``: [batch, H, W, C] images ->
        [batch, num_classes] logits.

    Raises:
        ValueError: bad ``num_classes``, ``input_shape`` or ``weight_decay``.
    """
    input_shape = check_common(num_classes, input_shape)
    if input_shape[0] < 32 or input_shape[1] < 32:
        raise ValueError(f"vgg11 has five 2x2 max-pools: input height and width must be >= 32, got {input_shape}.")
    reg = kernel_regularizer(weight_decay)
    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for s, widths in enumerate(VGG11_STAGES, start=1):

        def build_stage(h, widths=widths):
            for i, width in enumerate(widths, start=1):
                h = _conv(width, 3, f"conv{i}", use_bias=True, regularizer=reg)(h)
                h = _bn(f"bn{i}")(h)
                h = keras.layers.ReLU(name=f"relu{i}")(h)
            return keras.layers.MaxPooling2D(2, name="pool")(h)

        x = submodel(f"stage{s}", tuple(x.shape[1:]), build_stage)(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=reg, name="head")(x)
    return keras.Model(inputs, outputs, name="vgg11")
