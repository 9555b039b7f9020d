"""Issue 18, the runner's files: one runner per --out, nothing a killed process left is
kept, strict JSON, and no run adopts another run's files.

Each test works on a copy of one finished tiny experiment (or of one killed run), so the
grid is trained once for the module.
"""

import fcntl
import json
import math
import os
import re
import shutil
import subprocess

import keras
import numpy as np
import pytest

from keras_hesstrace.experiments import preset, run_experiment
from keras_hesstrace.experiments.config import run_specs
from keras_hesstrace.experiments.recording import read_trajectory_file
from keras_hesstrace.experiments.storage import load_result
from keras_hesstrace.experiments.training import train_run

CELL = "small_cnn-digits"


class _Interrupt(Exception):
    pass


class _KillAt(keras.callbacks.Callback):
    """Raise at the end of optimiser step ``step``, as a kill would stop the process."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise _Interrupt(f"killed at step {self.step}")


@pytest.fixture(scope="module")
def config():
    return preset("tiny")


@pytest.fixture(scope="module")
def finished(config, tmp_path_factory):
    """A finished tiny experiment (no summary), never modified: tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run_experiment(config, out, progress=False, summary=False)
    return out


@pytest.fixture(scope="module")
def killed(config, tmp_path_factory):
    """An experiment killed mid epoch 1 of its first run: that run has a checkpoint."""
    out = tmp_path_factory.mktemp("killed") / "out"
    first = run_specs(config, "small_cnn", "digits")[0][0]
    with pytest.raises(_Interrupt):
        run_experiment(config, out, progress=False,
                       callbacks_for=lambda s: [_KillAt(10)] if s.run_id == first.run_id else [])
    assert (out / CELL / "runs" / first.run_id / "checkpoint.npz").exists()
    return out


def _copy(src, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(src, out)
    return out


def _files(out) -> dict:
    """Every file under ``out`` but the lock file: relative path -> (size, mtime, bytes)."""
    found = {}
    for root, _, names in os.walk(out):
        for name in names:
            if name == ".keras-hesstrace.lock":
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, out)] = (os.stat(path).st_mtime_ns, f.read())
    return found


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _no_nan(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------- case 3: one runner


def test_a_second_runner_on_the_same_out_is_refused_before_touching_anything(
        config, finished, tmp_path):
    out = _copy(finished, tmp_path)
    run = out / CELL / "runs" / "noisy-eta0.60-seed4"
    (run / "result.json").unlink()  # an unfinished run the second runner would redo
    before = _files(out)
    # Another runner holds --out: an flock on its lock file, as FolderLock takes it.
    with open(out / ".keras-hesstrace.lock", "a+") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.seek(0)
        holder.truncate()
        holder.write("pid 12345 on elsewhere\n")
        holder.flush()
        with pytest.raises(RuntimeError, match=re.escape(str(out)) + ".*in use by pid 12345"):
            run_experiment(config, out, progress=False, summary=False)
        assert _files(out) == before
        fcntl.flock(holder.fileno(), fcntl.LOCK_UN)
    run_experiment(config, out, progress=False, summary=False)  # free again: it runs
    assert load_result(out, run_specs(config, "small_cnn", "digits")[1][-1])["seed"] == 4


# ------------------------------------------------- case 9: what a killed process left


def test_stale_temporaries_and_finished_runs_checkpoints_are_deleted_on_start(
        config, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    run = out / CELL / "runs" / "calibration-eta0.00-seed1"
    dead = _dead_pid()
    stale = [run / f"trajectory.json.tmp{dead}", run / f"checkpoint.npz.tmp{dead}",
             out / f"config.json.tmp{dead}"]
    for path in stale:
        path.write_bytes(b"half written")
    mine = run / f"notes.tmp{os.getpid()}"  # a live process's temporary is kept
    mine.write_bytes(b"being written")
    (run / "checkpoint.npz").write_bytes(b"x" * 1000)  # a kill after result.json was written
    run_experiment(config, out, summary=False)
    assert not any(p.exists() for p in stale) and mine.exists()
    assert not (run / "checkpoint.npz").exists()
    assert ("removed 3 stale temporary file(s) of killed processes and 1 checkpoint(s) of "
            "finished runs") in capsys.readouterr().out
    for d in (out / CELL / "runs").iterdir():
        assert not (d / "checkpoint.npz").exists(), d


def test_result_and_trajectory_are_strict_json_with_nan_as_null(config, finished):
    run = finished / CELL / "runs" / "calibration-eta0.00-seed0"  # clean: nothing memorised
    text = (run / "result.json").read_text()
    result = _no_nan(text)
    assert result["memorised_fraction"] is None and '"memorised_fraction": null' in text
    trajectory = _no_nan((run / "trajectory.json").read_text())
    assert trajectory["epochs"]["memorised_fraction"] == [None] * config.epochs
    _no_nan((finished / "config.json").read_text())
    calibration = _no_nan((finished / CELL / "calibration.json").read_text())
    # the calibration records the clean runs' model, as their results do
    assert calibration["model_fingerprint"] == result["identity"]["model"]
    identity = result["identity"]
    assert (identity["cell"], identity["role"], identity["seed"]) == (CELL, "calibration", 0)
    assert identity["model"] and all(isinstance(path, str) and isinstance(shape, list)
                                     for path, shape in identity["model"])
    # ... and read back as NaN
    spec = run_specs(config, "small_cnn", "digits")[0][0]
    assert math.isnan(load_result(finished, spec)["memorised_fraction"])
    t = read_trajectory_file(run / "trajectory.json")
    assert np.isnan(t["memorised_fraction"]).all() and math.isnan(
        t["result"]["memorised_fraction"])


def test_a_result_written_before_strict_json_still_reads(config, finished, tmp_path):
    out = _copy(finished, tmp_path)
    spec = run_specs(config, "small_cnn", "digits")[0][0]
    path = out / CELL / "runs" / spec.run_id / "result.json"
    old = json.loads(path.read_text())
    old.pop("identity", None)
    old["memorised_fraction"] = float("nan")
    path.write_text(json.dumps(old, indent=1))  # a bare NaN, no identity: an older file
    assert "NaN" in path.read_text()
    assert math.isnan(load_result(out, spec)["memorised_fraction"])
    run_experiment(config, out, progress=False, summary=False)  # accepted


def test_an_unreadable_result_or_trace_csv_is_named(config, finished, tmp_path):
    out = _copy(finished, tmp_path)
    path = out / CELL / "runs" / "clean-eta0.00-seed3" / "result.json"
    path.write_text('{"run_id": ')
    with pytest.raises(ValueError, match=re.escape(repr(str(path)))):
        run_experiment(config, out, progress=False, summary=False)
    shutil.copyfile(finished / CELL / "runs" / "clean-eta0.00-seed3" / "result.json", path)
    csv_path = out / CELL / "runs" / "calibration-eta0.00-seed2" / "traces.csv"
    csv_path.write_bytes(b"step,epoch,group,trace\n0,0,head,\xff\xfe\n")
    with pytest.raises(ValueError, match=re.escape(repr(str(csv_path)))):
        run_experiment(config, out, progress=False, summary=False)


# ------------------------------------------------- case 5: another run's files


def test_a_run_folder_copied_from_another_seed_is_refused(config, finished, tmp_path):
    out = _copy(finished, tmp_path)
    runs = out / CELL / "runs"
    shutil.rmtree(runs / "calibration-eta0.00-seed1")
    shutil.copytree(runs / "calibration-eta0.00-seed0", runs / "calibration-eta0.00-seed1")
    path = runs / "calibration-eta0.00-seed1" / "result.json"
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*seed: 0 there, 1 here"):
        run_experiment(config, out, progress=False, summary=False)


def test_a_checkpoint_copied_from_another_seed_is_refused(config, killed, tmp_path):
    phase1 = run_specs(config, "small_cnn", "digits")[0]
    seed0, seed1 = phase1[0], phase1[1]
    src = killed / CELL / "runs" / seed0.run_id
    run_dir = tmp_path / seed1.run_id
    run_dir.mkdir()
    for name in ("checkpoint.npz", "traces.csv"):
        shutil.copyfile(src / name, run_dir / name)
    path = run_dir / "checkpoint.npz"
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*seed: 0 there, 1 here"):
        train_run(config, seed1, str(run_dir), progress=False)
    assert not (run_dir / "result.json").exists()


def test_a_checkpoint_whose_identity_was_edited_is_refused(config, killed, tmp_path):
    out = _copy(killed, tmp_path)
    seed0 = run_specs(config, "small_cnn", "digits")[0][0]
    path = out / CELL / "runs" / seed0.run_id / "checkpoint.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta.setdefault("identity", {})["seed"] = 7
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*seed: 7 there, 0 here"):
        run_experiment(config, out, progress=False, summary=False)


def test_an_unreadable_checkpoint_is_named(config, killed, tmp_path):
    out = _copy(killed, tmp_path)
    seed0 = run_specs(config, "small_cnn", "digits")[0][0]
    path = out / CELL / "runs" / seed0.run_id / "checkpoint.npz"
    path.write_bytes(path.read_bytes()[:100])  # torn
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*not a readable"):
        run_experiment(config, out, progress=False, summary=False)


def test_a_checkpoint_that_cannot_be_written_is_named(tmp_path):
    from keras_hesstrace.experiments.storage import save_checkpoint

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    path = tmp_path / "gone" / "checkpoint.npz"  # its folder was deleted under the run
    with pytest.raises(OSError, match="checkpoint " + re.escape(repr(str(path)))):
        save_checkpoint(str(path), model, {"epochs_done": 1})
