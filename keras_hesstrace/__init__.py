"""keras-hesstrace: layer-wise Hessian traces for Keras models (TensorFlow backend).

Public API (everything else is internal):
    hvp, layer_groups, layer_traces, TraceResult, HessianOperator
    keras_hesstrace.variance: hutchinson_variance, single_pass_variance, anisotropy, probe_budget
"""

from keras_hesstrace._backend import check_backend as _check_backend

_check_backend()

from keras_hesstrace.groups import layer_groups  # noqa: E402

__version__ = "0.1.0"

__all__ = ["layer_groups", "__version__"]
