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


def _refused(code):
    env = dict(os.environ, KERAS_BACKEND="numpy")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)


def test_every_way_in_to_the_estimators_is_refused_on_another_backend():
    # the package checks the setting when imported (cheaply: without importing Keras), so a
    # submodule imported directly is refused too
    for code in ("from keras_hesstrace.trace import layer_traces",
                 "from keras_hesstrace import layer_traces",
                 "from keras_hesstrace.experiments import run_experiment"):
        proc = _refused(code)
        assert proc.returncode != 0 and "'numpy' backend" in proc.stderr, (code, proc.stderr)


def test_a_backend_set_after_the_package_was_imported_is_refused_at_first_use():
    code = (
        "import os, sys, keras_hesstrace as kh\n"
        "os.environ['KERAS_BACKEND'] = 'numpy'\n"
        "try:\n"
        "    kh.layer_traces\n"
        "except ImportError as err:\n"
        "    print('refused:', err)\n"
        "print('keras' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"})
    assert "refused: keras-hesstrace needs Keras 3 on its TensorFlow backend" in proc.stdout, proc.stderr
    assert "'numpy' backend" in proc.stdout and proc.stdout.split()[-1] == "False"  # before importing Keras


def test_the_settings_and_the_command_line_load_without_keras():
    code = ("import sys, keras_hesstrace, keras_hesstrace.cli, keras_hesstrace.experiments.config\n"
            "print([m for m in ('keras', 'tensorflow') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr
