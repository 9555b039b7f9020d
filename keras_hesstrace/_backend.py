"""Refuse any Keras backend but TensorFlow, with a message that says how to switch."""

import os

_SWITCH = (
    "keras-hesstrace needs Keras 3 on its TensorFlow backend, but Keras is set to "
    "the {backend!r} backend. Switch with the environment variable "
    "KERAS_BACKEND=tensorflow (set before keras is first imported), or set "
    '"backend": "tensorflow" in ~/.keras/keras.json.'
)


def check_backend():
    """Raise ImportError unless Keras runs on TensorFlow.

    Reads the backend Keras will use without importing TensorFlow twice.
    """
    # Keras decides its backend at its own import from KERAS_BACKEND or keras.json.
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(_SWITCH.format(backend=backend))
    major = int(keras.__version__.split(".")[0])
    if major < 3:
        raise ImportError(
            f"keras-hesstrace needs Keras 3 (found keras {keras.__version__}); "
            "pip install 'keras>=3'."
        )


# oneDNN custom ops are off by default on CPUs without AVX-512 and make the HVP
# 1.5-1.9x faster here (TF-NOTES); respect a user's explicit choice.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
