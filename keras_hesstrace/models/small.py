"""A small CNN for the 8x8 digits that ship with scikit-learn (the offline demo's model)."""

import keras

from keras_hesstrace.models.blocks import check_common, conv, kernel_regularizer


def small_cnn(num_classes=10, input_shape=(8, 8, 1), weight_decay=0.0):
    """conv3x3 32 - ReLU - conv3x3 64 - ReLU - flatten - Dense 128 - ReLU - Dense head.

    No pooling and no BatchNorm: with 544,522 trainable parameters for 8x8x1 inputs and
    10 classes it memorises noisy labels of the 1,400 training digits within a few dozen
    epochs (the measurement in docs/tensorflow-notes.md §7 used this architecture).

    Args:
        num_classes: int >= 2, outputs of the ``head`` Dense layer (logits, no softmax).
            Defaults to 10.
        input_shape: (height, width, channels), channels-last. Defaults to (8, 8, 1).
        weight_decay: float >= 0; L2 penalty ``weight_decay / 2 * ||W||^2`` on every conv
            and dense kernel (gradient ``weight_decay * W``), in ``model.losses``; 0 adds none.

    Returns:
        A built functional ``keras.Model`` named ``"small_cnn"`` with layers ``conv1``,
        ``conv2``, ``flatten``, ``dense``, ``head``: images -> [batch, num_classes] logits.

    Raises:
        ValueError: bad ``num_classes``, ``input_shape`` or ``weight_decay``.
    """
    input_shape = check_common(num_classes, input_shape)
    reg = kernel_regularizer(weight_decay)
    inputs = keras.Input(shape=input_shape, name="images")
    x = conv(32, 3, "conv1", use_bias=True, regularizer=reg)(inputs)
    x = keras.layers.ReLU(name="relu1")(x)
    x = conv(64, 3, "conv2", use_bias=True, regularizer=reg)(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", kernel_regularizer=reg, name="dense")(x)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=reg, name="head")(x)
    return keras.Model(inputs, outputs, name="small_cnn")
