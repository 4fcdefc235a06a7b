"""fastema.tensorflow.EMA and TensorFlow tensors at the array level, on the CPU: a GradientTape
training loop against a float64 reference, mixed precision, exact swaps, checkpoints, bad input."""
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

from reference import assert_close_to_reference  # noqa: E402

import fastema  # noqa: E402
from fastema.average import Plan  # noqa: E402
from fastema.schedules import NumUpdates, PowerWarmup  # noqa: E402
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


@pytest.mark.parametrize("decay", [0.95, NumUpdates(0.95), PowerWarmup(0.95, update_after_step=3)],
                         ids=["constant", "num_updates", "power"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16])
def test_training_loop_matches_float64_reference(decay, dtype):
    model = MLP(dtype)
    ema = EMA(model, decay)
    assert [v.name for v in ema.variables] == [v.name for v in model.trainable_variables]
    ref = values(ema.variables)
    step = make_step(model)
    losses = []
    sched = Plan(decay).schedules[0]
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
    full = EMA(full_model, PowerWarmup(0.9))
    run(full_model, full, 0, 20)
    model = MLP()
    half = EMA(model, PowerWarmup(0.9))
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


def test_a_shadow_refuses_to_hold_a_variable_and_follows_its_values_handed_each_step():
    """A FlatShadow over a tf.Variable averaged stale values: the DLPack view it held made the next
    assign() copy the variable to new memory, and the shadow read the old one from then on (3.0
    assigned, 1.0 averaged), check_sources() passing. Refused, with the road that works."""
    v = tf.Variable(tf.ones(4))
    for make in (lambda: fastema.FlatShadow([v]), lambda: fastema.WindowShadow([v], 2)):
        with pytest.raises(TypeError, match=r"source '0' is a .*Variable, whose memory moves at its next "
                                            r"assign\(\).*update\(sources=\[\.\.\.\]\).*v.read_value\(\)"):
            make()
    flat = fastema.FlatShadow([v.read_value()])
    with pytest.raises(TypeError, match="whose memory moves"):
        flat.update(0.5, sources=[v])
    for k, want in ((3.0, 2.0), (5.0, 3.5)):
        v.assign(tf.fill([4], k))
        flat.update(0.5, sources=[v.read_value()])
        np.testing.assert_array_equal(np.asarray(flat.view(0)), np.full(4, want, np.float32))


def test_a_tensorflow_tensor_of_strings_is_refused_and_the_process_lives():
    """TensorFlow's DLPack export of a string tensor aborts the process (SIGABRT, no exception):
    its dtype is read first. In a child process, so that a regression is a failure, not a lost
    worker."""
    code = ("import numpy as np, tensorflow as tf, fastema\n"
            "try:\n    fastema.ema_update_(np.zeros(1, np.float32), tf.constant(['a']), 0.5)\n"
            "except TypeError as e:\n    print('REFUSED', e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED src has dtype string; fastema works on float32" in run.stdout, run.stdout



def test_a_traced_update_with_a_step_tensor_leaves_autograph_nothing_to_warn_about(tmp_path):
    """``ema.update(step=)`` inside a ``tf.function`` (the guide's pattern) had AutoGraph convert fastema's
    own code and print "AutoGraph could not transform <function _integer_scalar> ... Please report this
    to the TensorFlow team" (a walrus it cannot parse) on the first trace: fastema's graph code runs as
    written (not converted). In a child process (AutoGraph warns once per function and process), from a
    file (AutoGraph converts only a function whose source it can read: not ``python -c``'s)."""
    code = ("import tensorflow as tf\nfrom fastema.tensorflow import EMA\n"
            "w, step = tf.Variable(tf.zeros(3)), tf.Variable(0, dtype=tf.int64)\nema = EMA([w], decay=0.99)\n"
            "@tf.function\ndef train_step():\n    w.assign_add(tf.ones(3)); step.assign_add(1)\n"
            "    return ema.update(step=step)\n"
            "train_step(); train_step()\n"
            "print('UPDATES', ema.updates, [round(v, 6) for v in ema.averages()[0].numpy().tolist()])\n")
    (tmp_path / "step.py").write_text(code)
    run = subprocess.run([sys.executable, str(tmp_path / "step.py")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "UPDATES 2 [0.0299, 0.0299, 0.0299]" in run.stdout, run.stdout    # 0.99 * (0.99 * 0 + 0.01) + 0.01 * 2
    assert "AutoGraph" not in run.stderr, run.stderr[-2000:]

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


@pytest.mark.parametrize("in_function", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64], ids=lambda d: d.name)
def test_a_scalar_variable_is_averaged_as_tensorflow_does(dtype, in_function):
    """reliability round 4, D1: a 0-d variable reaches the graph op as a NumPy scalar, whose
    __array_interface__ address is a temporary's, freed at once; the kernel read freed memory."""
    s, v = tf.Variable(tf.constant(1.0, dtype)), tf.Variable(tf.ones(3, dtype))
    ema, theirs = EMA([s, v], 0.5), tf.train.ExponentialMovingAverage(0.5)
    theirs.apply([s, v])                               # TF's average starts here, from the same values

    def step():
        s.assign_add(tf.constant(2.0, dtype))
        v.assign_add(tf.ones(3, dtype))
        ema.update()
        theirs.apply([s, v])

    run = tf.function(step) if in_function else step
    for _ in range(4):
        run()
    for ours, variable in zip(ema.averages(), (s, v)):
        assert ours.dtype == variable.dtype and ours.shape == variable.shape
        np.testing.assert_array_equal(ours.numpy(), theirs.average(variable).numpy())
    assert float(ema.averages()[0]) == 7.125 and ema.updates == 4


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


def test_average_parameters_swaps_in_and_back_and_the_development_alias_is_gone():
    v = tf.Variable([1.0, 2.0])
    ema = EMA([v], 0.5)
    v.assign([3.0, 4.0])
    ema.update()
    with ema.average_parameters():
        np.testing.assert_array_equal(v.numpy(), [2.0, 3.0])
    np.testing.assert_array_equal(v.numpy(), [3.0, 4.0])
    assert not hasattr(ema, "average_weights")      # 0.2's development name, removed before the release


# ---------------------------------------------------------------- tf.function and TensorFlow checkpoints


def test_update_inside_tf_function_matches_eager_update_and_float64_reference():
    """The update as an op of the training step (step as a tensor) equals the eager update after it."""
    graph_model, eager_model = MLP(), MLP()
    in_graph = EMA(graph_model, NumUpdates(0.9))
    eager = EMA(eager_model, NumUpdates(0.9))
    sgd, eager_step = make_step(graph_model), make_step(eager_model)

    @tf.function
    def step(x, y):
        loss = sgd(x, y)
        count = in_graph.update(step=graph_model.steps)     # after the step's writes: program order
        return loss, count

    ref = values(in_graph.variables)
    sched = Plan(NumUpdates(0.9)).schedules[0]
    for n, (x, y) in enumerate(batches(12), start=1):
        _, count = step(x, y)
        eager_step(x, y)
        eager.update(step=eager_model.steps)                  # a variable, read on the host
        assert int(count) == n == in_graph.updates
        d = sched(n)
        ref = [d * r + (1 - d) * v for r, v in zip(ref, values(in_graph.variables))]
    for a, b, r in zip(in_graph.averages(), eager.averages(), ref):
        assert a.numpy().tobytes() == b.numpy().tobytes()
        assert_close_to_reference(a.numpy(), r, "float32", 12 * (np.abs(r) + 1e-3))
    with in_graph.average_parameters():                    # a refused graph update changes nothing
        with pytest.raises(Exception, match="swapped"):
            step(x, y)
    assert in_graph.updates == 12


def test_ema_is_a_tf_module_holding_none_of_the_model():
    model = MLP()
    ema = EMA(model, 0.9, name="weights_ema")
    assert isinstance(ema, tf.Module) and ema.name == "weights_ema"
    assert [v.ref() for v in ema.variables] == [v.ref() for v in model.trainable_variables]
    assert ema.trainable_variables == [] and ema._trackable_children() == {}


def _trained(model, ema, steps, seed=1):
    step = make_step(model)
    for x, y in batches(steps, seed):
        step(x, y)
        ema.update()


@pytest.mark.parametrize("shadow_dtype", ["float32", "bfloat16"])
def test_checkpoint_manager_round_trip_is_bit_exact_and_resumes(tmp_path, shadow_dtype):
    model = MLP(tf.bfloat16)
    ema = EMA(model, [PowerWarmup(0.9), PowerWarmup(0.99)], update_every=2, shadow_dtype=shadow_dtype)
    _trained(model, ema, 7)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, ema=ema), str(tmp_path), max_to_keep=2)
    path = manager.save()
    keys = [k for k, _ in tf.train.list_variables(path) if k.startswith("ema/")]
    assert keys == ["ema/.ATTRIBUTES/shadow", "ema/.ATTRIBUTES/state"]   # the model's variables are not the EMA's
    saved = ema.state_dict()

    fresh_model = MLP(tf.bfloat16, seed=5)
    fresh = EMA(fresh_model, [0.5, 0.6], shadow_dtype=shadow_dtype)     # settings come from the checkpoint
    status = tf.train.Checkpoint(model=fresh_model, ema=fresh).restore(manager.latest_checkpoint)
    status.assert_consumed()
    got = fresh.state_dict()
    for k in ("calls", "updates", "norms", "schedules", "update_every", "rounding", "seed"):
        assert got[k] == saved[k], k
    for n in ema.names:
        assert got["averaged"][n].tobytes() == saved["averaged"][n].tobytes()
    _trained(model, ema, 5, seed=3)                        # resumed == uninterrupted, bit for bit
    _trained(fresh_model, fresh, 5, seed=3)
    for a, b in zip(ema.state_dict()["averaged"].values(), fresh.state_dict()["averaged"].values()):
        assert a.tobytes() == b.tobytes()


def test_savedmodel_carries_the_average(tmp_path):
    model = MLP()
    ema = EMA(model, 0.8)
    _trained(model, ema, 4)
    root = tf.Module()
    root.model, root.ema = model, ema
    root.predict = tf.function(lambda x: model(x), input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    from fastema.tensorflow.compat import ExponentialMovingAverage

    tf_style = ExponentialMovingAverage(0.8)
    tf_style.apply(model.trainable_variables)
    root.averages = [tf_style.average(v) for v in model.trainable_variables]
    tf.saved_model.save(root, str(tmp_path / "sm"))
    x = next(batches(1))[0]
    # serving, where a user serves it: another process (which has no EMA to call back into)
    code = (f"import numpy as np, tensorflow as tf; m = tf.saved_model.load({str(tmp_path / 'sm')!r}); "
            f"np.save({str(tmp_path / 'out.npy')!r}, m.predict(tf.constant(np.load({str(tmp_path / 'x.npy')!r}))))")
    np.save(tmp_path / "x.npy", x.numpy())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), model(x).numpy(), rtol=1e-5, atol=1e-6)
    fresh = EMA(MLP(seed=4), 0.8)
    tf.train.Checkpoint(ema=fresh).restore(str(tmp_path / "sm" / "variables" / "variables")).expect_partial()
    assert fresh.updates == 4
    for a, b in zip(fresh.averages(), ema.averages()):
        assert a.numpy().tobytes() == b.numpy().tobytes()


MIRRORED = r"""
import json
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from fastema.schedules import NumUpdates
from fastema.tensorflow import EMA
from fastema.tensorflow.compat import ExponentialMovingAverage
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    w = tf.Variable(tf.zeros((4,)))
    theirs = tf.train.ExponentialMovingAverage(0.5)
    theirs.apply([w])
ema, ours, stepped = EMA([w], 0.5), ExponentialMovingAverage(0.5), EMA([w], NumUpdates(0.5))
ours.apply([w])
steps = tf.Variable(0, dtype=tf.int64)

def replica():
    w.assign_add(tf.ones((4,)))
    ours.apply([w])
    theirs.apply([w])
    stepped.update(step=steps + 1)
    return ema.update()

graph_step = tf.function(lambda: strategy.run(replica))
out = {"counts": [], "averages": []}
for step in (graph_step, graph_step, lambda: strategy.run(replica), graph_step):
    counts = step()
    steps.assign_add(1)
    out["counts"].append([None if c is None else int(c) for c in strategy.experimental_local_results(counts)])
    out["averages"].append([a.numpy().tolist() for a in (ema.averages()[0], ours.average(w), theirs.average(w))])
out["updates"] = [ema.updates, stepped.updates]
print(json.dumps(out))
"""


def test_inside_a_mirrored_strategy_the_average_updates_once_per_step_as_tensorflows_does():
    """reliability round 4, H1: update() and the drop-in's apply() inside strategy.run (traced once per
    replica) updated once per replica: two updates per step on two replicas. They update once, through
    a merge_call to the cross-replica context, as tf.train.ExponentialMovingAverage does. Two logical CPUs
    must be set before TensorFlow starts: a process of its own."""
    out = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert [counts[0] for counts in res["counts"]] == [1, 2, None, 4]      # eagerly update() returns None
    assert all(len(set(counts)) == 1 for counts in res["counts"])            # every replica sees the one count
    expected = 0.0
    for n, (ema, ours, theirs) in enumerate(res["averages"], start=1):      # w = 1, 2, 3, 4
        expected = 0.5 * expected + 0.5 * n
        assert ema == ours == theirs == [expected] * 4, n
    assert res["updates"] == [4, 4]


def test_checkpoint_of_other_variables_is_refused_by_name_and_changes_nothing(tmp_path):
    model = MLP()
    ema = EMA(model, 0.9)
    _trained(model, ema, 3)
    path = tf.train.Checkpoint(ema=ema).save(str(tmp_path / "ckpt"))

    class Other(tf.Module):
        def __init__(self):
            super().__init__()
            self.w1 = tf.Variable(tf.zeros((6, 32)), name="w1")
            self.extra = tf.Variable(tf.zeros(3), name="extra")

    cases = [(EMA(Other(), 0.9), r"'extra:0'.*checkpoint does not have.*'b1:0', 'w2:0'.*this EMA does not"),
             (EMA(MLP(), [0.9, 0.99]), r"1 decay\(s\), this EMA 2"),
             (EMA(MLP(), 0.9, shadow_dtype="bfloat16"), "float32 shadow, this EMA a bfloat16")]
    for target, match in cases:
        target.update()
        before = target.state_dict()
        with pytest.raises(ValueError, match=match):
            tf.train.Checkpoint(ema=target).restore(path)
        deferred = tf.train.Checkpoint()
        deferred.restore(path).expect_partial()
        with pytest.raises(ValueError, match=match):            # restored when attached: refused then
            deferred.ema = target
        after = target.state_dict()
        assert after["updates"] == before["updates"] == 1
        for n in target.names:
            assert after["averaged"][n].tobytes() == before["averaged"][n].tobytes()
    swapped = EMA(MLP(), 0.9)
    with swapped.average_parameters():
        with pytest.raises(RuntimeError, match="swapped"):
            tf.train.Checkpoint(ema=swapped).restore(path)
        with pytest.raises(RuntimeError, match="swapped"):
            tf.train.Checkpoint(ema=swapped).save(str(tmp_path / "swapped"))
    assert swapped.updates == 0


def test_a_crafted_checkpoint_state_is_refused_and_loads_nothing(tmp_path):
    """reliability round 4, L4: a state listing a shape as a number raised Python's TypeError."""
    from fastema.tensorflow import _checkpoint

    class Crafted(tf.__internal__.tracking.Trackable):
        def __init__(self, state, blob):
            self.tensors = {_checkpoint.STATE: tf.constant(json.dumps(state)), _checkpoint.SHADOW: tf.constant(blob)}

        def _serialize_to_tensors(self):
            return dict(self.tensors)

    v = tf.Variable(tf.ones((2, 2)))
    ema = EMA([v], 0.9)
    ema.update()
    raw, blob = _checkpoint.pack(ema._core)
    good = json.loads(raw)
    before = ema.state_dict()
    for i, bad in enumerate(([good["sources"][0][0], 4, "float32", 1], [ema.names[0], None, "float32", 1],
                             [ema.names[0], [2, 2], "float32"])):
        path = tf.train.Checkpoint(ema=Crafted({**good, "sources": [bad]}, blob)).save(str(tmp_path / f"c{i}"))
        with pytest.raises(ValueError, match=r"EMA checkpoint does not match: sources\[0\] is not \[name, shape "
                                             r"\(a list\), dtype, rows\].*Nothing was loaded"):
            tf.train.Checkpoint(ema=ema).restore(path)
    after = ema.state_dict()
    assert after["updates"] == 1 and after["averaged"][ema.names[0]].tobytes() == \
        before["averaged"][ema.names[0]].tobytes()


def test_made_inside_a_tf_function_and_eager_only_calls_refused_there():
    v = tf.Variable([1.0, 2.0])
    made = []

    @tf.function
    def step():
        if not made:
            made.append(EMA([v], 0.5))                 # from the values at tracing, as TF's own EMA
        v.assign_add([2.0, 2.0])
        made[0].update()

    step()
    step()
    np.testing.assert_array_equal(made[0].averages()[0].numpy(), [3.5, 4.5])  # 1,2 -> 2,3 (v 3,4) -> 3.5,4.5 (v 5,6)
    for call in (lambda e: e.copy_to(), lambda e: e.averages(), lambda e: e.swap()):
        with pytest.raises(RuntimeError, match="runs eagerly"):
            tf.function(lambda: call(made[0]))()
    np.testing.assert_array_equal(v.numpy(), [5.0, 6.0])
    assert made[0].updates == 2 and not made[0].swapped


def test_an_ema_that_has_updated_is_freed_when_deleted():
    """reliability round 4, M3: the graph op's Python body was a bound method, which TensorFlow keeps
    for good (its py-func registry, in the eager context's graph): every EMA that had updated stayed
    alive, with its shadow and the model's variables. A graph that outlives its EMA says so."""
    import gc
    import weakref

    def made(how):
        v = tf.Variable(tf.ones((64, 64)))
        ema = EMA([v], 0.5)
        if how == "eager":
            ema.update()
        elif how == "tf.function":
            tf.function(lambda: ema.update())()
        else:                                             # a checkpoint written inside a tf.function
            checkpoint = tf.train.Checkpoint(ema=ema)
            tf.function(lambda: checkpoint.write(tf.constant(how)))()
        return weakref.ref(ema), weakref.ref(v)

    with tempfile.TemporaryDirectory() as d:
        refs = [made(how) for how in ("eager", "tf.function", os.path.join(d, "ckpt"))]
        gc.collect()
        assert [(ema(), v()) for ema, v in refs] == [(None, None)] * 3
    holder = [EMA([tf.Variable([1.0, 2.0])], 0.5)]
    step = tf.function(lambda: holder[0].update())
    step()
    holder.clear()
    gc.collect()
    with pytest.raises(tf.errors.OpError, match="fastema.tensorflow.EMA this graph op uses was deleted"):
        step()


def test_a_tf1_graph_is_refused_naming_eager_and_tf_function():
    """Inside a tf.function TensorFlow does not execute eagerly either: a TF1 graph (tf.compat.v1, a
    tf.Graph().as_default() block) is told apart and refused, where it failed on symbolic tensors."""
    v = tf.Variable([1.0, 2.0])
    ema = EMA([v], 0.5)
    with tf.Graph().as_default():
        in_graph = tf.Variable([1.0, 2.0])
        with pytest.raises(RuntimeError, match=r"EMA\(\) runs eagerly or inside a tf.function.*TF1 graph"):
            EMA([in_graph], 0.5)
        for call, name in ((ema.update, "update"), (ema.averages, "averages"), (ema.swap, "swap")):
            with pytest.raises(RuntimeError, match=rf"EMA.{name}\(\) runs eagerly or inside a tf.function.*TF1 "
                                                   rf"graph.*Nothing was changed"):
                call()
    v.assign([3.0, 4.0])
    tf.function(lambda: ema.update())()                   # a tf.function's graph is not one
    assert ema.updates == 1 and not ema.swapped
    np.testing.assert_array_equal(ema.averages()[0].numpy(), [2.0, 3.0])


def test_async_checkpoint_saves_the_ema_as_it_was_when_saved(tmp_path):
    from fastema.tensorflow.compat import ExponentialMovingAverage

    model = MLP()
    ema, tf_style = EMA(model, 0.8), ExponentialMovingAverage(0.8)
    _trained(model, ema, 3)
    tf_style.apply(model.trainable_variables)
    averages = [tf_style.average(v) for v in model.trainable_variables]
    saved, saved_averages = ema.state_dict(), [a.numpy() for a in averages]
    checkpoint = tf.train.Checkpoint(ema=ema, averages=averages)
    options = tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)
    path = checkpoint.save(str(tmp_path / "async"), options=options)
    _trained(model, ema, 2)                                  # training goes on while it is written
    tf_style.apply(model.trainable_variables)
    checkpoint.sync()
    fresh, fresh_style = EMA(MLP(seed=3), 0.8), ExponentialMovingAverage(0.8)
    fresh_style.apply(fresh.variables)
    fresh_averages = [fresh_style.average(v) for v in fresh.variables]
    tf.train.Checkpoint(ema=fresh, averages=fresh_averages).restore(path).assert_consumed()
    assert fresh.updates == saved["updates"] == 3
    for n in ema.names:
        assert fresh.state_dict()["averaged"][n].tobytes() == saved["averaged"][n].tobytes()
    for a, b in zip(fresh_averages, saved_averages):
        assert a.numpy().tobytes() == b.tobytes()


def test_an_average_that_nan_reached_is_refused_until_repaired_and_restored_only_when_allowed(tmp_path):
    """Issue 85 item 2 on the TensorFlow face: averages(), swap(), average_parameters() and copy_to() refuse
    it by name (nothing written) unless allowed; a checkpoint's restore refuses it offering
    allow_nonfinite=True then repair_nonfinite() (ema.allow_nonfinite: the restore reads it); repaired from
    the variables' values, every other variable and row bit for bit."""
    model = MLP()
    ema = EMA(model, [0.9, 0.5])
    good = model.b1.numpy().copy()
    model.b1.assign(np.full(32, np.nan, np.float32))
    ema.update()
    model.b1.assign(good)
    raw = [v.numpy().copy() for v in ema.variables]
    calls = {"averages()": ema.averages, "swap()": ema.swap, "average_parameters()": lambda: ema.average_parameters(),
             "copy_to()": ema.copy_to}
    for call, refused in calls.items():
        with pytest.raises(ValueError, match=rf"^fastema\.tensorflow\.EMA\.{re.escape(call)}: average 0 holds inf "
                                             r"or NaN in 'b1:0'.*repair_nonfinite\(\).*Nothing was written"):
            refused()
    assert not ema.swapped and all(np.array_equal(v.numpy(), r) for v, r in zip(ema.variables, raw))
    with ema.average_parameters(1, allow_nonfinite=True):
        assert np.isnan(model.b1.numpy()).all()
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(ema=ema), str(tmp_path), max_to_keep=1)
    with pytest.warns(RuntimeWarning, match="'b1:0'"):
        manager.save()
    fresh = EMA(MLP(seed=3), [0.9, 0.5])
    with pytest.raises(ValueError, match=r"checkpoint's averaged 'b1:0' holds inf or NaN\. To load it "
                                         r"all the same and repair it"):
        tf.train.Checkpoint(ema=fresh).restore(manager.latest_checkpoint)
    fresh.allow_nonfinite = True
    with pytest.warns(RuntimeWarning, match="loaded holds inf or NaN in 'b1:0'"):
        tf.train.Checkpoint(ema=fresh).restore(manager.latest_checkpoint)
    fresh.allow_nonfinite = False
    assert fresh.repair_nonfinite() == ["b1:0"]
    after = fresh.state_dict()["averaged"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = ema.state_dict()["averaged"]
    for name, rows in after.items():
        expected = np.stack([fresh.variables[fresh.names.index(name)].numpy()] * 2) if name == "b1:0" else saved[name]
        np.testing.assert_array_equal(rows, expected)
    fresh.copy_to()


def test_a_step_tensor_that_is_no_integer_scalar_is_refused_eagerly_and_in_a_graph():
    """A float step tensor was truncated (tf.constant(2.7) updated as step 2, eagerly and in a
    tf.function, where a Python 2.7 is refused), a bool read as 0 or 1, a vector failed with NumPy's
    TypeError. Refused as the Python float is; an integer tensor or optimizer.iterations is taken."""
    w = tf.Variable(tf.ones(4))
    ema = EMA([w], NumUpdates(0.999))

    @tf.function
    def traced(step):
        return ema.update(step)

    for step in (tf.constant(2.7), tf.constant(True), tf.constant([1, 2])):
        for update in (ema.update, traced):
            with pytest.raises(ValueError, match=r"step must be an int or an integer scalar tensor, not a "):
                update(step)
    assert ema.updates == 0
    ema.update(tf.constant(3))
    traced(tf.Variable(4, dtype=tf.int64))
    assert ema.updates == 2
    unknown = tf.function(lambda s: ema.update(s), input_signature=[tf.TensorSpec(None, tf.int64)])
    unknown(tf.constant(5, tf.int64))                   # a scalar of unknown rank when traced: taken
    with pytest.raises(Exception, match="step must be an int or an integer scalar tensor"):
        unknown(tf.constant([6, 7], tf.int64))          # its value's rank, checked by the op
    assert ema.updates == 3
