"""The analysis subcommands (estimate, eigen, density, landscape) on a tiny saved model."""

import json
import os

import numpy as np
import pytest
import keras

from keras_hesstrace import cli

SMALL = ["--data", "digits", "--num-examples", "64", "--seed", "0"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, activation="tanh", name="conv"),
         keras.layers.Flatten(name="flat"), keras.layers.Dense(10, name="head")]
    )
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.save(tmp / "m.keras")
    bare = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    bare.save(tmp / "nocompile.keras")
    flat = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, name="head")])
    flat.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    flat.save(tmp / "flat.keras")
    wide = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    wide.compile(loss="sparse_categorical_crossentropy")
    wide.save(tmp / "mnist_shaped.keras")
    return tmp


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_writes_table_csv_json_and_bars(saved, capsys):
    out_dir = saved / "est"
    code, out, err = _run(["estimate", str(saved / "m.keras"), *SMALL, "--num-probes", "4", "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert "conv" in out and "head" in out and "total trace" in out
    for name in ("traces.csv", "estimate.json", "traces.png"):
        assert (out_dir / name).stat().st_size > 0
    payload = json.loads((out_dir / "estimate.json").read_text())
    assert payload["num_probes"] == 4 and payload["num_examples"] == 64
    assert [row["group"] for row in payload["groups_table"]] == ["conv", "head"]


def test_eigen_in_dataset_mode_with_a_block(saved, capsys):
    out_dir = saved / "eig"
    code, out, err = _run(["eigen", str(saved / "m.keras"), *SMALL, "--batch-size", "32", "--k", "2", "--block", "head",
                           "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert "eigenvalue" in out and "lanczos" in out
    payload = json.loads((out_dir / "eigen.json").read_text())
    assert payload["dimension"] == 730 and len(payload["eigenvalues"]) == 2 and payload["batch_size"] == 32
    assert payload["eigenvalues"][0] >= payload["eigenvalues"][1] > 0


def test_density_writes_csv_and_log_plot(saved, capsys):
    out_dir = saved / "den"
    code, out, err = _run(["density", str(saved / "m.keras"), *SMALL, "--lanczos-steps", "12", "--num-runs", "2",
                           "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert "SLQ: 2 run(s) x 12 Lanczos steps" in out
    for name in ("nodes.csv", "density.csv", "density.json", "density.png"):
        assert (out_dir / name).stat().st_size > 0
    payload = json.loads((out_dir / "density.json").read_text())
    assert all(abs(sum(w) - 1.0) < 1e-5 for w in payload["weights"])


def test_landscape_restores_the_saved_weights(saved, capsys, tmp_path):
    out_dir = saved / "land"
    code, out, err = _run(["landscape", str(saved / "m.keras"), *SMALL, "--grid", "3", "--span", "0.1",
                           "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert "loss landscape" in out
    payload = json.loads((out_dir / "landscape.json").read_text())
    losses = np.array(payload["losses"])
    assert losses.shape == (3, 3) and losses[1, 1] == pytest.approx(payload["origin_loss"])
    assert (out_dir / "landscape.png").stat().st_size > 0
    code, out, err = _run(["landscape", str(saved / "m.keras"), *SMALL, "--grid", "3", "--directions", "random1",
                           "--out", str(tmp_path)], capsys)
    assert code == 0, err and (tmp_path / "landscape.png").exists()


def test_npz_data_and_a_layout_reshape(saved, capsys, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(20, 8, 8, 1)).astype("float32"), y=rng.integers(0, 10, 20))
    code, out, err = _run(["eigen", str(saved / "flat.keras"), "--data", str(tmp_path / "d.npz"), "--max-iter", "20"], capsys)
    assert code == 0, err
    assert "reshaping" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eigen", "MISSING.keras", *SMALL], "model file not found"),
        (["eigen", "NOT_A_MODEL", *SMALL], "cannot read the model file"),
        (["eigen", "nocompile.keras", *SMALL], "no compiled loss"),
        (["eigen", "mnist_shaped.keras", *SMALL], "does not fit"),
        (["eigen", "m.keras", "--data", "cifar10", "--data-dir", "TMP"], "not prepared"),
        (["eigen", "m.keras", "--data", "no_such_dataset_xyz", "--data-dir", "TMP"], "not a known tfds dataset"),
        (["eigen", "m.keras", *SMALL, "--block", "nope"], "Unknown group"),
        (["eigen", "m.keras", *SMALL, "--loss", "nonsense_loss"], "unknown --loss"),
    ],
)
def test_clear_one_line_errors_with_exit_code_2(saved, capsys, tmp_path, argv, message):
    (saved / "NOT_A_MODEL").write_text("not a model")
    argv = [a if not a.endswith(".keras") and a != "NOT_A_MODEL" else str(saved / a) for a in argv]
    argv = [str(tmp_path) if a == "TMP" else a for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("keras-hesstrace")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_explicit_loss_for_a_model_saved_without_one(saved, capsys):
    code, out, err = _run(["eigen", str(saved / "nocompile.keras"), *SMALL, "--loss", "sparse_categorical_crossentropy",
                           "--from-logits", "--max-iter", "20"], capsys)
    assert code == 0, err
    assert "from logits" in out


def test_help_explains_each_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    for name in ("demo", "estimate", "eigen", "density", "landscape"):
        assert name in top
    for name in ("estimate", "eigen", "density", "landscape"):
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        text = capsys.readouterr().out
        assert "Example:" in text and "--data" in text and "digits" in text
