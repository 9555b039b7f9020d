"""keras-hesstrace: layer-wise Hessian traces for Keras models (TensorFlow backend).

Public API:
    hvp                 Hessian-vector product of a model's loss
    layer_groups        the parameter groups (layers, variables, stages)
    layer_traces        every group's tr(H_ll) at once, one HVP per probe
    TraceResult         what layer_traces returns (to_frame() for pandas)
    hessian_operator    the compiled, cached matrix-free Hessian (or a block of it)
    variance            closed-form variances, anisotropy, probe_budget
"""

from keras_hesstrace._backend import check_backend as _check_backend

_check_backend()

from keras_hesstrace import variance  # noqa: E402
from keras_hesstrace.groups import layer_groups  # noqa: E402
from keras_hesstrace.hvp import HessianOperator, hessian_operator, hvp  # noqa: E402
from keras_hesstrace.trace import TraceResult, layer_traces  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "HessianOperator",
    "TraceResult",
    "hessian_operator",
    "hvp",
    "layer_groups",
    "layer_traces",
    "variance",
    "__version__",
]
