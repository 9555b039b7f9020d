"""Every docstring example in the package runs (doctest), on a small compiled model.

The examples may use ``model`` (a compiled two-layer classifier with layers "hidden" and
"head"), ``x`` [8, 4] float32 and ``y`` [8] int labels, ``np``, ``tf``, ``keras`` and
``keras_hesstrace``.
"""

import doctest
import importlib
import pkgutil

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hesstrace

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(keras_hesstrace.__path__, "keras_hesstrace.")
)


def _globals():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, activation="tanh", name="hidden"), keras.layers.Dense(3, name="head")],
        name="example",
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 3, size=8)
    return {"model": model, "x": x, "y": y, "np": np, "tf": tf, "keras": keras, "keras_hesstrace": keras_hesstrace}


def test_every_module_is_collected():
    assert "keras_hesstrace.hvp" in MODULES and "keras_hesstrace.monitor.callback" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    globs = {**vars(module), **_globals()}  # the module's own names, as in its namespace
    for test in finder.find(module, name, globs=globs):
        if not test.examples:
            continue
        runner.run(test, out=failures.append)
    assert not failures, "".join(failures)
