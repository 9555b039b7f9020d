"""The ``keras-hesstrace`` command line."""

import argparse
import os
import sys
import time

from keras_hesstrace import cli_commands as commands  # the analysis commands
from keras_hesstrace.cli_inputs import CLIError, first_line, writable_folder

# TensorFlow's C++ start-up chatter is quieted by the package's __init__ for this console
# script: it has to happen before TensorFlow is imported, which is before this module runs.


def _demo(args):
    """Calibrate the alert on clean digits runs, then watch a noisy-label run live."""
    from keras_hesstrace.experiments import run_demo

    writable_folder(args.out, "--out")
    start = time.perf_counter()
    run_demo(out=args.out, epochs=args.epochs, clean_runs=args.clean_runs,
             noise_rate=args.noise_rate, every_n_steps=args.every_n_steps,
             num_probes=args.num_probes, train_examples=args.train_examples,
             probe_batch_size=args.probe_batch_size)
    print(f"Demo finished in {time.perf_counter() - start:.0f} s.")
    return 0


def _parse_field(kind):
    """An argparse type for an ExperimentConfig field annotation (lists: comma-separated)."""
    import typing

    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        inner = _parse_field(next(a for a in args if a is not type(None)))
        return lambda text: None if text.lower() in ("none", "null", "") else inner(text)
    if origin in (list, typing.List):
        item = _parse_field(args[0])
        return lambda text: [item(t) for t in text.split(",") if t.strip()]
    if kind is bool:
        def parse_bool(text):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return parse_bool
    return kind


def _experiment(args):
    """Run (or resume) the memorisation experiment and write its Table-1 summary."""
    import dataclasses
    import json

    from keras_hesstrace import experiments as mem

    settings = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            settings = json.load(f)
    name = settings.pop("preset", None) or args.preset or "cpu-small"
    config = mem.preset(name, **settings)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(mem.ExperimentConfig)
                 if hasattr(args, f.name)}  # flags given (absent ones are suppressed)
    if overrides:
        config = mem.ExperimentConfig.from_dict({**config.to_dict(), **overrides})
    config.validate()
    if args.show_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    if args.plan:
        print(json.dumps(mem.plan(config, args.step_seconds, args.hvp_seconds), indent=1))
        return 0
    out = writable_folder(args.out or os.path.join("runs", config.name), "--out")
    if args.summarize_only:
        mem.summarize(config, out)
        return 0
    mem.run_experiment(config, out)
    return 0


# ===================================================================== analysis CLI

TRACEBACK_ENV = "KERAS_HESSTRACE_TRACEBACK"


def _common(p):
    from keras_hesstrace.hvp import DEFAULT_MODE, MODES

    p.add_argument("model", metavar="MODEL.keras", help="a model saved with model.save('model.keras')")
    p.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE",
                   help="import MODULE (a dotted name importable from the current directory, or a path to a .py "
                        "file) before loading the model, so that the custom layers, losses and functions it "
                        "registers with @keras.saving.register_keras_serializable load (repeat for several)")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help=f"how Hessian-vector products are computed (default {DEFAULT_MODE}; see the README)")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="'digits' (scikit-learn's bundled 8x8 digits, offline), a tensorflow-datasets name that is "
                        "prepared on disk (cifar10, cifar100; never downloaded), or an .npz file with arrays x and y")
    p.add_argument("--num-examples", type=int, default=512, metavar="N", help="use the first N examples (default 512)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="split the examples into batches of B; every Hessian-vector product averages over all of "
                        "them (default: one batch of all N)")
    p.add_argument("--loss", default=None, metavar="NAME",
                   help="a Keras loss name (default: the loss the model was compiled with)")
    p.add_argument("--from-logits", action="store_true", help="with --loss: the model outputs logits")
    p.add_argument("--by", "--groups", dest="by", choices=("layer", "variable"), default="layer",
                   help="how parameters are grouped: one group per layer (default) or per variable "
                        "(--groups is the older name of this flag)")
    p.add_argument("--group", "--block", dest="block", action="append", default=None, metavar="GROUP",
                   help="use only this group: its block of the Hessian, or its row of the estimate (repeat for "
                        "several; names as printed by 'estimate'; --block is the older name of this flag)")
    p.add_argument("--out", default=None, metavar="DIR", help="write CSV, JSON and PNG files to DIR")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--split", default="train", help="tfds split (default train)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="tfds data directory (default: tfds's own)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-hesstrace",
        description="Layer-wise Hessian traces of Keras models: one Hessian-vector product per probe gives every layer's trace. "
                    "Also the PyHessian toolset (top eigenvalues, spectral density, loss landscape) on a saved model.",
        epilog="Example: keras-hesstrace demo; keras-hesstrace estimate model.keras --data digits --out results/. "
               "'keras-hesstrace COMMAND --help' explains each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="offline demo on the bundled digits: calibrate on clean runs, alert on a "
             "noisy-label run (a few minutes on 2 CPU cores)")
    demo.add_argument("--out", default="hesstrace-demo",
                      help="output folder: CSV, TensorBoard logs, calibration, PNG (default hesstrace-demo)")
    demo.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    demo.add_argument("--clean-runs", type=int, default=4,
                      help="clean calibration runs, >= 3 (default 4)")
    demo.add_argument("--noise-rate", type=float, default=0.4,
                      help="label noise of the monitored run (default 0.4)")
    demo.add_argument("--every-n-steps", type=int, default=22,
                      help="optimiser steps between trace snapshots (default 22, two per epoch)")
    demo.add_argument("--num-probes", type=int, default=10, help="Hutchinson probes per snapshot (default 10)")
    demo.add_argument("--probe-batch-size", type=int, default=256,
                      help="fixed batch of training images the traces are taken on (default 256)")
    demo.add_argument("--train-examples", type=int, default=None,
                      help="train on a subset of the 1,400 training digits (a smaller budget)")
    demo.set_defaults(func=_demo)

    est = sub.add_parser(
        "estimate", help="per-layer Hessian traces with standard errors (table, traces.csv, traces.png)",
        description="Estimate tr(H_ll), the trace of every layer's Hessian block, with Hutchinson probes: each probe "
                    "costs one Hessian-vector product and gives all layers at once. Prints a table with standard "
                    "errors; --out writes traces.csv, estimate.json and a bar chart traces.png.",
        epilog="Example: keras-hesstrace estimate model.keras --data digits --num-probes 20 --out results/",
    )
    _common(est)
    est.add_argument("--num-probes", type=int, default=20, help="Hutchinson probes, one HVP each (default 20)")
    est.set_defaults(func=commands.run_estimate)

    eig = sub.add_parser(
        "eigen", help="the top-k Hessian eigenvalues (Lanczos or power iteration)",
        description="The k largest-magnitude eigenvalues of the Hessian (the sharpness), by Lanczos with full "
                    "reorthogonalisation or PyHessian's power iteration with deflation. Stops when every eigenpair's "
                    "residual is below tol x |eigenvalue|. --block restricts to one layer's (or several layers') block.",
        epilog="Example: keras-hesstrace eigen model.keras --data digits --k 3 --out results/",
    )
    _common(eig)
    eig.add_argument("-k", "--k", dest="k", type=int, default=1, help="number of eigenvalues (default 1)")
    eig.add_argument("--method", choices=("auto", "lanczos", "power"), default="auto", help="algorithm (default auto = lanczos: fewer HVPs than power iteration)")
    eig.add_argument("--which", choices=("LM", "LA"), default="LM", help="largest magnitude (LM, default, as PyHessian) or largest algebraic (LA)")
    eig.add_argument("--max-iter", type=int, default=100, help="HVP budget per eigenvalue (default 100)")
    eig.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance (default 1e-3)")
    eig.set_defaults(func=commands.run_eigen)

    den = sub.add_parser(
        "density", help="the Hessian's eigenvalue density by stochastic Lanczos quadrature (density.png, log scale)",
        description="The eigenvalue spectral density of the Hessian by stochastic Lanczos quadrature (as PyHessian): "
                    "each run is one Lanczos pass of --lanczos-steps HVPs from a random start; its Ritz values and "
                    "weights are smoothed with a Gaussian kernel. --out writes nodes.csv, density.csv, density.json "
                    "and density.png (log scale).",
        epilog="Example: keras-hesstrace density model.keras --data digits --num-runs 2 --lanczos-steps 60 --out results/",
    )
    _common(den)
    den.add_argument("--num-runs", type=int, default=1, help="independent Lanczos runs (default 1)")
    den.add_argument("--lanczos-steps", type=int, default=90, help="Lanczos steps (HVPs) per run, clipped to the dimension (default 90)")
    den.add_argument("--sigma", type=float, default=None, help="kernel width (default sqrt(1e-5 * max(1, range)), PyHessian's)")
    den.set_defaults(func=commands.run_density)

    land = sub.add_parser(
        "landscape", help="the loss on a grid around the weights along top eigenvectors or random directions (landscape.png)",
        description="Evaluate the loss at θ + α d1 + β d2 on a grid, where d1, d2 are the Hessian's top two "
                    "eigenvectors (unit norm) or filter-normalised random directions (Li et al. 2018). The model's "
                    "weights are restored exactly afterwards. --out writes landscape.csv, landscape.json and "
                    "landscape.png (contours and surface; a curve for 1-D).",
        epilog="Example: keras-hesstrace landscape model.keras --data digits --directions top2 --grid 21 --span 0.5 --out results/",
    )
    _common(land)
    land.add_argument("--directions", choices=("top2", "top1", "random2", "random1"), default="top2",
                      help="top eigenvectors or filter-normalised random directions; 2 = a surface, 1 = a curve (default top2)")
    land.add_argument("--grid", type=int, default=21, help="points per axis (default 21)")
    land.add_argument("--span", type=float, default=1.0, help="the grid covers [-span, span] along each direction (default 1.0)")
    land.set_defaults(func=commands.run_landscape)

    from keras_hesstrace import experiments as mem

    exp = sub.add_parser(
        "experiment",
        help="the memorisation experiment (Phase I calibration, Phase II noisy and held-out "
             "clean runs, Table-1 summary); resumable",
        description="Run or resume the memorisation experiment. Settings come from "
                    "--preset (cpu-small, cpu-confirm, paper, tiny), then --config FILE.json (fields of "
                    "ExperimentConfig, optionally with \"preset\"), then the flags below. "
                    "Lists are comma-separated.")
    exp.add_argument("--preset", choices=sorted(mem.PRESETS), default=None,
                     help="starting settings (default cpu-small)")
    exp.add_argument("--config", default=None, help="JSON file of settings")
    exp.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    exp.add_argument("--plan", action="store_true",
                     help="print the runs, steps and HVPs the settings cost, and exit")
    exp.add_argument("--step-seconds", type=float, default=None,
                     help="with --plan: measured seconds per optimiser step, for a time estimate")
    exp.add_argument("--hvp-seconds", type=float, default=None,
                     help="with --plan: measured seconds per HVP on the probe batch")
    exp.add_argument("--show-config", action="store_true", help="print the resolved settings and exit")
    exp.add_argument("--summarize-only", action="store_true",
                     help="only rewrite the summary and plots from the finished runs")
    import dataclasses
    import typing

    hints = typing.get_type_hints(mem.ExperimentConfig)
    for f in dataclasses.fields(mem.ExperimentConfig):
        exp.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                         type=_parse_field(hints[f.name]), metavar=f.name.upper(),
                         help=f"(default from the preset: {mem.PRESETS['cpu-small'].get(f.name, f.default if f.default is not dataclasses.MISSING else '...')})")
    exp.set_defaults(func=_experiment)
    for command in sub.choices.values():
        command.add_argument("--traceback", action="store_true",
                             help=f"on an error, print the full traceback too (or set {TRACEBACK_ENV}=1)")
    return parser


def _report(args, err):
    """Print an exception as one line (the traceback too with --traceback); return the exit code.

    2 when the input or a setting is refused (CLIError, ValueError: the library's checks of
    its arguments), as argparse exits for usage errors; 1 when the computation fails.
    """
    if getattr(args, "traceback", False) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        import traceback

        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    text = first_line(err) if isinstance(err, CLIError) else f"{type(err).__name__}: {first_line(err)}"
    print(f"keras-hesstrace {args.command}: error: {text}", file=sys.stderr)
    return 2 if isinstance(err, (CLIError, ValueError)) else 1


def main(argv=None):
    """Run the command line; every failure is one line on stderr and a non-zero exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"keras-hesstrace {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        return _report(args, err)


if __name__ == "__main__":
    sys.exit(main())
