"""Shared pieces of the model builders: regularisers, layers with PyTorch-like defaults,
per-stage flags and nested sub-models that give layers their structured paths.

Keras refuses "/" in layer names, so structure comes from nesting: every stage (and every
residual block) is a small functional ``keras.Model`` named ``stage2`` (``block1``), and a
leaf layer's path, as :func:`keras_hesstrace.groups.layer_groups` builds it by joining the
names of nested layers with "/", reads ``stage2/block1/conv2``.
"""

import math
from collections.abc import Sequence

import keras
import numpy as np

# PyTorch's BatchNorm2d defaults (running average weight 0.1 on the new batch, eps 1e-5),
# so the models behave like the reference implementations the parameter counts come from.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def kernel_regularizer(weight_decay):
    """L2 penalty whose gradient is ``weight_decay * W`` (the SGD weight-decay convention).

    Args:
        weight_decay: float >= 0, the decay coefficient lambda. The penalty added to the
            loss is ``lambda / 2 * sum(W**2)`` per kernel, so its gradient ``lambda * W``
            equals what ``torch.optim.SGD(weight_decay=lambda)`` adds for that kernel, and
            its Hessian is ``lambda * I``. ``keras.regularizers.L2(l2)`` penalises
            ``l2 * sum(W**2)``, hence ``l2 = lambda / 2``.

    Returns:
        A ``keras.regularizers.L2`` or ``None`` when ``weight_decay`` is 0.

    Raises:
        ValueError: negative or non-finite ``weight_decay``.
    """
    wd = float(weight_decay)
    if not (math.isfinite(wd) and wd >= 0.0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}.")
    if wd == 0.0:
        return None
    return keras.regularizers.L2(wd / 2.0)


def check_common(num_classes, input_shape):
    """Validate ``num_classes`` (int >= 2) and ``input_shape`` ((H, W, C) of positive ints)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive ints "
            f"(channels-last), got {input_shape!r}."
        )
    return tuple(int(d) for d in shape)


def per_stage(flag, num_stages, what):
    """Broadcast one bool, or check a sequence of one bool per stage.

    Args:
        flag: a bool, or a sequence of ``num_stages`` bools.
        num_stages: int, the number of stages.
        what: the argument's name, for error messages.

    Returns:
        A tuple of ``num_stages`` Python bools.

    Raises:
        ValueError: a sequence of the wrong length, or entries that are not bools.
    """
    if isinstance(flag, Sequence) and not isinstance(flag, (str, bytes)):
        flags = tuple(flag)
        if len(flags) != num_stages:
            raise ValueError(
                f"{what} must be one bool or a list of {num_stages} bools (one per stage), "
                f"got {len(flags)} entries: {flag!r}."
            )
    else:
        flags = (flag,) * num_stages
    for f in flags:
        if not isinstance(f, (bool, np.bool_)):
            raise ValueError(f"{what} entries must be bools, got {f!r} in {flag!r}.")
    return tuple(bool(f) for f in flags)


def conv(filters, kernel_size, name, *, strides=1, use_bias, regularizer):
    """A 'same'-padded Conv2D with He-normal kernels."""
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=use_bias,
        kernel_initializer="he_normal",
        kernel_regularizer=regularizer,
        name=name,
    )


def batch_norm(name):
    """BatchNormalization with PyTorch's defaults (momentum 0.1 in PyTorch's sense, eps 1e-5)."""
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def submodel(name, input_shape, build):
    """A functional ``keras.Model`` named ``name`` mapping one input to ``build(input)``.

    Args:
        name: the sub-model's name (a path component: ``"stage2"``, ``"block1"``).
        input_shape: shape of one example, without the batch axis.
        build: callable taking the symbolic input tensor and returning the output tensor.

    Returns:
        The sub-model; call it on a tensor to nest it in an enclosing model.
    """
    inputs = keras.Input(shape=tuple(input_shape), name=f"{name}_input")
    return keras.Model(inputs, build(inputs), name=name)
