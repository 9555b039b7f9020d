"""The analysis subcommands (estimate, eigen, density, landscape) on a tiny saved model."""

import importlib
import json
import os
import sys
import uuid

import numpy as np
import pandas as pd
import pytest
import keras

import keras_hesstrace
from keras_hesstrace import cli, landscape, spectrum
from keras_hesstrace import cli_commands as commands

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
    payload = json.loads((out_dir / "estimate.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert payload["num_probes"] == 4 and payload["num_examples"] == 64
    assert [row["group"] for row in payload["groups_table"]] == ["conv", "head"]


@pytest.mark.parametrize("command", ["estimate", "eigen", "density", "landscape"])
def test_an_unwritable_out_is_refused_before_any_computation(saved, capsys, monkeypatch, command):
    """--out under a regular file (a folder no one can make, even root): exit 2 naming --out,
    before the model is even loaded."""
    blocker = saved / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("computed before checking --out"))
    code, out, err = _run([command, str(saved / "m.keras"), *SMALL, "--out", str(blocker / "out")], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == f"keras-hesstrace {command}: error: --out {blocker / 'out'}: cannot write there (Not a directory)."


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
    saved_bytes = (saved / "m.keras").read_bytes()
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
    assert code == 0, err
    assert (tmp_path / "landscape.png").read_bytes()[:4] == b"\x89PNG"
    # The saved model is never rewritten, and the grid's centre is the loss at its weights.
    assert (saved / "m.keras").read_bytes() == saved_bytes
    payload = json.loads((tmp_path / "landscape.json").read_text())
    assert payload["origin_loss"] == pytest.approx(float(np.array(payload["losses"])[1]), rel=1e-6)


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
        (["estimate", "m.keras", *SMALL, "--block", "nope"], "Unknown group"),
        (["eigen", "m.keras", *SMALL, "--batch-size", "0"], "--batch-size must be >= 1"),
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


# ============================================================ --import, --mode, one-line failures

LAYERS = """
import numpy as np
import pandas as pd
import tensorflow as tf
import keras


@keras.saving.register_keras_serializable(package="{package}")
class Halve(keras.layers.Layer):
    def call(self, x):
        return 0.5 * x


@keras.saving.register_keras_serializable(package="{package}")
class NumpyTanh(keras.layers.Layer):
    \"\"\"tanh through tf.numpy_function: TensorFlow cannot differentiate it, so the Hessian fails.\"\"\"

    def call(self, x):
        out = tf.numpy_function(np.tanh, [x], x.dtype)
        out.set_shape(x.shape)
        return out
"""


@pytest.fixture
def custom(tmp_path, monkeypatch):
    """A module defining custom layers, two models saved with them, and the layers unregistered again.

    The module has a fresh name per test, so that importing it (by --import) registers
    its classes anew.
    """
    name = f"hesscli_layers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(LAYERS.format(package=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    keras.utils.set_random_seed(0)
    halve = keras.Sequential([keras.Input((64,)), module.Halve(name="halve"), keras.layers.Dense(10, name="head")])
    halve.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    halve.save(tmp_path / "halve.keras")
    broken = keras.Sequential([keras.Input((64,)), keras.layers.Dense(3, name="hidden"), module.NumpyTanh(),
                               keras.layers.Dense(10, name="head")])
    broken.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    broken.save(tmp_path / "broken.keras")
    registry = keras.saving.get_custom_objects()
    for cls in ("Halve", "NumpyTanh"):
        registry.pop(f"{name}>{cls}")
    sys.modules.pop(name)
    sys.path.remove(str(tmp_path))
    return tmp_path, name


def _one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("keras-hesstrace")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_an_unregistered_custom_class_is_named_with_the_fix(custom, capsys):
    tmp, name = custom
    code, out, err = _run(["estimate", str(tmp / "halve.keras"), *SMALL], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "Halve" in line and f"--import {name}" in line and "could not be deserialized" not in line


def test_import_a_module_from_the_working_directory(custom, capsys, monkeypatch):
    tmp, name = custom
    monkeypatch.chdir(tmp)
    code, out, err = _run(["estimate", "halve.keras", *SMALL, "--num-probes", "2", "--import", name, "--out", "res"], capsys)
    assert code == 0, err
    payload = json.loads((tmp / "res" / "estimate.json").read_text())
    assert payload["imports"] == [name] and [row["group"] for row in payload["groups_table"]] == ["head"]
    assert str(tmp) not in sys.path  # the working directory was on the path only while importing


def test_import_a_py_file_by_path(custom, capsys, tmp_path_factory):
    tmp, name = custom
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    os.replace(tmp / f"{name}.py", elsewhere / f"{name}.py")
    code, out, err = _run(["eigen", str(tmp / "halve.keras"), *SMALL, "--max-iter", "40",
                           "--import", str(elsewhere / f"{name}.py")], capsys)
    assert code == 0, err
    assert "lanczos" in out


@pytest.mark.parametrize(
    "module, message",
    [
        ("no_such_module_for_hesstrace", "--import no_such_module_for_hesstrace: no module named 'no_such_module_for_hesstrace'"),
        ("RAISES", "importing it failed: RuntimeError: broken on purpose"),
        ("missing/file.py", "--import missing/file.py: file not found"),
    ],
)
def test_a_module_that_cannot_be_imported_is_one_line(saved, capsys, tmp_path, module, message):
    if module == "RAISES":
        (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('broken on purpose')\n")
        module = str(tmp_path / "raises_on_import.py")
    code, out, err = _run(["density", str(saved / "m.keras"), *SMALL, "--import", module], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert message in line and module in line


def test_a_model_whose_hessian_fails_is_one_line_with_exit_1(custom, capsys):
    tmp, name = custom
    code, out, err = _run(["estimate", str(tmp / "broken.keras"), *SMALL, "--num-probes", "2",
                           "--import", str(tmp / f"{name}.py")], capsys)
    assert code == 1
    line = _one_error_line(err)
    assert line.startswith("keras-hesstrace estimate: error: ") and "in user code" not in line


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 64))}, "needs arrays named x and y"),
        ({"x": np.zeros((4, 64)), "y": np.zeros(3, dtype=int)}, "x has 4 examples but y has 3"),
        ({"x": np.zeros((4, 7)), "y": np.zeros(4, dtype=int)}, "does not fit"),
        ("CORRUPT", "cannot read it as an .npz file"),
        ("MISSING", "file not found"),
    ],
)
def test_bad_data_is_one_line_with_exit_2(saved, capsys, tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    if arrays == "CORRUPT":
        path.write_bytes(b"not a zip")
    elif arrays != "MISSING":
        np.savez(path, **arrays)
    code, out, err = _run(["landscape", str(saved / "flat.keras"), "--data", str(path)], capsys)
    assert code == 2
    assert message in _one_error_line(err)


@pytest.mark.parametrize(
    "command, owner, function",
    [
        ("estimate", keras_hesstrace, "layer_traces"),
        ("eigen", spectrum, "top_eigenvalues"),
        ("density", spectrum, "spectral_density"),
        ("landscape", landscape, "loss_landscape"),
    ],
)
def test_mode_reaches_every_estimator(saved, capsys, monkeypatch, command, owner, function):
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stopped after recording the call")

    monkeypatch.setattr(owner, function, record)
    code, out, err = _run([command, str(saved / "m.keras"), *SMALL, "--mode", "reverse"], capsys)
    assert code == 1 and "stopped after recording the call" in _one_error_line(err)
    assert seen["mode"] == "reverse"


def test_estimate_records_the_mode(saved, capsys):
    out_dir = saved / "est_mode"
    code, out, err = _run(["estimate", str(saved / "m.keras"), *SMALL, "--num-probes", "2", "--mode", "forward",
                           "--out", str(out_dir)], capsys)
    assert code == 0, err
    payload = json.loads((out_dir / "estimate.json").read_text())
    assert payload["mode"] == "forward" and payload["mode_used"] == "forward"


# ------------------------------------------------------------------ the plots' contents (issue 15)


@pytest.fixture
def figures(monkeypatch):
    """The Figures the commands write, with their paths (plots.save_figure still writes them)."""
    from keras_hesstrace import plots

    written = []
    real = plots.save_figure

    def record(fig, path, dpi="figure"):
        written.append((os.path.basename(str(path)), fig))
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", record)
    return written


def _legend_labels(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_estimate_traces_csv_ends_with_the_total_row(saved, capsys, figures):
    import pandas as pd

    out_dir = saved / "est-total"
    code, out, err = _run(["estimate", str(saved / "m.keras"), *SMALL, "--num-probes", "4", "--out", str(out_dir)], capsys)
    assert code == 0, err
    table = pd.read_csv(out_dir / "traces.csv", index_col="group")
    payload = json.loads((out_dir / "estimate.json").read_text())
    assert list(table.index) == ["conv", "head", "total"]
    assert table.loc["total", "trace"] == pytest.approx(payload["total_trace"], rel=1e-12)
    assert table.loc["total", "stderr"] == pytest.approx(payload["total_stderr"], rel=1e-12)
    # the layers cover every variable: their traces add up to the total, their sizes to the model's
    assert table.loc[["conv", "head"], "trace"].sum() == pytest.approx(table.loc["total", "trace"], rel=1e-9)
    assert table.loc["total", "num_params"] == keras.saving.load_model(saved / "m.keras").count_params()
    assert table.loc["total", "num_probes"] == 4
    # the JSON's per-group table is unchanged (no total row there)
    assert [row["group"] for row in payload["groups_table"]] == ["conv", "head"]
    (name, fig), = figures
    assert name == "traces.png"
    caption = keras_hesstrace.plots.caption_of(fig)
    for needle in ("model m.keras", "data digits", "64 examples", "probes 4", "seed 0", "HVP mode"):
        assert needle in caption, needle
    assert "total tr(H) = " in fig.axes[0].get_title()
    assert any("± 2 SE" in label for label in _legend_labels(fig))


def test_with_total_matches_the_result():
    import keras_hesstrace as kh

    result = kh.GroupTraces(groups=("a", "b"), samples=np.array([[1.0, 2.0], [3.0, 6.0]]),
                            total_samples=np.array([3.0, 9.0]), group_sizes=np.array([2, 3]), loss=0.5)
    table = commands.with_total(result.to_frame(), result)
    assert list(table.index) == ["a", "b", "total"]
    assert table.loc["total", "trace"] == result.total == 6.0
    assert table.loc["total", "stderr"] == pytest.approx(result.total_stderr)
    assert table.loc["total", "num_params"] == 5 and table["num_params"].dtype.kind == "i"
    assert list(result.to_frame().index) == ["a", "b"]  # to_frame itself is unchanged


def test_eigen_writes_a_stem_plot_with_residuals_and_a_caption(saved, capsys, figures):
    out_dir = saved / "eig-png"
    code, out, err = _run(["eigen", str(saved / "m.keras"), *SMALL, "--k", "3", "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert (out_dir / "eigenvalues.png").read_bytes()[:4] == b"\x89PNG"
    assert "eigenvalues.png" in out
    (name, fig), = figures
    caption = keras_hesstrace.plots.caption_of(fig)
    for needle in ("model m.keras", "data digits", "k 3", "method lanczos", "seed 0"):
        assert needle in caption, needle
    payload = json.loads((out_dir / "eigen.json").read_text())
    assert f"λ₁ = {payload['eigenvalues'][0]:.3g}" in fig.axes[0].get_title()
    assert any("residual" in label for label in _legend_labels(fig))


def test_density_and_landscape_plots_name_the_run_and_explain_their_marks(saved, capsys, figures):
    code, _, err = _run(["density", str(saved / "m.keras"), *SMALL, "--lanczos-steps", "8", "--out", str(saved / "den-c")], capsys)
    assert code == 0, err
    code, _, err = _run(["landscape", str(saved / "m.keras"), *SMALL, "--grid", "3", "--span", "0.1",
                         "--out", str(saved / "land-c")], capsys)
    assert code == 0, err
    (dname, density), (lname, land) = figures
    assert (dname, lname) == ("density.png", "landscape.png")
    for fig in (density, land):
        caption = keras_hesstrace.plots.caption_of(fig)
        assert "model m.keras" in caption and "data digits" in caption and "seed 0" in caption
    assert any(label.startswith("Ritz values") for label in _legend_labels(density))
    assert any(label.startswith("trained weights") for label in _legend_labels(land))


def test_the_landscape_colour_scale_is_logarithmic_when_the_loss_spans_decades():
    from matplotlib.colors import LogNorm

    from keras_hesstrace import plots
    from keras_hesstrace.landscape import LandscapeResult

    a = np.linspace(-1, 1, 9)
    wide = 0.01 + 100 * (a[:, None] ** 2 + a[None, :] ** 2)  # 0.01 .. 200
    fig = plots.landscape_figure(LandscapeResult((a, a), wide, 0.01, [], "random"), caption="model x.keras")
    contour = fig.axes[0].collections[0]
    assert isinstance(contour.norm, LogNorm)
    assert "trained weights (loss 0.01)" in _legend_labels(fig)
    narrow = 1.0 + 0.1 * (a[:, None] ** 2 + a[None, :] ** 2)
    fig = plots.landscape_figure(LandscapeResult((a, a), narrow, 1.0, [], "random"))
    assert not isinstance(fig.axes[0].collections[0].norm, LogNorm)
    assert plots.caption_of(fig) == ""


def test_trace_plot_goes_log_when_the_estimates_span_decades():
    import pandas as pd

    from keras_hesstrace import plots

    frame = pd.DataFrame({"trace": [0.01, 3.0, 500.0], "stderr": [0.001, 0.5, 20.0]},
                         index=pd.Index(["a", "b", "c"], name="group"))
    fig = plots.traces_figure(frame, by="layer")
    assert fig.axes[0].get_xscale() == "log" and "largest 'c'" in fig.axes[0].get_title()
    frame.loc["b", "trace"] = -1.0
    assert plots.traces_figure(frame).axes[0].get_xscale() == "linear"


def test_estimate_to_a_relative_standard_error(saved, capsys):
    """--rel-stderr draws probes until each group and the total meet it (issue 17)."""
    out_dir = saved / "est-target"
    code, out, err = _run(["estimate", str(saved / "m.keras"), *SMALL, "--num-probes", "4", "--rel-stderr", "0.5",
                           "--max-probes", "64", "--out", str(out_dir)], capsys)
    assert code == 0, err
    frame = pd.read_csv(out_dir / "traces.csv", index_col=0)
    assert list(frame.index) == ["conv", "head", "total"]
    assert frame["rel_stderr_target"].eq(0.5).all()
    met = frame["target_met"].astype(bool)
    assert (frame.loc[met, "rel_stderr"] <= 0.5).all()  # a group marked met really is
    assert 4 <= frame["num_probes"].iloc[0] <= 64
    payload = json.loads((out_dir / "estimate.json").read_text(), parse_constant=pytest.fail)
    assert payload["rel_stderr_target"] == 0.5 and payload["num_probes"] == frame["num_probes"].iloc[0]


def test_estimate_with_the_cheapest_scheme_per_layer(saved, capsys):
    """--scheme auto: traces.csv says which scheme served each layer, estimate.json the HVPs drawn."""
    out_dir = saved / "est-auto"
    code, out, err = _run(["estimate", str(saved / "m.keras"), *SMALL, "--num-probes", "4", "--rel-stderr", "0.3",
                           "--max-probes", "200", "--scheme", "auto", "--out", str(out_dir)], capsys)
    assert code == 0, err
    frame = pd.read_csv(out_dir / "traces.csv", index_col=0)
    assert set(frame.loc[["conv", "head"], "scheme"]) <= {"single", "restricted", "coordinates"}
    assert {"num_hvps", "seconds"} <= set(frame.columns)
    payload = json.loads((out_dir / "estimate.json").read_text(), parse_constant=pytest.fail)
    assert payload["scheme"] == "auto" and payload["hvps_drawn"] >= frame["num_hvps"].max()


@pytest.mark.parametrize("argv, message", [
    (["--rel-stderr", "1.5"], "--rel-stderr must be in (0, 1), got 1.5"),
    (["--max-probes", "50"], "--max-probes only applies with --rel-stderr"),
    (["--scheme", "auto"], "--scheme auto chooses probes to meet a target: add --rel-stderr"),
])
def test_a_bad_target_is_one_line_before_loading(saved, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("loaded before checking the flags"))
    code, out, err = _run(["estimate", str(saved / "m.keras"), *SMALL, *argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
