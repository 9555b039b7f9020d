"""Cost of one HVP and of one layer-wise probe, as ratios to one gradient, with peak memory.

Measures on a CIFAR ResNet-18 (11,173,962 parameters) at batch 128, float32, each operation
in its own process (so its peak RSS is its own), the median of --reps repetitions after
--warmup warm-up calls (the first call traces and compiles):

    gradient            one gradient of the loss (tf.function), with and without XLA
    hvp reverse/forward one HVP, reverse-over-reverse / forward-over-reverse, with and without XLA
    layer_traces probe  one probe of layer_traces: every layer's sample from one HVP
    masked, all groups  the alternative: one HVP per group with the probe zero outside it

Prints the table (markdown) and the ratios HVP/gradient and masked/single-pass.

    python benchmarks/hvp_cost.py                      # the full run (about 15-25 min on 2 CPU cores)
    python benchmarks/hvp_cost.py --batch 32 --reps 3  # a quicker look
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _timing import timed

OPS = [
    ("gradient", {"jit": False}),
    ("gradient", {"jit": True}),
    ("hvp", {"mode": "reverse", "jit": False}),
    ("hvp", {"mode": "forward", "jit": False}),
    ("hvp", {"mode": "reverse", "jit": True}),
    ("hvp", {"mode": "forward", "jit": True}),
    ("probe", {"jit": False}),
    ("probe", {"jit": False, "mode": "forward"}),
    ("probe", {"jit": False, "chunk": 64}),
    ("probe", {"jit": False, "mode": "forward", "chunk": 64}),
    ("probe", {"jit": False, "per_call": 2, "chunk": 64}),
    ("probe", {"jit": False, "per_call": 4}),
    ("probe", {"jit": True}),
    ("masked", {"jit": False}),
]


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _setup(batch, arch):
    import numpy as np
    import keras

    import keras_hesstrace as kh  # noqa: F401  (sets the oneDNN default before TF loads)
    from keras_hesstrace import models

    keras.utils.set_random_seed(0)
    model = getattr(models, arch)(num_classes=10, input_shape=(32, 32, 3))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch)
    return model, x, y


def worker(op, opts, batch, warmup, reps, arch):
    import numpy as np
    import tensorflow as tf

    import keras_hesstrace as kh
    from keras_hesstrace.batches import to_tensors
    from keras_hesstrace.hvp import hessian_operator
    from keras_hesstrace.losses import make_objective

    model, x, y = _setup(batch, arch)
    xt, yt = to_tensors(x, y)
    rss_model = _peak_rss_mb()
    variables = model.trainable_variables
    jit = opts.get("jit", False)
    extra = {}
    if op == "gradient":
        objective = make_objective(model)

        @tf.function(jit_compile=jit)
        def grad(x, y):
            with tf.GradientTape() as tape:
                loss = objective(x, y)
            return tape.gradient(loss, variables)

        fn = lambda: [g.numpy() for g in grad(xt, yt)]  # noqa: E731
    elif op == "hvp":
        rng = np.random.default_rng(1)
        v = [rng.choice([-1.0, 1.0], size=w.shape).astype("float32") for w in variables]
        fn = lambda: [h.numpy() for h in kh.hvp(model, xt, yt, v, mode=opts["mode"], jit_compile=jit)]  # noqa: E731
    elif op == "probe":
        counter = iter(range(10**6))
        per_call = opts.get("per_call", 1)

        def fn():
            kh.layer_traces(model, xt, yt, num_probes=per_call, seed=next(counter), probes_per_call=per_call,
                            jit_compile=jit, mode=opts.get("mode", "reverse"), max_batch_size=opts.get("chunk"))

        extra["per_call"] = per_call
    elif op == "masked":
        groups = kh.layer_groups(model)
        positions = {id(w): i for i, w in enumerate(variables)}
        op_ = hessian_operator(model)
        rng = np.random.default_rng(2)
        full = [rng.choice([-1.0, 1.0], size=w.shape).astype("float32") for w in variables]
        masks = []
        for vs in groups.values():
            inside = {positions[id(w)] for w in vs}
            masks.append([full[i] if i in inside else np.zeros_like(full[i]) for i in range(len(variables))])
        extra["groups"] = len(masks)

        def fn():
            for vec in masks:
                hv, _ = op_.matvec(xt, yt, vec)
                [h.numpy() for h in hv]

        warmup, reps = 0, 1
        op_.matvec(xt, yt, masks[0])  # the one trace and compile, outside the timing
    else:
        raise ValueError(op)
    _, times = timed(fn, warmup, reps)
    if op == "probe":
        times = [t / per_call for t in times]  # per probe
    return {
        "op": op,
        **opts,
        "median_s": statistics.median(times),
        "times_s": times,
        "reps": len(times),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_model_mb": rss_model,
        **extra,
    }


def label(row):
    if row["op"] == "gradient":
        name = "gradient"
    elif row["op"] == "hvp":
        name = f"HVP {row['mode']}"
    elif row["op"] == "probe":
        per_call = row.get("per_call", 1)
        name = "layer_traces, 1 probe (all layers)"
        if row.get("mode", "reverse") != "reverse":
            name += f", {row['mode']}"
        if row.get("chunk"):
            name += f", max_batch_size={row['chunk']}"
        if per_call > 1:
            name += f", {per_call} probes per call (time per probe)"
    else:
        name = f"masked: 1 HVP per layer, {row.get('groups', '?')} layers"
    return name + (" (XLA)" if row.get("jit") else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--skip-masked", action="store_true", help="skip the slow masked alternative")
    parser.add_argument("--no-xla", action="store_true", help="skip the XLA (jit_compile) rows")
    parser.add_argument("--only", help="comma-separated ops to run (gradient,hvp,probe,masked)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        op, opts = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(op, opts, args.batch, args.warmup, args.reps, args.arch)))
        return

    import platform

    rows = []
    for op, opts in OPS:
        if op == "masked" and args.skip_masked:
            continue
        if opts.get("jit") and args.no_xla:
            continue
        if args.only and op not in args.only.split(",") and not (op == "gradient"):
            continue
        cmd = [sys.executable, __file__, "--worker", json.dumps([op, opts]), "--batch", str(args.batch),
               "--reps", str(args.reps), "--warmup", str(args.warmup), "--arch", args.arch]
        print(f"... {op} {opts}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"worker {op} {opts} failed")
        rows.append(json.loads(lines[-1][7:]))
        print(f"    {label(rows[-1])}: {rows[-1]['median_s']:.3f} s", file=sys.stderr, flush=True)

    import tensorflow as tf
    import keras

    grad = {r["jit"]: r["median_s"] for r in rows if r["op"] == "gradient"}
    probe = next(r for r in rows if r["op"] == "probe" and r.get("per_call", 1) == 1 and not r["jit"]
                 and r.get("mode", "reverse") == "reverse" and not r.get("chunk"))["median_s"]
    print(f"\n{args.arch}, batch {args.batch}, float32; TF {tf.__version__}, Keras {keras.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, "
          f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', '1 (package default)')}; "
          f"median of {args.reps} after {args.warmup} warm-up calls, each op in its own process\n")
    grad_rss = {r["jit"]: r["peak_rss_mb"] for r in rows if r["op"] == "gradient"}
    print("| operation | median time | × gradient (same XLA setting) | peak RSS | × gradient's peak RSS |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["median_s"] / grad[r.get("jit", False)]
        mem = r["peak_rss_mb"] / grad_rss[r.get("jit", False)]
        reps = "" if r["reps"] == args.reps else f" ({r['reps']} rep)"
        print(f"| {label(r)} | {r['median_s']:.2f} s{reps} | {ratio:.2f}× | {r['peak_rss_mb'] / 1024:.2f} GB | {mem:.2f}× |")
    print(f"\nProcess RSS after building the model (before any operation): "
          f"{min(r['rss_after_model_mb'] for r in rows) / 1024:.2f} GB")
    masked = [r for r in rows if r["op"] == "masked"]
    print(f"\nOne probe for all layers / one gradient: {probe / grad[False]:.2f}× (target ≤ 2.5×)")
    if masked:
        print(f"Masked alternative / single pass: {masked[0]['median_s'] / probe:.1f}× (target ≥ 20×)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
