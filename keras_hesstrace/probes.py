"""Random probe vectors shaped like a list of variables, from stateless seeds.

Every variable gets its own stream (the probe seed folded with the variable's index):
drawing all variables from one seed correlates their probes and biases the estimate.
"""

import tensorflow as tf

PROBES = ("rademacher", "gaussian")


def check_probe(probe):
    """Raise ValueError unless ``probe`` names a supported distribution."""
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, not {probe!r}.")


def draw_probe(variables, seed, probe="rademacher", streams=None):
    """Draw one probe vector v with E[v v^T] = I over all ``variables``.

    Args:
        variables: sequence of variables (or anything with ``.shape`` and ``.dtype``).
        seed: int tensor of shape [2], the stateless seed of this probe.
        probe: ``"rademacher"`` (i.i.d. ±1, the minimum-variance choice) or
            ``"gaussian"`` (i.i.d. N(0, 1)).
        streams: each variable's stream number (default 0, 1, ...: its position in
            ``variables``). Passing the variables' indices in ``model.trainable_variables``
            makes a block's probe the whole model's probe restricted to the block.

    Returns:
        list of tensors, one per variable, with its shape and dtype.
    """
    streams = range(len(variables)) if streams is None else list(streams)
    if len(streams) != len(variables):
        raise ValueError(f"streams has {len(streams)} entries for {len(variables)} variables.")
    out = []
    for i, var in zip(streams, variables):
        s = tf.random.experimental.stateless_fold_in(seed, i)
        dtype = tf.as_dtype(var.dtype)
        if probe == "rademacher":
            bits = tf.random.stateless_uniform(var.shape, s, minval=0, maxval=2, dtype=tf.int32)
            out.append(tf.cast(2 * bits - 1, dtype))
        else:
            out.append(tf.random.stateless_normal(var.shape, s, dtype=dtype))
    return out


def probe_seed(seed, index):
    """Stateless seed [2] (int64) of probe number ``index`` under the base ``seed``."""
    return tf.constant([int(seed), int(index)], dtype=tf.int64)
