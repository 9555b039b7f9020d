"""PyHessian's architecture study (issue 16) as a resumable runner: :func:`run_study`.

Every variant of the config (:mod:`~keras_hesstrace.experiments.study_config`) is a
``cifar_resnet`` trained with SGD, epoch by epoch; after each epoch listed in
``checkpoints`` it is measured on one fixed batch of ``hessian_batch_size`` training
examples (the same examples for every variant and epoch; the Hessian of the compiled
loss on that batch, BN in inference mode):

* the top ``top_k`` eigenvalues of the whole model (Lanczos, algebraically largest, so
  ``lambda_max`` is the largest eigenvalue) -- ``top_eigenvalues``;
* the trace with its standard error (Hutchinson, ``trace_probes`` probes) -- ``hessian_trace``;
* the trace of each part (stem, stage1..3, head) from one ``layer_traces`` call grouped by
  ``PART_PATTERNS``, with probes independent of the whole-model trace's (so the parts'
  sum is a second, independent estimate of the trace);
* each stage's top eigenvalue (``top_eigenvalues(groups=[stage])``, the stage's block H_SS);
* the SLQ density (``spectral_density``: nodes and weights, and the smoothed density on
  200 points);
* the test loss and accuracy.

After the last epoch: the 2-D loss landscape along the top-2 eigenvectors (largest
magnitude, as PyHessian) of the final model, on the Hessian batch (``loss_landscape``).

Layout of ``out``::

    .keras-hesstrace.lock               held by the one runner working in ``out``
    config.json                         the resolved config (a rerun must match it)
    <variant>/checkpoint-<epoch>.json   one checkpoint's measurements (strict JSON)
    <variant>/landscape.json            the final loss landscape
    <variant>/result.json               written last: the variant is done
    <variant>/checkpoint.npz            weights + optimiser state after the last epoch
                                        trained; deleted once result.json is written
    summary.csv                         one row per variant and checkpoint
    stages.csv                          one row per variant, checkpoint and part

Resuming works as the memorisation runner's (:mod:`~keras_hesstrace.experiments.storage`):
one runner holds the folder's lock; every file is written by atomic rename; a variant
with ``result.json`` is never redone; otherwise training restarts from ``checkpoint.npz``
(saved after every epoch, before that epoch's measurements, and carrying the variant's
identity: a checkpoint of another variant is refused), and a measurement whose JSON
exists is never recomputed. Data order and probes are functions of the seed and epoch.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np

from keras_hesstrace.experiments.storage import (
    check_config,
    check_identity,
    load_checkpoint,
    log,
    save_checkpoint,
)
from keras_hesstrace.experiments.study_config import PARTS, STAGES, describe_variant, variant_flags
from keras_hesstrace.experiments.study_report import checkpoint_path, write_summary
from keras_hesstrace.files import (
    FolderLock,
    atomic_write_json,
    read_json,
    remove_stale_temporaries,
)

# layer path patterns of cifar_resnet -> part; together they hold every trainable variable
PART_PATTERNS = {"stem/*": "stem", "stage1/*": "stage1", "stage2/*": "stage2",
                 "stage3/*": "stage3", "head": "head"}
DENSITY_GRID = 200
_PARTS_SEED_OFFSET = 7_919  # the per-part traces' probes are independent of the whole model's


# ----------------------------------------------------------------------------- data


class StudyData:
    """The training images (uint8) and labels, the normalisation, the fixed Hessian batch
    and the test set. ``digits16`` is the bundled 8x8 digits upsampled x2 (each pixel
    repeated 2x2, nothing invented) to 16x16x1, so the three stages run at 16/8/4 pixels."""

    def __init__(self, config):
        from keras_hesstrace.data import load_cifar, load_digits

        if config.dataset == "digits16":
            train, test = load_digits("train"), load_digits("test")
        else:
            train = load_cifar(config.dataset, "train", data_dir=config.data_dir)
            test = load_cifar(config.dataset, "test", data_dir=config.data_dir)
        up = 2 if config.dataset == "digits16" else 1
        images, labels = train.images, train.clean_labels
        if config.train_examples is not None:
            index = np.sort(np.random.default_rng(0).choice(
                len(labels), size=int(config.train_examples), replace=False))
            images, labels = images[index], labels[index]
        self.loaded = train
        self.images = self._upsample(images, up)
        self.labels = labels.astype(np.int64)
        self.num_classes = train.num_classes
        self.n = len(self.labels)
        pick = np.random.default_rng(config.seed + 1).choice(self.n, config.hessian_batch_size,
                                                              replace=False)
        self.hessian_x = train.normalize(self.images[pick])
        self.hessian_y = self.labels[pick]
        self.test_x = train.normalize(self._upsample(test.images, up))
        self.test_y = test.clean_labels.astype(np.int64)

    @staticmethod
    def _upsample(images, up):
        return images if up == 1 else images.repeat(up, axis=1).repeat(up, axis=2)

    def epoch_dataset(self, config, epoch):
        """The epoch's batches: order (and augmentation) a function of (seed, epoch) only."""
        import tensorflow as tf

        from keras_hesstrace.data.loaders import pad_crop_flip

        perm = np.random.default_rng([config.seed, epoch]).permutation(self.n)
        images, labels = tf.constant(self.images), tf.constant(self.labels)
        scale = np.float32(self.loaded.pixel_scale)
        mean, std = tf.constant(self.loaded.mean), tf.constant(self.loaded.std)
        base = np.int64(config.seed) * 100_003 + epoch

        def example(i, pos):
            image = tf.gather(images, i)
            if config.augment:
                image = pad_crop_flip(image, tf.stack([tf.constant(base, tf.int64),
                                                       tf.cast(pos, tf.int64)]))
            return (tf.cast(image, tf.float32) * scale - mean) / std, tf.gather(labels, i)

        ds = tf.data.Dataset.from_tensor_slices((perm, np.arange(self.n)))
        ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)


def build_model(config, variant, data):
    """The variant's compiled ``cifar_resnet`` (SGD with momentum, cross-entropy on logits)."""
    import keras

    from keras_hesstrace.models import cifar_resnet

    depth, batch_norm, residual = variant_flags(variant)
    model = cifar_resnet(depth, batch_norm=batch_norm, residual=residual,
                         num_classes=data.num_classes, input_shape=data.images.shape[1:],
                         weight_decay=config.weight_decay)
    lr = config.learning_rate
    if config.schedule == "cosine":
        steps = -(-data.n // config.batch_size) * config.epochs
        lr = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=config.momentum),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def variant_identity(config, variant):
    """What a variant's files belong to (the model's fingerprint is added once it is built)."""
    depth, batch_norm, residual = variant_flags(variant)
    return {"variant": variant, "depth": depth, "batch_norm": batch_norm, "residual": residual,
            "dataset": config.dataset, "seed": int(config.seed)}


# ------------------------------------------------------------------------ measurements


def measure(model, x, y, config, epoch):
    """One checkpoint's Hessian measurements on the batch ``x, y``: a JSON-able dict."""
    from keras_hesstrace.spectrum import hessian_trace, spectral_density, top_eigenvalues
    from keras_hesstrace.trace import layer_traces

    seed = int(config.seed) * 10_000 + int(epoch)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # not converged / clipped: kept below
        warnings.simplefilter("always")
        eig = top_eigenvalues(model, x, y, k=config.top_k, max_iter=config.eigen_iters,
                              method="lanczos", which="LA", seed=seed)
        trace = hessian_trace(model, x, y, num_probes=config.trace_probes, rel_stderr=None, seed=seed)
        parts = layer_traces(model, x, y, num_probes=config.trace_probes, by=PART_PATTERNS,
                             seed=seed + _PARTS_SEED_OFFSET, verbose=0)
        stage_eig = {s: top_eigenvalues(model, x, y, k=1, max_iter=config.eigen_iters,
                                        method="lanczos", which="LA", groups=[s],
                                        by=PART_PATTERNS, seed=seed) for s in STAGES}
        dens = spectral_density(model, x, y, num_runs=config.density_runs,
                                lanczos_steps=config.density_steps, grid=DENSITY_GRID, seed=seed)
    if tuple(parts.groups) != PARTS:
        raise RuntimeError(f"the part groups are {parts.groups}, expected {PARTS}.")
    hvps = (eig.num_hvps + trace.num_hvps + parts.num_probes
            + sum(r.num_hvps for r in stage_eig.values()) + dens.num_hvps)
    return {
        "hessian_loss": float(eig.loss), "dimension": int(eig.dimension), "seed": seed,
        "top_eigenvalues": eig.eigenvalues, "eigen_residuals": eig.residuals,
        "eigen_converged": [bool(c) for c in eig.converged], "lambda_max": float(eig.eigenvalues[0]),
        "trace": float(trace.trace), "trace_stderr": float(trace.stderr),
        "trace_probes": int(trace.num_hvps),
        "parts": {g: {"trace": float(parts.trace[i]), "stderr": float(parts.stderr[i])}
                  for i, g in enumerate(parts.groups)},
        "parts_total": float(parts.total), "parts_total_stderr": float(parts.total_stderr),
        "stage_lambda_max": {s: float(r.eigenvalues[0]) for s, r in stage_eig.items()},
        "stage_dimension": {s: int(r.dimension) for s, r in stage_eig.items()},
        "stage_converged": {s: bool(r.converged[0]) for s, r in stage_eig.items()},
        "density": {"nodes": dens.nodes, "weights": dens.weights, "sigma": float(dens.sigma),
                    "lanczos_steps": int(dens.lanczos_steps), "grid": dens.grid,
                    "density": dens.density},
        "warnings": sorted({str(w.message).splitlines()[0] for w in caught}),
        "num_hvps": int(hvps), "seconds": time.perf_counter() - t0,
    }


def landscape(model, x, y, config):
    """The final 2-D loss landscape along the top-2 eigenvectors: a JSON-able dict."""
    from keras_hesstrace.landscape import loss_landscape

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = loss_landscape(model, x, y, directions="top2", grid=config.landscape_grid,
                           span=config.landscape_span, seed=int(config.seed),
                           eigen_kwargs={"max_iter": config.eigen_iters}, verbose=0)
    return {"alpha": r.coordinates[0], "beta": r.coordinates[1], "losses": r.losses,
            "origin_loss": float(r.origin_loss), "eigenvalues": r.eigenvalues,
            "warnings": sorted({str(w.message).splitlines()[0] for w in caught}),
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------ one variant


def _evaluate(model, data):
    loss, acc = model.evaluate(data.test_x, data.test_y, batch_size=512, verbose=0)
    return float(loss), float(acc)


def _measure_and_write(config, out, variant, model, data, epoch, identity, history):
    test_loss, test_acc = _evaluate(model, data)
    record = {"variant": variant, "epoch": int(epoch), "identity": identity,
              **describe_variant(variant), "hessian_batch_size": int(config.hessian_batch_size),
              "train": history[-1] if history else None,
              "test_loss": test_loss, "test_accuracy": test_acc,
              **measure(model, data.hessian_x, data.hessian_y, config, epoch)}
    atomic_write_json(checkpoint_path(out, variant, epoch), record)
    return record


def run_variant(config, out, variant, data, *, progress=True, on_event=None):
    """Train and measure one variant, resumably; return its ``result.json`` dict."""
    import keras

    from keras_hesstrace.identity import model_fingerprint

    folder = os.path.join(out, variant)
    result_path = os.path.join(folder, "result.json")
    if os.path.exists(result_path):  # done: never redone
        result = read_json(result_path)
        check_identity(result_path, result.get("identity"), variant_identity(config, variant))
        return result
    os.makedirs(folder, exist_ok=True)
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    model = build_model(config, variant, data)
    identity = {**variant_identity(config, variant), "model": model_fingerprint(model)}
    ckpt = os.path.join(folder, "checkpoint.npz")
    done, history, elapsed = 0, [], 0.0
    if os.path.exists(ckpt):
        meta = load_checkpoint(ckpt, model, identity)
        done, history, elapsed = int(meta["epochs_done"]), list(meta["history"]), float(meta["elapsed"])
        if progress:
            log(f"  {variant}: resuming after epoch {done}")
    lost = [e for e in config.checkpoints if e < done and not os.path.exists(checkpoint_path(out, variant, e))]
    if lost:
        raise ValueError(f"{folder!r}: the measurements of epoch(s) {lost} are missing but the "
                         f"weights are past them (epoch {done}); delete the folder to redo {variant}.")
    t0 = time.perf_counter()

    def event(kind, epoch):
        if on_event is not None:
            on_event(kind, variant, epoch)

    def checkpoint(epoch):
        if epoch in config.checkpoints and not os.path.exists(checkpoint_path(out, variant, epoch)):
            rec = _measure_and_write(config, out, variant, model, data, epoch, identity, history)
            if progress:
                log(f"  {variant} epoch {epoch}: test acc {rec['test_accuracy']:.3f}, lambda_max "
                    f"{rec['lambda_max']:.4g}, trace {rec['trace']:.4g} +- {rec['trace_stderr']:.2g} "
                    f"({rec['num_hvps']} HVPs, {rec['seconds']:.0f} s)")
            event("checkpoint", epoch)

    checkpoint(done)
    for epoch in range(done, config.epochs):
        h = model.fit(data.epoch_dataset(config, epoch), initial_epoch=epoch, epochs=epoch + 1,
                      verbose=0, shuffle=False).history
        history.append({"epoch": epoch + 1, "loss": float(h["loss"][-1]),
                        "accuracy": float(h["accuracy"][-1])})
        save_checkpoint(ckpt, model, {"epochs_done": epoch + 1, "history": history,
                                      "elapsed": elapsed + time.perf_counter() - t0,
                                      "identity": identity})
        if progress:
            log(f"  {variant} epoch {epoch + 1}/{config.epochs}: loss {history[-1]['loss']:.3f}, "
                f"acc {history[-1]['accuracy']:.3f}")
        event("epoch", epoch + 1)
        checkpoint(epoch + 1)
    land_path = os.path.join(folder, "landscape.json")
    if not os.path.exists(land_path):
        atomic_write_json(land_path, {"variant": variant, "epoch": config.epochs, "identity": identity,
                                      **landscape(model, data.hessian_x, data.hessian_y, config)})
        event("landscape", config.epochs)
    final = read_json(checkpoint_path(out, variant, config.epochs))
    result = {"variant": variant, "identity": identity, **describe_variant(variant),
              "epochs": config.epochs, "test_accuracy": final["test_accuracy"],
              "lambda_max": final["lambda_max"], "trace": final["trace"], "history": history,
              "train_seconds": elapsed + time.perf_counter() - t0,
              "checkpoints": [os.path.basename(checkpoint_path(out, variant, e)) for e in config.checkpoints],
              "landscape": "landscape.json"}
    atomic_write_json(result_path, result)  # the variant is done from here on
    if os.path.exists(ckpt):  # a kill right here: run_study deletes it on restart
        os.remove(ckpt)
    return result


# ------------------------------------------------------------------------ the study


def _tidy(config, out, progress):
    """Delete temporaries of killed processes and checkpoints of finished variants; refuse
    another variant's ``result.json``."""
    stale = remove_stale_temporaries(out)
    removed = 0
    for variant in config.variants:
        result_path = os.path.join(out, variant, "result.json")
        if os.path.exists(result_path):
            check_identity(result_path, read_json(result_path).get("identity"),
                           variant_identity(config, variant))
            ckpt = os.path.join(out, variant, "checkpoint.npz")
            if os.path.exists(ckpt):
                os.remove(ckpt)
                removed += 1
    if progress and (stale or removed):
        log(f"removed {len(stale)} stale temporary file(s) and {removed} checkpoint(s) of "
            f"finished variants from {out}")


def run_study(config, out, progress=True, on_event=None):
    """Run (or resume) the architecture study into ``out``; return the summary rows.

    Args:
        config: ``StudyConfig`` (validated here).
        out: output folder; a rerun with the same config resumes, another config is refused.
        progress: print progress lines.
        on_event: optional ``f(kind, variant, epoch)`` called after each epoch ("epoch"),
            checkpoint JSON ("checkpoint") and landscape ("landscape") is written (tests
            raise from it to simulate a kill).

    Raises:
        keras_hesstrace.files.LockedError: another runner works in ``out``.
        ValueError: ``out`` holds another config's results, or a file is another variant's.
    """
    config.validate()
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    with FolderLock(out, what="--out"):
        check_config(out, config)
        _tidy(config, out, progress)
        data = None
        for k, variant in enumerate(config.variants, start=1):
            if os.path.exists(os.path.join(out, variant, "result.json")):
                if progress:
                    log(f"[{k}/{len(config.variants)}] {variant}: done before, skipped")
                run_variant(config, out, variant, data, progress=progress)  # checks identity
                continue
            if progress:
                log(f"[{k}/{len(config.variants)}] {variant}: training {config.epochs} epochs")
            data = data or StudyData(config)
            run_variant(config, out, variant, data, progress=progress, on_event=on_event)
        rows = write_summary(config, out)
    if progress:
        log(f"study {config.name!r}: {len(rows)} checkpoint rows in {os.path.join(out, 'summary.csv')}")
    return rows
