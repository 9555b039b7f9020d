"""The ``keras-hesstrace`` command line."""

import argparse
import os
import sys
import time

# Quiet TensorFlow's C++ start-up chatter on the terminal (a user's setting wins).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _demo(args):
    """Train a small model on the bundled 8x8 digits and print its per-layer traces."""
    import numpy as np
    import keras
    from sklearn.datasets import load_digits

    import keras_hesstrace as kh

    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype("float32")
    y = digits.target.astype("int64")
    keras.utils.set_random_seed(args.seed)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(64, activation="relu", name="dense"),
            keras.layers.Dense(10, name="head"),
        ],
        name="digits_cnn",
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(f"Training a small CNN on scikit-learn's bundled digits ({len(x)} images, 8x8) for {args.epochs} epochs...")
    model.fit(x, y, batch_size=32, epochs=args.epochs, verbose=2)
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(x), size=256, replace=False)
    start = time.perf_counter()
    result = kh.layer_traces(model, x[idx], y[idx], num_probes=args.num_probes, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(f"\nLayer-wise Hessian traces on 256 training images ({args.num_probes} probes, one HVP each, {elapsed:.1f} s):")
    print(result)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-hesstrace",
        description="Layer-wise Hessian traces of Keras models: one Hessian-vector product per probe gives every layer's trace.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="offline demo on the bundled digits dataset (about a minute on 2 CPU cores)")
    demo.add_argument("--epochs", type=int, default=3, help="training epochs before the estimate (default 3)")
    demo.add_argument("--num-probes", type=int, default=20, help="Hutchinson probes (default 20)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)
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
