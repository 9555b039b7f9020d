"""The operator under a ``tf.distribute`` strategy: which strategy, and each replica's shard.

Each replica computes the HVP of the mean loss on its shard of the global batch; the
operator all-reduces the results weighted by shard size, so the product equals the
single-device one on the whole batch.
"""

import numpy as np
import tensorflow as tf

from keras_hesstrace.batches import batch_size


def effective_strategy(model, strategy=None):
    """The tf.distribute strategy to run on, or None for the plain single-device path.

    An explicit ``strategy`` wins; otherwise the strategy the model was built under
    (Keras records it). A strategy with one replica in sync is the single-device path.
    """
    if strategy is None:
        strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None or strategy.num_replicas_in_sync == 1:
        return None
    return strategy


def shard_batch(strategy, x, y):
    """Split one global batch across the strategy's replicas (contiguous, nearly equal shards).

    Every worker holds the same global batch and takes its own replicas' slices, so the
    union of the shards is the batch, whatever the number of workers. Returns per-replica
    (x, y, weight) with weight = the shard's example count; a replica left without
    examples (batch smaller than the replica count) gets one example with weight 0.
    """
    n = batch_size(y)

    def value_fn(ctx):
        bounds = np.linspace(0, n, ctx.num_replicas_in_sync + 1).astype(int)
        lo, hi = int(bounds[ctx.replica_id_in_sync_group]), int(bounds[ctx.replica_id_in_sync_group + 1])
        weight = float(hi - lo)
        if hi == lo:
            lo, hi = 0, 1
        xs, ys = tf.nest.map_structure(lambda t: t[lo:hi], (x, y))
        return xs, ys, tf.constant(weight, tf.float64)

    return strategy.experimental_distribute_values_from_function(value_fn)
