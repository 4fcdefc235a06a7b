"""A sample weight of 0 leaves the value out of the Smoother's EMA as a skipped value is (round
10's known limits, fixed with the device code's next build): before, the debiased EMA decayed its
sums at every weight-0 update (into float64's subnormals after ~7,000 at span 20, then NaN), a NaN
of weight 0 made the EMA NaN under ``propagate``, and the seeded and zeros EMAs took a weight-0
value as a step (the seeded one as its seed). The window still counts the update as a place
(pandas' ``rolling``)."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastema.smooth import Smoother

VALUES = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([math.nan, math.inf, -math.inf]))
WEIGHTS = st.sampled_from([0.0, 0.0, 1.0, 2.0, 3.0])
STEPS = st.lists(st.tuples(VALUES, WEIGHTS), min_size=1, max_size=40)


def ema_of(smoother, steps, per_stream):
    """The EMA after each of ``steps`` ``(value, weight)``: one stream with a scalar weight, or (per
    stream) two streams, the second always of weight 1."""
    out = []
    for v, w in steps:
        if per_stream:
            smoother.update(np.array([v, 1.0]), sample_weight=np.array([w, 1.0]))
            out.append(float(smoother.ema[0]))
        else:
            smoother.update(np.array([v]), sample_weight=w)
            out.append(float(smoother.ema[0]))
    return out


@given(steps=STEPS, mode=st.sampled_from(["debiased", "seeded", "zeros"]), skip=st.booleans(),
       per_stream=st.booleans())
def test_an_update_of_weight_0_leaves_the_ema_as_it_was(steps, mode, skip, per_stream):
    """Bit for bit the EMA of the same smoother fed only the updates of a positive weight; the
    seeded and zeros EMAs read those as one step each (their unweighted EMA's bits)."""
    kw = dict(alpha=0.3, mode=mode, window=3, nonfinite="skip" if skip else "propagate")
    got = ema_of(Smoother(**kw), steps, per_stream)
    ref, want, last = Smoother(**kw), [], None
    for v, w in steps:
        if w > 0:
            ref.update(np.array([v]), sample_weight=w if mode == "debiased" else None)
            last = float(ref.ema[0])
        want.append(last)
    for i, (g, x) in enumerate(zip(got, want)):
        if x is None:                          # nothing kept yet: what a smoother reads first
            assert (g == 0.0) if mode == "zeros" else math.isnan(g), (i, g)
        else:
            assert g == x or (math.isnan(g) and math.isnan(x)), (i, g, x)


def test_the_debiased_ema_equals_the_naive_weighted_mean_over_the_values_of_positive_weight():
    rng = np.random.default_rng(3)
    ys = rng.standard_normal(60)
    ws = rng.integers(0, 3, 60).astype(float)
    d = 0.8
    s = Smoother(decay=d)
    for t in range(60):
        s.update(np.array([ys[t]]), sample_weight=ws[t])
        kept = [(y, w) for y, w in zip(ys[:t + 1], ws[:t + 1]) if w > 0]
        if not kept:
            continue
        age = np.arange(len(kept) - 1, -1, -1, dtype=np.float64)
        pw = d ** age * np.array([w for _, w in kept])
        want = float((pw * np.array([y for y, _ in kept])).sum() / pw.sum())
        assert float(s.ema[0]) == pytest.approx(want, rel=1e-12), t


def test_twenty_thousand_updates_of_weight_0_leave_the_debiased_ema_readable():
    # before: the sums decayed at each one (0.905 a step at span 20) into subnormals, then to 0: NaN
    s = Smoother(span=20, window=4)
    s.update(np.array([2.0, 5.0]), sample_weight=np.array([1.0, 3.0]))
    s.update(np.array([4.0, 7.0]), sample_weight=np.array([1.0, 1.0]))
    before = s.ema.copy()
    for _ in range(20_000):
        s.update(np.array([1e6, -1e6]), sample_weight=np.array([0.0, 0.0]))
    assert np.array_equal(s.ema, before)
    assert np.isnan(s.sma).all()               # four places of no weight: no value in the window
    s.update(np.array([6.0, 9.0]), sample_weight=1.0)
    d = 1 - 2 / 21
    want = [(d * d * 2 + d * 4 + 6) / (d * d + d + 1),
            (d * d * 3 * 5 + d * 7 + 9) / (d * d * 3 + d + 1)]
    np.testing.assert_allclose(s.ema, want, rtol=1e-13)
    assert s.sma.tolist() == [6.0, 9.0]


@pytest.mark.parametrize("mode", ["debiased", "seeded", "zeros"])
def test_a_nan_of_weight_0_does_not_poison_the_ema_under_propagate(mode):
    # a class absent from a batch: its accuracy is 0/0 with a count of 0
    s = Smoother(decay=0.5, mode=mode, window=2, nonfinite="propagate")
    s.update(np.array([1.0, 1.0]), sample_weight=np.array([2.0, 2.0]))
    before = s.ema[0]
    s.update(np.array([math.nan, 3.0]), sample_weight=np.array([0.0, 2.0]))
    assert s.ema[0] == before and not math.isnan(s.ema[1]) and s.sma[0] == 1.0
    s.update(np.array([math.nan, 3.0]), sample_weight=np.array([1.0, 2.0]))   # weight 1: NaN
    assert math.isnan(s.ema[0])


@pytest.mark.parametrize("mode", ["seeded", "zeros"])
def test_the_seeded_and_zeros_emas_skip_a_value_of_weight_0(mode):
    s = Smoother(decay=0.5, mode=mode)
    s.update(np.array([8.0]), sample_weight=0.0)                       # no seed
    s.update(np.array([4.0]), sample_weight=5.0)          # one step, whatever its weight
    s.update(np.array([100.0]), sample_weight=0.0)
    assert s.ema[0] == (4.0 if mode == "seeded" else 2.0)
