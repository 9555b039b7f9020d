"""Algorithms on any symmetric linear operator given as a callable ``matvec(v) -> A v``.

The operator acts on flat float64 numpy vectors of length n; these modules know nothing
about Keras or TensorFlow and can be checked on explicit matrices. One estimator a module:

- :mod:`~keras_hesstrace.linalg.power`: ``power_iteration`` (with deflation).
- :mod:`~keras_hesstrace.linalg.lanczos`: ``Lanczos``, ``lanczos_eigen``,
  ``lanczos_quadrature``.
- :mod:`~keras_hesstrace.linalg.hutchinson`: ``hutchinson_trace``, ``hutchpp_trace``,
  ``hutchinson_diagonal``.
- :mod:`~keras_hesstrace.linalg.density`: ``gaussian_density``, ``default_sigma``.
- :mod:`~keras_hesstrace.linalg.adaptive`: the stopping rule for a relative standard-error
  target (``run_until_met``), shared by every Hutchinson estimate.
- :mod:`~keras_hesstrace.linalg.common`: seeds, numpy probes, ``stderr``.

Stopping rules (documented choices, different from PyHessian's relative change
``|mean - prev| / (|prev| + 1e-6) < tol``, which can stop after two probes):

- eigenvalues: a Ritz pair (θ, u) with residual ``r = A u - θ u`` has an eigenvalue of A
  within ``||r||`` of θ (symmetric A). We stop when ``||r|| <= tol * |θ|`` for every wanted
  pair: a guaranteed relative eigenvalue accuracy of ``tol`` (the true error is usually
  far smaller, about ``||r||² / gap``). The same rule for power iteration and Lanczos.
- trace and diagonal: a target r for the relative standard error. After a pilot, rounds
  are sized from the sample variance so far (``adaptive.run_until_met``) until the
  standard error is at most ``r * |mean|``, or after a budget of matvecs (HVPs for a
  Hessian) in total.
"""

from keras_hesstrace.linalg.common import PROBES, make_rng, numpy_probes, random_probe, stderr
from keras_hesstrace.linalg.density import default_sigma, gaussian_density
from keras_hesstrace.linalg.hutchinson import hutchinson_diagonal, hutchinson_trace, hutchpp_trace
from keras_hesstrace.linalg.lanczos import WHICH, Lanczos, lanczos_eigen, lanczos_quadrature
from keras_hesstrace.linalg.power import power_iteration

__all__ = [
    "PROBES",
    "WHICH",
    "Lanczos",
    "default_sigma",
    "gaussian_density",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_eigen",
    "lanczos_quadrature",
    "make_rng",
    "numpy_probes",
    "power_iteration",
    "random_probe",
    "stderr",
]
