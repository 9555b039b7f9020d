"""HessianOperator.flat_matvec / flat_probe and ModelHessian on them (issue 17, estimators on device).

The flat product must equal the per-variable one, the flat probe must be the eager
``draw_probe`` bit for bit (so the PyHessian toolset and layer_traces draw the same
probes), nothing may retrace after a warm-up, and the dataset mode must stay the product
of the mean loss over all examples. The strategy case runs in a fresh process (logical
CPUs must be set before TensorFlow starts).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_hesstrace as kh
from keras_hesstrace.hvp import hessian_operator
from keras_hesstrace.model_hessian import ModelHessian
from keras_hesstrace.probes import draw_probe, probe_seed
import models_for_tests as mt
from reference import exact_hessian, flatten, unflatten, xent64

HERE = os.path.dirname(os.path.abspath(__file__))


def _float32_mlp():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _flat_and_per_variable(op, x, y, v):
    hv, loss = op.flat_matvec(x, y, v)
    ref, ref_loss = op.matvec(x, y, unflatten(v, op.variables))
    assert hv.dtype == tf.float64 and tuple(hv.shape) == v.shape
    return hv.numpy(), float(loss), flatten(ref), float(ref_loss)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("factory", [mt.mlp, mt.cnn_bn])
def test_flat_matvec_equals_matvec_on_float64_models(factory, mode):
    model = factory()
    x, y = mt.data(n=10, shape=model.input_shape[1:])
    op = hessian_operator(model, xent64(), mode=mode)
    v = np.random.default_rng(1).normal(size=sum(int(np.prod(w.shape)) for w in op.variables))
    hv, loss, ref, ref_loss = _flat_and_per_variable(op, x, y, v)
    np.testing.assert_allclose(hv, ref, rtol=1e-12, atol=1e-15 * np.abs(ref).max())
    assert loss == ref_loss
    # A block (H_SS v_S): the flat vector lives on the block's variables only.
    head = [i for i, w in enumerate(model.trainable_variables) if w.path.startswith("head/")]
    block = hessian_operator(model, xent64(), variable_indices=head, mode=mode)
    vs = v[: sum(int(np.prod(w.shape)) for w in block.variables)]
    hv, _, ref, _ = _flat_and_per_variable(block, x, y, vs)
    np.testing.assert_allclose(hv, ref, rtol=1e-12, atol=1e-15 * np.abs(ref).max())


def test_flat_matvec_equals_matvec_on_a_float32_model():
    model = _float32_mlp()
    x, y = mt.data(n=10)
    x = x.astype("float32")
    op = hessian_operator(model)
    n = sum(int(np.prod(w.shape)) for w in op.variables)
    v = np.random.default_rng(2).normal(size=n)
    hv, loss, ref, ref_loss = _flat_and_per_variable(op, x, y, v)  # float64 in, cast in the graph
    np.testing.assert_allclose(hv, ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())
    assert loss == ref_loss
    hv32, _ = op.flat_matvec(x, y, v.astype(np.float32))  # the variables' dtype: the same rounding
    np.testing.assert_allclose(hv32.numpy(), hv, rtol=1e-6, atol=1e-7 * np.abs(ref).max())
    with pytest.raises(ValueError, match=f"shape \\({n},\\)"):
        op.flat_matvec(x, y, v[:-1])


def test_model_hessian_equals_the_exact_hessian_and_returns_fresh_arrays():
    model = mt.mlp()
    x, y = mt.data(n=12)
    H = exact_hessian(model, x, y, xent64())
    mh = ModelHessian(model, x, y, loss=xent64())
    v = np.random.default_rng(3).normal(size=mh.n)
    out = mh(v)
    assert out.dtype == np.float64 and out.flags.writeable and mh.num_hvps == 1
    np.testing.assert_allclose(out, H @ v, rtol=1e-10, atol=1e-13)
    out[:] = 0.0  # the algorithms may work in place: the next product is unaffected
    np.testing.assert_allclose(mh(v), H @ v, rtol=1e-10, atol=1e-13)
    assert mh.loss == pytest.approx(float(xent64()(y, model(x))), rel=1e-12)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_probes_are_draw_probe_bit_for_bit(probe):
    for model in (mt.mlp(), _float32_mlp()):
        x, y = mt.data(n=6)
        for groups in (None, "head" if model.name == "mlp" else model.layers[-1].name):
            mh = ModelHessian(model, x.astype(model.inputs[0].dtype), y, loss=xent64(), groups=groups)
            draw = mh.probe_source(11, probe)
            for m in range(3):
                parts = draw_probe(mh.variables, probe_seed(11, m), probe, streams=mh.indices)
                expected = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])
                got = draw(m)
                assert got.dtype == np.float64 and got.flags.writeable
                np.testing.assert_array_equal(got, expected)


@pytest.mark.filterwarnings("ignore:top_eigenvalues")  # a few HVPs: unconverged on purpose
def test_no_retracing_after_a_warm_up():
    model = mt.cnn_bn()
    x, y = mt.data(n=8, shape=(6, 6, 2))
    kw = dict(loss=xent64(), seed=0)
    kh.hessian_trace(model, x, y, num_probes=3, rel_stderr=None, **kw)  # warm-up: traces product and probe
    kh.top_eigenvalues(model, x, y, k=1, max_iter=5, **kw)
    op = hessian_operator(model, xent64())
    count = op.tracing_count()
    assert count >= 2
    for seed in (1, 2):
        kh.hessian_trace(model, x, y, num_probes=4, rel_stderr=None, loss=xent64(), seed=seed)
        kh.hessian_trace(model, x, y, num_probes=4, rel_stderr=None, method="hutch++", loss=xent64(), seed=seed)
        kh.top_eigenvalues(model, x, y, k=2, max_iter=6, loss=xent64(), seed=seed)
        kh.spectral_density(model, x, y, lanczos_steps=4, num_runs=1, loss=xent64(), seed=seed)
        kh.diagonal(model, x, y, num_probes=2, loss=xent64(), seed=seed)
        x2, y2 = mt.data(seed=seed, n=8, shape=(6, 6, 2))  # another batch of the same shape
        kh.hessian_trace(model, x2, y2, num_probes=2, rel_stderr=None, loss=xent64(), seed=seed)
    assert op.tracing_count() == count


def test_dataset_mode_equals_the_product_on_the_concatenated_batch():
    model = mt.cnn_bn()
    x, y = mt.data(n=13, shape=(6, 6, 2))
    whole = ModelHessian(model, x, y, loss=xent64())
    v = np.random.default_rng(6).normal(size=whole.n)
    expected = whole(v)
    batches = [(x[:5], y[:5]), (x[5:9], y[5:9]), (x[9:], y[9:])]  # unequal: weighted by size
    for data in (batches, tf.data.Dataset.from_tensor_slices((x, y)).batch(5)):
        mh = ModelHessian(model, data, loss=xent64())
        np.testing.assert_allclose(mh(v), expected, rtol=1e-12, atol=1e-14 * np.abs(expected).max())
        assert mh.loss == pytest.approx(whole.loss, rel=1e-12) and mh.num_hvps == 1
    # num_batches: the first two batches only, i.e. the product on their 9 examples.
    part = ModelHessian(model, batches, loss=xent64(), num_batches=2)
    np.testing.assert_allclose(part(v), ModelHessian(model, x[:9], y[:9], loss=xent64())(v), rtol=1e-12,
                               atol=1e-14 * np.abs(expected).max())


_STRATEGY_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, {here!r})
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras_hesstrace as kh
    import models_for_tests as mt
    from reference import xent64
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = mt.cnn_bn()
    with strategy.scope():
        mirrored = mt.cnn_bn()
    mirrored.set_weights(single.get_weights())
    x, y = mt.data(n=13, shape=(6, 6, 2))  # uneven shards 6 + 7
    a = kh.hessian_trace(single, x, y, num_probes=3, rel_stderr=None, loss=xent64(), seed=2)
    b = kh.hessian_trace(mirrored, x, y, num_probes=3, rel_stderr=None, loss=xent64(), seed=2)
    op = kh.hessian_operator(mirrored, xent64())
    print("RESULT " + json.dumps({{"distributed": op.strategy is not None,
          "rel": float(np.max(np.abs(b.samples - a.samples)) / np.max(np.abs(a.samples)))}}))
""")


def test_flat_matvec_under_a_mirrored_strategy_equals_one_device():
    proc = subprocess.run([sys.executable, "-c", _STRATEGY_SCRIPT.format(here=HERE)], capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(HERE), env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    assert out["distributed"] is True and out["rel"] < 1e-10
