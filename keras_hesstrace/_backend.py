"""Refuse any Keras backend but TensorFlow, with a message that says how to switch.

Two checks: :func:`check_configured_backend` reads the setting without importing Keras
(the package runs it when imported: cheap, so the command line starts fast), and
:func:`check_backend` imports Keras and checks what it runs on and its version (run once,
before the first estimator module is loaded).
"""

import json
import os
import sys

_SWITCH = (
    "keras-hesstrace needs Keras 3 on its TensorFlow backend, but Keras is set to "
    "the {backend!r} backend. Switch with the environment variable "
    "KERAS_BACKEND=tensorflow (set before keras is first imported), or set "
    '"backend": "tensorflow" in ~/.keras/keras.json.'
)

_checked = False


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
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def check_configured_backend():
    """Raise ImportError if Keras is set to (or runs on) a backend other than TensorFlow.

    Imports nothing: safe to run when the package is imported.
    """
    backend = configured_backend()
    if backend != "tensorflow":
        raise ImportError(_SWITCH.format(backend=backend))


def check_backend():
    """Raise ImportError unless Keras 3 runs (or will run) on TensorFlow; imports Keras.

    After the first successful check it only re-reads the backend of the loaded Keras.
    """
    global _checked
    check_configured_backend()
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ImportError(_SWITCH.format(backend=keras.backend.backend()))
    if _checked:
        return
    major = int(keras.__version__.split(".")[0])
    if major < 3:
        raise ImportError(
            f"keras-hesstrace needs Keras 3 (found keras {keras.__version__}); "
            "pip install 'keras>=3'."
        )
    _checked = True


# oneDNN custom ops are off by default on CPUs without AVX-512 and make the HVP
# 1.5-1.9x faster here (docs/tensorflow-notes.md §2); respect a user's explicit choice.
# Set when the package is imported (this module is), before TensorFlow is.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
