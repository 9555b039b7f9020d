"""Refuse any Keras backend but TensorFlow, with a message that says how to switch."""

import json
import os
import sys

_SWITCH = (
    "keras-hesstrace needs Keras 3 on its TensorFlow backend, but Keras is set to "
    "the {backend!r} backend. Switch with the environment variable "
    "KERAS_BACKEND=tensorflow (set before keras is first imported), or set "
    '"backend": "tensorflow" in ~/.keras/keras.json.'
)


def configured_backend():
    """The backend Keras uses or will use, without importing Keras if it is not loaded.

    Keras picks its backend at import from KERAS_BACKEND, else from keras.json in
    KERAS_HOME (default ~/.keras), else TensorFlow. Reading the setting first means
    a user with another backend gets our message, not Keras failing to import it.
    """
    if "keras" in sys.modules and hasattr(sys.modules["keras"], "backend"):
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def check_backend():
    """Raise ImportError unless Keras runs (or will run) on TensorFlow."""
    backend = configured_backend()
    if backend != "tensorflow":
        raise ImportError(_SWITCH.format(backend=backend))
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ImportError(_SWITCH.format(backend=keras.backend.backend()))
    major = int(keras.__version__.split(".")[0])
    if major < 3:
        raise ImportError(
            f"keras-hesstrace needs Keras 3 (found keras {keras.__version__}); "
            "pip install 'keras>=3'."
        )


# oneDNN custom ops are off by default on CPUs without AVX-512 and make the HVP
# 1.5-1.9x faster here (docs/tensorflow-notes.md §2); respect a user's explicit choice.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
