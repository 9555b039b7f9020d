"""Mixed precision: compute the curvature of a mixed-policy model in float32.

For a model with a mixed policy (e.g. ``mixed_float16``: float32 variables, float16
compute), ``float32_curvature`` switches every such layer to its variable dtype while
the curvature is computed, so the Hessian is float32 throughout, and switches it back on
exit. The float32 Hessian functions are kept in a cache the caller owns (not in the
model's operator cache, which keeps the model's own-policy functions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from keras_hesstrace.hvp import OPERATOR_CACHE_ATTR


def mixed_precision_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of ``model`` (itself and nested ones) whose compute dtype differs from
    their variable dtype, e.g. under the ``mixed_float16`` policy."""
    out = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer.dtype_policy, keras.dtype_policies.DTypePolicyMap):
            continue  # quantised per-path policies: left as they are
        if layer.compute_dtype != layer.variable_dtype:
            out.append(layer)
    return out


@contextlib.contextmanager
def float32_curvature(model: keras.Model, layers: list[keras.layers.Layer], cache: dict) -> Iterator[None]:
    """Within the block, ``layers`` compute in their variable dtype and ``model``'s
    Hessian operators come from ``cache`` (a dict kept by the caller).

    Keras reads the dtype policy when a function is traced, not when it runs, so
    the operators traced here compute in float32 whatever the policy is later; the
    separate cache keeps them apart from the model's own mixed-precision operators.
    Policies and cache are restored on exit, also when the block raises.
    """
    saved_policies = [(layer, layer.dtype_policy) for layer in layers]
    saved_cache = model.__dict__.get(OPERATOR_CACHE_ATTR)
    object.__setattr__(model, OPERATOR_CACHE_ATTR, cache)
    try:
        for layer, policy in saved_policies:
            layer.dtype_policy = policy.variable_dtype
        yield
    finally:
        for layer, policy in saved_policies:
            layer.dtype_policy = policy
        if saved_cache is None:
            object.__delattr__(model, OPERATOR_CACHE_ATTR)
        else:
            object.__setattr__(model, OPERATOR_CACHE_ATTR, saved_cache)
