"""Every layer's trace to a target relative standard error: which probe scheme costs least.

    python benchmarks/layer_trace_schemes.py                     # ResNet-20, batch 32, r = 0.1 (~15 min on 2 cores)
    python benchmarks/layer_trace_schemes.py --rel-stderr 0.05 --json out.json

On one CIFAR ResNet-20 (272,474 parameters, 43 layers with weights) and one random
CIFAR-shaped batch of 32, float32, runs ``layer_traces(rel_stderr=r)`` with

  scheme="restricted"   each layer its own probes, zero outside it, until it meets r: the
                        algorithm of PyHessian's per-layer route (one HVP per probe per layer);
  scheme="auto"         the cheapest scheme per layer (keras_hesstrace.schemes);
  scheme="single"       the single pass: not run to the target (it would need the largest
                        per-layer count below); its need is estimated from --single-probes
                        probes, need_l = s_l² / (r · mean_l)².

The BatchNorm moving statistics are first set to the statistics of 256 random images (a
freshly built network's moving mean 0 / variance 1 saturate the softmax, and its layer
Hessians are then ~0: nothing to measure). Reports HVPs and seconds of each scheme, the
per-layer table of "auto", and the z-scores of auto's traces against restricted's.
"""

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np


def setup(batch, seed=0, arch="resnet20"):
    """(model, x, y): the compiled network ("resnet20" or "resnet18") with its BatchNorm
    moving statistics set from 256 random images, and one random batch of ``batch``."""
    import keras
    import tensorflow as tf

    from keras_hesstrace import models

    keras.utils.set_random_seed(seed)
    model = models.cifar_resnet(20) if arch == "resnet20" else models.resnet18(num_classes=10, input_shape=(32, 32, 3))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(tf.constant(rng.normal(size=(256, 32, 32, 3)).astype("float32")), training=True)
    for layer in norms:
        layer.momentum = 0.99
    x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch)
    return model, x, y


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rel-stderr", type=float, default=0.1)
    parser.add_argument("--pilot", type=int, default=10)
    parser.add_argument("--max-probes", type=int, default=2000)
    parser.add_argument("--single-probes", type=int, default=50)
    parser.add_argument("--json", help="write the numbers (and every layer's samples) to this file")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    import keras_hesstrace as kh

    model, x, y = setup(args.batch)
    kh.layer_traces(model, x, y, num_probes=2, seed=99)  # compile and the mode check, outside the timings
    out = {"tf": tf.__version__, "keras": keras.__version__, "rel_stderr": args.rel_stderr, "batch": args.batch,
           "params": int(sum(np.prod(v.shape) for v in model.trainable_variables))}

    start = time.perf_counter()
    single = kh.layer_traces(model, x, y, num_probes=args.single_probes, seed=1)
    single_s = time.perf_counter() - start
    need = single.stderr**2 * single.num_probes / (args.rel_stderr * single.trace) ** 2
    out["single"] = {"probes": single.num_probes, "seconds": single_s, "need": need.tolist(),
                     "estimated_hvps": float(need.max()), "estimated_seconds": float(need.max() * single_s / single.num_probes)}

    runs = {}
    for scheme in ("restricted", "auto"):
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = kh.layer_traces(model, x, y, num_probes=args.pilot, seed=2, rel_stderr=args.rel_stderr,
                                max_probes=args.max_probes, scheme=scheme)
        seconds = time.perf_counter() - start
        runs[scheme] = r
        frame = r.to_frame()
        out[scheme] = {"seconds": seconds, "hvps_drawn": int(r.num_hvps_drawn), "groups_met": int(r.target_met.sum()),
                       "warnings": [str(w.message) for w in caught],
                       "table": json.loads(frame.reset_index().to_json(orient="records")),
                       "samples": {g: c.tolist() for g, c in zip(r.groups, r.columns())}}
        print(f"{scheme}: {seconds:.1f} s, {r.num_hvps_drawn} HVPs, {int(r.target_met.sum())}/{len(r.groups)} layers met",
              flush=True)

    a, b = runs["auto"], runs["restricted"]
    z = (a.trace - b.trace) / np.sqrt(a.stderr**2 + b.stderr**2)
    out["z_auto_vs_restricted"] = z.tolist()
    print(f"\nCIFAR ResNet-20 ({out['params']:,} parameters), batch {args.batch}, float32, CPU "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), TF {out['tf']} / Keras {out['keras']}; "
          f"target: every layer's relative stderr <= {args.rel_stderr}, pilot {args.pilot}, max_probes {args.max_probes}\n")
    print("| scheme | HVPs | seconds | layers that met the target |")
    print("|---|---|---|---|")
    print(f"| single pass alone (estimated from {single.num_probes} probes) | {out['single']['estimated_hvps']:,.0f} | "
          f"{out['single']['estimated_seconds']:,.0f} | (not run) |")
    for scheme in ("restricted", "auto"):
        o = out[scheme]
        print(f"| {scheme} | {o['hvps_drawn']:,} | {o['seconds']:.1f} | {o['groups_met']}/{len(a.groups)} |")
    print(f"\nrestricted ÷ auto: {out['restricted']['seconds'] / out['auto']['seconds']:.2f}× in time, "
          f"{out['restricted']['hvps_drawn'] / out['auto']['hvps_drawn']:.2f}× in HVPs; "
          f"auto vs restricted traces: |z| max {np.abs(z).max():.2f}, {int((np.abs(z) > 2).sum())} of {len(z)} beyond 2")
    counts = a.to_frame()["scheme"].value_counts().to_dict()
    print("auto's schemes:", ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(a.to_frame()[["num_params", "trace", "rel_stderr", "num_probes", "scheme", "num_hvps", "seconds"]]
          .to_string(float_format=lambda v: f"{v:.4g}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
