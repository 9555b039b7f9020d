"""Every Hessian consumer on every zoo model (tests/zoo.py), against two independent references.

The references (tests/reference.py) share no code with keras_hesstrace:
  - central differences of the gradient (Richardson-extrapolated, first derivatives only),
    for H·v along one random vector on every model, the keras.applications one included;
  - the full Hessian, from tape.jacobian where TensorFlow's second derivatives are right,
    else from central differences column by column (``case.reference``).
The objective is the case's own, written out by hand; the package runs on its default
``loss=None`` path (the model's compiled loss, with its loss weights and regularisers).

Deterministic comparisons throughout: per-probe samples with the package's own probes
(reproduced from their seeds), eigenvalues against numpy's eigh, the SLQ moments against
v^T H^k v, the landscape against the objective at the same points.

Built models, references and finite differences are computed once per module (``_BUILT``).
"""

import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import keras_hesstrace as kh
from keras_hesstrace.hvp import hessian_operator
from keras_hesstrace.groups import group_indices
from keras_hesstrace.probes import draw_probe, probe_seed
from keras_hesstrace.schemes import CoordinateDesign

import zoo
from reference import (
    FlatGradient,
    exact_hessian_of,
    fd_hessian_raw,
    fd_hvp,
    flatten,
    relative_error,
    unflatten,
)

SEED = 3
HVP_RTOL = 1e-6  # H·v against finite differences, relative to ‖Hv‖ (issue 12's bar)
# Against the full reference Hessian: tape.jacobian is exact to round-off; the
# finite-difference Hessian to about 1e-11 (its asymmetry, and its agreement with an
# independent finite difference along a random vector, are checked below).
REF_RTOL = {"jacobian": 1e-10, "fd": 1e-8}
FD_TRUST = 1e-8  # the reference Hessian against finite differences along a random vector

CASES = zoo.CASES
SMALL = [c for c in CASES if not c.big]
CALLBACK_CASES = ["mlp", "embedding_lstm", "transformer", "grouped_conv2d", "multi_output", "regularised"]
CLI_CASES = ["mlp", "embedding_lstm", "transformer", "grouped_conv2d", "layernorm_mlp"]


# ------------------------------------------------------------------------ built cases


class Built:
    """A built case with its references, computed lazily and kept for the module."""

    def __init__(self, case):
        self.case = case
        self.model, self.x, self.y = case.build()
        self.variables = list(self.model.trainable_variables)
        self.n = int(sum(np.prod(v.shape) for v in self.variables))
        self.xt = tf.nest.map_structure(tf.convert_to_tensor, self.x)
        self.yt = tf.nest.map_structure(tf.convert_to_tensor, self.y)
        self.weights = [w.numpy().copy() for w in self.model.weights]
        self.gradient = FlatGradient(self.model, self.objective)
        self.v = np.random.default_rng(1234).normal(size=self.n)
        self._H = None
        self._hv_fd = None
        self.asymmetry = None

    def objective(self):
        return self.case.objective(self.model, self.xt, self.yt)

    @property
    def H(self):
        """The reference Hessian [n, n] (float64)."""
        if self._H is None:
            assert not self.case.big, f"{self.case.name} is too big for a full Hessian"
            if self.case.reference == "jacobian":
                H = exact_hessian_of(self.model, self.objective)
                self.asymmetry = float(np.abs(H - H.T).max() / np.abs(H).max())
            else:
                H = fd_hessian_raw(self.model, None, eps=self.case.fd_eps, gradient=self.gradient)
                self.asymmetry = float(np.abs(H - H.T).max() / np.abs(H).max())
                H = (H + H.T) / 2.0
            self._H = H
        return self._H

    @property
    def hv_fd(self):
        """H·v for the case's random vector v, by central differences."""
        if self._hv_fd is None:
            self._hv_fd = fd_hvp(self.model, None, self.v, eps=self.case.fd_eps, gradient=self.gradient)
        return self._hv_fd

    def group_masks(self, mapping):
        """Boolean masks over the flat parameter vector, one per group of ``mapping``."""
        position = {id(v): i for i, v in enumerate(self.variables)}
        edges = np.cumsum([0] + [int(np.prod(v.shape)) for v in self.variables])
        masks = []
        for vs in mapping.values():
            mask = np.zeros(self.n, dtype=bool)
            for v in vs:
                i = position[id(v)]
                mask[edges[i] : edges[i + 1]] = True
            masks.append(mask)
        return masks

    def contractions(self, v):
        """(per-group v_l·(Hv)_l for the layer groups, v·Hv) on the reference Hessian."""
        hv = self.H @ v
        masks = self.group_masks(kh.layer_groups(self.model))
        return np.array([v[m] @ hv[m] for m in masks]), float(v @ hv)

    def objective_at(self, direction, alpha):
        """The hand-written objective at θ + α d (restored after)."""
        saved = [w.numpy().copy() for w in self.variables]
        try:
            for w, t, d in zip(self.variables, saved, direction):
                w.assign(t + alpha * d)
            return float(self.objective())
        finally:
            for w, t in zip(self.variables, saved):
                w.assign(t)

    def assert_weights_unchanged(self):
        for w, saved in zip(self.model.weights, self.weights):
            np.testing.assert_array_equal(w.numpy(), saved, err_msg=f"{self.case.name}: {w.path} changed")


_BUILT = {}


def built(case):
    if case.name not in _BUILT:
        _BUILT[case.name] = Built(case)
    return _BUILT[case.name]


@pytest.fixture(scope="module", autouse=True)
def _free_built_cases():
    yield
    _BUILT.clear()


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


@pytest.fixture(params=SMALL, ids=lambda c: c.name)
def small_case(request):
    return request.param


def package_probes(b, seed, count):
    """Probes 0..count-1 of the package's one generator (draw_probe with the stateless seed
    (seed, m)), rebuilt here: what hessian_trace, diagonal and spectral_density use, as layer_traces does."""
    return [flatten(draw_probe(b.variables, probe_seed(seed, m))) for m in range(count)]


def assert_close(actual, expected, rtol, what):
    """Entrywise, relative to the largest |expected| (a group can be near zero by cancellation)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = max(float(np.abs(expected).max()), 1e-300)
    err = float(np.abs(actual - expected).max() / scale)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}\n got      {actual}\n expected {expected}"
    return err


# ------------------------------------------------------------- the references themselves


def test_finite_differences_do_not_depend_on_the_step(case, record_property):
    """Two steps (eps and eps/3) agree: no kink crossed, truncation and round-off small."""
    b = built(case)
    other = fd_hvp(b.model, None, b.v, eps=case.fd_eps / 3, gradient=b.gradient)
    err = relative_error(other, b.hv_fd)
    record_property("rel_err", err)
    assert err <= 1e-8, f"{case.name}: finite differences at eps={case.fd_eps:g} and /3 differ by {err:.2e}"
    b.assert_weights_unchanged()


def test_reference_hessian_agrees_with_finite_differences(small_case, record_property):
    b = built(small_case)
    err = relative_error(b.H @ b.v, b.hv_fd)
    record_property("rel_err", err)
    record_property("asymmetry", b.asymmetry)
    assert err <= FD_TRUST, f"{small_case.name}: reference Hessian ({small_case.reference}) vs FD: {err:.2e}"
    assert b.asymmetry <= 1e-9, f"{small_case.name}: reference Hessian asymmetry {b.asymmetry:.2e}"
    b.assert_weights_unchanged()


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "conv1d"])
def test_fd_hessian_matches_tape_jacobian_where_autodiff_is_right(name, record_property):
    """The column-by-column finite-difference Hessian (the reference where tape.jacobian is not) is exact too."""
    b = built(zoo.BY_NAME[name])
    assert b.case.reference == "jacobian"
    raw = fd_hessian_raw(b.model, None, eps=b.case.fd_eps, gradient=b.gradient)
    err = relative_error((raw + raw.T) / 2.0, b.H)
    record_property("rel_err", err)
    assert err <= 1e-10, f"{name}: finite-difference Hessian vs tape.jacobian (Frobenius): {err:.2e}"
    assert relative_error(raw, b.H) <= 1e-10
    b.assert_weights_unchanged()


@pytest.mark.parametrize("name", [c.name for c in CASES if c.why == zoo.MOMENTS])
def test_finite_differences_see_the_moments_error_that_tape_jacobian_misses(name, record_property):
    """tape.jacobian through LayerNorm/GroupNorm is off by percents; finite differences are not.

    On the LayerNorm MLP the same function with a hand-written LayerNorm (no stop_gradient)
    has a tape.jacobian that agrees with the finite-difference Hessian of the Keras model.
    If TensorFlow ever differentiates tf.nn.moments twice correctly, the first assertion
    fails: then these cases can use reference="jacobian".
    """
    b = built(zoo.BY_NAME[name])
    jac = exact_hessian_of(b.model, b.objective)
    err_jac = relative_error(jac @ b.v, b.hv_fd)
    record_property("jacobian_rel_err", err_jac)
    assert err_jac > 1e-3, f"{name}: tape.jacobian now agrees with finite differences ({err_jac:.1e})"
    if name == "layernorm_mlp":
        by_hand = lambda: zoo.layernorm_mlp_by_hand(b.model, b.xt, b.yt)  # noqa: E731
        np.testing.assert_allclose(float(by_hand()), float(b.objective()), rtol=1e-13)
        H_hand = exact_hessian_of(b.model, by_hand)
        err_hand = relative_error(H_hand, b.H)
        record_property("hand_written_rel_err", err_hand)
        assert err_hand <= 1e-9, f"hand-written LayerNorm's exact Hessian vs FD Hessian: {err_hand:.2e}"
        assert relative_error(H_hand @ b.v, b.hv_fd) <= 1e-9


# ---------------------------------------------------------------------------- the loss


def test_operator_loss_equals_keras_compute_loss(case, record_property):
    b = built(case)
    value = float(hessian_operator(b.model).loss_value(b.x, b.y))
    hand = float(b.objective())
    keras_loss = b.model.compute_loss(x=b.x, y=b.y, y_pred=b.model(b.x, training=False), training=False)
    record_property("rel_err_hand", abs(value - hand) / abs(hand))
    record_property("rel_err_keras", abs(value - float(keras_loss)) / abs(hand))
    # The operator computes in the model's float64 even where Keras's compiled Loss is float32.
    assert value == pytest.approx(hand, rel=1e-12), f"{case.name}: operator loss {value!r}, objective {hand!r}"
    keras_rtol = 1e-12 if keras_loss.dtype == "float64" else 1e-6
    assert value == pytest.approx(float(keras_loss), rel=keras_rtol), (
        f"{case.name}: operator loss {value!r}, model.compute_loss {float(keras_loss)!r} ({keras_loss.dtype})"
    )


# ---------------------------------------------------------------------------------- hvp


@pytest.mark.parametrize("mode", ["default", "forward", "reverse"])
def test_hvp(case, mode, record_property):
    b = built(case)
    kwargs = {} if mode == "default" else {"mode": mode}
    hv = kh.hvp(b.model, b.x, b.y, unflatten(b.v, b.variables), **kwargs)
    assert len(hv) == len(b.variables)
    for h, w in zip(hv, b.variables):
        assert not isinstance(h, tf.IndexedSlices), f"{case.name}: H·v for {w.path} is an IndexedSlices"
        assert tuple(h.shape) == tuple(w.shape)
    hv = flatten(hv)
    record_property("mode_used", hessian_operator(b.model, mode=kwargs.get("mode", "auto")).mode)
    err = relative_error(hv, b.hv_fd)
    record_property("rel_err_fd", err)
    if not case.big:
        err_ref = relative_error(hv, b.H @ b.v)
        record_property("rel_err_ref", err_ref)
    assert err <= HVP_RTOL, f"{case.name}, mode {mode}: H·v vs finite differences: relative error {err:.2e}"
    if not case.big:
        rtol = REF_RTOL[case.reference]
        assert err_ref <= rtol, f"{case.name}, mode {mode}: H·v vs reference Hessian: relative error {err_ref:.2e}"
    b.assert_weights_unchanged()


# -------------------------------------------------------------------------- layer traces


def test_layer_traces_per_probe_samples(small_case, record_property):
    b = built(small_case)
    num = 3
    r = kh.layer_traces(b.model, b.x, b.y, num_probes=num, seed=SEED)
    mapping = kh.layer_groups(b.model)
    assert r.groups == tuple(mapping)
    assert r.samples.shape == (num, len(mapping))
    rtol = REF_RTOL[small_case.reference]
    worst = 0.0
    for m in range(num):
        v = flatten(draw_probe(b.variables, probe_seed(SEED, m)))
        expected, total = b.contractions(v)
        worst = max(worst, assert_close(r.samples[m], expected, rtol, f"{small_case.name}: probe {m} samples"))
        worst = max(worst, assert_close([r.total_samples[m]], [total], rtol, f"{small_case.name}: probe {m} v·Hv"))
    record_property("rel_err", worst)
    assert r.loss == pytest.approx(float(b.objective()), rel=1e-12)


def test_restricted_and_coordinate_contractions(small_case, record_property):
    """The vectors of layer_traces(scheme=...) (keras_hesstrace.schemes): a probe on one
    group's block operator (the whole model's probe restricted to it), and the coordinate
    design's signed single entries, contracted per group."""
    b = built(small_case)
    op = hessian_operator(b.model)
    mapping = kh.layer_groups(b.model)
    _, indices = group_indices(b.model, mapping)
    masks = b.group_masks(mapping)
    rtol = REF_RTOL[small_case.reference]
    worst = 0.0
    for l in sorted({0, len(indices) - 1}):
        block = hessian_operator(b.model, None, indices[l], "reverse")   # what scheme="restricted" runs
        s, total, *_ = block.probe_contractions(b.xt, b.yt, tf.stack([probe_seed(SEED, 5)]), "rademacher",
                                                (tuple(range(len(indices[l]))),))
        v = flatten(draw_probe(b.variables, probe_seed(SEED, 5))) * masks[l]   # the whole model's probe, restricted
        hv = b.H @ v
        worst = max(worst, assert_close(s.numpy()[0], [v[masks[l]] @ hv[masks[l]]], rtol, f"{small_case.name}: restricted to group {l}"))
    sizes = [int(np.prod(v.shape)) for v in b.variables]
    edges = np.cumsum([0] + sizes)
    design = CoordinateDesign(indices, sizes, seed=SEED)
    index, sign = design.vectors(0, 3)
    s, total, *_ = op.coordinate_contractions(b.xt, b.yt, index, sign, indices)
    for p in range(3):
        v = np.zeros(b.n)
        for j, (i, sg) in enumerate(zip(index[p], sign[p])):
            if i >= 0:
                v[edges[j] + i] = sg
        assert np.count_nonzero(v) == len(indices)  # one entry per group
        hv = b.H @ v
        worst = max(worst, assert_close(s.numpy()[p], [v[m] @ hv[m] for m in masks], rtol, f"{small_case.name}: coordinates {p}"))
    record_property("rel_err", worst)


# ------------------------------------------------------------------- the PyHessian toolset


def test_top_eigenvalues(small_case, record_property):
    b = built(small_case)
    k = 2
    r = kh.top_eigenvalues(b.model, b.x, b.y, k=k, tol=1e-8, max_iter=150, seed=SEED)
    lam = np.linalg.eigvalsh(b.H)
    expected = lam[np.argsort(-np.abs(lam))][:k]
    err = assert_close(r.eigenvalues, expected, 1e-7, f"{small_case.name}: top-{k} eigenvalues (LM)")
    record_property("rel_err", err)
    for value, vector in zip(r.eigenvalues, r.eigenvectors):
        u = flatten(vector)
        residual = np.linalg.norm(b.H @ u - value * u) / abs(value)
        assert residual <= 1e-6, f"{small_case.name}: eigenpair residual on the reference Hessian {residual:.1e}"


def test_hessian_trace_samples(small_case, record_property):
    b = built(small_case)
    num = 4
    r = kh.hessian_trace(b.model, b.x, b.y, num_probes=num, rel_stderr=None, seed=SEED)
    assert r.num_hvps == num
    expected = [v @ b.H @ v for v in package_probes(b, SEED, num)]
    err = assert_close(r.samples, expected, REF_RTOL[small_case.reference], f"{small_case.name}: Hutchinson samples")
    record_property("rel_err", err)
    assert r.trace == pytest.approx(np.mean(expected), rel=1e-6, abs=1e-8 * np.abs(expected).max())


def test_diagonal(small_case, record_property):
    b = built(small_case)
    num = 3
    r = kh.diagonal(b.model, b.x, b.y, num_probes=num, seed=SEED)
    expected = np.mean([v * (b.H @ v) for v in package_probes(b, SEED, num)], axis=0)
    by_path = dict(zip((w.path for w in b.variables), unflatten(expected, b.variables)))
    assert len(by_path) == len(b.variables)
    got, want = [], []
    for g in r.groups:
        for path, values in zip(r.variables[g], r.values[g]):
            got.append(np.ravel(values))
            want.append(np.ravel(by_path[path]))
    assert sum(a.size for a in got) == b.n
    err = assert_close(np.concatenate(got), np.concatenate(want), REF_RTOL[small_case.reference], f"{small_case.name}: diagonal")
    record_property("rel_err", err)


def test_spectral_density_moments(small_case, record_property):
    b = built(small_case)
    r = kh.spectral_density(b.model, b.x, b.y, num_runs=1, lanczos_steps=6, grid=200, seed=SEED)
    (v,) = package_probes(b, SEED, 1)
    worst = 0.0
    w = v.copy()
    for k in (1, 2, 3):  # Gauss quadrature with 6 nodes is exact for degree < 12
        w = b.H @ w
        worst = max(worst, assert_close([r.run_moments(k)[0]], [v @ w / b.n], REF_RTOL[small_case.reference] * 10,
                                        f"{small_case.name}: SLQ moment {k}"))
    record_property("rel_err", worst)
    lam = np.linalg.eigvalsh(b.H)
    spread = lam[-1] - lam[0]
    assert np.all(r.nodes[0] >= lam[0] - 1e-8 * spread) and np.all(r.nodes[0] <= lam[-1] + 1e-8 * spread)


def test_loss_landscape_values(small_case, record_property):
    b = built(small_case)
    rng = np.random.default_rng(SEED)
    direction = [0.05 * rng.normal(size=tuple(w.shape)) for w in b.variables]
    grid = np.array([-1.0, 0.0, 0.5])
    r = kh.loss_landscape(b.model, b.x, b.y, directions=[direction], grid=grid)
    b.assert_weights_unchanged()
    expected = [b.objective_at(direction, a) for a in grid]
    err = assert_close(r.losses, expected, 1e-12, f"{small_case.name}: landscape losses")
    record_property("rel_err", err)
    assert r.origin_loss == pytest.approx(float(b.objective()), rel=1e-12)


# ------------------------------------------------------------------ callback and CLI


@pytest.mark.parametrize("name", CALLBACK_CASES)
def test_callback_first_snapshot(name, tmp_path, record_property):
    """A 1-epoch fit of 2 steps; the snapshot at step 0 (the weights before any update)."""
    from keras_hesstrace.monitor import HessianTraceCallback
    from keras_hesstrace.monitor.callback import snapshot_seed

    b = built(zoo.BY_NAME[name])
    expected = np.mean([b.contractions(flatten(draw_probe(b.variables, probe_seed(snapshot_seed(SEED, 0), m))))[0]
                        for m in range(2)], axis=0)
    csv_path = tmp_path / "traces.csv"
    cb = HessianTraceCallback((b.x, b.y), every_n_steps=1000, num_probes=2, csv_path=str(csv_path), seed=SEED, verbose=0)
    try:
        b.model.fit(b.x, b.y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    finally:
        for w, saved in zip(b.model.weights, b.weights):
            w.assign(saved)
    b.assert_weights_unchanged()
    rows = pd.read_csv(csv_path)
    step0 = rows[rows["step"] == 0].set_index("group")
    groups = list(kh.layer_groups(b.model))
    assert list(step0.index) == groups + ["total"]
    assert (step0["status"] == "ok").all()
    err = assert_close(step0.loc[groups, "trace"].to_numpy(), expected, REF_RTOL[b.case.reference],
                       f"{name}: callback traces at step 0")
    record_property("rel_err", err)


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_estimate(name, tmp_path, capsys, record_property):
    from keras_hesstrace import cli

    b = built(zoo.BY_NAME[name])
    path, data, out = tmp_path / "model.keras", tmp_path / "data.npz", tmp_path / "out"
    b.model.save(path)
    np.savez(data, x=b.x, y=b.y)
    rc = cli.main(["estimate", str(path), "--data", str(data), "--num-probes", "2", "--seed", str(SEED), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, f"{name}: keras-hesstrace estimate exited {rc}: {captured.err.strip()[-500:]}"
    frame = pd.read_csv(os.path.join(out, "traces.csv"), index_col=0)
    groups = list(kh.layer_groups(b.model))
    assert list(frame.index) == groups + ["total"]  # the whole model's trace last
    expected = np.mean([b.contractions(flatten(draw_probe(b.variables, probe_seed(SEED, m))))[0] for m in range(2)], axis=0)
    err = assert_close(frame.loc[groups, "trace"].to_numpy(), expected, REF_RTOL[b.case.reference], f"{name}: CLI traces")
    # the groups cover every variable, so the total is their sum
    assert_close(frame.loc[["total"], "trace"].to_numpy(), np.array([expected.sum()]), REF_RTOL[b.case.reference],
                 f"{name}: CLI total trace")
    record_property("rel_err", err)
