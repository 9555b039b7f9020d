"""The PyHessian toolset's cost per HVP against the raw HVP: the estimators' overhead.

    python benchmarks/estimator_overhead.py                 # ResNet-20, batch 32, 5 rounds (~4 min on 2 cores)
    python benchmarks/estimator_overhead.py --reps 3 --probes 10
    python benchmarks/estimator_overhead.py --rows "raw matvec,hessian_trace"

On one CIFAR ResNet-20 (keras_hesstrace.models.cifar_resnet(20), 65 variables) and one
random CIFAR-shaped float32 batch, with the BatchNorm moving statistics first set from a
batch (layer_trace_schemes.setup), times per HVP:

    raw matvec                 op.matvec on fixed tensors (one compiled call; the baseline)
    raw flat_matvec            op.flat_matvec on a fixed flat float64 tensor
    per-variable transfers     what ModelHessian.__call__ did before flat_matvec: one
                               tf.constant per variable in, op.matvec, one .numpy() per
                               variable out (numpy vector to numpy vector)
    ModelHessian               ModelHessian.__call__ (numpy vector to numpy vector)
    hessian_trace              Hutchinson, a fixed number of probes (--probes; rel_stderr=None)
    hessian_trace hutch++      method="hutch++", the same budget
    top_eigenvalues lanczos    k=1, --eig-iter HVPs at most (time / result.num_hvps)
    top_eigenvalues power      k=1, the same
    spectral_density           one run of --probes Lanczos steps
    diagonal                   --probes probes

Each round runs every row once, interleaved (slow periods of a shared machine hit all rows
alike); round 0 traces and warms up and is not counted. The table gives each row's median
seconds per HVP over the rounds and its overhead over the raw matvec's median in the same
run. On a loaded machine that ratio carries the noise of separate calls; the last column is
steadier: within each call of the row, the wall time spent outside the operator's
flat_matvec calls (probe draws, transfers, the numpy algebra, Python) as a percentage of
the time inside them (the row's median over the rounds). Overhead is time, not a test:
nothing here asserts a time.
"""

import argparse
import os
import platform
import statistics
import time
import warnings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--probes", type=int, default=10, help="HVPs of the trace, density and diagonal rows")
    parser.add_argument("--eig-iter", type=int, default=20, help="max_iter of the top_eigenvalues rows (k=1)")
    parser.add_argument("--raw", type=int, default=10, help="HVPs per round of the raw and ModelHessian rows")
    parser.add_argument("--rows", default=None, help="comma-separated rows to run (default all; the raw matvec always)")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf
    import keras

    import keras_hesstrace as kh
    from keras_hesstrace.batches import to_tensors
    from keras_hesstrace.model_hessian import ModelHessian
    from layer_trace_schemes import setup  # the same model, batch and BatchNorm statistics

    model, x, y = setup(args.batch)
    x, y = to_tensors(x, y)
    op = kh.hessian_operator(model)
    variables = op.variables
    offsets = np.cumsum([0] + [int(np.prod(w.shape)) for w in variables])
    n = int(offsets[-1])
    v_flat = np.random.default_rng(0).standard_normal(n)
    v_tensors = [tf.constant(v_flat[a:b].reshape(w.shape), dtype=w.dtype) for w, a, b in zip(variables, offsets[:-1], offsets[1:])]
    v_device = tf.constant(v_flat)
    mh = ModelHessian(model, x, y)
    inside = [0.0]  # seconds spent in op.flat_matvec (the estimators' operator is this cached op)
    flat_matvec = op.flat_matvec

    def timed_flat_matvec(*a):
        start = time.perf_counter()
        hv, loss = flat_matvec(*a)
        float(loss)  # wait for the product
        inside[0] += time.perf_counter() - start
        return hv, loss

    op.flat_matvec = timed_flat_matvec  # an instance attribute: this script's op only

    def repeat(call):
        def run(seed):
            for _ in range(args.raw):
                call()
            return args.raw
        return run

    def raw_matvec():
        _, loss = op.matvec(x, y, v_tensors)
        float(loss)  # wait for the product

    def raw_flat():
        _, loss = flat_matvec(x, y, v_device)  # the unwrapped method
        float(loss)

    def per_variable():  # the former ModelHessian.__call__
        parts = [tf.constant(v_flat[a:b].reshape(w.shape), dtype=w.dtype) for w, a, b in zip(variables, offsets[:-1], offsets[1:])]
        hv, loss = op.matvec(x, y, parts)
        float(loss)
        return np.concatenate([np.asarray(h, dtype=np.float64).ravel() for h in hv])

    fixed = dict(num_probes=args.probes, rel_stderr=None)  # hessian_trace: exactly --probes HVPs, no stop rule

    def estimator(fn, **kwargs):
        def run(seed):
            result = fn(model, x, y, seed=seed, **kwargs)
            return int(getattr(result, "num_hvps", None) or result.num_probes)  # DiagonalResult: num_probes
        return run

    rows = {
        "raw matvec": repeat(raw_matvec),
        "raw flat_matvec": repeat(raw_flat),
        "per-variable transfers": repeat(per_variable),
        "ModelHessian": repeat(lambda: mh(v_flat)),
        "hessian_trace": estimator(kh.hessian_trace, **fixed),
        "hessian_trace hutch++": estimator(kh.hessian_trace, method="hutch++", **fixed),
        "top_eigenvalues lanczos": estimator(kh.top_eigenvalues, k=1, max_iter=args.eig_iter, tol=1e-12, method="lanczos"),
        "top_eigenvalues power": estimator(kh.top_eigenvalues, k=1, max_iter=args.eig_iter, tol=1e-12, method="power"),
        "spectral_density": estimator(kh.spectral_density, num_runs=1, lanczos_steps=args.probes),
        "diagonal": estimator(kh.diagonal, num_probes=args.probes),
    }
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",")]
        unknown = sorted(set(wanted) - set(rows))
        if unknown:
            parser.error(f"--rows: unknown {unknown}; choose from {list(rows)}")
        rows = {name: fn for name, fn in rows.items() if name in wanted or name == "raw matvec"}

    load_before = os.getloadavg()[0]
    times = {name: [] for name in rows}
    outside = {name: [] for name in rows}
    hvps = {}
    for round_ in range(args.reps + 1):  # round 0 traces and warms up
        for name, fn in rows.items():
            inside[0] = 0.0
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unconverged eigenpairs: a fixed budget is the point
                count = fn(round_)
            total = time.perf_counter() - start
            if round_:
                times[name].append(total / count)
                hvps[name] = count
                if inside[0] > 0 and name != "raw flat_matvec":
                    outside[name].append(total / inside[0] - 1)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{k} {t[-1] * 1e3:.0f} ms" for k, t in times.items()), flush=True)

    base = statistics.median(times["raw matvec"])
    print(f"\nResNet-20 ({n:,} parameters, {len(variables)} variables), batch {args.batch}, float32, "
          f"mode {op.mode}; TF {tf.__version__}, Keras {keras.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU threads (load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after); "
          f"median of {args.reps} interleaved rounds after a warm-up round, one process\n")
    print("| operation | HVPs per round | median s per HVP | overhead over raw matvec | the rounds (ms per HVP) "
          "| time outside flat_matvec, % of inside |")
    print("|---|---|---|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        out = f"{100 * statistics.median(outside[name]):+.1f} %" if outside[name] else "—"
        print(f"| {name} | {hvps[name]} | {med:.4f} | {100 * (med / base - 1):+.1f} % | "
              f"{', '.join(f'{v * 1e3:.0f}' for v in t)} | {out} |")


if __name__ == "__main__":
    main()
