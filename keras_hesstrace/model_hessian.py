"""The Keras adapter: a model's Hessian (or a block of it) as a matvec on flat numpy vectors.

:class:`ModelHessian` is the callable the algorithms of :mod:`keras_hesstrace.linalg` run
on; :func:`block_indices` names the block made of some groups of ``layer_groups``.
"""

import numpy as np
import tensorflow as tf
import keras

from keras_hesstrace.batches import check_reiterable, resolve_data, to_tensors, weighted_mean
from keras_hesstrace.groups import group_indices, layer_groups, select_groups
from keras_hesstrace.hvp import DEFAULT_MODE, hessian_operator
from keras_hesstrace.probes import check_probe, probe_seed
from keras_hesstrace._progress import finish, progress_bar


def block_indices(model, groups=None, by="layer"):
    """(names, sorted variable indices) of the block made of ``groups`` of ``layer_groups(model, by)``.

    Args:
        groups: None (the whole model), a group name, or a list of group names.
        by: the grouping (see :func:`keras_hesstrace.layer_groups`).
    """
    mapping = layer_groups(model, by=by)
    if groups is None:
        names, _ = group_indices(model, mapping)
        return names, tuple(range(len(model.trainable_variables)))
    names, indices = group_indices(model, select_groups(mapping, groups, by))
    return tuple(names), tuple(sorted({i for idx in indices for i in idx}))


class ModelHessian:
    """The Hessian (block) of a model's loss as a callable on flat float64 numpy vectors.

    A product is one compiled call (:meth:`HessianOperator.flat_matvec`: the split into
    the variables, H·v and the concatenation run in the graph), so each costs one
    host-to-device and one device-to-host transfer of the flat vector; a probe is one
    compiled draw (:meth:`HessianOperator.flat_probe`).

    Args:
        model, x, y: the model and one batch (``x, y`` or the tuple ``(x, y)`` as x), or x a
            dataset / list of (x, y) batches (:func:`keras_hesstrace.batches.resolve_data`).
        loss: None (compiled loss), a Loss, a name or a callable.
        groups, by: the block (see :func:`block_indices`).
        num_batches: batches used in the dataset mode (default all).
        mode, jit_compile: HVP settings (see :func:`keras_hesstrace.hessian_operator`).
        verbose: show a keras Progbar counting HVPs.
        caller: the public function's name, for the messages that refuse ``x, y``.

    Attributes:
        n: the block's dimension; ``num_hvps``: products computed (one per batch pass);
        ``loss``: the loss seen at the first product.

    Every result below records ``mode``: how its products were computed ("forward" or
    "reverse"; for ``mode="auto"`` the one the operator's one-time check chose).
    """

    def __init__(self, model, x, y=None, loss=None, groups=None, by="layer", num_batches=None, mode=DEFAULT_MODE, jit_compile=False, verbose=0, caller="ModelHessian"):
        x, y, self.dataset = resolve_data(x, y, caller)
        self.model = model
        self.group_names, self.indices = block_indices(model, groups, by)
        self.restricted = groups is not None
        self.op = hessian_operator(model, loss, self.indices if self.restricted else None, mode, jit_compile)
        self.variables = list(self.op.variables)
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.offsets = np.cumsum([0] + self.sizes)
        self.n = int(self.offsets[-1])
        if self.dataset:
            check_reiterable(x, caller)  # one pass over the data per Hessian-vector product
            self.data = x
        else:
            self.data = to_tensors(x, y)
        self.num_batches = num_batches
        self.basis_dtype = np.float64 if all(v.dtype == "float64" for v in self.variables) else np.float32
        self.num_hvps = 0
        self.loss = None
        self._bar = progress_bar(None, "hvp") if verbose else None

    def expect(self, hvps):
        """Tell the progress bar how many HVPs the algorithm will take at most."""
        if self._bar is not None:
            self._bar.target = max(1, int(hvps))

    def unflatten(self, vector):
        """Flat [n] -> list of tensors shaped (and typed) like the block's variables."""
        vector = np.asarray(vector)
        return [
            tf.constant(vector[a:b].reshape(v.shape), dtype=v.dtype)
            for v, a, b in zip(self.variables, self.offsets[:-1], self.offsets[1:])
        ]

    def full_vector(self, vector):
        """Flat block vector [n] -> tensors shaped like ALL model.trainable_variables (zero outside the block)."""
        parts = dict(zip(self.indices, self.unflatten(vector)))
        return [parts[i] if i in parts else tf.zeros(v.shape, dtype=v.dtype) for i, v in enumerate(self.model.trainable_variables)]

    def probe_source(self, seed, probe="rademacher"):
        """The package's one probe generator as a source for :mod:`keras_hesstrace.linalg`.

        Returns:
            ``draw(m) -> float64 [n]``: probe m under the base ``seed``, drawn by
            :func:`keras_hesstrace.probes.draw_probe` with the stateless seed
            ``probe_seed(seed, m)`` and each variable's stream numbered by its index in
            ``model.trainable_variables``: the probe :func:`keras_hesstrace.layer_traces`
            draws for the same seed and m, restricted to the block.
        """
        check_probe(probe)
        seed = int(seed)

        def draw(m):  # one compiled draw, bit-identical to draw_probe's parts concatenated
            return np.array(self.op.flat_probe(probe_seed(seed, m), probe, self.indices))

        return draw

    def __call__(self, vector: np.ndarray) -> np.ndarray:
        """H·v: ``vector`` float [n] (numpy) -> float64 [n] (a new numpy array).

        In the dataset mode the batches' products are averaged weighted by batch size
        (:func:`keras_hesstrace.batches.weighted_mean`) on the device, in float64.
        """
        flat = tf.convert_to_tensor(np.asarray(vector, dtype=np.float64))  # one transfer in
        if self.dataset:
            hv, loss = weighted_mean(lambda x, y: self.op.flat_matvec(x, y, flat), self.data, self.num_batches)
        else:
            hv, loss = self.op.flat_matvec(self.data[0], self.data[1], flat)
        self.num_hvps += 1
        if self.loss is None:
            self.loss = float(loss)
        if self._bar is not None:
            self._bar.update(self.num_hvps)
        return np.array(hv)  # one transfer out

    def close(self):
        finish(self._bar, self.num_hvps)


def variable_paths(variables):
    """The variables' paths (names on older Keras), a tuple."""
    return tuple(getattr(v, "path", v.name) for v in variables)
