"""keras-hesstrace: layer-wise Hessian traces for Keras models (TensorFlow backend).

Public API:
    hvp                 Hessian-vector product of a model's loss
    layer_groups        the parameter groups (layers, variables, stages)
    layer_traces        every group's tr(H_ll) at once, one HVP per probe
    TraceResult         what layer_traces returns (to_frame() for pandas)
    hessian_operator    the compiled, cached matrix-free Hessian (or a block of it)
    variance            closed-form variances, anisotropy, probe_budget
    top_eigenvalues, hessian_trace, spectral_density, diagonal, loss_landscape
                        the PyHessian toolset (keras_hesstrace.spectrum, .landscape)
    models, data, monitor, stats
                        CIFAR/digits models and loaders, the training callback and
                        its calibrated alert, effect sizes and intervals
"""

from keras_hesstrace._backend import check_backend as _check_backend

_check_backend()

from keras_hesstrace import variance  # noqa: E402
from keras_hesstrace.landscape import loss_landscape  # noqa: E402
from keras_hesstrace.spectrum import diagonal, hessian_trace, spectral_density, top_eigenvalues  # noqa: E402
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
    "top_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "diagonal",
    "loss_landscape",
    "__version__",
]
