"""The command line: help and the demo's code path on a small budget."""

import pytest

from keras_hesstrace import cli


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out


# The demo's code path is tested in test_demo.py (small budget, its files and output).
