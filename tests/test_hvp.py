"""hvp() against the exact Hessian (tape.jacobian of the gradient), float64, both modes."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hesstrace as kh
import models_for_tests as mt
from reference import exact_hessian, flatten, unflatten, xent64

MODES = ["reverse", "forward"]


def _check_hvp(model, x, y, mode, seed=0, rtol=1e-10):
    loss = xent64()
    H = exact_hessian(model, x, y, loss)
    np.testing.assert_allclose(H, H.T, atol=1e-12)
    rng = np.random.default_rng(seed)
    v = rng.normal(size=H.shape[0])
    hv = kh.hvp(model, x, y, unflatten(v, model.trainable_variables), loss=loss, mode=mode)
    assert [tuple(t.shape) for t in hv] == [tuple(w.shape) for w in model.trainable_variables]
    np.testing.assert_allclose(flatten(hv), H @ v, rtol=rtol, atol=1e-12 * np.abs(H @ v).max())
    return H


@pytest.mark.parametrize("mode", MODES)
def test_mlp(mode):
    model = mt.mlp()
    x, y = mt.data()
    _check_hvp(model, x, y, mode)


@pytest.mark.parametrize("mode", MODES)
def test_cnn_with_batchnorm_uses_and_keeps_moving_statistics(mode):
    model = mt.cnn_bn()
    x, y = mt.data(shape=(6, 6, 2))
    bn = model.get_layer("bn")
    before = [w.numpy().copy() for w in (bn.moving_mean, bn.moving_variance)]
    _check_hvp(model, x, y, mode)
    after = [w.numpy() for w in (bn.moving_mean, bn.moving_variance)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    # BN's moving statistics are not trainable: only gamma and beta are in the Hessian.
    assert sum(1 for w in model.trainable_variables if "bn" in w.path) == 2


@pytest.mark.parametrize("mode", MODES)
def test_l2_regularisers_add_two_lambda_to_the_diagonal(mode):
    lam = 0.03125  # exact in float32: Keras keeps the L2 factor as float32
    model = mt.mlp(l2=lam)
    x, y = mt.data()
    loss = xent64()
    H = _check_hvp(model, x, y, mode)
    H_data = exact_hessian(model, x, y, loss, include_regularisers=False)
    diff = H - H_data
    is_reg_kernel = np.concatenate(
        [np.full(int(np.prod(w.shape)), w.path.endswith("kernel") and not w.path.startswith("hidden2")) for w in model.trainable_variables]
    )
    np.testing.assert_allclose(np.diag(diff)[is_reg_kernel], 2 * lam, rtol=1e-10)
    np.testing.assert_allclose(np.diag(diff)[~is_reg_kernel], 0.0, atol=1e-12)
    np.testing.assert_allclose(diff - np.diag(np.diag(diff)), 0.0, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_shared_layer(mode):
    model = mt.shared()
    x, y = mt.data(shape=(4,))
    _check_hvp(model, x, y, mode)


@pytest.mark.parametrize("mode", MODES)
def test_nested_model(mode):
    model = mt.nested()
    x, y = mt.data()
    _check_hvp(model, x, y, mode)


@pytest.mark.parametrize("mode", MODES)
def test_subclassed_model(mode):
    model = mt.subclassed()
    x, y = mt.data()
    _check_hvp(model, x, y, mode)


def test_compiled_loss_is_the_default_and_named_losses_work():
    model = mt.mlp()
    x, y = mt.data()
    v = [np.ones(w.shape) for w in model.trainable_variables]
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"))
    compiled = flatten(kh.hvp(model, x, y, v))
    given = flatten(kh.hvp(model, x, y, v, loss=xent64()))
    np.testing.assert_allclose(compiled, given, rtol=1e-12)
    # A plain function is reduced by its mean, as model.compile does.
    fn = lambda yt, yp: keras.losses.sparse_categorical_crossentropy(yt, yp, from_logits=True)  # noqa: E731
    np.testing.assert_allclose(flatten(kh.hvp(model, x, y, v, loss=fn)), given, rtol=1e-10)


def test_jit_compile_gives_the_same_vector():
    model = mt.mlp()
    x, y = mt.data()
    v = [np.full(w.shape, 0.5) for w in model.trainable_variables]
    plain = flatten(kh.hvp(model, x, y, v, loss=xent64()))
    xla = flatten(kh.hvp(model, x, y, v, loss=xent64(), jit_compile=True))
    np.testing.assert_allclose(xla, plain, rtol=1e-9, atol=1e-12)


def test_float32_model_matches_to_float32_accuracy():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)])
    x, y = mt.data()
    x = x.astype("float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    H = exact_hessian(model, x, y, loss)
    v = np.random.default_rng(1).normal(size=H.shape[0])
    for mode in MODES:
        hv = flatten(kh.hvp(model, x, y, unflatten(v, model.trainable_variables), loss=loss, mode=mode))
        np.testing.assert_allclose(hv, H @ v, rtol=1e-4, atol=1e-5)


def test_wrong_vector_structure_is_refused_by_name():
    model = mt.mlp()
    x, y = mt.data()
    v = [np.ones(w.shape) for w in model.trainable_variables]
    with pytest.raises(ValueError, match="5 entries but there are 6"):
        kh.hvp(model, x, y, v[:-1], loss=xent64())
    bad = list(v)
    bad[2] = np.ones((2, 2))
    with pytest.raises(ValueError, match=r"vector\[2\] has shape \(2, 2\).*hidden2/kernel"):
        kh.hvp(model, x, y, bad, loss=xent64())
    with pytest.raises(ValueError, match="list of 6 arrays"):
        kh.hvp(model, x, y, np.ones(10), loss=xent64())
    with pytest.raises(ValueError, match="mode must be"):
        kh.hvp(model, x, y, v, loss=xent64(), mode="sideways")


def test_matvec_data_is_the_hvp_of_the_mean_loss_over_all_batches():
    from keras_hesstrace.hvp import hessian_operator

    model = mt.mlp()
    x, y = mt.data(n=20)
    H = exact_hessian(model, x, y, xent64())
    v = np.random.default_rng(4).normal(size=H.shape[0])
    op = hessian_operator(model, xent64())
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    hv, loss = op.matvec_data(batches, unflatten(v, model.trainable_variables))
    np.testing.assert_allclose(flatten(hv), H @ v, rtol=1e-10, atol=1e-13)
    assert loss == pytest.approx(float(xent64()(y, model(x))), rel=1e-12)
    # A block: only the head's variables, H_SS v_S.
    head = [i for i, w in enumerate(model.trainable_variables) if w.path.startswith("head/")]
    block = hessian_operator(model, xent64(), variable_indices=head)
    sizes = [int(np.prod(w.shape)) for w in model.trainable_variables]
    start = sum(sizes[: head[0]])
    sl = slice(start, start + sum(sizes[i] for i in head))
    vs = np.random.default_rng(5).normal(size=sl.stop - sl.start)
    hv_block, _ = block.matvec(x, y, unflatten(vs, block.variables))
    np.testing.assert_allclose(flatten(hv_block), H[sl, sl] @ vs, rtol=1e-10, atol=1e-13)


def test_a_new_but_equal_loss_object_reuses_the_operator_and_the_cache_is_bounded():
    """Issue 18 case 4: a new Loss object per call used to build (and trace) a new operator
    each time, without bound."""
    import warnings

    from keras_hesstrace.hvp import OPERATOR_CACHE_ATTR, OPERATOR_CACHE_SIZE, hessian_operator

    model = mt.mlp()
    x, y = mt.data()
    ops = [hessian_operator(model, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, dtype="float64")) for _ in range(5)]
    assert all(op is ops[0] for op in ops)
    counts = []
    for _ in range(3):
        kh.layer_traces(model, x, y, num_probes=2, seed=0, loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, dtype="float64"))
        counts.append(ops[0].tracing_count())
    assert counts[0] >= 1 and counts == [counts[0]] * 3  # traced once, then reused
    other = hessian_operator(model, keras.losses.SparseCategoricalCrossentropy(
        from_logits=False, dtype="float64"))
    assert other is not ops[0]  # another config: another operator
    cache = getattr(model, OPERATOR_CACHE_ATTR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(OPERATOR_CACHE_SIZE + 3):
            hessian_operator(model, lambda yt, yp, i=i: tf.reduce_mean(yp))
    assert len(cache) == OPERATOR_CACHE_SIZE
    assert any("least recently used" in str(w.message) for w in caught)


def test_block_operators_are_cached_apart_from_whole_model_ones():
    """scheme="restricted" makes one block operator per layer: a deep network's layers must
    not push out the whole-model operators (nor each other, up to BLOCK_OPERATOR_CACHE_SIZE)."""
    import warnings

    from keras_hesstrace.hvp import BLOCK_OPERATOR_CACHE_SIZE, OPERATOR_CACHE_ATTR, OPERATOR_CACHE_SIZE, hessian_operator

    model = mt.mlp()
    loss = "sparse_categorical_crossentropy"
    whole = hessian_operator(model, loss)
    n = len(model.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no eviction warning
        blocks = [hessian_operator(model, loss, tuple(sorted({i % n, (i // n + i) % n}))) for i in range(OPERATOR_CACHE_SIZE + 4)]
    assert hessian_operator(model, loss) is whole
    assert all(hessian_operator(model, loss, op.variable_indices) is op for op in blocks)
    cache = getattr(model, OPERATOR_CACHE_ATTR)
    assert sum(k[1] is not None for k in cache) == len({op.variable_indices for op in blocks})
    assert BLOCK_OPERATOR_CACHE_SIZE >= 256
