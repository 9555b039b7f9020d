"""Run in a fresh process (logical devices must be set before TensorFlow starts):
the same model on one device and under MirroredStrategy over two logical CPUs.

Prints one JSON line with the maximum relative differences.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_hesstrace as kh  # noqa: E402
import models_for_tests as mt  # noqa: E402
from reference import flatten, xent64  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}
    l2 = lambda: mt.mlp(l2=0.03125)  # noqa: E731  (regularisers: counted once, not per replica)
    for name, factory, shape in (("mlp", l2, (5,)), ("cnn_bn", mt.cnn_bn, (6, 6, 2))):
        single = factory()
        with strategy.scope():
            mirrored = factory()
        mirrored.set_weights(single.get_weights())
        x, y = mt.data(n=13, shape=shape)  # 13: uneven shards 6 + 7
        # The model built under the strategy picks it up by itself.
        a = kh.layer_traces(single, x, y, num_probes=4, seed=3, loss=xent64())
        b = kh.layer_traces(mirrored, x, y, num_probes=4, seed=3, loss=xent64())
        out[f"{name}_samples"] = rel(b.samples, a.samples)
        out[f"{name}_loss"] = rel(b.loss, a.loss)
        op = kh.hessian_operator(mirrored, xent64())
        out[f"{name}_distributed"] = op.strategy is not None
        v = [np.random.default_rng(1).normal(size=w.shape) for w in single.trainable_variables]
        for mode in ("reverse", "forward"):
            try:
                hv_b = kh.hvp(mirrored, x, y, v, loss=xent64(), mode=mode)
                hv_a = kh.hvp(single, x, y, v, loss=xent64(), mode=mode)
                out[f"{name}_hvp_{mode}"] = rel(flatten(hv_b), flatten(hv_a))
            except Exception as err:  # reported, and the test fails on it
                out[f"{name}_hvp_{mode}"] = f"{type(err).__name__}: {err}"
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
        c = kh.layer_traces(single, ds, num_probes=2, seed=5, loss=xent64(), verbose=0)
        d = kh.layer_traces(mirrored, ds, num_probes=2, seed=5, loss=xent64(), verbose=0)
        out[f"{name}_dataset"] = rel(d.samples, c.samples)
        # A batch smaller than the replica count leaves one shard empty.
        e = kh.layer_traces(single, x[:1], y[:1], num_probes=2, seed=1, loss=xent64())
        f = kh.layer_traces(mirrored, x[:1], y[:1], num_probes=2, seed=1, loss=xent64())
        out[f"{name}_one_example"] = rel(f.samples, e.samples)
        # max_batch_size under the strategy: chunks of 5, 5, 3, each split over the replicas,
        # in both modes, against the unsplit single-device estimate (a above, forward mode).
        for mode in ("reverse", "forward"):
            g = kh.layer_traces(mirrored, x, y, num_probes=4, seed=3, loss=xent64(), mode=mode,
                                max_batch_size=5)
            out[f"{name}_chunked_{mode}"] = rel(g.samples, a.samples)
    # The training callback inside a fit under the strategy.
    from keras_hesstrace.monitor import HessianTraceCallback

    with strategy.scope():
        model = mt.mlp()
        model.compile(optimizer="sgd", loss=xent64())
    x, y = mt.data(n=16)
    cb = HessianTraceCallback((x, y), every_n_steps=2, num_probes=2, verbose=0)
    history = model.fit(x, y, batch_size=4, epochs=1, callbacks=[cb], verbose=0)
    out["fit_loss_finite"] = bool(np.isfinite(history.history["loss"][-1]))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
