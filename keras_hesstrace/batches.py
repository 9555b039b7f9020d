"""One batch as the operator takes it: tensors with a common batch size, and its signature.

The compiled Hessian functions take the batch with the batch dimension left free, so
new batch sizes do not retrace; a vector is checked against the variables it acts on.
"""

import numpy as np
import tensorflow as tf


def to_tensors(x, y):
    """Convert x, y (arrays, tensors or nests of them) to tensors; check batch sizes agree."""
    if y is None:
        raise ValueError("y is required when x is an array or tensor (pass labels, or x as a dataset of (x, y) batches).")
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    y = tf.nest.map_structure(tf.convert_to_tensor, y)
    sizes = {}
    for name, nest in (("x", x), ("y", y)):
        for t in tf.nest.flatten(nest):
            if t.shape.rank == 0:
                raise ValueError(f"{name} holds a scalar; expected a batch with a leading batch dimension.")
            sizes.setdefault(name, set()).add(int(t.shape[0]))
    all_sizes = sizes["x"] | sizes["y"]
    if len(all_sizes) != 1:
        raise ValueError(
            f"x and y must have the same batch size: x has {sorted(sizes['x'])} examples, "
            f"y has {sorted(sizes['y'])}."
        )
    if 0 in all_sizes:
        raise ValueError("The batch is empty (0 examples).")
    return x, y


def batch_signature(x, y):
    """TensorSpecs for x, y with the batch dimension left free (one trace for any batch size)."""

    def spec(t):
        return tf.TensorSpec([None] + list(t.shape[1:]), t.dtype)

    return tf.nest.map_structure(spec, x), tf.nest.map_structure(spec, y)


def signature_key(signature):
    flat = tf.nest.flatten(signature)
    return (str(tf.nest.map_structure(lambda _: 0, signature)),) + tuple((tuple(s.shape.as_list()), s.dtype.name) for s in flat)


def check_vector(variables, vector, name="vector"):
    """Convert ``vector`` to tensors matching ``variables`` one to one; clear errors otherwise."""
    if isinstance(vector, (tf.Tensor, np.ndarray)) or not isinstance(vector, (list, tuple)):
        raise ValueError(
            f"{name} must be a list of {len(variables)} arrays shaped like the variables "
            f"(model.trainable_variables), not a {type(vector).__name__}."
        )
    if len(vector) != len(variables):
        raise ValueError(f"{name} has {len(vector)} entries but there are {len(variables)} trainable variables.")
    out = []
    for i, (v, var) in enumerate(zip(vector, variables)):
        t = tf.convert_to_tensor(v)
        if tuple(t.shape) != tuple(var.shape):
            raise ValueError(
                f"{name}[{i}] has shape {tuple(t.shape)} but variable {var.path} has shape {tuple(var.shape)}."
            )
        out.append(tf.cast(t, var.dtype))
    return out
