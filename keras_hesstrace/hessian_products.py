"""The Hessian of a Keras model's loss as a matrix-free operator (:class:`HessianOperator`).

It compiles the autodiff bodies of :mod:`keras_hesstrace.hvp_bodies` once per model, loss,
block, mode and strategy (``mode``: see :mod:`keras_hesstrace.hvp`, which documents the two
ways to differentiate twice, caches the operators on the model and offers the one-call
product ``hvp``). Every product the package computes goes through one of its compiled
functions: ``matvec`` and ``matvec_data`` (H·v on a batch or several), ``flat_matvec`` and
``flat_probe`` (the same on one flat vector, for the numpy algorithms), and the contractions
``probe_contractions`` / ``coordinate_contractions`` (the trace estimators' probes).
"""

from __future__ import annotations

import warnings

import tensorflow as tf

from keras_hesstrace._second_order import exact_moments, patch_available
from keras_hesstrace.batches import batch_signature, check_vector, signature_key, to_tensors, weighted_mean
from keras_hesstrace.distribute import shard_batch
from keras_hesstrace.groups import check_model
from keras_hesstrace.hvp_bodies import (check_flat, coordinate_vectors, flat_hvp_body, flat_probe_body, hvp_body,
                                        hvp_body_many, random_vectors)
from keras_hesstrace.losses import make_objective
from keras_hesstrace.mode_check import ModeCheck, check_modes, forward_fallback, forward_unsafe_layers
from keras_hesstrace.probes import check_probe

MODES = ("auto", "forward", "reverse")
# "auto" checks forward against reverse once per operator and prefers forward, the mode
# chosen by measurement (ResNet-18, batch 128, 2 CPU cores): benchmarks/probe_modes.py
# times a probe at 2.73x a gradient forward, 2.74x reverse; benchmarks/hvp_cost.py
# measures its peak memory at 1.31x a gradient's forward, 2.39x reverse.
DEFAULT_MODE = "auto"


# ------------------------------------------------------------------------ operator


def check_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}.")


class HessianOperator:
    """The Hessian of a model's loss (or its block over some variables), matrix-free.

    Built once per (model, loss, block, mode, jit_compile, strategy) and reused: its
    compiled functions take the batch with a free batch dimension, so repeated calls do
    not retrace. Get one with :func:`hessian_operator` rather than constructing it.

    Under a ``tf.distribute`` strategy each replica computes the HVP of the mean loss on
    its shard of the batch; the results are all-reduced weighted by shard size, so the
    product equals the single-device one on the whole batch.

    Args:
        model: a built Keras model.
        loss: see :func:`keras_hesstrace.losses.resolve_loss`.
        variable_indices: indices into ``model.trainable_variables`` of the block
            (``None``: all). For a block, v and Hv live on these variables only and
            the gradient is taken w.r.t. them only (H_SS v_S).
        mode: "auto" (the default: forward where a one-time check shows it agrees with
            reverse, else reverse), "forward" (forward-over-reverse) or "reverse"
            (reverse-over-reverse).
        jit_compile: compile with XLA.
        strategy: a ``tf.distribute.Strategy`` with several replicas, or None.

    Attributes:
        mode: the mode the products run in ("forward" or "reverse"); ``None`` while a
            ``mode="auto"`` operator has not yet seen a batch.
        requested_mode: the ``mode`` asked for.
        mode_check: the :class:`ModeCheck` that decided an "auto" mode, else None.
    """

    def __init__(self, model, loss=None, variable_indices=None, mode=DEFAULT_MODE, jit_compile=False, strategy=None):
        check_mode(mode)
        check_model(model)
        all_vars = list(model.trainable_variables)
        if variable_indices is None:
            variable_indices = tuple(range(len(all_vars)))
        self.variable_indices = tuple(variable_indices)
        self.variables = [all_vars[i] for i in self.variable_indices]
        self.model = model
        self.requested_mode = mode
        self.mode = None if mode == "auto" else mode
        self.mode_check = None
        self._forward_ran = False
        if mode == "forward":
            unsafe = forward_unsafe_layers(model)
            if unsafe:
                self.mode = "reverse"
                self.mode_check = ModeCheck("reverse", "forward mode is wrong through grouped convolutions",
                                            float("nan"), float("nan"), 0.0, unsafe)
                warnings.warn(f"mode='forward' is silently wrong through grouped convolutions ({', '.join(unsafe)}) "
                              "in TensorFlow; using mode='reverse'.", RuntimeWarning, stacklevel=3)
        self.jit_compile = bool(jit_compile)
        self.strategy = strategy
        self.objective = make_objective(model, loss)
        self._functions = {}
        if not patch_available():
            warnings.warn(
                "This Keras version computes moments in a way keras-hesstrace does not know: "
                "Hessians through LayerNormalization/GroupNormalization may lack a second-order term.",
                RuntimeWarning,
                stacklevel=3,
            )

    def tracing_count(self) -> int:
        """Total number of traces of this operator's compiled functions (for retrace checks)."""
        return sum(fn.experimental_get_tracing_count() for fn in self._functions.values())

    def _run(self, kind, body, x, y, *args):
        """Run ``body(x, y, *args)`` compiled, on one device or all replicas; a flat list of outputs.

        Every output of ``body`` must be a mean over the batch (or independent of it), so
        that the weighted average of the replicas' outputs is the whole batch's value.
        """
        arg_specs = [tf.TensorSpec(a.shape, a.dtype) for a in tf.nest.flatten(args)]

        def exact_body(*a):  # runs while tracing: the moments get exact second derivatives
            with exact_moments():
                return body(*a)

        if self.strategy is None:
            signature = batch_signature(x, y) + tuple(tf.nest.pack_sequence_as(args, arg_specs))
            key = (kind, signature_key(signature))
            fn = self._functions.get(key)
            if fn is None:
                fn = tf.function(lambda *a: tf.nest.flatten(exact_body(*a)), input_signature=signature, jit_compile=self.jit_compile)
                self._functions[key] = fn
            return fn(x, y, *args)

        strategy = self.strategy
        key = (kind, "distributed", signature_key(batch_signature(x, y)), signature_key(arg_specs))
        fn = self._functions.get(key)
        if fn is None:

            def weighted(x, y, w, *args):
                outs = exact_body(x, y, *args)
                return [tf.cast(o, tf.float64) * w for o in tf.nest.flatten(outs)], w

            def step(dist, *args):
                scaled, w = strategy.run(weighted, args=tuple(dist) + tuple(args))
                total = strategy.reduce(tf.distribute.ReduceOp.SUM, w, axis=None)
                return [strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None) / total for s in scaled]

            fn = tf.function(step)
            self._functions[key] = fn
        return fn(shard_batch(strategy, x, y), *args)

    def loss_value(self, x, y) -> tf.Tensor:
        """The scalar loss (data loss + regularisers) on one batch, compiled once."""
        x, y = to_tensors(x, y)
        objective = self.objective
        return self._run("loss", lambda x, y: [objective(x, y)], x, y)[0]

    def matvec(self, x, y, vector: list) -> tuple[list[tf.Tensor], tf.Tensor]:
        """Hv on one batch.

        Args:
            x, y: one batch (tensors, arrays or nests) with equal leading dimension.
            vector: list of tensors shaped like ``self.variables``.

        Returns:
            (hv, loss): list of tensors shaped like the variables, and the scalar loss.
        """
        x, y = to_tensors(x, y)
        vector = check_vector(self.variables, vector)
        self.resolve_mode(x, y)
        return self._forward_or_fallback(lambda: self._matvec_in(self.mode, x, y, vector))

    def _matvec_in(self, mode, x, y, vector):
        variables, objective = self.variables, self.objective

        def body(x, y, vector):
            loss, _, hv = hvp_body(objective, variables, x, y, vector, mode)
            return list(hv) + [loss]

        out = self._run(("matvec", mode), body, x, y, vector)
        dtypes = [v.dtype for v in vector]
        hv = [tf.cast(h, d) for h, d in zip(out[:-1], dtypes)]
        return hv, out[-1]

    def resolve_mode(self, x, y) -> str:
        """Decide a ``mode="auto"`` operator's mode on this batch (once); return the mode.

        One H·v on a fixed random vector in both modes: forward when it runs and agrees
        with reverse within the dtype's tolerance, else reverse (with one warning naming
        the layers whose products differ). The result is kept in ``self.mode_check``.
        """
        if self.mode is None:
            x, y = to_tensors(x, y)
            self.mode_check = check_modes(self, x, y)
            self.mode = self.mode_check.mode
        return self.mode

    def _forward_or_fallback(self, call):
        """Run ``call()``; if an explicit mode="forward" fails on its first use, fall back to reverse.

        TensorFlow's forward mode cannot trace some layers (a non-unrolled RNN's while
        loop). A failure of reverse mode on the retry is the model's own and is raised.
        """
        if self.mode != "forward" or self.requested_mode != "forward" or self._forward_ran:
            return call()
        try:
            out = call()
        except Exception as err:  # noqa: BLE001 - any failure of forward mode means: try reverse
            self.mode = "reverse"
            out = call()
            self.mode_check = forward_fallback(err)
            warnings.warn(f"mode='forward' failed on this model ({self.mode_check.reason}); using mode='reverse'.",
                          RuntimeWarning, stacklevel=4)
            return out
        self._forward_ran = True
        return out

    def matvec_data(self, data, vector: list, num_batches: int | None = None) -> tuple[list, float]:
        """Hv of the loss over several batches (the full-dataset mode).

        Hv is averaged over the batches weighted by batch size, so for batches of a
        dataset it is the HVP of the mean loss over all their examples.

        Args:
            data: a ``tf.data.Dataset`` or iterable of (x, y) batches.
            vector: list of tensors shaped like ``self.variables``.
            num_batches: how many batches to use (default all).

        Returns:
            (hv, loss): the weighted averages (hv as float tensors like the variables).
        """

        def one(x, y):
            hv, loss = self.matvec(x, y, vector)
            return list(hv) + [float(loss)]

        out = weighted_mean(one, data, num_batches)
        return out[:-1], out[-1]

    def flat_matvec(self, x, y, flat) -> tuple[tf.Tensor, tf.Tensor]:
        """Hv on one batch for a flat vector, one compiled call: split, product and concatenation
        run in the graph (:func:`keras_hesstrace.hvp_bodies.flat_hvp_body`), one transfer each way.

        Args:
            x, y: one batch (tensors, arrays or nests) with equal leading dimension.
            flat: float [n] (float64 or the variables' dtype): ``self.variables``' entries
                concatenated in order, each variable row-major.

        Returns:
            (hv, loss): tensors, float64 [n] and the float64 scalar loss.
        """
        x, y = to_tensors(x, y)
        flat = check_flat(self.variables, flat)
        self.resolve_mode(x, y)
        variables, objective = self.variables, self.objective

        def run():
            mode = self.mode
            body = lambda x, y, flat: flat_hvp_body(objective, variables, x, y, flat, mode)  # noqa: E731
            return tuple(self._run(("flat_matvec", mode), body, x, y, flat))

        return self._forward_or_fallback(run)

    def flat_probe(self, seed, probe: str = "rademacher", streams=None) -> tf.Tensor:
        """``draw_probe(self.variables, seed, probe, streams)`` as float64 [n], one compiled call per
        (probe, streams); bit-identical to the eager draw (stateless kernels, never XLA-compiled).

        Args:
            seed: int64 [2], the probe's stateless seed (``keras_hesstrace.probes.probe_seed``).
            streams: each variable's stream number (default its position), as in ``draw_probe``.
        """
        check_probe(probe)
        key = ("flat_probe", probe, tuple(range(len(self.variables))) if streams is None else tuple(map(int, streams)))
        fn = self._functions.get(key)
        if fn is None:
            variables = self.variables
            fn = tf.function(lambda seed: flat_probe_body(variables, seed, probe, key[2]),
                             input_signature=[tf.TensorSpec([2], tf.int64)])
            self._functions[key] = fn
        return fn(tf.convert_to_tensor(seed, tf.int64))

    def probe_contractions(self, x, y, seeds, probe, group_positions):
        """P probes in one compiled call: draw each v, compute Hv, contract per group.

        Args:
            x, y: one batch (tensors).
            seeds: int64 tensor [P, 2], the probes' stateless seeds (the same v on
                every replica). In reverse mode the P probes share one forward and
                first backward pass. Each variable's stream is its index in
                ``model.trainable_variables``, so a block operator's probe is the whole
                model's probe restricted to the block.
            probe: "rademacher" or "gaussian".
            group_positions: tuple of tuples of positions into ``self.variables``.

        Returns:
            (s, total, loss, *grads): s float64 [P, G] with s[p, g] = Σ_{var in g}
            <v_var, (Hv)_var>, total float64 [P] = <v, Hv> over all variables of the
            operator, the loss, then the loss's gradient, one tensor per variable of
            ``self.variables`` (from the same pass; float64 under a strategy).
        """
        variables, streams = self.variables, self.variable_indices
        return self._contractions(("probe", probe), lambda seeds: random_vectors(variables, seeds, probe, streams),
                                  x, y, (seeds,), group_positions)

    def coordinate_contractions(self, x, y, index, sign, group_positions):
        """P coordinate vectors in one compiled call: v = Σ_j sign[p, j] e_(j, index[p, j]).

        Variable j's block of vector p is zero except its flat entry ``index[p, j]`` (-1:
        all zero), which is ``sign[p, j]`` (the coordinate design of
        :mod:`keras_hesstrace.schemes`). Returns what :meth:`probe_contractions` returns.

        Args:
            index: int32 [P, len(variables)]; sign: float32 [P, len(variables)].
        """
        variables = self.variables
        return self._contractions(("coordinates",), lambda index, sign: coordinate_vectors(variables, index, sign),
                                  x, y, (tf.convert_to_tensor(index, tf.int32), tf.convert_to_tensor(sign, tf.float32)),
                                  group_positions)

    def _contractions(self, kind, make_vectors, x, y, args, group_positions):
        """Compiled: vectors = make_vectors(*args) (P of them), Hv each, contracted per group."""
        self.resolve_mode(x, y)
        variables, objective = self.variables, self.objective

        def body(x, y, *args):
            vectors = make_vectors(*args)
            loss, grads, hvs = hvp_body_many(objective, variables, x, y, vectors, self.mode)
            rows, totals = [], []
            for v, hv in zip(vectors, hvs):
                per_var = [tf.cast(tf.reduce_sum(a * b), tf.float64) for a, b in zip(v, hv)]
                rows.append(tf.stack([tf.add_n([per_var[i] for i in idx]) for idx in group_positions]))
                totals.append(tf.add_n(per_var))
            return (tf.stack(rows), tf.stack(totals), tf.cast(loss, tf.float64), *grads)

        return self._forward_or_fallback(
            lambda: self._run(kind + (group_positions, self.mode), body, x, y, *args))
