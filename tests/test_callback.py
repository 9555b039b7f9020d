"""HessianTraceCallback inside a real model.fit."""

import numpy as np
import pandas as pd
import pytest
import keras
import tensorflow as tf

from keras_hesstrace.monitor import (
    HessianTraceCallback,
    PageHinkley,
    calibrate_threshold,
)
from keras_hesstrace.monitor.callback import snapshot_seed
from keras_hesstrace.trace import layer_traces
from models_for_tests import training_classifier as small_model
from models_for_tests import training_data as data


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir / "train"), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue  # the alert text, the custom-scalars layout
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
    # epochs completed (4 steps an epoch): step 6 is half-way through the second epoch
    assert list(frame.epoch[frame.step == 6]) == [1.5, 1.5, 1.5]
    assert [e["epoch"] for e in cb.history] == [0.0, 0.75, 1.5]
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
    cb = HessianTraceCallback((x, y), every_n_steps=2, num_probes=2, groups=["head"],
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
    with pytest.raises(ValueError, match="probes_per_call"):
        HessianTraceCallback((x, y), probes_per_call=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        HessianTraceCallback((x, y), max_batch_size=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        HessianTraceCallback((x, y), mode="sideways")
    # The estimators' rule for one batch: a list of batches, a lone array or (x, y, w) are not.
    for bad in ([(x[:8], y[:8]), (x[8:16], y[8:16])], x, (x, y, np.ones(len(y)))):
        with pytest.raises(ValueError, match=r"ONE fixed batch, the tuple \(x, y\)"):
            HessianTraceCallback(bad)
    HessianTraceCallback([x, y])  # a list [x, y] is one batch, as for layer_traces
    model = small_model()
    summed = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    cb = HessianTraceCallback((x, y), max_batch_size=8, loss=summed, verbose=0)
    with pytest.raises(ValueError, match="mean over examples"):  # before the first step
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations.numpy()) == 0


def test_speed_options_do_not_change_the_recorded_traces(tmp_path):
    # Forward mode, 2 probes per call, the 32-example batch in chunks of 12, 12, 8:
    # the same estimate as layer_traces with the defaults (float32 round-off apart).
    model = small_model()
    x, y = data()
    batch = (x[:32], y[:32])
    start = model.get_weights()
    cb = HessianTraceCallback(batch, every_n_steps=100, num_probes=4, seed=2, verbose=0,
                              probes_per_call=2, max_batch_size=12, mode="forward")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])  # snapshot at step 0
    check = small_model()
    check.set_weights(start)
    direct = layer_traces(check, *batch, num_probes=4, seed=snapshot_seed(2, 0))
    recorded = cb.history[0]["result"]
    np.testing.assert_allclose(recorded.samples, direct.samples, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- helpers


class Recording(HessianTraceCallback):
    """Keeps the optimiser step and the weights the model had at each snapshot."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = {}

    def _snapshot(self, step, *args):
        self.seen[step] = (int(self.model.optimizer.iterations.numpy()), self.model.get_weights())
        super()._snapshot(step, *args)


def detector_columns(frame):
    return frame[["step", "group", "trace", "status", "z", "g_pos", "g_neg", "alert"]]


def make_detectors(h_head, h_total):
    from keras_hesstrace.monitor import Baseline

    # Means differ per snapshot, so a misaligned snapshot index changes every z.
    head = Baseline(np.arange(8) * 0.3, np.full(8, 0.5))
    total = Baseline(np.arange(8) * 0.5, np.full(8, 2.0))
    return {"head": PageHinkley(delta=0.5, threshold=h_head, baseline=head),
            "total": PageHinkley(delta=0.5, threshold=h_total, baseline=total)}


# ---------------------------------------------------------------------------- resume


def test_resume_in_a_new_process_matches_an_uninterrupted_run(tmp_path):
    x, y = data()
    snap_data = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(16)  # 2 batches, cycled
    fit = dict(batch_size=16, verbose=0, shuffle=False)  # 4 steps an epoch, snapshots every 3

    def callback(path, dets, seen):
        return HessianTraceCallback(snap_data, every_n_steps=3, num_probes=3, csv_path=path,
                                    detector=dets, seed=7, verbose=0,
                                    on_alert=lambda cb_, g, s, r: seen.append((g, s, r.index)))

    # Uninterrupted: 4 epochs, steps 0..16, snapshots 0, 3, 6, 9, 12, 15.
    seen_full = []
    model = small_model()
    model.fit(x, y, epochs=4, callbacks=[callback(tmp_path / "full.csv", make_detectors(1e-6, 1e9),
                                                  seen_full)], **fit)
    full = pd.read_csv(tmp_path / "full.csv")
    assert sorted(full.step.unique()) == [0, 3, 6, 9, 12, 15]
    # A threshold for "total" crossed after the interruption (snapshot 4 or 5).
    g_total = full[full.group == "total"].set_index("step")
    stat = np.maximum(g_total.g_pos, g_total.g_neg).to_numpy()
    assert np.all(np.diff(stat[2:]) != 0)
    h_total = float(np.sort(stat)[-2] + np.sort(stat)[-1]) / 2 if stat[-1] > stat[:-1].max() else None
    assert h_total is not None and stat[:3].max() < h_total, stat  # no alert before step 8

    def run_interrupted(csv_name, prefill=None):
        seen = []
        path = tmp_path / csv_name
        model = small_model()
        model.fit(x, y, epochs=2, callbacks=[callback(path, make_detectors(1e-6, h_total), seen)], **fit)
        model.save(tmp_path / "ckpt.keras")                     # step 8, end of epoch 1
        del model
        if prefill is not None:  # crashed after snapshot 9 etc. but before the next checkpoint
            prefill.to_csv(path, index=False)
        restored = keras.models.load_model(tmp_path / "ckpt.keras")
        assert int(restored.optimizer.iterations.numpy()) == 8
        cb = callback(path, make_detectors(1e-6, h_total), seen)   # fresh detectors: state from the CSV
        restored.fit(x, y, epochs=4, initial_epoch=2, callbacks=[cb], **fit)
        return pd.read_csv(path), seen, cb

    frame, seen, cb = run_interrupted("resumed.csv")
    # Value by value as the uninterrupted run; the alert flags as its statistics say
    # under the final thresholds.
    cols = ["step", "epoch", "group", "trace", "stderr", "status", "z", "g_pos", "g_neg"]
    pd.testing.assert_frame_equal(frame[cols], full[cols], rtol=1e-6)
    h = {"head": 1e-6, "total": h_total}
    for g in ("head", "total"):
        rows = frame[frame.group == g]
        assert list(rows.alert) == [int(v) for v in np.maximum(rows.g_pos, rows.g_neg) > h[g]]
    # head alerted at snapshot 0 (before the interruption) and not again; total after it.
    assert seen == [("head", 0, 0), ("total", 15, 5)]
    assert cb.detectors["head"].alert_index == 0 and cb.detectors["head"].alert_step == 0
    assert cb.detectors["total"].n_updates == 6

    # Rows past the checkpoint's step (a crash between snapshot and checkpoint) are dropped.
    with pytest.warns(UserWarning, match="removing the 9 rows after step 8"):
        frame2, seen2, _ = run_interrupted("crashed.csv", prefill=frame)
    pd.testing.assert_frame_equal(frame2[cols + ["alert"]], frame[cols + ["alert"]], rtol=1e-6)
    assert seen2 == [("head", 0, 0), ("total", 15, 5)]


# ----------------------------------------------------------------- unusable snapshots


def snapshots_with_a_nan_second_batch(x, y):
    """Three snapshot batches of 16; the second has a NaN input, so its loss is NaN."""
    bad = x[:16].copy()
    bad[0, 0] = np.nan
    return tf.data.Dataset.from_tensor_slices(
        (np.concatenate([x[:16], bad, x[16:32]]), np.concatenate([y[:16]] * 2 + [y[16:32]]))
    ).batch(16)


def test_non_finite_trace_is_written_as_nan_and_skipped_by_the_detector(tmp_path):
    from keras_hesstrace.monitor import Baseline

    model = small_model()
    x, y = data()
    snaps = snapshots_with_a_nan_second_batch(x, y)
    base = Baseline([0.0, 100.0, 0.5, 1.0], [1.0, 1.0, 2.0, 3.0])
    ph = PageHinkley(delta=0.1, threshold=1e9, baseline=base)
    cb = Recording(snaps, every_n_steps=2, num_probes=2, groups=["head"], detector=ph,
                   csv_path=tmp_path / "n.csv", log_dir=tmp_path / "logs", seed=1, verbose=0)
    with pytest.warns(RuntimeWarning, match=r"step 2 .*unusable trace for group\(s\) \['head', 'total'\]"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])  # steps 0..4
    frame = pd.read_csv(tmp_path / "n.csv")
    head = frame[frame.group == "head"].reset_index(drop=True)
    assert list(head.step) == [0, 2, 4] and list(head.status) == ["ok", "nonfinite", "ok"]
    assert np.isnan(head.trace[1]) and np.isnan(head.z[1])
    assert list(frame[frame.group == "total"].status) == ["ok", "nonfinite", "ok"]
    # g carried over the skipped snapshot; the next value standardised at index 2.
    assert (head.g_pos[1], head.g_neg[1]) == (head.g_pos[0], head.g_neg[0])
    check = small_model()
    direct = []
    for step in (0, 4):
        check.set_weights(cb.seen[step][1])
        direct.append(layer_traces(check, *next(iter(snaps.skip(step // 2))), num_probes=2,
                                   seed=snapshot_seed(1, step))["head"])
    z = [(direct[0] - 0.0) / 1.0, (direct[1] - 0.5) / 2.0]
    assert [head.z[0], head.z[2]] == pytest.approx(z, rel=1e-6)
    g_pos = max(0.0, max(0.0, z[0] - 0.1) + z[1] - 0.1)
    assert head.g_pos[2] == pytest.approx(g_pos, rel=1e-6) and ph.n_updates == 3
    scalars = read_scalars(tmp_path / "logs")
    assert sorted(scalars["hessian_trace/head"]) == [0, 4]  # no NaN point in TensorBoard
    assert sorted(scalars["hessian_trace_detector/head"]) == [0, 2, 4]


def test_a_nonfinite_reference_snapshot_marks_later_snapshots_unreferenced(tmp_path):
    from keras_hesstrace.monitor import Baseline

    model = small_model()
    x, y = data()
    snaps = snapshots_with_a_nan_second_batch(x, y)  # the reference snapshot's loss is NaN
    base = Baseline(np.zeros(4), np.ones(4), reference=1)
    ph = PageHinkley(delta=0.1, threshold=1e9, baseline=base)
    cb = HessianTraceCallback(snaps, every_n_steps=2, num_probes=2, groups=["head"],
                              detector=ph, csv_path=tmp_path / "r.csv", seed=1, verbose=0)
    with pytest.warns(RuntimeWarning) as caught:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])  # steps 0, 2, 4
    messages = [str(w.message) for w in caught]
    assert any("step 2 " in m and "unusable trace" in m for m in messages)
    assert any("step 4 " in m and "unusable trace for group(s) ['head']" in m for m in messages)
    head = pd.read_csv(tmp_path / "r.csv").query("group == 'head'").reset_index(drop=True)
    assert list(head.status) == ["ok", "nonfinite", "unreferenced"]
    assert np.isfinite(head.trace[2]) and head.z.isna().all() and ph.reference_missing


# -------------------------------------------------------------------- mixed precision


def test_mixed_precision_curvature_is_float32(tmp_path):
    x, y = data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = small_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[0].compute_dtype == "float16"
    twin = small_model()  # float32 throughout
    batch = (x[:32], y[:32])
    cb = Recording(batch, every_n_steps=2, num_probes=4, csv_path=tmp_path / "m.csv", seed=3,
                   verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])  # snapshots 0, 2, 4
    frame = pd.read_csv(tmp_path / "m.csv")
    assert sorted(frame.step.unique()) == [0, 2, 4]
    for step in (0, 2, 4):
        twin.set_weights(cb.seen[step][1])
        ref = layer_traces(twin, *batch, num_probes=4, seed=snapshot_seed(3, step))
        for g in ("hidden", "head", "total"):
            row = frame[(frame.step == step) & (frame.group == g)].iloc[0]
            want = ref.total if g == "total" else ref[g]
            se = ref.total_stderr if g == "total" else ref.stderr[ref.groups.index(g)]
            # Same probes, float32 arithmetic: far inside one standard error.
            assert abs(row.trace - want) <= 1e-3 * se
            assert row.trace == pytest.approx(want, rel=1e-5)
    # Policies restored, training still in float16, the float32 functions traced once
    # (mode="auto": one product per mode for the one-time check, then the probe function).
    assert [layer.dtype_policy.name for layer in model.layers] == ["mixed_float16"] * 2
    assert model(x[:2]).dtype == "float16"
    assert sum(op.tracing_count() for op in cb._float32_cache.values()) == 3


# ------------------------------------------------------------------ step bookkeeping


def test_steps_per_execution_snapshots_at_the_true_optimiser_step(tmp_path):
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), steps_per_execution=3,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    batch = (x[:32], y[:32])
    cb = Recording(batch, every_n_steps=4, num_probes=2, csv_path=tmp_path / "s.csv", seed=2,
                   verbose=0)
    # 8 steps an epoch in executions of 3, 3, 2: the hooks see steps 0, 3, 6 and 8 (epoch
    # end); the first boundary at or after each multiple of 4 is 6, 8, 14, 16.
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb])
    frame = pd.read_csv(tmp_path / "s.csv")
    assert sorted(frame.step.unique()) == [0, 6, 8, 14, 16]
    # epochs completed: step 8, taken at the end of epoch index 0, is epoch 1.0
    assert list(frame[frame.group == "head"].epoch) == [0, 0.75, 1, 1.75, 2]
    assert {step: it for step, (it, _) in cb.seen.items()} == {s: s for s in (0, 6, 8, 14, 16)}
    check = small_model()
    for step in (6, 16):
        check.set_weights(cb.seen[step][1])
        direct = layer_traces(check, *batch, num_probes=2, seed=snapshot_seed(2, step))
        row = frame[(frame.step == step) & (frame.group == "head")].iloc[0]
        assert row.trace == pytest.approx(direct["head"], rel=1e-6)


def test_nothing_runs_between_snapshots():
    cb = HessianTraceCallback(data(), every_n_steps=10**9, verbose=0)
    # Not overriding on_train_batch_end keeps Keras's asynchronous batch-end dispatch.
    assert type(cb).on_train_batch_end is keras.callbacks.Callback.on_train_batch_end
    assert type(cb).on_batch_end is keras.callbacks.Callback.on_batch_end
    model = small_model()
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb])
    assert [h["step"] for h in cb.history] == [0]  # only the start of the fit


def test_a_fit_longer_than_the_baseline_is_refused_before_the_first_step():
    model = small_model()
    x, y = data()
    rng = np.random.default_rng(0)
    cal = calibrate_threshold({"head": rng.normal(size=(4, 3))}, 20, every_n_steps=2,
                              n_resamples=200)  # snapshots at steps 0, 2, 4
    cb = HessianTraceCallback((x, y), every_n_steps=2, num_probes=2, detector=cal, verbose=0)
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"runs to step 8, snapshot 4 of group 'head'.*overrun='hold'"):
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations.numpy()) == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    cb = HessianTraceCallback((x, y), every_n_steps=2, num_probes=2, detector=cal.detectors(overrun="hold"),
                              verbose=0)
    with pytest.warns(UserWarning, match="holding its mean and std"):
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb])
    assert cb.detectors["head"].n_updates == 5


def test_a_group_named_total_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="total")])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    with pytest.raises(ValueError, match="named 'total'"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[HessianTraceCallback((x, y), verbose=0)])


def test_resume_restores_a_reference_snapshot_and_refuses_another_detector(tmp_path):
    from keras_hesstrace.monitor import Baseline

    x, y = data()
    fit = dict(batch_size=16, verbose=0, shuffle=False)  # 4 steps an epoch, snapshots every 3

    def detectors(shift=0.0):
        # Snapshot 1 (step 3) is the reference; z from snapshot 2 on.
        base = Baseline(np.arange(8) * 0.1 + shift, np.full(8, 0.05), transform="log",
                        reference=1)
        return {"total": PageHinkley(delta=0.5, threshold=1e9, baseline=base)}

    def callback(path, dets):
        return HessianTraceCallback((x[:32], y[:32]), every_n_steps=3, num_probes=3,
                                    csv_path=path, detector=dets, seed=7, verbose=0)

    model = small_model()
    model.fit(x, y, epochs=4, callbacks=[callback(tmp_path / "full.csv", detectors())], **fit)
    full = pd.read_csv(tmp_path / "full.csv")
    total = full[full.group == "total"].reset_index(drop=True)
    assert total.z[:2].isna().all() and total.z[2:].notna().all()
    assert (total.g_pos[:2] == 0).all() and (total.g_neg[:2] == 0).all()
    expected_z = ((np.log(total.trace[2:]) - np.log(total.trace[1]) - np.arange(2, 6) * 0.1)
                  / 0.05)
    np.testing.assert_allclose(total.z[2:], expected_z, rtol=1e-6)

    path = tmp_path / "resumed.csv"
    model = small_model()
    model.fit(x, y, epochs=2, callbacks=[callback(path, detectors())], **fit)  # steps 0, 3, 6
    model.save(tmp_path / "ckpt.keras")
    restored = keras.models.load_model(tmp_path / "ckpt.keras")
    with pytest.raises(ValueError, match=r"were written with another detector .*: at step 6 replaying gives"):
        restored.fit(x, y, epochs=3, initial_epoch=2,
                     callbacks=[callback(path, detectors(shift=1.0))], **fit)
    broken = pd.read_csv(path)
    broken.loc[(broken.group == "total") & (broken.step == 3), "trace"] = -1.0
    broken.to_csv(tmp_path / "broken.csv", index=False)
    restored = keras.models.load_model(tmp_path / "ckpt.keras")
    with pytest.raises(ValueError, match=r"at step 3 this detector refuses the recorded value"):
        restored.fit(x, y, epochs=3, initial_epoch=2,
                     callbacks=[callback(tmp_path / "broken.csv", detectors())], **fit)
    restored = keras.models.load_model(tmp_path / "ckpt.keras")
    cb = callback(path, detectors())
    restored.fit(x, y, epochs=4, initial_epoch=2, callbacks=[cb], **fit)
    assert cb.detectors["total"].reference_value == pytest.approx(np.log(total.trace[1]))
    cols = ["step", "group", "trace", "status", "z", "g_pos", "g_neg", "alert"]
    pd.testing.assert_frame_equal(pd.read_csv(path)[cols], full[cols], rtol=1e-6)


def open_paths():
    """Paths this process holds open (Linux /proc; empty elsewhere)."""
    import os

    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        return set()
    out = set()
    for fd in os.listdir(fd_dir):
        try:
            out.add(os.path.realpath(os.readlink(os.path.join(fd_dir, fd))))
        except OSError:
            pass
    return out


def test_nothing_is_opened_at_construction_and_all_is_closed_after_fit(tmp_path):
    cb = HessianTraceCallback(data(), every_n_steps=2, csv_path=tmp_path / "t.csv",
                              log_dir=tmp_path / "logs", verbose=0)
    assert not (tmp_path / "t.csv").exists() and not (tmp_path / "logs").exists()
    model = small_model()
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    assert (tmp_path / "logs" / "train").is_dir()
    assert not any(p.startswith(str(tmp_path)) for p in open_paths())


def test_a_fit_that_raises_leaves_a_closed_complete_csv(tmp_path):
    x, y = data()
    path = tmp_path / "t.csv"

    class Boom(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 3:  # after the snapshots at steps 0 and 2
                raise RuntimeError("boom")

    model = small_model()
    with HessianTraceCallback((x[:32], y[:32]), every_n_steps=2, csv_path=path,
                              log_dir=tmp_path / "logs", verbose=0) as cb:
        with pytest.raises(RuntimeError, match="boom"):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb, Boom()])
        # Keras called no on_train_end; the CSV is complete and closed already.
        assert not any(p == str(path.resolve()) for p in open_paths())
        frame = pd.read_csv(path)
        assert sorted(frame.step.unique()) == [0, 2] and len(frame) == 6
        assert cb._tensorboard._writer is not None  # open until the with block ends
    assert cb._tensorboard._writer is None
    assert not any(p.startswith(str(tmp_path)) for p in open_paths())
    assert read_scalars(tmp_path / "logs")["hessian_trace/total"].keys() == {0, 2}


def test_reuse_across_fits_continues_a_run_and_restarts_for_a_new_one():
    x, y = data()
    cb = HessianTraceCallback((x[:32], y[:32]), every_n_steps=2, num_probes=2, verbose=0,
                              groups=["head"], detector=PageHinkley(delta=0.0, threshold=1e9))
    model = small_model()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])  # steps 0..4
    assert [h["step"] for h in cb.history] == [0, 2, 4]
    # A second fit of the same run continues the record (no duplicate of step 4).
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])  # steps 4..8
    assert [h["step"] for h in cb.history] == [0, 2, 4, 6, 8]
    assert cb.detectors["head"].n_updates == 5
    # A new model starts fresh: before, its snapshots up to step 8 were silently skipped.
    fresh = small_model(seed=1)
    fresh.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    assert [h["step"] for h in cb.history] == [0, 2, 4]
    assert cb.detectors["head"].n_updates == 3
    # So does the same model after its optimiser is reset.
    fresh.optimizer.iterations.assign(0)
    fresh.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    assert [h["step"] for h in cb.history] == [0, 2, 4]


def test_by_and_groups_and_their_older_spellings():
    x, y = data()
    cb = HessianTraceCallback((x, y), by="variable", groups="head/kernel", verbose=0)
    assert cb.by == "variable" and cb.groups == ["head/kernel"]
    with pytest.warns(DeprecationWarning, match="layers= is now groups="):
        old = HessianTraceCallback((x, y), layers=["head"], verbose=0)
    assert old.groups == ["head"] and old.by == "layer"
    with pytest.warns(DeprecationWarning, match="pass the grouping as by="):
        old = HessianTraceCallback((x, y), groups="variable", verbose=0)
    assert old.by == "variable" and old.groups is None
    with pytest.raises(ValueError, match="not both"):
        HessianTraceCallback((x, y), groups=["head"], layers=["head"])
    model = small_model()
    cb = HessianTraceCallback((x[:16], y[:16]), groups=["nope"], verbose=0)
    with pytest.raises(ValueError, match=r"Unknown group\(s\) \['nope'\]"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])


# ------------------------------------------------------------------ a target per snapshot

def test_a_target_per_snapshot_draws_what_each_needs_and_records_the_count(tmp_path):
    model = small_model()
    x, y = data()
    batch = (x[:32], y[:32])
    path = tmp_path / "t.csv"
    cb = HessianTraceCallback(batch, every_n_steps=4, num_probes=4, rel_stderr=0.2, max_probes=400, csv_path=path,
                              seed=1, verbose=0)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[cb], verbose=0)
    frame = pd.read_csv(path)
    assert len(cb.history) == 5  # steps 0, 4, ..., 16
    for snap in cb.history:
        r = snap["result"]
        assert r.rel_stderr_target == 0.2 and np.all(r.target_met) and r.total_target_met
        rows = frame[frame["step"] == snap["step"]]
        assert set(rows["num_probes"]) == {r.num_probes} and r.num_probes >= 4
        assert np.all(np.abs(rows["stderr"]) <= 0.2 * np.abs(rows["trace"]) * (1 + 1e-9))
    assert frame["num_probes"].nunique() > 1 or frame["num_probes"].iloc[0] > 4  # counts follow the noise
    first = cb.history[0]
    # a resume with another target is another run's file: refused, naming the setting
    other = HessianTraceCallback(batch, every_n_steps=4, num_probes=4, rel_stderr=0.1, csv_path=path, seed=1, verbose=0)
    with pytest.raises(ValueError, match="rel_stderr"):
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[other], verbose=0)
    other.close()
    assert first["result"].groups == ("hidden", "head")


def test_a_missed_target_is_warned_about_once_per_fit(tmp_path):
    model = small_model()
    x, y = data()
    cb = HessianTraceCallback((x[:32], y[:32]), every_n_steps=2, num_probes=3, rel_stderr=0.001, max_probes=6,
                              seed=1, verbose=0)
    with pytest.warns(RuntimeWarning, match=r"step 0 .* did not reach rel_stderr=0.001 within max_probes=6") as caught:
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    assert sum("did not reach rel_stderr" in str(w.message) for w in caught) == 1
    assert len(cb.history) == 5 and all(snap["result"].num_probes == 6 for snap in cb.history)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rel_stderr=1.5), r"rel_stderr must be None .* got 1\.5"),
    (dict(rel_stderr=0.1, num_probes=1), r"num_probes \(the pilot with rel_stderr\) must be an integer >= 2"),
    (dict(max_probes=50), r"max_probes is used only with rel_stderr"),
])
def test_bad_targets_are_refused_when_the_callback_is_made(kwargs, message):
    x, y = data()
    with pytest.raises(ValueError, match=message):
        HessianTraceCallback((x[:32], y[:32]), **kwargs)
