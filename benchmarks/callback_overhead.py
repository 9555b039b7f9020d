"""Overhead of HessianTraceCallback on a real fit: measured against expected.

The same fit (small_cnn on scikit-learn's bundled digits, SGD, batch 32, 44 steps an
epoch) three ways, each on a fresh model after a one-epoch warm-up fit that traces the
train step (and, with the callback, the Hessian functions):

    plain      no callback
    callback   HessianTraceCallback every --every steps, --probes probes on a fixed
               batch of --probe-batch training images
    idle       HessianTraceCallback with every_n_steps larger than the fit (no snapshot):
               what the callback adds to the steps between snapshots

In the callback run the time spent in snapshots is measured, so the probe time (one HVP
with its share of the snapshot's bookkeeping: CSV row, TensorBoard off) and the step time
come from the same run. Expected overhead = probes x (probe time / step time) / every;
measured overhead = callback time / plain time - 1. Target: measured <= expected + 2%.

Input. ``--input dataset`` (default) feeds the fit a tf.data pipeline built here from the
same arrays (batch 32, prefetch 2, tf.data autotuning off); ``--input arrays`` passes the
numpy arrays to fit, where Keras builds its own pipeline with autotuning on. With
autotuning on, destroying an epoch's iterator waits for tf.data's autotune thread to finish
its current optimisation pass: 0-600 ms at each epoch boundary on 2 cores, in every run
with or without the callback, and more often long after the pauses that snapshots make.
The epoch-boundary time (end of one epoch to the first batch of the next) is reported
apart from the step time so the two effects can be told apart.

    python benchmarks/callback_overhead.py                       # defaults below, ~2-4 min on 2 cores
    python benchmarks/callback_overhead.py --every 11 --probes 10 --probe-batch 256 --epochs 3
"""

import argparse
import os
import platform
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs (44 steps each)")
    parser.add_argument("--every", type=int, default=22, help="every_n_steps")
    parser.add_argument("--probes", type=int, default=5, help="num_probes")
    parser.add_argument("--probe-batch", type=int, default=128, help="examples in the probe batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (all threads of "
                        "this process), steadier when other jobs share the cores")
    parser.add_argument("--input", choices=("dataset", "arrays"), default="dataset",
                        help="dataset: a tf.data pipeline with autotuning off; arrays: numpy "
                        "arrays (Keras's pipeline, autotuning on)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="repeat the three runs, interleaved, and report the medians")
    args = parser.parse_args()

    import keras_hesstrace  # noqa: F401  (sets the oneDNN default before TensorFlow loads)
    import numpy as np
    import tensorflow as tf
    import keras

    from keras_hesstrace.data import load_digits
    from keras_hesstrace.models import small_cnn
    from keras_hesstrace.monitor import HessianTraceCallback

    train = load_digits("train", batch_size=32, seed=args.seed)
    x = (train.images.astype("float32") * train.pixel_scale - train.mean) / train.std
    y = train.labels
    probe_batch = (x[: args.probe_batch], y[: args.probe_batch])
    steps_per_epoch = -(-len(y) // 32)
    steps = args.epochs * steps_per_epoch

    def fit_input():
        if args.input == "arrays":
            return dict(x=x, y=y, batch_size=32, shuffle=False)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).prefetch(2)
        options = tf.data.Options()
        options.autotune.enabled = False
        return dict(x=ds.with_options(options), shuffle=False)

    def fresh_model():
        keras.utils.set_random_seed(args.seed)
        model = small_cnn(num_classes=10)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    class Boundaries(keras.callbacks.Callback):
        """Adds up the time from each epoch's end to the next epoch's first batch.

        Listed after the Hessian callback, so a snapshot taken at an epoch's end is not
        counted here: this is the input pipeline's turnover (new iterator, old one freed).
        """

        def __init__(self):
            super().__init__()
            self.seconds, self._t = 0.0, None

        def on_epoch_end(self, epoch, logs=None):
            self._t = clock()

        def on_train_batch_begin(self, batch, logs=None):
            if self._t is not None:
                self.seconds += clock() - self._t
                self._t = None

    class Timed(HessianTraceCallback):
        """Adds up the wall time spent in snapshots."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.snapshot_seconds = 0.0
            self.snapshots = 0

        def _snapshot(self, step):
            t = clock()
            before = len(self.history)
            super()._snapshot(step)
            self.snapshot_seconds += clock() - t
            self.snapshots += len(self.history) - before

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    tmp = tempfile.mkdtemp(prefix="hesstrace_bench_")

    def callback(every, name):
        return Timed(probe_batch, every_n_steps=every, num_probes=args.probes,
                     csv_path=os.path.join(tmp, name + ".csv"), seed=args.seed, verbose=0)

    def timed_fit(every=None):
        model = fresh_model()
        # The warm-up and the measured fit share the CSV: the measured fit resumes it, so the
        # snapshot at the step they meet (44) is not taken twice.
        name = f"run{every}_{len(os.listdir(tmp))}"
        warm = [callback(every, name)] if every else []
        model.fit(**fit_input(), epochs=1, verbose=0, callbacks=warm)
        hessian = [callback(every, name)] if every else []
        boundaries = Boundaries()
        t = clock()
        model.fit(**fit_input(), epochs=1 + args.epochs, initial_epoch=1, verbose=0,
                  callbacks=hessian + [boundaries])
        return clock() - t, (hessian[0] if hessian else None), boundaries.seconds

    runs = []
    for _ in range(args.repeats):
        plain, _, plain_b = timed_fit()
        with_cb, cb, cb_b = timed_fit(args.every)
        idle, idle_cb, idle_b = timed_fit(10**9)
        assert idle_cb.snapshots == 0
        runs.append((plain, with_cb, idle, cb.snapshot_seconds, cb.snapshots,
                     plain_b, cb_b, idle_b))
        if args.repeats > 1:
            print(f"repeat {len(runs)}: plain {plain:.2f} s, callback {with_cb:.2f} s "
                  f"(snapshots {cb.snapshot_seconds:.2f} s), idle {idle:.2f} s; epoch "
                  f"boundaries {plain_b:.3f} / {cb_b:.3f} / {idle_b:.3f} s", flush=True)
    (plain, with_cb, idle, snap_s, snaps,
     plain_b, cb_b, idle_b) = (float(np.median(c)) for c in zip(*runs))
    cb.snapshot_seconds, cb.snapshots = snap_s, int(snaps)

    step_time_plain = plain / steps
    step_time = (with_cb - cb.snapshot_seconds) / steps  # same run as the probes
    probe_time = cb.snapshot_seconds / (cb.snapshots * args.probes)
    expected = args.probes * (probe_time / step_time) / args.every
    measured = with_cb / plain - 1.0
    idle_overhead = idle / plain - 1.0

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"load average at end {os.getloadavg()[0]:.2f}; TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}, TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}, "
          f"no XLA, float32; clock: {args.clock}")
    print(f"fit: small_cnn ({fresh_model().count_params():,} params) on digits, batch 32, "
          f"{steps} measured steps ({args.epochs} epochs after a 1-epoch warm-up), SGD 0.05 m 0.9; "
          f"input: " + ("tf.data, autotuning off" if args.input == "dataset"
                        else "numpy arrays (Keras's tf.data pipeline, autotuning on)"))
    print(f"callback: every_n_steps={args.every}, num_probes={args.probes}, probe batch "
          f"{args.probe_batch}, {cb.snapshots} snapshots in the measured fit"
          + (f"; medians of {args.repeats} interleaved repeats" if args.repeats > 1 else ""))
    print()
    print(f"| run | {args.clock} s | per step ms | epoch boundaries s |")
    print("|---|---|---|---|")
    print(f"| plain | {plain:.2f} | {1e3 * step_time_plain:.2f} | {plain_b:.3f} |")
    print(f"| callback | {with_cb:.2f} | {1e3 * with_cb / steps:.2f} (snapshots "
          f"{cb.snapshot_seconds:.2f} s) | {cb_b:.3f} |")
    print(f"| idle callback (no snapshot) | {idle:.2f} | {1e3 * idle / steps:.2f} | {idle_b:.3f} |")
    print()
    print(f"step time (callback run, snapshots excluded) {1e3 * step_time:.2f} ms; "
          f"probe time {1e3 * probe_time:.2f} ms = {probe_time / step_time:.2f} steps")
    print(f"expected overhead  probes x probe/step / every = {args.probes} x "
          f"{probe_time / step_time:.3f} / {args.every} = {100 * expected:.1f}%")
    print(f"measured overhead  callback / plain - 1 = {100 * measured:.1f}%  "
          f"(target <= expected + 2%: {'met' if measured <= expected + 0.02 else 'NOT met'})")
    print(f"idle callback vs plain: {100 * idle_overhead:+.1f}% "
          f"({1e3 * (idle - plain) / steps:+.2f} ms a step; run-to-run noise on a shared machine)")


if __name__ == "__main__":
    main()
