"""fastema.jax.ema(): the average as pure functions inside jax.jit, against fastema's CPU kernel.

The reference is fastema.jax.EMA on the same parameters: the host plan (float64 schedules) and
the Numba CPU kernel (FMA lerp, the counter-hash stochastic rounding). With ``jax_enable_x64``
the device schedules compute in float64 as the host plan does, and every average is equal bit
for bit (XLA's CPU backend contracts the lerp into the kernel's FMA); without it, constant
decays are still bit-equal and the computed schedules (float32 on the device) within a few
float32 ulps of the weight."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.jax_x64 import enable_x64

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import fastema.jax as fj  # noqa: E402
from fastema.schedules import (  # noqa: E402
    BEMA,
    WSM,
    Cosine,
    HalfLife,
    NumUpdates,
    PiecewiseConstant,
    PowerFunction,
    PowerWarmup,
)

SCHEDULES = {
    "constant": 0.9, "k2": [0.5, 0.9], "k3": [0.3, 0.9, 0.99], "k4": [0.1, 0.5, 0.9, 0.999],
    "num_updates": NumUpdates(0.99), "warmup": PowerWarmup(0.999, min_decay=0.1, update_after_step=1),
    "warmup_off": PowerWarmup(0.9, warmup=False, update_after_step=2),
    "power_function": [PowerFunction.of(0.05), PowerFunction.of(0.2)], "half_life": HalfLife(3.0), "bema": BEMA(),
    "cosine": Cosine(0.9, 0.999, 5), "piecewise": PiecewiseConstant([2, 4], [0.5, 0.9, 0.99]),
}
STEP_KINDS = ("constant", "k2", "k3", "k4", "num_updates", "warmup", "warmup_off", "cosine", "piecewise")
SHADOWS = {"f32": {}, "same": {"shadow_dtype": "same"}, "bf16": {"shadow_dtype": "bfloat16"},
           "bf16_sr": {"shadow_dtype": "bfloat16", "rounding": "stochastic", "seed": 2 ** 40 + 12345}}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _params(rng, shapes, dtypes, scale=1.0, nan=False):
    out = {}
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        a = rng.standard_normal(shape).astype(np.float32) * scale
        if nan and i == 0 and a.size:
            a.flat[0] = np.nan
        out[f"p{i}"] = jnp.asarray(a, DTYPES[dt])
    return out


def _run(options, shapes, dtypes, steps, seed=0, given_steps=False, nan_at=None):
    """(face state_dict's averages, functional state) after ``steps`` updates of both."""
    rng = np.random.default_rng(seed)
    p0 = _params(rng, shapes, dtypes)
    face = fj.EMA(p0, **options)
    avg = fj.ema(**options)
    state = avg.init(p0)
    update = jax.jit(avg.update)
    for i in range(steps):
        p = _params(rng, shapes, dtypes, scale=1.0 + i, nan=(i == nan_at))
        step = 2 * i + 1 if given_steps else None
        face.update(p, step)
        state = update(state, p, step) if given_steps else update(state, p)
    _LAST[0] = p
    return face, state


_LAST: list = [None]            # the parameters of _run's last update (the scale of x - s)


def _rows(face, state):
    got = {k: np.asarray(v.astype(jnp.float32)) for k, v in state.averages.items()}
    want = {k.strip("[]'"): np.asarray(v, np.float32) for k, v in face.state_dict()["averaged"].items()}
    return got, want


def _assert_equal(face, state, ulps=0):
    got, want = _rows(face, state)
    assert int(state.updates) == face.updates and int(state.calls) == face.plan.calls
    for k in want:
        assert got[k].shape == want[k].shape, k
        if ulps == 0:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        else:
            # a weight a few float32 ulps of 1 off (w = 1 - d in float32) moves an element by that much
            # of (x - s): measured against the largest |x| + |s|
            scale = float(np.abs(want[k]).max()) + float(np.abs(np.asarray(_LAST[0][k], np.float32)).max())
            tol = ulps * 2.0 ** -24 * scale
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=tol, err_msg=k)


shapes_st = st.lists(st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3)


@settings(max_examples=6)
@given(shapes=shapes_st, data=st.data())
def test_constant_decays_equal_the_cpu_kernel_bit_for_bit(shapes, data):
    """K = 1..4 constant decays, float32, bfloat16 and float16 leaves, every shadow kind (stochastic
    rounding included: the kernels' hash, keyed by the seed and the step, indexed as the kernels'
    groups), update_every and the steps given or counted: every average equal bit for bit."""
    dtypes = data.draw(st.lists(st.sampled_from(sorted(DTYPES)), min_size=len(shapes), max_size=len(shapes)))
    kind = data.draw(st.sampled_from(["constant", "k2", "k3", "k4"]))
    shadow = data.draw(st.sampled_from(sorted(SHADOWS)))
    every = data.draw(st.integers(1, 3))
    options = {"decay": SCHEDULES[kind], "update_every": every, **SHADOWS[shadow]}
    face, state = _run(options, shapes, dtypes, steps=4, given_steps=data.draw(st.booleans()))
    _assert_equal(face, state)


@pytest.mark.parametrize("decay", [0.9, [0.9, 0.99]])
@pytest.mark.parametrize("every", [1, 3])
def test_compensated_constant_decays_equal_the_cpu_kernel(decay, every):
    """``compensate=True`` with constant decays weighs an update by 1 - d**every, as the host plan
    does: the constant shortcut took 1 - d and every number was off (found by review)."""
    options = {"decay": decay, "update_every": every, "compensate": True}
    face, state = _run(options, [(5,), (2, 3)], ["float32", "float32"], steps=6)
    _assert_equal(face, state)
    avg = fj.ema(0.9, update_every=4, compensate=True)
    one = avg.update(avg.init({"w": jnp.zeros(3)}), {"w": jnp.ones(3)})
    assert float(avg.average(one)["w"][0]) == pytest.approx(1 - 0.9 ** 4, rel=1e-6)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_every_schedule_on_the_device_equals_the_host_plan_bit_for_bit_with_x64(kind):
    """Each schedule computed on the device from the traced step (float64 with jax_enable_x64,
    as the host plan) gives the kernel's averages bit for bit: warm-ups, power functions, half-life,
    BEMA (its output row and its EMA and theta_0 rows), momentum schedules; debiased where the
    schedule takes it; with the steps given (timed schedules over irregular steps)."""
    debias = kind in STEP_KINDS and kind != "k4"
    options = {"decay": SCHEDULES[kind], "debias": debias, "update_every": 1 if kind == "bema" else 2,
               "shadow_dtype": "bfloat16", "rounding": "stochastic", "seed": 3}
    if sorted(SCHEDULES).index(kind) % 2:                # half the kinds: a float32 shadow of bfloat16 weights
        options.update(shadow_dtype="float32", rounding="nearest")
    given_steps = kind in ("power_function", "half_life", "bema") or kind in STEP_KINDS[::2]
    with enable_x64(True):
        face, state = _run(options, [(5, 3), (4,)], ["float32", "bfloat16"], steps=5, given_steps=given_steps)
    _assert_equal(face, state)


@pytest.mark.parametrize("kind", ["num_updates", "warmup", "power_function", "half_life", "bema", "cosine"])
def test_float32_schedules_stay_within_a_few_ulps(kind):
    """Without x64 the device computes the schedules in float32: the weights are within a few
    float32 ulps of 1 of the host's (``w = 1 - d``), and the averages within 8 ulps of the
    kernel's, counted on the largest ``|x| + |s|`` (a weight's error moves an element by that much
    of ``x - s``)."""
    options = {"decay": SCHEDULES[kind], "update_every": 1}
    face, state = _run(options, [(64,)], ["float32"], steps=8)
    _assert_equal(face, state, ulps=8)


def test_the_nonfinite_guard_skips_the_write_and_counts_the_call():
    options = {"decay": [0.9, 0.5], "skip_nonfinite": True}
    face, state = _run(options, [(8,), (3, 2)], ["float32", "float32"], steps=4, nan_at=2)
    _assert_equal(face, state)
    assert int(state.updates) == 4 and not bool(state.skipped)
    _, state2 = _run(options, [(8,)], ["float32"], steps=3, nan_at=2)
    assert bool(state2.skipped)
    assert np.isfinite(np.asarray(state2.averages["p0"])).all()


def _jit_loop_params(n=4):
    rng = np.random.default_rng(5)
    p0 = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32), "b": jnp.zeros(8, jnp.bfloat16),
          "step": jnp.int32(0)}
    seq = [jax.tree.map(lambda x: x + (i + 1) if x.dtype != jnp.int32 else x + i + 1, p0) for i in range(n)]
    return p0, seq


def test_update_runs_donated_in_place_and_inside_scan():
    """Donated, the old state's buffers are consumed (XLA aliases them to the new state, with no
    copy of any leaf); inside lax.scan the same updates give the same state; integer leaves are
    carried as the latest value."""
    p0, seq = _jit_loop_params()
    avg = fj.ema([0.9, 0.99], shadow_dtype="bfloat16", rounding="stochastic")
    plain = avg.init(p0)
    for p in seq:
        plain = jax.jit(avg.update)(plain, p)
    donated = avg.init(p0)
    update = jax.jit(avg.update, donate_argnums=0)
    hlo = update.lower(donated, seq[0]).compile().as_text()
    assert "input_output_alias" in hlo
    copies = [line for line in hlo.splitlines() if " copy(" in line]
    assert copies and not [c for c in copies if "[2,16,8]" in c or "[2,8]" in c], copies   # never an average
    for p in seq:
        old = donated
        donated = update(donated, p)
        assert old.averages["w"].is_deleted()
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *seq)
    scanned, _ = jax.jit(lambda s, ps: jax.lax.scan(lambda c, p: (avg.update(c, p), None), s, ps))(avg.init(p0),
                                                                                                  stacked)
    for a, b, c in zip(jax.tree.leaves(plain), jax.tree.leaves(donated), jax.tree.leaves(scanned)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(c.astype(jnp.float32)))
    out = avg.average(plain, 1)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in p0.items()}
    assert int(out["step"]) == len(seq)


def test_average_reads_rows_in_the_parameters_dtypes():
    p = {"w": jnp.ones((3,), jnp.bfloat16)}
    avg = fj.ema([0.5, 0.9])
    state = avg.update(avg.init(p), {"w": jnp.full((3,), 3.0, jnp.bfloat16)})
    assert state.averages["w"].dtype == jnp.float32 and state.averages["w"].shape == (2, 3)
    assert avg.average(state, 0)["w"].tolist() == [2.0] * 3 and avg.average(state, 0)["w"].dtype == jnp.bfloat16
    assert avg.average(state, 1)["w"].tolist() == [1.203125] * 3          # 1.2 rounded to bfloat16
    with pytest.raises(IndexError, match=r"row must be an int in \[0, 2\)"):
        avg.average(state, 2)
    fresh = fj.ema([0.5, 0.9])                      # a state restored in a process that never ran init/update
    with pytest.raises(ValueError, match="pass like=params"):
        fresh.average(state)
    assert fresh.average(state, 0, like=p)["w"].dtype == jnp.bfloat16
    bema = fj.ema(BEMA())
    with pytest.raises(IndexError, match=r"\[0, 1\)"):
        bema.average(bema.init(p), 1)


def test_options_that_cannot_run_in_jit_are_refused_by_name():
    with pytest.raises(ValueError, match="does not take offload='cpu'"):
        fj.ema(0.9, offload="cpu")
    with pytest.raises(ValueError, match="does not take device_step=False: inside jax.jit the plan"):
        fj.ema(0.9, device_step=False)
    fj.ema(0.9, device_step=True)                      # what it does anyway
    with pytest.raises(ValueError, match=r"decay=WSM\(...\): a merge schedule"):
        fj.ema(WSM("linear", 10, 20, every=5))
    with pytest.raises(TypeError, match="unknown EMA option"):
        fj.ema(0.9, exclude=["b"])
    with pytest.raises(ValueError, match="decay must be a float in"):
        fj.ema(1.5)


def test_bad_params_are_refused_with_the_fix():
    avg = fj.ema(0.9)
    with pytest.raises(ValueError, match="no float64/float32/bfloat16/float16 leaves"):
        avg.init({"i": jnp.int32(1)})
    state = avg.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="structure of the state"):
        avg.update(state, {"v": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"shape \(4,\) meets an average of shape \(3,\)"):
        avg.update(state, {"w": jnp.ones(4)})
    for step in (-1, 2 ** 31, 1.5, True, np.int64(2 ** 31 + 5), np.int32(-3), np.float32(2.0)):
        with pytest.raises(ValueError, match=r"step must be an int in \[0, 2\*\*31\)"):
            avg.update(state, {"w": jnp.ones(3)}, step)


def test_a_leaf_of_another_kind_than_the_states_is_refused_by_name():
    """J02: an int32 leaf where init saw a float32 one replaced the (1, 4) average by the integers
    (and a float one where the state kept an int leaf was folded into it): the state changed
    structure. Both directions, and a kept leaf of another kind, are refused naming the leaf."""
    avg = fj.ema(0.9)
    state = avg.init({"w": jnp.ones(4, jnp.float32), "n": jnp.int32(0), "m": jnp.zeros(2, jnp.uint8)})
    for leaf, params in [("['w']", {"w": jnp.arange(4, dtype=jnp.int32), "n": jnp.int32(1), "m": state.averages["m"]}),
                         ("['n']", {"w": jnp.ones(4), "n": jnp.float32(1.0), "m": state.averages["m"]}),
                         ("['m']", {"w": jnp.ones(4), "n": jnp.int32(1), "m": jnp.zeros(2, jnp.bool_)}),
                         ("['w']", {"w": jnp.ones(4, jnp.float8_e4m3fn), "n": jnp.int32(1), "m": state.averages["m"]})]:
        for update in (avg.update, jax.jit(avg.update)):
            with pytest.raises(ValueError, match=rf"params\{leaf[:2]}.*where the state holds a .*init a new state"):
                update(state, params)
    assert state.averages["w"].shape == (1, 4) and state.averages["w"].dtype == jnp.float32
    kept = avg.update(state, {"w": jnp.ones(4, jnp.bfloat16), "n": jnp.int16(3), "m": jnp.ones(2, jnp.uint8)})
    assert int(kept.averages["n"]) == 3 and kept.averages["w"].dtype == jnp.float32      # same kinds: taken


@pytest.mark.parametrize("make", [lambda: fj.ema(0.9), lambda: fj.window(4)], ids=["ema", "window"])
def test_a_leaf_of_another_kind_or_a_kept_leaf_of_another_shape_is_refused_by_ema_and_window(make):
    """window().update had no check of its leaves: an int leaf where the state holds a float ring took
    the ring's place (the window's four snapshots became the ints, and average() returned a (4, 3)
    array); ema() and window() took a kept leaf of another shape, changing the state's structure. Both
    are refused naming the leaf, inside jit too; the same kinds and shapes are taken."""
    avg = make()
    state = avg.init({"w": jnp.array([0.5, 1.5, 2.5]), "c": jnp.zeros(2, jnp.int32)})
    for leaf, params in [("['w']", {"w": jnp.array([7, 8, 9]), "c": jnp.zeros(2, jnp.int32)}),
                         ("['c']", {"w": jnp.ones(3), "c": jnp.zeros(5, jnp.int32)})]:
        for update in (avg.update, jax.jit(avg.update)):
            with pytest.raises(ValueError, match=rf"params\{leaf[:2]}.*where the state holds .*init a new state"):
                update(state, params)
    kept = avg.update(state, {"w": jnp.array([1.5, 2.5, 3.5]), "c": jnp.ones(2, jnp.int32)})
    np.testing.assert_array_equal(np.asarray(avg.average(kept)["c"]), [1, 1])
    assert avg.average(kept)["w"].shape == (3,)


@pytest.mark.parametrize("make", [lambda: fj.ema(0.9), lambda: fj.window(2), lambda: fj.ema(0.9, skip_nonfinite=True)],
                         ids=["ema", "window", "ema skip_nonfinite"])
def test_python_number_leaves_are_averaged_and_kept_as_jax_numbers(make):
    """A Python float or int leaf (a learning-rate scale kept in the params tree, say) raised a bare
    AttributeError ('float' object has no attribute 'dtype') at init and update: taken as JAX takes
    them, a float averaged, an int kept."""
    avg = make()
    state = avg.update(avg.init({"w": 1.0, "i": 3}), {"w": 2.0, "i": 4})
    out = avg.average(state)
    want = 1.1 if "window" not in repr(type(avg)).lower() else 1.5
    np.testing.assert_allclose(float(out["w"]), want, rtol=1e-6)
    assert int(out["i"]) == 4


@pytest.mark.parametrize("make", [lambda: fj.ema(0.9), lambda: fj.window(2)], ids=["ema", "window"])
def test_average_refuses_to_guess_dtypes_where_two_models_of_one_structure_were_seen(make):
    """One transform, two models of one structure: average() of the float32 model's state came back in
    the bfloat16 model's dtype (0.33333334 read as 0.333984), the dtypes kept per structure being the
    last seen. Where several were seen it asks for like=; with it, each state reads in its own."""
    avg = make()
    s32 = avg.init({"w": jnp.full(3, 1 / 3, jnp.float32)})
    assert avg.average(s32)["w"].dtype == jnp.float32
    avg.init({"w": jnp.ones(3, jnp.bfloat16)})
    with pytest.raises(ValueError, match="several dtypes.*pass like=params"):
        avg.average(s32)
    got = avg.average(s32, like={"w": jax.ShapeDtypeStruct((3,), jnp.float32)})["w"]
    assert got.dtype == jnp.float32 and float(got[0]) == np.float32(1 / 3)
    fresh = make()                                      # NumPy leaves at init, JAX's in the jitted step:
    state = jax.jit(fresh.update)(fresh.init({"w": np.zeros(3), "c": np.int64(0)}),     # one dtype as JAX
                                  {"w": jnp.ones(3), "c": jnp.int32(1)})                # holds them
    assert fresh.average(state)["w"].dtype == jnp.float32


@pytest.mark.parametrize("make", [lambda: fj.ema(0.9), lambda: fj.window(2)], ids=["ema", "window"])
def test_average_refuses_a_like_of_another_structure(make):
    """window().average(like=) took a like= of another structure without a check: another model's
    two float leaves gave the int leaf's kept value back averaged and cast to float. Refused as ema()
    refuses it, naming both structures."""
    avg = make()
    params = {"a": jnp.array([1.0, 3.0]), "b": jnp.array([4, 6], jnp.int32)}
    state = avg.update(avg.init(params), {"a": jnp.array([2.0, 5.0]), "b": jnp.array([7, 9], jnp.int32)})
    for other in ({"x": jnp.ones(2), "y": jnp.ones(2)}, {"a": jnp.ones(2)}):
        with pytest.raises(ValueError, match=r"like= has the structure PyTreeDef\(.*the state PyTreeDef\(\{'a'"):
            avg.average(state, like=other)
    out = avg.average(state, like=params)
    a = (np.array([1.0, 3.0]) + np.array([2.0, 5.0])) / 2 if isinstance(avg, fj.WindowTransform) else \
        np.array([1.0, 3.0]) * 0.9 + np.array([2.0, 5.0]) * 0.1
    np.testing.assert_allclose(np.asarray(out["a"], np.float64), a, rtol=1e-6)
    assert out["b"].dtype == jnp.int32 and np.asarray(out["b"]).tolist() == [7, 9]


def test_shadow_dtype_takes_the_list_of_fastema_jax_EMA_and_refuses_others_by_name():
    """J15: ``shadow_dtype="int8"`` (bool, complex64, float8) averaged garbage (0.3 -> 0.7 gave 0.0),
    and an unknown name failed at init with NumPy's message. fastema.jax.EMA's list, refused at
    construction with fastema's message; the names it takes each hold the average."""
    for name in ("int8", "bool", "complex64", "float8_e4m3fn", "foo", jnp.float32, None):
        with pytest.raises(ValueError, match=r"shadow_dtype must be one of \['bfloat16', 'float16', 'float32', "
                                             r"'float64'\] or 'same', got"):
            fj.ema(0.9, shadow_dtype=name)
        with pytest.raises(ValueError):             # the between-steps face refuses the same
            fj.EMA({"w": jnp.zeros(2)}, 0.9, shadow_dtype=name)
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16), ("float16", jnp.float16),
                        ("same", jnp.float32)):
        avg = fj.ema(0.9, shadow_dtype=name)
        state = avg.update(avg.init({"w": jnp.full(4, 0.3)}), {"w": jnp.full(4, 0.7)})
        assert state.averages["w"].dtype == dtype
        assert float(avg.average(state)["w"][0]) == pytest.approx(0.34, rel=1e-2)
    with enable_x64(True):
        avg = fj.ema(0.9, shadow_dtype="float64")
        assert avg.init({"w": jnp.zeros(2, jnp.float32)}).averages["w"].dtype == jnp.float64


@pytest.mark.parametrize("size, every, ring", [(3, 1, "float32"), (4, 2, "bfloat16"), (None, 1, "float32")])
def test_the_window_is_the_mean_of_the_last_snapshots(size, every, ring):
    """fastema.jax.window against a float64 mean of the snapshots it should hold (the parameters
    at init the first; one every ``every`` calls), donated under jit, in the parameters' dtypes."""
    rng = np.random.default_rng(2)
    seq = [{"w": jnp.asarray(rng.standard_normal((5, 3)) + i, jnp.float32), "n": jnp.int32(i)} for i in range(9)]
    avg = fj.window(size, every=every, ring_dtype=ring)
    state = avg.init(seq[0])
    update = jax.jit(avg.update, donate_argnums=0)
    for p in seq[1:]:
        state = update(state, p)
    taken = [seq[0]["w"]] + [p["w"] for i, p in enumerate(seq[1:]) if i % every == 0]
    if ring == "bfloat16":
        taken = [t.astype(jnp.bfloat16) for t in taken]
    kept = taken if size is None else taken[-size:]
    want = np.mean([np.asarray(t, np.float64) for t in kept], axis=0)
    got = avg.average(state)
    assert got["w"].dtype == jnp.float32 and int(got["n"]) == (8 if every == 1 else 7)
    assert int(state.snapshots) == len(taken)
    np.testing.assert_allclose(np.asarray(got["w"]), want, rtol=4 * 2.0 ** -23, atol=1e-6)


def test_the_window_refuses_bad_arguments():
    for kw, msg in [({"size": 0}, "size must be an int >= 1 or None"), ({"size": 2, "every": 0}, "every must be"),
                    ({"size": 2, "ring_dtype": "float16"}, "ring_dtype must be"),
                    ({"size": None, "ring_dtype": "bfloat16"}, "takes no ring_dtype")]:
        with pytest.raises(ValueError, match=msg):
            fj.window(**kw)


def test_k_decays_compile_to_the_loops_of_one():
    """K decays in one pass: the compiled update of K=3 has as many fused loops as K=1 (each leaf's
    rows in one loop that reads the parameter once), and three one-decay states updated in one step
    have three times the leaves' loops. A deterministic figure; the times are the benchmark
    suite's (test_bench_jax_jit)."""
    import re

    params = {f"p{i}": jnp.ones((64, 3 + i)) for i in range(6)}

    def loops(update, state):
        text = jax.jit(update, donate_argnums=0).lower(state, params).compile().as_text()
        return sum(1 for line in text.splitlines() if re.search(r"= \S+ fusion\(", line) and "[" in line.split("=")[1]
                   and re.search(r"\[\d", line.split("=")[1].split("fusion")[0]))

    one, three = fj.ema(0.9), fj.ema([0.9, 0.99, 0.999])
    ones = [fj.ema(d) for d in (0.9, 0.99, 0.999)]
    k1 = loops(one.update, one.init(params))
    k3 = loops(three.update, three.init(params))
    k1x3 = loops(lambda ss, p: [a.update(s, p) for a, s in zip(ones, ss)], [a.init(params) for a in ones])
    assert k1 == k3 == len(params) and k1x3 == 3 * len(params), (k1, k3, k1x3)


def test_the_donated_update_copies_nothing_per_leaf():
    """Under donation the compiled update copies no buffer per leaf: the copies (the seed and the
    flag passed through) do not grow with the leaves. The parameters' dtypes were kept in the state
    as zero-size arrays passed through, and XLA copied each one at every step (4.6x the hand-written
    lerp's time at 300 leaves)."""
    def copies(leaves):
        params = {f"p{i}": jnp.ones((8, 3)) for i in range(leaves)}
        avg = fj.ema([0.9, 0.99], update_every=2)
        text = jax.jit(avg.update, donate_argnums=0).lower(avg.init(params), params).compile().as_text()
        return text.count(" copy(")

    assert copies(6) == copies(12) <= 4
