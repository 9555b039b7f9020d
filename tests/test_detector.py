"""The Page-Hinkley recursion (docs/method.md §7), its baseline, and its state."""

import json
import math
import warnings

import numpy as np
import pytest

from keras_hesstrace.monitor import (
    Baseline,
    PageHinkley,
    page_hinkley_statistics,
    run_lengths,
)


def reference(zs, delta, h):
    """Straightforward reading of docs/method.md §7.1: lists of g+, g- and the first alert (1-based)."""
    gp, gn, gps, gns, first = 0.0, 0.0, [], [], None
    for t, z in enumerate(zs, start=1):
        gp = max(0.0, gp + z - delta)
        gn = max(0.0, gn - z - delta)
        gps.append(gp)
        gns.append(gn)
        if first is None and max(gp, gn) > h:
            first = t
    return gps, gns, first


def test_hand_computed_upward():
    # delta 0.5, h 2: g+ = 0.5, 1.5, 0.8, 2.3 (> 2: alert at the 4th snapshot); g- stays 0.
    ph = PageHinkley(delta=0.5, threshold=2.0)
    res = [ph.update(z, step=10 * i) for i, z in enumerate([1.0, 1.5, -0.2, 2.0, -5.0])]
    assert [r.g_pos for r in res[:4]] == pytest.approx([0.5, 1.5, 0.8, 2.3])
    assert [r.g_neg for r in res[:4]] == [0.0, 0.0, 0.0, 0.0]
    assert [r.alert for r in res] == [False, False, False, True, True]
    assert [r.first_alert for r in res] == [False, False, False, True, False]
    # z = -5 after the alert: g+ = max(0, 2.3 - 5 - 0.5) = 0, g- = 4.5: alert again, not first.
    assert res[4].g_pos == 0.0 and res[4].g_neg == pytest.approx(4.5)
    assert ph.alert_index == 3 and ph.alert_step == 30 and ph.alerted


def test_hand_computed_downward_and_equality_is_not_an_alert():
    # delta 0.5, h 3: g- = 2.5, 2.0, 2.5, 3.5 -> alert at index 3.
    ph = PageHinkley(delta=0.5, threshold=3.0)
    res = [ph.update(z) for z in [-3.0, 0.0, -1.0, -1.5]]
    assert [r.g_neg for r in res] == pytest.approx([2.5, 2.0, 2.5, 3.5])
    assert [r.g_pos for r in res] == [0.0] * 4
    assert [r.alert for r in res] == [False, False, False, True]
    # The rule is strict: statistic == h is not an alert.
    ph = PageHinkley(delta=0.0, threshold=2.0)
    assert not ph.update(2.0).alert
    assert ph.update(1e-9).alert


def test_standardised_with_the_baseline_at_each_snapshot():
    base = Baseline([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 0.5, 1.0])
    ph = PageHinkley(delta=0.5, threshold=2.0, baseline=base)
    res = [ph.update(x) for x in [2.0, 5.0, 2.9, 6.3]]
    # z = (x - mu_t) / sigma_t = 1.0, 1.5, -0.2, 2.3 -> g+ = 0.5, 1.5, 0.8, 2.6
    assert [r.z for r in res] == pytest.approx([1.0, 1.5, -0.2, 2.3])
    assert [r.g_pos for r in res] == pytest.approx([0.5, 1.5, 0.8, 2.6])
    assert [r.alert for r in res] == [False, False, False, True]
    assert [r.index for r in res] == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_on_random_sequences(seed):
    rng = np.random.default_rng(seed)
    delta, h = [(0.5, 4.0), (0.25, 3.0), (1.0, 2.0), (0.0, 6.0), (0.5, 1.0)][seed]
    z = rng.normal(0.3 * (seed - 2), 1.5, size=300)
    gps, gns, first = reference(z.tolist(), delta, h)
    ph = PageHinkley(delta=delta, threshold=h)
    res = [ph.update(v, step=i) for i, v in enumerate(z)]
    np.testing.assert_allclose([r.g_pos for r in res], gps, rtol=0, atol=1e-12)
    np.testing.assert_allclose([r.g_neg for r in res], gns, rtol=0, atol=1e-12)
    assert first is not None
    assert ph.alert_index + 1 == first and ph.alert_step == first - 1
    assert [r.index for r in res if r.first_alert] == [first - 1]
    # Vectorised forms agree with the reference too.
    vp, vn = page_hinkley_statistics(z, delta)
    np.testing.assert_allclose(vp, gps, atol=1e-9)
    np.testing.assert_allclose(vn, gns, atol=1e-9)
    assert run_lengths(z, h, delta) == first


def test_run_lengths_many_and_censored():
    rng = np.random.default_rng(7)
    z = rng.normal(size=(50, 40))
    rl = run_lengths(z, 3.0, 0.5)
    for row, got in zip(z, rl):
        first = reference(row.tolist(), 0.5, 3.0)[2]
        assert (math.isnan(got) and first is None) or got == first
    assert np.isnan(rl).any() and not np.isnan(rl).all()


def test_reset_and_result_fields():
    ph = PageHinkley(threshold=1.0)
    ph.update(3.0)
    assert ph.alerted
    ph.reset()
    assert (ph.n_updates, ph.g_pos, ph.g_neg, ph.alert_index) == (0, 0.0, 0.0, None)
    r = ph.update(0.2, step=5)
    assert r.statistic == max(r.g_pos, r.g_neg) and r.step == 5 and r.value == 0.2


def test_non_finite_and_bad_values_raise_and_leave_state_unchanged():
    ph = PageHinkley(threshold=5.0)
    ph.update(1.0)
    before = ph.get_state()
    for bad in (float("nan"), float("inf"), -np.inf):
        with pytest.raises(ValueError, match="non-finite"):
            ph.update(bad)
    with pytest.raises(TypeError):
        ph.update("1.0x")
    with pytest.raises(TypeError):
        ph.update(True)
    assert ph.get_state() == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=None), "threshold is required"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=float("inf")), "threshold"),
    (dict(threshold=1.0, delta=-0.1), "delta"),
    (dict(threshold=1.0, transform="sqrt"), "transform"),
    (dict(threshold=1.0, overrun="wrap"), "overrun"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PageHinkley(**kwargs)


def test_overrun_error_by_default_and_hold_on_request():
    base = Baseline([0.0, 1.0], [1.0, 2.0], group="head")
    ph = PageHinkley(threshold=100.0, baseline=base)
    ph.update(0.0)
    ph.update(1.0)
    with pytest.raises(ValueError, match=r"Snapshot 2 is past the baseline's last snapshot 1 "
                                         r"of group 'head'"):
        ph.update(1.0)
    assert ph.n_updates == 2
    ph = PageHinkley(threshold=100.0, baseline=base, overrun="hold")
    ph.update(0.0)
    ph.update(1.0)
    with pytest.warns(UserWarning, match="holding"):
        r = ph.update(5.0)
    assert r.z == pytest.approx((5.0 - 1.0) / 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warns once only
        ph.update(5.0)


def test_log_transform():
    runs = np.array([[1.0, 10.0], [2.0, 100.0], [4.0, 1000.0]])
    base = Baseline.from_runs(runs, transform="log")
    logs = Baseline.from_runs(np.log(runs))
    np.testing.assert_allclose(base.mean, logs.mean)
    np.testing.assert_allclose(base.std, logs.std)
    ph = PageHinkley(threshold=10.0, baseline=base)
    assert ph.transform == "log"
    r = ph.update(3.0)
    assert r.z == pytest.approx((math.log(3.0) - logs.mean[0]) / logs.std[0])
    with pytest.raises(ValueError, match=r"transform='log' needs every value > 0"):
        ph.update(-0.1)
    with pytest.raises(ValueError, match="differs from the baseline"):
        PageHinkley(threshold=1.0, baseline=Baseline.from_runs(runs), transform="log")
    with pytest.raises(ValueError, match="> 0"):
        Baseline.from_runs([[1.0, 2.0], [0.0, 1.0]], transform="log")
    # Without a baseline the transformed value is z itself.
    assert PageHinkley(threshold=1.0, transform="log").update(math.e).z == pytest.approx(1.0)


def test_state_round_trips_through_json_mid_run():
    rng = np.random.default_rng(3)
    base = Baseline.from_runs(rng.normal(size=(5, 60)), group="head")
    values = rng.normal(0.8, 1.0, size=60)
    full = PageHinkley(threshold=3.0, baseline=base)
    expected = [full.update(v, step=int(i)) for i, v in enumerate(values)]
    first = PageHinkley(threshold=3.0, baseline=base)
    got = [first.update(v, step=int(i)) for i, v in enumerate(values[:25])]
    state = json.loads(json.dumps(first.get_state()))
    resumed = PageHinkley.from_state(state)
    assert resumed.baseline == base
    got += [resumed.update(v, step=int(i) + 25) for i, v in enumerate(values[25:])]
    assert got == expected
    assert resumed.alert_index == full.alert_index and resumed.alert_step == full.alert_step


def test_baseline_from_runs_unequal_lengths():
    runs = [[1.0, 2.0, 3.0], [3.0, 4.0], [2.0, 6.0, 5.0]]
    base = Baseline.from_runs(runs)
    np.testing.assert_allclose(base.mean, [2.0, 4.0, 4.0])
    np.testing.assert_allclose(base.std, [1.0, 2.0, math.sqrt(2.0)])
    assert base.n_runs.tolist() == [3, 3, 2]
    padded = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, np.nan], [2.0, 6.0, 5.0]])
    assert Baseline.from_runs(padded) == base
    np.testing.assert_allclose(base.standardize([4.0, 4.0], start=1), [0.0, 0.0])


def test_baseline_errors():
    with pytest.raises(ValueError, match=r"Snapshot 2 .* reached by 1 clean run"):
        Baseline.from_runs([[1.0, 2.0, 3.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match="at least two clean runs"):
        Baseline.from_runs([[1.0, 2.0]])
    with pytest.raises(ValueError, match="standard deviation is 0.0 at snapshot"):
        Baseline.from_runs([[1.0, 2.0], [1.0, 3.0]])
    with pytest.raises(ValueError, match="non-finite value inf at snapshot 1"):
        Baseline.from_runs([[1.0, np.inf], [1.0, 3.0]])
    with pytest.raises(ValueError, match="non-finite value nan at snapshot 0"):
        Baseline.from_runs([[np.nan, 2.0], [1.0, 3.0]])
    with pytest.raises(ValueError, match="one 1-D array"):
        Baseline.from_runs(np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="past the baseline"):
        Baseline([0.0], [1.0]).standardize([1.0, 2.0])


def test_skip_advances_the_snapshot_index_and_leaves_g_unchanged():
    # Baseline means 0, 10, 20, 30: after skipping snapshot 1, the value 21 is
    # standardised with snapshot 2's mean (z = 1), not snapshot 1's (z = 11).
    base = Baseline([0.0, 10.0, 20.0, 30.0], [1.0, 1.0, 1.0, 1.0])
    ph = PageHinkley(delta=0.5, threshold=3.0, baseline=base)
    r0 = ph.update(2.0, step=0)                      # z 2: g+ 1.5
    s = ph.skip(step=5, value=float("nan"))
    assert (s.index, s.step, s.g_pos, s.g_neg, s.alert, s.first_alert) == (1, 5, 1.5, 0.0, False, False)
    assert math.isnan(s.z) and math.isnan(s.value)
    assert ph.n_updates == 2 and ph.g_pos == r0.g_pos and ph.last_step == 5
    r2 = ph.update(21.0, step=10)
    assert (r2.index, r2.z, r2.g_pos) == (2, 1.0, 2.0)
    r3 = ph.update(32.0, step=15)                    # z 2: g+ 3.5 > 3
    assert r3.first_alert and ph.alert_index == 3
    s = ph.skip(step=20)                             # still above h: alert, not first
    assert s.alert and not s.first_alert and s.statistic == 3.5
    ph.skip(step=25)                                 # past the baseline: no error
    assert ph.n_updates == 6
    # The reference recursion on the usable values, each at its own snapshot index.
    z = [2.0, 1.0, 2.0]
    gps, _, first = reference(z, 0.5, 3.0)
    assert gps[-1] == ph.g_pos and first == 3
    # usable(): what update() would accept.
    assert ph.usable(1.0) and ph.usable(-1.0) and not ph.usable(float("nan"))
    log_ph = PageHinkley(threshold=3.0, transform="log")
    assert log_ph.usable(0.1) and not log_ph.usable(0.0) and not log_ph.usable(-1.0)
    state = json.loads(json.dumps(ph.get_state()))
    assert PageHinkley.from_state(state).get_state() == ph.get_state()


# ------------------------------------------------------------- reference snapshot


def test_reference_baseline_is_the_baseline_of_the_runs_minus_their_own_value():
    rng = np.random.default_rng(11)
    runs = [rng.lognormal(size=9) for _ in range(4)] + [rng.lognormal(size=7)]
    base = Baseline.from_runs(runs, transform="log", reference=2, group="total")
    # By hand: log, minus the run's own log value at snapshot 2, snapshots 3.. only.
    manual = Baseline.from_runs([np.log(r[3:]) - np.log(r[2]) for r in runs])
    assert base.reference == 2 and base.first_scored == 3 and len(base) == 9
    assert np.all(np.isnan(base.mean[:3])) and np.all(np.isnan(base.std[:3]))
    np.testing.assert_allclose(base.mean[3:], manual.mean, rtol=1e-14)
    np.testing.assert_allclose(base.std[3:], manual.std, rtol=1e-14)
    assert base.n_runs.tolist() == [5] * 7 + [4, 4]
    # Standardising a whole run, or its tail with the reference value passed.
    new = rng.lognormal(size=9)
    z = base.standardize(new)
    expected = (np.log(new[3:]) - np.log(new[2]) - manual.mean) / manual.std
    assert np.all(np.isnan(z[:3]))
    np.testing.assert_allclose(z[3:], expected, rtol=1e-12)
    np.testing.assert_allclose(base.standardize(new[5:], start=5, reference_value=new[2]),
                               expected[2:], rtol=1e-12)
    with pytest.raises(ValueError, match="pass reference_value"):
        base.standardize(new[5:], start=5)
    # JSON round trip (NaN entries written as null: the file stays strict JSON).
    text = json.dumps(base.to_dict(), allow_nan=False)
    assert Baseline.from_dict(json.loads(text)) == base
    assert Baseline.from_runs(runs, transform="log", reference=1) != base
    assert "reference=2" in repr(base)


def test_reference_errors():
    runs = [[1.0, 2.0, 3.0], [1.5, 2.5, 4.0], [2.0, 2.2, 3.3]]
    with pytest.raises(ValueError, match=r"run 0 has 3 snapshot\(s\); with reference=2"):
        Baseline.from_runs(runs, reference=2)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"reference must be None \(no reference\) or an integer >= 0"):
            Baseline.from_runs(runs, reference=bad)
    with pytest.raises(ValueError, match="leaves no scored snapshot"):
        Baseline([0.0, 1.0], [1.0, 1.0], reference=1)
    base = Baseline.from_runs(runs, reference=0)
    with pytest.raises(ValueError, match="differs from the baseline's 0"):
        PageHinkley(threshold=1.0, baseline=base, reference=1)
    assert PageHinkley(threshold=1.0, baseline=base, reference=0).reference == 0


def test_detector_with_a_reference_scores_each_run_against_itself():
    rng = np.random.default_rng(5)
    clean = rng.lognormal(mean=np.linspace(3, 1, 30), sigma=0.3, size=(8, 30))
    base = Baseline.from_runs(clean, transform="log", reference=4)
    run = rng.lognormal(mean=np.linspace(3, 2, 30), sigma=0.3)
    ph = PageHinkley(delta=0.5, threshold=4.0, baseline=base)
    res = [ph.update(v, step=10 * i) for i, v in enumerate(run)]
    # Snapshots 0..4 are not scored: z NaN, g+ = g- = 0, no alert.
    assert all(math.isnan(r.z) and r.g_pos == r.g_neg == 0.0 and not r.alert for r in res[:5])
    assert ph.reference_value == pytest.approx(math.log(run[4]))
    z = (np.log(run[5:]) - np.log(run[4]) - base.mean[5:]) / base.std[5:]
    np.testing.assert_allclose([r.z for r in res[5:]], z, rtol=1e-12)
    gps, gns, first = reference(z.tolist(), 0.5, 4.0)
    np.testing.assert_allclose([r.g_pos for r in res[5:]], gps, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose([r.g_neg for r in res[5:]], gns, rtol=1e-12, atol=1e-12)
    assert first is not None and ph.alert_index == 4 + first
    assert [r.index for r in res] == list(range(30))
    # Mid-run state through JSON keeps the reference value.
    half = PageHinkley(delta=0.5, threshold=4.0, baseline=base)
    got = [half.update(v, step=10 * i) for i, v in enumerate(run[:12])]
    resumed = PageHinkley.from_state(json.loads(json.dumps(half.get_state())))
    got += [resumed.update(v, step=10 * (i + 12)) for i, v in enumerate(run[12:])]
    assert [(r.z, r.g_pos, r.g_neg) for r in got[5:]] == [(r.z, r.g_pos, r.g_neg) for r in res[5:]]
    # Without a baseline: z is the change since the reference snapshot itself.
    bare = PageHinkley(threshold=100.0, transform="log", reference=1)
    assert math.isnan(bare.update(2.0).z) and math.isnan(bare.update(4.0).z)
    assert bare.update(8.0 * math.e).z == pytest.approx(math.log(2.0 * math.e))


def test_a_skipped_reference_snapshot_leaves_nothing_to_score():
    base = Baseline.from_runs([[1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 2.0, 5.0], [2.0, 1.0, 3.3, 1.0]],
                              reference=1)
    ph = PageHinkley(threshold=3.0, baseline=base)
    ph.update(1.0)
    assert ph.usable(5.0) and not ph.reference_missing
    ph.skip(step=1)                                   # the reference snapshot is unusable
    assert ph.reference_missing and not ph.usable(5.0)
    before = ph.get_state()
    with pytest.raises(ValueError, match="reference snapshot 1 had no usable value"):
        ph.update(5.0)
    assert ph.get_state() == before                  # unchanged when it raises
    ph.reset()
    assert not ph.reference_missing and ph.reference_value is None


def test_skip_takes_value_then_step_as_update_does():
    ph = PageHinkley(delta=0.5, threshold=4.0)
    r = ph.skip(-1.0, step=7)
    assert (r.value, r.step, r.index) == (-1.0, 7, 0)
    with pytest.raises(TypeError):
        ph.skip(8, -1.0)  # the former order skip(step, value)
