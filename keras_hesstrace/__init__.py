"""keras-hesstrace: layer-wise Hessian traces for Keras models (TensorFlow backend).

Public API:
    hvp                 Hessian-vector product of a model's loss
    layer_groups        the parameter groups (layers, variables, stages)
    layer_traces        every group's tr(H_ll) at once, one HVP per probe
    GroupTraces         what layer_traces returns: each group's trace estimate
                        (to_frame() for pandas; TraceResult is its deprecated name)
    hessian_operator    the compiled, cached matrix-free Hessian (or a block of it)
    variance            closed-form variances, anisotropy, probe_budget
    top_eigenvalues, hessian_trace, spectral_density, diagonal, loss_landscape
                        the PyHessian toolset (keras_hesstrace.spectrum, .landscape)
    EigenResult, TraceEstimate, SpectralDensity, DiagonalResult
                        what the toolset returns (keras_hesstrace.spectrum_results)
    linalg              the algorithms on any symmetric matvec (numpy only)
    models, data, monitor, stats
                        CIFAR/digits models and loaders, the training callback and
                        its calibrated alert, effect sizes and intervals
"""

import importlib as _importlib
import os as _os
import sys as _sys

# The command line quiets TensorFlow's C++ info and warning logs. TensorFlow reads the
# variable once, when it is first imported, which the next lines do: so it is set here, for
# the `keras-hesstrace` console script only, and a user's own setting wins. (TF 2.21 prints
# a few lines before its logging starts, "oneDNN custom operations are on" among them, even
# with TF_CPP_MIN_LOG_LEVEL=3 set in the shell: those no setting silences.)
if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "keras-hesstrace":
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_hesstrace._backend import check_backend as _check_backend  # noqa: E402

_check_backend()

from keras_hesstrace import variance  # noqa: E402
from keras_hesstrace.landscape import loss_landscape  # noqa: E402
from keras_hesstrace.spectrum import diagonal, hessian_trace, spectral_density, top_eigenvalues  # noqa: E402
from keras_hesstrace.spectrum_results import DiagonalResult, EigenResult, SpectralDensity, TraceEstimate  # noqa: E402
from keras_hesstrace.groups import layer_groups  # noqa: E402
from keras_hesstrace.hvp import HessianOperator, hessian_operator, hvp  # noqa: E402
from keras_hesstrace.trace import GroupTraces, layer_traces  # noqa: E402

from keras_hesstrace._version import __version__  # noqa: E402

# Subpackages imported on first use (kh.monitor, kh.data, ...), so that importing the
# estimators does not load tensorflow-datasets, pandas-heavy monitoring or the experiments.
_LAZY = ("monitor", "data", "models", "stats", "experiments", "plots")


def __getattr__(name):
    if name in _LAZY:
        return _importlib.import_module(f"{__name__}.{name}")
    if name == "TraceResult":
        from keras_hesstrace import trace

        return trace.TraceResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "HessianOperator",
    "GroupTraces",
    "EigenResult",
    "TraceEstimate",
    "SpectralDensity",
    "DiagonalResult",
    "hessian_operator",
    "hvp",
    "layer_groups",
    "layer_traces",
    "variance",
    "top_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "diagonal",
    "loss_landscape",
    "__version__",
]
