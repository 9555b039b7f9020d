"""The package's own contract: one version, lazy subpackages, no global side effects from plots."""

import importlib.metadata
import os
import subprocess
import sys

import keras_hesstrace as kh
import models_for_tests as mt
import pytest
from reference import xent64


def test_one_version_source():
    assert kh.__version__ == importlib.metadata.version("keras-hesstrace")


def test_subpackages_are_attributes_loaded_on_first_use():
    code = (
        "import sys, keras_hesstrace as kh\n"
        "before = 'keras_hesstrace.monitor' in sys.modules, 'tensorflow_datasets' in sys.modules\n"
        "cb = kh.monitor.HessianTraceCallback\n"
        "print(before, 'keras_hesstrace.monitor' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "(False, False) True"
    try:
        kh.no_such_thing
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


def test_plots_leave_matplotlib_backend_and_pyplot_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    figures = plt.get_fignums()
    model = mt.mlp()
    x, y = mt.data()
    density = kh.spectral_density(model, x, y, loss=xent64(), lanczos_steps=5, seed=0)
    frame = kh.layer_traces(model, x, y, num_probes=3, seed=0, loss=xent64()).to_frame()
    paths = [kh.plots.plot_density(density, tmp_path / "d.png"), kh.plots.plot_traces(frame, tmp_path / "t.png")]
    for path in paths:
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == figures


def test_onednn_default_respects_the_users_choice():
    code = "import os, keras_hesstrace; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "0"
    env.pop("TF_ENABLE_ONEDNN_OPTS")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "1"


def test_group_traces_old_name_still_works_with_a_deprecation_warning():
    import keras_hesstrace as kh

    with pytest.warns(DeprecationWarning, match="GroupTraces"):
        old = kh.TraceResult
    assert old is kh.GroupTraces and "GroupTraces" in kh.__all__ and "TraceResult" not in kh.__all__


def test_public_names_load_on_first_use_and_stay_what_they_were():
    code = (
        "import sys, keras_hesstrace as kh\n"
        "print('tensorflow' in sys.modules)\n"
        "import keras_hesstrace.hvp, keras_hesstrace.trace  # binds the submodule name hvp in the package\n"
        "print(callable(kh.hvp) and kh.hvp.__module__ == 'keras_hesstrace.hvp')\n"
        "print(all(getattr(kh, n) is not None for n in kh.__all__))\n"
        "print(set(kh.__all__) <= set(dir(kh)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "True", "True"]
    assert kh.layer_traces.__module__ == "keras_hesstrace.trace" and kh.hvp.__module__ == "keras_hesstrace.hvp"
    assert kh.variance.__name__ == "keras_hesstrace.variance"
    assert set(kh.__all__) == {
        "HessianOperator", "GroupTraces", "EigenResult", "TraceEstimate", "SpectralDensity", "DiagonalResult",
        "hessian_operator", "hvp", "layer_groups", "layer_traces", "variance", "top_eigenvalues",
        "hessian_trace", "spectral_density", "diagonal", "loss_landscape", "__version__"}
