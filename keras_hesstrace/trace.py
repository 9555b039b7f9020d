"""The single-pass layer-wise Hutchinson estimator of tr(H_ll).

One probe v with i.i.d. Rademacher coordinates over ALL parameters, one HVP u = Hv,
and s_l = <v_l, u_l> for every group l: E[s_l] = tr(H_ll) because the blocks of v are
independent. M probes cost M HVPs for all groups together (docs/method.md §2).
"""

from __future__ import annotations

import collections.abc
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import tensorflow as tf
import keras

from keras_hesstrace._progress import finish, progress_bar
from keras_hesstrace._validate import check_integer, check_seed
from keras_hesstrace.adaptive import check_target, relative_stderr, run_until_met, target_met
from keras_hesstrace.groups import group_indices, group_sizes, layer_groups, select_groups, split_grouping
from keras_hesstrace.batches import batch_size, iterate_batches, resolve_data, split_batch, to_tensors
from keras_hesstrace.hvp import DEFAULT_MODE, hessian_operator
from keras_hesstrace.losses import check_mean_reduction, resolve_loss
from keras_hesstrace.probes import check_probe, probe_seed
from keras_hesstrace.linalg.common import stderr as _stderr  # the one standard error (numpy core)


@dataclass(frozen=True)
class GroupTraces:
    """Per-group Hutchinson trace estimates: what :func:`layer_traces` returns.

    (Its earlier name ``TraceResult`` still works, with a DeprecationWarning. ``TraceEstimate`` is the one-number result of
    ``hessian_trace``.)

    Attributes:
        groups: group names, length G.
        samples: float64 [M, G]; samples[m, l] = <v_l, (H v)_l> for probe m
            (averaged over batches in the full-dataset mode).
        total_samples: float64 [M]; <v, H v> over all trainable variables
            (equals samples.sum(1) when the groups cover every variable).
        group_sizes: int [G], scalar parameters per group.
        loss: the loss at the parameters (mean over the batches used).
        num_batches: batches averaged over (1 for a single batch).
        probe: the probe distribution.
        seed: the base seed; probe m used the stateless seed (seed, m).
        mode: how the Hessian-vector products were computed ("forward" or "reverse";
            with ``mode="auto"`` the one the operator's check chose).
        gradient_norms: float64 [G], the L2 norm of each group's block of the loss's
            gradient on the same batch(es) (batch-weighted mean gradient), from the same
            pass as the products; None where not computed.
        gradient_norm: the L2 norm of the whole gradient (all the operator's variables).
        rel_stderr_target: the target r of ``layer_traces(rel_stderr=r)``, or None (a
            fixed probe count).
        target_met: bool [G], whether each group's relative standard error is at most
            r (None without a target).
        total_target_met: the same for the total (None without a target).
    """

    groups: tuple
    samples: np.ndarray
    total_samples: np.ndarray
    group_sizes: np.ndarray
    loss: float
    num_batches: int = 1
    probe: str = "rademacher"
    seed: int = 0
    mode: str = "reverse"
    gradient_norms: np.ndarray | None = None
    gradient_norm: float = float("nan")
    rel_stderr_target: float | None = None
    target_met: np.ndarray | None = None
    total_target_met: bool | None = None

    @property
    def num_probes(self) -> int:
        return int(self.samples.shape[0])

    @property
    def trace(self) -> np.ndarray:
        """float64 [G]: the estimate of tr(H_ll), the mean of the samples."""
        return self.samples.mean(axis=0)

    @property
    def stderr(self) -> np.ndarray:
        """float64 [G]: the sample standard error of the mean over probes (NaN for M < 2)."""
        return _stderr(self.samples)

    @property
    def rel_stderr(self) -> np.ndarray:
        """float64 [G]: |stderr / trace| (inf where the trace is 0, NaN for M < 2)."""
        return relative_stderr(self.samples)

    @property
    def total(self) -> float:
        """The estimate of the full trace tr(H)."""
        return float(self.total_samples.mean())

    @property
    def total_stderr(self) -> float:
        return float(_stderr(self.total_samples[:, None])[0])

    @property
    def finite(self) -> bool:
        """False when the loss or any sample is NaN or infinite: then the numbers mean nothing."""
        return bool(np.isfinite(self.loss) and np.all(np.isfinite(self.samples)) and np.all(np.isfinite(self.total_samples)))

    def __getitem__(self, group):
        """The trace estimate of one group, by name."""
        try:
            return float(self.trace[self.groups.index(group)])
        except ValueError:
            raise KeyError(f"No group {group!r}; groups are {list(self.groups)}") from None

    def to_frame(self) -> pd.DataFrame:
        """A pandas DataFrame indexed by group: trace, stderr, rel_stderr, num_params,
        num_probes, gradient_norm; with a target (``rel_stderr=``), also
        rel_stderr_target and target_met."""
        frame = pd.DataFrame(
            {
                "trace": self.trace,
                "stderr": self.stderr,
                "rel_stderr": self.rel_stderr,
                "num_params": self.group_sizes,
                "num_probes": self.num_probes,
                "gradient_norm": (np.full(len(self.groups), np.nan) if self.gradient_norms is None
                                  else self.gradient_norms),
            },
            index=pd.Index(list(self.groups), name="group"),
        )
        if self.rel_stderr_target is not None:
            frame["rel_stderr_target"] = float(self.rel_stderr_target)
            frame["target_met"] = np.asarray(self.target_met, dtype=bool)
        return frame

    def __str__(self):
        frame = self.to_frame()
        lines = [frame.to_string(float_format=lambda v: f"{v:.4g}")]
        lines.append(f"total trace {self.total:.6g} ± {self.total_stderr:.2g} (M={self.num_probes} probes, {self.num_batches} batch(es), loss {self.loss:.4g})")
        if self.rel_stderr_target is not None:
            missed = [n for n, ok in zip(self.groups, self.target_met) if not ok] + ([] if self.total_target_met else ["total"])
            lines.append(f"target rel_stderr {self.rel_stderr_target:g}: " + ("met by every group and the total" if not missed
                                                                               else "NOT met by " + ", ".join(missed)))
        if not self.finite:
            lines.append("NOT FINITE: the loss or the Hessian has NaN/inf; these numbers are meaningless.")
        return "\n".join(lines)


def _progbar(total, verbose):
    if verbose:
        return progress_bar(total, "hvp")
    return None


def layer_traces(
    model: keras.Model,
    x,
    y=None,
    num_probes: int = 10,
    by="layer",
    groups=None,
    seed: int | None = None,
    probe: str = "rademacher",
    loss=None,
    num_batches: int | None = None,
    mode: str = DEFAULT_MODE,
    jit_compile: bool = False,
    verbose: int | str = "auto",
    strategy: tf.distribute.Strategy | None = None,
    probes_per_call: int = 1,
    max_batch_size: int | None = None,
    rel_stderr: float | None = None,
    max_probes: int | None = None,
) -> GroupTraces:
    """Estimate tr(H_ll) of every group at once: one HVP per probe.

    Args:
        model: a built ``keras.Model`` (run with ``training=False``).
        x: a batch of inputs [batch, ...], the tuple ``(x, y)`` of one batch, or a
            ``tf.data.Dataset`` / list of (x, y) batches (the full-dataset mode: each
            probe's sample is averaged over the batches, weighted by batch size).
            :func:`keras_hesstrace.batches.resolve_data` gives the rules.
        y: the batch's targets (omit when x is ``(x, y)`` or a dataset).
        num_probes: M, the number of probes (HVPs per batch); with ``rel_stderr``, the
            pilot (first round), at least 2. Defaults to 10.
        by: how to group the variables, as :func:`layer_groups` takes it
            (``"layer"``, ``"variable"``, a callable, a dict of path patterns, or a
            mapping name -> variables). Defaults to ``"layer"``.
        groups: which groups to report: ``None`` (all, the default), a group name or
            a list of names. Every probe's one HVP serves all groups, so a selection
            saves no compute; ``result.total`` is always over the whole model. (Earlier
            versions took the grouping as ``groups=``: a grouping given there is still
            used as ``by=``, with a DeprecationWarning.)
        seed: base seed (int); probe m uses the stateless seed (seed, m), so the
            same seed gives the same probes. ``None`` draws one (kept in the result).
        probe: "rademacher" (default, minimum variance) or "gaussian".
        loss: ``None`` for the compiled loss, or a Loss object, name or callable.
        num_batches: in the dataset mode, the number of batches to use (default all).
        mode: "auto" (default: forward-over-reverse, the least memory, where a
            one-time check shows it agrees with reverse-over-reverse; else
            reverse), "forward" or "reverse". The mode used is ``result.mode``.
        jit_compile: XLA-compile the probe.
        verbose: 0, 1, or "auto" (a progress bar in the dataset mode).
        probes_per_call: probes computed in one compiled call; in reverse mode they
            share the forward and first backward pass (faster per probe, more
            memory; in forward mode each probe still needs its own pass). The
            result does not depend on it.
        max_batch_size: the most examples per compiled call. A larger batch is
            split into consecutive chunks whose samples are averaged weighted by
            chunk size, which for a loss that is a mean over examples (Keras's
            default reduction) is the same estimate up to float round-off, at
            about 1/k of the activation memory for k chunks. ``None``: no split.
        strategy: a ``tf.distribute.Strategy``: each replica computes the HVP on its
            shard of every batch and the contractions are all-reduced, weighted by
            shard size (the same estimate as one device). Default: the strategy the
            model was built under, if any.
        rel_stderr: a target r in (0, 1) instead of a fixed count: after the pilot of
            ``num_probes``, probes are drawn in rounds, each sized from the sample
            variance of all probes so far (M = max_l ceil(s_l² / (r·|mean_l|)²), at least
            10% more), until every requested group (``groups=``) and the total has
            stderr ≤ r·|trace|, or ``max_probes`` is reached. What you get: each
            requested group's relative standard error is at most r, as estimated from
            its own probes (``result.target_met``, ``result.rel_stderr``); the estimate
            is the mean of all probes, and probe m still uses the seed (seed, m), so the
            result is a longer run's prefix. The stopping rule is sequential, so the
            estimate has a small bias (docs/method.md §3, tests/test_adaptive.py). A
            group whose trace is near 0 cannot meet a relative target: the run goes to
            ``max_probes`` and the group is reported as not met, with a RuntimeWarning
            naming it. In the dataset mode each round is another pass over the data,
            which must give the same batches. Defaults to None (exactly
            ``num_probes`` probes).
        max_probes: with ``rel_stderr``, the most probes in all (at least
            ``num_probes``). Defaults to 1000.

    Returns:
        :class:`GroupTraces`; ``result.to_frame()`` gives a pandas table. A
        non-finite loss or Hessian gives ``result.finite == False`` and a warning.

    Example:
        >>> result = layer_traces(model, x, y, num_probes=10, seed=0)
        >>> result.groups
        ('hidden', 'head')
        >>> result.to_frame().columns.tolist()
        ['trace', 'stderr', 'rel_stderr', 'num_params', 'num_probes', 'gradient_norm']
        >>> bool(np.isclose(result.trace.sum(), result.total))   # the layers cover the model
        True
        >>> aimed = layer_traces(model, x, y, num_probes=10, seed=0, rel_stderr=0.2, groups="head")
        >>> bool(aimed.target_met[0] and aimed.rel_stderr[0] <= 0.2), aimed.num_probes >= 10
        (True, True)
    """
    num_probes = check_integer("num_probes", num_probes)
    rel_stderr, max_probes = check_target(rel_stderr, max_probes, num_probes)
    seed = check_seed(seed)
    check_probe(probe)
    x, y, dataset_mode = resolve_data(x, y, "layer_traces")
    by, groups = split_grouping(by, groups, stacklevel=3)
    mapping = select_groups(layer_groups(model, by=by), groups, by)
    names, indices = group_indices(model, mapping)
    sizes = group_sizes(mapping)
    op = hessian_operator(model, loss, None, mode, jit_compile, strategy)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**62))
    per_call = check_integer("probes_per_call", probes_per_call)
    max_batch_size = check_integer("max_batch_size", max_batch_size, none="no chunking")
    if max_batch_size is not None:
        check_mean_reduction(resolve_loss(model, loss), "max_batch_size")
    if dataset_mode:
        total_steps = None if num_batches is None or rel_stderr is not None else int(num_batches) * num_probes
        show = verbose == 1 or (verbose == "auto")
        if rel_stderr is not None and isinstance(x, collections.abc.Iterator):
            raise ValueError("rel_stderr draws probes in rounds, one pass over the data each: pass data that can be "
                             "iterated again (a list of batches or a tf.data.Dataset), not an iterator or generator.")
    else:
        total_steps = None if rel_stderr is not None else num_probes
        show = verbose == 1
    bar = _progbar(total_steps, show)
    state = {"done": 0, "loss": None}

    def contract(lo, hi):
        """float64 [hi - lo, G + 1]: probes lo..hi-1's group samples and total, one pass over the data."""
        seeds = [(a, tf.stack([probe_seed(seed, m) for m in range(a, min(a + per_call, hi))]))
                 for a in range(lo, hi, per_call)]
        out = np.zeros((hi - lo, len(names) + 1))
        loss_sum, weight_sum, n_batches, grad_sum = 0.0, 0, 0, None
        for xb, yb in (iterate_batches(x, num_batches) if dataset_mode else [to_tensors(x, y)]):
            for xc, yc in split_batch(*to_tensors(xb, yb), max_batch_size):
                weight = batch_size(yc)
                for a, chunk in seeds:
                    s_g, total, loss_value, *grads = op.probe_contractions(xc, yc, chunk, probe, indices)
                    out[a - lo:a - lo + len(chunk)] += weight * np.column_stack([s_g.numpy(), total.numpy()])
                    if a == lo:
                        loss_sum += weight * float(loss_value)
                        weight_sum += weight
                        if lo == 0:
                            grads = [tf.cast(g, tf.float64) * weight for g in grads]
                            grad_sum = grads if grad_sum is None else [u + v for u, v in zip(grad_sum, grads)]
            state["done"] += hi - lo
            if bar is not None:
                bar.update(state["done"])
            n_batches += 1
        loss = (loss_sum / weight_sum, weight_sum)
        if lo == 0:
            state.update(loss=loss, n_batches=n_batches, grad_sum=grad_sum)
        elif not (loss[1] == state["loss"][1] and np.isclose(loss[0], state["loss"][0], rtol=1e-5, atol=0)):
            raise ValueError(f"The data gave other batches on another pass (loss {loss[0]:.8g} over {loss[1]} examples, "
                             f"first {state['loss'][0]:.8g} over {state['loss'][1]}): rel_stderr needs the same batches "
                             "on every pass (no reshuffling, no random augmentation).")
        return out / weight_sum

    if rel_stderr is None:
        both = contract(0, num_probes)
    else:
        both = run_until_met(contract, num_probes, rel_stderr, max_probes, per_call)
    finish(bar, state["done"])
    samples, totals = both[:, :-1], both[:, -1]
    weight_sum, grad_sum = state["loss"][1], state["grad_sum"]
    squares = np.array([float(tf.reduce_sum(tf.square(g))) for g in grad_sum]) / weight_sum**2
    result = GroupTraces(
        groups=names,
        samples=samples,
        total_samples=totals,
        group_sizes=sizes,
        loss=state["loss"][0],
        num_batches=state["n_batches"],
        probe=probe,
        seed=int(seed),
        mode=op.mode,
        gradient_norms=np.sqrt(np.array([squares[list(idx)].sum() for idx in indices])),
        gradient_norm=float(np.sqrt(squares.sum())),
        rel_stderr_target=rel_stderr,
        target_met=None if rel_stderr is None else target_met(samples, rel_stderr),
        total_target_met=None if rel_stderr is None else bool(target_met(totals[:, None], rel_stderr)[0]),
    )
    if rel_stderr is not None and result.finite and not (np.all(result.target_met) and result.total_target_met):
        missed = [n for n, ok in zip(names, result.target_met) if not ok] + ([] if result.total_target_met else ["total"])
        warnings.warn(f"rel_stderr={rel_stderr:g} not met after max_probes={max_probes} probes by: {', '.join(missed)} "
                      f"(relative stderr {', '.join(f'{v:.3g}' for v in result.rel_stderr[~result.target_met])}"
                      f"{'' if result.total_target_met else f'; total {abs(result.total_stderr / result.total):.3g}'}). "
                      "A trace near 0 never meets a relative target.", RuntimeWarning, stacklevel=2)
    if not result.finite:
        warnings.warn(
            f"Non-finite Hessian trace (loss {result.loss}): the result is flagged finite=False.",
            RuntimeWarning,
            stacklevel=2,
        )
    return result


def __getattr__(name):
    if name == "TraceResult":
        warnings.warn("TraceResult is now GroupTraces (each group's trace estimate).",
                      DeprecationWarning, stacklevel=2)
        return GroupTraces
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
