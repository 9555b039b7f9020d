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
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    for name in ("demo", "estimate", "eigen", "density", "landscape", "experiment"):
        assert name in top
    for name in ("estimate", "eigen", "density", "landscape"):
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
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
    with pytest.raises(SystemExit) as exc:
        cli.main(["estimate", "m.keras", "--data", "digits", "--mode", "sideways"])
    assert exc.value.code == 2
    assert "--mode" in capsys.readouterr().err


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
