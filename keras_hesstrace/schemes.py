"""The cheapest probe scheme per group: what ``layer_traces(..., scheme=...)`` runs.

Three unbiased estimators of a group's block trace tr(H_ll), each a mean of i.i.d. samples
(docs/method.md §3b):

- ``"single"``: the single pass. One Rademacher probe v over ALL parameters, one HVP, and
  s_l = <v_l, (Hv)_l> for every group at once. Its per-probe variance carries the
  cross-layer term: Var = 2 Σ_{i≠j∈l} H_ij² + Σ_{k≠l} ‖H_lk‖²_F.
- ``"restricted"``: a probe that is zero outside group l (PyHessian's per-layer route): one
  HVP for one group, variance 2 Σ_{i≠j∈l} H_ij² only. Group l's probe m uses the stateless
  seed (seed, (l + 1)·2⁴⁰ + m), a stream apart from the single pass's (seed, m).
- ``"coordinates"``: for small groups (at most ``COORDINATE_MAX_SIZE`` scalars), a sweep of
  N = max size HVPs. HVP p of a sweep sets ONE entry of every such group, c_l = π_l(p mod n_l)
  for a random permutation π_l, to a random sign σ_l, and zero elsewhere; then
  x_l = σ_l (Hv)_{c_l} = H_{c_l c_l} + Σ_{k≠l} σ_l σ_k H_{c_l c_k} has mean H_{c_l c_l}. A
  sweep's sample Σ_p x_l(p) / (visits of c_l in the sweep) is an unbiased sample of
  tr(H_ll) whose noise is a sum of single entries across groups (no group's own
  off-diagonal, no big layer's), so a few sweeps usually pin a small group's trace.

``scheme="auto"`` spends probes where they buy the most time, measured as it goes:

1. a single-pass pilot of ``num_probes`` (it also gives the total);
2. a restricted pilot of ``num_probes`` for every group whose single-pass need is more than
   twice the pilot;
3. if the restricted probes still needed by the small groups among them are projected to
   cost more than ``DESIGN_TRIAL_FACTOR`` times two sweeps of the coordinate design, a
   design pilot of two sweeps, and the design keeps the small groups for which it saves
   the most time (:func:`design_groups`); a kept group that the design leaves short of the
   target after its sweeps goes back to the others;
4. for the others, :func:`single_pass_count` picks the single-pass count that minimises the
   measured time (the single pass keeps the groups it serves at that count, and the total;
   the rest run restricted);
5. every run then draws rounds until its groups meet the target; the single pass only to
   twice its planned count (further only as the total needs), and a group it still leaves
   short goes restricted, since the plan rests on pilot estimates
   (:func:`keras_hesstrace.linalg.adaptive.run_until_met`; the design by
   :func:`run_design`, with its error pooled over entries).

Pilots that end up unused are the price of choosing; ``num_hvps_drawn`` counts them.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from keras_hesstrace.linalg.adaptive import next_probe_count, next_round, probes_needed, run_until_met, target_met

SCHEMES = ("single", "restricted", "auto")
# The largest group (scalar parameters) the coordinate design serves: a sweep costs as many
# HVPs as its largest group has entries.
COORDINATE_MAX_SIZE = 256
RESTRICTED_STREAM = 2**40
# The coordinate design is tried (a pilot of two sweeps) only when the restricted probes it
# could replace are projected to cost this many times the pilot.
DESIGN_TRIAL_FACTOR = 4


def check_scheme(scheme, rel_stderr):
    """Validate ``scheme`` for ``layer_traces``; "auto" needs a target."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, not {scheme!r}.")
    if scheme == "auto" and rel_stderr is None:
        raise ValueError("scheme='auto' chooses probes to meet a target: pass rel_stderr (e.g. 0.05) too.")


def single_pass_count(need_single, need_restricted, pilot, floor, cost_single, cost_restricted):
    """The single-pass probe count that minimises the plan's time, and which groups then go restricted.

    Group l is served by the single pass if its single-pass need is at most the count M,
    else restricted (with ``need_restricted[l]`` probes, of which ``pilot`` are drawn):

        time(M) = (M - pilot) · cost_single + Σ_{l: need_single[l] > M} (need_restricted[l] - pilot)⁺ · cost_restricted

    over M in {floor} ∪ {need_single[l] >= floor}.

    Args:
        need_single, need_restricted: float [K], probes each group needs per scheme.
        pilot: probes already drawn in each scheme.
        floor: the least count (the total's need, the pilot).
        cost_single, cost_restricted: seconds per probe.

    Returns:
        (M, restricted bool [K]).

    >>> # M = 20: 10 + (390 + 20); M = 50: 40 + 20 (least); M = 5000: 4990
    >>> single_pass_count([50, 5000], [400, 30], pilot=10, floor=20, cost_single=1.0, cost_restricted=1.0)
    (50, array([False,  True]))
    """
    need_single = np.asarray(need_single, dtype=np.float64)
    need_restricted = np.asarray(need_restricted, dtype=np.float64)
    best = None
    for m in sorted({float(floor)} | {float(n) for n in need_single if n >= floor}):
        restricted = need_single > m
        cost = (m - pilot) * cost_single
        if restricted.any():
            cost += np.maximum(need_restricted[restricted] - pilot, 0).sum() * cost_restricted
        if best is None or cost < best[0]:
            best = (cost, m, restricted)
    return int(math.ceil(best[1])), best[2]


class CoordinateDesign:
    """The coordinate design over some groups: which entry each HVP sets, and the sweeps' samples.

    Args:
        group_positions: per design group, the positions of its variables in the
            operator's variable list.
        variable_sizes: int [V], scalars per variable of the operator.
        seed: the base seed; sweep q of group l draws its permutation and signs from
            ``np.random.default_rng([seed, 3, l, q])``.
    """

    def __init__(self, group_positions, variable_sizes, seed, _ids=None, _sweep=None):
        self.groups = [tuple(p) for p in group_positions]
        self.variable_sizes = [int(s) for s in variable_sizes]
        self.sizes = [sum(self.variable_sizes[j] for j in p) for p in self.groups]
        self.sweep = max(self.sizes) if _sweep is None else _sweep
        self.seed = int(seed)
        self.ids = list(range(len(self.groups))) if _ids is None else list(_ids)

    def subset(self, keep):
        """The same design seen on groups ``keep`` only (same sweeps, permutations and signs)."""
        return CoordinateDesign([self.groups[k] for k in keep], self.variable_sizes, self.seed,
                                [self.ids[k] for k in keep], self.sweep)

    def _draw(self, l, q):
        rng = np.random.default_rng([self.seed, 3, self.ids[l], q])
        return rng.permutation(self.sizes[l]), rng.choice([-1.0, 1.0], size=self.sweep)

    def vectors(self, lo, hi):
        """(index int32 [hi - lo, V], sign float32 [hi - lo, V]) of HVPs lo..hi-1 (global numbers)."""
        index = np.full((hi - lo, len(self.variable_sizes)), -1, dtype=np.int32)
        sign = np.zeros((hi - lo, len(self.variable_sizes)), dtype=np.float32)
        draws = {}   # each (group, sweep) drawn once per call, not once per HVP
        for i in range(lo, hi):
            q, p = divmod(i, self.sweep)
            for l, positions in enumerate(self.groups):
                if (l, q) not in draws:
                    draws[l, q] = self._draw(l, q)
                perm, signs = draws[l, q]
                c = int(perm[p % self.sizes[l]])
                for j in positions:
                    if c < self.variable_sizes[j]:
                        index[i - lo, j], sign[i - lo, j] = c, signs[p]
                        break
                    c -= self.variable_sizes[j]
        return index, sign

    def samples(self, rows):
        """float64 [Q, L]: the sweeps' trace samples from ``rows`` [Q * sweep, L], x_l of every HVP."""
        rows = np.asarray(rows, dtype=np.float64)
        q_count = rows.shape[0] // self.sweep
        out = np.zeros((q_count, len(self.groups)))
        p = np.arange(self.sweep)
        for l, n in enumerate(self.sizes):
            visits = (self.sweep - 1 - p % n) // n + 1   # visits of the entry that HVP p sets
            for q in range(q_count):
                out[q, l] = np.sum(rows[q * self.sweep:(q + 1) * self.sweep, l] / visits)
        return out

    def sweep_variance(self, rows):
        """float64 [L]: the variance of one sweep's sample, pooled over the group's entries.

        Within a sweep the errors of different visits are uncorrelated (each carries its
        own random sign), so Var(sweep) = Σ_c Var(y_c), y_c the mean of entry c's visits;
        each Var(y_c) is estimated from its Q >= 2 sweeps. With n_l (Q - 1) degrees of
        freedom this is a far steadier estimate than the spread of Q sweep samples.
        """
        rows = np.asarray(rows, dtype=np.float64)
        q_count = rows.shape[0] // self.sweep
        if q_count < 2:
            return np.full(len(self.groups), np.nan)
        out = np.zeros(len(self.groups))
        p = np.arange(self.sweep)
        for l, n in enumerate(self.sizes):
            entry_means = np.zeros((q_count, n))
            for q in range(q_count):
                perm, _ = self._draw(l, q)
                block = rows[q * self.sweep:(q + 1) * self.sweep, l]
                entry_means[q, perm] = np.bincount(p % n, weights=block, minlength=n) / np.bincount(p % n, minlength=n)
            out[l] = entry_means.var(axis=0, ddof=1).sum()
        return out


def run_design(draw_rows, design, rel_stderr, max_sweeps):
    """Sweeps of ``design`` until every group's pooled relative standard error meets ``rel_stderr``.

    Args:
        draw_rows: ``draw_rows(lo, hi)`` -> float64 [(hi - lo) * sweep, L], the x_l of
            the HVPs of sweeps lo..hi-1.
        design: the :class:`CoordinateDesign`.
        rel_stderr: the target r; max_sweeps: the most sweeps (>= 2).

    Returns:
        (samples [Q, L] the sweeps' trace samples, stderr [L] the pooled standard error of
        their mean, sqrt(sweep_variance / Q)).
    """
    rows = draw_rows(0, 2)
    while True:
        q_count = rows.shape[0] // design.sweep
        mean = design.samples(rows).mean(axis=0)
        variance = design.sweep_variance(rows)
        stderr = np.sqrt(variance / q_count)
        with np.errstate(divide="ignore", invalid="ignore"):
            need = variance / (rel_stderr * mean) ** 2
        if q_count >= max_sweeps or not np.all(np.isfinite(rows)) or np.all(stderr <= rel_stderr * np.abs(mean)):
            return design.samples(rows), stderr
        target = next_round(q_count, float(np.max(np.where(np.isfinite(need), need, np.inf))), max_sweeps)
        rows = np.concatenate([rows, draw_rows(q_count, target)])


def design_groups(design, pilot_rows, rel_stderr, saving, cost_per_hvp):
    """Which groups the design should keep: the set that saves the most time, or none.

    From the pilot's two sweeps each group needs Q_l = sweep_variance / (r · mean)² sweeps.
    Keeping the k groups of smallest Q_l costs (max(2, Q) - 2) further sweeps of
    ``design.sweep`` HVPs and saves their restricted probes:

        benefit(k) = Σ_{kept} saving_l - (max Q_kept - 2) · sweep · cost_per_hvp

    Args:
        design: the :class:`CoordinateDesign`; pilot_rows: float [2 * sweep, L].
        rel_stderr: the target r.
        saving: float [L], seconds of restricted probes each group would otherwise still need.
        cost_per_hvp: measured seconds per HVP of the design.

    Returns:
        sorted list of positions in ``design.groups`` (empty: the design does not pay).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        need = design.sweep_variance(pilot_rows) / (rel_stderr * design.samples(pilot_rows).mean(axis=0)) ** 2
    need = np.where(np.isfinite(need), need, np.inf)
    order = np.argsort(need, kind="stable")
    best, keep = 0.0, []
    for k in range(1, len(order) + 1):
        sweeps = max(2.0, math.ceil(need[order[k - 1]] * (1 - 1e-12))) if np.isfinite(need[order[k - 1]]) else np.inf
        benefit = float(np.sum(np.asarray(saving)[order[:k]])) - (sweeps - 2) * design.sweep * cost_per_hvp
        if benefit > best:
            best, keep = benefit, sorted(int(i) for i in order[:k])
    return keep


def _timed(draw, clock, hvps_per_row=1):
    """``draw`` that appends (HVPs, seconds) of each call to ``clock``."""
    def run(lo, hi):
        start = time.perf_counter()
        out = draw(lo, hi)
        clock.append(((hi - lo) * hvps_per_row, time.perf_counter() - start))
        return out
    return run


def _per_hvp(clock):
    """Measured seconds per HVP of the calls in ``clock`` (inf when empty)."""
    hvps = sum(n for n, _ in clock)
    return sum(t for _, t in clock) / hvps if hvps else float("inf")


def mixed_traces(contract: Callable, scheme, group_positions, variable_sizes, num_probes, rel_stderr, max_probes,
                 seed, multiple=1):
    """Every group's samples under its scheme; what ``layer_traces(scheme=...)`` reports.

    Args:
        contract: ``contract(lo, hi, kind)`` -> float64 [hi - lo, G + 1], the group
            contractions and the total <v, Hv> of vectors lo..hi-1 of ``kind``:
            ``("single",)``, ``("restricted", l)`` or ``("coordinates", design)``.
        scheme: "restricted" or "auto".
        group_positions: per group, positions of its variables in the operator's list.
        variable_sizes: int [V].
        num_probes: the pilot (or, without a target, the count) of each run.
        rel_stderr, max_probes: the target and the most probes of each run (None: fixed).
        seed: base seed of the coordinate design.
        multiple: probes per compiled call.

    Returns:
        dict: ``samples`` list of G float64 arrays, ``schemes`` tuple of G names,
        ``num_hvps`` int [G] (the HVPs of the run that served each group, shared runs
        counted whole), ``seconds`` float [G] likewise (measured seconds per HVP of the
        run times its HVPs), ``total`` float64 [M] (the single pass's <v, Hv>),
        ``all_hvps`` and ``all_seconds`` (every HVP drawn, pilots that went unused too).
    """
    num_groups = len(group_positions)
    samples, schemes = [None] * num_groups, ["single"] * num_groups
    stderr = np.full(num_groups, np.nan)   # set where a better estimate than the samples' spread exists
    hvps, seconds = np.zeros(num_groups, dtype=int), np.zeros(num_groups)
    fixed = rel_stderr is None

    def until_met(draw, pilot_rows=None):
        if fixed:
            return pilot_rows if pilot_rows is not None else draw(0, num_probes)
        first = pilot_rows
        return run_until_met(lambda lo, hi: first[lo:hi] if (first is not None and hi <= len(first)) else draw(lo, hi),
                             num_probes, rel_stderr, max_probes, multiple)

    single_clock = []
    single = _timed(lambda lo, hi: contract(lo, hi, ("single",)), single_clock)
    pilot = single(0, num_probes)   # [M0, G + 1]: every group and the total
    restricted_clock, design_clock, restricted = [], [], {}

    def run_restricted(l, pilot_rows=None):
        draw = _timed(lambda lo, hi: contract(lo, hi, ("restricted", l))[:, [l]], restricted_clock)
        rows = until_met(draw, pilot_rows)
        samples[l], schemes[l] = rows[:, 0], "restricted"
        return rows

    if scheme == "restricted":
        for l in range(num_groups):
            run_restricted(l)
        single_cols = []
    else:
        need_sp = np.array([probes_needed(pilot[:, [l]], rel_stderr, cap=max_probes) for l in range(num_groups)], float)
        need_total = probes_needed(pilot[:, [-1]], rel_stderr, cap=max_probes)
        need_r = np.full(num_groups, np.inf)
        for l in np.flatnonzero(need_sp > 2 * num_probes):   # restricted pilots where the single pass is dear
            restricted[l] = _timed(lambda lo, hi, l=l: contract(lo, hi, ("restricted", l))[:, [l]], restricted_clock)(0, num_probes)
            need_r[l] = probes_needed(restricted[l], rel_stderr, cap=max_probes)
        small = [l for l in restricted if sum(variable_sizes[j] for j in group_positions[l]) <= COORDINATE_MAX_SIZE]
        if small:
            design = CoordinateDesign([group_positions[l] for l in small], variable_sizes, seed)
            saving = np.maximum(need_r[small] - num_probes, 0) * _per_hvp(restricted_clock)
            # Only worth a pilot (two sweeps) when the restricted probes it could replace cost
            # several times more.
            if saving.sum() > DESIGN_TRIAL_FACTOR * 2 * design.sweep * _per_hvp(restricted_clock):
                draw = _timed(lambda lo, hi: contract(lo * design.sweep, hi * design.sweep, ("coordinates", design))[:, small],
                              design_clock, design.sweep)
                design_pilot = draw(0, 2)
                keep = design_groups(design, design_pilot, rel_stderr, saving, _per_hvp(design_clock))
                if keep:   # the kept groups' columns; the other small groups stay in the vectors
                    rows, errors = run_design(
                        lambda lo, hi: (design_pilot[lo * design.sweep:hi * design.sweep] if hi <= 2 else draw(lo, hi))[:, keep],
                        design.subset(keep), rel_stderr, max(2, max_probes // design.sweep))
                    # A group the design still leaves short of the target goes restricted after all.
                    for k_row, k in enumerate(keep):
                        if errors[k_row] <= rel_stderr * abs(rows[:, k_row].mean()):
                            l = small[k]
                            samples[l], schemes[l], stderr[l] = rows[:, k_row], "coordinates", errors[k_row]
                            hvps[l], seconds[l] = len(rows) * design.sweep, sum(t for _, t in design_clock)
        rest = [l for l in range(num_groups) if schemes[l] == "single"]
        planned, go_restricted = single_pass_count(need_sp[rest], need_r[rest], num_probes, max(num_probes, need_total),
                                                   _per_hvp(single_clock), _per_hvp(restricted_clock))
        for l, r in zip(rest, go_restricted):
            if r:
                run_restricted(l, restricted[l])
        single_cols = [l for l, r in zip(rest, go_restricted) if not r]
    cols = single_cols + [num_groups]   # the total always comes from the single pass
    if scheme == "auto":
        # The plan rests on pilot estimates: the single pass runs to at most twice the planned
        # count (the total's need permitting), and a group it still leaves short goes restricted.
        rows, cap = pilot[:, cols], 2 * planned
        while True:
            m = len(rows)
            target = max(next_probe_count(rows[:, [-1]], rel_stderr, max_probes, multiple),
                         min(next_probe_count(rows, rel_stderr, max_probes, multiple), max(cap, m)))
            if target <= m:
                break
            rows = np.concatenate([rows, single(m, target)[:, cols]])
        short = [l for k, l in enumerate(single_cols) if not target_met(rows[:, [k]], rel_stderr)[0]]
        for l in short:
            run_restricted(l, restricted.get(l))
        single_cols = [l for l in single_cols if l not in short]
        rows = rows[:, [cols.index(l) for l in single_cols] + [-1]]
    else:
        rows = until_met(lambda lo, hi: single(lo, hi)[:, cols], pilot[:, cols])
    for k, l in enumerate(single_cols):
        samples[l] = rows[:, k]
    for l in range(num_groups):
        if schemes[l] == "single":
            hvps[l], seconds[l] = len(rows), _per_hvp(single_clock) * len(rows)
        elif schemes[l] == "restricted":
            hvps[l], seconds[l] = len(samples[l]), _per_hvp(restricted_clock) * len(samples[l])
    clocks = single_clock + restricted_clock + design_clock
    return {"samples": samples, "stderr": stderr, "schemes": tuple(schemes), "num_hvps": hvps, "seconds": seconds, "total": rows[:, -1],
            "all_hvps": int(sum(n for n, _ in clocks)), "all_seconds": float(sum(t for _, t in clocks))}
