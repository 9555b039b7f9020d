import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest


@pytest.fixture
def no_compute(monkeypatch):
    """layer_traces fails if it builds a Hessian operator: for tests that bad arguments are
    refused before any compute."""
    import keras_hesstrace.trace as trace_module

    def refuse(*args, **kw):
        raise AssertionError("computed before the arguments were checked")

    monkeypatch.setattr(trace_module, "hessian_operator", refuse)
