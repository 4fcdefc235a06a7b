"""fastema.tensorflow.compat.ExponentialMovingAverage side by side with TensorFlow's own
tf.train.ExponentialMovingAverage: the same GradientTape training loops (in a tf.function and
eagerly), the same averages (float32 tolerance) and names, a float64 reference of TF's
formulas, checkpoints read both ways (object-based and Saver name-based), refusals."""
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

from fastema.tensorflow.compat import AverageVariable, ExponentialMovingAverage  # noqa: E402


def make_vars(seed=0, prefix="dense"):
    rng = np.random.default_rng(seed)
    return [tf.Variable(rng.normal(0, 0.3, (6, 16)).astype(np.float32), name=f"{prefix}/kernel"),
            tf.Variable(np.zeros(16, np.float32), name=f"{prefix}/bias"),
            tf.Variable(rng.normal(0, 0.3, (16, 1)).astype(np.float32), name=f"{prefix}_1/kernel")]


def loss_fn(vs, x, y):
    return tf.reduce_mean((tf.tanh(x @ vs[0] + vs[1]) @ vs[2] - y) ** 2)


def batches(steps, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((32, 6)).astype(np.float32)
        yield tf.constant(x), tf.constant(np.sin(x[:, :1]))


def twin_loop(ours, theirs, steps, step_var, in_function=True, prefix="dense", beside=None):
    """Two copies of one model trained identically; ``ours`` averages one, ``theirs`` the other.
    Returns both variable lists and the float64 reference of TF's formula for ``ours``."""
    a, b = make_vars(prefix=prefix + "_ours"), make_vars(prefix=prefix + "_tf")

    def sgd(vs, x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(vs, x, y)
        for v, g in zip(vs, tape.gradient(loss, vs)):
            v.assign_sub(0.1 * g)
        return loss

    def step(x, y):
        loss = sgd(a, x, y)
        sgd(b, x, y)
        step_var.assign_add(1)
        ours.apply(a)
        theirs.apply(b)
        if beside is not None:                  # another of TensorFlow's, on the very variables ours averages
            beside.apply(a)
        return loss

    run = tf.function(step) if in_function else step
    ref = None
    losses = []
    for x, y in batches(steps):
        losses.append(float(run(x, y)))
        vals = [np.asarray(v.numpy(), np.float64) for v in a]
        n = float(np.float32(step_var.numpy()))
        d = float(np.float32(min(np.float32(0.9), np.float32((1 + n) / (10 + n)))))
        ref = vals if ref is None else [r - (r - v) * (1 - d) for r, v in zip(ref, vals)]
    assert losses[-1] < losses[0]
    return a, b, ref


@pytest.mark.parametrize("in_function", [True, False], ids=["tf.function", "eager"])
def test_training_loop_matches_tensorflow_and_float64_reference(in_function):
    step_var = tf.Variable(0, dtype=tf.int64)
    ours = ExponentialMovingAverage(0.9, num_updates=step_var, zero_debias=True)
    theirs = tf.train.ExponentialMovingAverage(0.9, num_updates=step_var, zero_debias=True)
    beside = tf.train.ExponentialMovingAverage(0.9, num_updates=step_var)
    a, b, ref = twin_loop(ours, theirs, 25, step_var, in_function, prefix=f"loop_{in_function}", beside=beside)
    for v in a:
        np.testing.assert_allclose(ours.average(v).numpy(), beside.average(v).numpy(), rtol=1e-5, atol=1e-6)
        assert beside.average(v).name == ours.average(v).name.replace(":0", "_1:0")   # as two of TF's would be
    for va, vb, r in zip(a, b, ref):
        got, want = ours.average(va).numpy(), theirs.average(vb).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, r, rtol=1e-5, atol=1e-6)
        assert ours.average_name(va) == theirs.average_name(vb).replace("_tf", "_ours")
        assert ours.average(va).name == theirs.average(vb).name.replace("_tf", "_ours")
        assert (ours.average(va).shape, ours.average(va).dtype) == (theirs.average(vb).shape, theirs.average(vb).dtype)
    assert ours.average_name(tf.Variable(1.0, name="later")) == theirs.average_name(tf.Variable(1.0, name="later"))
    assert ours.name == theirs.name == "ExponentialMovingAverage"


def test_average_names_count_as_tensorflows_do():
    """A second average of a variable of the same name is ``..._1``, whichever class made the first:
    the names come from TensorFlow's own counters, so a program that swaps the class keeps them."""
    made = []
    for cls in (ExponentialMovingAverage, tf.train.ExponentialMovingAverage, ExponentialMovingAverage):
        v = tf.Variable(1.0, name="names_test/w")
        ema = cls(0.9)
        assert ema.average_name(v) == "names_test/w/ExponentialMovingAverage"      # before apply()
        ema.apply([v])
        made.append(ema.average(v).name)
    assert made == [f"names_test/w/ExponentialMovingAverage{s}:0" for s in ("", "_1", "_2")]


def test_decay_variable_subsets_new_variables_and_dtypes_follow_tensorflow():
    decay = tf.Variable(0.5)
    ours, theirs = ExponentialMovingAverage(decay), tf.train.ExponentialMovingAverage(decay)
    mk = lambda: [tf.Variable(np.arange(4, dtype=np.float32), name="p"),                  # noqa: E731
                  tf.Variable(np.ones(3, np.float64), name="q"), tf.Variable(tf.ones(5, tf.bfloat16), name="r")]
    a, b = mk(), mk()
    for k, (subset, new_decay) in enumerate([((0, 1, 2), 0.5), ((0,), 0.8), ((2, 0), 0.3), ((1, 2, 0), 0.99)]):
        decay.assign(new_decay)
        for vs in (a, b):
            for v in vs:
                v.assign(tf.cast(tf.cast(v, tf.float32) + (k + 1.0), v.dtype))
        ours.apply([a[i] for i in subset])
        theirs.apply([b[i] for i in subset])
    extra_a, extra_b = tf.Variable([5.0, 6.0], name="late"), tf.Variable([5.0, 6.0], name="late")
    ours.apply([extra_a, a[0]])                                  # a new variable next to a known one
    theirs.apply([extra_b, b[0]])
    for va, vb in zip(a + [extra_a], b + [extra_b]):
        got, want = ours.average(va), theirs.average(vb)
        assert got.dtype == want.dtype
        tol = 1e-2 if want.dtype == tf.bfloat16 else 1e-6
        np.testing.assert_allclose(np.float64(got.numpy()), np.float64(want.numpy()), rtol=tol)


@pytest.mark.parametrize("in_function", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64], ids=lambda d: d.name)
def test_a_scalar_variable_is_averaged_as_tensorflow_does(dtype, in_function):
    """reliability round 4, D1: a 0-d variable reaches the graph op as a NumPy scalar, whose
    __array_interface__ address is a temporary's, freed at once; the kernel read freed memory."""
    s, v = tf.Variable(tf.constant(1.0, dtype)), tf.Variable(tf.ones(3, dtype))
    ours, theirs = ExponentialMovingAverage(0.5), tf.train.ExponentialMovingAverage(0.5)

    def step():
        s.assign_add(tf.constant(2.0, dtype))
        v.assign_add(tf.ones(3, dtype))
        ours.apply([s, v])
        theirs.apply([s, v])

    run = tf.function(step) if in_function else step
    for _ in range(4):
        run()
    for variable in (s, v):
        got, want = ours.average(variable), theirs.average(variable)
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    # made from the value at the first apply (3), or at tracing in a tf.function (1), as TensorFlow's
    assert float(ours.average(s).numpy()) == (7.125 if in_function else 7.25)


def test_average_reads_assigns_and_swaps_like_a_variable():
    v = tf.Variable([1.0, 2.0], name="w")
    ema = ExponentialMovingAverage(0.5)
    assert ema.average(v) is None
    ema.apply([v])
    v.assign([3.0, 4.0])
    ema.apply([v])
    avg = ema.average(v)
    assert isinstance(avg, AverageVariable) and not isinstance(avg, tf.Variable)
    np.testing.assert_array_equal(avg.numpy(), [2.0, 3.0])
    np.testing.assert_array_equal((avg + 1).numpy(), [3.0, 4.0])
    np.testing.assert_array_equal(tf.convert_to_tensor(avg).numpy(), [2.0, 3.0])
    saved = tf.identity(v)
    v.assign(avg)                                                  # evaluation with the average, as TF's docs do
    np.testing.assert_array_equal(v.numpy(), [2.0, 3.0])
    v.assign(saved)
    read = tf.function(lambda: ema.average(v).value() * 2)
    np.testing.assert_array_equal(read().numpy(), [4.0, 6.0])
    avg.assign([0.0, 1.0])
    ema.apply([v])
    np.testing.assert_array_equal(avg.numpy(), [1.5, 2.5])
    with pytest.raises(ValueError, match=r"shape \(2,\).*Nothing was written"):
        avg.assign([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(avg.numpy(), [1.5, 2.5])


def test_an_average_that_has_applied_is_freed_when_deleted():
    """reliability round 4, M3: the graph op's Python body was a lambda over the object, which
    TensorFlow keeps for good (its py-func registry, in the eager context's graph): every drop-in
    that had applied stayed alive, with its shadow and the variables. A graph that outlives it says so."""
    import gc
    import weakref

    def made(how):
        v = tf.Variable(tf.ones((64, 64)))
        ema = ExponentialMovingAverage(0.5)
        if how == "eager":
            ema.apply([v])
        elif how == "tf.function":
            tf.function(lambda: ema.apply([v]) and None)()
        else:                                             # the average read and assigned in a tf.function
            ema.apply([v])
            tf.function(lambda: ema.average(v).assign(ema.average(v).value() * 2))()
        return weakref.ref(ema), weakref.ref(v)

    refs = [made(how) for how in ("eager", "tf.function", "read and assigned")]
    gc.collect()
    assert [(ema(), v()) for ema, v in refs] == [(None, None)] * 3
    v = tf.Variable([1.0, 2.0])
    holder = [ExponentialMovingAverage(0.5)]
    step = tf.function(lambda: holder[0].apply([v]) and None)            # returns no op
    step()
    holder.clear()
    gc.collect()
    with pytest.raises(tf.errors.OpError, match="ExponentialMovingAverage this graph op uses was deleted"):
        step()


def test_bad_inputs_are_refused_as_tensorflow_refuses_them():
    ema = ExponentialMovingAverage(0.9)
    for ours_or_tf in (ema, tf.train.ExponentialMovingAverage(0.9)):
        with pytest.raises(TypeError, match="non-Variable tensors"):
            ours_or_tf.apply([tf.ones(3)])
        with pytest.raises(TypeError, match="half, float, or double"):
            ours_or_tf.apply([tf.Variable([1, 2])])
    v = tf.Variable(tf.ones(3), shape=tf.TensorShape(None))
    ema.apply([v])
    before = ema.average(v).numpy()
    v.assign(tf.ones(4))
    with pytest.raises(ValueError, match=r"was float32 \(3,\).*now float32 \(4,\).*Nothing was updated"):
        ema.apply([v])
    np.testing.assert_array_equal(ema.average(v).numpy(), before)
    bad = ExponentialMovingAverage(1.5)
    with pytest.raises(ValueError, match="decay must be in"):
        bad.apply([tf.Variable([1.0])])


def test_a_tf1_graph_is_refused_naming_eager_and_tf_function():
    """TensorFlow's class builds ops into a TF1 graph (tf.compat.v1, a tf.Graph().as_default() block);
    this one runs eagerly or in a tf.function, and refuses it by name, where it failed on symbolic tensors."""
    v = tf.Variable([1.0, 2.0])
    ema = ExponentialMovingAverage(0.5)
    ema.apply([v])
    with tf.Graph().as_default():
        in_graph = tf.Variable([1.0, 2.0])
        assert tf.train.ExponentialMovingAverage(0.5).apply([in_graph]) is not None     # TensorFlow's: an op
        for variables in ([in_graph], [v]):
            with pytest.raises(RuntimeError, match=r"ExponentialMovingAverage.apply\(\) runs eagerly or inside a "
                                                   r"tf.function.*TF1 graph.*Nothing was changed"):
                ema.apply(variables)
    v.assign([3.0, 4.0])
    ema.apply([v])
    np.testing.assert_array_equal(ema.average(v).numpy(), [2.0, 3.0])


def test_checkpoints_interoperate_with_tensorflows_averages(tmp_path):
    """tf.train.Checkpoint / CheckpointManager of the averages, and Saver name maps, both ways."""
    step_var = tf.Variable(0, dtype=tf.int64)
    ours, theirs = ExponentialMovingAverage(0.9), tf.train.ExponentialMovingAverage(0.9)
    a, b, _ = twin_loop(ours, theirs, 6, step_var, prefix="interop")
    # TensorFlow's averages -> a CheckpointManager -> this class's averages (zeroed first), bit for bit
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(averages=[theirs.average(v) for v in b]),
                                         str(tmp_path / "tf"), max_to_keep=2)
    path = manager.save()
    for v in a:
        ours.average(v).assign(tf.zeros_like(v))
    tf.train.Checkpoint(averages=[ours.average(v) for v in a]).restore(path).assert_consumed()
    for va, vb in zip(a, b):
        assert ours.average(va).numpy().tobytes() == theirs.average(vb).numpy().tobytes()
    # this class's averages -> a checkpoint -> TensorFlow's
    ours.apply(a)
    path = tf.train.Checkpoint(averages=[ours.average(v) for v in a]).save(str(tmp_path / "ours"))
    tf.train.Checkpoint(averages=[theirs.average(v) for v in b]).restore(path).assert_consumed()
    for va, vb in zip(a, b):
        assert ours.average(va).numpy().tobytes() == theirs.average(vb).numpy().tobytes()
    # evaluation the TF1 way: the averages, saved by name, restored into fresh model variables
    # through variables_to_restore(), whichever class wrote or maps them
    names = {ours.average_name(v): ours.average(v) for v in a}
    assert list(names) == [theirs.average_name(v).replace("_tf", "_ours") for v in b]
    saved = tf.compat.v1.train.Saver(names).save(None, str(tmp_path / "by_name"))
    fresh = make_vars(seed=9, prefix="interop_ours")
    tf.compat.v1.train.Saver(theirs.variables_to_restore(fresh)).restore(None, saved)
    for v, f in zip(a, fresh):
        np.testing.assert_array_equal(f.numpy(), ours.average(v).numpy())
    saved = tf.compat.v1.train.Saver({theirs.average_name(v): theirs.average(v) for v in b}).save(
        None, str(tmp_path / "by_name_tf"))
    fresh = make_vars(seed=9, prefix="interop_tf")
    mapping = ours.variables_to_restore(fresh)
    assert sorted(mapping) == sorted(theirs.variables_to_restore(fresh))
    tf.compat.v1.train.Saver(mapping).restore(None, saved)
    for v, f in zip(b, fresh):
        np.testing.assert_array_equal(f.numpy(), theirs.average(v).numpy())
    assert set(ours.variables_to_restore()) == set(names)    # default: every variable apply has seen


def test_restoring_another_shape_or_dtype_changes_nothing(tmp_path):
    ema = ExponentialMovingAverage(0.5)
    v = tf.Variable([1.0, 2.0], name="w")
    ema.apply([v])
    other = tf.Variable([1.0, 2.0, 3.0], name="w")
    path = tf.train.Checkpoint(averages=[other]).save(str(tmp_path / "other"))
    with pytest.raises(Exception, match="shape"):
        tf.train.Checkpoint(averages=[ema.average(v)]).restore(path)
    path = tf.train.Checkpoint(averages=[tf.Variable([1.0, 2.0], dtype=tf.float64)]).save(str(tmp_path / "f64"))
    with pytest.raises(Exception, match="float64|double"):
        tf.train.Checkpoint(averages=[ema.average(v)]).restore(path)
    np.testing.assert_array_equal(ema.average(v).numpy(), [1.0, 2.0])


def test_savedmodel_of_a_module_holding_the_averages(tmp_path):
    ema = ExponentialMovingAverage(0.5)
    v = tf.Variable([1.0, 2.0], name="w")
    ema.apply([v])
    v.assign([3.0, 5.0])
    ema.apply([v])
    module = tf.Module()
    module.averages = [ema.average(v)]
    tf.saved_model.save(module, str(tmp_path / "sm"))
    tf.saved_model.load(str(tmp_path / "sm"))                  # loads (the averages restore eagerly only)
    fresh, w = ExponentialMovingAverage(0.5), tf.Variable([0.0, 0.0], name="w")
    fresh.apply([w])
    # the SavedModel's variables/ is a checkpoint of the module: its object graph, restored by path
    tf.train.Checkpoint(averages=[fresh.average(w)]).restore(str(tmp_path / "sm" / "variables" / "variables"))
    np.testing.assert_array_equal(fresh.average(w).numpy(), [2.0, 3.5])


def test_the_guides_migration_example_runs(capsys):
    import pathlib
    import re

    guide = (pathlib.Path(__file__).parents[2] / "docs" / "guides" / "tensorflow.md").read_text()
    block = re.search(r"## Migrating from.*?```python\n(.*?)```", guide, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "guides/tensorflow.md (migrating)", "exec"), scope)
    name, values = capsys.readouterr().out.split(" ", 1)
    assert name == "dense/kernel/ExponentialMovingAverage"
    n = np.arange(1, 11, dtype=np.float64)                   # w after each step, and TF's num_updates decay
    ref = 0.0
    for k in n:
        d = min(0.99, (1 + k) / (10 + k))
        ref = d * ref + (1 - d) * k
    np.testing.assert_allclose(np.array(values.strip(" []\n").split(), float), ref, rtol=1e-5)
    np.testing.assert_array_equal(scope["w"].numpy(), np.full(4, 10.0))


def test_a_tensor_is_refused_naming_the_drop_in_and_the_argument_in_tensorflows_words():
    """Refusals name the class the caller used (not fastema.tensorflow.EMA, whose check is shared) and
    the argument; a tensor is refused in the words TensorFlow's apply() uses for it, eagerly and inside
    a tf.function (a SymbolicTensor), in apply(), average() and average_name()."""
    from fastema.tensorflow import EMA

    try:
        tf.train.ExponentialMovingAverage(0.9).apply([tf.ones(3)])
    except TypeError as err:
        theirs = str(err).split("ExponentialMovingAverage ", 1)[1].rstrip(".")
    assert theirs == "does not support non-Variable tensors when eager execution is enabled"
    v = tf.Variable([1.0, 2.0, 3.0], name="w")
    ema = ExponentialMovingAverage(0.9)
    ema.apply([v])
    calls = [("var_list[1]", lambda t: ema.apply([v, t])), ("var", ema.average), ("var", ema.average_name)]
    for what, call in calls:
        for where in ("eager", "tf.function"):
            with pytest.raises(TypeError) as got:
                if where == "eager":
                    call(tf.ones(3))
                else:
                    tf.function(lambda: call(v * 2) and None)()
            msg = str(got.value)
            tensor = "EagerTensor" if where == "eager" else "SymbolicTensor"
            assert f"fastema.tensorflow.compat.ExponentialMovingAverage {theirs} ({what} is a " in msg
            assert f"{tensor}); pass the tf.Variables themselves." in msg
            assert "fastema.tensorflow.EMA" not in msg
    with pytest.raises(TypeError, match=r"^var_list\[0\] is a numpy.ndarray; fastema.tensorflow.compat."
                                        r"ExponentialMovingAverage averages tf.Variables \(e.g. model"):
        ema.apply([np.ones(3, np.float32)])
    np.testing.assert_array_equal(ema.average(v).numpy(), v.numpy())          # nothing was updated
    with pytest.raises(TypeError, match=r"^variables\[1\] is a tensorflow.python.framework.ops.EagerTensor; "
                                        r"fastema.tensorflow.EMA averages tf.Variables"):
        EMA([v, tf.ones(3)], 0.9)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_apply_to_part_of_a_group_gives_the_kernels_bits(dtype):
    """``apply()`` of some of the variables an earlier ``apply()`` made together (a layer frozen since)
    updated them by NumPy arithmetic in their own dtype (three roundings, the weight rounded to it):
    about half the elements differed from the same update through the whole group. Both take the
    kernel now: the same bits."""
    dt = getattr(tf, dtype)
    rng = np.random.default_rng(0)
    s0 = tf.cast(tf.constant(rng.standard_normal(4096).astype(np.float32)), dt)
    x0 = tf.cast(tf.constant(rng.standard_normal(4096).astype(np.float32)), dt)
    a, b, c = tf.Variable(s0), tf.Variable(tf.zeros(3, dt)), tf.Variable(s0)
    ema = ExponentialMovingAverage(decay=0.3)
    ema.apply([a, b])                                   # groups {a, b} and {c}
    ema.apply([c])
    for step in range(3):
        a.assign(x0 * (step + 1))
        c.assign(x0 * (step + 1))
        ema.apply([a])                                  # part of its group
        ema.apply([c])                                  # its whole group
        got, want = ema.average(a).numpy(), ema.average(c).numpy()
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), step
