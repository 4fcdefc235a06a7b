"""fastema.tensorflow.EMA and TensorFlow tensors at the array level, on the CPU: a GradientTape
training loop against a float64 reference, mixed precision, exact swaps, checkpoints, bad input."""
import os
import pickle

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

from reference import assert_close_to_reference  # noqa: E402

import fastema  # noqa: E402
from fastema.average import Plan  # noqa: E402
from fastema.tensorflow import EMA  # noqa: E402


class MLP(tf.Module):
    def __init__(self, dtype=tf.float32, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w1 = tf.Variable(rng.normal(0, 0.3, (6, 32)).astype(np.float32), name="w1")
        self.b1 = tf.Variable(np.zeros(32, np.float32), name="b1")
        self.w2 = tf.Variable(tf.cast(rng.normal(0, 0.3, (32, 1)).astype(np.float32), dtype), name="w2")
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, x):
        h = tf.tanh(x @ self.w1 + self.b1)
        return h @ tf.cast(self.w2, tf.float32)


def batches(steps, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((32, 6)).astype(np.float32)
        yield tf.constant(x), tf.constant(np.sin(x[:, :1]))


def make_step(model):
    # plain SGD written out, so bfloat16/float16 variables step in float32 and round once
    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        for v, g in zip(model.trainable_variables, grads):
            v.assign(tf.cast(tf.cast(v, tf.float32) - 0.1 * tf.cast(g, tf.float32), v.dtype))
        model.steps.assign_add(1)
        return loss
    return step


def values(variables):
    return [np.asarray(v.numpy(), np.float64) for v in variables]


@pytest.mark.parametrize("warmup", [None, "num_updates", "power"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16])
def test_training_loop_matches_float64_reference(warmup, dtype):
    model = MLP(dtype)
    ema = EMA(model, 0.95, warmup=warmup, update_after_step=3)
    assert [v.name for v in ema.variables] == [v.name for v in model.trainable_variables]
    ref = values(ema.variables)
    step = make_step(model)
    losses = []
    sched = Plan(0.95, warmup=warmup, update_after_step=3).schedules[0]
    for n, (x, y) in enumerate(batches(60), start=1):
        losses.append(float(step(x, y)))
        ema.update()
        d = sched(n)
        ref = [d * r + (1 - d) * v for r, v in zip(ref, values(ema.variables))]
    assert losses[-1] < losses[0]
    state = ema.state_dict()
    for name, r in zip(ema.names, ref):                    # the float32 shadow, whatever the variable dtype
        assert_close_to_reference(state["averaged"][name][0], r, "float32", 60 * (np.abs(r) + 1e-3))
    for a, v, r in zip(ema.averages(), ema.variables, ref):
        assert a.dtype == v.dtype and a.shape == v.shape
        assert_close_to_reference(a.numpy(), r, v.dtype.name, 60 * (np.abs(r) + 1e-3))


def test_float32_shadow_keeps_moving_for_bfloat16_variables():
    v = tf.Variable(tf.ones(64, tf.bfloat16))
    ema32, ema16 = EMA([v], 0.999), EMA([v], 0.999, shadow_dtype="same")
    v.assign(tf.fill([64], tf.constant(2.0, tf.bfloat16)))
    for _ in range(300):
        ema32.update()
        ema16.update()
    expected = 2.0 - 0.999 ** 300
    assert abs(float(ema32.state_dict()["averaged"][ema32.names[0]][0, 0]) - expected) < 1e-5
    assert float(ema16.averages()[0][0]) == 1.0          # a bfloat16 shadow stalls: 1e-3 steps round away


def test_swap_and_back_are_exact_and_survive_an_exception():
    model = MLP(tf.bfloat16)
    ema = EMA(model, 0.9)
    step = make_step(model)
    for x, y in batches(5):
        step(x, y)
        ema.update()
    raw = [v.numpy().copy() for v in ema.variables]
    averages = [a.numpy() for a in ema.averages()]
    with pytest.raises(ZeroDivisionError):
        with ema.average_parameters():
            for v, a in zip(ema.variables, averages):
                np.testing.assert_array_equal(v.numpy(), a)
            with pytest.raises(RuntimeError, match="swapped"):
                ema.update()
            1 / 0
    assert not ema.swapped
    for v, r in zip(ema.variables, raw):
        assert v.numpy().tobytes() == r.tobytes()          # bit for bit
    x, y = next(batches(1, seed=5))
    step(x, y)                                               # training goes on with the raw weights
    ema.update()
    ema.copy_to()
    for v, a in zip(ema.variables, ema.averages()):
        np.testing.assert_array_equal(v.numpy(), a.numpy())


def test_several_decays_and_update_every():
    v = tf.Variable(tf.zeros(5))
    ema = EMA([v], [0.5, 0.9], update_every=3)
    ref = np.zeros((2, 5))
    for i in range(7):
        v.assign_add(tf.ones(5))
        ema.update()
        if i % 3 == 0:
            for r, d in enumerate((0.5, 0.9)):
                ref[r] = d * ref[r] + (1 - d) * v.numpy()
    assert ema.updates == 3 and ema.plan.calls == 7
    np.testing.assert_allclose(ema.state_dict()["averaged"][ema.names[0]], ref, rtol=1e-6)
    np.testing.assert_allclose(ema.averages(1)[0].numpy(), ref[1], rtol=1e-6)


def test_resume_equals_uninterrupted_run(tmp_path):
    def run(model, ema, start, steps):
        step = make_step(model)
        for i, (x, y) in enumerate(batches(start + steps)):
            if i >= start:
                step(x, y)
                ema.update()

    full_model = MLP()
    full = EMA(full_model, 0.9, warmup="power")
    run(full_model, full, 0, 20)
    model = MLP()
    half = EMA(model, 0.9, warmup="power")
    run(model, half, 0, 10)
    path = tmp_path / "ema.pkl"
    path.write_bytes(pickle.dumps(half.state_dict()))
    resumed = EMA(model, 0.5)                              # settings come from the checkpoint
    resumed.load_state_dict(pickle.loads(path.read_bytes()))
    run(model, resumed, 10, 10)
    assert resumed.updates == full.updates == 20
    for a, b in zip(resumed.averages(), full.averages()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_bad_inputs_and_checkpoints_are_refused_and_change_nothing():
    v = tf.Variable(tf.ones(3), shape=tf.TensorShape(None))
    ema = EMA([v], 0.9)
    v.assign(tf.ones(4))                                     # the model changed after the EMA was made
    with pytest.raises(ValueError, match=r"was float32 \(3,\).*now float32 \(4,\).*Nothing was updated"):
        ema.update()
    assert ema.updates == 0
    with pytest.raises(TypeError, match="tf.Variables"):
        EMA([np.ones(3, np.float32)])
    with pytest.raises(TypeError, match="not float32"):
        EMA([tf.Variable(tf.zeros(3, tf.int32))])
    with pytest.raises(ValueError, match="no variables"):
        EMA([])
    good_var = tf.Variable(tf.ones((2, 2)))
    ema = EMA([good_var], 0.9)
    good_var.assign(tf.fill([2, 2], 3.0))
    ema.update()
    good = ema.state_dict()
    name = ema.names[0]
    for state, match in [({**good, "format": "fastema.jax.EMA"}, "not a fastema.tensorflow.EMA"),
                         ({**good, "averaged": {name: np.zeros((1, 4), np.float32)}}, "shape"),
                         ({**good, "averaged": {name: np.full((1, 2, 2), np.inf, np.float32)}}, "inf"),
                         ({**good, "averaged": {}}, "missing"),
                         ({**good, "schedules": good["schedules"] * 2}, "2 decay")]:
        with pytest.raises(ValueError, match=match):
            ema.load_state_dict(state)
    np.testing.assert_array_equal(ema.state_dict()["averaged"][name], good["averaged"][name])


def test_array_level_reads_tensorflow_tensors_and_refuses_to_write_them(rng):
    for dtype in (tf.float32, tf.bfloat16, tf.float16):
        src = tf.cast(tf.constant(rng.standard_normal(1000).astype(np.float32)), dtype)
        shadow = rng.standard_normal(1000).astype(np.float32)
        ref = 0.7 * shadow.astype(np.float64) + 0.3 * np.asarray(src.numpy(), np.float64)
        fastema.ema_update_(shadow, src, 0.7)
        assert_close_to_reference(shadow, ref, "float32", np.abs(ref) + 1)
    var = tf.Variable(tf.ones(4))
    out = np.zeros(4, np.float32)
    fastema.copy_(out, var)                                  # a tf.Variable is read through its value
    np.testing.assert_array_equal(out, np.ones(4))
    for target in (tf.ones(4), var):
        with pytest.raises(ValueError, match="fastema.tensorflow.EMA"):
            fastema.ema_update_(target, np.zeros(4, np.float32), 0.5)
    np.testing.assert_array_equal(var.numpy(), np.ones(4))


def test_nested_average_parameters_keeps_the_average_in():
    # reliability M4: an evaluation helper's own `with average_weights()` inside a swapped block
    model = MLP()
    ema = EMA(model, 0.5)
    model.w1.assign_add(tf.ones_like(model.w1))
    ema.update()
    raw = model.w1.numpy().copy()
    with ema.average_parameters():
        with ema.average_parameters():
            assert np.array_equal(model.w1.numpy(), raw - 0.5)
        assert np.array_equal(model.w1.numpy(), raw - 0.5)
    assert np.array_equal(model.w1.numpy(), raw) and not ema.swapped


def test_float64_variables_are_averaged_exactly():
    v = tf.Variable(np.linspace(-1, 1, 50))
    ema = EMA([v], 0.9)
    ref = v.numpy().copy()
    for _ in range(3):
        v.assign_add(tf.ones_like(v) * 0.25)
        ema.update()
        ref = ref + (1 - 0.9) * (v.numpy() - ref)
    got = ema.averages()[0].numpy()
    assert got.dtype == np.float64 and np.allclose(got, ref, rtol=0, atol=1e-15)


def test_checkpoint_without_rounding_or_seed_loads_nothing():
    model = MLP()
    ema = EMA(model, 0.5)
    state = ema.state_dict()
    state["averaged"] = {k: v + 7 for k, v in state["averaged"].items()}
    del state["seed"]
    before = [a.numpy() for a in ema.averages()]
    with pytest.raises(ValueError, match="no 'rounding' or 'seed'"):
        ema.load_state_dict(state)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, ema.averages()))


def test_average_weights_is_a_deprecated_alias_of_average_parameters():
    v = tf.Variable([1.0, 2.0])
    ema = EMA([v], 0.5)
    v.assign([3.0, 4.0])
    ema.update()
    with pytest.warns(DeprecationWarning, match="average_parameters"):
        block = ema.average_weights()
    with block:
        np.testing.assert_array_equal(v.numpy(), [2.0, 3.0])
    np.testing.assert_array_equal(v.numpy(), [3.0, 4.0])
