"""The single-pass layer-wise Hutchinson estimator of tr(H_ll).

One probe v with i.i.d. Rademacher coordinates over ALL parameters, one HVP u = Hv,
and s_l = <v_l, u_l> for every group l: E[s_l] = tr(H_ll) because the blocks of v are
independent. M probes cost M HVPs for all groups together (METHOD.md §1).
"""

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import tensorflow as tf
import keras

from keras_hesstrace._validate import check_integer
from keras_hesstrace.groups import group_indices, group_sizes, layer_groups
from keras_hesstrace.hvp import DEFAULT_MODE, hessian_operator, resolve_loss, to_tensors
from keras_hesstrace.losses import is_mean_reduced
from keras_hesstrace.probes import check_probe, probe_seed


@dataclass(frozen=True)
class TraceResult:
    """Per-group Hutchinson trace estimates.

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

    @property
    def num_probes(self):
        return int(self.samples.shape[0])

    @property
    def trace(self):
        """float64 [G]: the estimate of tr(H_ll), the mean of the samples."""
        return self.samples.mean(axis=0)

    @property
    def stderr(self):
        """float64 [G]: the sample standard error of the mean over probes (NaN for M < 2)."""
        return _stderr(self.samples)

    @property
    def total(self):
        """The estimate of the full trace tr(H)."""
        return float(self.total_samples.mean())

    @property
    def total_stderr(self):
        return float(_stderr(self.total_samples[:, None])[0])

    @property
    def finite(self):
        """False when the loss or any sample is NaN or infinite: then the numbers mean nothing."""
        return bool(np.isfinite(self.loss) and np.all(np.isfinite(self.samples)) and np.all(np.isfinite(self.total_samples)))

    def __getitem__(self, group):
        """The trace estimate of one group, by name."""
        try:
            return float(self.trace[self.groups.index(group)])
        except ValueError:
            raise KeyError(f"No group {group!r}; groups are {list(self.groups)}") from None

    def to_frame(self):
        """A pandas DataFrame indexed by group: trace, stderr, rel_stderr, num_params, num_probes."""
        trace, err = self.trace, self.stderr
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(err / trace)
        frame = pd.DataFrame(
            {
                "trace": trace,
                "stderr": err,
                "rel_stderr": rel,
                "num_params": self.group_sizes,
                "num_probes": self.num_probes,
            },
            index=pd.Index(list(self.groups), name="group"),
        )
        return frame

    def __str__(self):
        frame = self.to_frame()
        lines = [frame.to_string(float_format=lambda v: f"{v:.4g}")]
        lines.append(f"total trace {self.total:.6g} ± {self.total_stderr:.2g} (M={self.num_probes} probes, {self.num_batches} batch(es), loss {self.loss:.4g})")
        if not self.finite:
            lines.append("NOT FINITE: the loss or the Hessian has NaN/inf; these numbers are meaningless.")
        return "\n".join(lines)


def _stderr(samples):
    m = samples.shape[0]
    if m < 2:
        return np.full(samples.shape[1], np.nan)
    return samples.std(axis=0, ddof=1) / np.sqrt(m)


def _is_array(obj):
    """One model input or target: an array, tensor or dict of them (not a sequence of them)."""
    return isinstance(obj, (dict, np.ndarray, keras.KerasTensor)) or tf.is_tensor(obj) or hasattr(obj, "__array__")


def _is_sequence(obj):
    return isinstance(obj, (tuple, list))


def _right_calls(caller):
    return (
        f"pass one batch as {caller}(model, x, y) or {caller}(model, (x, y)), several as a list "
        f"{caller}(model, [(x1, y1), (x2, y2)]) or a tf.data.Dataset of (x, y) batches"
    )


def resolve_data(x, y=None, caller="f"):
    """Decide whether ``x, y`` is ONE batch or a dataset: the one place every estimator asks.

    The rules (``y`` omitted):
      - a ``tf.data.Dataset``, or a list of (x, y) batches (or any other iterable, such as
        a generator): the dataset mode;
      - a tuple (or list) of exactly two elements whose first is an array, tensor or dict,
        or whose second is one (``(x, y)``, ``((xa, xb), y)``): one batch, as if given as
        ``x, y``;
      - a tuple of two sequences (``((xa, xb), (ya, yb))``, which is also two (x, y)
        batches) is ambiguous and refused: pass ``x, y`` separately or a list of batches;
      - one array, or a tuple of 1 or 3+ arrays (``(x,)``, ``(x, y, sample_weight)``):
        refused with the right call.

    With ``y`` given, ``x`` is one batch's inputs (never a dataset).

    Args:
        x: inputs of one batch, an ``(x, y)`` tuple, a ``tf.data.Dataset`` or a list of
            (x, y) batches.
        y: targets of the batch, or ``None``.
        caller: the function's name, used in the error messages.

    Returns:
        ``(x, y, dataset)``: for one batch its inputs and targets and ``False``; in the
        dataset mode ``(x, None, True)``.

    Raises:
        ValueError: for the ambiguous and incomplete forms above, or a dataset with ``y``.
    """
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError(
                f"y must be omitted when x is a tf.data.Dataset (it yields the (x, y) batches): "
                f"call {caller}(model, dataset)."
            )
        return x, None, True
    if y is not None:
        return x, y, False
    if _is_array(x):
        raise ValueError(f"y is missing: x is one batch of inputs; {_right_calls(caller)}.")
    if not _is_sequence(x):
        if hasattr(x, "__iter__"):
            return x, None, True  # a generator or other iterable of (x, y) batches
        raise ValueError(f"x must be a batch or a dataset, not a {type(x).__name__}: {_right_calls(caller)}.")
    if len(x) == 0:
        raise ValueError(f"x is an empty {type(x).__name__}: {_right_calls(caller)}.")
    if len(x) == 2:
        first, second = x
        if _is_array(first) or (_is_array(second) and _is_sequence(first)):
            return first, second, False
        if isinstance(x, tuple) and _is_sequence(first) and _is_sequence(second):
            raise ValueError(
                f"x is a tuple of two sequences, which reads as one batch (x, y) of a model with several "
                f"inputs and outputs and as two (x, y) batches: for one batch call {caller}(model, x, y) "
                f"with x and y separately; for two batches pass a list {caller}(model, [(x1, y1), (x2, y2)])."
            )
        return x, None, True
    if _is_array(x[0]):
        kind = type(x).__name__
        what = (f"a {kind} of one array and no y" if len(x) == 1 else
                f"a {kind} of 3 arrays (x, y, sample weights? they are not supported)" if len(x) == 3 else
                f"a {kind} of {len(x)} arrays and no y")
        raise ValueError(f"x is {what}: {_right_calls(caller)}.")
    return x, None, True


def is_dataset(x, y):
    """True when ``(x, y)`` is the dataset mode by :func:`resolve_data`'s rules (which may refuse it)."""
    return resolve_data(x, y)[2]


def iterate_batches(data, num_batches=None):
    """Yield (x, y) batches from a dataset or iterable, checking their structure.

    Args:
        data: ``tf.data.Dataset`` or iterable of (x, y) batches.
        num_batches: the number of batches to take (``None``: all; required for an
            infinite dataset).
    """
    num_batches = check_integer("num_batches", num_batches, none="all")
    if isinstance(data, tf.data.Dataset):
        if num_batches is None and data.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ValueError("The dataset is infinite: pass num_batches.")
        if num_batches is not None:
            data = data.take(int(num_batches))
    count = 0
    for element in data:
        if num_batches is not None and count >= int(num_batches):
            break
        if not isinstance(element, (tuple, list)) or len(element) != 2:
            n = len(element) if isinstance(element, (tuple, list)) else 1
            raise ValueError(
                f"Each batch must be an (x, y) pair; got {n} element(s)"
                + (" (sample weights are not supported)" if n == 3 else "")
                + ". For one batch pass x, y (or the tuple (x, y)); for several, a list of (x, y) "
                "tuples or a tf.data.Dataset of them."
            )
        count += 1
        yield element[0], element[1]
    if count == 0:
        raise ValueError("The dataset yielded no batches.")


def check_mean_reduction(loss_fn, what):
    """Raise unless ``loss_fn`` is a mean over examples (averaging chunks needs that)."""
    reduction = getattr(loss_fn, "reduction", None)
    if not is_mean_reduced(loss_fn):
        raise ValueError(
            f"{what} splits the batch and averages the chunks weighted by size, which needs a "
            f"loss that is a mean over examples; this loss has reduction={reduction!r}. "
            "Use the default reduction ('sum_over_batch_size') or leave max_batch_size=None."
        )


def split_batch(x, y, max_batch_size=None):
    """Consecutive chunks of at most ``max_batch_size`` examples of one (x, y) batch.

    Args:
        x, y: tensors (or nests of tensors) with the same leading batch dimension n.
        max_batch_size: chunk size, or ``None`` for the whole batch.

    Returns:
        list of (x_chunk, y_chunk), ceil(n / max_batch_size) of them; all full but
        the last.
    """
    n = int(tf.nest.flatten(y)[0].shape[0])
    if max_batch_size is None or n <= max_batch_size:
        return [(x, y)]
    size = int(max_batch_size)
    return [tf.nest.map_structure(lambda t: t[lo:lo + size], (x, y)) for lo in range(0, n, size)]


def _progbar(total, verbose):
    if verbose:
        return keras.utils.Progbar(total, unit_name="hvp")
    return None


def layer_traces(
    model,
    x,
    y=None,
    num_probes=10,
    groups="layer",
    seed=None,
    probe="rademacher",
    loss=None,
    num_batches=None,
    mode=DEFAULT_MODE,
    jit_compile=False,
    verbose="auto",
    strategy=None,
    probes_per_call=1,
    max_batch_size=None,
):
    """Estimate tr(H_ll) of every group at once: one HVP per probe.

    Args:
        model: a built ``keras.Model`` (run with ``training=False``).
        x: a batch of inputs [batch, ...], the tuple ``(x, y)`` of one batch, or a
            ``tf.data.Dataset`` / list of (x, y) batches (the full-dataset mode: each
            probe's sample is averaged over the batches, weighted by batch size).
            :func:`resolve_data` gives the rules.
        y: the batch's targets (omit when x is ``(x, y)`` or a dataset).
        num_probes: M, the number of probes (HVPs per batch).
        groups: a grouping for :func:`layer_groups` (``"layer"``, ``"variable"``,
            a callable, a dict of patterns) or a mapping name -> variables.
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

    Returns:
        :class:`TraceResult`; ``result.to_frame()`` gives a pandas table. A
        non-finite loss or Hessian gives ``result.finite == False`` and a warning.

    Example:
        >>> result = layer_traces(model, x, y, num_probes=10, seed=0)   # doctest: +SKIP
        >>> result.to_frame()[["trace", "stderr"]]
    """
    num_probes = check_integer("num_probes", num_probes)
    check_probe(probe)
    x, y, dataset_mode = resolve_data(x, y, "layer_traces")
    mapping = layer_groups(model, by=groups)
    names, indices = group_indices(model, mapping)
    sizes = group_sizes(mapping)
    op = hessian_operator(model, loss, None, mode, jit_compile, strategy)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**62))
    per_call = check_integer("probes_per_call", probes_per_call)
    max_batch_size = check_integer("max_batch_size", max_batch_size, none="no chunking")
    if max_batch_size is not None:
        check_mean_reduction(resolve_loss(model, loss), "max_batch_size")
    chunks = [
        (start, tf.stack([probe_seed(seed, m) for m in range(start, min(start + per_call, num_probes))]))
        for start in range(0, num_probes, per_call)
    ]

    if dataset_mode:
        batches = iterate_batches(x, num_batches)
        total_steps = None if num_batches is None else int(num_batches) * num_probes
        show = verbose == 1 or (verbose == "auto")
    else:
        batches = [to_tensors(x, y)]
        total_steps = num_probes
        show = verbose == 1
    bar = _progbar(total_steps, show)

    samples = np.zeros((num_probes, len(names)))
    totals = np.zeros(num_probes)
    loss_sum, weight_sum, n_batches, done = 0.0, 0, 0, 0
    for xb, yb in batches:
        xb, yb = to_tensors(xb, yb)
        parts = split_batch(xb, yb, max_batch_size)
        for start, seeds in chunks:
            stop = start + int(seeds.shape[0])
            for xc, yc in parts:
                weight = int(tf.nest.flatten(yc)[0].shape[0])
                s_g, total, loss_value = op.probe_contractions(xc, yc, seeds, probe, indices)
                samples[start:stop] += weight * s_g.numpy()
                totals[start:stop] += weight * total.numpy()
                if start == 0:
                    loss_sum += weight * float(loss_value)
                    weight_sum += weight
            done += stop - start
            if bar is not None:
                bar.update(done)
        n_batches += 1
    samples /= weight_sum
    totals /= weight_sum
    result = TraceResult(
        groups=names,
        samples=samples,
        total_samples=totals,
        group_sizes=sizes,
        loss=loss_sum / weight_sum,
        num_batches=n_batches,
        probe=probe,
        seed=int(seed),
        mode=op.mode,
    )
    if not result.finite:
        warnings.warn(
            f"Non-finite Hessian trace (loss {result.loss}): the result is flagged finite=False.",
            RuntimeWarning,
            stacklevel=2,
        )
    return result
