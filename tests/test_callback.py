"""HessianTraceCallback inside a real model.fit."""

import numpy as np
import pandas as pd
import pytest
import keras
import tensorflow as tf

from keras_hesstrace.monitor import (
    Calibration,
    HessianTraceCallback,
    PageHinkley,
    calibrate_threshold,
)
from keras_hesstrace.monitor.callback import snapshot_seed
from keras_hesstrace.trace import layer_traces


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh", name="hidden"),
                              keras.layers.Dense(3, name="head")])
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, size=n)


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir / "train"), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        out[tag] = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
    return out


def test_csv_and_tensorboard_match_direct_layer_traces(tmp_path):
    model = small_model()
    x, y = data()
    batch = (x[:32], y[:32])
    cb = HessianTraceCallback(batch, every_n_steps=3, num_probes=4, csv_path=tmp_path / "t.csv",
                              log_dir=tmp_path / "logs", seed=5, verbose=0)
    weights = {}

    class Keep(keras.callbacks.Callback):  # weights at each snapshot, to recompute
        def on_train_batch_end(self, batch_, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step % 3 == 0:
                weights[step] = self.model.get_weights()

    weights[0] = model.get_weights()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb, Keep()])  # 8 steps
    frame = pd.read_csv(tmp_path / "t.csv")
    assert sorted(frame.step.unique()) == [0, 3, 6]
    assert set(frame.group) == {"hidden", "head", "total"}
    assert list(frame.epoch[frame.step == 6]) == [1, 1, 1]
    assert set(frame.status) == {"ok"}
    scalars = read_scalars(tmp_path / "logs")
    check = small_model()
    for step in (0, 3, 6):
        check.set_weights(weights[step])
        direct = layer_traces(check, *batch, num_probes=4, seed=snapshot_seed(5, step))
        for g in ("hidden", "head"):
            row = frame[(frame.step == step) & (frame.group == g)].iloc[0]
            assert row.trace == pytest.approx(direct[g], rel=1e-6)
            assert scalars[f"hessian_trace/{g}"][step] == pytest.approx(direct[g], rel=1e-5)
        assert scalars["hessian_trace/total"][step] == pytest.approx(direct.total, rel=1e-5)
        total = frame[(frame.step == step) & (frame.group == "total")].iloc[0]
        assert total.trace == pytest.approx(direct.total, rel=1e-6)
        assert total.stderr == pytest.approx(direct.total_stderr, rel=1e-6)

    # Resume: a second fit appends without a second header or duplicated rows.
    cb2 = HessianTraceCallback(batch, every_n_steps=3, num_probes=4, csv_path=tmp_path / "t.csv",
                               seed=5, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb2])  # steps 9..12
    frame = pd.read_csv(tmp_path / "t.csv")
    assert sorted(frame.step.unique()) == [0, 3, 6, 9, 12]
    assert len(frame) == 15 and frame.step.dtype.kind == "i"  # 5 snapshots x (2 layers + total)


def test_stop_on_alert_and_on_alert(tmp_path):
    model = small_model()
    x, y = data()
    seen = []
    ph = PageHinkley(delta=0.0, threshold=1e-9)  # alerts at the first positive trace
    cb = HessianTraceCallback((x, y), every_n_steps=2, num_probes=2, layers=["head"],
                              detector=ph, stop_on_alert=True, csv_path=tmp_path / "a.csv",
                              on_alert=lambda cb_, g, step, r: seen.append((g, step)), verbose=0)
    hist = model.fit(x, y, batch_size=16, epochs=5, verbose=0, callbacks=[cb])
    assert seen == [("head", 0)]
    assert len(hist.history["loss"]) == 1  # stopped at the end of the first epoch
    frame = pd.read_csv(tmp_path / "a.csv")
    assert frame.alert.iloc[0] == 1 and {"z", "g_pos", "g_neg"} <= set(frame.columns)


def test_calibration_for_other_groups_or_interval_is_refused():
    model = small_model()
    x, y = data()
    rng = np.random.default_rng(0)
    cal = calibrate_threshold({"dense_9": rng.normal(size=(4, 10))}, 20, every_n_steps=2,
                              n_resamples=200)
    cb = HessianTraceCallback((x, y), every_n_steps=2, num_probes=2, detector=cal, verbose=0)
    with pytest.raises(ValueError, match=r"\['dense_9'\] that are not recorded"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    cal = calibrate_threshold({"head": rng.normal(size=(4, 10))}, 20, every_n_steps=5,
                              n_resamples=200)
    cb = HessianTraceCallback((x, y), every_n_steps=2, num_probes=2, detector=cal, verbose=0)
    with pytest.raises(ValueError, match="every 5 steps, but snapshots here are every 2"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])


def test_bad_input(tmp_path):
    x, y = data()
    with pytest.raises(ValueError, match="every_n_steps"):
        HessianTraceCallback((x, y), every_n_steps=0)
    with pytest.raises(ValueError, match="num_probes"):
        HessianTraceCallback((x, y), num_probes=0)
    with pytest.raises(ValueError, match="empty"):
        HessianTraceCallback(tf.data.Dataset.from_tensor_slices((x, y)).take(0))
    with pytest.raises(ValueError, match="does not exist"):
        HessianTraceCallback((x, y), csv_path=tmp_path / "nope" / "t.csv")
    with pytest.raises(ValueError, match="not writable"):
        HessianTraceCallback((x, y), csv_path=tmp_path)
