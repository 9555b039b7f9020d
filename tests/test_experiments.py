"""The memorisation runner: a tiny grid end to end, its files, and resuming after a kill."""

import csv
import json
import os

import keras
import numpy as np
import pandas as pd
import pytest

from keras_hesstrace.experiments import plan, preset, run_experiment
from keras_hesstrace.experiments.config import ExperimentConfig, run_specs
from keras_hesstrace.experiments.report import DETECTION_COLUMNS, SUMMARY_COLUMNS, summarize
from keras_hesstrace.experiments.scoring import calibrate_cell, detections, rule_values
from keras_hesstrace.experiments.storage import read_trajectory, truncate_csv
from keras_hesstrace.monitor import Calibration

TINY = dict()  # the "tiny" preset: 3 calibration + 1 held-out clean + 1 noisy run, 2 epochs
STEPS_PER_EPOCH = 8  # 256 training examples / batch 32
SNAPSHOTS = 2 * STEPS_PER_EPOCH // 4 + 1  # every 4 steps, step 0 included


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    config = preset("tiny", **TINY)
    frame = run_experiment(config, out, progress=False)
    return config, out, frame


def _run_dirs(out):
    root = out / "small_cnn-digits" / "runs"
    return {p.name: p for p in sorted(root.iterdir())}


def test_every_run_finished_with_its_files(finished):
    config, out, _ = finished
    runs = _run_dirs(out)
    assert sorted(runs) == ["calibration-eta0.00-seed0", "calibration-eta0.00-seed1",
                            "calibration-eta0.00-seed2", "clean-eta0.00-seed3",
                            "noisy-eta0.60-seed4"]
    for name, d in runs.items():
        # checkpoint removed; the callback's CSV identity sidecar and (released) lock file stay
        assert sorted(os.listdir(d)) == ["result.json", "traces.csv", "traces.csv.identity.json",
                                         "traces.csv.lock", "trajectory.json"]
        res = json.loads((d / "result.json").read_text())
        assert res["run_id"] == name and res["n_snapshots"] == SNAPSHOTS
        assert res["steps_per_epoch"] == STEPS_PER_EPOCH and res["segments"] == 1
        assert 0.0 <= res["test_accuracy"] <= 1.0
        frame = pd.read_csv(d / "traces.csv")
        # the callback's CSV: one row per (snapshot, layer)
        assert list(frame.columns) == ["step", "epoch", "group", "trace", "stderr",
                                       "num_probes", "probe_seed", "wall_time", "status"]
        assert sorted(frame["step"].unique()) == list(range(0, 17, 4))
        assert set(frame["group"]) == {"conv1", "conv2", "dense", "head", "total"}
        assert (frame["status"] == "ok").all()
        assert (frame["num_probes"] == config.num_probes).all()
    noisy = json.loads((runs["noisy-eta0.60-seed4"] / "result.json").read_text())
    assert noisy["noise_rate"] == 0.6 and 0.45 < noisy["n_corrupted"] / noisy["n_train"] < 0.75


def test_summary_detections_calibration_and_plots_schema(finished):
    config, out, frame = finished
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary["noise_rate"].tolist() == [0.0, 0.6]
    assert summary["runs_source"].tolist() == ["heldout", "noisy"]
    assert (summary["n_runs"] == 1).all()
    assert ((summary["alert_rate_low"] <= summary["alert_rate"])
            & (summary["alert_rate"] <= summary["alert_rate_high"])).all()
    pd.testing.assert_frame_equal(frame.reset_index(drop=True), summary, check_dtype=False)

    det = pd.read_csv(out / "detections.csv")
    assert list(det.columns) == DETECTION_COLUMNS
    assert len(det) == 5 and set(det["role"]) == {"calibration", "clean", "noisy"}
    assert set(det["alert"]) <= {0, 1}
    alerted = det[det["alert"] == 1]
    assert (alerted["alert_epoch"] == alerted["alert_step"] / STEPS_PER_EPOCH).all()

    cal = Calibration.load(out / "small_cnn-digits" / "calibration.json")
    cal.check_compatible(["conv1", "conv2", "dense", "head"], config.every_n_steps)
    assert cal.groups == ("head",) and cal.transform == "log"
    assert cal["head"].n_runs == 3 and len(cal["head"].baseline) == SNAPSHOTS
    assert summary["h"].iloc[0] == pytest.approx(cal.threshold)

    md = (out / "summary.md").read_text()
    assert "| arch | dataset | group | η |" in md and "## Calibration" in md
    for kind in ("trajectories", "statistic"):
        png = out / "plots" / f"small_cnn-digits-head-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert json.loads((out / "config.json").read_text()) == config.to_dict()


def test_rerun_redoes_nothing_and_other_settings_are_refused(finished, capsys):
    config, out, _ = finished
    stamps = {p: os.stat(p / "result.json").st_mtime_ns for p in _run_dirs(out).values()}
    run_experiment(config, out, summary=False)
    log = capsys.readouterr().out
    assert log.count("done before, skipped") == 5 and "training" not in log
    assert stamps == {p: os.stat(p / "result.json").st_mtime_ns for p in _run_dirs(out).values()}
    with pytest.raises(ValueError, match="another config.*epochs"):
        run_experiment(preset("tiny", epochs=3), out)


class _Interrupt(Exception):
    pass


class _KillAt(keras.callbacks.Callback):
    """Raise at the end of an optimiser step, as a kill would stop the process there."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise _Interrupt(f"killed at step {self.step}")


def test_resume_mid_run_matches_the_uninterrupted_run(finished, tmp_path, capsys):
    config, reference, _ = finished
    out = tmp_path / "resumed"
    victim = "clean-eta0.00-seed3"
    # Step 13: mid epoch 1, after the trace snapshot at step 12 was written (the callback
    # takes it as the batch after step 12 begins), after the epoch-0 checkpoint (step 8).
    with pytest.raises(_Interrupt):
        run_experiment(config, out, progress=False,
                       callbacks_for=lambda s: [_KillAt(13)] if s.run_id == victim else [])
    runs = _run_dirs(out)
    assert not (runs[victim] / "result.json").exists()
    assert (runs[victim] / "checkpoint.npz").exists()
    assert "noisy-eta0.60-seed4" not in runs
    steps = pd.read_csv(runs[victim] / "traces.csv")["step"].unique().tolist()
    assert steps == [0, 4, 8, 12]
    with open(runs[victim] / "traces.csv", "a") as f:  # and a row half-written by the kill
        f.write("16,1,head,0.12")
    finished_before = {n: os.stat(d / "result.json").st_mtime_ns
                       for n, d in runs.items() if (d / "result.json").exists()}
    assert len(finished_before) == 3
    capsys.readouterr()

    frame = run_experiment(config, out)
    log = capsys.readouterr().out
    assert log.count("done before, skipped") == 3
    # 3 snapshots (steps 0, 4, 8) x (4 layers + the total)
    assert "resuming from the checkpoint after epoch 1 (step 8, 15 trace rows kept)" in log, log
    runs = _run_dirs(out)
    for n, t in finished_before.items():
        assert os.stat(runs[n] / "result.json").st_mtime_ns == t  # not redone
    res = json.loads((runs[victim] / "result.json").read_text())
    assert res["segments"] == 2 and not (runs[victim] / "checkpoint.npz").exists()

    # Same trajectories, accuracies and summary as the uninterrupted run (CPU kernels
    # are deterministic here; allow float round-off).
    ref_runs = _run_dirs(reference)
    for name in ref_runs:
        a = pd.read_csv(ref_runs[name] / "traces.csv")
        b = pd.read_csv(runs[name] / "traces.csv")
        assert a[["step", "epoch", "group", "probe_seed"]].equals(
            b[["step", "epoch", "group", "probe_seed"]]), name
        np.testing.assert_allclose(b["trace"], a["trace"], rtol=1e-4, atol=1e-6, err_msg=name)
        ra = json.loads((ref_runs[name] / "result.json").read_text())
        rb = json.loads((runs[name] / "result.json").read_text())
        assert ra["test_accuracy"] == pytest.approx(rb["test_accuracy"], abs=0.01)
    ref = pd.read_csv(reference / "summary.csv")
    pd.testing.assert_frame_equal(frame[["noise_rate", "n_runs"]], ref[["noise_rate", "n_runs"]],
                                  check_dtype=False)
    np.testing.assert_allclose(frame["h"], ref["h"], rtol=1e-3)


def test_truncate_keeps_complete_rows_up_to_the_checkpoint(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("step,epoch,group\n0,0,a\n4,0,a\n8,1,a\n12,1,a\n16,1")
    assert truncate_csv(str(p), 8) == 3
    assert p.read_text() == "step,epoch,group\n0,0,a\n4,0,a\n8,1,a\n"
    with open(p, newline="") as f:
        assert len(list(csv.reader(f))) == 4


def test_config_presets_files_and_plan(tmp_path):
    cfg = preset("cpu-small")
    assert cfg.archs == ["small_cnn"] and cfg.datasets == ["digits"]
    p = plan(cfg, seconds_per_step=0.01, seconds_per_hvp=0.05)
    # 1400 digits, 140 held out for validation: 1260 trained on, 40 steps an epoch.
    assert p["runs"] == 20 + 40 + 3 * 5 and p["cells"][0]["steps_per_run"] == 16 * 40
    assert p["cells"][0]["snapshots_per_run"] == 16 * 40 // 22 + 1
    assert p["hours"] == pytest.approx(p["runs"] * (640 * 0.01 + 30 * 10 * 0.05) / 3600)
    confirm = preset("cpu-confirm")
    assert confirm.seed_offset == 5000
    assert {k: v for k, v in confirm.to_dict().items() if k not in ("name", "seed_offset")} == \
        {k: v for k, v in cfg.to_dict().items() if k not in ("name", "seed_offset")}
    paper = preset("paper")
    pp = plan(paper)
    assert pp["runs"] == 6 * (10 + 10 + 3 * 10) and pp["cells"][0]["steps_per_epoch"] == 352
    with pytest.raises(ValueError, match="exactly one of false_alarm_prob"):
        preset("tiny", target_arl0=300.0)
    old = ExperimentConfig.from_dict({"target_arl0": 300.0})  # a config.json from before
    assert old.false_alarm_prob is None and old.validate().target_arl0 == 300.0
    # the grouping is by= as everywhere in the API; a config.json that calls it groups loads,
    # and a folder written with it resumes (check_config compares in today's names)
    assert "by" in cfg.to_dict() and "groups" not in cfg.to_dict()
    assert ExperimentConfig.from_dict({"groups": "variable"}).by == "variable"
    from keras_hesstrace.experiments.storage import check_config

    tiny = preset("tiny")
    folder = tmp_path / "old-out"
    folder.mkdir()
    written = tiny.to_dict()
    written["groups"] = written.pop("by")
    (folder / "config.json").write_text(json.dumps(written))
    check_config(str(folder), tiny)  # no "another config" refusal
    with pytest.raises(ValueError, match=r"differs in \['by'\]"):
        check_config(str(folder), preset("tiny", by="variable"))
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"preset": "tiny", "epochs": 3, "noise_rates": [0.4, 0.8]}))
    c = ExperimentConfig.from_file(f)
    assert c.epochs == 3 and c.noise_rates == [0.4, 0.8] and c.calibration_runs == 3
    with pytest.raises(ValueError, match="unknown config keys"):
        ExperimentConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="calibration_runs"):
        preset("tiny", calibration_runs=2)
    with pytest.raises(ValueError, match="noisy rates"):
        preset("tiny", noise_rates=[0.0, 0.4])
    with pytest.raises(ValueError, match="unknown arch"):
        preset("tiny", archs=["resnet50"])


def test_cli_experiment_flags(tmp_path, capsys):
    from keras_hesstrace import cli

    assert cli.main(["experiment", "--preset", "tiny", "--epochs", "3", "--noise-rates",
                     "0.2,0.4", "--transform", "none", "--show-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["epochs"] == 3 and shown["noise_rates"] == [0.2, 0.4]
    assert shown["transform"] is None and shown["calibration_runs"] == 3
    assert cli.main(["experiment", "--preset", "paper", "--plan"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == 300


def test_reference_snapshot_scores_each_run_against_its_own_snapshot(finished, tmp_path):
    import dataclasses
    import shutil

    from keras_hesstrace.monitor import calibrate_threshold

    config, out, _ = finished
    copy = tmp_path / "ref"
    shutil.copytree(out, copy)  # the same runs, re-scored: no retraining
    ref = dataclasses.replace(config, monitor=["total", "head"], reference_snapshot=1).validate()
    cal = calibrate_cell(ref, copy, "small_cnn", "digits")
    assert cal.reference_snapshot == 1 and cal["total"].baseline.first_scored == 2
    phase1, _ = run_specs(ref, "small_cnn", "digits")
    raw = np.array([rule_values(ref, read_trajectory(
        copy / "small_cnn-digits" / "runs" / s.run_id / "traces.csv", "total")[1]) for s in phase1])
    manual = calibrate_threshold(np.log(raw[:, 2:]) - np.log(raw[:, 1:2]),
                                 false_alarm_prob=ref.false_alarm_prob, delta=ref.delta, seed=0)
    assert cal["total"].threshold == manual.threshold
    records = detections(ref, copy, "small_cnn", "digits", cal)
    assert len(records) == 2 * 5
    for rec in records:
        v = rec["_values"]
        np.testing.assert_allclose(rec["_scale"][2:], np.log(v[2:]) - np.log(v[1]), rtol=1e-12)
        assert np.isnan(rec["_scale"][:2]).all()
        if rec["role"] != "calibration":
            assert (rec["_statistic"][:2] == 0).all()   # snapshots 0, 1 are not scored
        assert rec["alert_snapshot"] is None or rec["alert_snapshot"] >= 2
    summarize(ref, copy, progress=False)
    md = (copy / "summary.md").read_text()
    assert "log trace minus the run's own value at snapshot 1" in md
    assert (copy / "plots" / "small_cnn-digits-total-trajectories.png").stat().st_size > 10_000
    assert preset("tiny", reference_snapshot=3).reference_snapshot == 3  # 5 snapshots a run
    with pytest.raises(ValueError, match="leaves nothing to score"):
        preset("tiny", reference_snapshot=4)
    with pytest.raises(ValueError, match=r"reference_snapshot must be None \(no reference\) or an integer >= 0"):
        preset("tiny", reference_snapshot=-1)


def test_rescore_example_reproduces_the_runners_detections(finished):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "rescore_experiment.py"
    spec = importlib.util.spec_from_file_location("rescore_experiment", path)
    rescore = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rescore)
    config, out, _ = finished
    lines = rescore.rescore(str(out))
    cal = Calibration.load(out / "small_cnn-digits" / "calibration.json")
    det = pd.read_csv(out / "detections.csv")
    as_run = next(line for line in lines if "as run" in line)
    held = det[det.role == "clean"]
    noisy = det[det.role == "noisy"]
    assert f"h = {cal.threshold:6.2f}" in as_run
    assert f"LOO false alarms {cal['head'].loo_false_alarms}/3" in as_run
    assert f"held-out false alarms {int(held.alert.sum())}/1" in as_run
    assert f"η 0.6: {int(noisy.alert.sum())}/1" in as_run
    assert any("swapped" in line for line in lines) is False  # one held-out run: no swap
    assert any("all clean" in line and "/4" in line for line in lines)


def test_trajectory_holds_the_first_order_view_of_each_run(finished):
    from keras_hesstrace.experiments.recording import read_trajectory_file

    config, out, _ = finished
    d = _run_dirs(out)["noisy-eta0.60-seed4"]
    t = read_trajectory_file(d / "trajectory.json")
    res = json.loads((d / "result.json").read_text())
    assert list(t["steps"]) == list(range(0, 17, 4))
    csv_frame = pd.read_csv(d / "traces.csv")
    for g in ("head", "total"):
        rows = csv_frame[csv_frame["group"] == g].sort_values("step")
        np.testing.assert_array_equal(t["trace"][g], rows["trace"].to_numpy())
    assert np.all(t["probe_loss"] > 0) and np.all(t["gradient_norm"] > 0)
    # The layers cover the model: the group norms add up in squares to the whole norm.
    squares = sum(v ** 2 for v in t["gradient_norms"].values())
    np.testing.assert_allclose(t["gradient_norm"] ** 2, squares, rtol=1e-6)
    assert list(t["epoch"]) == [1, 2]
    # The last epoch's record and the final evaluation see the same model, by other code.
    assert t["test_accuracy"][-1] == res["test_accuracy"]
    assert t["memorised_fraction"][-1] == res["memorised_fraction"]
    assert res["n_validation"] == 26 and res["n_train"] == 230
    assert np.all(np.isfinite(t["val_loss"])) and np.all((0 <= t["val_accuracy"]) & (t["val_accuracy"] <= 1))


def test_baselines_and_comparison_on_the_same_runs(finished):
    from keras_hesstrace.experiments.baselines import methods

    config, out, _ = finished
    stops = pd.read_csv(out / "stops.csv")
    assert sorted(set(stops["run_id"])) == ["clean-eta0.00-seed3", "noisy-eta0.60-seed4"]
    assert stops.groupby("run_id")["method"].apply(list).map(sorted).tolist() == [
        sorted(methods(config))] * 2
    det = pd.read_csv(out / "detections.csv")
    curv = stops[stops["method"] == "curvature"].set_index("run_id")["alert_epoch"]
    for _, r in det[det["role"] != "calibration"].iterrows():
        assert (np.isnan(curv[r.run_id]) and np.isnan(r.alert_epoch)) or curv[r.run_id] == r.alert_epoch
    assert ((stops["stop_epoch"] >= 1) & (stops["stop_epoch"] <= config.epochs)).all()
    assert (stops["test_accuracy_at_stop"] <= stops["best_test_accuracy"]).all()
    comp = pd.read_csv(out / "comparison.csv")
    assert len(comp) == len(methods(config)) * 2
    assert "First-order baselines" in (out / "summary.md").read_text()
    assert (out / "plots" / "comparison.png").stat().st_size > 10_000


def test_worth_reads_the_epoch_the_stop_falls_in():
    from keras_hesstrace.experiments.baselines import worth

    traj = {"test_accuracy": np.array([0.5, 0.7, 0.6]),
            "memorised_fraction": np.array([0.0, 0.1, 0.4])}
    assert worth(traj, None)["stop_epoch"] == 3
    assert worth(traj, 0.0)["stop_epoch"] == 1  # an alert at step 0: after epoch 1
    w = worth(traj, 1.25)
    assert (w["stop_epoch"], w["test_accuracy_at_stop"], w["memorised_at_stop"]) == (2, 0.7, 0.1)
    assert worth(traj, 2.0)["stop_epoch"] == 2
    assert (w["best_test_accuracy"], w["final_test_accuracy"]) == (0.7, 0.6)


def test_export_round_copies_the_report_and_every_trajectory(finished, tmp_path):
    from keras_hesstrace.experiments.recording import read_trajectory_file
    from keras_hesstrace.experiments.storage import export_round

    config, out, _ = finished
    dest = tmp_path / "round"
    assert export_round(out, dest) == 5
    names = sorted(os.listdir(dest))
    assert names == ["comparison.csv", "config.json", "detections.csv", "plots",
                     "small_cnn-digits-calibration.json", "stops.csv", "summary.csv",
                     "summary.md", "trajectories"]
    runs = sorted(os.listdir(dest / "trajectories" / "small_cnn-digits"))
    assert runs == sorted(f"{r}.json" for r in _run_dirs(out))
    t = read_trajectory_file(dest / "trajectories" / "small_cnn-digits" / runs[0])
    assert len(t["epoch"]) == config.epochs
