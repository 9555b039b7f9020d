"""keras-hesstrace vs PyHessian, same machine, architecture, batch and thread count, one run.

    python benchmarks/vs_pyhessian.py --batch 32 --probes 10

Sets up PyTorch (CPU) and PyHessian in an environment of their own
(benchmarks/.venv-torch, created on first use with `pip install torch==2.13.0 pyhessian`),
writes one random CIFAR-shaped batch to disk, and measures on a CIFAR ResNet-18
(11,173,962 parameters) on both sides:

  one HVP               ours: keras_hesstrace.hvp (default settings);
                        PyHessian: autograd.grad on its retained graph (after its constructor)
  full-model trace      PyHessian's trace() with its defaults (maxIter=100, tol=1e-3, its
                        relative-change stop) incl. its constructor; ours: layer_traces with
                        the same number of probes (its .total is the full trace)
  every layer's trace   ours: layer_traces(num_probes=M), one HVP per probe for all layers;
                        PyHessian: for each layer, freeze the others, build `hessian` and run
                        trace(maxIter=M, tol=-inf) — the route a PyHessian user has

Prints the table and the ratios (targets: our HVP no slower than PyTorch's; our
layer-wise traces >= 10x faster than PyHessian's per-layer route).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from _timing import timed

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".venv-torch")


def ensure_torch_env():
    python = os.path.join(VENV, "bin", "python")
    if not os.path.exists(python):
        print(f"creating {VENV} (PyTorch CPU + PyHessian) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "pyhessian", "numpy"], check=True)
    return python


def ours(npz, reps, warmup, probes, trace_probes):
    import numpy as np
    import tensorflow as tf
    import keras

    import keras_hesstrace as kh
    from keras_hesstrace import models
    from keras_hesstrace.losses import make_objective

    data = np.load(npz)
    x, y = tf.constant(data["x"]), tf.constant(data["y"])
    keras.utils.set_random_seed(0)
    model = models.resnet18(num_classes=10, input_shape=(32, 32, 3))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    out = {"tf": tf.__version__, "keras": keras.__version__, "params": int(sum(np.prod(v.shape) for v in model.trainable_variables))}
    objective = make_objective(model)
    variables = model.trainable_variables

    @tf.function
    def grad(x, y):
        with tf.GradientTape() as tape:
            loss = objective(x, y)
        return tape.gradient(loss, variables)

    out["gradient_s"], _ = timed(lambda: [g.numpy() for g in grad(x, y)], warmup, reps)
    v = [np.random.default_rng(1).choice([-1.0, 1.0], size=w.shape).astype("float32") for w in variables]
    out["hvp_s"], _ = timed(lambda: [h.numpy() for h in kh.hvp(model, x, y, v)], warmup, reps)
    kh.layer_traces(model, x, y, num_probes=1, seed=0)  # trace + compile once, outside the timings
    start = time.perf_counter()
    r = kh.layer_traces(model, x, y, num_probes=trace_probes, seed=1)
    out["trace_s"] = time.perf_counter() - start
    out["trace_value"] = r.total
    start = time.perf_counter()
    r = kh.layer_traces(model, x, y, num_probes=probes, seed=2)
    out["layerwise_s"] = time.perf_counter() - start
    out["layers"] = len(r.groups)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--probes", type=int, default=10, help="probes per layer-wise estimate (M)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-layers", action="store_true", help="skip PyHessian's slow per-layer route")
    parser.add_argument("--json", help="also write both sides' numbers to this file")
    args = parser.parse_args()

    import numpy as np

    python = ensure_torch_env()
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "batch.npz")
        rng = np.random.default_rng(0)
        np.savez(npz, x=rng.normal(size=(args.batch, 32, 32, 3)).astype("float32"), y=rng.integers(0, 10, size=args.batch))
        print("... PyTorch / PyHessian side", file=sys.stderr, flush=True)
        spec = dict(npz=npz, threads=args.threads, reps=args.reps, warmup=args.warmup, probes=args.probes, skip_layers=args.skip_layers)
        proc = subprocess.run([python, os.path.join(HERE, "_pyhessian_worker.py"), json.dumps(spec)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit("the PyHessian worker failed")
        theirs = json.loads(lines[-1][7:])
        print("... keras-hesstrace side", file=sys.stderr, flush=True)
        mine = ours(npz, args.reps, args.warmup, args.probes, theirs["trace_default_probes"])

    print(f"\nCIFAR ResNet-18 ({mine['params']:,} parameters), batch {args.batch}, float32, CPU "
          f"({platform.processor() or platform.machine()}, {args.threads} threads on both sides); "
          f"TF {mine['tf']} / Keras {mine['keras']} (oneDNN {os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'on: package default')}) "
          f"vs PyTorch {theirs['torch']} + PyHessian 0.1; medians of {args.reps} after {args.warmup} warm-ups\n")
    print("| | keras-hesstrace | PyTorch / PyHessian | PyHessian ÷ ours |")
    print("|---|---|---|---|")
    print(f"| one gradient | {mine['gradient_s']:.2f} s | {theirs['gradient_s']:.2f} s | {theirs['gradient_s'] / mine['gradient_s']:.2f}× |")
    print(f"| one HVP (PyHessian: retained graph) | {mine['hvp_s']:.2f} s | {theirs['hvp_retained_s']:.2f} s | {theirs['hvp_retained_s'] / mine['hvp_s']:.2f}× |")
    print(f"| one HVP (PyTorch, graph rebuilt) | | {theirs['hvp_fresh_s']:.2f} s | {theirs['hvp_fresh_s'] / mine['hvp_s']:.2f}× |")
    p = theirs["trace_default_probes"]
    print(f"| full trace, PyHessian defaults ({p} probes) | {mine['trace_s']:.1f} s | {theirs['trace_default_s']:.1f} s | {theirs['trace_default_s'] / mine['trace_s']:.2f}× |")
    if "layerwise_s" in theirs:
        print(f"| all {mine['layers']} layer traces, M={args.probes} | {mine['layerwise_s']:.1f} s | {theirs['layerwise_s']:.1f} s ({theirs['layers']} restricted runs) | **{theirs['layerwise_s'] / mine['layerwise_s']:.1f}×** |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ours": mine, "pyhessian": theirs, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
