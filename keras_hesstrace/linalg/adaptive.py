"""Probes until a relative standard error is met: the stopping rule of ``layer_traces(rel_stderr=r)``.

Pure numpy. Columns of ``samples`` [M, K] are independent per-probe Hutchinson samples of K
quantities (the requested groups' contractions and the whole-model <v, Hv>); row m comes
from probe m, so a run with more probes extends a shorter one's rows.

The rule (docs/method.md §3): a pilot of M0 probes; then, after each round, the probe
count that every column needs,

    M_needed = max_k ceil( s_k² / (r · |x̄_k|)² ),   s_k² the sample variance, x̄_k the mean,

is computed from ALL samples so far, and the run is extended to it (by at least a tenth of
the current count, rounded up to a multiple of the probes per call, at most ``max_probes``)
until every column's estimated relative standard error s_k / (√M |x̄_k|) is at most r, or
``max_probes`` is reached. The final estimate is the mean of all M probes.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np

from keras_hesstrace.linalg.common import stderr as _stderr


def relative_stderr(samples: np.ndarray) -> np.ndarray:
    """float64 [K]: |stderr / mean| of each column of ``samples`` [M, K] (inf where the mean is 0, NaN for M < 2)."""
    samples = np.asarray(samples, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(np.atleast_1d(_stderr(samples)) / samples.mean(axis=0))


def target_met(samples: np.ndarray, rel_stderr: float) -> np.ndarray:
    """bool [K]: whether each column's estimated relative standard error is at most ``rel_stderr``.

    Args:
        samples: float [M, K], M per-probe samples of K quantities.
        rel_stderr: the target r, in (0, 1).

    Returns:
        bool [K]; False where M < 2, the mean is 0 or a sample is not finite.

    >>> s = np.array([[1.0, 0.0], [1.2, 1.0], [0.8, -1.0]])
    >>> target_met(s, 0.2).tolist()
    [True, False]
    """
    rel = relative_stderr(samples)
    with np.errstate(invalid="ignore"):
        return np.isfinite(rel) & (rel <= rel_stderr)


def probes_needed(samples: np.ndarray, rel_stderr: float, cap: int | None = None) -> int:
    """The probe count at which every column's relative standard error reaches ``rel_stderr``.

    Estimated from ``samples`` [M, K] (M >= 2): max over columns k of
    ceil(s_k² / (r x̄_k)²), at least 2. A column with mean 0 or non-finite samples can
    never meet a relative target; it needs ``cap`` (or ``sys.maxsize`` without a cap).

    Args:
        samples: float [M, K].
        rel_stderr: the target r.
        cap: the largest count to return, or None.

    Returns:
        int, at most ``cap`` when given.

    >>> s = np.array([[1.0], [3.0]])           # mean 2, variance 2
    >>> probes_needed(s, 0.1)                   # 2 / (0.1 * 2)**2 = 50
    50
    >>> probes_needed(np.array([[1.0], [-1.0]]), 0.1, cap=1000)   # mean 0: unreachable
    1000
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.shape[0] < 2:
        raise ValueError(f"probes_needed needs at least 2 samples, got {samples.shape[0]}.")
    limit = sys.maxsize if cap is None else int(cap)
    var = samples.var(axis=0, ddof=1)
    mean = samples.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        need = var / (rel_stderr * mean) ** 2
    if not np.all(np.isfinite(need)) or np.any(need >= sys.maxsize):
        return limit
    # A relative tolerance so that a count that meets the target exactly is not rounded up.
    needed = max(2, max((math.ceil(n * (1 - 1e-12)) for n in need), default=2))
    return min(needed, limit)


def next_round(current: int, needed: float, max_probes: int, multiple: int = 1) -> int:
    """The probe count after the next round, given the count ``needed`` estimated so far.

    ``needed`` (a non-finite one: ``max_probes``), up to a relative 1e-12 so that an exact
    count is not rounded up; at least ``current + ceil(current / 10)``; rounded up to a
    multiple of ``multiple`` (the probes per compiled call); at most ``max_probes``. The one
    growth rule of every estimator that draws to a target (layer_traces, hutchinson_trace,
    hutchinson_diagonal, the coordinate design's sweeps).

    >>> next_round(10, 50.0, 1000), next_round(10, 3.0, 1000), next_round(10, float("inf"), 400)
    (50, 11, 400)
    >>> next_round(10, 50.0, 1000, multiple=8), next_round(10, 50.0, 30)
    (56, 30)
    """
    want = max_probes if not math.isfinite(needed) else math.ceil(needed * (1 - 1e-12))
    want = max(want, current + math.ceil(current / 10))
    want = -(-want // multiple) * multiple
    return int(min(want, max_probes))


def next_probe_count(samples: np.ndarray, rel_stderr: float, max_probes: int, multiple: int = 1) -> int:
    """How many probes the run should have after the next round (the current M when it should stop).

    Stops (returns M) when every column meets the target, M >= ``max_probes``, or a sample
    is not finite. Otherwise: ``probes_needed`` from all samples so far, at least
    M + ceil(M / 10), rounded up to a multiple of ``multiple`` (the probes per compiled
    call), at most ``max_probes``.

    >>> s = np.array([[1.0], [3.0]])
    >>> next_probe_count(s, 0.1, max_probes=1000), next_probe_count(s, 0.1, max_probes=20)
    (50, 20)
    >>> next_probe_count(s, 0.9, max_probes=1000)   # met already
    2
    """
    m = int(samples.shape[0])
    if m >= max_probes or not np.all(np.isfinite(samples)) or np.all(target_met(samples, rel_stderr)):
        return m
    return next_round(m, probes_needed(samples, rel_stderr, cap=max_probes), max_probes, multiple)


def run_until_met(draw: Callable[[int, int], np.ndarray], num_probes: int, rel_stderr: float,
                  max_probes: int, multiple: int = 1) -> np.ndarray:
    """Draw probes in rounds until :func:`next_probe_count` says stop; all the samples.

    Args:
        draw: ``draw(start, stop)`` returns float [stop - start, K], the samples of probes
            start, ..., stop - 1 (probe m's samples must not depend on the round it is drawn in).
        num_probes: the pilot's size M0 (>= 2).
        rel_stderr: the target r.
        max_probes: the most probes in all.
        multiple: the probes per compiled call (rounds are rounded up to it).

    Returns:
        float [M, K] with M0 <= M <= max(M0, max_probes).

    >>> rng = np.random.default_rng(0)
    >>> table = 5.0 + rng.normal(size=(1000, 1))     # mean 5, sd 1: about 1 / (0.05 * 5)**2 = 16
    >>> len(run_until_met(lambda a, b: table[a:b], 10, 0.05, 1000)) in range(10, 40)
    True
    """
    samples = np.asarray(draw(0, num_probes), dtype=np.float64)
    while True:
        m = samples.shape[0]
        target = next_probe_count(samples, rel_stderr, max_probes, multiple)
        if target <= m:
            return samples
        samples = np.concatenate([samples, np.asarray(draw(m, target), dtype=np.float64)])


DEFAULT_MAX_PROBES = 1000


def check_target(rel_stderr, max_probes, num_probes: int):
    """Validate ``rel_stderr`` and ``max_probes`` against ``num_probes``; ``(r, max_probes)``.

    ``rel_stderr`` None: a fixed count (``max_probes`` must then be None too). Otherwise r
    is a number in (0, 1), ``num_probes`` (the pilot) at least 2 and ``max_probes``
    (default 1000) at least ``num_probes``.

    >>> check_target(None, None, 10), check_target(0.1, None, 10)
    ((None, None), (0.1, 1000))
    """
    from keras_hesstrace._validate import check_integer

    if rel_stderr is None:
        if max_probes is not None:
            raise ValueError(f"max_probes is used only with rel_stderr (a target); got max_probes={max_probes!r} "
                             "and rel_stderr=None.")
        return None, None
    if (isinstance(rel_stderr, bool) or not isinstance(rel_stderr, (int, float, np.floating, np.integer))
            or not 0 < float(rel_stderr) < 1):
        raise ValueError(f"rel_stderr must be None (a fixed num_probes) or a number in (0, 1), got {rel_stderr!r}.")
    if num_probes < 2:
        raise ValueError(f"num_probes (the pilot with rel_stderr) must be an integer >= 2, got {num_probes!r}.")
    max_probes = DEFAULT_MAX_PROBES if max_probes is None else max_probes
    max_probes = check_integer("max_probes", max_probes, minimum=num_probes)
    return float(rel_stderr), max_probes
