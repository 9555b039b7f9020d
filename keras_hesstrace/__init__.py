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
import sys as _sys
import types as _types

# Cheap: reads the configured Keras backend without importing Keras (KERAS_BACKEND, keras.json,
# or an already imported keras) and refuses any but TensorFlow; it also sets the oneDNN default,
# which TensorFlow reads when it is first imported. TensorFlow itself is imported on first use
# of an estimator (below), so that `keras-hesstrace --help` and the experiments' settings load
# in a fraction of a second.
from keras_hesstrace import _backend as _backend_module

_backend_module.check_configured_backend()

from keras_hesstrace._version import __version__  # noqa: E402

# Each public name and the module that defines it, imported on first use (PEP 562).
_PUBLIC = {
    "hvp": "keras_hesstrace.hvp",
    "HessianOperator": "keras_hesstrace.hessian_products",
    "hessian_operator": "keras_hesstrace.hvp",
    "layer_traces": "keras_hesstrace.trace",
    "GroupTraces": "keras_hesstrace.group_traces",
    "layer_groups": "keras_hesstrace.groups",
    "top_eigenvalues": "keras_hesstrace.spectrum",
    "hessian_trace": "keras_hesstrace.spectrum",
    "spectral_density": "keras_hesstrace.spectrum",
    "diagonal": "keras_hesstrace.spectrum",
    "loss_landscape": "keras_hesstrace.landscape",
    "EigenResult": "keras_hesstrace.spectrum_results",
    "TraceEstimate": "keras_hesstrace.spectrum_results",
    "SpectralDensity": "keras_hesstrace.spectrum_results",
    "DiagonalResult": "keras_hesstrace.spectrum_results",
}
# Subpackages and modules that are attributes, imported on first use (kh.monitor, kh.data, ...),
# so that importing the estimators does not load tensorflow-datasets, pandas-heavy monitoring
# or the experiments.
_LAZY = ("variance", "monitor", "data", "models", "stats", "experiments", "plots")


def __getattr__(name):
    if name in _PUBLIC or name in _LAZY or name == "TraceResult":
        if name != "experiments":  # the experiments' settings need no Keras (the CLI reads them)
            _backend_module.check_backend()  # once: Keras 3 on TensorFlow, before the estimators load
        if name in _LAZY:
            return _importlib.import_module(f"{__name__}.{name}")
        if name == "TraceResult":
            return getattr(_importlib.import_module("keras_hesstrace.trace"), "TraceResult")
        value = getattr(_importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_LAZY))


class _Package(_types.ModuleType):
    """The package module, so that ``keras_hesstrace.hvp`` stays the function.

    Importing the submodule ``keras_hesstrace.hvp`` (which every estimator does) makes
    Python set the package's attribute ``hvp`` to that module; the public ``kh.hvp`` is the
    function of the same name, as it was when the package imported it eagerly.
    """

    def __setattr__(self, name, value):
        if name == "hvp" and isinstance(value, _types.ModuleType) and hasattr(value, "hvp"):
            value = value.hvp
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


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
