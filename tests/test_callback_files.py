"""Issue 18, the callback's files: nothing lost, nothing adopted silently.

A partial or torn last snapshot is retaken on resume; one writer per CSV (a lock); a
CSV or a calibration of another run or model is refused; the CSV's directory must be
writable; ``seed`` is checked when the callback is made.
"""

import json
import os
import re
import warnings

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from keras_hesstrace.files import LockedError
from keras_hesstrace.identity import model_fingerprint
from keras_hesstrace.monitor import Baseline, Calibration, HessianTraceCallback, PageHinkley
from keras_hesstrace.monitor.calibration import calibrate_threshold
from keras_hesstrace.monitor.csv_log import check_csv_path
from models_for_tests import training_classifier as small_model
from models_for_tests import training_data as data

FIT = dict(batch_size=16, verbose=0, shuffle=False)  # 64 examples: 4 steps an epoch
COMPARED = ["step", "group", "trace", "stderr", "num_probes", "probe_seed", "status"]
DETECTOR_COLUMNS = ["h", "z", "g_pos", "g_neg", "alert"]


X, Y = data()
SNAPSHOT_DATA = tf.data.Dataset.from_tensor_slices((X[:48], Y[:48])).batch(16)  # 3 batches


def detectors():
    """Baselines whose means differ per snapshot: a detector one snapshot behind
    gives other z, g+ and g- at every later snapshot."""
    return {"head": PageHinkley(delta=0.5, threshold=1e9,
                                baseline=Baseline(np.arange(8) * 0.3, np.full(8, 0.5))),
            "total": PageHinkley(delta=0.1, threshold=0.5,
                                 baseline=Baseline(np.arange(8) * 0.5, np.full(8, 2.0)))}


def callback(path, with_detector=True, seed=7, **kwargs):
    # Snapshots every 4 steps: at 0, 4, 8 (taken at the end of epoch 1), 12.
    return HessianTraceCallback(SNAPSHOT_DATA, every_n_steps=4, num_probes=3, csv_path=path,
                                detector=detectors() if with_detector else None, seed=seed,
                                verbose=0, **kwargs)


def uninterrupted(path, with_detector=True):
    small_model().fit(X, Y, epochs=3, callbacks=[callback(path, with_detector)], **FIT)
    return pd.read_csv(path)


def fit_to_step_8(path, tmp_path, with_detector=True):
    """Two epochs (snapshots 0, 4, 8), the model saved at step 8; the restored model."""
    model = small_model()
    model.fit(X, Y, epochs=2, callbacks=[callback(path, with_detector)], **FIT)
    model.save(tmp_path / "ckpt.keras")
    restored = keras.models.load_model(tmp_path / "ckpt.keras")
    assert int(restored.optimizer.iterations.numpy()) == 8
    return restored


def assert_same_record(resumed, full, with_detector):
    columns = COMPARED + (DETECTOR_COLUMNS if with_detector else [])
    assert len(resumed) == len(full) == 12  # 4 snapshots x (hidden, head, total)
    pd.testing.assert_frame_equal(resumed[columns], full[columns], rtol=1e-6)
    # The retaken snapshot 8 is taken at the start of epoch index 2 (the same weights,
    # after 8 updates) instead of at the end of epoch index 1: 2 epochs completed either way.
    assert list(resumed.epoch[resumed.step == 8]) == [2.0, 2.0, 2.0]
    assert list(resumed.epoch) == list(full.epoch)


# ------------------------------------------------------------ 1, 2: partial snapshots


def test_a_partial_last_snapshot_is_retaken_and_the_detector_stays_in_step(tmp_path):
    full = uninterrupted(tmp_path / "full.csv")
    assert sorted(full.step.unique()) == [0, 4, 8, 12]
    assert full.alert.sum() > 0  # the total's detector alerts: its state matters
    path = tmp_path / "resumed.csv"
    restored = fit_to_step_8(path, tmp_path)
    # A crash after snapshot 8's first row (the checkpoint of step 8 was already saved).
    lines = path.read_text().splitlines(keepends=True)
    assert [line.split(",")[2] for line in lines[-3:]] == ["hidden", "head", "total"]
    path.write_text("".join(lines[:-2]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored.fit(X, Y, epochs=3, initial_epoch=2, callbacks=[callback(path)], **FIT)
    assert_same_record(pd.read_csv(path), full, with_detector=True)
    assert any(re.search(r"snapshot at step 8 is incomplete .*no row of \['head', 'total'\]\); "
                         r"removed its 1 row", str(w.message)) for w in caught)


def test_a_partial_snapshot_before_the_resume_step_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    restored = fit_to_step_8(path, tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-4]))  # snapshot 4 lacks "total"; snapshot 8 is gone
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"snapshot at step 4 is incomplete .*resuming at "
                                         r"step 8, cannot retake it"):
        restored.fit(X, Y, epochs=3, initial_epoch=2, callbacks=[callback(path)], **FIT)
    assert path.read_bytes() == before


@pytest.mark.parametrize("with_detector", [True, False])
def test_a_torn_last_line_is_dropped_and_its_snapshot_retaken(tmp_path, with_detector):
    full = uninterrupted(tmp_path / "full.csv", with_detector)
    path = tmp_path / "resumed.csv"
    restored = fit_to_step_8(path, tmp_path, with_detector)
    text = path.read_text()
    last_row = text.rstrip("\n").rsplit("\n", 1)[1]
    assert last_row.startswith("8,2.0,total,")  # step 8 = 2 epochs completed
    path.write_text(text[:len(text) - len(last_row) // 2 - 1])  # a row cut mid-number
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored.fit(X, Y, epochs=3, initial_epoch=2,
                     callbacks=[callback(path, with_detector)], **FIT)
    assert_same_record(pd.read_csv(path), full, with_detector)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("ended in an incomplete row" in m for m in messages), messages
    assert any("snapshot at step 8 is incomplete" in m for m in messages), messages


# ----------------------------------------------------------------------------- 3: lock


def test_one_fit_at_a_time_writes_a_csv(tmp_path):
    path = tmp_path / "t.csv"
    first, second = small_model(), small_model()
    holder = callback(path, with_detector=False)
    holder.set_model(first)
    holder.on_train_begin()  # a fit in progress
    assert not path.exists() or path.read_text().count("\n") <= 1
    written = path.read_bytes()
    with pytest.raises(LockedError, match=rf"csv_path '{path}' is in use by pid {os.getpid()}"):
        second.fit(X, Y, epochs=1, callbacks=[callback(path, with_detector=False)], **FIT)
    assert path.read_bytes() == written  # the second fit touched nothing
    holder.on_train_end()  # released: the next fit may write
    second.fit(X, Y, epochs=1, callbacks=[callback(path, with_detector=False)], **FIT)
    assert sorted(pd.read_csv(path).step.unique()) == [0, 4]

    # A fit that raises keeps the lock until close() (here: the with block's end).
    class Boom(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            raise RuntimeError("boom")

    other = tmp_path / "u.csv"
    with callback(other, with_detector=False) as cb:
        with pytest.raises(RuntimeError, match="boom"):
            small_model().fit(X, Y, epochs=1, callbacks=[cb, Boom()], **FIT)
        with pytest.raises(LockedError, match="csv_path"):
            small_model().fit(X, Y, epochs=1, callbacks=[callback(other, False)], **FIT)
    small_model().fit(X, Y, epochs=1, callbacks=[callback(other, False)], **FIT)


# ------------------------------------------------------------------------- 5: identity


def test_a_csv_of_another_seed_or_model_is_refused(tmp_path):
    path = tmp_path / "t.csv"
    model = small_model()
    model.fit(X, Y, epochs=2, callbacks=[callback(path, with_detector=False)], **FIT)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"'{path}' was written by another run: seed: 7 there, "
                                         r"1 here\. Use another csv_path\."):
        model.fit(X, Y, epochs=3, initial_epoch=2,
                  callbacks=[callback(path, with_detector=False, seed=1)], **FIT)
    wider = small_model(hidden=5)  # the same group names, other variables
    with pytest.raises(ValueError, match=r"another run: another model .*shapes differ: "
                                         r"hidden/kernel \[4, 8\] there, \[4, 5\] here"):
        wider.fit(X, Y, epochs=1, callbacks=[callback(path, with_detector=False)], **FIT)
    assert path.read_bytes() == before  # refused before anything was cut or appended
    identity = json.loads((tmp_path / "t.csv.identity.json").read_text())
    assert identity == {"model": model_fingerprint(model), "groups": ["hidden", "head", "total"],
                        "by": "layer", "seed": 7, "every_n_steps": 4, "num_probes": 3}
    # The refused callbacks released the lock: the right run continues.
    model.fit(X, Y, epochs=3, initial_epoch=2, callbacks=[callback(path, False)], **FIT)
    assert sorted(pd.read_csv(path).step.unique()) == [0, 4, 8, 12]


def test_a_csv_without_sidecar_is_adopted_once_with_a_warning(tmp_path):
    path = tmp_path / "t.csv"
    model = small_model()
    model.fit(X, Y, epochs=1, callbacks=[callback(path, with_detector=False)], **FIT)
    (tmp_path / "t.csv.identity.json").unlink()  # as an older version wrote it
    with pytest.warns(UserWarning, match="no identity sidecar"):
        model.fit(X, Y, epochs=2, initial_epoch=1, callbacks=[callback(path, False)], **FIT)
    assert (tmp_path / "t.csv.identity.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(X, Y, epochs=3, initial_epoch=2, callbacks=[callback(path, False)], **FIT)
    assert sorted(pd.read_csv(path).step.unique()) == [0, 4, 8, 12]


def clean_runs(length=30, seed=0):
    rng = np.random.default_rng(seed)
    return {g: rng.lognormal(size=(19, length)) for g in ("head", "total")}


def test_a_calibration_records_its_model(tmp_path):
    model = small_model()
    cal = calibrate_threshold(clean_runs(), every_n_steps=4, transform="log", model=model)
    assert cal.model_fingerprint == model_fingerprint(model)
    assert calibrate_threshold(clean_runs(), model=cal.model_fingerprint).model_fingerprint \
        == cal.model_fingerprint
    assert calibrate_threshold(clean_runs()).model_fingerprint is None
    with pytest.raises(ValueError, match="model must be None, a Keras model or"):
        calibrate_threshold(clean_runs(), model=[["hidden/kernel", "4x8"]])
    cal.save(tmp_path / "c.json")
    raw = json.loads((tmp_path / "c.json").read_text())
    assert raw["version"] == 5 and raw["model_fingerprint"] == model_fingerprint(model)
    assert Calibration.load(tmp_path / "c.json").to_dict() == cal.to_dict()
    del raw["model_fingerprint"]
    raw["version"] = 4
    (tmp_path / "v4.json").write_text(json.dumps(raw))
    assert Calibration.load(tmp_path / "v4.json").model_fingerprint is None


def test_a_calibration_of_another_model_is_refused():
    cal = calibrate_threshold(clean_runs(), every_n_steps=4, transform="log",
                              model=small_model(hidden=5))
    seen = []

    def cb():
        return HessianTraceCallback(SNAPSHOT_DATA, every_n_steps=4, num_probes=3,
                                    detector=cal, verbose=0,
                                    on_alert=lambda *args: seen.append(args[2]))

    with pytest.raises(ValueError, match=r"Calibration was made for another model .*"
                                         r"hidden/kernel \[4, 5\] there, \[4, 8\] here"):
        small_model().fit(X, Y, epochs=1, callbacks=[cb()], **FIT)
    assert seen == []
    small_model(hidden=5).fit(X, Y, epochs=1, callbacks=[cb()], **FIT)  # its own model


# ------------------------------------------------------------------ 7, 8: arguments


def test_the_csv_directory_must_be_writable(tmp_path, monkeypatch):
    path = tmp_path / "t.csv"
    path.write_text("step\n")  # the file itself is writable
    directory = str(tmp_path)
    real_access = os.access
    # Root ignores permissions (chmod would not stop it): make the directory read-only
    # in os.access's eyes.
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode)
                        and not (os.fspath(p) == directory and mode & os.W_OK))
    with pytest.raises(ValueError, match=rf"csv_path '{path}': its directory '{directory}' "
                                         r"is not writable"):
        check_csv_path(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_the_csv_directory_must_be_writable_chmod(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "t.csv").write_text("step\n")
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            HessianTraceCallback((X, Y), csv_path=folder / "t.csv")
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("seed", ["a", 2.5, 2**31, -1, True])
def test_seed_is_checked_when_the_callback_is_made(seed):
    with pytest.raises(ValueError, match=rf"seed must be an integer in \[0, 2147483647\], "
                                         rf"got {seed!r}"):
        HessianTraceCallback((X, Y), seed=seed)
    assert HessianTraceCallback((X, Y), seed=2**31 - 1).seed == 2**31 - 1
    assert HessianTraceCallback((X, Y), seed=3.0).seed == 3


# ------------------------------------------------- issue 15: the h column, old CSVs resume

def test_the_csv_records_h_and_an_integer_alert(tmp_path):
    full = uninterrupted(tmp_path / "full.csv")
    assert list(full.columns[-5:]) == ["h", "z", "g_pos", "g_neg", "alert"]
    assert set(full.h[full.group == "total"]) == {0.5} and set(full.h[full.group == "head"]) == {1e9}
    assert full.h[full.group == "hidden"].isna().all()  # no detector on hidden
    lines = (tmp_path / "full.csv").read_text().splitlines()
    alerts = {line.split(",")[-1] for line in lines[1:] if line.split(",")[2] != "hidden"}
    assert alerts == {"0", "1"}  # integers, not 0.0 / 1.0


def test_a_csv_without_the_h_column_resumes_in_its_layout(tmp_path):
    full = uninterrupted(tmp_path / "full.csv")
    path = tmp_path / "resumed.csv"
    restored = fit_to_step_8(path, tmp_path)
    # As an earlier version wrote it: no h column.
    old = pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns="h")
    old.to_csv(path, index=False, lineterminator="\r\n")
    old_header = path.read_text().splitlines()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored.fit(X, Y, epochs=3, initial_epoch=2, callbacks=[callback(path)], **FIT)
    resumed = pd.read_csv(path)
    assert path.read_text().splitlines()[0] == old_header and "h" not in resumed.columns
    columns = COMPARED + [c for c in DETECTOR_COLUMNS if c != "h"]
    pd.testing.assert_frame_equal(resumed[columns], full[columns], rtol=1e-6)
    assert resumed.alert.sum() == full.alert.sum() > 0
