"""The package refuses a Keras backend other than TensorFlow, saying how to switch."""

import os
import subprocess
import sys


def test_other_backend_is_refused_with_instructions():
    env = dict(os.environ, KERAS_BACKEND="numpy")
    proc = subprocess.run(
        [sys.executable, "-c", "import keras_hesstrace"],
        env=env,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=120,
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "'numpy' backend" in proc.stderr
    assert "KERAS_BACKEND=tensorflow" in proc.stderr


def test_backend_already_imported_on_another_backend_is_refused(monkeypatch):
    import keras
    import pytest

    from keras_hesstrace import _backend

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ImportError, match="'jax' backend.*KERAS_BACKEND=tensorflow"):
        _backend.check_backend()
