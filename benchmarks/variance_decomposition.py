"""Where the single pass's variance comes from, per layer, on a network: own block vs cross terms.

    python benchmarks/variance_decomposition.py                 # ResNet-20, batch 32 (~4 min on 2 cores)
    python benchmarks/variance_decomposition.py --json out.json

For a Rademacher probe the single-pass sample of layer l has variance
Var_restricted,l + Σ_{j≠l} ‖H_lj‖_F² (docs/method.md §3). This script measures each part on
the calibrated CIFAR ResNet-20 of benchmarks/layer_trace_schemes.py:

  - single-pass samples (--single probes): their variance per layer;
  - restricted probes of each layer j (--restricted of them): the variance of
    <v_j, (H v_j)_j> (Var_restricted,j), and ‖(H v_j)_l‖² for every other layer l, whose
    mean is ‖H_lj‖_F² (the coupling matrix C);
  - the prediction Var_restricted,l + Σ_j C_lj against the measured single-pass variance;
  - the probes each scheme needs for a relative standard error r (--rel-stderr), and what
    sharing restricted probes between weakly coupled layers ("colouring": layer l joins a
    class when every member's variance stays within (1 + eps) of its own) would cost.
"""

import argparse
import json
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--single", type=int, default=30)
    parser.add_argument("--restricted", type=int, default=10)
    parser.add_argument("--rel-stderr", type=float, default=0.1)
    parser.add_argument("--json")
    parser.add_argument("--plot", help="write a bar chart of the probes each layer needs per scheme (PNG)")
    args = parser.parse_args()

    import tensorflow as tf

    import keras_hesstrace as kh
    from keras_hesstrace.groups import group_indices
    from keras_hesstrace.hvp import hessian_operator
    from keras_hesstrace.probes import draw_probe, probe_seed
    from layer_trace_schemes import setup

    model, x, y = setup(args.batch)
    x, y = tf.constant(x), tf.constant(y)
    mapping = kh.layer_groups(model)
    names, indices = group_indices(model, mapping)
    variables = model.trainable_variables
    op = hessian_operator(model)
    start = time.perf_counter()
    single = kh.layer_traces(model, x, y, num_probes=args.single, seed=1).samples
    G, R = len(names), args.restricted
    own, C = np.zeros((R, G)), np.zeros((R, G, G))
    for j, block in enumerate(indices):
        for m in range(R):
            v = draw_probe(variables, probe_seed(7, (j + 1) * 2**40 + m))
            v = [vi if i in block else tf.zeros_like(vi) for i, vi in enumerate(v)]
            hv, _ = op.matvec(x, y, v)
            squares = np.array([float(tf.reduce_sum(tf.square(h))) for h in hv])
            own[m, j] = sum(float(tf.reduce_sum(v[i] * hv[i])) for i in block)
            for l, other in enumerate(indices):
                C[m, l, j] = squares[list(other)].sum()
        print(f"  restricted probes of layer {j + 1}/{G}: {time.perf_counter() - start:.0f} s", flush=True)
    trace, var_r = own.mean(0), own.var(0, ddof=1)
    coupling = C.mean(0)
    np.fill_diagonal(coupling, 0.0)
    var_single = single.var(0, ddof=1)
    predicted = var_r + coupling.sum(1)
    ratio = predicted / var_single
    r = args.rel_stderr
    need_r = np.maximum(2, var_r / (r * trace) ** 2)
    need_single = var_single / (r * trace) ** 2
    sizes = np.array([sum(int(np.prod(v.shape)) for v in vs) for vs in mapping.values()])

    colouring = {}
    for eps in (0.25, 1.0, 3.0):
        classes = []
        for l in np.argsort(-need_r):
            for members in classes:
                trial = members + [l]
                if all(var_r[m] + coupling[m, trial].sum() <= (1 + eps) * var_r[m] for m in trial):
                    members.append(l)
                    break
            else:
                classes.append([l])
        cost = sum(max((var_r[m] + coupling[m, c].sum()) / (r * trace[m]) ** 2 for m in c) for c in classes)
        colouring[eps] = (len(classes), float(cost))

    print(f"\nCIFAR ResNet-20, batch {args.batch}: {args.single} single-pass probes, {R} restricted probes per layer "
          f"({time.perf_counter() - start:.0f} s)")
    print(f"predicted / measured single-pass variance: median {np.median(ratio):.2f}, range {ratio.min():.2f}-{ratio.max():.2f}")
    conv, norm = sizes > 128, sizes <= 128
    spread = var_single / var_r
    print(f"single-pass ÷ restricted per-probe variance: layers > 128 scalars {np.min(spread[conv]):.0f}-"
          f"{np.max(spread[conv]):.0f}×, <= 128 scalars {np.min(spread[norm]):.0f}-{np.max(spread[norm]):.0f}×")
    print(f"probes for rel_stderr {r}: single pass alone {need_single.max():,.0f} (its worst layer); one restricted "
          f"run per layer {need_r.sum():,.0f} in all (median {np.median(need_r):.0f}, max {need_r.max():.0f}); the same "
          f"count for every layer (a fixed maxIter) {G * need_r.max():,.0f}")
    for eps, (k, cost) in colouring.items():
        print(f"colouring, eps {eps}: {k} classes, {cost:,.0f} probes")
    if args.plot:
        plot_needs(names, sizes, need_single, need_r, r, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"names": list(names), "sizes": sizes.tolist(), "trace": trace.tolist(), "var_restricted": var_r.tolist(),
                       "var_single": var_single.tolist(), "coupling": coupling.tolist(), "rel_stderr": r,
                       "need_restricted": need_r.tolist(), "need_single": need_single.tolist(),
                       "colouring": {str(k): v for k, v in colouring.items()}}, f, indent=1)


def plot_needs(names, sizes, need_single, need_restricted, r, path):
    """Bars (log scale) of the probes each layer needs for relative stderr ``r``, per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    ax.bar(pos - 0.2, need_single, 0.4, label="single pass (one probe serves every layer)", color="#c44e52")
    ax.bar(pos + 0.2, need_restricted, 0.4, label="restricted (one probe per layer)", color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xticks(pos, [f"{n} ({s})" for n, s in zip(names, sizes)], rotation=90, fontsize=6)
    ax.set_ylabel(f"probes for stderr <= {r:g} x trace")
    ax.set_title("CIFAR ResNet-20: probes each layer needs, by scheme (benchmarks/variance_decomposition.py)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
