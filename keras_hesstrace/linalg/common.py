"""What the algorithms on a matvec share: seeds, probes, the finiteness check,
re-orthogonalisation and the standard error of a mean.

Pure numpy: nothing here (or anywhere in :mod:`keras_hesstrace.linalg`) imports Keras or
TensorFlow.
"""

import numpy as np

from keras_hesstrace._validate import check_seed

PROBES = ("rademacher", "gaussian")


def make_rng(seed):
    """(numpy Generator, int seed); ``None`` draws a fresh seed and reports it.

    A seed that is not a whole number in [0, 2**63 - 1] is refused (``ValueError`` naming
    ``seed``), never truncated.
    """
    seed = check_seed(seed)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**62))
    return np.random.default_rng(int(seed)), int(seed)


def random_probe(rng, n, probe, dtype=np.float64):
    """One probe of length n with E[v v^T] = I."""
    if probe == "rademacher":
        return (2.0 * rng.integers(0, 2, size=n) - 1.0).astype(dtype)
    if probe == "gaussian":
        return rng.standard_normal(n).astype(dtype)
    raise ValueError(f"probe must be one of {PROBES}, not {probe!r}.")


def numpy_probes(n, probe="rademacher", seed=None):
    """The default probe source of the algorithms on a plain matvec.

    Returns:
        ``draw(m) -> float64 [n]``: probe number m, from numpy's generator seeded with
        ``(seed, m)``, so a probe depends on its seed and index only (as the package's
        TensorFlow probes do; the Keras adapter passes those instead).
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, not {probe!r}.")
    _, seed = make_rng(seed)

    def draw(m):
        return random_probe(np.random.default_rng((seed, int(m))), n, probe)

    return draw


def take_probe(draw, m, n):
    """``draw(m)`` as a flat float64 vector, checked to have length n."""
    v = np.asarray(draw(m), dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"The probe source gave a vector of shape {v.shape}; the operator's dimension is {n}.")
    return v


def check_finite(w):
    """Raise FloatingPointError unless every entry of the product ``w`` is finite."""
    if not np.all(np.isfinite(w)):
        raise FloatingPointError(
            "The Hessian-vector product is not finite (NaN or inf): the loss or the model's "
            "weights are not finite at this point, so no spectrum can be computed."
        )


def stderr(samples):
    """Standard error of the mean over the first axis: std(ddof=1) / sqrt(M).

    Args:
        samples: array-like [M] or [M, ...] of M independent samples.

    Returns:
        a float for [M] samples, an array [...] otherwise; NaN where M < 2.
    """
    samples = np.asarray(samples, dtype=np.float64)
    m = samples.shape[0]
    if m < 2:
        out = np.full(samples.shape[1:], np.nan)
    else:
        out = samples.std(axis=0, ddof=1) / np.sqrt(m)
    return float(out) if np.ndim(out) == 0 else out


def orthogonalise(w, basis):
    """w minus its projection on the orthonormal rows of ``basis`` (twice: 'twice is enough')."""
    if basis is None or len(basis) == 0:
        return w
    for _ in range(2):  # in the basis' dtype: no float64 copy of a float32 basis
        coeffs = basis @ w.astype(basis.dtype, copy=False)
        w = w - np.asarray(basis.T @ coeffs, dtype=np.float64)
    return w
