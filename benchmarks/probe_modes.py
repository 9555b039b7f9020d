"""Time of one layer_traces probe per HVP mode, interleaved with a gradient in one process.

hvp_cost.py runs each operation in its own process (so each has its own peak memory), but
on a shared or noisy machine the processes see different conditions. This script runs the
configurations below in one process, interleaved round by round (gradient, then each
probe configuration, repeated), so slow periods hit them all alike; it reports the median
time of each and its ratio to the gradient's median. Memory: see hvp_cost.py.

    gradient                   one gradient of the loss (tf.function)
    reverse / forward          layer_traces, 1 probe, mode="reverse" / "forward"
    auto (default)             layer_traces, 1 probe, the default mode="auto" (forward after
                               its one-time check on this model); the check's own cost
                               (both products traced and run once) is printed apart
    reverse|forward, chunk B   the same with max_batch_size=B
    reverse, P per call        probes_per_call=P (shared forward + first backward), time per probe

    python benchmarks/probe_modes.py                       # ResNet-18, batch 128, 5 rounds (~6 min on 2 cores)
    python benchmarks/probe_modes.py --batch 64 --rounds 3
    python benchmarks/probe_modes.py --configs gradient,forward,"auto (default)"
"""

import argparse
import os
import platform
import statistics
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--chunk", type=int, default=64, help="max_batch_size of the chunked rows")
    parser.add_argument("--configs", default=None, help="comma-separated rows to run (default all)")
    args = parser.parse_args()

    import tensorflow as tf
    import keras

    import keras_hesstrace as kh
    from keras_hesstrace.batches import to_tensors
    from keras_hesstrace.losses import make_objective
    from hvp_cost import _setup  # the same model and batch as hvp_cost.py

    model, x, y = _setup(args.batch, args.arch)
    x, y = to_tensors(x, y)
    variables = model.trainable_variables
    objective = make_objective(model)

    @tf.function
    def gradient(x, y):
        with tf.GradientTape() as tape:
            loss = objective(x, y)
        return tape.gradient(loss, variables)

    def probe(mode, chunk=None, per_call=1):
        def run(seed):
            kh.layer_traces(model, x, y, num_probes=per_call, probes_per_call=per_call, mode=mode,
                            max_batch_size=chunk, seed=seed, verbose=0)
            return per_call
        return run

    configs = {
        "gradient": lambda seed: [g.numpy() for g in gradient(x, y)] and 1,
        "reverse": probe("reverse"),
        "forward": probe("forward"),
        "auto (default)": probe("auto"),
        f"reverse, chunk {args.chunk}": probe("reverse", args.chunk),
        f"forward, chunk {args.chunk}": probe("forward", args.chunk),
        "reverse, 2 per call": probe("reverse", per_call=2),
    }
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",")]
        unknown = sorted(set(wanted) - set(configs))
        if unknown:
            parser.error(f"--configs: unknown {unknown}; choose from {list(configs)}")
        configs = {name: fn for name, fn in configs.items() if name in wanted or name == "gradient"}
    times = {name: [] for name in configs}
    for round_ in range(args.rounds + 1):  # round 0 traces and warms up
        for name, fn in configs.items():
            start = time.perf_counter()
            per = fn(round_)
            if round_:
                times[name].append((time.perf_counter() - start) / per)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{n} {t[-1]:.2f}" for n, t in times.items()), flush=True)

    check = kh.hessian_operator(model, None, None, "auto").mode_check
    if check is not None:
        print(f"\nmode='auto' check: chose {check.mode} ({check.reason}; relative difference "
              f"{check.relative_difference:.2g}), {check.seconds:.2f} s once, both products traced and run")
    grad = statistics.median(times["gradient"])
    print(f"\n{args.arch}, batch {args.batch}, float32; TF {tf.__version__}, Keras {keras.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, "
          f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}; median of {args.rounds} "
          "interleaved rounds after a warm-up round, one process\n")
    print("| operation | median s (per probe) | × gradient | the rounds |")
    print("|---|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.2f} | {med / grad:.2f}× | {', '.join(f'{v:.2f}' for v in t)} |")


if __name__ == "__main__":
    main()
