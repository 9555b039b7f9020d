"""The command line: help, the parser against every command the docs show, one-line errors."""

import re
import shlex
from pathlib import Path

import pytest

from keras_hesstrace import cli
from keras_hesstrace.cli_inputs import CLIError, first_line
from keras_hesstrace.hvp import DEFAULT_MODE, MODES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ANALYSIS = ("estimate", "eigen", "density", "landscape")


def test_help_explains_each_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    for name in ("demo", "estimate", "eigen", "density", "landscape", "experiment"):
        assert name in top
    for name in ("estimate", "eigen", "density", "landscape"):
        assert cli.main([name, "--help"]) == 0
        text = capsys.readouterr().out
        assert "Example:" in text and "--data" in text and "digits" in text


# The demo's code path is tested in test_demo.py (small budget, its files and output).


# ============================================================ the docs' command lines


def documented_commands():
    """(where, argument list) of every ``keras-hesstrace ...`` command in a code block or span of the docs.

    Placeholders become parseable values: COMMAND each analysis command, any other
    upper-case word (S, V, DIR, N) "1"; ``[--flag value]`` is an optional part, kept.
    """
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        snippets = []
        fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
        for block in fenced:
            snippets.extend(block.splitlines())
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
        snippets.extend(span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose))
        for snippet in snippets:
            for match in re.finditer(r"(?:^|&&|;|\||\$)\s*keras-hesstrace\b([^#&;|\n]*)", snippet):
                words = [w.strip("[]") for w in shlex.split(match.group(1))]
                words = [w for w in words if w]
                if not words or words[0].endswith(":"):
                    continue  # the bare name in prose, or a line of output ("keras-hesstrace eigen: error: ...")
                variants = [[c if w == "COMMAND" else w for w in words] for c in ANALYSIS] if "COMMAND" in words else [words]
                for argv in variants:
                    argv = ["1" if re.fullmatch(r"[A-Z][A-Z_]*", w) else w for w in argv]
                    found.append((f"{path.name}: keras-hesstrace {match.group(1).strip()}", argv))
    return found


def test_the_docs_show_commands_of_every_kind():
    commands = documented_commands()
    names = {argv[0] for _, argv in commands}
    assert {"demo", "experiment", "estimate", "eigen", "density", "landscape"} <= names, names
    assert any("-k" in argv for _, argv in commands)  # the spelling that was once refused


@pytest.mark.parametrize("where, argv", documented_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_documented_command_parses(where, argv):
    parser = cli.build_parser()
    if "--help" in argv:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 0, where
        return
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"the CLI refuses a command the docs show: {where}")
    assert args.func is not None


def test_k_is_an_alias_of_dash_dash_k_and_mode_comes_from_the_package():
    parser = cli.build_parser()
    assert parser.parse_args(["eigen", "m.keras", "--data", "digits", "-k", "3"]).k == 3
    assert parser.parse_args(["eigen", "m.keras", "--data", "digits", "--k", "2"]).k == 2
    for command in ANALYSIS:
        args = parser.parse_args([command, "m.keras", "--data", "digits"])
        assert args.mode == DEFAULT_MODE and args.imports is None
        for mode in MODES:
            assert parser.parse_args([command, "m.keras", "--data", "digits", "--mode", mode]).mode == mode
        args = parser.parse_args([command, "m.keras", "--data", "digits", "--import", "a", "--import", "b.py"])
        assert args.imports == ["a", "b.py"]


def test_an_unknown_mode_is_a_usage_error(capsys):
    assert cli.main(["estimate", "m.keras", "--data", "digits", "--mode", "sideways"]) == 2
    err = capsys.readouterr().err
    assert "--mode" in err and len(err.strip().splitlines()) == 1


def test_the_modes_are_the_packages():
    assert cli.MODES == MODES and cli.DEFAULT_MODE == DEFAULT_MODE


def test_version(capsys):
    from keras_hesstrace._version import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"keras-hesstrace {__version__}"


# ============================================================ fast and quiet start


def _python(code, **env):
    import os
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, cwd=ROOT)
    return proc, time.perf_counter() - start


def test_help_and_bad_flags_import_no_tensorflow():
    """--help of every command, and every refused flag, answer without importing TensorFlow."""
    code = (
        "import sys, json\n"
        "from keras_hesstrace import cli\n"
        "codes = [cli.main(argv) for argv in json.loads(sys.argv[1] if len(sys.argv) > 1 else '[]')]\n"
        "codes += [cli.main(['--help'])] + [cli.main([c, '--help']) for c in\n"
        "    ('demo', 'estimate', 'eigen', 'density', 'landscape', 'experiment')]\n"
        "print(codes, 'tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    code = code.replace("json.loads(sys.argv[1] if len(sys.argv) > 1 else '[]')", repr(BAD_FLAGS_ARGV))
    proc, seconds = _python(code)
    print(f"\n{len(BAD_FLAGS_ARGV)} refused flag sets and 7 --help in one process: {seconds:.2f} s")
    assert proc.returncode == 0, proc.stderr
    codes, tf_loaded, keras_loaded = proc.stdout.strip().splitlines()[-1].rsplit("] ", 1)[0] + "]", *proc.stdout.split()[-2:]
    assert codes == str([2] * len(BAD_FLAGS_ARGV) + [0] * 7)
    assert (tf_loaded, keras_loaded) == ("False", "False")
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == len(BAD_FLAGS_ARGV), proc.stderr  # one line each


# (argv, what its one line says): each is refused before any model or data is loaded.
BAD_FLAGS = [
    (["demo", "--clean-runs", "2"], "--clean-runs must be >= 3, got 2"),
    (["demo", "--num-probes", "0"], "--num-probes must be >= 1, got 0"),
    (["demo", "--noise-rate", "1.5"], "--noise-rate must be in (0, 1), got 1.5"),
    (["demo", "--epochs", "two"], "--epochs: expected a whole number, got 'two'"),
    (["demo", "--train-examples", "100"], "--train-examples 100 must be at least --probe-batch-size (256)"),
    (["estimate", "m.keras", "--data", "digits", "--num-probes", "0"], "--num-probes must be >= 1, got 0"),
    (["estimate", "m.keras", "--data", "digits", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["estimate", "m.keras", "--data", "digits", "--from-logits"], "--from-logits only applies with --loss"),
    (["eigen", "m.keras", "--data", "digits", "-k", "0"], "-k/--k must be >= 1, got 0"),
    (["eigen", "m.keras", "--data", "digits", "--tol", "-1"], "--tol must be > 0, got -1"),
    (["eigen", "m.keras", "--data", "digits", "--method", "power", "--which", "LA"], "--which LA needs --method lanczos"),
    (["density", "m.keras", "--data", "digits", "--lanczos-steps", "0"], "--lanczos-steps must be >= 1"),
    (["density", "m.keras", "--data", "digits", "--sigma", "nan"], "--sigma: expected a finite number"),
    (["landscape", "m.keras", "--data", "digits", "--span", "0"], "--span must be > 0, got 0"),
    (["experiment", "--target-arl0", "0.5", "--false-alarm-prob", "none"], "--target-arl0: target_arl0 must be"),
    (["experiment", "--target-arl0", "50"], "--target-arl0: set exactly one of false_alarm_prob"),
    (["experiment", "--delta", "-1"], "--delta: delta (the Page-Hinkley allowance) must be finite and >= 0"),
    (["experiment", "--n-resamples", "10"], "--n-resamples: n_resamples must be an integer >= 100, got 10"),
    (["experiment", "--momentum", "1"], "--momentum: momentum must be in [0, 1)"),
    (["experiment", "--epochs", "0"], "--epochs: epochs must be an integer >= 1, got 0"),
    (["experiment", "--augment"], "--augment: augment is the CIFAR crop+flip"),
    (["experiment", "--augment", "yes"], "unrecognized arguments: yes"),
    (["experiment", "--archs", "mlp"], "--archs: unknown arch 'mlp' in archs"),
    (["experiment", "--reference-snapshot", "-1"], "--reference-snapshot: reference_snapshot must be None"),
]
BAD_FLAGS_ARGV = [argv for argv, _ in BAD_FLAGS]


@pytest.mark.parametrize("argv, line", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_flag_is_one_line_and_exit_2_before_anything_runs(monkeypatch, capsys, argv, line):
    from keras_hesstrace import cli_commands, experiments

    def never(*args, **kwargs):
        pytest.fail("ran before refusing the flag")

    for name in ("prepare", "load_model", "load_data"):
        monkeypatch.setattr(cli_commands, name, never)
    for name in ("run_demo", "run_experiment", "summarize"):
        monkeypatch.setattr(experiments, name, never)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and line in err, err
    assert err.startswith(f"keras-hesstrace{' ' + argv[0] if argv[0] != 'experiment' or 'yes' not in argv else ''}: error: ")


def test_experiment_settings_are_explained_and_switches_are_switches(capsys):
    import dataclasses

    from keras_hesstrace.experiments.config import ExperimentConfig

    helps = cli.field_help(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        assert len(helps.get(f.name, "")) > 10, f.name  # its own words, not just a default
    assert helps["delta"] == "Page-Hinkley allowance"
    assert helps["epochs"] == "training epochs per run"
    assert cli.main(["experiment", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default from the preset" not in text
    assert "--augment, --no-augment" in text and "--tensorboard, --no-tensorboard" in text
    assert "Page-Hinkley allowance [cpu-small: 0.5]" in text
    parser = cli.build_parser()
    assert parser.parse_args(["experiment", "--augment"]).augment is True
    assert parser.parse_args(["experiment", "--no-tensorboard"]).tensorboard is False
    assert not hasattr(parser.parse_args(["experiment"]), "augment")  # absent: the preset's value


def test_show_config_takes_the_flags(capsys):
    import json

    assert cli.main(["experiment", "--preset", "tiny", "--no-tensorboard", "--delta", "1",
                     "--noise-rates", "0.2,0.4", "--reference-snapshot", "none", "--show-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["delta"] == 1.0 and shown["noise_rates"] == [0.2, 0.4] and shown["tensorboard"] is False
    assert shown["reference_snapshot"] is None and shown["name"] == "tiny"


def test_help_is_fast_and_the_console_script_is_quiet(tmp_path):
    """--help imports no TensorFlow; a command that runs TensorFlow writes none of its start-up lines.

    TF 2.21 writes some lines before its logging starts (oneDNN, cuda drivers) that no
    TF_CPP_MIN_LOG_LEVEL silences: the CLI imports TensorFlow with them dropped.
    """
    import os
    import shutil
    import subprocess
    import sys

    import keras
    import numpy as np

    proc, seconds = _python("import sys; from keras_hesstrace import cli; code = cli.main(['--help']); "
                            "print(code, 'tensorflow' in sys.modules)")
    print(f"\nkeras-hesstrace --help in a fresh interpreter: {seconds:.2f} s")
    assert proc.stdout.strip().splitlines()[-1] == "0 False", proc.stderr

    script = shutil.which("keras-hesstrace", path=os.path.dirname(sys.executable))
    assert script, "the console script is installed beside the interpreter"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="head")])
    model.compile(loss="sparse_categorical_crossentropy")
    model.save(tmp_path / "m.keras")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(16, 4)).astype("float32"), y=rng.integers(0, 3, 16))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    argv = [script, "estimate", str(tmp_path / "m.keras"), "--data", str(tmp_path / "d.npz"), "--num-probes", "2"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "total trace" in proc.stdout
    noise = [line for line in proc.stderr.splitlines()
             if any(word in line for word in ("cuInit", "oneDNN", "cuda", "absl", "cpu_feature_guard"))]
    assert not noise, proc.stderr
    assert "\x1b[" not in proc.stdout and "\b" not in proc.stdout  # plain progress when not a terminal
    assert "2/2" in proc.stdout and "Unknown" not in proc.stdout


# ============================================================ one line per failure


def _fail_with(monkeypatch, err):
    def prepare(args):
        raise err

    monkeypatch.setattr(cli.commands, "prepare", prepare)


@pytest.mark.parametrize(
    "err, code, line",
    [
        (RuntimeError("the HVP blew up\nat this place"), 1, "keras-hesstrace estimate: error: RuntimeError: the HVP blew up"),
        (ValueError("\nUnknown thing"), 2, "keras-hesstrace estimate: error: ValueError: Unknown thing"),
        (CLIError("--data x.npz: file not found."), 2, "keras-hesstrace estimate: error: --data x.npz: file not found."),
        (AttributeError("in user code:\n\n  File x.py, line 1\n\n  AttributeError: 'str' has no '_id'"), 1,
         "keras-hesstrace estimate: error: AttributeError: 'str' has no '_id'"),
        (MemoryError(), 1, "keras-hesstrace estimate: error: MemoryError: MemoryError"),
    ],
)
def test_any_exception_is_one_line_without_traceback(monkeypatch, capsys, err, code, line):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    _fail_with(monkeypatch, err)
    assert cli.main(["estimate", "m.keras", "--data", "digits"]) == code
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [line]
    assert "Traceback" not in captured.err


def test_traceback_flag_and_environment_variable_show_the_traceback(monkeypatch, capsys):
    _fail_with(monkeypatch, RuntimeError("boom"))
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(["eigen", "m.keras", "--data", "digits", "--traceback"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "keras-hesstrace eigen: error: RuntimeError: boom"
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    assert cli.main(["eigen", "m.keras", "--data", "digits"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_interrupt_exits_130(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert cli.main(["density", "m.keras", "--data", "digits"]) == 130
    assert capsys.readouterr().err.strip() == "keras-hesstrace density: interrupted"


def test_errors_of_the_other_commands_are_one_line_too(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["experiment", "--config", str(bad), "--show-config"]) == 2  # json's ValueError
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("keras-hesstrace experiment: error: JSONDecodeError: ")
    assert "Traceback" not in err


def test_first_line_picks_the_message_not_the_stack():
    assert first_line(ValueError("a\nb")) == "a"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(TypeError("in user code:\n  File f\n  TypeError: bad dtype")) == "bad dtype"
    graph = ('Graph execution error:\n\nDetected at node GatherV2 defined at (most recent call last):\n'
             '  File "<stdin>", line 5, in f\n\nindices[0] = 7 is not in [0, 3)\n\t [[{{node GatherV2}}]] [Op:__inference_f_11]')
    assert first_line(RuntimeError(graph)) == "indices[0] = 7 is not in [0, 3)"


def test_experiment_and_demo_refuse_an_unwritable_out_before_training(tmp_path, capsys, monkeypatch):
    from keras_hesstrace import experiments

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(experiments, "run_demo", lambda **k: pytest.fail("trained before checking --out"))
    for argv in (["experiment", "--preset", "tiny"], ["demo"]):
        assert cli.main([*argv, "--out", str(blocker / "out")]) == 2
        err = capsys.readouterr().err
        assert err.strip().endswith(f"error: --out {blocker / 'out'}: cannot write there (Not a directory).")


def test_a_file_that_is_not_a_keras_model_says_so(tmp_path, capsys):
    (tmp_path / "notes.keras").write_text("not a model")
    (tmp_path / "empty.keras").write_bytes(b"")
    (tmp_path / "folder.keras").mkdir()
    for name, says in (("notes.keras", "is not a Keras model file (a .keras file is a zip archive"),
                       ("empty.keras", "this one is empty"), ("folder.keras", "is a folder, not a Keras model file")):
        assert cli.main(["estimate", str(tmp_path / name), "--data", "digits"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and says in err and "not found" not in err, err

