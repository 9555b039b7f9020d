"""The command line: help and the demo's code path on a small budget."""

import pytest

from keras_hesstrace import cli


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_demo_prints_the_per_layer_table(capsys):
    assert cli.main(["demo", "--epochs", "1", "--num-probes", "3"]) == 0
    out = capsys.readouterr().out
    for name in ("conv", "dense", "head", "total trace"):
        assert name in out
