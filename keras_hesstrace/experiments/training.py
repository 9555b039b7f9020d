"""Training one run of the memorisation experiment, resumably.

A run's data (:class:`_RunData`: the training arrays with the run's noisy labels, the
fixed probe batch the traces are taken on, the per-epoch batches with their
augmentation), its model and optimiser, and :func:`train_run`: training with the trace
callback, a checkpoint after every epoch, the final evaluation and ``result.json``.

A run without ``result.json`` restarts from its last epoch checkpoint (weights, optimiser
slots and step counter, all written by one atomic rename), its CSV cut back to the
checkpoint's step, so nothing a killed process half-wrote is ever read; the per-epoch
data order and the probe seeds are functions of (seed, epoch) and (seed, step), so a
resumed run repeats what an uninterrupted one does. The checkpoint and ``result.json``
carry the run's identity (cell, role, noise rate, seed, snapshot interval, model
fingerprint: :func:`~keras_hesstrace.experiments.storage.run_identity`); another run's
checkpoint or result (a folder copied from another seed, say) is refused, not adopted.
The checkpoint is deleted once ``result.json`` is written.
"""

import os
import shutil
import time

import numpy as np

from keras_hesstrace.experiments.config import steps_per_epoch, validation_size
from keras_hesstrace.experiments.recording import (
    epoch_record,
    predict_classes,
    snapshot_record,
    write_trajectory,
)
from keras_hesstrace.experiments.storage import (
    check_identity,
    count_snapshots,
    load_checkpoint,
    log,
    read_result,
    run_identity,
    save_checkpoint,
    truncate_csv,
)
from keras_hesstrace.files import atomic_write_json

# ----------------------------------------------------------------------------- data

_CLEAN_CACHE = {}


def _clean_data(config, dataset):
    """(train LoadedData, test LoadedData, train index) without noise; cached per process."""
    key = (dataset, config.data_dir, config.train_examples)
    if key not in _CLEAN_CACHE:
        from keras_hesstrace.data import load_cifar, load_digits

        if dataset == "digits":
            train, test = load_digits("train"), load_digits("test")
        else:
            train = load_cifar(dataset, "train", data_dir=config.data_dir)
            test = load_cifar(dataset, "test", data_dir=config.data_dir)
        index = np.arange(train.num_examples)
        if config.train_examples is not None:
            index = np.sort(np.random.default_rng(0).choice(
                train.num_examples, size=int(config.train_examples), replace=False))
        _CLEAN_CACHE.clear()  # one dataset in memory at a time (CIFAR is 150 MB)
        _CLEAN_CACHE[key] = (train, test, index)
    return _CLEAN_CACHE[key]


class _RunData:
    """A run's training arrays with its noisy labels, its fixed probe batch, its
    validation split (noisy labels, held out of training) and its clean test set."""

    def __init__(self, config, spec):
        from keras_hesstrace.data import symmetric_label_noise

        train, test, index = _clean_data(config, spec.dataset)
        self.loaded = train
        labels, corrupted = symmetric_label_noise(
            train.clean_labels[index], spec.noise_rate, train.num_classes, spec.seed)
        # The validation split: the same examples in every run (labels noised as above).
        n_val = validation_size(config, len(index))
        held = np.zeros(len(index), dtype=bool)
        held[np.random.default_rng(1).choice(len(index), size=n_val, replace=False)] = True
        self.val_x = train.normalize(train.images[index[held]])
        self.val_y = labels[held]
        self.images = train.images[index[~held]]
        self.clean_labels = train.clean_labels[index[~held]]
        self.labels, self.corrupted = labels[~held], corrupted[~held]
        self.num_classes = train.num_classes
        self.test = test
        self.n = len(self.labels)
        pick_seed = (spec.seed + 7919 if config.probe_batch_seed is None
                     else config.probe_batch_seed)
        rng = np.random.default_rng(pick_seed)
        pick = rng.choice(self.n, size=config.probe_batch_size, replace=False)
        self.probe_x = train.normalize(self.images[pick])
        self.probe_y = self.labels[pick]
        self.probe_corrupted = int(self.corrupted[pick].sum())
        self._test = None
        self._corrupted = None

    def epoch_dataset(self, config, seed, epoch):
        """The epoch's batches: order (and augmentation) a function of (seed, epoch) only."""
        import tensorflow as tf

        from keras_hesstrace.data.loaders import pad_crop_flip

        perm = np.random.default_rng([seed, epoch]).permutation(self.n)
        images = tf.constant(self.images)
        labels = tf.constant(self.labels)
        scale = np.float32(self.loaded.pixel_scale)
        mean = tf.constant(self.loaded.mean)
        std = tf.constant(self.loaded.std)
        augment = bool(config.augment)
        base = np.int64(seed) * 100_003 + epoch

        def example(i, pos):
            image = tf.gather(images, i)
            if augment:
                pair = tf.stack([tf.constant(base, tf.int64), tf.cast(pos, tf.int64)])
                image = pad_crop_flip(image, pair)
            x = (tf.cast(image, tf.float32) * scale - mean) / std
            return x, tf.gather(labels, i)

        ds = tf.data.Dataset.from_tensor_slices((perm, np.arange(self.n)))
        ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)

    def train_x(self):
        return self.loaded.normalize(self.images)

    def test_arrays(self):
        """The clean test set (x normalised, labels), computed once per run."""
        if self._test is None:
            self._test = self.test.arrays()
        return self._test

    def corrupted_arrays(self):
        """The corrupted training examples (x normalised, their noisy labels), once per run."""
        if self._corrupted is None:
            mask = self.corrupted
            self._corrupted = (self.loaded.normalize(self.images[mask]), self.labels[mask])
        return self._corrupted


def _build_model(config, spec, data):
    import keras
    from keras_hesstrace import models

    shape = data.images.shape[1:]
    if spec.arch == "small_cnn":
        model = models.small_cnn(data.num_classes, shape, config.weight_decay)
    else:
        model = getattr(models, spec.arch)(data.num_classes, shape, config.weight_decay)
    total = steps_per_epoch(config, spec.dataset) * config.epochs
    lr = config.learning_rate
    if config.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=total)
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=config.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


# --------------------------------------------------------------------------- training


def train_run(config, spec, run_dir, *, detector=None, log_dir=None, callbacks=(),
              resume=True, progress=True, prefix=""):
    """Train one run with the trace callback, resumably; return its result dict.

    Resets Keras's process-wide state first, on purpose and by design of the runner:
    ``keras.backend.clear_session()`` (frees the previous run's graphs and layer-name
    counters, so layer names and memory do not grow across a grid of runs) and
    ``keras.utils.set_random_seed(spec.seed)`` (the run's weights, dropout and shuffles are
    a function of its seed). Call it from a process that owns Keras's global state: models
    built before the call keep working, but their layer-name counters restart.

    Args:
        config: ``ExperimentConfig``.
        spec: ``RunSpec``.
        run_dir: the run's folder (``traces.csv``, ``checkpoint.npz``, ``trajectory.json``
            with the first-order records of :mod:`~keras_hesstrace.experiments.recording`,
            ``result.json``).
        detector: passed to ``HessianTraceCallback`` (online alerts). A run with a
            detector is restarted from scratch rather than from a checkpoint (the online
            detector state is not checkpointed).
        log_dir: TensorBoard folder of the run, or None.
        callbacks: extra Keras callbacks (tests use one to interrupt a run).
        resume: restart from the checkpoint if there is one; False starts over.
        progress: print a line per epoch.
        prefix: printed before each progress line.

    Returns:
        The result dict (also in ``run_dir/result.json``).

    Raises:
        ValueError: naming the file, when ``run_dir`` holds a ``result.json`` or a
            checkpoint of another run (another identity), or an unreadable one.
    """
    import keras

    from keras_hesstrace.monitor import HessianTraceCallback

    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        result = read_result(result_path)
        check_identity(result_path, result.get("identity"), run_identity(config, spec))
        return result
    os.makedirs(run_dir, exist_ok=True)
    ckpt_path = os.path.join(run_dir, "checkpoint.npz")
    csv_path = os.path.join(run_dir, "traces.csv")
    spe = steps_per_epoch(config, spec.dataset)

    keras.backend.clear_session()
    keras.utils.set_random_seed(spec.seed)
    data = _RunData(config, spec)
    model = _build_model(config, spec, data)
    identity = run_identity(config, spec, model)

    start_epoch, elapsed_before, segments = 0, 0.0, 1
    epochs, snapshots = [], []  # first-order records, checkpointed with the weights
    if resume and detector is None and os.path.exists(ckpt_path):
        meta = load_checkpoint(ckpt_path, model, identity)
        start_epoch = int(meta["epochs_done"])
        elapsed_before = float(meta["elapsed"])
        segments = int(meta["segments"]) + 1
        epochs, snapshots = list(meta["epoch_records"]), list(meta["snapshot_records"])
        kept = truncate_csv(csv_path, int(meta["last_step"]))
        if progress:
            log(f"{prefix}resuming from the checkpoint after epoch {start_epoch} "
                 f"(step {meta['last_step']}, {kept} trace rows kept)")
    else:
        for p in (ckpt_path, csv_path):
            if os.path.exists(p):
                os.remove(p)
        if log_dir is not None and os.path.isdir(log_dir):
            shutil.rmtree(log_dir)

    trace_cb = HessianTraceCallback(
        (data.probe_x, data.probe_y), every_n_steps=config.every_n_steps,
        num_probes=config.num_probes, by=config.by, csv_path=csv_path,
        log_dir=log_dir, detector=detector, seed=spec.seed,
        verbose=1 if (detector is not None and progress) else 0,
        summary=False,  # one fit per epoch, each with its own progress line
    )
    t0 = time.perf_counter()
    monitor = list(config.monitor)

    class _EpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            last = snapshots[-1]["step"] if snapshots else -1
            snapshots.extend(snapshot_record(e) for e in trace_cb.history if e["step"] > last)
            epochs.append(epoch_record(self.model, data, epoch, logs))
            elapsed = elapsed_before + time.perf_counter() - t0
            save_checkpoint(ckpt_path, self.model, {
                "epochs_done": epoch + 1, "last_step": step, "elapsed": elapsed,
                "segments": segments, "run_id": spec.run_id, "identity": identity,
                "epoch_records": epochs, "snapshot_records": snapshots})
            if progress:
                last = trace_cb.history[-1]["result"] if trace_cb.history else None
                tr = ""
                if last is not None:
                    tr = " ".join(f"{g} {last.total if g == 'total' else last[g]:.3g}"
                                  for g in monitor if g == "total" or g in last.groups)
                    tr = f" | trace {tr}"
                logs = logs or {}
                log(f"{prefix}epoch {epoch + 1:>3}/{config.epochs} loss "
                     f"{logs.get('loss', float('nan')):.3f} acc "
                     f"{logs.get('accuracy', float('nan')):.3f}{tr} ({elapsed:.0f} s)")

    end_cb = _EpochEnd()
    validation = (data.val_x, data.val_y) if len(data.val_y) else None
    for epoch in range(start_epoch, config.epochs):
        model.fit(data.epoch_dataset(config, spec.seed, epoch), initial_epoch=epoch,
                  epochs=epoch + 1, verbose=0, shuffle=False, validation_data=validation,
                  validation_batch_size=512, callbacks=[trace_cb, end_cb, *callbacks])

    # Final evaluation: clean test accuracy, fit to the labels trained on, memorisation.
    test_x, test_y = data.test_arrays()
    test_pred = predict_classes(model, test_x)
    train_pred = predict_classes(model, data.train_x())
    corrupted = data.corrupted
    n_snap_expected = (spe * config.epochs) // config.every_n_steps + 1
    n_rows = count_snapshots(csv_path)
    if n_rows != n_snap_expected:
        raise RuntimeError(f"{csv_path}: {n_rows} snapshots, expected {n_snap_expected}.")
    elapsed = elapsed_before + time.perf_counter() - t0
    result = {
        "run_id": spec.run_id, "cell": spec.cell, "arch": spec.arch, "dataset": spec.dataset,
        "role": spec.role, "noise_rate": spec.noise_rate, "seed": spec.seed,
        "epochs": config.epochs, "steps_per_epoch": spe, "every_n_steps": config.every_n_steps,
        "num_probes": config.num_probes, "n_snapshots": n_rows,
        "n_train": int(data.n), "n_validation": int(len(data.val_y)),
        "n_corrupted": int(corrupted.sum()),
        "probe_batch_corrupted": data.probe_corrupted,
        "test_accuracy": float(np.mean(test_pred == test_y)),
        "train_accuracy": float(np.mean(train_pred == data.labels)),
        "clean_train_accuracy": float(np.mean(train_pred == data.clean_labels)),
        "memorised_fraction": (float(np.mean(train_pred[corrupted] == data.labels[corrupted]))
                               if corrupted.any() else float("nan")),
        "wall_time_s": elapsed, "segments": segments, "trace_csv": "traces.csv",
        "trajectory": "trajectory.json", "identity": identity,
    }
    write_trajectory(os.path.join(run_dir, "trajectory.json"), result, csv_path,
                     snapshots, epochs)
    atomic_write_json(result_path, result)  # the run is done from here on (strict JSON)
    if os.path.exists(ckpt_path):  # a kill right here: the runner deletes it on restart
        os.remove(ckpt_path)
    return result

