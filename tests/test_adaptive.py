"""layer_traces(rel_stderr=r): the stopping rule (keras_hesstrace/linalg/adaptive.py), simulated on
exact Hutchinson samples of a known matrix, and run on a float64 model with its exact Hessian."""

import warnings

import numpy as np
import pytest

import keras_hesstrace as kh
import models_for_tests as mt
from keras_hesstrace.linalg.adaptive import next_probe_count, probes_needed, run_until_met, target_met
from keras_hesstrace.hvp import hessian_operator
from reference import xent64
from test_trace import _exact_block_traces

# ------------------------------------------------------------------ (a) the rule in numpy

SIZES = [4, 8, 12]
EDGES = np.cumsum([0] + SIZES)


def _matrix(seed=17):
    """A symmetric 24 x 24 H, diagonal-dominant (positive block traces), three blocks."""
    rng = np.random.default_rng(seed)
    n = EDGES[-1]
    s = rng.normal(size=(n, n))
    return np.diag(rng.uniform(0.5, 1.5, n)) + 0.35 * (s + s.T) / 2


def _contractions(H, V):
    """[M, 4]: v_l^T (H v)_l for the three blocks, then v^T H v, for probes V [M, n]."""
    HV = V @ H
    blocks = [(V[:, a:b] * HV[:, a:b]).sum(1) for a, b in zip(EDGES[:-1], EDGES[1:])]
    return np.column_stack(blocks + [(V * HV).sum(1)])


def simulate(r, reps=500, pilot=10, max_probes=1000):
    """Run the rule ``reps`` times on exact Rademacher samples: (exact [4], est, se [reps, 4], M [reps])."""
    H = _matrix()
    exact = np.array([np.trace(H[a:b, a:b]) for a, b in zip(EDGES[:-1], EDGES[1:])] + [np.trace(H)])
    est, se, used = [], [], []
    for k in range(reps):
        rng = np.random.default_rng([k, int(round(1000 * r))])
        s = run_until_met(lambda a, b: _contractions(H, rng.choice([-1.0, 1.0], size=(b - a, EDGES[-1]))),
                          pilot, r, max_probes)
        est.append(s.mean(0))
        se.append(s.std(0, ddof=1) / np.sqrt(len(s)))
        used.append(len(s))
        assert np.all(target_met(s, r)) or len(s) == max_probes
    return exact, np.array(est), np.array(se), np.array(used)


@pytest.mark.parametrize("r", [0.05, 0.1])
def test_the_rule_achieves_the_relative_error_and_coverage_it_reports(r):
    reps = 500
    exact, est, se, used = simulate(r, reps)
    assert used.min() >= 10 and used.max() < 1000  # every replication stopped on the target
    assert np.all(se <= r * np.abs(est) * (1 + 1e-12))
    # RMS relative error over replications: at most r, up to the sampling error of an RMS
    # estimated from `reps` replications (relative sd about 1/sqrt(2 reps)).
    rms = np.sqrt(np.mean(((est - exact) / exact) ** 2, axis=0))
    assert np.all(rms <= r * (1 + 3 / np.sqrt(2 * reps))), rms
    # Coverage of the reported 95% interval, within 3 binomial standard deviations.
    cover = np.mean(np.abs(est - exact) <= 1.96 * se, axis=0)
    assert np.all(np.abs(cover - 0.95) <= 3 * np.sqrt(0.95 * 0.05 / reps)), cover
    # Bias of the sequential rule: the replication mean within 4 of its standard errors.
    z = (est.mean(0) - exact) / (est.std(0, ddof=1) / np.sqrt(reps))
    assert np.all(np.abs(z) < 4), z


def test_probes_needed_and_next_probe_count():
    rng = np.random.default_rng(0)
    s = 2.0 + rng.normal(size=(50, 3)) * np.array([0.1, 1.0, 3.0])
    need = probes_needed(s, 0.1)
    expected = max(int(np.ceil(s[:, k].var(ddof=1) / (0.1 * s[:, k].mean()) ** 2)) for k in range(3))
    assert need == expected
    assert probes_needed(s, 0.1, cap=100) == min(need, 100)
    # At the needed count (same variance and mean) every column meets the target.
    more = np.concatenate([s] * (-(-need // 50)))
    assert np.all(target_met(more, 0.1 * (1 + 1e-12)))
    assert next_probe_count(s, 0.1, max_probes=1000, multiple=4) == -(-max(need, 55) // 4) * 4
    assert next_probe_count(s[:, :1], 0.1, max_probes=1000) == 50  # met: stop
    zero = np.array([[1.0], [-1.0], [1.0], [-1.0]])
    assert probes_needed(zero, 0.1, cap=77) == 77 and not target_met(zero, 0.1)[0]
    nan = np.array([[1.0], [np.nan]])
    assert next_probe_count(nan, 0.1, max_probes=1000) == 2  # a NaN stops the run


# ------------------------------------------------------------- (b) layer_traces on a model

def test_layer_traces_meets_the_target_on_the_requested_groups_and_is_a_prefix():
    model = mt.mlp()
    x, y = mt.data()
    _, exact, mapping = _exact_block_traces(model, x, y)
    chosen = ["hidden2", "head"]  # "hidden" (trace near 0.15, noisy) would need ~5000 probes
    r = kh.layer_traces(model, x, y, num_probes=10, seed=3, loss=xent64(), groups=chosen,
                        rel_stderr=0.1, max_probes=1000)
    assert r.rel_stderr_target == 0.1 and r.total_target_met
    assert r.target_met.tolist() == [True, True]
    assert np.all(r.rel_stderr <= 0.1) and abs(r.total_stderr / r.total) <= 0.1
    assert 10 < r.num_probes <= 1000
    pos = [list(mapping).index(g) for g in chosen]
    assert np.all(np.abs(r.trace - exact[pos]) < 4 * r.stderr), (r.trace, exact[pos], r.stderr)
    plain = kh.layer_traces(model, x, y, num_probes=10, seed=3, loss=xent64(), groups=chosen)
    np.testing.assert_array_equal(r.samples[:10], plain.samples)
    np.testing.assert_array_equal(r.total_samples[:10], plain.total_samples)
    longer = kh.layer_traces(model, x, y, num_probes=r.num_probes + 3, seed=3, loss=xent64(), groups=chosen)
    np.testing.assert_array_equal(r.samples, longer.samples[: r.num_probes])
    frame = r.to_frame()
    assert list(frame.columns)[-2:] == ["rel_stderr_target", "target_met"]
    assert frame["target_met"].tolist() == [True, True]
    assert "target rel_stderr 0.1: met by every group and the total" in str(r)
    assert "rel_stderr_target" not in plain.to_frame().columns and plain.target_met is None


def test_max_probes_too_small_reports_the_groups_that_missed_with_a_warning():
    model = mt.mlp()
    x, y = mt.data()
    with pytest.warns(RuntimeWarning, match=r"rel_stderr=0.1 not met after max_probes=40 probes by: hidden\b"):
        r = kh.layer_traces(model, x, y, num_probes=10, seed=3, loss=xent64(), rel_stderr=0.1, max_probes=40)
    assert r.num_probes == 40
    assert r.target_met.tolist() == list(r.rel_stderr <= 0.1)
    assert not r.target_met[0]  # "hidden": relative stderr about 0.2 even at 1000 probes
    assert "NOT met by hidden" in str(r)
    assert r.to_frame()["target_met"].tolist() == r.target_met.tolist()


def test_the_dataset_mode_repeats_passes_and_refuses_data_that_cannot_repeat():
    model = mt.mlp()
    x, y = mt.data(n=20)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    kwargs = dict(seed=5, loss=xent64(), groups=["hidden2", "head"], verbose=0)
    r = kh.layer_traces(model, batches, num_probes=10, rel_stderr=0.15, **kwargs)
    plain = kh.layer_traces(model, batches, num_probes=r.num_probes, **kwargs)
    np.testing.assert_allclose(r.samples, plain.samples, rtol=1e-12)
    assert r.num_batches == 3 and r.num_probes > 10 and np.all(r.target_met)
    with pytest.raises(ValueError, match="iterated again"):
        kh.layer_traces(model, iter(batches), num_probes=10, rel_stderr=0.15, **kwargs)

    class OtherBatchesEachPass:
        passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(batches[:2] if self.passes == 1 else batches[1:])

    with pytest.raises(ValueError, match="other batches on another pass"):
        kh.layer_traces(model, OtherBatchesEachPass(), num_probes=10, rel_stderr=0.05, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rel_stderr=0), r"rel_stderr must be None \(a fixed num_probes\) or a number in \(0, 1\), got 0\."),
    (dict(rel_stderr=1.5), r"rel_stderr must be .* got 1\.5\."),
    (dict(rel_stderr="a"), r"rel_stderr must be .* got 'a'\."),
    (dict(rel_stderr=True), r"rel_stderr must be .* got True\."),
    (dict(rel_stderr=0.1, max_probes=5), r"max_probes must be an integer >= 10, got 5\."),
    (dict(rel_stderr=0.1, max_probes=20.5), r"max_probes must be an integer >= 10, got 20\.5\."),
    (dict(rel_stderr=0.1, num_probes=1), r"num_probes \(the pilot with rel_stderr\) must be an integer >= 2"),
    (dict(max_probes=100), r"max_probes is used only with rel_stderr"),
])
def test_bad_targets_are_refused_by_name_before_any_compute(kwargs, message, no_compute):
    model = mt.mlp()
    x, y = mt.data()
    with pytest.raises(ValueError, match=message):
        kh.layer_traces(model, x, y, loss=xent64(), **kwargs)


# ---------------------------------------------------------------------- (c) no retracing

def test_rounds_reuse_the_compiled_probe_function():
    model = mt.mlp()
    x, y = mt.data(n=16)
    name = "sparse_categorical_crossentropy"
    for per_call in (1, 4):
        kh.layer_traces(model, x, y, num_probes=8, seed=0, loss=name, groups=["hidden2", "head"],
                        probes_per_call=per_call)  # warm-up: the same groups (part of the function's key)
        op = hessian_operator(model, name)
        count = op.tracing_count()
        for seed in range(2):
            r = kh.layer_traces(model, x, y, num_probes=8, seed=seed, loss=name, groups=["hidden2", "head"],
                                rel_stderr=0.25, probes_per_call=per_call)
            assert np.all(r.target_met) and r.num_probes > 8 and r.num_probes % per_call == 0  # several rounds, whole calls
        assert op.tracing_count() == count


def test_a_non_finite_pilot_stops_at_once_and_is_flagged():
    model = mt.mlp()
    x, y = mt.data()
    x = x.copy()
    x[0, 0] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = kh.layer_traces(model, x, y, num_probes=4, seed=0, loss=xent64(), rel_stderr=0.1)
    messages = [str(w.message) for w in caught]
    assert any("Non-finite" in m for m in messages) and not any("not met" in m for m in messages)
    assert r.num_probes == 4 and not r.finite and not np.any(r.target_met)


# ------------------------------------------ (d) the same target for hessian_trace and diagonal

def test_hessian_trace_meets_a_relative_target_with_the_rule_of_layer_traces():
    model = mt.mlp()
    x, y = mt.data()
    H, _, _ = _exact_block_traces(model, x, y)
    r = kh.hessian_trace(model, x, y, num_probes=10, rel_stderr=0.05, max_probes=2000, loss=xent64(), seed=3)
    assert r.converged and r.stderr <= 0.05 * abs(r.trace) and 10 < r.num_hvps < 2000
    assert abs(r.trace - np.trace(H)) < 4 * r.stderr
    # the run is a prefix of layer_traces' probes: the same seed gives the same samples
    plain = kh.layer_traces(model, x, y, num_probes=r.num_hvps, seed=3, loss=xent64())
    np.testing.assert_allclose(r.samples, plain.total_samples, rtol=1e-12)
    fixed = kh.hessian_trace(model, x, y, num_probes=7, rel_stderr=None, loss=xent64(), seed=3)
    assert fixed.num_hvps == 7 and not fixed.converged
    with pytest.warns(DeprecationWarning, match="max_probes"):
        old = kh.hessian_trace(model, x, y, max_iter=7, tol=0.0, loss=xent64(), seed=3)
    np.testing.assert_array_equal(old.samples, fixed.samples)


def test_diagonal_meets_a_relative_target_per_group():
    model = mt.mlp()
    x, y = mt.data()
    H, _, mapping = _exact_block_traces(model, x, y)
    d = kh.diagonal(model, x, y, num_probes=10, rel_stderr=0.3, max_probes=5000, loss=xent64(), seed=2,
                    groups=["hidden2", "head"])
    assert d.num_probes > 10 and d.rel_stderr_target == 0.3
    assert d.target_met.tolist() == [True, True] and np.all(d.rel_stderr <= 0.3)
    frame = d.to_frame()
    assert frame["target_met"].tolist() == [True, True] and "rel_stderr" in frame.columns
    exact = np.diag(H)
    values, errors = d.flat()
    sizes = [sum(int(np.prod(v.shape)) for v in vs) for vs in mapping.values()]
    start = sum(sizes[:1])  # hidden2 and head follow hidden in the flat order
    z = (values - exact[start:start + values.size]) / errors
    assert np.mean(np.abs(z) < 1.96) > 0.8, z   # most entries inside their 95% interval
    plain = kh.diagonal(model, x, y, num_probes=d.num_probes, loss=xent64(), seed=2, groups=["hidden2", "head"])
    np.testing.assert_allclose(values, plain.flat()[0], rtol=1e-12)   # the same probes, one more round each


def test_the_diagonal_rule_gives_the_relative_error_it_reports():
    from keras_hesstrace.linalg.hutchinson import hutchinson_diagonal

    rng = np.random.default_rng(3)
    s = rng.normal(size=(30, 30))
    A = np.diag(rng.uniform(1.0, 2.0, 30)) + 0.3 * (s + s.T) / 2
    blocks = [[(0, 10)], [(10, 30)]]
    r, reps, errors = 0.1, 300, []
    for rep in range(reps):
        mean, err, used = hutchinson_diagonal(lambda v: A @ v, 30, num_probes=10, seed=rep, rel_stderr=r,
                                              max_probes=5000, blocks=blocks)
        assert used < 5000
        errors.append([np.linalg.norm(mean[a:b] - np.diag(A)[a:b]) / np.linalg.norm(np.diag(A)[a:b])
                       for (a, b), in blocks])
    rms = np.sqrt(np.mean(np.square(errors), axis=0))
    # the reported target bounds the RMS relative error (in the 2-norm) up to the sampling
    # error of an RMS over `reps` replications and the sequential stop's small excess
    assert np.all(rms <= r * (1 + 3 / np.sqrt(2 * reps))) and np.all(rms >= 0.7 * r), rms


def test_the_diagonal_rule_runs_a_block_with_a_zero_diagonal_to_max_probes():
    """A block whose diagonal estimate is exactly 0 can never meet a relative target: it
    runs to max_probes (it used to raise OverflowError from ceil(inf))."""
    from keras_hesstrace.linalg.hutchinson import hutchinson_diagonal

    A = np.zeros((20, 20))
    A[10:, 10:] = np.diag(np.arange(1.0, 11.0))
    mean, err, used = hutchinson_diagonal(lambda v: A @ v, 20, num_probes=4, seed=0, rel_stderr=0.1, max_probes=12,
                                          blocks=[[(0, 10)], [(10, 20)]])
    assert used == 12 and np.all(mean[:10] == 0) and np.allclose(mean[10:], np.arange(1.0, 11.0))
