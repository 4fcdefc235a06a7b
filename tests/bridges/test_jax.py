"""fastema.jax.EMA and JAX arrays at the array level, on the CPU: float64 references, a jitted
training loop, pytree structure and dtypes, checkpoints, bad input."""
import pickle
import re
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.jax_x64 import enable_x64

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from backend_runs import run_on, script  # noqa: E402
from reference import ULP, assert_close_to_reference  # noqa: E402

import fastema  # noqa: E402
from fastema.average import Plan  # noqa: E402
from fastema.jax import EMA  # noqa: E402
from fastema.schedules import NumUpdates, PowerWarmup  # noqa: E402


class Block(NamedTuple):
    w: object
    b: object


def init_params(key, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    return {"layers": [Block(jax.random.normal(k1, (6, 32), dtype) * 0.3, jnp.zeros(32, dtype)),
                       Block(jax.random.normal(k2, (32, 1), dtype) * 0.3, jnp.zeros(1, dtype))],
            "step": jnp.array(0, jnp.int32)}


def forward(params, x):
    h = x.astype(params["layers"][0].w.dtype)
    for i, layer in enumerate(params["layers"]):
        h = h @ layer.w + layer.b
        if i == 0:
            h = jnp.tanh(h)
    return h.astype(jnp.float32)


@jax.jit
def train_step(params, x, y):
    def loss_fn(p):
        return jnp.mean((forward(p, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn, allow_int=True)(params)
    new_layers = jax.tree_util.tree_map(lambda p, g: (p - 0.1 * g.astype(jnp.float32)).astype(p.dtype),
                                        params["layers"], grads["layers"])
    return {"layers": new_layers, "step": params["step"] + 1}, loss


def batches(steps, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((32, 6)).astype(np.float32)
        yield jnp.asarray(x), jnp.asarray(np.sin(x[:, :1]))


def float_leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree) if x.dtype != jnp.int32]


@pytest.mark.parametrize("decay", [0.95, NumUpdates(0.95), PowerWarmup(0.95, update_after_step=3)],
                         ids=["constant", "num_updates", "power"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jitted_training_loop_matches_float64_reference(decay, dtype):
    params = init_params(jax.random.PRNGKey(0), dtype)
    ema = EMA(params, decay)
    ref = float_leaves(params)
    losses = []
    for n, (x, y) in enumerate(batches(60), start=1):
        params, loss = train_step(params, x, y)
        losses.append(loss)
        ema.update(params)
        d = Plan(decay).schedules[0](n)
        ref = [d * r + (1 - d) * p for r, p in zip(ref, float_leaves(params))]
    assert float(losses[-1]) < float(losses[0])            # it trained
    state = ema.state_dict()
    names = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if x.dtype != jnp.int32]
    for name, r in zip(names, ref):
        assert_close_to_reference(state["averaged"][name][0], r, "float32", 60 * (np.abs(r) + 1e-3))
    assert len(state["averaged"]) == len(ref)
    shadow = ema.shadow()
    assert jax.tree_util.tree_structure(shadow) == jax.tree_util.tree_structure(params)
    for s, p in zip(jax.tree_util.tree_leaves(shadow), jax.tree_util.tree_leaves(params)):
        assert (s.dtype, s.shape) == (p.dtype, p.shape)
    assert int(shadow["step"]) == 60                          # integer leaves: the latest value
    for s, r in zip(float_leaves(shadow), ref):               # rounded once to the parameter dtype
        assert_close_to_reference(s, r, np.dtype(dtype).name, 60 * (np.abs(r) + 1e-3))


def test_matches_the_jax_native_tree_map_lerp():
    params = init_params(jax.random.PRNGKey(1))
    shadow_ref = params
    lerp = jax.jit(lambda s, p: jax.tree_util.tree_map(
        lambda a, b: a + (1 - 0.9) * (b - a) if a.dtype != jnp.int32 else b, s, p))
    ema = EMA(params, 0.9)
    for x, y in batches(20):
        params, _ = train_step(params, x, y)
        ema.update(params)
        shadow_ref = lerp(shadow_ref, params)
    for a, b in zip(jax.tree_util.tree_leaves(ema.shadow()), jax.tree_util.tree_leaves(shadow_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=4 * ULP["float32"], atol=1e-7)


def test_several_decays_debias_and_update_every():
    p = {"a": jnp.ones(5), "b": jnp.full((2, 3), 2.0)}
    ema = EMA(p, [0.5, 0.9], debias=True, update_every=2)
    ref = {k: np.zeros((2,) + v.shape) for k, v in p.items()}
    norms = [0.0, 0.0]
    for i in range(7):
        p = jax.tree_util.tree_map(lambda x: x * 1.5 + 1, p)
        ema.update(p)
        if i % 2 == 0:                                       # the first call updates, then every 2nd
            for r, d in enumerate((0.5, 0.9)):
                norms[r] = d * norms[r] + (1 - d)
                for k in ref:
                    ref[k][r] = d * ref[k][r] + (1 - d) * np.asarray(p[k], np.float64)
    assert ema.updates == 4 and ema.plan.calls == 7
    for r in range(2):
        shadow = ema.shadow(r)
        for k in ref:                                        # debiased: e / c
            np.testing.assert_allclose(np.asarray(shadow[k]), ref[k][r] / norms[r], rtol=1e-6)


def test_shadow_is_a_copy_and_bfloat16_stays_bfloat16():
    p = {"w": jnp.ones((4, 4), jnp.bfloat16)}
    ema = EMA(p, 0.999)
    first = ema.shadow()
    for _ in range(200):                                    # 1e-3 steps vanish in bfloat16, not in float32
        ema.update({"w": jnp.full((4, 4), 2.0, jnp.bfloat16)})
    later = ema.shadow()
    assert float(first["w"][0, 0]) == 1.0
    assert later["w"].dtype == jnp.bfloat16
    expected = 2.0 - 0.999 ** 200                           # float32 shadow: it moved
    assert abs(float(later["w"][0, 0]) - expected) <= ULP["bfloat16"] * expected


def test_resume_equals_uninterrupted_run(tmp_path):
    def run(steps, ema=None, params=None, start=0):
        params = init_params(jax.random.PRNGKey(2)) if params is None else params
        ema = EMA(params, PowerWarmup(0.9)) if ema is None else ema
        for i, (x, y) in enumerate(batches(start + steps)):
            if i < start:
                continue
            params, _ = train_step(params, x, y)
            ema.update(params)
        return ema, params

    full, _ = run(20)
    half, params = run(10)
    path = tmp_path / "ema.pkl"
    path.write_bytes(pickle.dumps(half.state_dict()))
    resumed = EMA(params, 0.5)                               # settings come from the checkpoint
    resumed.load_state_dict(pickle.loads(path.read_bytes()))
    run(10, resumed, params, start=10)
    assert resumed.updates == full.updates == 20
    for a, b in zip(jax.tree_util.tree_leaves(resumed.shadow()), jax.tree_util.tree_leaves(full.shadow())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_corrupt_checkpoints_are_refused_and_change_nothing():
    p = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    ema = EMA(p, 0.9)
    ema.update({"w": jnp.full((2, 3), 3.0), "b": jnp.ones(3)})
    before = ema.state_dict()
    good = ema.state_dict()
    bad_cases = [
        ({**good, "format": "fastema.torch.EMA"}, "not a fastema.jax.EMA"),
        ({**good, "version": 99}, "version"),
        ({**good, "averaged": {"['w']": good["averaged"]["['w']"]}}, "missing"),
        ({**good, "averaged": {**good["averaged"], "['w']": np.zeros((1, 3, 2), np.float32)}}, "shape"),
        ({**good, "averaged": {**good["averaged"], "['b']": np.full((1, 3), np.nan, np.float32)}}, "NaN"),
        ({**good, "schedules": []}, "decay"),
        ("not a dict", "not a fastema.jax.EMA"),
    ]
    for state, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            ema.load_state_dict(state)
    after = ema.state_dict()
    for k in before["averaged"]:
        np.testing.assert_array_equal(after["averaged"][k], before["averaged"][k])
    assert after["updates"] == before["updates"]


def test_a_checkpoint_of_another_shadow_dtype_is_refused_and_changes_nothing():
    # a float32 shadow's state loaded into a bfloat16 one was rounded into it without a word
    # (fastema.tensorflow.EMA refuses it; jax.md lists another dtype among what is refused)
    p = {"w": jnp.asarray([1.0, 3.0], jnp.float32)}
    src = EMA(p, 0.9)
    src.update({"w": jnp.asarray([1.00123, 2.99987], jnp.float32)})
    dst = EMA(p, 0.9, shadow_dtype="bfloat16")
    before = dst.state_dict()
    with pytest.raises(ValueError, match=r"this EMA keeps it as bfloat16 \(shadow_dtype=\)"):
        dst.load_state_dict(src.state_dict())
    after = dst.state_dict()
    assert after["updates"] == before["updates"] == 0
    np.testing.assert_array_equal(after["averaged"]["['w']"], before["averaged"]["['w']"])


def test_an_average_that_nan_reached_is_named_at_every_save():
    """Issue 85 item 2: an update with the guard off takes a NaN into the average; every save warns,
    naming the leaf, and records it; the record survives pickle, and a load still refuses the NaN."""
    ema = EMA({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, 0.9)
    assert "nonfinite" not in ema.state_dict()
    ema.update({"w": jnp.ones((2, 3)), "b": jnp.array([0.0, np.nan, 0.0])})
    with pytest.warns(RuntimeWarning, match=re.escape("""holds inf or NaN in "['b']". The checkpoint""")):
        state = ema.state_dict()
    assert pickle.loads(pickle.dumps(state))["nonfinite"] == ["['b']"]
    with pytest.raises(ValueError, match=r"\['b'\]\" holds inf or NaN"):
        EMA({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, 0.9).load_state_dict(state)


def test_an_average_that_nan_reached_is_refused_until_repaired_and_loads_only_when_allowed():
    """Issue 85 item 2 on the JAX face: shadow() (what ships the average) refuses it by name unless
    allowed; a load refuses it offering allow_nonfinite=True then repair_nonfinite(); allowed, it loads
    with a warning; repair_nonfinite(params) resets the poisoned leaf from the live parameters (rounded to
    the shadow's dtype), every other leaf and row bit for bit."""
    live = {"w": jnp.full((2, 3), 2.0), "b": jnp.array([0.5, 1.5, -2.5])}
    ema = EMA({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, [0.9, 0.5])
    ema.update({"w": jnp.ones((2, 3)), "b": jnp.array([0.0, np.nan, 0.0])})
    with pytest.warns(RuntimeWarning):
        state = ema.state_dict()
    with pytest.raises(ValueError, match=r"^fastema\.jax\.EMA\.shadow\(\): average 1 holds inf or NaN in "
                                         r"\"\['b'\]\".*repair_nonfinite\(\).*allow_nonfinite=True"):
        ema.shadow(1)
    assert np.isnan(np.asarray(ema.shadow(1, allow_nonfinite=True)["b"])).any()
    fresh = EMA(live, [0.9, 0.5])
    with pytest.raises(ValueError, match=r"checkpoint's averaged \"\['b'\]\" holds inf or NaN\. "
                                         r"To load it all the same and repair it, pass allow_nonfinite=True"):
        fresh.load_state_dict(state)
    assert fresh.updates == 0
    with pytest.warns(RuntimeWarning, match=r"loaded holds inf or NaN.*allow_nonfinite"):
        fresh.load_state_dict(state, allow_nonfinite=True)
    assert fresh.repair_nonfinite(live) == ["['b']"]
    repaired = fresh.state_dict()["averaged"]
    np.testing.assert_array_equal(repaired["['b']"], np.stack([np.asarray(live["b"])] * 2))
    np.testing.assert_array_equal(repaired["['w']"], state["averaged"]["['w']"])      # bit for bit
    assert fresh.repair_nonfinite(live) == []


@pytest.mark.parametrize("dtype, shadow, value, past", [
    (jnp.float32, "float32", np.float64(1e300), "float32"),  # float64 1e300 into a float32 average: inf
    (jnp.float16, "same", np.float32(1e5), "float16"),       # float32 1e5 into a float16 average: inf
    (jnp.float32, "float64", np.float64(1e300), None),       # a float64 average holds it
])
def test_a_load_checks_finiteness_in_the_averages_dtype(dtype, shadow, value, past):
    """The engine checked np.isfinite(a.astype(float32)): a float16 average took inf from a float32 1e5,
    and a float64 average's own 1e300 was refused."""
    ema = EMA({"b": jnp.zeros(3, dtype)}, 0.9, shadow_dtype=shadow)
    state = ema.state_dict()
    state["averaged"]["['b']"] = np.full((1, 3), value, type(value))
    if past is None:
        ema.load_state_dict(state)
        assert ema.state_dict()["averaged"]["['b']"][0, 0] == value
    else:
        with pytest.raises(ValueError, match=r"averaged \"\['b'\]\" holds inf or NaN as it lands \(\"\['b'\]\" finite "
                                             rf"in the checkpoint but past the range of the average's {past}: inf "
                                             r"once converted\)\. To load it all the same and repair it"):
            ema.load_state_dict(state)


def test_bad_inputs_get_clear_errors_and_change_nothing():
    p = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.bfloat16)}
    ema = EMA(p, 0.9)
    with pytest.raises(ValueError, match="structure"):
        ema.update({"w": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match=r"\['b'\] was bfloat16\[3\].*now float32\[3\]"):
        ema.update({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"now float32\[3, 2\]"):
        ema.update({"w": jnp.ones((3, 2)), "b": jnp.zeros(3, jnp.bfloat16)})
    with pytest.raises(TypeError, match="JAX arrays"):
        ema.update({"w": 1.0, "b": jnp.zeros(3, jnp.bfloat16)})
    assert ema.updates == 0 and ema.plan.calls == 0
    np.testing.assert_array_equal(np.asarray(ema.shadow()["w"]), np.ones((2, 3)))
    with pytest.raises(ValueError, match="no float64/float32"):
        EMA({"n": jnp.arange(3)})
    with pytest.raises(ValueError, match="decay must be"):
        EMA(p, 1.5)
    with pytest.raises(ValueError, match="shadow_dtype='bfloat16'"):
        EMA(p, rounding="stochastic")


def test_skip_nonfinite_leaves_the_average_alone():
    p = {"w": jnp.ones(4)}
    ema = EMA(p, 0.5, skip_nonfinite=True)
    ema.update({"w": jnp.array([1.0, jnp.nan, 3.0, 4.0])})
    np.testing.assert_array_equal(np.asarray(ema.shadow()["w"]), np.ones(4))
    ema.update({"w": jnp.full(4, 3.0)})
    np.testing.assert_array_equal(np.asarray(ema.shadow()["w"]), np.full(4, 2.0))


def test_bfloat16_shadow_with_stochastic_rounding_moves_on_average():
    p = {"w": jnp.ones(4096, jnp.bfloat16)}
    ema = EMA(p, 0.999, shadow_dtype="bfloat16", rounding="stochastic", seed=3)
    for _ in range(100):
        ema.update({"w": jnp.full(4096, 2.0, jnp.bfloat16)})
    mean = float(jnp.mean(ema.shadow()["w"].astype(jnp.float32)))
    expected = 2.0 - 0.999 ** 100
    assert abs(mean - expected) < 0.01                      # nearest rounding would stay at 1.0


# ------------------------------------------------------------------ the array level

@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.sampled_from(["float32", "bfloat16", "float16"]))
def test_ema_update_reads_jax_arrays_of_every_dtype(n, decay, dtype):
    rng = np.random.default_rng(n)
    shadow = rng.standard_normal(n).astype(np.float32)
    src = jnp.asarray(rng.standard_normal(n).astype(np.float32)).astype(dtype)
    ref = (decay * shadow.astype(np.float64) + (1 - decay) * np.asarray(src, np.float64))
    scale = np.abs(shadow.astype(np.float64)) + np.abs(np.asarray(src, np.float64))
    fastema.ema_update_(shadow, src, decay)
    assert_close_to_reference(shadow, ref, "float32", scale)


def test_writing_into_a_jax_array_points_to_fastema_jax():
    x = jnp.ones(3)
    with pytest.raises(ValueError, match="fastema.jax.EMA"):
        fastema.ema_update_(x, np.zeros(3, np.float32), 0.5)
    with pytest.raises(ValueError, match="fastema.jax.EMA"):
        fastema.copy_(x, np.zeros(3, np.float32))
    np.testing.assert_array_equal(np.asarray(x), np.ones(3))
    with pytest.raises(TypeError, match="int32"):
        fastema.ema_update_(np.zeros(3, np.float32), jnp.arange(3), 0.5)


def test_a_deleted_jax_array_is_refused_by_name():
    """A donated or deleted JAX array as a source: said, where DLPack's own error was a TypeError
    about a NoneType."""
    src = jnp.ones(3)
    src.delete()
    shadow = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="src is a deleted JAX array .* pass the array that function returned"):
        fastema.ema_update_(shadow, src, 0.5)
    np.testing.assert_array_equal(shadow, np.zeros(3))


def test_a_traced_jax_array_given_to_an_array_function_is_refused_by_name():
    """fastema.ema_update_ called inside jax.jit on a traced array raised JAX's own
    ConcretizationTypeError from fastema's code (is_deleted() on a tracer): said, with the roads that
    work inside jit."""
    shadow = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match=r"src is a traced JAX array .*fastema\.jax\.ema\(\) inside jit"):
        jax.jit(lambda x: fastema.ema_update_(shadow, x, 0.5))(jnp.ones(3))
    np.testing.assert_array_equal(shadow, np.zeros(3))


def test_float64_leaves_are_averaged_and_complex_leaves_refused():
    # reliability L5: float64 and complex leaves were carried as their latest value
    with enable_x64(True):
        params = {"w": jnp.linspace(-1.0, 1.0, 40, dtype=jnp.float64), "n": jnp.zeros(3, jnp.int32)}
        ema = EMA(params, 0.9)
        ref = np.asarray(params["w"]).copy()
        for k in range(3):
            params = {"w": params["w"] + 0.25, "n": params["n"] + 1}
            ema.update(params)
            ref = ref + (1 - 0.9) * (np.asarray(params["w"]) - ref)
        out = ema.shadow()
        assert out["w"].dtype == jnp.float64 and np.allclose(np.asarray(out["w"]), ref, rtol=0, atol=1e-15)
        assert np.array_equal(np.asarray(out["n"]), [3, 3, 3])
        with pytest.raises(TypeError, match="complex"):
            EMA({"z": jnp.zeros(3, jnp.complex64), "w": jnp.zeros(3)}, 0.9)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_update_inside_jax_jit_equals_the_update_outside(dtype):
    """ema.update() inside the jitted step (an ordered io_callback that runs the eager update on
    the values the step computed, every call) equals update() on what the step returns."""
    params = init_params(jax.random.PRNGKey(0), dtype)
    inside = EMA(params, [PowerWarmup(0.95), PowerWarmup(0.8)], update_every=2)
    outside = EMA(params, [PowerWarmup(0.95), PowerWarmup(0.8)], update_every=2)

    @jax.jit
    def step_with_ema(params, x, y):
        params, loss = train_step(params, x, y)
        inside.update(params)
        return params, loss

    for x, y in batches(9):
        params, _ = step_with_ema(params, x, y)
        outside.update(params)
    a, b = inside.state_dict(), outside.state_dict()
    assert (a["updates"], a["calls"]) == (b["updates"], b["calls"]) == (5, 9)
    for k in a["averaged"]:
        np.testing.assert_array_equal(a["averaged"][k], b["averaged"][k])
    assert int(inside.shadow()["step"]) == 9               # integer leaves: the latest value


def test_a_step_eager_refuses_is_refused_inside_jax_jit_too():
    """Inside jax.jit any step was cast to an int and any negative one read as "no step": 7.9 counted
    as 7, -1 and a traced -3 as no step (eager refuses each). A concrete step is checked as eager
    checks it, a traced one must be an integer scalar, and a traced value eager refuses is refused by
    the update (in the callback); nothing is counted for a refused step."""
    params = {"w": jnp.zeros(4)}
    ema = EMA(params, NumUpdates(0.999))
    ones = {"w": jnp.ones(4)}
    for step in (-1, 7.9, True):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            jax.jit(lambda p, s=step: ema.update(p, s))(ones)
    for bad in (jnp.float32(2.0), jnp.arange(2)):
        with pytest.raises(ValueError, match="step must be an integer scalar"):
            jax.jit(lambda p, s: ema.update(p, s))(ones, bad)
    with pytest.raises(Exception, match="step must be an int >= 0, got -3"):   # (JAX wraps the callback's)
        jax.jit(lambda p, s: ema.update(p, s))(ones, jnp.int32(-3))
        jax.effects_barrier()
    assert ema.updates == 0
    jax.jit(lambda p, s: ema.update(p, s))(ones, jnp.int32(5))
    jax.jit(lambda p: ema.update(p))(ones)
    jax.effects_barrier()
    assert ema.updates == 2


def test_a_leaf_eager_refuses_is_refused_when_traced_inside_jax_jit():
    """Inside jax.jit a leaf of another shape or dtype, or another structure, was refused only in the
    callback, which JAX shows as its own 'INTERNAL: CpuCallback error'. Refused when traced, with eager's
    message; nothing is counted, and the right leaves are then averaged as the naive float64 EMA."""
    ema = EMA({"w": jnp.zeros(3), "n": jnp.zeros((), jnp.int32)}, 0.9)
    bad = [({"w": jnp.zeros(4), "n": jnp.int32(0)}, r"leaf \['w'\] was float32\[3\] .* now float32\[4\]"),
           ({"w": jnp.zeros(3, jnp.bfloat16), "n": jnp.int32(0)}, r"leaf \['w'\] was float32\[3\] .* bfloat16\[3\]"),
           ({"w": jnp.zeros(3), "n": jnp.float32(0)}, r"leaf \['n'\] was int32\[\] .* now float32\[\]"),
           ({"w": jnp.zeros(3)}, r"structure the EMA was made for \(missing \[\"\['n'\]\"\]")]
    for params, match in bad:
        with pytest.raises(ValueError, match=match + ".*Nothing was updated"):
            jax.jit(lambda p: ema.update(p))(params)
            jax.effects_barrier()
    assert ema.updates == 0
    w = jnp.asarray([1.0, -2.0, 0.5])
    jax.jit(lambda p: ema.update(p))({"w": w, "n": jnp.int32(1)})
    jax.effects_barrier()
    np.testing.assert_allclose(np.asarray(ema.shadow()["w"], np.float64), 0.1 * np.asarray(w, np.float64), rtol=1e-6)
    assert ema.updates == 1


def test_donating_jit_loop_keeps_the_integer_leaves():
    """jax.jit(step, donate_argnums=0) deletes the arrays of the step's input: shadow() used to return the
    deleted integer leaves the last update kept by reference ("Array has been deleted")."""
    step = jax.jit(lambda p, x, y: train_step(p, x, y)[0], donate_argnums=0)
    params = init_params(jax.random.PRNGKey(0))
    ema = EMA(params, 0.8)
    first = params
    ref = float_leaves(params)
    for i, (x, y) in enumerate(batches(6)):
        params = step(params, x, y)
        if i == 0:
            assert first["step"].is_deleted()               # the loop donates: the EMA's own copy is read
            assert int(ema.shadow()["step"]) == 0
        ema.update(params)
        ref = [0.8 * r + 0.2 * w for r, w in zip(ref, float_leaves(params))]
    seen = params
    params = step(params, *next(batches(1, seed=9)))        # donates the arrays the last update saw
    assert seen["step"].is_deleted()
    out = ema.shadow()
    assert out["step"].dtype == jnp.int32 and int(out["step"]) == 6
    for got, want in zip(float_leaves(out), ref):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert int(params["step"]) == 7


def test_an_integer_leaf_is_copied_again_only_when_it_is_another_array():
    """The leaves not averaged are kept as copies (donation deletes the caller's): one device copy
    per leaf per update was paid even for a large integer leaf passed unchanged; now only a leaf
    that is not the array the last update copied is copied (JAX arrays are immutable). Seen in the
    copies the EMA keeps: the same copy object while the leaf is the same array."""
    mask = jnp.arange(4096, dtype=jnp.int32)            # the same array at every update
    params = {"w": jnp.ones(8), "mask": mask, "n": jnp.zeros((), jnp.int32)}
    ema = EMA(params, 0.5)

    def kept():                                         # leaf name -> the copy the EMA holds
        return {nm.strip("[]'"): k[1] for nm, k in zip(ema.names, ema._others) if k is not None}

    first = kept()
    assert sorted(first) == ["mask", "n"] and first["mask"] is not mask
    for _ in range(3):
        params = {"w": params["w"] + 1, "mask": mask, "n": params["n"] + 1}
        before = kept()
        ema.update(params)
        after = kept()
        assert after["mask"] is before["mask"] is first["mask"]   # not copied again
        assert after["n"] is not before["n"]                       # the counter, a new array each step
    out = ema.shadow()
    assert int(out["n"]) == 3 and np.array_equal(np.asarray(out["mask"]), np.arange(4096))
    ema.update({"w": params["w"], "mask": mask + 1, "n": params["n"]})   # another array: copied
    assert kept()["mask"] is not first["mask"]
    assert np.array_equal(np.asarray(ema.shadow()["mask"]), np.arange(4096) + 1)


def test_donating_what_shadow_returned_leaves_the_ema_its_integer_leaves():
    """shadow() handed out the EMA's own copies of the integer leaves: restarting a donating loop
    from the average (params = ema.shadow()) deleted them, and the next shadow() failed."""
    step = jax.jit(lambda p: {"w": p["w"] + 1, "n": p["n"] + 1}, donate_argnums=0)
    ema = EMA({"w": jnp.ones(8), "n": jnp.array(7, jnp.int32)}, 0.5)
    params = ema.shadow()
    step(params)
    assert params["n"].is_deleted()
    assert int(ema.shadow()["n"]) == 7


def test_a_donating_training_loop_reads_the_average_after_every_step():
    """A jax.jit(step, donate_argnums=0) loop with an integer step counter: shadow() after every step (and
    after the next step donated what the update read) equals a float64 reference, the counter its value at
    the last update; the EMA keeps no leaf the loop deletes (round-3 leftover, buffer donation)."""
    step = jax.jit(lambda p, x, y: train_step(p, x, y)[0], donate_argnums=0)
    params = init_params(jax.random.PRNGKey(3))
    ema = EMA(params, [0.9, 0.5])
    refs = [float_leaves(params), float_leaves(params)]
    for n, (x, y) in enumerate(batches(8, seed=4), start=1):
        given = params
        params = step(params, x, y)
        assert given["step"].is_deleted()                       # the loop donates
        ema.update(params)
        refs = [[d * r + (1 - d) * w for r, w in zip(ref, float_leaves(params))] for d, ref in zip((0.9, 0.5), refs)]
        for row in (0, 1):
            out = ema.shadow(row)
            assert int(out["step"]) == n
            for got, want in zip(float_leaves(out), refs[row]):
                np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    step(params, x, y)                                       # donates the arrays the last update read
    assert int(ema.shadow()["step"]) == 8 and len(float_leaves(ema.shadow(1))) == 4


@pytest.mark.parametrize("leaf", ["['layers'][0].w", "['step']"])
def test_a_donated_leaf_given_to_update_is_refused_by_name_and_nothing_changes(leaf):
    """update() or EMA() of a leaf a jitted step has donated (deleted) is a ValueError naming the leaf and
    the way out, with nothing changed (it was JAX's bare 'Buffer has been deleted or donated', naming no
    leaf). The check runs only once the read failed: nothing is added to the per-step path."""
    donate = jax.jit(lambda p: jax.tree_util.tree_map(lambda a: a + 1, p), donate_argnums=0)
    params = init_params(jax.random.PRNGKey(0))
    ema = EMA(params, 0.5)
    before = ema.state_dict()
    stale = init_params(jax.random.PRNGKey(1))
    donate(stale)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    mixed = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [
        s if n == leaf else p for n, p, s in zip(names, jax.tree_util.tree_leaves(params),
                                                jax.tree_util.tree_leaves(stale))])
    with pytest.raises(ValueError, match=rf"leaf {re.escape(leaf)} was deleted .*donate_argnums.*the arrays the "
                                         r"step returns.*Nothing was updated"):
        ema.update(mixed)
    after = ema.state_dict()
    assert (after["updates"], after["calls"]) == (before["updates"], before["calls"]) == (0, 0)
    for k in before["averaged"]:
        np.testing.assert_array_equal(after["averaged"][k], before["averaged"][k])
    assert int(ema.shadow()["step"]) == 0
    with pytest.raises(ValueError, match=rf"leaf {re.escape(leaf)} was deleted .*donate_argnums"):
        EMA(mixed, 0.5)
    ema.update(params)                                       # the live arrays: updated as ever
    assert ema.updates == 1


SHARDED = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fastema.jax import EMA
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
rng = np.random.default_rng(0)
host = [{"w": rng.standard_normal((8, 6)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32),
         "r": rng.standard_normal(4).astype(np.float32)} for _ in range(4)]
specs = {"w": P("x", "y"), "b": P("y"), "r": P()}           # sharded 2x2, sharded and replicated, replicated
put = lambda h: {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in h.items()}
ema = EMA(put(host[0]), [0.5, 0.9], shadow_dtype="bfloat16", rounding="stochastic", seed=5)
one = EMA({k: jnp.asarray(v) for k, v in host[0].items()}, [0.5, 0.9], shadow_dtype="bfloat16",
          rounding="stochastic", seed=5)
for h in host[1:]:
    ema.update(put(h))
    one.update({k: jnp.asarray(v) for k, v in h.items()})
out = {"sources": len(ema.state_dict()["averaged"])}
for row in (0, 1):
    sharded, plain = ema.shadow(row), one.shadow(row)
    out[f"shardings_{row}"] = all(sharded[k].sharding == NamedSharding(mesh, specs[k]) for k in specs)
    # each shard averaged on its own: the noise indices are the shard's, so bfloat16 stochastic
    # rounding may differ by an ulp of bfloat16 from the one-array average; nearest rounding below
    out[f"close_{row}"] = max(float(np.max(np.abs(np.asarray(sharded[k]) - np.asarray(plain[k])))) for k in specs)
near = EMA(put(host[0]), 0.9)
near_one = EMA({k: jnp.asarray(v) for k, v in host[0].items()}, 0.9)
for h in host[1:]:
    near.update(put(h))
    near_one.update({k: jnp.asarray(v) for k, v in h.items()})
out["equal"] = all(np.array_equal(np.asarray(near.shadow()[k]), np.asarray(near_one.shadow()[k])) for k in specs)
try:
    near.update(put(host[0]) | {"w": jax.device_put(jnp.asarray(host[0]["w"]), NamedSharding(mesh, P("y", "x")))})
except ValueError as err:
    out["moved"] = str(err)
flat = Mesh(np.array(jax.devices()).reshape(4), ("z",))        # another mesh of the same devices
renamed = Mesh(mesh.devices, ("p", "q"))
same = {"w": NamedSharding(renamed, P("p", "q")), "b": NamedSharding(renamed, P("q")),
        "r": NamedSharding(flat, P())}                         # each equivalent to the leaf's own sharding
out["equivalent"] = all(same[k].is_equivalent_to(NamedSharding(mesh, specs[k]), host[0][k].ndim) and
                        same[k] != NamedSharding(mesh, specs[k]) for k in specs)
near.update({k: jax.device_put(jnp.asarray(v), same[k]) for k, v in host[0].items()})
near_one.update({k: jnp.asarray(v) for k, v in host[0].items()})
out["equal_after"] = all(np.array_equal(np.asarray(near.shadow()[k]), np.asarray(near_one.shadow()[k])) for k in specs)
print(json.dumps(out))
"""

script("SHARDED", SHARDED, ("jax4",))


def test_an_array_sharded_over_devices_is_averaged_shard_by_shard():
    """jax.Arrays on a 2x2 mesh of (fake CPU) devices: each distinct shard is a source of the shadow
    on its device (2x2 + 2 + 1: the replicated shards once), shadow() gives the leaves back with
    their shardings, equal to the EMA of the same arrays on one device; a leaf resharded is refused."""
    res = run_on("jax4", "SHARDED")
    assert res["sources"] == 4 + 2 + 1
    assert res["shardings_0"] and res["shardings_1"] and res["equal"]
    assert res["close_0"] < 0.05 and res["close_1"] < 0.05
    assert "was on" in res["moved"] and "Nothing was updated" in res["moved"]
    assert res["equivalent"] and res["equal_after"]          # an equivalent sharding object is taken


def test_an_equivalent_sharding_object_is_taken():
    """A jitted step whose out_shardings is a NamedSharding over a one-device mesh returns the leaf on the
    same device, in the same layout, as an object that is not equal to its SingleDeviceSharding: it was
    refused as moved. Taken (is_equivalent_to), and averaged as the naive float64 EMA."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    params = {"w": jnp.asarray([1.0, -2.0, 4.0], jnp.float32)}
    ema = EMA(params, 0.5)
    step = jax.jit(lambda p: {"w": p["w"] * 3 + 1}, out_shardings=NamedSharding(mesh, PartitionSpec()))
    new = step(params)
    assert new["w"].sharding != params["w"].sharding
    ema.update(new)
    want = 0.5 * np.asarray(params["w"], np.float64) + 0.5 * np.asarray(new["w"], np.float64)
    np.testing.assert_allclose(np.asarray(ema.shadow()["w"], np.float64), want, rtol=1e-7)
    assert ema.shadow()["w"].sharding == params["w"].sharding


def test_a_resume_gives_back_the_leaves_that_are_not_averaged():
    # shadow() of a resumed EMA gave the integer leaves' values at construction (step 0) until the
    # next update: the checkpoint kept the averages only
    p = {"w": jnp.asarray([1.0, 3.0], jnp.float32), "step": jnp.asarray(0, jnp.int32)}
    src = EMA(p, 0.9)
    for i in range(1, 4):
        src.update({"w": p["w"] + i, "step": jnp.asarray(i, jnp.int32)})
    state = src.state_dict()
    dst = EMA(p, 0.9)
    dst.load_state_dict(state)
    for k, v in src.shadow().items():
        np.testing.assert_array_equal(dst.shadow()[k], v)
        assert dst.shadow()[k].dtype == v.dtype
    dst.update({"w": p["w"] + 4, "step": jnp.asarray(4, jnp.int32)})
    assert int(dst.shadow()["step"]) == 4
    old = {k: v for k, v in state.items() if k != "kept"}      # written before the leaves were kept
    fresh = EMA(p, 0.9)
    fresh.load_state_dict(old)
    assert int(fresh.shadow()["step"]) == 0 and fresh.updates == 3
    refusals = (({"['step']": np.asarray(3, np.int64)}, r"'kept' \['step'\] is int64\[\], expect"),
                ({}, r"'kept' holds \[\], this EMA's leaves that are not averaged are \[\"\['step"))
    for bad, match in refusals:
        other = EMA(p, 0.9)
        with pytest.raises(ValueError, match=match):
            other.load_state_dict({**state, "kept": bad})
        assert other.updates == 0 and int(other.shadow()["step"]) == 0


def test_a_typed_prng_key_leaf_saves_and_loads():
    # state_dict() raised TypeError once it kept the leaves that are not averaged: no NumPy array
    # holds a typed key (jax.random.key); it is left as it is at a load, as before
    p = {"w": jnp.ones(3), "rng": jax.random.key(0), "step": jnp.asarray(0, jnp.int32)}
    src = EMA(p, 0.9)
    src.update({"w": jnp.full(3, 2.0), "rng": jax.random.key(1), "step": jnp.asarray(1, jnp.int32)})
    state = src.state_dict()
    assert sorted(state["kept"]) == ["['step']"]
    dst = EMA(p, 0.9)
    dst.load_state_dict(state)
    out = dst.shadow()
    assert int(out["step"]) == 1 and out["rng"].dtype == p["rng"].dtype
    np.testing.assert_array_equal(out["w"], src.shadow()["w"])
