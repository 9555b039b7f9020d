"""The ``keras-hesstrace`` command line."""

import argparse
import os
import sys
import time

# Quiet TensorFlow's C++ start-up chatter on the terminal (a user's setting wins).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _demo(args):
    """Calibrate the alert on clean digits runs, then watch a noisy-label run live."""
    from keras_hesstrace.experiments import run_demo

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

    from keras_hesstrace.experiments import memorisation as mem

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
    out = args.out or os.path.join("runs", config.name)
    if args.summarize_only:
        mem.summarize(config, out)
        return 0
    mem.run_experiment(config, out)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-hesstrace",
        description="Layer-wise Hessian traces of Keras models: one Hessian-vector product per probe gives every layer's trace.",
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

    from keras_hesstrace.experiments import memorisation as mem

    exp = sub.add_parser(
        "experiment",
        help="the memorisation experiment (Phase I calibration, Phase II noisy and held-out "
             "clean runs, Table-1 summary); resumable",
        description="Run or resume the memorisation experiment. Settings come from "
                    "--preset (cpu-small, paper, tiny), then --config FILE.json (fields of "
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
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
