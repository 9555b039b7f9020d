"""Batches and datasets as every estimator takes them, and the one loop over a dataset.

- :func:`resolve_data` decides whether ``x, y`` is one batch or a dataset (one rule for
  every estimator and the callback);
- :func:`iterate_batches` walks a dataset's (x, y) batches, :func:`weighted_mean` averages
  a per-batch quantity over them weighted by batch size (the mean over all examples
  for a mean-reduced loss), :func:`split_batch` cuts one batch into chunks;
- :func:`to_tensors` and :func:`batch_signature`: one batch as tensors with a common
  batch size, and its signature with the batch dimension left free, so that the
  compiled Hessian functions do not retrace for new batch sizes;
- :func:`check_vector`: a vector checked against the variables it acts on.
"""

import numpy as np
import tensorflow as tf
import keras

from keras_hesstrace._validate import check_integer


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


def _is_array(obj):
    """One model input or target: an array, tensor or dict of them (not a sequence of them)."""
    return isinstance(obj, (dict, np.ndarray, keras.KerasTensor)) or tf.is_tensor(obj) or hasattr(obj, "__array__")


def _is_sequence(obj):
    return isinstance(obj, (tuple, list))


def _right_calls(caller):
    return (
        f"pass one batch as {caller}(model, x, y) or {caller}(model, (x, y)), several as a list "
        f"{caller}(model, [(x1, y1), (x2, y2)]) or a tf.data.Dataset of (x, y) batches"
    )


def resolve_data(x, y=None, caller="f"):
    """Decide whether ``x, y`` is ONE batch or a dataset: the one place every estimator asks.

    The rules (``y`` omitted):
      - a ``tf.data.Dataset``, or a list of (x, y) batches (or any other iterable, such as
        a generator): the dataset mode;
      - a tuple (or list) of exactly two elements whose first is an array, tensor or dict,
        or whose second is one (``(x, y)``, ``((xa, xb), y)``): one batch, as if given as
        ``x, y``;
      - a tuple of two sequences (``((xa, xb), (ya, yb))``, which is also two (x, y)
        batches) is ambiguous and refused: pass ``x, y`` separately or a list of batches;
      - one array, or a tuple of 1 or 3+ arrays (``(x,)``, ``(x, y, sample_weight)``):
        refused with the right call.

    With ``y`` given, ``x`` is one batch's inputs (never a dataset).

    Args:
        x: inputs of one batch, an ``(x, y)`` tuple, a ``tf.data.Dataset`` or a list of
            (x, y) batches.
        y: targets of the batch, or ``None``.
        caller: the function's name, used in the error messages.

    Returns:
        ``(x, y, dataset)``: for one batch its inputs and targets and ``False``; in the
        dataset mode ``(x, None, True)``.

    Raises:
        ValueError: for the ambiguous and incomplete forms above, or a dataset with ``y``.
    """
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError(
                f"y must be omitted when x is a tf.data.Dataset (it yields the (x, y) batches): "
                f"call {caller}(model, dataset)."
            )
        return x, None, True
    if y is not None:
        return x, y, False
    if _is_array(x):
        raise ValueError(f"y is missing: x is one batch of inputs; {_right_calls(caller)}.")
    if not _is_sequence(x):
        if hasattr(x, "__iter__"):
            return x, None, True  # a generator or other iterable of (x, y) batches
        raise ValueError(f"x must be a batch or a dataset, not a {type(x).__name__}: {_right_calls(caller)}.")
    if len(x) == 0:
        raise ValueError(f"x is an empty {type(x).__name__}: {_right_calls(caller)}.")
    if len(x) == 2:
        first, second = x
        if _is_array(first) or (_is_array(second) and _is_sequence(first)):
            return first, second, False
        if isinstance(x, tuple) and _is_sequence(first) and _is_sequence(second):
            raise ValueError(
                f"x is a tuple of two sequences, which reads as one batch (x, y) of a model with several "
                f"inputs and outputs and as two (x, y) batches: for one batch call {caller}(model, x, y) "
                f"with x and y separately; for two batches pass a list {caller}(model, [(x1, y1), (x2, y2)])."
            )
        return x, None, True
    if _is_array(x[0]):
        kind = type(x).__name__
        what = (f"a {kind} of one array and no y" if len(x) == 1 else
                f"a {kind} of 3 arrays (x, y, sample weights? they are not supported)" if len(x) == 3 else
                f"a {kind} of {len(x)} arrays and no y")
        raise ValueError(f"x is {what}: {_right_calls(caller)}.")
    return x, None, True


def is_dataset(x, y):
    """True when ``(x, y)`` is the dataset mode by :func:`resolve_data`'s rules (which may refuse it)."""
    return resolve_data(x, y)[2]


def iterate_batches(data, num_batches=None):
    """Yield (x, y) batches from a dataset or iterable, checking their structure.

    Args:
        data: ``tf.data.Dataset`` or iterable of (x, y) batches.
        num_batches: the number of batches to take (``None``: all; required for an
            infinite dataset).
    """
    num_batches = check_integer("num_batches", num_batches, none="all")
    if isinstance(data, tf.data.Dataset):
        if num_batches is None and data.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ValueError("The dataset is infinite: pass num_batches.")
        if num_batches is not None:
            data = data.take(int(num_batches))
    count = 0
    for element in data:
        if num_batches is not None and count >= int(num_batches):
            break
        if not isinstance(element, (tuple, list)) or len(element) != 2:
            n = len(element) if isinstance(element, (tuple, list)) else 1
            raise ValueError(
                f"Each batch must be an (x, y) pair; got {n} element(s)"
                + (" (sample weights are not supported)" if n == 3 else "")
                + ". For one batch pass x, y (or the tuple (x, y)); for several, a list of (x, y) "
                "tuples or a tf.data.Dataset of them."
            )
        count += 1
        yield element[0], element[1]
    if count == 0:
        raise ValueError("The dataset yielded no batches.")



def split_batch(x, y, max_batch_size=None):
    """Consecutive chunks of at most ``max_batch_size`` examples of one (x, y) batch.

    Args:
        x, y: tensors (or nests of tensors) with the same leading batch dimension n.
        max_batch_size: chunk size, or ``None`` for the whole batch.

    Returns:
        list of (x_chunk, y_chunk), ceil(n / max_batch_size) of them; all full but
        the last.
    """
    n = batch_size(y)
    if max_batch_size is None or n <= max_batch_size:
        return [(x, y)]
    size = int(max_batch_size)
    return [tf.nest.map_structure(lambda t: t[lo:lo + size], (x, y)) for lo in range(0, n, size)]


def batch_size(y):
    """The number of examples in a batch, from its targets (a tensor or nest of them)."""
    return int(tf.nest.flatten(y)[0].shape[0])


def check_reiterable(data, caller):
    """Refuse a one-shot iterator (a generator): ``caller`` passes over the data several times."""
    if not isinstance(data, tf.data.Dataset) and iter(data) is data:
        raise ValueError(
            f"x is a one-shot iterator (a generator?): {caller} passes over the data more than once; "
            "pass a tf.data.Dataset or a list of (x, y) batches."
        )


def weighted_mean(fn, data, num_batches=None):
    """The mean of ``fn(x, y)`` over a dataset's batches, weighted by batch size.

    For a per-batch quantity that is a mean over the batch's examples (the loss, its
    gradient, H·v of a mean-reduced loss) this is the same quantity over all examples.

    Args:
        fn: ``(x, y) -> value``, the value a float, an array or a list of arrays/tensors.
        data: a ``tf.data.Dataset`` or iterable of (x, y) batches.
        num_batches: batches to use (``None``: all).

    Returns:
        the weighted mean, with ``fn``'s structure (lists stay lists, of numpy arrays or
        tensors as ``fn`` returns them).
    """
    total, count = None, 0
    for xb, yb in iterate_batches(data, num_batches):
        xb, yb = to_tensors(xb, yb)
        n = batch_size(yb)
        value = fn(xb, yb)
        scaled = [n * v for v in value] if isinstance(value, (list, tuple)) else n * value
        if total is None:
            total = scaled
        elif isinstance(scaled, list):
            total = [a + b for a, b in zip(total, scaled)]
        else:
            total = total + scaled
        count += n
    return [t / count for t in total] if isinstance(total, list) else total / count
