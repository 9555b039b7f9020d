"""keras-hesstrace vs PyHessian on IDENTICAL WEIGHTS: values compared, times side by side.

    python benchmarks/vs_pyhessian.py                                   # ResNet-20, batch 32 (slow: the per-layer part)
    python benchmarks/vs_pyhessian.py --arch resnet18 --float64 --json out.json
    python benchmarks/vs_pyhessian.py --batch 8 --reps 1 --warmup 0 --skip-layers   # a quick check

Sets up PyTorch (CPU) and PyHessian in an environment of their own (benchmarks/.venv-torch,
created on first use with `pip install torch==2.13.0 pyhessian`). The Keras network
(--arch resnet20: keras_hesstrace.models.cifar_resnet(20), 272,474 parameters; resnet18:
models.resnet18, 11,173,962) gets BatchNorm moving statistics from 256 random images
(layer_trace_schemes.setup), and its weights, one random CIFAR-shaped batch and one fixed
Gaussian vector v go to .npz files; the PyTorch side (_torch_resnets.py: the same network
with TensorFlow's "same" padding, BN in eval mode) loads them and asserts the parameter
count. One process per side (ours: this one, _vs_keras.py; theirs: _pyhessian_worker.py),
both with --threads threads; gradient and HVP times are medians of --reps after --warmup,
the iterative algorithms are timed once each after a compiling warm-up (PyHessian's times
include its constructor, the forward + create_graph backward it needs).

Values (float32, and float64 too with --float64): the loss; H v (relative error of the whole
vector); the top-k eigenvalues (ours converged: Lanczos tol 1e-8, against PyHessian's
defaults); the full trace (difference in units of the combined standard error); every
layer's trace (z-scores).

Times: one gradient; one HVP; the top-k eigenvalues at equal accuracy (PyHessian's
eigenvalues(top_n=k, maxIter=100, tol=1e-3); its relative error against our converged
reference; ours, method="lanczos" and "power", at the largest tol in 1e-2, 3e-3, 1e-3, ...
whose error is at most PyHessian's); the full trace at equal accuracy (PyHessian's
trace(maxIter=100, tol=1e-3), the relative standard error of its samples; ours
hessian_trace(tol=that, max_iter=100)); every layer's trace at the target relative standard
error --rel-stderr (ours: layer_traces(num_probes=10, rel_stderr=r, max_probes=2000) with
scheme="auto" and "restricted"; PyHessian: for each layer, freeze the others, build
`hessian`, trace(maxIter=M_l, tol=-inf) with M_l our "restricted" run's count for that layer:
the same algorithm, so PyHessian gets the count it would have needed). --skip-layers skips it.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".venv-torch")
PARAMS = {"resnet20": "ResNet-20", "resnet18": "ResNet-18"}


def ensure_torch_env():
    python = os.path.join(VENV, "bin", "python")
    if not os.path.exists(python):
        print(f"creating {VENV} (PyTorch CPU + PyHessian) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "pyhessian", "numpy"], check=True)
    return python


def hv_error(ours, theirs_npz, name):
    """||Hv_ours - Hv_torch|| / ||Hv_torch|| over all parameters (``name``: the torch side's precision)."""
    num = den = 0.0
    for k, a in ours.items():
        b = theirs_npz[f"{name}:{k}"]
        num += float(np.sum((a.astype(np.float64) - b) ** 2))
        den += float(np.sum(b.astype(np.float64) ** 2))
    return float(np.sqrt(num / den))


def layer_z(ours, theirs):
    z = {g: (t["value"] - theirs[g]["value"]) / np.hypot(t["stderr"], theirs[g]["stderr"]) for g, t in ours.items()}
    a = np.abs(np.array(list(z.values())))
    return {"z": z, "max_abs": float(np.nanmax(a)), "beyond_2": int((a > 2).sum()), "n": len(a)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(PARAMS), default="resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=3, help="top-k eigenvalues")
    parser.add_argument("--rel-stderr", type=float, default=0.1, help="per-layer target relative standard error")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--float64", action="store_true", help="also compare the values in float64")
    parser.add_argument("--skip-layers", action="store_true", help="skip every layer's trace (slow)")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args()

    python = ensure_torch_env()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    from _vs_keras import KerasSide

    with tempfile.TemporaryDirectory() as tmp:
        files = {n: os.path.join(tmp, f"{n}.npz") for n in ("weights", "batch", "vector", "hv")}
        print("... keras-hesstrace side (1/2)", file=sys.stderr, flush=True)
        side = KerasSide(args, files["weights"], files["batch"], files["vector"])
        hv_ours = side.first()
        print("... PyTorch / PyHessian side", file=sys.stderr, flush=True)
        spec = dict(arch=args.arch, weights=files["weights"], batch=files["batch"], vector=files["vector"],
                    hv_out=files["hv"], threads=args.threads, reps=args.reps, warmup=args.warmup, k=args.k, seed=0,
                    float64=args.float64, layer_counts=side.layer_counts())
        proc = subprocess.run([python, os.path.join(HERE, "_pyhessian_worker.py"), json.dumps(spec)], cwd=HERE,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit("the PyHessian worker failed")
        theirs = json.loads(lines[-1][7:])
        hv_theirs = np.load(files["hv"])
        print("... keras-hesstrace side (2/2)", file=sys.stderr, flush=True)
        mine = side.second(theirs)
        values = {}
        for name in side.models:
            m, t = mine[name], theirs[name]
            values[name] = {"loss_rel_diff": abs(m["loss"] - t["loss"]) / abs(t["loss"]),
                            "hv_rel_error": hv_error(hv_ours[name], hv_theirs, name),
                            "eigen_rel_diff": t["eigen"]["rel_error"], "trace_z": m["trace"]["z_vs_pyhessian"]}
        if "float64" in side.models:  # each side's float32 H v against the float64 one
            f32 = {k[8:]: hv_theirs[k] for k in hv_theirs.files if k.startswith("float32:")}
            values["float32"]["hv_ours_vs_float64"] = hv_error(hv_ours["float32"], hv_theirs, "float64")
            values["float32"]["hv_theirs_vs_float64"] = hv_error(f32, hv_theirs, "float64")
        if "layers" in mine:
            per = theirs["float32"]["layers"]["traces"]
            values["layers"] = {s: layer_z(mine["layers"][s]["traces"], per) for s in ("restricted", "auto")}

    report(args, mine, theirs, values)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ours": mine, "pyhessian": theirs, "values": values, "args": vars(args)}, f, indent=1, default=float)


def report(args, mine, theirs, values):
    m, t = mine["float32"], theirs["float32"]
    print(f"\nCIFAR {PARAMS[args.arch]} ({mine['params']:,} parameters, {mine['num_layers']} layers with weights), the same "
          f"weights on both sides, batch {args.batch}, float32, CPU ({platform.processor() or platform.machine()}, "
          f"{args.threads} threads on both sides); TF {mine['tf']} / Keras {mine['keras']} (oneDNN "
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'on: package default')}) vs PyTorch {theirs['torch']} + PyHessian 0.1; "
          f"gradient and HVP: medians of {args.reps} after {args.warmup} warm-ups, the rest one run each\n")
    print("| | keras-hesstrace | PyTorch / PyHessian | PyHessian ÷ ours |")
    print("|---|---|---|---|")

    def row(label, a, b, unit="s", fmt=".2f"):
        print(f"| {label} | {a:{fmt}} {unit} | {b:{fmt}} {unit} | {b / a:.2f}× |")

    row("one gradient", m["gradient_s"], t["gradient_s"])
    row("one HVP (PyHessian: its retained graph)", m["hvp_s"], t["hvp_retained_s"])
    print(f"| one HVP (PyTorch, graph rebuilt) | | {t['hvp_fresh_s']:.2f} s | {t['hvp_fresh_s'] / m['hvp_s']:.2f}× |")
    e = t["eigen"]
    for method in ("lanczos", "power"):
        o = m[f"eigen_{method}"]
        note = "" if o["reached"] else " (not reached)"
        print(f"| top-{args.k} eigenvalues, rel. error ≤ {e['rel_error']:.1e} (PyHessian defaults); ours {method} "
              f"tol {o['tol']:g}{note} | {o['seconds']:.1f} s, {o['hvps']} HVPs, error {o['rel_error']:.1e} | "
              f"{e['seconds']:.1f} s, {e['hvps']} HVPs | {e['seconds'] / o['seconds']:.2f}× |")
    tr, o = t["trace"], m["trace"]
    print(f"| full trace, rel. stderr {tr['rel_stderr']:.2g} (PyHessian defaults; ours tol = that) | {o['seconds']:.1f} s, "
          f"{o['hvps']} probes | {tr['seconds']:.1f} s, {tr['probes']} probes | {tr['seconds'] / o['seconds']:.2f}× |")
    if "layers" in mine:
        pl = t["layers"]
        for s in ("auto", "restricted"):
            o = mine["layers"][s]
            print(f"| all {mine['num_layers']} layer traces, rel. stderr "
                  f"≤ {args.rel_stderr} (ours scheme=\"{s}\"; PyHessian M_l = restricted's) | {o['seconds']:.1f} s, "
                  f"{o['hvps']:,} HVPs | {pl['seconds']:.1f} s, {pl['hvps']:,} HVPs | **{pl['seconds'] / o['seconds']:.1f}×** |")

    print("\nValues on the same weights (ours vs PyTorch / PyHessian)\n")
    names = list(values.keys() - {"layers"})
    names.sort()
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    print("| loss (ours / theirs) | " + " | ".join(f"{mine[n]['loss']:.10g} / {theirs[n]['loss']:.10g}" for n in names) + " |")
    print("| loss, relative difference | " + " | ".join(f"{values[n]['loss_rel_diff']:.1e}" for n in names) + " |")
    print("| H·v (fixed Gaussian v), relative error | " + " | ".join(f"{values[n]['hv_rel_error']:.1e}" for n in names) + " |")
    if "hv_ours_vs_float64" in values["float32"]:
        v = values["float32"]
        print(f"| H·v float32 vs PyTorch's float64 H·v: ours / PyTorch's | {v['hv_ours_vs_float64']:.1e} / "
              f"{v['hv_theirs_vs_float64']:.1e} | |")
    print(f"| top-{args.k} eigenvalues, ours (Lanczos tol 1e-8) | "
          + " | ".join(", ".join(f"{v:.6g}" for v in mine[n]["eigen_reference"]["values"]) for n in names) + " |")
    print(f"| top-{args.k} eigenvalues, PyHessian (defaults) | "
          + " | ".join(", ".join(f"{v:.6g}" for v in theirs[n]["eigen"]["values"]) for n in names) + " |")
    print("| eigenvalues, max relative difference | " + " | ".join(f"{values[n]['eigen_rel_diff']:.1e}" for n in names) + " |")
    print("| full trace, ours ± stderr | " + " | ".join(f"{mine[n]['trace']['value']:.5g} ± {mine[n]['trace']['stderr']:.2g}" for n in names) + " |")
    print("| full trace, PyHessian ± stderr | " + " | ".join(f"{theirs[n]['trace']['value']:.5g} ± {theirs[n]['trace']['stderr']:.2g}" for n in names) + " |")
    print("| full trace, z (difference / combined stderr) | " + " | ".join(f"{values[n]['trace_z']:+.2f}" for n in names) + " |")
    if "layers" in values:
        for s, z in values["layers"].items():
            print(f"| every layer's trace, ours {s} vs PyHessian: max abs z, count beyond 2 | "
                  f"{z['max_abs']:.2f}, {z['beyond_2']} of {z['n']} |" + " |" * (len(names) - 1))
        warned = mine["layers"]["auto"]["warnings"]
        if warned:
            print(f"\nscheme=\"auto\" warned {len(warned)}×: {warned[0][:200]}")


if __name__ == "__main__":
    main()
