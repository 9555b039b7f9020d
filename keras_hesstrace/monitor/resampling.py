"""The calibration's resampling: leave-one-out z of clean runs, resampled into long
sequences on which the in-control run length ARL0(h) is estimated (docs/method.md §7.4).

Contents:
    loo_standardize     each clean run standardised with the other runs' baseline.
    block_indices       the circular block bootstrap within runs.
    Resampled           ARL0(h) on resampled sequences (the recursion is
                        ``page_hinkley.page_hinkley_statistics``).
    bracket_threshold, bisect_threshold
                        the h with ARL0(h) = target (its bracket; its upper end).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from keras_hesstrace.monitor.baseline import (
    apply_transform,
    as_trajectories,
    check_reference,
    check_transform,
    first_scored,
    relative_to_reference,
)
from keras_hesstrace.monitor.page_hinkley import page_hinkley_statistics

_CHUNK_ELEMENTS = 2_000_000  # sequences x snapshots simulated at once (16 MB per array)
_STREAM_BATCH = 65_536  # values drawn at a time (about) by _IndexStream


def loo_standardize(trajectories: np.ndarray | Sequence[np.ndarray], transform: str | None = None,
                    ddof: int = 1, reference: int | None = None) -> list[np.ndarray]:
    """Leave-one-out z of each clean run.

    Args:
        trajectories: 2-D array [N, T] (trailing-NaN padded) or N 1-D arrays [T_i];
            N >= 3.
        transform: None or ``"log"``.
        ddof: of the baselines' standard deviations.
        reference: None, or the snapshot r each run is scored relative to (see
            ``keras_hesstrace.monitor.baseline``).

    Returns:
        list of N float64 arrays; run i's array holds its z at the scored snapshots
        s, s+1, ..., T_i'-1, where s = 0 (s = r + 1 with a reference) and T_i' <= T_i
        stops at the first snapshot that fewer than two other runs reach.

    Raises:
        ValueError: fewer than three runs, or zero spread among the other runs at a
            snapshot (run and snapshot named).
    """
    check_transform(transform)
    reference = check_reference(reference)
    runs = [apply_transform(r, transform, what="clean-run value")
            for r in as_trajectories(trajectories)]
    runs = relative_to_reference(runs, reference)
    off = first_scored(reference)
    n = len(runs)
    if n < 3:
        raise ValueError(
            f"Leave-one-out calibration needs at least three clean runs (each run is "
            f"standardised with the other runs' baseline, which needs two), got {n}."
        )
    T = max(len(r) for r in runs)
    padded = np.full((n, T), np.nan)
    for i, r in enumerate(runs):
        padded[i, : len(r)] = r
    out = []
    for i, r in enumerate(runs):
        others = np.delete(padded, i, axis=0)
        count = np.sum(~np.isnan(others[:, : len(r)]), axis=0)
        usable = int(np.argmin(count >= 2)) if np.any(count < 2) else len(r)
        others = others[:, :usable]
        mu = np.nanmean(others, axis=0)
        sd = np.nanstd(others, axis=0, ddof=ddof)
        zero = np.flatnonzero(~(sd > 0))
        if zero.size:
            raise ValueError(
                f"The clean runs other than run {i} have zero spread at snapshot "
                f"{int(zero[0]) + off}: cannot standardise."
            )
        out.append((r[:usable] - mu) / sd)
    return out


def block_indices(lengths: np.ndarray, n_values: int, block_length: int | None,
                  rng: np.random.Generator) -> np.ndarray:
    """Indices into the concatenated runs for a stream of ``n_values`` resampled values.

    Circular block bootstrap within runs (Politis and Romano 1992): each block picks a
    run i with probability proportional to its length and a start s uniform in
    [0, T_i), and takes the run's values s, s+1, ... wrapping around the end of the
    run, ``min(block_length, T_i)`` of them (the whole run when ``block_length`` is
    None). Blocks are concatenated into one stream. With block_length 1 every value of
    the pool is equally likely: i.i.d. resampling of the pooled values.

    Args:
        lengths: int array [N], T_i of each run (>= 1).
        n_values: values wanted.
        block_length: int >= 1 or None (whole runs).
        rng: ``numpy.random.Generator``.

    Returns:
        int64 array [n_values] of indices into the runs concatenated in order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    p = lengths / lengths.sum()
    blen = lengths if block_length is None else np.minimum(lengths, int(block_length))
    mean_block = float(np.sum(p * blen))
    pieces, have = [], 0
    while have < n_values:
        k = int(math.ceil((n_values - have) / mean_block * 1.05)) + 8
        run = rng.choice(lengths.size, size=k, p=p)
        offset = rng.integers(0, lengths[run])
        b = blen[run]
        total = int(b.sum())
        block_of = np.repeat(np.arange(k), b)
        within = np.arange(total) - np.repeat(np.cumsum(b) - b, b)
        idx = starts[run][block_of] + (offset[block_of] + within) % lengths[run][block_of]
        pieces.append(idx)
        have += total
    return np.concatenate(pieces)[:n_values]


class _IndexStream:
    """One endless stream of resampled indices, handed out in pieces of any size.

    Values are drawn in batches of a fixed size (``_STREAM_BATCH`` values i.i.d., or
    the number of blocks whose mean total is about that), and what a ``take`` does not
    use is kept for the next one (the resampling position): the stream is the same
    whatever the sizes of the pieces taken. Blocks are those of ``block_indices``.
    """

    def __init__(self, lengths, block_length, rng):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.block_length = block_length
        self.rng = rng
        self.iid = block_length is not None and int(block_length) == 1
        self.p = self.lengths / self.lengths.sum()
        self.blen = (self.lengths if block_length is None
                     else np.minimum(self.lengths, int(block_length)))
        self.n_blocks = max(1, int(_STREAM_BATCH // float(np.sum(self.p * self.blen))))
        self.left = np.empty(0, dtype=np.int64)

    def _batch(self):
        if self.iid:
            return self.rng.integers(0, int(self.lengths.sum()), size=_STREAM_BATCH)
        lengths = self.lengths
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        run = self.rng.choice(lengths.size, size=self.n_blocks, p=self.p)
        offset = self.rng.integers(0, lengths[run])
        b = self.blen[run]
        block_of = np.repeat(np.arange(run.size), b)
        within = np.arange(int(b.sum())) - np.repeat(np.cumsum(b) - b, b)
        return starts[run][block_of] + (offset[block_of] + within) % lengths[run][block_of]

    def take(self, n):
        """int64 array [n]: the next n indices of the stream."""
        pieces, have = [self.left], self.left.size
        while have < n:
            pieces.append(self._batch())
            have += pieces[-1].size
        out = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        self.left = out[n:].copy()
        return out[:n]


def _records(stat, run_max_before, t0):
    """Records of the running maximum of ``stat`` [c, L] that continues the running
    maxima ``run_max_before`` [c] (-inf at a sequence's start); times 1-based from t0.

    Returns (values, times, counts per row, running maxima after the piece [c]).
    """
    run_max = np.maximum.accumulate(stat, axis=1)
    np.maximum(run_max, run_max_before[:, None], out=run_max)
    is_record = np.empty(run_max.shape, dtype=bool)
    np.greater(run_max[:, :1], run_max_before[:, None], out=is_record[:, :1])
    np.greater(run_max[:, 1:], run_max[:, :-1], out=is_record[:, 1:])
    rows, cols = np.nonzero(is_record)  # row-major: grouped by sequence, in time
    return run_max[rows, cols], cols + 1 + t0, is_record.sum(axis=1), run_max[:, -1].copy()


class Resampled:
    """Running maxima of max(g+, g-) on resampled z sequences, kept as their records.

    The sequences are drawn once (fixed seed): i.i.d. from the pooled z
    (``block_length=1``, the method paper's rule, docs/method.md §7.6), or by a circular block bootstrap
    within the runs (``segments`` given, ``block_length`` > 1 or None = whole runs),
    which keeps the serial dependence of each run's z up to the block length.

    The running maximum M_t of each sequence is non-decreasing, so the run length for
    any h is the time of the first record of M above h. Keeping only the records (value
    and time at each increase of M) makes ARL0(h) cheap to evaluate for many h.

    Memory is bounded by ``time_chunk`` (default ``_CHUNK_ELEMENTS``) whatever the
    length: sequences of at most ``time_chunk`` snapshots are simulated several at a
    time (``time_chunk // length`` of them per array); a longer sequence is simulated
    alone, ``time_chunk`` snapshots at a time, carrying g+, g-, the running maximum and
    the position in the resampled stream from one piece to the next. The records of a
    sequence number O(log length) for a stationary z, so they stay small.

    Args:
        segments: list of 1-D arrays, the runs' z (their concatenation is the pool).
        delta: allowance.
        n_sequences: sequences simulated.
        length: snapshots per sequence.
        seed: int.
        block_length: int >= 1 or None (whole runs); 1 draws from the pool i.i.d.
        time_chunk: snapshots per array (default ``_CHUNK_ELEMENTS``).
    """

    def __init__(self, segments: Sequence[np.ndarray], delta: float, n_sequences: int, length: int,
                 seed: int, block_length: int | None = 1, time_chunk: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.length = int(length)
        self.n_sequences = int(n_sequences)
        pool = np.concatenate(segments)
        lengths = np.array([len(s) for s in segments])
        time_chunk = _CHUNK_ELEMENTS if time_chunk is None else int(time_chunk)
        if self.length <= time_chunk:
            values, times, counts = self._whole(pool, lengths, delta, block_length, rng,
                                                time_chunk)
        else:
            values, times, counts = self._in_pieces(pool, lengths, delta, block_length,
                                                    rng, time_chunk)
        self.values = np.concatenate(values)
        self.times = np.concatenate(times).astype(np.float64)
        self.counts = np.concatenate(counts)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    def _whole(self, pool, lengths, delta, block_length, rng, time_chunk):
        """Whole sequences, ``time_chunk // length`` of them per array."""
        iid = block_length is not None and int(block_length) == 1
        per_chunk = max(1, time_chunk // self.length)
        values, times, counts = [], [], []
        done = 0
        while done < self.n_sequences:
            c = min(per_chunk, self.n_sequences - done)
            if iid:
                z = pool[rng.integers(0, pool.size, size=(c, self.length))]
            else:
                z = pool[block_indices(lengths, c * self.length, block_length, rng)]
                z = z.reshape(c, self.length)
            g_pos, g_neg = page_hinkley_statistics(z, delta)  # the one recursion
            del z
            stat = np.maximum(g_pos, g_neg, out=g_pos)
            del g_neg
            v, t, n, _ = _records(stat, np.full(c, -np.inf), 0)
            values.append(v)
            times.append(t)
            counts.append(n)
            done += c
        return values, times, counts

    def _in_pieces(self, pool, lengths, delta, block_length, rng, time_chunk):
        """One sequence at a time, ``time_chunk`` snapshots per array, state carried:
        sequence j is values [j * length, (j + 1) * length) of one ``_IndexStream``."""
        stream = _IndexStream(lengths, block_length, rng)
        values, times, counts = [], [], []
        for _ in range(self.n_sequences):
            g = (np.zeros(1), np.zeros(1))
            run_max = np.full(1, -np.inf)
            n = 0
            for t0 in range(0, self.length, time_chunk):
                z = pool[stream.take(min(time_chunk, self.length - t0))][None, :]
                g_pos, g_neg = page_hinkley_statistics(z, delta, initial=g)  # the one recursion
                del z
                g = (g_pos[:, -1].copy(), g_neg[:, -1].copy())
                stat = np.maximum(g_pos, g_neg, out=g_pos)
                del g_neg
                v, t, k, run_max = _records(stat, run_max, t0)
                del stat, g_pos
                values.append(v)
                times.append(t)
                n += int(k[0])
            counts.append(np.array([n]))
        return values, times, counts

    def run_lengths(self, h: float) -> np.ndarray:
        """[n_sequences] run lengths at threshold h, NaN where censored."""
        below = np.add.reduceat((self.values <= h).astype(np.int64), self.starts)
        censored = below >= self.counts
        idx = np.minimum(self.starts + below, self.values.size - 1)
        return np.where(censored, np.nan, self.times[idx])

    def arl(self, h: float) -> float:
        """ARL0(h): observed snapshots / alerts (geometric MLE under censoring)."""
        rl = self.run_lengths(h)
        alerts = int(np.sum(~np.isnan(rl)))
        if alerts == 0:
            return math.inf
        return float(np.nansum(rl) + self.length * (rl.size - alerts)) / alerts

    def censored_fraction(self, h: float) -> float:
        return float(np.mean(np.isnan(self.run_lengths(h))))

    def alert_prob(self, h: float, horizon: int) -> float:
        """Share of sequences alerting within their first ``horizon`` snapshots."""
        rl = self.run_lengths(h)
        return float(np.mean(~np.isnan(rl) & (rl <= horizon)))


def bracket_threshold(sim: Resampled, target: float, tol: float) -> tuple[float, float]:
    """(lo, hi) with ARL0(lo) < target <= ARL0(hi) and hi - lo <= tol * max(hi, 1),
    by doubling from h = 1 and bisection."""
    lo = 0.0
    if sim.arl(lo) >= target:
        raise ValueError(
            f"target_arl0={target} is not above ARL0(h=0)={sim.arl(lo):.3g}: every "
            "threshold gives a longer run length. Use a larger target."
        )
    hi = 1.0
    while sim.arl(hi) < target:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"No threshold below 1e4 reaches ARL0={target}.")
    while hi - lo > tol * max(hi, 1.0):
        mid = 0.5 * (lo + hi)
        if sim.arl(mid) < target:
            lo = mid
        else:
            hi = mid
    return lo, hi


def bisect_threshold(sim: Resampled, target: float, tol: float) -> float:
    """Smallest-bracket h with ARL0(h) >= target: the upper end of ``bracket_threshold``."""
    return bracket_threshold(sim, target, tol)[1]
