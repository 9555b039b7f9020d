"""layer_traces against exact block traces; the weight-sharing bias; retracing; bad input."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hesstrace as kh
import models_for_tests as mt
from keras_hesstrace.hvp import hessian_operator
from keras_hesstrace.probes import draw_probe, probe_seed
from keras_hesstrace.variance import block_traces
from reference import exact_hessian, flatten, group_block_sizes, xent64
from reference import objective as reference_objective


def _exact_block_traces(model, x, y, groups="layer"):
    H = exact_hessian(model, x, y, xent64())
    mapping = kh.layer_groups(model, groups)
    return H, block_traces(H, group_block_sizes(mapping)), mapping


@pytest.mark.parametrize("factory,shape", [(mt.mlp, (5,)), (mt.cnn_bn, (6, 6, 2)), (mt.nested, (5,))])
def test_each_group_within_four_standard_errors_of_its_exact_block_trace(factory, shape):
    model = factory()
    x, y = mt.data(shape=shape)
    H, exact, mapping = _exact_block_traces(model, x, y)
    r = kh.layer_traces(model, x, y, num_probes=400, seed=7, loss=xent64())
    assert r.groups == tuple(mapping)
    assert r.samples.shape == (400, len(mapping))
    assert np.all(r.stderr > 0)
    z = (r.trace - exact) / r.stderr
    assert np.all(np.abs(z) < 4), (r.trace, exact, r.stderr)
    # The groups cover every variable, so their traces add up to the full trace.
    assert abs(r.total - np.trace(H)) < 4 * r.total_stderr


def test_per_probe_samples_are_exact_contractions_and_sum_to_vHv():
    model = mt.mlp()
    x, y = mt.data()
    H, _, mapping = _exact_block_traces(model, x, y)
    r = kh.layer_traces(model, x, y, num_probes=5, seed=11, loss=xent64())
    edges = np.cumsum([0] + group_block_sizes(mapping))
    for m in range(5):
        v = flatten(draw_probe(model.trainable_variables, probe_seed(11, m)))
        assert set(np.unique(v)) == {-1.0, 1.0}
        hv = H @ v
        expected = [v[a:b] @ hv[a:b] for a, b in zip(edges[:-1], edges[1:])]
        np.testing.assert_allclose(r.samples[m], expected, rtol=1e-10)
        np.testing.assert_allclose(r.samples[m].sum(), v @ hv, rtol=1e-10)
        np.testing.assert_allclose(r.total_samples[m], v @ hv, rtol=1e-10)


def test_same_seed_same_result_and_gaussian_probes():
    model = mt.mlp()
    x, y = mt.data()
    a = kh.layer_traces(model, x, y, num_probes=3, seed=5, loss=xent64())
    b = kh.layer_traces(model, x, y, num_probes=3, seed=5, loss=xent64())
    np.testing.assert_array_equal(a.samples, b.samples)
    c = kh.layer_traces(model, x, y, num_probes=3, seed=6, loss=xent64())
    assert not np.allclose(a.samples, c.samples)
    H, exact, _ = _exact_block_traces(model, x, y)
    g = kh.layer_traces(model, x, y, num_probes=400, seed=1, probe="gaussian", loss=xent64())
    assert np.all(np.abs(g.trace - exact) < 4 * g.stderr)


def test_weight_sharing_estimator_finds_the_shared_block_and_unrolling_misses_it():
    model = mt.shared(seed=4)
    groups = kh.layer_groups(model)
    assert list(groups) == ["shared", "head"]
    assert len(groups["shared"]) == 2  # kernel and bias once, though the layer is called twice

    model = mt.shared_scale(seed=2)
    x, y = mt.data(shape=(4,), seed=2)
    H, exact, mapping = _exact_block_traces(model, x, y)
    assert list(mapping) == ["mix", "shared", "head"]
    r = kh.layer_traces(model, x, y, num_probes=800, seed=3, loss=xent64())
    est, se = r["shared"], r.stderr[1]
    assert abs(est - exact[1]) < 4 * se
    # Unrolled: the two calls as independent copies; the sum of their diagonal blocks
    # drops the cross-instance blocks 2 tr(H_12).
    copy = mt.shared_scale(seed=2, unrolled=True)
    mt.copy_weights(model, copy)
    np.testing.assert_allclose(copy(x).numpy(), model(x).numpy(), rtol=1e-12)
    Hu = exact_hessian(copy, x, y, xent64())
    unrolled_groups = kh.layer_groups(copy)
    unrolled_traces = dict(zip(unrolled_groups, block_traces(Hu, group_block_sizes(unrolled_groups))))
    unrolled = unrolled_traces["shared"] + unrolled_traces["shared2"]
    assert abs(unrolled - est) > 10 * se, (unrolled, est, se, exact[1])
    # ...and the gap is exactly the cross-instance term 2 tr(H_12) of the unrolled model.
    pos = {name: i for i, name in enumerate(unrolled_groups)}
    edges = np.cumsum([0] + group_block_sizes(unrolled_groups))
    a = slice(edges[pos["shared"]], edges[pos["shared"] + 1])
    b = slice(edges[pos["shared2"]], edges[pos["shared2"] + 1])
    np.testing.assert_allclose(exact[1], unrolled + 2 * np.trace(Hu[a, b]), rtol=1e-9)


def test_stage_and_variable_groupings():
    model = mt.nested()
    x, y = mt.data()
    H = exact_hessian(model, x, y, xent64())
    stages = {"inner/*": "inner", "stem": "rest", "head": "rest"}
    mapping = kh.layer_groups(model, stages)
    assert list(mapping) == ["rest", "inner"]
    r = kh.layer_traces(model, x, y, num_probes=300, seed=2, by=stages, loss=xent64())
    pos = {id(v): i for i, v in enumerate(model.trainable_variables)}
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    edges = np.cumsum([0] + sizes)
    diag = np.diag(H)
    for name, vs in mapping.items():
        exact = sum(diag[edges[pos[id(v)]] : edges[pos[id(v)] + 1]].sum() for v in vs)
        assert abs(r[name] - exact) < 4 * r.stderr[r.groups.index(name)]
    rv = kh.layer_traces(model, x, y, num_probes=2, seed=2, by="variable", loss=xent64())
    assert len(rv.groups) == len(model.trainable_variables)


def test_dataset_mode_averages_batches_weighted_by_size():
    model = mt.mlp()
    x, y = mt.data(n=20)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # 8, 8, 4
    H_full = exact_hessian(model, x, y, xent64())
    r = kh.layer_traces(model, ds, num_probes=4, seed=9, loss=xent64(), verbose=0)
    assert r.num_batches == 3
    for m in range(4):
        v = flatten(draw_probe(model.trainable_variables, probe_seed(9, m)))
        np.testing.assert_allclose(r.total_samples[m], v @ H_full @ v, rtol=1e-9)
    # An iterable of batches works too; num_batches limits it.
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    r2 = kh.layer_traces(model, batches, num_probes=4, seed=9, loss=xent64(), num_batches=2, verbose=0)
    H_two = exact_hessian(model, x[:16], y[:16], xent64())
    v = flatten(draw_probe(model.trainable_variables, probe_seed(9, 0)))
    assert r2.num_batches == 2
    np.testing.assert_allclose(r2.total_samples[0], v @ H_two @ v, rtol=1e-9)


def test_no_retracing_for_repeated_calls_and_new_batch_sizes():
    model = mt.mlp()
    x, y = mt.data(n=16)
    kh.layer_traces(model, x, y, num_probes=2, seed=0, loss="sparse_categorical_crossentropy")  # warm-up; a name is its own key
    op = hessian_operator(model, "sparse_categorical_crossentropy")
    count = op.tracing_count()
    # mode="auto": the one-time check traces one product in each mode, then the probe function.
    assert op.mode_check is not None and count == 3
    for seed in range(3):
        kh.layer_traces(model, x, y, num_probes=3, seed=seed, loss="sparse_categorical_crossentropy")
    kh.layer_traces(model, x[:5], y[:5], num_probes=2, seed=0, loss="sparse_categorical_crossentropy")
    assert op.tracing_count() == count


def test_to_frame_and_str():
    model = mt.mlp()
    x, y = mt.data()
    r = kh.layer_traces(model, x, y, num_probes=3, seed=0, loss=xent64())
    frame = r.to_frame()
    assert list(frame.columns) == ["trace", "stderr", "rel_stderr", "num_params", "num_probes",
                                  "gradient_norm"]
    assert list(frame.index) == ["hidden", "hidden2", "head"]
    assert frame["num_params"].tolist() == [36, 28, 15]
    np.testing.assert_allclose(frame["trace"].to_numpy(), r.trace)
    assert "total trace" in str(r)
    with pytest.raises(KeyError, match="No group 'nope'"):
        r["nope"]
    one = kh.layer_traces(model, x, y, num_probes=1, seed=0, loss=xent64())
    assert np.all(np.isnan(one.stderr))


def test_bad_input_is_named():
    model = mt.mlp()
    x, y = mt.data()
    with pytest.raises(ValueError, match="same batch size: x has \\[12\\] examples, y has \\[11\\]"):
        kh.layer_traces(model, x, y[:-1], loss=xent64())
    with pytest.raises(ValueError, match="num_probes must be an integer >= 1"):
        kh.layer_traces(model, x, y, num_probes=0, loss=xent64())
    with pytest.raises(ValueError, match="probe must be one of"):
        kh.layer_traces(model, x, y, probe="uniform", loss=xent64())
    with pytest.raises(ValueError, match="no compiled loss"):
        kh.layer_traces(model, x, y)
    with pytest.raises(ValueError, match="not a scalar"):
        kh.layer_traces(model, x, y, loss=keras.losses.MeanSquaredError(reduction=None))
    frozen = mt.mlp()
    frozen.trainable = False
    with pytest.raises(ValueError, match="no trainable variables"):
        kh.layer_traces(frozen, x, y, loss=xent64())
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="not built"):
        kh.layer_traces(unbuilt, x, y, loss=xent64())
    with pytest.raises(ValueError, match="yielded no batches"):
        kh.layer_traces(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(4).take(0), loss=xent64())
    with pytest.raises(ValueError, match="sample weights are not supported"):
        kh.layer_traces(model, [(x, y, np.ones(12))], loss=xent64())


def test_non_finite_loss_is_flagged_not_silent():
    model = mt.mlp()
    x, y = mt.data()
    x = x.copy()
    x[0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="Non-finite"):
        r = kh.layer_traces(model, x, y, num_probes=2, seed=0, loss=xent64())
    assert not r.finite
    assert "NOT FINITE" in str(r)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_several_probes_per_call_give_the_same_samples(mode):
    model = mt.cnn_bn()
    x, y = mt.data(shape=(6, 6, 2))
    one = kh.layer_traces(model, x, y, num_probes=5, seed=4, loss=xent64(), mode=mode)
    three = kh.layer_traces(model, x, y, num_probes=5, seed=4, loss=xent64(), mode=mode, probes_per_call=3)
    np.testing.assert_allclose(three.samples, one.samples, rtol=1e-12)
    np.testing.assert_allclose(three.total_samples, one.total_samples, rtol=1e-12)
    with pytest.raises(ValueError, match="probes_per_call must be an integer >= 1"):
        kh.layer_traces(model, x, y, loss=xent64(), probes_per_call=0)


@pytest.mark.parametrize("factory,shape,l2", [(mt.mlp, (5,), 0.03125), (mt.cnn_bn, (6, 6, 2), 0.0)])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_a_batch_split_into_chunks_gives_the_whole_batch_contractions(factory, shape, l2, mode):
    # 12 examples in chunks of 5, 5, 2 (uneven on purpose), against the exact float64
    # Hessian of the whole batch: every probe's per-group sample is v_l^T (H v)_l.
    model = factory(l2=l2) if l2 else factory()
    x, y = mt.data(shape=shape)
    H, _, mapping = _exact_block_traces(model, x, y)
    edges = np.cumsum([0] + group_block_sizes(mapping))
    r = kh.layer_traces(model, x, y, num_probes=4, seed=3, loss=xent64(), mode=mode,
                        max_batch_size=5, probes_per_call=2)
    for m in range(4):
        v = flatten(draw_probe(model.trainable_variables, probe_seed(3, m)))
        hv = H @ v
        expected = [v[a:b] @ hv[a:b] for a, b in zip(edges[:-1], edges[1:])]
        np.testing.assert_allclose(r.samples[m], expected, rtol=1e-10)
        np.testing.assert_allclose(r.total_samples[m], v @ hv, rtol=1e-10)
    whole = kh.layer_traces(model, x, y, num_probes=4, seed=3, loss=xent64(), mode=mode)
    np.testing.assert_allclose(r.loss, whole.loss, rtol=1e-12)
    assert r.num_batches == whole.num_batches == 1


def test_max_batch_size_bad_values_and_a_summed_loss_are_refused():
    model = mt.mlp()
    x, y = mt.data()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"max_batch_size must be None \(no chunking\) or an integer >= 1"):
            kh.layer_traces(model, x, y, loss=xent64(), max_batch_size=bad)
    summed = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64", reduction="sum")
    with pytest.raises(ValueError, match="mean over examples.*reduction='sum'"):
        kh.layer_traces(model, x, y, loss=summed, max_batch_size=4)
    # A batch no larger than max_batch_size is not split: identical samples.
    a = kh.layer_traces(model, x, y, num_probes=2, seed=1, loss=xent64(), max_batch_size=12)
    b = kh.layer_traces(model, x, y, num_probes=2, seed=1, loss=xent64())
    np.testing.assert_array_equal(a.samples, b.samples)


def test_by_groups_and_a_selection_of_groups():
    model = mt.mlp()
    x, y = mt.data()
    full = kh.layer_traces(model, x, y, num_probes=3, seed=4, loss=xent64())
    chosen = kh.layer_traces(model, x, y, num_probes=3, seed=4, loss=xent64(), groups=["head", "hidden"])
    assert chosen.groups == ("head", "hidden")
    np.testing.assert_array_equal(chosen.samples, full.samples[:, [2, 0]])  # the same probes, a subset
    # total: still the whole model (another compiled function: equal up to rounding)
    np.testing.assert_allclose(chosen.total_samples, full.total_samples, rtol=1e-13)
    one = kh.layer_traces(model, x, y, num_probes=3, seed=4, loss=xent64(), groups="head")
    assert one.groups == ("head",)
    with pytest.raises(ValueError, match=r"Unknown group\(s\) \['nope'\].*hidden, hidden2, head|Unknown group"):
        kh.layer_traces(model, x, y, num_probes=2, loss=xent64(), groups=["nope"])
    by_variable = kh.layer_traces(model, x, y, num_probes=2, seed=1, loss=xent64(), by="variable")
    # The old spelling: a grouping given as groups= still works, with a DeprecationWarning.
    with pytest.warns(DeprecationWarning, match="pass the grouping as by="):
        old = kh.layer_traces(model, x, y, num_probes=2, seed=1, loss=xent64(), groups="variable")
    assert old.groups == by_variable.groups and len(old.groups) == 6
    np.testing.assert_array_equal(old.samples, by_variable.samples)
    with pytest.raises(ValueError, match="is a grouping, and by="):
        kh.layer_traces(model, x, y, num_probes=2, loss=xent64(), by="variable", groups="layer")


@pytest.mark.parametrize("max_batch_size", [None, 7])
def test_gradient_norms_match_central_differences_of_the_loss(max_batch_size):
    """The per-group gradient norms from the trace's own pass equal those of a central
    finite-difference gradient of the float64 loss (independent of autodiff)."""
    model = mt.mlp()
    x, y = mt.data()
    loss = xent64()
    r = kh.layer_traces(model, x, y, num_probes=2, seed=0, loss=loss,
                        max_batch_size=max_batch_size)
    mapping = kh.layer_groups(model, "layer")
    eps, fd = 1e-6, []
    for var in model.trainable_variables:
        base = var.numpy()
        g = np.zeros(base.size)
        for i in range(base.size):
            for sign in (1, -1):
                shifted = base.copy().ravel()
                shifted[i] += sign * eps
                var.assign(shifted.reshape(base.shape))
                g[i] += sign * float(reference_objective(model, x, y, loss)) / (2 * eps)
        var.assign(base)
        fd.append(g)
    edges = np.cumsum([0] + group_block_sizes(mapping))
    flat = np.concatenate(fd)
    expected = [np.linalg.norm(flat[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(r.gradient_norms, expected, rtol=1e-7)
    np.testing.assert_allclose(r.gradient_norm, np.linalg.norm(flat), rtol=1e-7)
    assert list(r.to_frame()["gradient_norm"]) == list(r.gradient_norms)


@pytest.mark.parametrize("seed, shown", [("a", "'a'"), (2.5, "2.5"), (-1, "-1"), (2**63, str(2**63)), (True, "True")])
def test_a_seed_that_is_not_a_whole_number_in_range_is_refused_by_name(seed, shown):
    """Issue 18 case 8: 'a' gave "invalid literal for int()", 2.5 was used as 2."""
    model = mt.mlp()
    x, y = mt.data(shape=(5,))
    for call in (lambda: kh.layer_traces(model, x, y, num_probes=2, seed=seed, loss=xent64()),
                 lambda: kh.hessian_trace(model, x, y, num_probes=2, rel_stderr=None, seed=seed, loss=xent64()),
                 lambda: kh.top_eigenvalues(model, x, y, k=1, seed=seed, loss=xent64()),
                 lambda: kh.diagonal(model, x, y, num_probes=2, seed=seed, loss=xent64()),
                 lambda: kh.loss_landscape(model, x, y, grid=3, seed=seed, verbose=0, loss=xent64())):
        with pytest.raises(ValueError, match=rf"^seed must be None \(a fresh seed is drawn\) or an integer in \[0, {2**63 - 1}\], got {shown}\.$"):
            call()
    assert kh.layer_traces(model, x, y, num_probes=2, seed=3.0, loss=xent64()).seed == 3  # a whole float is that integer
