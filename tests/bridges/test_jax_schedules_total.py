"""fastema.jax.ema(): every schedule total (issue 77), with and without ``jax_enable_x64``.

Every device schedule, for any int32 inputs (the step, the last and first update's times), gives
a decay in ``[0, 1]``: where the inputs are what the host plan takes, the host's float64 decay
(``fastema.schedules``); a time before the last update's holds the average (``d = 1``) for the
timed ``HalfLife`` and ``PowerFunction`` (the x64 branches extrapolated: J06 of
``reliability.md``). What a step cannot be is refused where it is known: a concrete step (Python,
NumPy or a ``jax.Array``) out of ``[0, 2**31)`` or not an integer by a ValueError naming it, a
traced one that is not an integer scalar when traced; a traced integer out of range (negative, or
an x64 ``int64`` beyond int32, checked before the int32 cast) holds the call: nothing written, no
update counted. The averages, driven by any mix of such steps, stay in the convex hull of the
parameters they were given."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support.jax_x64 import enable_x64

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from support.schedules import device_decays  # noqa: E402

import fastema.jax as fj  # noqa: E402
from fastema.schedules import (  # noqa: E402
    BEMA,
    Constant,
    Cosine,
    HalfLife,
    Linear,
    NumUpdates,
    PiecewiseConstant,
    PowerFunction,
    PowerWarmup,
)

#: every schedule the device computes (``fastema.jax._schedules.DEVICE_SCHEDULES``), a few forms each
SCHEDULES = {
    "constant": Constant(0.9), "num_updates": NumUpdates(0.99),
    "warmup": PowerWarmup(0.999, min_decay=0.1, update_after_step=3),
    "warmup_off": PowerWarmup(0.9, warmup=False, update_after_step=2),
    "power_function": PowerFunction.of(0.05), "power_function_wide": PowerFunction(0.5),
    "half_life": HalfLife(10.0), "half_life_short": HalfLife(0.25), "bema": BEMA(), "bema_flat": BEMA(ema_power=0.0),
    "cosine": Cosine(0.9, 1.0, 100), "linear": Linear(0.0, 1.0, 50),
    "piecewise": PiecewiseConstant([5, 50], [0.5, 0.9, 1.0]),
}
TIMED = (PowerFunction, HalfLife, BEMA)
INT32 = (-2 ** 31, 2 ** 31 - 1)
#: the int32 values where the formulas turn: signs, NumUpdates' pole at -10, 2**24, the ends
EDGES = np.asarray([-2 ** 31, -2 ** 31 + 1, -11, -10, -9, -5, -2, -1, 0, 1, 2, 3, 9, 10, 100, 2 ** 24,
                    2 ** 24 + 1, 2 ** 31 - 2, 2 ** 31 - 1], np.int64)
SIZE = 64                                           # inputs per example: one shape, one compile
_DECAYS: dict = {}


def _decays(name: str, x64: bool):
    """The device's decays of ``SCHEDULES[name]`` over arrays ``(n, t, last, first)`` (int32)."""
    key = (name, x64)
    if key not in _DECAYS:
        with enable_x64(x64):
            _DECAYS[key] = device_decays(SCHEDULES[name])
    return _DECAYS[key]


def _host(s, n: int, t: int, last: int, first: int) -> float:
    """The host plan's float64 decay where it takes the inputs (``n >= 0``, ``0 <= first <= last <= t``)."""
    return s.between(first, last, t) if isinstance(s, TIMED) else s(n)


def _check_decays(name: str, x64: bool, n, t, last, first) -> None:
    """The device's decays of inputs of any length (in pieces of SIZE: one compile), checked."""
    pad = -len(n) % SIZE
    n, t, last, first = (np.concatenate([np.asarray(a, np.int64), np.zeros(pad, np.int64)])
                         for a in (n, t, last, first))
    with enable_x64(x64):
        run = _decays(name, x64)
        d = np.concatenate([np.asarray(run(*(jnp.asarray(a[i:i + SIZE], jnp.int32) for a in (n, t, last, first))),
                                       np.float64) for i in range(0, len(n), SIZE)])
    bad = ~((d >= 0.0) & (d <= 1.0))                # NaN too
    assert not bad.any(), (name, x64, [(int(n[i]), int(t[i]), int(last[i]), int(first[i]), d[i])
                                       for i in np.flatnonzero(bad)[:5]])
    s = SCHEDULES[name]
    before = (0 < last) & (t < last) if isinstance(s, (PowerFunction, HalfLife)) else np.zeros(len(d), bool)
    assert np.all(d[before] == 1.0), (name, x64, d[before])            # before the last update: holds
    host = ~before & (n >= 0) & (0 <= first) & (first <= last) & (last <= t)
    want = [_host(s, int(n[i]), int(t[i]), int(last[i]), int(first[i])) for i in np.flatnonzero(host)]
    # x64: the host's arithmetic, 0 for a subnormal (XLA's CPU flushes them: a half-life decay at
    # t = 10221 of n = 0 was 2.1e-308 on the host; as a weight, 1 - d is 1.0 either way); float32:
    # within a few ulps (test_jax_schedule_ulps), 0 below 2**-120
    np.testing.assert_allclose(d[host], want, rtol=1e-12 if x64 else 3e-7,
                               atol=np.finfo(np.float64).tiny if x64 else 2.0 ** -100,
                               err_msg=f"{name} x64={x64}")


def test_a_subnormal_decay_may_be_flushed_to_zero_on_the_device():
    """The example hypothesis found (CI, 2026-11-29): ``HalfLife`` at t = 10221 after no update,
    x64: the host's decay is subnormal, the device's 0."""
    z, t = np.zeros(SIZE, np.int64), np.full(SIZE, 10221, np.int64)
    _check_decays("half_life", True, z, t, z, z)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "x64"])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_is_in_0_1_on_every_int32_edge(name, x64):
    """All ``(t, last)`` pairs of the edges (the step given: ``n = t``; ``first`` the smaller):
    the decay is in ``[0, 1]``, the host's where the host takes it, 1 before the last update."""
    t, last = (a.ravel() for a in np.meshgrid(EDGES, EDGES))
    _check_decays(name, x64, t, t, last, np.minimum(t, last))


ints = hnp.arrays(np.int64, SIZE, elements=st.one_of(st.integers(*INT32), st.integers(-20, 200)))


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(SCHEDULES)), x64=st.booleans(), n=ints, t=ints, last=ints, first=ints)
def test_every_schedule_gives_a_decay_in_0_1_for_any_int32_inputs(name, x64, n, t, last, first):
    """Any int32 step, times and count (those the host refuses too): a decay in [0, 1], never NaN."""
    _check_decays(name, x64, n, t, last, first)


_UPDATES: dict = {}


def _update(name: str, x64: bool):
    """``(avg, jitted update)`` of ``SCHEDULES[name]``, debiased where it is not timed (its weights
    ``(1 - d) / c`` then): one compile for every test that runs it on ``{"w": float32[3]}`` and an
    int step of :func:`_int`."""
    if (name, x64) not in _UPDATES:
        s = SCHEDULES[name]
        avg = fj.ema(s, debias=not isinstance(s, (Constant,) + TIMED))
        _UPDATES[name, x64] = avg, jax.jit(avg.update)
    return _UPDATES[name, x64]


def _int(x64: bool):
    """The dtype of a step array: a Python int's under jit (int64 with x64)."""
    return jnp.int64 if x64 else jnp.int32


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "x64"])
@pytest.mark.parametrize("name", ["half_life", "power_function"])
def test_a_traced_step_before_the_last_update_holds_the_average(name, x64):
    """J06: with x64 a jitted update at step 50 after one at step 100 gave HalfLife -123 and
    PowerFunction -1e6 (from 0.999 and 1.0); PowerFunction at step 0 copied the parameters
    (``d = 0``, both precisions). The docs: a traced step before the last update's time holds the
    average (``d = 1``)."""
    with enable_x64(x64):
        avg, update = _update(name, x64)
        state = update(avg.init({"w": jnp.zeros(3)}), {"w": jnp.ones(3, jnp.float32)}, jnp.asarray(100, _int(x64)))
        held = np.asarray(state.averages["w"])
        for step in (50, 0, 99):
            out = update(state, {"w": jnp.full(3, 5.0, jnp.float32)}, jnp.asarray(step, _int(x64)))
            np.testing.assert_array_equal(np.asarray(out.averages["w"]), held, err_msg=str(step))
            assert int(out.updates) == 2 and int(out.last_time) == step      # counted, as the docs say


# ---------------------------------------------------------------------------- the steps update() takes


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "x64"])
def test_a_concrete_jax_array_step_is_range_checked_like_a_numpy_integer(x64):
    """J05: ``step=jnp.asarray(-5)`` (not traced) was read as a traced step (NumUpdates: weight
    1.8), and under x64 ``jnp.asarray(2**31)`` wrapped through the int32 cast. Each is refused as
    ``np.int64(-5)`` is, as are floats, bools and arrays that are not scalars, naming the step."""
    with enable_x64(x64):
        avg = fj.ema(NumUpdates(0.9))
        state = avg.init({"w": jnp.zeros(4)})
        bad = [jnp.asarray(-5), jnp.asarray(-1, jnp.int8), jnp.asarray(2.0), jnp.asarray(True),
               jnp.asarray([3, 4]), np.asarray(-2), np.asarray(7.0), np.float64(3.0), 2.5]
        if x64:
            bad += [jnp.asarray(2 ** 31), jnp.asarray(2 ** 32 + 5, jnp.int64), jnp.asarray(2 ** 31, jnp.uint32)]
        for step in bad:
            with pytest.raises(ValueError, match=r"step must be an int in \[0, 2\*\*31\).*got"):
                avg.update(state, {"w": jnp.ones(4)}, step)
        ok = (jnp.asarray(2 ** 31 - 1), np.asarray(3, np.uint16), jnp.asarray(7, jnp.uint8), 5)
        for step in ok:                             # concrete (closed over), traced no further than its shape
            out = jax.eval_shape(lambda s, step=step: avg.update(s, {"w": jnp.ones(4)}, step), state)
            assert out.last_time.shape == () and out.last_time.dtype == jnp.int32


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "x64"])
def test_a_traced_step_out_of_range_holds_the_call_and_a_float_one_is_refused(x64):
    """Inside jax.jit the value is not known: a negative step (or, with x64, an int64 or uint32
    beyond int32: 2**31 wrapped to -2**31, 2**32 + 5 to 5) writes nothing and counts no update,
    checked in the step's own dtype before the int32 cast; a float or non-scalar step is refused
    when traced."""
    with enable_x64(x64):
        avg, update = _update("num_updates", x64)
        nine = {"w": jnp.full(3, 9.0, jnp.float32)}
        state = update(avg.init({"w": jnp.zeros(3)}), {"w": jnp.ones(3, jnp.float32)}, jnp.asarray(3, _int(x64)))
        held = np.asarray(state.averages["w"])
        steps = [-5, -2 ** 31] + ([2 ** 31, 2 ** 32 + 5, 2 ** 62] if x64 else [])
        for step in [jnp.asarray(v, _int(x64)) for v in steps] + ([jnp.asarray(2 ** 31, jnp.uint32)] if x64 else []):
            out = update(state, nine, step)
            np.testing.assert_array_equal(np.asarray(out.averages["w"]), held, err_msg=repr(step))
            assert (int(out.calls), int(out.updates), int(out.last_time)) == (2, 1, 3), repr(step)
        fine = update(state, nine, jnp.asarray(2 ** 31 - 1, _int(x64)))
        assert int(fine.updates) == 2 and int(fine.last_time) == 2 ** 31 - 1
        assert np.all(np.asarray(fine.averages["w"]) > held)
        for step in (jnp.asarray(4.0), jnp.asarray(True), jnp.asarray([1, 2])):
            with pytest.raises(ValueError, match="step must be an integer scalar, got a traced"):
                update(state, nine, step)


step_values = st.one_of(st.integers(0, 300), st.integers(-12, -1), st.sampled_from([2 ** 31 - 1, 2 ** 31, 2 ** 40]))


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(SCHEDULES)), x64=st.booleans(),
       calls=st.lists(st.tuples(step_values, st.booleans(), st.floats(-4.0, 4.0)), min_size=1, max_size=6))
def test_the_averages_stay_in_the_hull_of_the_parameters_for_any_steps(name, x64, calls):
    """schedules x steps x x64: any sequence of steps, each given as a concrete int or an array
    (traced: the update is jitted), of any value: a concrete one out of range is refused (nothing
    runs), a traced one holds the call; every average row (BEMA: its EMA and theta_0 rows; its
    output extrapolates by design) stays within the parameters it was given."""
    with enable_x64(x64):
        avg, jitted = _update(name, x64)
        dtype = _int(x64)
        state = avg.init({"w": jnp.zeros(3)})
        seen = [0.0]
        for step, traced, value in calls:
            params = {"w": jnp.full(3, value, jnp.float32)}
            if traced or 0 <= step < 2 ** 31:            # a concrete one in range: as the traced (one compile)
                ok = 0 <= step < 2 ** 31
                if not x64 and not -2 ** 31 <= step < 2 ** 31:
                    continue                                # no int32 holds it: not a step of this run
                before = int(state.updates)
                state = jitted(state, params, jnp.asarray(step, dtype))
                assert int(state.updates) == before + ok
            else:
                with pytest.raises(ValueError, match="step must be an int"):
                    avg.update(state, params, step)
                continue
            seen.append(value)
            rows = np.asarray(state.averages["w"], np.float64)
            rows = rows[1:] if isinstance(SCHEDULES[name], BEMA) else rows
            slack = 1e-6 * max(1.0, max(abs(v) for v in seen))
            assert np.all(rows >= min(seen) - slack) and np.all(rows <= max(seen) + slack), (rows, seen)
