"""The ``keras-hesstrace`` command line: the parser, the subcommands' entry points, ``main``.

Its flag types and the experiment settings as flags are in :mod:`keras_hesstrace.cli_flags`,
the quiet TensorFlow start-up in :mod:`keras_hesstrace.cli_quiet`, what the analysis commands
read in :mod:`keras_hesstrace.cli_inputs` and what they compute and write in
:mod:`keras_hesstrace.cli_commands`.
"""

import argparse
import os
import sys
import time

# Nothing here imports TensorFlow: `keras-hesstrace --help` and every refused flag answer in a
# fraction of a second. The commands import what they need (cli_commands, the experiments'
# runner) when they run, after the flags were checked.
from keras_hesstrace.cli_flags import (
    COUNT,
    POSITIVE,
    OneLineParser,
    field_help,
    flag_of_setting,
    metavar_of,
    number_type,
    parse_field,
    show_value,
)
from keras_hesstrace.cli_inputs import CLIError, first_line, writable_folder
from keras_hesstrace.cli_quiet import quiet_tensorflow

# keras_hesstrace.hvp's MODES and DEFAULT_MODE, without importing TensorFlow for them
# (tests/test_cli.py checks they agree).
MODES = ("auto", "forward", "reverse")
DEFAULT_MODE = "auto"

def __getattr__(name):
    if name == "commands":  # the analysis commands (cli_commands), imported on first use
        from keras_hesstrace import cli_commands

        return cli_commands
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _command(name):
    """The analysis command ``cli_commands.<name>``, looked up when it runs."""
    def run(args):
        from keras_hesstrace import cli_commands

        return getattr(cli_commands, name)(args)
    run.__name__ = name
    return run


# ===================================================================== flag checks


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


def _experiment(args):
    """Run (or resume) the memorisation experiment and write its Table-1 summary."""
    import dataclasses
    import json

    from keras_hesstrace.experiments import config as mem  # the settings: no TensorFlow yet

    settings = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            settings = json.load(f)
    name = settings.pop("preset", None) or args.preset or "cpu-small"
    config = mem.preset(name, **settings)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(mem.ExperimentConfig)
                 if hasattr(args, f.name)}  # flags given (absent ones are suppressed)
    try:
        if overrides:
            config = mem.ExperimentConfig.from_dict({**config.to_dict(), **overrides})
        config.validate()
    except ValueError as err:  # name the flag as well as the setting
        flag = flag_of_setting(str(err), {f.name for f in dataclasses.fields(mem.ExperimentConfig)}, overrides)
        if flag is None:
            raise
        raise CLIError(f"{flag}: {first_line(err)}") from None
    if args.show_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    if args.plan:
        print(json.dumps(mem.plan(config, args.step_seconds, args.hvp_seconds), indent=1))
        return 0
    out = writable_folder(args.out or os.path.join("runs", config.name), "--out")
    from keras_hesstrace import experiments

    if args.summarize_only:
        experiments.summarize(config, out)
        return 0
    experiments.run_experiment(config, out)
    return 0


def _study(args):
    """Run (or resume) PyHessian's architecture study, or print its plan."""
    import json

    from keras_hesstrace.experiments import study_config  # the settings: no TensorFlow yet

    config = study_config.study_preset(args.preset)
    if args.plan:
        print(json.dumps(study_config.study_plan(config, args.step_seconds, args.hvp_seconds), indent=1))
        return 0
    if args.out is None:
        raise CLIError("--out is required (the folder the study writes to, and resumes from).")
    out = writable_folder(args.out, "--out")
    from keras_hesstrace.experiments.study import run_study

    run_study(config, out)
    return 0


# ===================================================================== analysis CLI

TRACEBACK_ENV = "KERAS_HESSTRACE_TRACEBACK"


def _common(p):
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
    p.add_argument("--num-examples", type=COUNT, default=512, metavar="N", help="use the first N examples (default 512)")
    p.add_argument("--batch-size", type=COUNT, default=None, metavar="B",
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
    from keras_hesstrace._version import __version__

    parser = OneLineParser(
        prog="keras-hesstrace",
        description="Layer-wise Hessian traces of Keras models: one Hessian-vector product per probe gives every layer's trace. "
                    "Also the PyHessian toolset (top eigenvalues, spectral density, loss landscape) on a saved model.",
        epilog="Example: keras-hesstrace demo; keras-hesstrace estimate model.keras --data digits --out results/. "
               "'keras-hesstrace COMMAND --help' explains each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    demo = sub.add_parser(
        "demo",
        help="offline demo on the bundled digits: calibrate on clean runs, alert on a "
             "noisy-label run (a few minutes on 2 CPU cores)")
    demo.add_argument("--out", default="hesstrace-demo",
                      help="output folder: CSV, TensorBoard logs, calibration, PNG (default hesstrace-demo)")
    demo.add_argument("--epochs", type=COUNT, default=10, help="epochs per run (default 10)")
    demo.add_argument("--clean-runs", type=number_type(int, 3), default=4,
                      help="clean calibration runs, >= 3 (default 4)")
    demo.add_argument("--noise-rate", type=number_type(float, 0, 1, low_open=True, high_open=True), default=0.4,
                      help="label noise of the monitored run, in (0, 1) (default 0.4)")
    demo.add_argument("--every-n-steps", type=COUNT, default=22,
                      help="optimiser steps between trace snapshots (default 22, two per epoch)")
    demo.add_argument("--num-probes", type=COUNT, default=10, help="Hutchinson probes per snapshot (default 10)")
    demo.add_argument("--probe-batch-size", type=COUNT, default=256,
                      help="fixed batch of training images the traces are taken on (default 256)")
    demo.add_argument("--train-examples", type=COUNT, default=None,
                      help="train on a subset of the 1,400 training digits (a smaller budget; "
                           "at least --probe-batch-size)")
    demo.set_defaults(func=_demo)

    est = sub.add_parser(
        "estimate", help="per-layer Hessian traces with standard errors (table, traces.csv, traces.png)",
        description="Estimate tr(H_ll), the trace of every layer's Hessian block, with Hutchinson probes: each probe "
                    "costs one Hessian-vector product and gives all layers at once. Prints a table with standard "
                    "errors; --out writes traces.csv, estimate.json and a bar chart traces.png.",
        epilog="Example: keras-hesstrace estimate model.keras --data digits --num-probes 20 --out results/",
    )
    _common(est)
    est.add_argument("--num-probes", type=COUNT, default=20,
                     help="Hutchinson probes, one HVP each (default 20); with --rel-stderr, the first round")
    est.add_argument("--rel-stderr", type=number_type(float, 0, 1, low_open=True, high_open=True), default=None,
                     metavar="R", help="draw probes until every reported group's (and the total's) standard "
                                       "error is at most R times its trace, e.g. 0.05, or --max-probes is spent")
    est.add_argument("--max-probes", type=COUNT, default=None, metavar="N",
                     help="with --rel-stderr: the most probes to draw (default 1000)")
    est.add_argument("--scheme", choices=("single", "restricted", "auto"), default="single",
                     help="how probes are spent: 'single' (default) one HVP serves every layer; 'restricted' each "
                          "layer its own probes (PyHessian's per-layer route); 'auto' (needs --rel-stderr) the "
                          "cheapest per layer, by measured cost; traces.csv then says which each layer got")
    est.set_defaults(func=_command("run_estimate"))

    eig = sub.add_parser(
        "eigen", help="the top-k Hessian eigenvalues (Lanczos or power iteration)",
        description="The k largest-magnitude eigenvalues of the Hessian (the sharpness), by Lanczos with full "
                    "reorthogonalisation or PyHessian's power iteration with deflation. Stops when every eigenpair's "
                    "residual is below tol x |eigenvalue|. --block restricts to one layer's (or several layers') block.",
        epilog="Example: keras-hesstrace eigen model.keras --data digits --k 3 --out results/",
    )
    _common(eig)
    eig.add_argument("-k", "--k", dest="k", type=COUNT, default=1, help="number of eigenvalues (default 1)")
    eig.add_argument("--method", choices=("auto", "lanczos", "power"), default="auto", help="algorithm (default auto = lanczos: fewer HVPs than power iteration)")
    eig.add_argument("--which", choices=("LM", "LA"), default="LM", help="largest magnitude (LM, default, as PyHessian) or largest algebraic (LA)")
    eig.add_argument("--max-iter", type=COUNT, default=100, help="HVP budget per eigenvalue (default 100)")
    eig.add_argument("--tol", type=POSITIVE, default=1e-3, help="relative residual tolerance (default 1e-3)")
    eig.set_defaults(func=_command("run_eigen"))

    den = sub.add_parser(
        "density", help="the Hessian's eigenvalue density by stochastic Lanczos quadrature (density.png, log scale)",
        description="The eigenvalue spectral density of the Hessian by stochastic Lanczos quadrature (as PyHessian): "
                    "each run is one Lanczos pass of --lanczos-steps HVPs from a random start; its Ritz values and "
                    "weights are smoothed with a Gaussian kernel. --out writes nodes.csv, density.csv, density.json "
                    "and density.png (log scale).",
        epilog="Example: keras-hesstrace density model.keras --data digits --num-runs 2 --lanczos-steps 60 --out results/",
    )
    _common(den)
    den.add_argument("--num-runs", type=COUNT, default=1, help="independent Lanczos runs (default 1)")
    den.add_argument("--lanczos-steps", type=COUNT, default=90, help="Lanczos steps (HVPs) per run, clipped to the dimension (default 90)")
    den.add_argument("--sigma", type=POSITIVE, default=None, help="kernel width (default sqrt(1e-5 * max(1, range)), PyHessian's)")
    den.set_defaults(func=_command("run_density"))

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
    land.add_argument("--grid", type=COUNT, default=21, help="points per axis (default 21)")
    land.add_argument("--span", type=POSITIVE, default=1.0, help="the grid covers [-span, span] along each direction (default 1.0)")
    land.set_defaults(func=_command("run_landscape"))

    from keras_hesstrace.experiments import config as mem  # the settings only: no TensorFlow

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
    exp.add_argument("--step-seconds", type=POSITIVE, default=None,
                     help="with --plan: measured seconds per optimiser step, for a time estimate")
    exp.add_argument("--hvp-seconds", type=POSITIVE, default=None,
                     help="with --plan: measured seconds per HVP on the probe batch")
    exp.add_argument("--show-config", action="store_true", help="print the resolved settings and exit")
    exp.add_argument("--summarize-only", action="store_true",
                     help="only rewrite the summary and plots from the finished runs")
    import dataclasses
    import typing

    hints = typing.get_type_hints(mem.ExperimentConfig)
    helps = field_help(mem.ExperimentConfig)
    settings = exp.add_argument_group(
        "settings", "each overrides the preset's value (shown as cpu-small's); lists are comma-separated, "
                    "'none' clears an optional setting")
    for f in dataclasses.fields(mem.ExperimentConfig):
        default = mem.PRESETS["cpu-small"].get(
            f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, f.name.replace('_', ' '))} [cpu-small: {show_value(default)}]"
        if hints[f.name] is bool:  # a switch: --augment / --no-augment
            settings.add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                                  action=argparse.BooleanOptionalAction, help=text)
        else:
            settings.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=parse_field(hints[f.name]),
                                  metavar=metavar_of(hints[f.name]), help=text)
    exp.set_defaults(func=_experiment)
    study = sub.add_parser(
        "study",
        help="PyHessian's architecture study: ResNet variants' eigenvalues, trace, per-stage "
             "traces, SLQ density and loss landscape at checkpoints; resumable",
        description="Train the preset's ResNet variants and measure their Hessians at the checkpoint "
                    "epochs (docs/pyhessian-study.md). Rerun with the same --out to resume.")
    study.add_argument("--preset", choices=("tiny", "cpu-small", "paper"), required=True,
                       help="tiny (seconds), cpu-small (offline digits, 2 CPU cores), paper (CIFAR-10)")
    study.add_argument("--out", default=None, help="output folder (required unless --plan)")
    study.add_argument("--plan", action="store_true", help="print the steps and HVPs the preset costs, and exit")
    study.add_argument("--step-seconds", type=POSITIVE, default=None,
                       help="with --plan: measured seconds per optimiser step, for a time estimate")
    study.add_argument("--hvp-seconds", type=POSITIVE, default=None,
                       help="with --plan: measured seconds per HVP on the Hessian batch")
    study.set_defaults(func=_study)
    for command in sub.choices.values():
        command.add_argument("--traceback", action="store_true",
                             help=f"on an error, print the full traceback too (or set {TRACEBACK_ENV}=1)")
        command.add_argument("--verbose", action="store_true",
                             help="show TensorFlow's start-up and info logs (quiet by default)")
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


def check_flag_combinations(args):
    """Refuse flags that are each valid but not together: CLIError before anything is loaded."""
    if getattr(args, "from_logits", False) and args.loss is None:
        raise CLIError("--from-logits only applies with --loss (the compiled loss keeps its own setting).")
    if args.command == "eigen" and args.method == "power" and args.which == "LA":
        raise CLIError("--which LA needs --method lanczos (or auto): power iteration finds the "
                       "largest-magnitude eigenvalues only.")
    if args.command == "estimate" and args.max_probes is not None and args.rel_stderr is None:
        raise CLIError("--max-probes only applies with --rel-stderr (without it, --num-probes is the count).")
    if args.command == "estimate" and args.scheme == "auto" and args.rel_stderr is None:
        raise CLIError("--scheme auto chooses probes to meet a target: add --rel-stderr R (e.g. 0.05).")
    if args.command == "demo" and args.train_examples is not None and args.train_examples < args.probe_batch_size:
        raise CLIError(f"--train-examples {args.train_examples} must be at least --probe-batch-size "
                       f"({args.probe_batch_size}).")


def main(argv=None):
    """Run the command line; every failure is one line on stderr and a non-zero exit code.

    Returns the exit code (0 after --help and --version, 2 for a refused flag).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version (0) or a usage error (2, its line printed)
        return done.code
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not args.verbose:
        quiet_tensorflow()
    try:
        check_flag_combinations(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"keras-hesstrace {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout piped into e.g. `head`, which has stopped reading: no error
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not fail again
        except (OSError, ValueError):
            pass
        return 141
    except Exception as err:
        return _report(args, err)


if __name__ == "__main__":
    sys.exit(main())
