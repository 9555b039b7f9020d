"""The single-pass layer-wise Hutchinson estimator of tr(H_ll).

One probe v with i.i.d. Rademacher coordinates over ALL parameters, one HVP u = Hv,
and s_l = <v_l, u_l> for every group l: E[s_l] = tr(H_ll) because the blocks of v are
independent. M probes cost M HVPs for all groups together (docs/method.md §2).
"""

from __future__ import annotations

import collections.abc
import warnings

import numpy as np
import tensorflow as tf
import keras

from keras_hesstrace._progress import finish, progress_bar
from keras_hesstrace._validate import check_integer, check_seed
from keras_hesstrace.linalg.adaptive import check_target, run_until_met, target_met
from keras_hesstrace.groups import group_indices, group_sizes, layer_groups, select_groups, split_grouping
from keras_hesstrace.batches import batch_size, iterate_batches, resolve_data, split_batch, to_tensors
from keras_hesstrace.hvp import DEFAULT_MODE, hessian_operator
from keras_hesstrace.losses import check_mean_reduction, resolve_loss
from keras_hesstrace.probes import check_probe, probe_seed
from keras_hesstrace.schemes import RESTRICTED_STREAM, check_scheme, mixed_traces
from keras_hesstrace.group_traces import GroupTraces


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
    scheme: str = "single",
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
        scheme: how probes are spent (:mod:`keras_hesstrace.schemes`). "single" (the
            default): the single pass, one HVP per probe for every group. "restricted":
            each group its own probes, zero outside it (PyHessian's per-layer route: one
            HVP per probe per group, without the other layers' cross terms in the
            variance); ``num_probes`` each, or each until it meets ``rel_stderr``.
            "auto" (needs ``rel_stderr``): a single-pass pilot, then for each group the
            scheme that reaches the target in the least measured time: the single pass
            for the groups it serves well, the coordinate design (a few sweeps of single
            entries, nearly exact) for groups of at most 256 scalars, restricted probes
            for the rest. ``result.schemes``, ``num_hvps`` and ``seconds`` say what each
            group got; the total always comes from the single pass.

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
    check_scheme(scheme, rel_stderr)
    seed = check_seed(seed)
    check_probe(probe)
    x, y, dataset_mode = resolve_data(x, y, "layer_traces")
    by, groups = split_grouping(by, groups, stacklevel=3)
    mapping = select_groups(layer_groups(model, by=by), groups, by)
    names, indices = group_indices(model, mapping)
    sizes = group_sizes(mapping)
    op = hessian_operator(model, loss, None, mode, jit_compile, strategy)
    # A restricted probe runs on its group's block operator, in reverse mode unless asked
    # otherwise: measured on a ResNet-20 layer, 26-69 ms a probe against the whole model's
    # 156 ms (forward: 22-116 ms), the backward pass stopping at the group (docs/method.md §3b).
    block_mode = "reverse" if mode == "auto" else mode
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**62))
    per_call = check_integer("probes_per_call", probes_per_call)
    max_batch_size = check_integer("max_batch_size", max_batch_size, none="no chunking")
    if max_batch_size is not None:
        check_mean_reduction(resolve_loss(model, loss), "max_batch_size")
    several_runs = rel_stderr is not None or scheme != "single"   # rounds or runs of unknown length
    if dataset_mode:
        total_steps = None if num_batches is None or several_runs else int(num_batches) * num_probes
        show = verbose == 1 or (verbose == "auto")
        if several_runs and isinstance(x, collections.abc.Iterator):
            what = "rel_stderr draws probes in rounds" if rel_stderr is not None else f"scheme={scheme!r} runs each group"
            raise ValueError(f"{what}, one pass over the data each: pass data that can be iterated again (a list "
                             "of batches or a tf.data.Dataset), not an iterator or generator.")
    else:
        total_steps = None if several_runs else num_probes
        show = verbose == 1
    bar = _progbar(total_steps, show)
    state = {"done": 0, "loss": None}

    def compute(kind, xc, yc, a, b):
        """The operator's contractions of vectors a..b-1 of ``kind`` (see keras_hesstrace.schemes)."""
        if kind[0] == "coordinates":
            index, sign = kind[1].vectors(a, b)
            return op.coordinate_contractions(xc, yc, index, sign, indices)
        if kind[0] == "restricted":   # the group's own block operator: v, Hv and the gradient on it alone
            l = kind[1]
            block = hessian_operator(model, loss, indices[l], block_mode, jit_compile, strategy)
            seeds = tf.stack([probe_seed(seed, (l + 1) * RESTRICTED_STREAM + m) for m in range(a, b)])
            s_l, total, loss_value, *_ = block.probe_contractions(xc, yc, seeds, probe, (tuple(range(len(indices[l]))),))
            s_g = np.zeros((b - a, len(indices)))
            s_g[:, l] = np.asarray(s_l)[:, 0]
            return s_g, total, loss_value
        return op.probe_contractions(xc, yc, tf.stack([probe_seed(seed, m) for m in range(a, b)]), probe, indices)

    def contract(lo, hi, kind=("single",)):
        """float64 [hi - lo, G + 1]: vectors lo..hi-1's group samples and total, one pass over the data."""
        first = state["loss"] is None
        seeds = [(a, min(a + per_call, hi)) for a in range(lo, hi, per_call)]
        out = np.zeros((hi - lo, len(names) + 1))
        loss_sum, weight_sum, n_batches, grad_sum = 0.0, 0, 0, None
        for xb, yb in (iterate_batches(x, num_batches) if dataset_mode else [to_tensors(x, y)]):
            for xc, yc in split_batch(*to_tensors(xb, yb), max_batch_size):
                weight = batch_size(yc)
                for a, b in seeds:
                    s_g, total, loss_value, *grads = compute(kind, xc, yc, a, b)
                    out[a - lo:b - lo] += weight * np.column_stack([np.asarray(s_g), np.asarray(total)])
                    if a == lo:
                        loss_sum += weight * float(loss_value)
                        weight_sum += weight
                        if first:
                            grads = [tf.cast(g, tf.float64) * weight for g in grads]
                            grad_sum = grads if grad_sum is None else [u + v for u, v in zip(grad_sum, grads)]
            state["done"] += hi - lo
            if bar is not None:
                bar.update(state["done"])
            n_batches += 1
        loss = (loss_sum / weight_sum, weight_sum)
        if first:
            state.update(loss=loss, n_batches=n_batches, grad_sum=grad_sum)
        elif not (loss[1] == state["loss"][1] and np.isclose(loss[0], state["loss"][0], rtol=1e-5, atol=0)):
            raise ValueError(f"The data gave other batches on another pass (loss {loss[0]:.8g} over {loss[1]} examples, "
                             f"first {state['loss'][0]:.8g} over {state['loss'][1]}): rel_stderr needs the same batches "
                             "on every pass (no reshuffling, no random augmentation).")
        return out / weight_sum

    mixed = None
    if scheme != "single":
        mixed = mixed_traces(contract, scheme, indices, [int(np.prod(v.shape)) for v in op.variables], num_probes,
                             rel_stderr, max_probes, seed, per_call)
        counts = np.array([len(c) for c in mixed["samples"]])
        samples = np.full((int(counts.max()), len(names)), np.nan)
        for l, column in enumerate(mixed["samples"]):
            samples[:len(column), l] = column
        totals = mixed["total"]
    else:
        both = contract(0, num_probes) if rel_stderr is None else run_until_met(contract, num_probes, rel_stderr,
                                                                                max_probes, per_call)
        samples, totals = both[:, :-1], both[:, -1]
    finish(bar, state["done"])
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
        target_met=None if rel_stderr is None else (
            target_met(samples, rel_stderr) if mixed is None
            else np.array([target_met(c[:, None], rel_stderr)[0] if np.isnan(e)
                           else bool(e <= rel_stderr * abs(c.mean())) for c, e in zip(mixed["samples"], mixed["stderr"])])),
        total_target_met=None if rel_stderr is None else bool(target_met(totals[:, None], rel_stderr)[0]),
        schemes=None if mixed is None else mixed["schemes"],
        probe_counts=None if mixed is None else counts,
        num_hvps=None if mixed is None else mixed["num_hvps"],
        seconds=None if mixed is None else mixed["seconds"],
        hvps_drawn=None if mixed is None else mixed["all_hvps"],
        pooled_stderr=None if mixed is None else mixed["stderr"],
    )
    if result.finite and result.missed_target:
        warnings.warn(f"rel_stderr={rel_stderr:g} not met after max_probes={max_probes} probes by: "
                      f"{', '.join(result.missed_target)} "
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
