"""The README's demo (`keras-hesstrace demo`) on a small budget: its output and files."""

import numpy as np
import pandas as pd
import tensorflow as tf

from keras_hesstrace import cli

SMALL = ["--epochs", "2", "--clean-runs", "3", "--num-probes", "4", "--every-n-steps", "4",
         "--train-examples", "256", "--probe-batch-size", "32"]


def test_demo_small_budget_prints_table_alert_and_where_files_are(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    for needle in ("Phase I: 3 clean-label runs", "Calibrated: h =", "Per-layer Hessian traces",
                   "conv1", "conv2", "dense", "head", "total trace", "PH statistic",
                   f"tensorboard --logdir {out / 'tensorboard'}", "pd.read_csv(",
                   str(out / "demo.png"), "Demo finished in"):
        assert needle in text, needle

    runs = out / "small_cnn-digits" / "runs"
    noisy = pd.read_csv(runs / "noisy-eta0.40-seed3" / "traces.csv")
    # the noisy run was watched online: the callback wrote the detector's columns
    assert list(noisy.columns)[-4:] == ["z", "g_pos", "g_neg", "alert"]
    head = noisy[noisy["group"] == "head"]
    assert len(head) == 5 and head["z"].notna().all()
    # The printed verdict is the calibrated rule's, recomputed here from the CSV and the
    # calibration file: the first snapshot whose statistic max(g+, g-) passes h.
    import json

    cal = json.loads((out / "small_cnn-digits" / "calibration.json").read_text())
    h = cal["results"]["head"]["threshold"]
    statistic = np.maximum(head["g_pos"].to_numpy(), head["g_neg"].to_numpy())
    assert f"h = {h:.2f}" in text
    crossed = head["step"].to_numpy()[statistic > h]
    if len(crossed):
        assert f"ALERT: the Page-Hinkley rule fired at step {int(crossed[0])} " in text
    else:
        assert "No alert within 2 epochs." in text
    clean = pd.read_csv(runs / "calibration-eta0.00-seed0" / "traces.csv")
    assert len(clean) == 5 * (4 + 1)  # 5 snapshots x (4 layers + the total)
    # the layers cover every variable, so their traces add up to the total at each snapshot
    wide = clean.pivot(index="step", columns="group", values="trace")
    np.testing.assert_allclose(wide.drop(columns="total").sum(axis=1), wide["total"], rtol=1e-9)
    assert (out / "small_cnn-digits" / "calibration.json").exists()
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"

    # TensorBoard: the scalars are really in the event files (not just a header)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / "noisy-eta0.40-seed3" / "train"),
                           size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "hessian_trace/head" in tags and "hessian_trace_detector/head" in tags
    steps = [e.step for e in acc.Tensors("hessian_trace/head")]
    assert steps == [0, 4, 8, 12, 16]
    first = float(tf.make_ndarray(acc.Tensors("hessian_trace/head")[0].tensor_proto))
    assert abs(first - head["trace"].iloc[0]) < 1e-4 * max(1.0, abs(first))

    # a rerun with the same settings reuses every finished run
    assert cli.main(["demo", "--out", str(out), *SMALL]) == 0
    assert "epoch   1/2" not in capsys.readouterr().out
