"""PyHessian's architecture study (issue 16): the tiny preset end to end, resuming after a
kill, the per-part traces against the whole-model trace, the settings and the CLI.

The tiny study (two ResNet-8s on 256 digits, 2 epochs, both measured) runs once for the
module, about 50 s on 2 CPU cores; the kill-and-resume test trains one more variant.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from keras_hesstrace import cli
from keras_hesstrace.experiments.study_config import PARTS, STAGES, StudyConfig, study_plan, study_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strict(path):
    """The file as strict JSON: NaN / Infinity are refused."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not strict JSON")
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


def _files(out):
    """{relative path: bytes} of every file under ``out`` but the lock."""
    found = {}
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            if name != ".keras-hesstrace.lock":
                with open(path, "rb") as f:
                    found[os.path.relpath(path, out)] = f.read()
    return found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from keras_hesstrace.experiments.study import run_study

    out = tmp_path_factory.mktemp("study") / "tiny"
    config = study_preset("tiny")
    rows = run_study(config, out, progress=False)
    return config, str(out), rows


def test_tiny_preset_end_to_end(tiny):
    config, out, rows = tiny
    assert len(rows) == len(config.variants) * len(config.checkpoints) == 4
    for variant in config.variants:
        folder = os.path.join(out, variant)
        assert sorted(os.listdir(folder)) == ["checkpoint-1.json", "checkpoint-2.json",
                                              "landscape.json", "result.json"]  # checkpoint.npz gone
        for name in os.listdir(folder):
            _strict(os.path.join(folder, name))
        result = _strict(os.path.join(folder, "result.json"))
        assert result["epochs"] == 2 and len(result["history"]) == 2
        land = _strict(os.path.join(folder, "landscape.json"))
        grid = config.landscape_grid
        assert len(land["losses"]) == grid and all(len(r) == grid for r in land["losses"])
        assert math.isclose(land["losses"][grid // 2][grid // 2], land["origin_loss"], rel_tol=1e-4)
        rec = _strict(os.path.join(folder, "checkpoint-2.json"))
        assert len(rec["top_eigenvalues"]) == config.top_k
        assert rec["top_eigenvalues"][0] >= rec["top_eigenvalues"][1]
        assert set(rec["parts"]) == set(PARTS) and set(rec["stage_lambda_max"]) == set(STAGES)
        assert len(rec["density"]["nodes"]) == config.density_runs
        assert abs(sum(rec["density"]["weights"][0]) - 1) < 1e-6
    import csv

    with open(os.path.join(out, "summary.csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["variant"], r["epoch"]) for r in table] == [
        ("resnet8", "1"), ("resnet8", "2"), ("resnet8-nobn", "1"), ("resnet8-nobn", "2")]
    assert {r["batch_norm"] for r in table} == {"true", "false"}
    for r in table:
        assert float(r["lambda_max"]) > 0  # trained models: a positive top eigenvalue
        assert float(r["trace_stderr"]) > 0 and 0 <= float(r["test_accuracy"]) <= 1
        for p in PARTS:
            assert math.isfinite(float(r[f"{p}_trace"]))
    with open(os.path.join(out, "stages.csv"), newline="") as f:
        assert len(list(csv.DictReader(f))) == 4 * len(PARTS)


def test_parts_sum_to_the_whole_model_trace(tiny):
    """stem + stage1..3 + head (one layer_traces call, independent probes) agree with
    hessian_trace within 4 combined standard errors; the parts hold every variable."""
    config, out, _ = tiny
    for variant in config.variants:
        for epoch in config.checkpoints:
            rec = _strict(os.path.join(out, variant, f"checkpoint-{epoch}.json"))
            parts = sum(rec["parts"][p]["trace"] for p in PARTS)
            assert math.isclose(parts, rec["parts_total"], rel_tol=1e-6, abs_tol=1e-6)  # they cover the model
            combined = math.hypot(rec["trace_stderr"], rec["parts_total_stderr"])
            assert abs(parts - rec["trace"]) <= 4 * combined, (variant, epoch, parts, rec["trace"], combined)
            assert rec["stage_dimension"]["stage3"] > rec["stage_dimension"]["stage1"] > 0
            assert sum(rec["stage_dimension"].values()) < rec["dimension"]


def test_a_finished_study_is_never_redone(tiny, monkeypatch):
    from keras_hesstrace.experiments import study

    config, out, rows = tiny
    before = _files(out)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished study recomputed something")

    for name in ("measure", "landscape", "StudyData", "build_model"):
        monkeypatch.setattr(study, name, refuse)
    assert study.run_study(config, out, progress=False) == rows
    assert _files(out) == before


def test_another_config_is_refused(tiny):
    from keras_hesstrace.experiments.study import run_study

    config, out, _ = tiny
    with pytest.raises(ValueError, match="another config"):
        run_study(study_preset("tiny", trace_probes=12), out, progress=False)


class _Killed(Exception):
    pass


def test_resume_after_a_kill_redoes_nothing(tiny, tmp_path, monkeypatch):
    """Killed after epoch 1's measurements: the rerun trains epoch 2 only, measures epoch 2
    only, keeps epoch 1's file byte for byte, and ends where an uninterrupted run ends."""
    from keras_hesstrace.experiments import study

    _, tiny_out, _ = tiny
    config = study_preset("tiny", variants=["resnet8"])
    out = str(tmp_path / "killed")

    def kill(kind, variant, epoch):
        if (kind, epoch) == ("checkpoint", 1):
            raise _Killed()

    with pytest.raises(_Killed):
        study.run_study(config, out, progress=False, on_event=kill)
    folder = os.path.join(out, "resnet8")
    assert sorted(os.listdir(folder)) == ["checkpoint-1.json", "checkpoint.npz"]
    first = _files(out)

    calls = {"measure": [], "landscape": 0, "epochs": []}
    measure, landscape, epoch_dataset = study.measure, study.landscape, study.StudyData.epoch_dataset

    def counting_measure(model, x, y, cfg, epoch):
        calls["measure"].append(epoch)
        return measure(model, x, y, cfg, epoch)

    def counting_landscape(*args):
        calls["landscape"] += 1
        return landscape(*args)

    def counting_epochs(self, cfg, epoch):
        calls["epochs"].append(epoch)
        return epoch_dataset(self, cfg, epoch)

    monkeypatch.setattr(study, "measure", counting_measure)
    monkeypatch.setattr(study, "landscape", counting_landscape)
    monkeypatch.setattr(study.StudyData, "epoch_dataset", counting_epochs)
    study.run_study(config, out, progress=False)
    assert calls == {"measure": [2], "landscape": 1, "epochs": [1]}  # epoch index 1 = the second
    after = _files(out)
    assert after["resnet8/checkpoint-1.json"] == first["resnet8/checkpoint-1.json"]
    assert "resnet8/checkpoint.npz" not in after and "resnet8/result.json" in after

    # the resumed run ends where the uninterrupted one (the module's tiny study) ended
    for epoch in (1, 2):
        resumed = _strict(os.path.join(folder, f"checkpoint-{epoch}.json"))
        straight = _strict(os.path.join(tiny_out, "resnet8", f"checkpoint-{epoch}.json"))
        for key in ("test_accuracy", "lambda_max", "trace", "hessian_loss"):
            assert math.isclose(resumed[key], straight[key], rel_tol=1e-3), (epoch, key)

    calls["measure"].clear()
    study.run_study(config, out, progress=False)  # finished: nothing at all
    assert calls == {"measure": [], "landscape": 1, "epochs": [1]}


# ------------------------------------------------------------------ settings and CLI (no TF)


@pytest.mark.parametrize("change, message", [
    (dict(variants=["resnet21"]), "unknown variant 'resnet21'"),
    (dict(variants=["resnet8-nobn4"]), "unknown variant 'resnet8-nobn4'"),
    (dict(variants=[]), "variants must name"),
    (dict(checkpoints=[1]), "checkpoints must be increasing and end at epochs=2"),
    (dict(checkpoints=[0, 2]), "checkpoints must be an integer"),
    (dict(hessian_batch_size=400), "hessian_batch_size=400 is more than the 256"),
    (dict(dataset="mnist"), "unknown dataset 'mnist'"),
    (dict(trace_probes=1), "trace_probes must be an integer >= 2"),
    (dict(learning_rate=0.0), "learning_rate must be"),
    (dict(augment=True), "augment is the CIFAR"),
])
def test_validate_names_the_bad_setting(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        study_preset("tiny", **change)


def test_presets_and_plan():
    for name in ("tiny", "cpu-small", "paper"):
        config = study_preset(name)
        assert isinstance(config, StudyConfig) and config.checkpoints[-1] == config.epochs
    paper = study_preset("paper")
    assert paper.dataset == "cifar10" and len(paper.variants) == 9
    plan = study_plan(paper, 0.05, 0.2)
    assert plan["steps"] == 9 * 391 * 160 and plan["hours"] > 0
    assert study_plan(study_preset("tiny"))["hvps_per_checkpoint"] == 2 * 6 + 8 + 8 + 3 * 6 + 6


def test_cli_study_plan_and_refused_flags(capsys):
    assert cli.main(["study", "--preset", "tiny", "--plan"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"] == 2
    assert cli.main(["study", "--preset", "huge", "--plan"]) == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    assert cli.main(["study", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out is required" in err[0]


def test_cli_study_plan_imports_no_tensorflow():
    code = ("import sys\nfrom keras_hesstrace import cli\n"
            "code = cli.main(['study', '--preset', 'cpu-small', '--plan'])\n"
            "print(code, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-3:] == ["0", "False", "False"]
