"""Memory and time per call when every call passes a new (but equal) loss object.

Issue 18 case 4: the operator cache was keyed by the loss object's identity, so each call
with a fresh ``keras.losses.SparseCategoricalCrossentropy(...)`` built and traced a new
operator and kept it on the model: about +19 MB and one retrace per call, without bound.
The cache is now keyed by what the loss computes (class and config) and bounded.

    python benchmarks/loss_cache_memory.py            # 40 calls after 3 warm-up calls
    python benchmarks/loss_cache_memory.py --calls 100

Prints the resident set size before and after, MB per call and ms per call (small_cnn on
random 8x8 inputs, batch 32, one probe per call). Measured on 2 CPU cores: before the fix
(commit b1da8b8) 828 -> 1,685 MB, 21.4 MB and 976 ms per call; after, 787 -> 787 MB,
0.01 MB and 15 ms per call.
"""

import argparse
import time


def rss_mb():
    """This process's resident set size in MB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40, help="measured calls. Defaults to 40")
    args = parser.parse_args()

    import keras
    import numpy as np

    import keras_hesstrace as kh

    keras.utils.set_random_seed(0)
    model = kh.models.small_cnn(10, (8, 8, 1))
    model.compile(loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 10

    def call():
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # a new object each time
        kh.layer_traces(model, x, y, num_probes=1, seed=0, loss=loss, verbose=0)

    for _ in range(3):
        call()
    start, t = rss_mb(), time.perf_counter()
    for _ in range(args.calls):
        call()
    seconds, end = time.perf_counter() - t, rss_mb()
    print(f"{args.calls} calls, each with a new loss object: RSS {start:.0f} -> {end:.0f} MB, "
          f"{(end - start) / args.calls:.2f} MB per call, {seconds / args.calls * 1000:.0f} ms per call")


if __name__ == "__main__":
    main()
