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
    parser.add_argument("--repeats", type=int, default=1,
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

    def fresh_model():
        keras.utils.set_random_seed(args.seed)
        model = small_cnn(num_classes=10)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

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
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=warm)
        cbs = [callback(every, name)] if every else []
        t = clock()
        model.fit(x, y, batch_size=32, epochs=1 + args.epochs, initial_epoch=1, shuffle=False,
                  verbose=0, callbacks=cbs)
        return clock() - t, (cbs[0] if cbs else None)

    runs = []
    for _ in range(args.repeats):
        plain, _ = timed_fit()
        with_cb, cb = timed_fit(args.every)
        idle, idle_cb = timed_fit(10**9)
        assert idle_cb.snapshots == 0
        runs.append((plain, with_cb, idle, cb.snapshot_seconds, cb.snapshots))
        if args.repeats > 1:
            print(f"repeat {len(runs)}: plain {plain:.2f} s, callback {with_cb:.2f} s "
                  f"(snapshots {cb.snapshot_seconds:.2f} s), idle {idle:.2f} s", flush=True)
    plain, with_cb, idle, snap_s, snaps = (float(np.median(c)) for c in zip(*runs))
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
          f"{steps} measured steps ({args.epochs} epochs after a 1-epoch warm-up), SGD 0.05 m 0.9")
    print(f"callback: every_n_steps={args.every}, num_probes={args.probes}, probe batch "
          f"{args.probe_batch}, {cb.snapshots} snapshots in the measured fit"
          + (f"; medians of {args.repeats} interleaved repeats" if args.repeats > 1 else ""))
    print()
    print(f"| run | {args.clock} s | per step ms |")
    print("|---|---|---|")
    print(f"| plain | {plain:.2f} | {1e3 * step_time_plain:.2f} |")
    print(f"| callback | {with_cb:.2f} | {1e3 * with_cb / steps:.2f} (snapshots {cb.snapshot_seconds:.2f} s) |")
    print(f"| idle callback (no snapshot) | {idle:.2f} | {1e3 * idle / steps:.2f} |")
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
