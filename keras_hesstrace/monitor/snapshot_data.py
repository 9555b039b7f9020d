"""The batch each snapshot of ``HessianTraceCallback`` measures the curvature on.

``data`` is one fixed ``(x, y)`` batch, or a ``tf.data.Dataset`` of ``(x, y)`` batches of
which each snapshot takes the next (cycling when it ends). A dataset restarts at each
fit; ``SnapshotBatches.restart(skip)`` lines it up with the snapshots already recorded,
so snapshot k uses the same batch as in an uninterrupted run.
"""

from __future__ import annotations

import tensorflow as tf

from keras_hesstrace.batches import resolve_data


def check_snapshot_data(data) -> None:
    """Raise ``ValueError`` unless ``data`` is one ``(x, y)`` batch or a non-empty dataset."""
    if isinstance(data, tf.data.Dataset):
        if data.cardinality() == 0:
            raise ValueError("data is an empty tf.data.Dataset.")
        return
    # The estimators' own rule for "one batch" (batches.resolve_data), so that what
    # layer_traces(model, data) reads as one batch is one batch here too.
    try:
        one_batch = not resolve_data(data, None, caller="layer_traces")[2]
    except ValueError:
        one_batch = False
    if not one_batch:
        raise ValueError(
            f"data must be ONE fixed batch, the tuple (x, y), or a tf.data.Dataset of (x, y) "
            f"batches (a new batch at each snapshot); got a {type(data).__name__}"
            + (f" of {len(data)} elements" if isinstance(data, (tuple, list)) else "")
            + ". Several batches: tf.data.Dataset.from_tensor_slices((x, y)).batch(B)."
        )


class SnapshotBatches:
    """The snapshots' batches from ``data`` (checked by ``check_snapshot_data``)."""

    def __init__(self, data) -> None:
        self.data = data
        self._iterator = None
        self._skip = 0
        self._pending = None  # read by restart(), to fail early on an empty dataset

    def restart(self, skip: int) -> None:
        """Start a fit: the next batch is batch ``skip`` of the dataset (modulo its length)."""
        self.close()
        self._skip = int(skip)
        if isinstance(self.data, tf.data.Dataset):
            self._pending = self._read()

    def next(self):
        """The batch for the next snapshot."""
        if self._pending is not None:
            batch, self._pending = self._pending, None
            return batch
        return self._read()

    def close(self) -> None:
        """Drop the iterator (a later ``restart`` makes a new one)."""
        self._iterator = None
        self._pending = None

    def _read(self):
        if not isinstance(self.data, tf.data.Dataset):
            return self.data
        for attempt in range(2):
            if self._iterator is None:
                data = self.data
                if self._skip:  # line up with the snapshots already recorded
                    card = int(data.cardinality())
                    skip = self._skip % card if card > 0 else self._skip
                    data = data.skip(skip)
                    self._skip = 0
                self._iterator = iter(data)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                continue
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError("data must yield (x, y) batches.")
            return batch
        raise ValueError("data (tf.data.Dataset) yielded no batch.")
