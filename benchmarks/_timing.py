"""Timing shared by the benchmark scripts (imported by name: the scripts' folder is on sys.path)."""

import statistics
import time


def timed(fn, warmup, reps):
    """Call ``fn`` ``warmup`` times untimed, then ``reps`` times timed.

    Returns:
        (median seconds, list of the ``reps`` wall-clock times in seconds).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
