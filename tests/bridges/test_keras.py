"""fastema.keras on real Keras 3 ``model.fit`` runs (torch backend, CPU)."""
import copy
import json
import os
import pathlib
import re

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
pd = pytest.importorskip("pandas")
if keras.backend.backend() != "torch":                      # pragma: no cover
    pytest.skip("these tests drive Keras on the torch backend", allow_module_level=True)

from backend_runs import run_on, script  # noqa: E402
from models import keras_data as data  # noqa: E402
from models import keras_model as make_model
from models import keras_probe

from fastema.keras import MovingAverageLogs, WeightEMA  # noqa: E402
from fastema.schedules import BEMA, PowerFunction, PowerWarmup  # noqa: E402


def _ran(backend: str, source: str, name: str, capsys) -> dict:
    """The JSON a registered script ``name`` prints last: on torch (this process's Keras backend) run here,
    elsewhere in that backend's process (:func:`backend_runs.run_on`)."""
    if backend == "torch":
        exec(compile(source, name, "exec"), {"__name__": "__main__"})
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pytest.importorskip(backend)
    return run_on(backend, name)


class BatchLosses(keras.callbacks.Callback):
    """The loss and MAE of each batch, computed independently before the step, in float64."""

    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.bs = x, y, batch_size
        self.loss, self.mae = [], []

    def on_train_batch_begin(self, batch, logs=None):
        xb, yb = self.x[batch * self.bs:(batch + 1) * self.bs], self.y[batch * self.bs:(batch + 1) * self.bs]
        pred = keras.ops.convert_to_numpy(self.model(xb, training=True)).astype(np.float64)
        err = pred - yb.astype(np.float64)
        self.loss.append(float(np.mean(err ** 2)))
        self.mae.append(float(np.mean(np.abs(err))))


class BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append(dict(logs))


def test_raw_loss_is_each_batch_alone_and_smoothing_crosses_epochs():
    x, y = data(100)                          # batches of 32, 32, 32 and an uneven 4
    model = make_model()
    truth, seen = BatchLosses(x, y, 32), BatchLogs()
    cb = MovingAverageLogs(ema=0.8, sma=5, metrics=("loss", "mae"))
    hist = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=[truth, cb, seen])
    raw = [r["loss_raw"] for r in seen.rows]
    assert len(raw) == 12
    np.testing.assert_allclose(raw, truth.loss, rtol=2e-6)
    np.testing.assert_allclose([r["mae_raw"] for r in seen.rows], truth.mae, rtol=2e-6)
    # Keras's own 'loss' is the running mean; ours differs from it after the first batch of an epoch
    assert not np.allclose(raw, [r["loss"] for r in seen.rows])
    # smoothing continues across the epoch boundaries: pandas over the whole series
    series = pd.Series(truth.loss)
    np.testing.assert_allclose([r["loss_ema"] for r in seen.rows], series.ewm(alpha=0.2, adjust=True).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose([r["loss_sma"] for r in seen.rows], series.rolling(5, min_periods=1).mean(),
                               rtol=1e-5)
    # the epoch logs (History) carry the values after each epoch's last batch
    for key in ("loss_raw", "loss_ema", "loss_sma", "mae_ema"):
        assert hist.history[key] == pytest.approx([seen.rows[i][key] for i in (3, 7, 11)])
    assert "val_loss" not in hist.history and "loss" in hist.history


def test_steps_per_execution_reports_the_mean_of_the_executed_batches():
    # The torch backend runs one step per execution, so drive the callback the way Keras does
    # with steps_per_execution=3: the loss tracker takes three batches, then one callback.
    model = make_model()
    model.fit(*data(8), batch_size=8, epochs=1, verbose=0)          # builds the metrics
    cb = MovingAverageLogs(ema=0.5, sma=None)
    cb.set_model(model)
    cb.on_train_begin()
    tracker = model.metrics[0]
    assert tracker.name == "loss"
    tracker.reset_state()
    cb.on_epoch_begin(0)
    batches = [(1.0, 32), (2.0, 32), (4.0, 16)]
    for v, n in batches:
        tracker.update_state(v, sample_weight=n)
    logs = {}
    cb.on_train_batch_end(2, logs)
    assert logs["loss_raw"] == pytest.approx((32 * 1 + 32 * 2 + 16 * 4) / 80)
    tracker.update_state(3.0, sample_weight=10)
    cb.on_train_batch_end(3, logs)
    assert logs["loss_raw"] == pytest.approx(3.0)
    # epoch reset: Keras zeroes the tracker, the callback forgets its previous reading
    tracker.reset_state()
    cb.on_epoch_begin(1)
    tracker.update_state(7.0, sample_weight=5)
    cb.on_train_batch_end(0, logs)
    assert logs["loss_raw"] == pytest.approx(7.0)
    assert logs["loss_ema"] == pytest.approx(pd.Series([2.0, 3.0, 7.0]).ewm(alpha=0.5).mean().iloc[-1])


def test_unknown_or_non_mean_metric_is_refused_clearly():
    model = make_model()
    x, y = data(40)
    with pytest.raises(ValueError, match=r"no running-mean metric \['accuracy'\].*has \['loss', 'mae'\]"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[MovingAverageLogs(metrics=("loss", "accuracy"))])
    with pytest.raises(TypeError, match="ema must be"):
        MovingAverageLogs(ema="fast")
    with pytest.raises(ValueError, match="window"):
        MovingAverageLogs(sma=0)


MULTI_OUTPUT = r"""
import json
import keras, numpy as np
from fastema.keras import MovingAverageLogs
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 3)).astype("float32")
ya, yb = rng.normal(size=(64, 1)).astype("float32"), 10 * rng.normal(size=(64, 1)).astype("float32")
inp = keras.Input((3,))
model = keras.Model(inp, {"a": keras.layers.Dense(1, name="a")(inp), "b": keras.layers.Dense(1, name="b")(inp)})
model.compile(keras.optimizers.SGD(0.0), loss={"a": "mse", "b": "mse"}, metrics={"a": ["mae"], "b": ["mae"]})
rows = []
class Rec(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        rows.append({k: float(v) for k, v in logs.items()})
names = ("loss", "a_mae", "b_mae", "b_loss")
model.fit(x, {"a": ya, "b": yb}, batch_size=16, epochs=1, shuffle=False, verbose=0,
          callbacks=[MovingAverageLogs(ema=0.5, sma=None, metrics=names), Rec()])
pred = model.predict(x, verbose=0)                    # learning rate 0: the weights of every batch
out = {"rows": rows, "pred": {k: np.asarray(v, np.float64).tolist() for k, v in pred.items()}}
try:
    model.fit(x, {"a": ya, "b": yb}, batch_size=16, verbose=0, callbacks=[MovingAverageLogs(metrics=("mae",))])
except ValueError as e:
    out["refused"] = str(e)
print(json.dumps(out))
"""


script("MULTI_OUTPUT", MULTI_OUTPUT, ("tensorflow", "jax"))


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_a_multi_output_models_metrics_are_taken_by_the_names_keras_logs(backend, capsys):
    """A model with outputs a and b logs a_mae and b_mae: they were refused (the callback knew the metrics by
    their own name, mae), and mae was a's alone; on JAX both MAEs were read from a's state (the metric
    variables were found by path, which the two share). Each *_raw is its batch's own value, in float64;
    mae is refused, naming a_mae and b_mae."""
    res = _ran(backend, MULTI_OUTPUT, "MULTI_OUTPUT", capsys)
    rng = np.random.default_rng(0)
    rng.normal(size=(64, 3))                                # x: the script's draws, in its order
    ya, yb = rng.normal(size=(64, 1)), 10 * rng.normal(size=(64, 1))
    ya, yb = ya.astype(np.float32).astype(np.float64), yb.astype(np.float32).astype(np.float64)
    pa, pb = np.asarray(res["pred"]["a"]), np.asarray(res["pred"]["b"])
    want = {"a_mae": [], "b_mae": [], "b_loss": [], "loss": []}
    for i in range(4):
        s = slice(16 * i, 16 * i + 16)
        want["a_mae"].append(np.mean(np.abs(pa[s] - ya[s])))
        want["b_mae"].append(np.mean(np.abs(pb[s] - yb[s])))
        want["b_loss"].append(np.mean((pb[s] - yb[s]) ** 2))
        want["loss"].append(np.mean((pa[s] - ya[s]) ** 2) + want["b_loss"][-1])
    assert len(res["rows"]) == 4
    for name, ref in want.items():
        np.testing.assert_allclose([r[name + "_raw"] for r in res["rows"]], ref, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose([r[name + "_ema"] for r in res["rows"]], pd.Series(ref).ewm(alpha=0.5).mean(),
                                   rtol=1e-4, err_msg=name)
    assert re.search(r"2 metrics of this model are named 'mae'.*logs them as \['a_mae', 'b_mae'\]: give those "
                     r"names in metrics=", res["refused"])


def naive_ema(initial, steps, decay):
    ema = [w.copy() for w in initial]               # the EMA starts from the weights when fit starts
    for ws in steps:
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, ws)]
    return ema


def test_weight_ema_validates_with_the_average_and_restores_the_raw_weights():
    x, y = data(96)
    model = make_model(batchnorm=True)
    probe = keras_probe()
    cb = WeightEMA(decay=0.9)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_data=data(32, seed=1),
              callbacks=[cb, probe])
    assert cb.ema.updates == 12
    for epoch in range(2):
        expected = naive_ema(probe.initial, probe.steps[:6 * (epoch + 1)], 0.9)
        for got, ref in zip(probe.validated[epoch], expected):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        for got, raw in zip(probe.epoch_end[epoch], probe.steps[6 * (epoch + 1) - 1]):
            np.testing.assert_array_equal(got, raw)                 # raw weights back, bit for bit
    # BatchNorm statistics are copied, not averaged: the averaged model carries the current ones
    averaged = cb.ema.averaged_state_dict()
    bn = [v for v in model.non_trainable_variables if "moving_mean" in v.path][0]
    key = [k for k in averaged if k.endswith("." + bn.path)][0]
    np.testing.assert_array_equal(averaged[key].numpy(), bn.numpy())


def test_two_weight_emas_swap_back_the_last_swapped_in_first():
    # Keras calls on_test_begin and on_test_end both in the callbacks' order: the second WeightEMA
    # held the first one's average as its raw weights, the first swapped back first, and training went
    # on from the first's average (each shadow then held the other's weights)
    x, y = data(96)
    model = make_model(batchnorm=False)
    probe = keras_probe()
    a, b = WeightEMA(decay=0.5), WeightEMA(decay=0.9)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_data=data(32, seed=1),
              callbacks=[a, b, probe])
    for epoch in range(2):
        for got, raw in zip(probe.epoch_end[epoch], probe.steps[6 * (epoch + 1) - 1]):
            np.testing.assert_array_equal(got, raw)                 # raw weights back, bit for bit
        expected = naive_ema(probe.initial, probe.steps[:6 * (epoch + 1)], 0.9)
        for got, ref in zip(probe.validated[epoch], expected):      # the last one swapped in
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    for cb, decay in ((a, 0.5), (b, 0.9)):
        averaged = cb.ema.averaged_state_dict()
        got = [averaged[[k for k in averaged if k.endswith("." + v.path)][0]].numpy()
               for v in model.trainable_variables]
        for g, ref in zip(got, naive_ema(probe.initial, probe.steps, decay)):
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


def test_weight_ema_written_at_end_and_resumed_from_state():
    x, y = data(64)
    model = make_model(optimizer="sgd")
    cb = WeightEMA(decay=0.8, write_at_end=True)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    averaged = cb.ema.averaged_state_dict()
    for v in model.trainable_variables:
        keys = [k for k in averaged if k.endswith("." + v.path)]     # Keras registers aliases
        assert keys
        for key in keys:
            np.testing.assert_array_equal(v.numpy(), averaged[key].numpy())
    assert not cb.ema.swapped

    # resume: the same run continued, against a fresh callback restored from a checkpoint
    model = make_model(optimizer="sgd")
    first = WeightEMA(decay=0.8)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[first])
    saved_state = copy.deepcopy(first.state_dict())
    saved_weights = model.get_weights()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[first])
    model.set_weights(saved_weights)                # SGD keeps no state: the second epoch replays exactly
    second = WeightEMA(decay=0.8)
    second.load_state_dict(saved_state)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[second])
    assert second.ema.updates == first.ema.updates == 8
    for k, v in first.ema.averaged_state_dict().items():
        np.testing.assert_array_equal(second.ema.averaged_state_dict()[k].numpy(), v.numpy())


class _Diverge(keras.callbacks.Callback):
    """A NaN in the last layer's bias at batch ``at``, read by the EMA's update of that batch alone
    (``undo``, a callback after the EMA's, puts it back): with the guard off the average keeps it."""

    def __init__(self, at):
        super().__init__()
        self.at = at
        self.undo = keras.callbacks.LambdaCallback(on_train_batch_end=self.put_back)

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at:
            bias = self.model.layers[-1].bias
            self.kept = bias.numpy().copy()
            bias.assign(np.full_like(self.kept, np.nan))

    def put_back(self, batch, logs=None):
        if batch == self.at:
            self.model.layers[-1].bias.assign(self.kept)


def test_a_poisoned_average_is_refused_at_the_end_of_fit_and_by_a_resume_until_repaired():
    x, y = data(48)
    model = make_model(optimizer="sgd")
    cb, diverge = WeightEMA(decay=0.8, write_at_end=True), _Diverge(at=1)
    with pytest.raises(ValueError, match=r"copy_to\(\): the average holds inf or NaN in '.*bias'.*repair_nonfinite"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[diverge, cb, diverge.undo])
    raw = model.get_weights()
    assert all(np.isfinite(w).all() for w in raw)      # the write at the end refused: the raw weights kept
    with pytest.warns(RuntimeWarning, match="bias"):
        state = copy.deepcopy(cb.state_dict())
    assert len(state["nonfinite"]) == 1 and state["nonfinite"][0].endswith("bias")
    refused = WeightEMA(decay=0.8)
    refused.load_state_dict(state)
    with pytest.raises(ValueError, match="holds inf or NaN.*allow_nonfinite=True"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[refused])
    resumed = WeightEMA(decay=0.8, allow_nonfinite=True)
    resumed.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="allow_nonfinite"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[resumed])
    assert resumed.repair_nonfinite() == state["nonfinite"]
    resumed.ema.copy_to()
    assert all(np.isfinite(w).all() for w in model.get_weights())


# An average NaN reached, on every backend (the torch one in-process, the others in their backend's
# subprocess): planted through a load allowed, refused by the validation swap, write_at_end, a resume and the
# file readers (each offering allow_nonfinite=True, then repair_nonfinite()), repaired from the live weights.
POISONED = r"""
import json, tempfile, warnings
import keras, numpy as np
import fastema.keras._entries as fe
import fastema.keras._saving as fk
from fastema.keras import WeightEMA, averaged_weights, load_average
from models import keras_data, keras_model
_tmp = tempfile.TemporaryDirectory()
x, y = keras_data(16)
out = {}

def message(f):
    try:
        f()
    except ValueError as e:
        return str(e)
    return None

def fit(model, cb):                                    # the callback's begin and end: no step traced
    model.fit(x, y, batch_size=16, epochs=0, shuffle=False, verbose=0, callbacks=[cb])

model, first = keras_model(optimizer="sgd", metrics=()), WeightEMA(0.8)
fit(model, first)
state = first.state_dict()
name = next(n for n, s in fe._structural_keys(first, state).items() if s == "variables/0")
for key, a in state["averaged"].items():                # an average apart from the weights
    a = fe._to_numpy(a) + 0.25
    if key == name:
        a.reshape(-1)[1] = np.nan
    state["averaged"][key] = fe._to_backend(a)
refused = WeightEMA(0.8)
refused.load_state_dict(state)
out["resume"] = message(lambda: fit(model, refused))
cb = WeightEMA(0.8, allow_nonfinite=True)
cb.load_state_dict(state)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fit(model, cb)                                     # resumed with a warning
out["resume_warned"] = any("allow_nonfinite" in str(w.message) for w in caught)
cb.ema.allow_nonfinite = False
out["swap"] = message(cb.ema.swap)                     # what the validation swap calls
cb.write_at_end = True
out["write_at_end"] = message(lambda: fit(model, cb))
out["raw_finite"] = all(bool(np.isfinite(w).all()) for w in model.get_weights())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model.save(f"{_tmp.name}/m.keras")
out["save_warned"] = any("inf or NaN" in str(w.message) for w in caught)
fresh = keras_model(optimizer="sgd", metrics=())
out["file"] = message(lambda: load_average(fresh, f"{_tmp.name}/m.keras"))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    load_average(fresh, f"{_tmp.name}/m.keras", allow_nonfinite=True)
out["file_warned"] = any("allow_nonfinite" in str(w.message) for w in caught)
out["averaged_weights"] = message(lambda: averaged_weights(fresh))
out["allowed_weights_nan"] = bool(np.isnan(averaged_weights(fresh, allow_nonfinite=True)[0]).any())
out["from_file"] = message(lambda: fit(fresh, WeightEMA(0.8)))
kept = [fe._to_numpy(a).copy() for a in fk._structural_state(cb)["averaged"].values()]
out["repaired"] = cb.repair_nonfinite() == [name]
after = fk._structural_state(cb)["averaged"]
live = np.asarray(keras.ops.convert_to_numpy(model.trainable_variables[0]))
out["repaired_rows"] = bool(np.array_equal(fe._to_numpy(after["variables/0"])[0], live))
out["others_kept"] = all(np.array_equal(fe._to_numpy(a), k) for (key, a), k in zip(after.items(), kept)
                         if key != "variables/0")
cb.ema.swap()
cb.ema.swap()
fit(model, cb)                                         # the swap and write_at_end go through now
out["written_finite"] = all(bool(np.isfinite(w).all()) for w in model.get_weights())
_tmp.cleanup()
print(json.dumps(out))
"""


script("POISONED", POISONED, ("tensorflow", "jax"))


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_an_average_nan_reached_is_refused_loaded_when_allowed_and_repaired_on_every_backend(backend, capsys):
    """Issue 85 item 2 on Keras's three backends: a resume, the validation swap, write_at_end, the file
    readers (load_average, averaged_weights, a WeightEMA resuming from the file) refuse it by name, each
    offering the road that loads it (allow_nonfinite=True) and repair_nonfinite(); on TensorFlow and JAX the
    swap and write_at_end let it in, there was no repair_nonfinite() and no way to load the file."""
    res = _ran(backend, POISONED, "POISONED", capsys)
    advice = "To load it all the same and repair it, pass allow_nonfinite=True"
    assert advice in res["resume"] and "holds inf or NaN" in res["resume"]
    for key in ("resume_warned", "raw_finite", "save_warned", "file_warned", "allowed_weights_nan", "repaired",
                "repaired_rows", "others_kept", "written_finite"):
        assert res[key] is True, key
    assert re.search(r"swap\(\): the average holds inf or NaN in .*repair_nonfinite", res["swap"])
    assert re.search(r"copy_to\(\): the average holds inf or NaN in .*repair_nonfinite", res["write_at_end"])
    assert re.search(r"m\.keras' holds inf or NaN \(average 0: variables/0 holds inf or NaN\)\. " + advice,
                     res["file"])
    assert re.search(r"averaged_weights\(\): average 0 holds inf or NaN in 'variables/0'", res["averaged_weights"])
    assert re.search(r"the average saved with this model holds inf or NaN in 'variables/0'\. " + advice,
                     res["from_file"])


def test_weight_ema_refuses_another_model_and_other_backends(monkeypatch):
    cb = WeightEMA()
    with pytest.raises(RuntimeError, match="no EMA yet"):
        cb.state_dict()
    x, y = data(32)
    make_model().fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    with pytest.raises(RuntimeError, match="another model"):
        make_model().fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    other = WeightEMA()
    other.set_model(make_model())
    monkeypatch.setattr(keras.backend, "backend", lambda: "openvino")
    with pytest.raises(RuntimeError, match="torch, tensorflow and jax backends.*'openvino'"):
        other.on_train_begin()


# The fits on the JAX and TensorFlow backends run in subprocesses (Keras picks its backend once per
# process), all the scripts of one backend in one process (backend_runs): one start-up each.
JAX_FIT = r"""
import json, os
os.environ["KERAS_BACKEND"] = "jax"
import keras, numpy as np
from fastema.keras import MovingAverageLogs
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
model.compile(keras.optimizers.SGD(0.05), "mse", steps_per_execution=2)
rng = np.random.default_rng(0)
x = rng.normal(size=(100, 4)).astype("float32")
y = np.sin(x).sum(1, keepdims=True).astype("float32")
rows = []
class Rec(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        rows.append([batch, logs["loss"], logs["loss_raw"], logs["loss_ema"]])
model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
          callbacks=[MovingAverageLogs(ema=0.5, sma=None), Rec()])
print(json.dumps(rows))
"""


script("JAX_FIT", JAX_FIT, ("jax",))


def test_steps_per_execution_on_the_jax_backend():
    """A real fit with steps_per_execution=2 (the JAX backend runs several steps per call)."""
    pytest.importorskip("jax")
    rows = run_on("jax", "JAX_FIT")
    # 100 samples in batches of 32, 32, 32, 4: two reports per epoch, after batches 1 and 3
    assert [r[0] for r in rows] == [1, 3, 1, 3]
    for epoch in range(2):
        (_, m1, raw1, _), (_, m2, raw2, _) = rows[2 * epoch:2 * epoch + 2]
        assert raw1 == pytest.approx(m1, rel=1e-6)                       # first execution: the mean itself
        assert raw2 == pytest.approx((m2 * 100 - m1 * 64) / 36, rel=1e-4)  # batches of 32 and 4
    raws = pd.Series([r[2] for r in rows])
    assert [r[3] for r in rows] == pytest.approx(list(raws.ewm(alpha=0.5).mean()), rel=1e-9)


WEIGHT_EMA_FIT = r"""
import copy, json, os, sys
import keras, numpy as np
from fastema.keras import WeightEMA
from models import keras_data, keras_model, keras_probe
backend = keras.backend.backend()

def make_model(batchnorm):
    return keras_model(batchnorm, optimizer="sgd", metrics=())

def data(n, seed=0):
    return keras_data(n, seed, noise=0)

x, y = data(96)
model = make_model(batchnorm=True)
probe, cb = keras_probe(), WeightEMA(decay=0.9)
model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_data=data(32, 1),
          callbacks=[cb, probe])
lists = lambda ws: [w.tolist() for w in ws]
out = dict(initial=lists(probe.initial), steps=[lists(ws) for ws in probe.steps],
           validated=[lists(ws) for ws in probe.validated], epoch_end=[lists(ws) for ws in probe.epoch_end],
           updates=cb.ema.updates, swapped=cb.ema.swapped)

# resume: an uninterrupted 2-epoch EMA against 1 epoch + checkpoint + 1 epoch in a fresh callback
model = make_model(batchnorm=False)
first = WeightEMA(decay=0.8)
model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[first])
saved, weights = copy.deepcopy(first.state_dict()), model.get_weights()
model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[first])
model.set_weights(weights)                          # SGD keeps no state: the second epoch replays exactly
second = WeightEMA(decay=0.8)
second.load_state_dict(saved)
model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[second])
a, b = first.state_dict()["averaged"], second.state_dict()["averaged"]
out["resumed_equal"] = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
out["resumed_updates"] = [first.ema.updates, second.ema.updates]
print(json.dumps(out))
"""


script("WEIGHT_EMA_FIT", WEIGHT_EMA_FIT, ("tensorflow", "jax"))


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_weight_ema_on_the_tensorflow_and_jax_backends(backend):
    """A real fit on each backend: validation runs with the naive EMA, the raw weights come back
    bit for bit, and a resumed EMA equals an uninterrupted one."""
    pytest.importorskip(backend)
    res = run_on(backend, "WEIGHT_EMA_FIT")
    assert res["updates"] == 12 and not res["swapped"]
    steps = [[np.asarray(w) for w in ws] for ws in res["steps"]]
    for epoch in range(2):
        expected = naive_ema([np.asarray(w) for w in res["initial"]], steps[:6 * (epoch + 1)], 0.9)
        for got, ref in zip(res["validated"][epoch], expected):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        for got, raw in zip(res["epoch_end"][epoch], steps[6 * (epoch + 1) - 1]):
            np.testing.assert_array_equal(got, raw)                 # raw weights back, bit for bit
    assert res["resumed_equal"] and res["resumed_updates"] == [12, 12]


TF_RELIABILITY = r"""
import gc, json, weakref
import keras, numpy as np
from fastema.keras import WeightEMA
from models import keras_data, keras_model, keras_probe
x, y = keras_data(32)
out = {}
# one EMA per fit: each is freed with its callback (TensorFlow's py-func registry kept every one)
refs, model = [], keras_model()
for _ in range(3):
    cb = WeightEMA(0.9)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    refs.append(weakref.ref(cb.ema))
del cb
gc.collect()
out["alive_after_fits"] = [r() is not None for r in refs]
del model
gc.collect()
out["alive_after_model"] = [r() is not None for r in refs]

class Scale(keras.layers.Layer):          # a 0-d weight (a layer scale)
    def build(self, shape):
        self.s = self.add_weight(shape=(), initializer="ones")
    def call(self, x):
        return x * self.s

keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1), Scale()])
model.compile(keras.optimizers.SGD(0.05), "mse")
probe, cb = keras_probe(), WeightEMA(0.5)
model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[cb, probe])
ref = probe.initial
for ws in probe.steps:
    ref = [0.5 * r + 0.5 * w for r, w in zip(ref, ws)]
out["averages"] = [a.numpy().tolist() for a in cb.ema.averages()]
out["reference"] = [r.tolist() for r in ref]
print(json.dumps(out))
"""


script("TF_RELIABILITY", TF_RELIABILITY, ("tensorflow",))


def test_a_scalar_weight_is_averaged_on_the_tensorflow_backend():
    """reliability round 4, D1: a 0-d weight was averaged from freed memory (0.53 for 0.72)."""
    pytest.importorskip("tensorflow")
    res = run_on("tensorflow", "TF_RELIABILITY")
    assert np.shape(res["averages"][-1]) == ()
    for got, ref in zip(res["averages"], res["reference"]):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_each_fits_ema_is_freed_with_its_callback_on_the_tensorflow_backend():
    """reliability round 4, M3: every WeightEMA's EMA stayed alive (TensorFlow's py-func registry held its
    update): one leak of a model-sized shadow per fit. The model carries the last fit's until it goes."""
    pytest.importorskip("tensorflow")
    res = run_on("tensorflow", "TF_RELIABILITY")
    assert res["alive_after_fits"] == [False, False, True]
    assert res["alive_after_model"] == [False, False, False]


OPTIONS_FIT = r"""
import json, warnings
import keras, numpy as np
from fastema.keras import _jax
from fastema.keras import WeightEMA
from fastema.schedules import BEMA, HalfLife, PowerFunction
out = {}

class Pin(keras.callbacks.Callback):      # the private Keras state the shim reads on JAX is still there
    seen = []
    def on_train_batch_end(self, batch, logs=None):
        m = self.model
        Pin.seen.append(hasattr(m, "_jax_state") and hasattr(m, "_jax_state_synced") and callable(m.jax_state_sync))
        vs = list(m.trainable_variables)
        _jax.trainable_values(m, vs, _jax.positions(m, vs))

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 4)).astype("float32")
y = np.sin(x).sum(1, keepdims=True).astype("float32")
for name, kw in [("sigma_rel", dict(decay=PowerFunction.of(0.1))), ("half_life", dict(decay=HalfLife(4.0))),
                 ("bema", dict(decay=BEMA())), ("update_every", dict(decay=0.9, update_every=2))]:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    cb = WeightEMA(**kw)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x, y), callbacks=[cb, Pin()])
    out[name] = [cb.ema.updates, type(cb.ema.plan.schedules[0]).__name__, cb.ema.swapped]
out["pinned"] = all(Pin.seen) if keras.backend.backend() == "jax" else None
refused = {}
for kw in (dict(offload="cpu"), dict(device_step=True), dict(exclude=["x"])):
    try:
        WeightEMA(0.9, **kw)
        refused[next(iter(kw))] = None
    except ValueError as err:
        refused[next(iter(kw))] = str(err)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    WeightEMA()
out["default_warning"] = [str(w.message) for w in caught if w.category is FutureWarning]
out["refused"] = refused
print(json.dumps(out))
"""


script("OPTIONS_FIT", OPTIONS_FIT, ("tensorflow", "jax"))


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_weight_ema_takes_every_schedule_option_on_every_backend(backend):
    """WeightEMA(decay=PowerFunction.of(0.1)) used to be accepted, then fail in fit() with a TypeError on the
    JAX and TensorFlow backends: every backend's EMA now takes the options (or refuses one by name at
    construction)."""
    pytest.importorskip(backend)
    res = run_on(backend, "OPTIONS_FIT")
    assert res["sigma_rel"] == [8, "PowerFunction", False]
    assert res["half_life"] == [8, "HalfLife", False]
    assert res["bema"] == [8, "BEMA", False]
    assert res["update_every"] == [4, "Constant", False]
    for option, message in res["refused"].items():
        assert message is not None and f"does not take {option}=" in message, (option, message)
    assert len(res["default_warning"]) == 1 and "0.9999" in res["default_warning"][0]
    assert res["pinned"] is (True if backend == "jax" else None)


def test_weight_ema_takes_every_schedule_option_on_the_torch_backend():
    x, y = data(64)
    for kw, kind in ((dict(decay=PowerFunction.of(0.1)), "PowerFunction"), (dict(decay=BEMA()), "BEMA")):
        model = make_model()
        cb = WeightEMA(**kw)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x, y), callbacks=[cb])
        assert cb.ema.updates == 8 and type(cb.ema.plan.schedules[0]).__name__ == kind and not cb.ema.swapped
    for unset in ({}, dict(update_every=1), dict(debias=False)):    # options from a config: default ones count
        with pytest.warns(FutureWarning, match="0.9999"):
            WeightEMA(**unset)
    with pytest.raises(TypeError, match="unknown EMA option.*'sigma'"):
        WeightEMA(sigma=0.1)


def test_seeded_ema_of_the_logs_is_pandas_adjust_false():
    """ema={"span": 3, "mode": "seeded"} (or pandas' own {"adjust": False}) is pandas' ewm(adjust=False); it
    was a TypeError ("multiple values for keyword argument 'mode'")."""
    x, y = data(100)
    rows = {}
    for key, ema in (("mode", {"span": 3, "mode": "seeded"}), ("adjust", {"span": 3, "adjust": False})):
        model = make_model()
        truth, seen = BatchLosses(x, y, 32), BatchLogs()
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                  callbacks=[truth, MovingAverageLogs(ema=ema, sma=None), seen])
        rows[key] = [r["loss_ema"] for r in seen.rows]
        np.testing.assert_allclose(rows[key], pd.Series(truth.loss).ewm(span=3, adjust=False).mean(), rtol=1e-5)
        assert not np.allclose(rows[key], pd.Series(truth.loss).ewm(span=3, adjust=True).mean(), rtol=1e-5)
    assert rows["mode"] == rows["adjust"]
    with pytest.raises(TypeError, match=r"unknown key\(s\) \['window'\].*sma="):
        MovingAverageLogs(ema={"span": 3, "window": 5})
    with pytest.raises(ValueError, match="adjust=True and mode='seeded', which disagree"):
        MovingAverageLogs(ema={"span": 3, "adjust": True, "mode": "seeded"})
    with pytest.raises(ValueError, match="mode must be one of"):
        MovingAverageLogs(ema={"span": 3, "mode": "pandas"})


def test_keras_use_ema_start_is_an_option_and_the_default_starts_from_the_initial_weights():
    """Keras's optimizer use_ema copies the weights at the optimizer's first step, then averages with
    ema_momentum; WeightEMA starts from the weights when fit starts. PowerWarmup(decay, min_decay=decay)
    (the first update copies, then decay) is Keras's start: side by side with use_ema."""
    x, y = data(96)

    def fit(optimizer, callbacks=()):
        model = make_model(optimizer="sgd")                 # the same initial weights every time
        model.compile(optimizer, "mse")
        probe = keras_probe()
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[*callbacks, probe])
        return model, probe

    keras_ema, _ = fit(keras.optimizers.SGD(0.05, use_ema=True, ema_momentum=0.9))   # written into the model
    like_keras, _ = fit(keras.optimizers.SGD(0.05), [WeightEMA(PowerWarmup(0.9, min_decay=0.9),
                                                               write_at_end=True)])
    default, probe = fit(keras.optimizers.SGD(0.05), [WeightEMA(0.9, write_at_end=True)])
    assert len(probe.steps) == 12
    for a, b in zip(keras_ema.get_weights(), like_keras.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    naive = naive_ema(probe.initial, probe.steps, 0.9)      # from the initial weights
    for got, ref, k, w0, w1 in zip(default.get_weights(), naive, keras_ema.get_weights(), probe.initial,
                                   probe.steps[0]):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got - k, 0.9 ** 12 * (w0 - w1), atol=1e-6)    # the difference, in closed form
        assert np.abs(got - k).max() > 1e-3


# Saving the average with the model, on every backend: the same script in-process on torch, in the
# backend's subprocess on TensorFlow and JAX (backend_runs: no process of its own).
SAVE_LOAD = r"""
import json, tempfile, warnings, zipfile
import keras, numpy as np
import fastema.keras._saving as fk       # the average in Keras's files, its private helpers included
from fastema._checkpoint_format import GROUPS
from fastema.keras import WeightEMA
from models import keras_data, keras_model
_tmp = tempfile.TemporaryDirectory()      # removed when the script ends
d = _tmp.name
x, y = keras_data(64)
out = {}

def flat(state):                       # a structural state: every array and counter, comparable across models
    arrays = {f"{g}/{k}": np.asarray(fk._to_numpy(a)) for g in GROUPS for k, a in (state.get(g) or {}).items()}
    return arrays, {k: v for k, v in state.items() if k not in GROUPS and k != "backend"}

def same(a, b):
    (xa, ca), (xb, cb) = flat(a), flat(b)
    return sorted(xa) == sorted(xb) and all(xa[k].dtype == xb[k].dtype and np.array_equal(xa[k], xb[k]) for k in xa) \
        and ca == cb

def weights_equal(m1, m2):
    return all(np.array_equal(a, b) for a, b in zip(m1.get_weights(), m2.get_weights()))

def fit(model, cb, epochs=1, more=()):
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=[cb, *more])

# An uninterrupted run, 2 epochs (Adam; BatchNorm statistics copied along on torch), with both kinds of
# ModelCheckpoint: each file carries the average as it was at that epoch's end.
class Keep(keras.callbacks.Callback):
    states = []
    def on_epoch_end(self, epoch, logs=None):
        Keep.states.append(fk._structural_state(full))
full_model, full = keras_model(batchnorm=True), WeightEMA(0.9)
fit(full_model, full, 2, [Keep(), keras.callbacks.ModelCheckpoint(f"{d}/ck.keras"),
                          keras.callbacks.ModelCheckpoint(d + "/ck{epoch}.weights.h5", save_weights_only=True)])
full_state = fk._structural_state(full)
# the same run, saved after the first epoch and continued from the loaded file by a new WeightEMA
model, first = keras_model(batchnorm=True), WeightEMA(0.9)
fit(model, first)
model.save(f"{d}/m.keras")
at_save = fk._structural_state(first)
out["first_epoch_equal"] = same(at_save, Keep.states[0])
loaded = fk.load_model(f"{d}/m.keras")
out["loaded_equal"] = same(fk._saved_averages(loaded).entries()[0], at_save)
out["averaged_weights_equal"] = all(np.array_equal(a, b) for a, b in zip(fk.averaged_weights(loaded),
                                                                         fk.averaged_weights(model)))
keys = {id(v): f"variables/{i}" for i, v in enumerate(model.variables)}     # each variable's key: its place
out["averaged_is_row0"] = all(np.array_equal(a, np.asarray(fk._to_numpy(at_save["averaged"][keys[id(v)]]))[0])
                              for v, a in zip(model.trainable_variables, fk.averaged_weights(model)))
resumed = WeightEMA(0.9)
fit(loaded, resumed)
out["resumed_equal"] = same(fk._structural_state(resumed), full_state)
out["resumed_updates"] = [resumed.ema.updates, full.ema.updates]
out["weights_equal"] = weights_equal(loaded, full_model)
# ModelCheckpoint's files: a .keras through load_model, a .weights.h5 through load_average (a fresh model) and
# through model.load_weights (into the live callback: the average of epoch 1 back)
out["checkpoint_keras"] = same(fk._saved_averages(fk.load_model(f"{d}/ck.keras")).entries()[0], full_state)
fresh = keras_model(batchnorm=True)
fk.load_average(fresh, f"{d}/ck1.weights.h5")
out["checkpoint_weights_only"] = same(fk._saved_averages(fresh).entries()[0], Keep.states[0])
full_model.load_weights(f"{d}/ck1.weights.h5")
out["load_weights_live"] = same(fk._structural_state(full), Keep.states[0])
again = WeightEMA(0.9)                               # rolled back to epoch 1: a new WeightEMA takes it from there
fit(full_model, again)
out["rolled_back_resumes"] = same(fk._structural_state(again), full_state) and weights_equal(full_model, loaded)
# a loaded model saved again without a fit keeps the average; Keras alone loads the file (average passed over)
fk.load_model(f"{d}/m.keras").save(f"{d}/again.keras")
out["resaved_equal"] = same(fk._saved_averages(fk.load_model(f"{d}/again.keras")).entries()[0], at_save)
plain = keras.saving.load_model(f"{d}/m.keras")
out["plain_keras_loads"] = weights_equal(plain, model) and fk._ATTR not in vars(plain)
# compile=False: the average stays (it is no optimizer variable); Keras's use_ema average goes with the optimizer
out["compile_false_kept"] = same(fk._saved_averages(fk.load_model(f"{d}/m.keras", compile=False)).entries()[0],
                                 at_save)
ke = keras_model(optimizer="sgd")
ke.compile(keras.optimizers.SGD(0.05, use_ema=True, ema_momentum=0.9), "mse")
ke.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
ke.save(f"{d}/use_ema.keras")
back = keras.saving.load_model(f"{d}/use_ema.keras")
out["use_ema_survives"] = all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(
    ke.optimizer._model_variables_moving_average, back.optimizer._model_variables_moving_average))
uncompiled = keras.saving.load_model(f"{d}/use_ema.keras", compile=False)
out["use_ema_compile_false_lost"] = getattr(uncompiled, "optimizer", None) is None
# a model without a WeightEMA saves what it did: nothing of fastema in its files
plain.save_weights(f"{d}/plain.weights.h5")
with zipfile.ZipFile(f"{d}/use_ema.keras") as z, zipfile.ZipFile(f"{d}/m.keras") as z2:
    out["plain_file_clean"] = fk._ATTR.encode() not in z.read("model.weights.h5") + \
        open(f"{d}/plain.weights.h5", "rb").read()
    out["file_has_average"] = fk._ATTR.encode() in z2.read("model.weights.h5")

# refusals, each leaving everything as it was
def message(f):
    try:
        f()
    except (ValueError, RuntimeError) as e:
        return str(e)
    return None

other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
before = other.get_weights()
out["other_architecture"] = message(lambda: fk.load_average(other, f"{d}/m.keras"))
out["other_untouched"] = fk._ATTR not in vars(other) and all(
    np.array_equal(a, b) for a, b in zip(other.get_weights(), before))
out["no_average"] = message(lambda: fk.load_average(keras_model(), f"{d}/use_ema.keras"))
out["no_average_model"] = fk._ATTR not in vars(fk.load_model(f"{d}/use_ema.keras"))
out["averaged_weights_none"] = message(lambda: fk.averaged_weights(keras_model()))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model.load_weights(f"{d}/plain.weights.h5")       # a file with no average: the callback's is unchanged
out["no_average_warning"] = [str(w.message) for w in caught if "holds no average" in str(w.message)]
out["no_average_untouched"] = same(fk._structural_state(first), at_save)
# a WeightEMA whose options do not match the saved average: refused when fit starts, the average kept
loaded = fk.load_model(f"{d}/m.keras")
w_before = loaded.get_weights()
out["mismatch_at_fit"] = message(lambda: fit(loaded, WeightEMA([0.9, 0.99])))
out["mismatch_kept"] = same(fk._saved_averages(loaded).entries()[0], at_save) and \
    all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), w_before))
# two WeightEMAs in one fit: two averages in the file, each for its place; a file with one is refused by this
# model's load_weights (the callbacks' averages unchanged); the next fit's new WeightEMA replaces them
m3, a, b = keras_model(batchnorm=True), WeightEMA(0.9), WeightEMA(0.5)
fit(m3, a, 1, [b])
m3.save(f"{d}/two.keras")
sa, sb = fk._structural_state(a), fk._structural_state(b)
e = fk._saved_averages(fk.load_model(f"{d}/two.keras")).entries()
out["two_saved"] = len(e) == 2 and same(e[0], sa) and same(e[1], sb)
out["count_refused"] = message(lambda: m3.load_weights(f"{d}/ck1.weights.h5"))
out["count_untouched"] = same(fk._structural_state(a), sa) and same(fk._structural_state(b), sb)
fit(m3, WeightEMA(0.9))
out["next_fit_replaces"] = len(fk._saved_averages(m3).entries())
_tmp.cleanup()
print(json.dumps(out))
"""


script("SAVE_LOAD", SAVE_LOAD, ("tensorflow", "jax"))


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_weight_ema_average_is_saved_with_the_model_and_resumed_bit_exactly(backend, capsys):
    """model.save / ModelCheckpoint write WeightEMA's average into the .keras or .weights.h5 file (every row,
    the counters); fastema.keras.load_model brings it back bit for bit, and a new WeightEMA on the loaded
    model continues it: after one more epoch, average and weights equal an uninterrupted 2-epoch run's
    bit for bit. Side by side with Keras's use_ema, whose average survives save/load too (an optimizer
    variable: not with compile=False, where WeightEMA's does). Refusals leave everything as it was."""
    res = _ran(backend, SAVE_LOAD, "SAVE_LOAD", capsys)
    for key in ("first_epoch_equal", "loaded_equal", "averaged_weights_equal", "averaged_is_row0", "resumed_equal",
                "weights_equal", "checkpoint_keras", "checkpoint_weights_only", "load_weights_live",
                "rolled_back_resumes", "resaved_equal", "plain_keras_loads", "compile_false_kept", "use_ema_survives",
                "use_ema_compile_false_lost", "plain_file_clean", "file_has_average", "other_untouched",
                "no_average_model", "no_average_untouched", "mismatch_kept", "two_saved", "count_untouched"):
        assert res[key] is True, key
    assert res["resumed_updates"] == [8, 8] and res["next_fit_replaces"] == 1
    assert re.search(r"holds a WeightEMA average that does not fit this model: variables/0 \(.*kernel\) has shape "
                     r"\(4, 8\), the saved one \(4, 16\);.*load it into the model it was saved with",
                     res["other_architecture"])
    assert "holds 1 WeightEMA average(s) and this model has 2 WeightEMA callback(s)" in res["count_refused"]
    assert "holds no WeightEMA average" in res["no_average"]
    assert "carries 0 WeightEMA average(s)" in res["averaged_weights_none"]
    assert len(res["no_average_warning"]) == 1
    assert re.search(r"the average saved with this model does not fit this callback \(.*checkpoint has 1 decay\(s\), "
                     r"this EMA 2.*give WeightEMA the options the average was saved with", res["mismatch_at_fit"])


def test_saved_average_refusals_on_the_torch_backend(tmp_path, monkeypatch):
    """What cannot load is refused by name, before anything changes: another backend's average, a damaged
    or foreign header, a file that is not Keras's; a model saved while the average is swapped in (its
    weights would be the average) is an error; a copied model does not carry the callback's average."""
    import fastema.keras._saving as fk

    x, y = data(32)
    model, cb = make_model(), WeightEMA(0.9)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    model.save(tmp_path / "m.keras")
    fresh = make_model()
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="saved on the torch backend and this Keras runs on 'jax'.*KERAS_BACKEND=torc"):
        fk.load_average(fresh, tmp_path / "m.keras")
    monkeypatch.undo()
    assert fk._ATTR not in vars(fresh)
    with pytest.raises(ValueError, match="neither a .keras file nor a .weights.h5 file"):
        fk.load_average(fresh, tmp_path / "m.h5")

    def header(value) -> dict:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return {"header": np.frombuffer(raw, np.uint8)}

    for store, match in ((header(b"{not json"), "the header is not JSON"),
                         (header({"format": "keras"}), "names no fastema.keras.WeightEMA format"),
                         (header({"format": fk._FORMAT, "version": 99}), "version 99; this fastema reads version 2: "
                          "upgrade fastema"),
                         (header({"format": fk._FORMAT, "version": 1}), "version 1; this fastema reads version 2: "
                          "version 1 (development versions of fastema 0.2) keyed each average by its place among the "
                          "trainable variables"),
                         (header({"format": fk._FORMAT, "version": 2, "entries": {}}), "no list of entries"),
                         (header({"format": fk._FORMAT, "version": 2,
                                  "entries": [{"averaged": {"variables/0": {"__array__": 3}}}]}), "array 3 is missing"),
                         ({"0": np.zeros(3)}, "no header"),
                         ({"header": np.zeros(3)}, "a header of dtype float64")):
        with pytest.raises(ValueError, match=re.escape(match)):
            fk._decode(store)
    model.save(tmp_path / "swapped.keras")                          # a good file there first
    model.save_weights(tmp_path / "swapped.weights.h5")
    before = {p: p.read_bytes() for p in (tmp_path / "swapped.keras", tmp_path / "swapped.weights.h5")}
    cb.ema.swap()
    with pytest.raises(RuntimeError, match="saved while the average is swapped in"):
        model.save(tmp_path / "swapped.keras")
    with pytest.raises(RuntimeError, match="saved while the average is swapped in"):
        model.save_weights(tmp_path / "swapped.weights.h5")
    for path, raw in before.items():                                # refused before Keras opened the file
        assert path.read_bytes() == raw, path
    cb.ema.swap()
    clone = copy.deepcopy(model)                                    # its own guard, bound to itself
    assert clone.save.__self__ is clone and clone.save_weights.__self__ is clone
    with pytest.raises(ValueError, match="carries 0 WeightEMA average"):
        fk.averaged_weights(copy.deepcopy(model))


def _damaged_copy(source: pathlib.Path, target: pathlib.Path, damage) -> None:
    """``source`` (a ``.keras`` or ``.weights.h5`` file Keras wrote) copied to ``target`` with its
    WeightEMA average damaged after the write: ``damage(entry, arrays)`` changes, in place, the
    header's first entry (its JSON) or the arrays (NumPy, by their number in the file)."""
    import io
    import shutil
    import zipfile

    import h5py

    def edit(h5) -> None:
        with h5py.File(h5, "r+") as f:
            group = f["_fastema_weight_ema/vars"]
            header = json.loads(group["header"][()].tobytes())
            arrays = {k: group[k][()] for k in group if k != "header"}
            damage(header["entries"][0], arrays)
            for k, a in arrays.items():
                group[k][...] = a
            del group["header"]
            group["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)

    if source.name.endswith(".weights.h5"):
        shutil.copyfile(source, target)
        edit(target)
        return
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for item in archive.infolist():
            content = archive.read(item)
            if item.filename == "model.weights.h5":              # the weights, the average's among them
                weights = io.BytesIO(content)
                edit(weights)
                content = weights.getvalue()
            out.writestr(item, content)


def _nan_average(entry: dict, arrays: dict) -> None:
    for ref in entry["averaged"].values():
        arrays[str(ref["__array__"])] *= float("nan")


def test_a_damaged_or_unreadable_average_file_is_refused_naming_it(tmp_path):
    """reliability round 4: a file whose average holds NaN or whose header says updates -1 was taken as the
    model's pending average (M6: the next fit blamed WeightEMA's options); a file that is not a zip
    (truncated, empty, garbage) gave zipfile's bare BadZipFile (L5). Each is a ValueError naming the
    file, from load_model (before Keras builds the model) and load_average (the model left as it was).
    The damaged files are good ones damaged after Keras wrote them."""
    import fastema.keras._saving as fk

    x, y = data(32)
    model, cb = make_model(), WeightEMA(0.9)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    model.save(tmp_path / "good.keras")
    model.save_weights(tmp_path / "good.weights.h5")
    damages = {"nan": (_nan_average, r"variables/0 holds inf or NaN"),
               "updates": (lambda e, arrays: e.update(updates=-1), r"schedule state unreadable \(updates"),
               "rounding": (lambda e, arrays: e.update(rounding="up"), r"rounding must be 'nearest' or 'stochastic'")}
    cases = []
    for name, (damage, match) in damages.items():
        for kind in (".keras", ".weights.h5"):
            _damaged_copy(tmp_path / f"good{kind}", tmp_path / f"{name}{kind}", damage)
            cases.append((tmp_path / f"{name}{kind}", match))
    raw = (tmp_path / "good.keras").read_bytes()
    for name, content in (("truncated", raw[:len(raw) // 2]), ("empty", b""), ("garbage", b"not a zip" * 50)):
        (tmp_path / f"{name}.keras").write_bytes(content)
        (tmp_path / f"{name}.weights.h5").write_bytes(content)
        cases += [(tmp_path / f"{name}.keras", "not a .keras file Keras can read"),
                  (tmp_path / f"{name}.weights.h5", "not a .weights.h5 file Keras can read")]
    for path, match in cases:
        if path.name.endswith(".keras"):
            with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*" + match):
                fk.load_model(path)
        fresh = make_model()
        with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*" + match):
            fk.load_average(fresh, path)
        assert fk._ATTR not in vars(fresh)
    before = cb.ema.state_dict()
    with pytest.raises(ValueError, match=r"the WeightEMA average in the file holds inf or NaN \(average 0: "
                                         r"variables/0 holds inf or NaN; .*\)\. To load it all the same and repair "
                                         r"it, pass allow_nonfinite=True"):
        model.load_weights(tmp_path / "nan.weights.h5")          # into the live callback: refused, kept
    after = cb.ema.state_dict()
    assert after["updates"] == before["updates"] == 2
    assert all(after["averaged"][k].equal(a) for k, a in before["averaged"].items())


def test_the_guide_saving_example_runs(tmp_path, monkeypatch):
    """The guide's "Saving and loading the average" example, as written, on a tiny model: the loaded model
    carries the saved average and the second fit continues it (updates go on from the saved count)."""
    page = (pathlib.Path(__file__).parents[2] / "docs" / "guides" / "keras.md").read_text()
    block = re.search(r"## Saving and loading the average.*?```python\n(.*?)```", page, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    x, y = data(32)
    scope = {"model": make_model(), "x": x, "y": y}
    exec(compile(block, "guides/keras.md", "exec"), scope)
    model = scope["model"]
    assert (tmp_path / "model.keras").exists() and len(scope["averaged"]) == len(model.trainable_variables)
    callback = vars(model)["_fastema_weight_ema"].callbacks[0]
    assert callback.ema.updates == 4                     # 2 epochs of one batch saved, then 2 more


def _guide_example() -> str:
    """The Keras guide's example, with a model and data to run on (the example fits them)."""
    page = (pathlib.Path(__file__).parents[2] / "docs" / "guides" / "keras.md").read_text()
    block = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    return GUIDE_FIT.replace("# <the guide's example>\n", block)


GUIDE_FIT = r"""
import json
import keras, numpy as np
from models import keras_data, keras_model
x, y = keras_data(100)
xv, yv = keras_data(32, 1)
model = keras_model()                                 # compiled with metrics=["mae"]
# <the guide's example>
epoch = {k: v[-1] for k, v in model.history.history.items()}
out = {"epoch": epoch}
if keras.backend.backend() == "tensorflow":           # each batch's own loss, as on torch (BatchLosses)
    class Truth(keras.callbacks.Callback):
        loss = []
        def on_train_batch_begin(self, batch, logs=None):
            xb, yb = x[batch * 32:(batch + 1) * 32], y[batch * 32:(batch + 1) * 32]
            pred = np.asarray(self.model(xb, training=True), np.float64)
            Truth.loss.append(float(np.mean((pred - yb) ** 2)))
    class Rows(keras.callbacks.Callback):
        rows = []
        def on_train_batch_end(self, batch, logs=None):
            Rows.rows.append([logs["loss_raw"], logs["loss_ema"], logs["mae_raw"]])
    from fastema.keras import MovingAverageLogs
    model = keras_model()
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
              callbacks=[Truth(), MovingAverageLogs(ema=0.8, sma=None, metrics=("loss", "mae")), Rows()])
    out.update(truth=Truth.loss, rows=Rows.rows)
print(json.dumps(out))
"""

script("GUIDE_FIT", _guide_example(), ("tensorflow", "jax"))


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_guide_example_runs_on_the_tensorflow_and_jax_backends(backend):
    """The guide's example (MovingAverageLogs of loss and mae, WeightEMA) on each backend. On TensorFlow Keras
    builds the compiled metrics at the first step: 'mae' used to be refused when fit started."""
    pytest.importorskip(backend)
    res = run_on(backend, "GUIDE_FIT")
    for key in ("loss_raw", "loss_ema", "loss_sma", "mae_raw", "mae_ema", "mae_sma", "val_loss", "val_mae"):
        assert np.isfinite(res["epoch"][key]), key
    assert res["epoch"]["loss_raw"] != res["epoch"]["loss"]           # the last batch alone, not the mean
    if backend == "tensorflow":
        rows = np.array(res["rows"])
        np.testing.assert_allclose(rows[:, 0], res["truth"], rtol=2e-6)
        np.testing.assert_allclose(rows[:, 1], pd.Series(res["truth"]).ewm(alpha=0.2).mean(), rtol=1e-5)
        assert np.all(rows[:, 2] > 0)


def test_a_superscript_index_in_a_saved_key_sorts_by_name():
    """A saved key's index that ``str.isdigit`` takes and ``int`` refuses (``'²'``) is a name."""
    from fastema.keras._entries import _natural

    assert _natural("trainable/²") == ("trainable", -1, "²")
    assert _natural("trainable/3") == ("trainable", 3)


def test_a_refused_load_puts_back_an_average_that_held_nan(tmp_path):
    """A load into several WeightEMAs is all or none: where a later callback refuses its average, the ones
    already loaded get back what they held, bit for bit, inf/NaN included (a diverged average with
    allow_nonfinite=False), and the refusal is the later callback's own (the rollback was refused
    instead, hiding it and leaving the first callback with the file's average: round 10, session 4)."""
    import torch

    import fastema.keras._saving as fk

    x, y = data(32)
    model, a, b = make_model(), WeightEMA(0.9), WeightEMA(0.5)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[a, b])
    other, c = make_model(), WeightEMA([0.9, 0.99])
    other.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[c])
    saved = fk._saved_averages(model)
    entries = [saved.entries()[0], fk._saved_averages(other).entries()[0]]    # the second: two decays
    state = a.ema.state_dict()
    name = next(iter(state["averaged"]))
    state["averaged"][name] = state["averaged"][name].clone()
    state["averaged"][name].view(-1)[0] = float("nan")            # a diverged average, as it is
    a.ema.load_state_dict(state, allow_nonfinite=True)
    held = {k: v.clone() for k, v in a.ema.state_dict()["averaged"].items()}
    with pytest.raises(ValueError, match="decay"):
        saved.load(entries, "the file")
    after = a.ema.state_dict()["averaged"]
    for k, v in held.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.mark.parametrize("other", [dict(decay=0.5), dict(decay=0.8, shadow_dtype="float64")])
def test_a_saved_average_of_other_options_is_refused_when_fit_starts(tmp_path, other):
    # the EMA's own load_state_dict takes the decays from the state: a WeightEMA(0.5) resumed an average
    # saved with 0.8 and ran at 0.8 (keras.md: refused when fit starts, naming the difference)
    import fastema.keras

    x, y = data(32)
    model = make_model(batchnorm=False)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[WeightEMA(decay=0.8)])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = fastema.keras.load_model(path)
    cb = WeightEMA(**other)
    with pytest.raises(ValueError, match="average was saved with (decays|a float32 shadow)") as info:
        loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    assert str(info.value).count("give WeightEMA the options") == 1, str(info.value)   # (said twice before)
    same = WeightEMA(decay=0.8)
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[same])   # the average stayed
    assert same.ema.updates == 4


def test_a_refused_load_weights_leaves_the_weights_as_they_were(tmp_path):
    # the average's hook refuses a file of 2 averages into a model with 1 WeightEMA, but Keras loads every
    # layer before it raises what a hook refused: the model held the file's weights, the callback its own
    x, y = data(32)
    src = make_model(batchnorm=False)
    src.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
            callbacks=[WeightEMA(decay=0.8), WeightEMA(decay=0.9)])
    path = str(tmp_path / "m.weights.h5")
    src.save_weights(path)
    dst = make_model(batchnorm=False)
    x2, y2 = data(32, seed=1)
    dst.fit(x2, y2, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[WeightEMA(decay=0.8)])
    before = [v.numpy().copy() for v in dst.weights]
    assert not all(np.array_equal(a, v.numpy()) for a, v in zip(before, src.weights))
    with pytest.raises(ValueError, match="holds 2 WeightEMA average"):
        dst.load_weights(path)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, dst.weights))


def test_load_weights_into_a_live_callback_of_another_decay_is_refused_with_nothing_changed(tmp_path):
    """model.load_weights of a file saved with WeightEMA(decay=0.9) into a model whose live callback is
    WeightEMA(decay=0.5) took the file's decay into the callback without a word (a resume at fit start
    refuses it). Refused, naming both, before anything of the callback changes; a file of its own decay
    loads."""
    x, y = data(32)
    src = make_model(batchnorm=False)
    src.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[WeightEMA(decay=0.9)])
    path = str(tmp_path / "m.weights.h5")
    src.save_weights(path)
    dst = make_model(batchnorm=False)
    cb = WeightEMA(decay=0.5)
    dst.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    before = cb.ema.state_dict()
    with pytest.raises(ValueError, match=r"saved with decays .*0\.9.* where this callback's are .*0\.5"):
        dst.load_weights(path)
    assert cb.ema.decay == 0.5 and cb.ema.state_dict()["calls"] == before["calls"]
    same = make_model(batchnorm=False)
    mine = WeightEMA(decay=0.9)
    same.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[mine])
    same.load_weights(path)
    assert mine.ema.decay == 0.9


FROZEN_SINCE = r"""
import json, warnings
warnings.simplefilter("ignore")
import keras, numpy as np
from fastema.keras import WeightEMA, averaged_weights
keras.utils.set_random_seed(0)
x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
y = x.sum(1, keepdims=True)
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.Dense(3, name="d2"),
                      keras.layers.Dense(1, name="d3")])
m.compile(keras.optimizers.SGD(0.05), "mse")
cb = WeightEMA(decay=0.5)
m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
m.get_layer("d1").trainable = False
m.compile(keras.optimizers.SGD(0.05), "mse")
m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
cb.ema.swap()                                          # the EMA's own averages, into the variables it averages
want = [np.asarray(keras.ops.convert_to_numpy(v)) for v in m.trainable_variables]
cb.ema.swap()
got = averaged_weights(m)
print(json.dumps({"names": [v.path for v in m.trainable_variables],
                  "equal": [bool(np.array_equal(a, b)) for a, b in zip(got, want)]}))
"""


script("FROZEN_SINCE", FROZEN_SINCE, ("tensorflow",))


def test_averaged_weights_after_a_layer_was_frozen_are_each_variables_own():
    # averaged_weights() numbered the EMA's averages in its own order (every trainable variable of its
    # first fit) and read them as model.trainable_variables' order: with d1 frozen since, d2's kernel got
    # d1's kernel's average (and the documented export loop wrote it into d2). (JAX: the next test.)
    pytest.importorskip("tensorflow")
    res = run_on("tensorflow", "FROZEN_SINCE")
    assert [n.split("/")[-2] for n in res["names"]] == ["d2", "d2", "d3", "d3"]
    assert res["equal"] == [True] * 4


TRAINABLE_CHANGED = r"""
import json, warnings
warnings.simplefilter("ignore")
import keras, numpy as np
from fastema.keras import WeightEMA
out = {}
for mode in ("swap", "freeze"):
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    a, b, c = (keras.layers.Dense(4, name=n) for n in "abc")
    c.trainable = False
    m = keras.Model(inp, c(b(a(inp))))
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = x[:, ::-1].copy()
    averaged = list(m.trainable_variables)                     # a's and b's: what the EMA averages
    seen = [[np.asarray(v.numpy(), np.float64) for v in averaged]]

    class Seen(keras.callbacks.Callback):                     # each step's weights (the state synced first)
        def on_train_batch_end(self, batch, logs=None):
            m.jax_state_sync() if keras.backend.backend() == "jax" else None
            seen.append([np.asarray(v.numpy(), np.float64) for v in averaged])

    cb = WeightEMA(decay=0.5)
    m.compile(keras.optimizers.SGD(0.1), "mse")
    m.fit(x, y, batch_size=8, verbose=0, callbacks=[cb, Seen()])
    a.trainable = False                                        # a no longer trainable; swap: c is instead
    c.trainable = mode == "swap"
    m.compile(keras.optimizers.SGD(0.1), "mse")
    try:
        m.fit(x, y, batch_size=8, verbose=0, callbacks=[cb, Seen()])
    except ValueError as e:
        out[mode] = {"error": str(e)}
        continue
    cb.ema.swap()
    got = [np.asarray(v.numpy()).tolist() for v in averaged]
    cb.ema.swap()
    out[mode] = {"seen": [[w.tolist() for w in ws] for ws in seen], "got": got, "updates": cb.ema.updates}
print(json.dumps(out))
"""


script("TRAINABLE_CHANGED", TRAINABLE_CHANGED, ("tensorflow", "jax"))


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.parametrize("mode", ["swap", "freeze"])
def test_a_layer_frozen_or_unfrozen_between_fits_keeps_each_average_its_own(backend, mode):
    """On JAX fit's state lists the trainable variables of now: after a's layer was frozen (and c's
    unfrozen: the same count and shapes) the EMA made over a and b took b's weights as a's average
    (swap), or refused the fit (freeze). Each average is its own variable's naive EMA, a's with its
    weights held fixed, on both backends."""
    pytest.importorskip(backend)
    res = run_on(backend, "TRAINABLE_CHANGED")[mode]
    assert "error" not in res, res["error"]
    seen = [[np.asarray(w) for w in ws] for ws in res["seen"]]
    assert res["updates"] == len(seen) - 1 == 8
    want = naive_ema(seen[0], seen[1:], 0.5)
    for got, ref in zip(res["got"], want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(seen[-1][0], seen[4][0])     # a's kernel stood still in the second fit


def test_a_flat_shadow_holds_a_keras_variable_on_the_torch_backend():
    """Keras's torch backend assigns a variable in place (``copy_``): its memory stays, so a shadow
    may hold it (the refusal of a variable whose memory moves at its next ``assign()``, TensorFlow's
    and JAX's, spares it)."""
    if keras.backend.backend() != "torch":
        pytest.skip("the in-process Keras tests run on the torch backend")
    import fastema

    v = keras.Variable(np.ones(4, np.float32))
    flat = fastema.FlatShadow([v])
    for k, want in ((3.0, 2.0), (5.0, 3.5)):
        v.assign(np.full(4, k, np.float32))
        flat.update(0.5)
        np.testing.assert_array_equal(np.asarray(flat.view(0)), np.full(4, want, np.float32))


FROZEN_BETWEEN_SAVE_AND_RESUME = r"""
import json, tempfile, warnings
warnings.simplefilter("ignore")
import keras, numpy as np
import fastema.keras._saving as fk
from fastema._checkpoint_format import GROUPS
from fastema.keras import WeightEMA
_tmp = tempfile.TemporaryDirectory()
d = _tmp.name
x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
y = x[:, ::-1].copy()
out = {}

def abcd(frozen):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,))] + [keras.layers.Dense(4, name=n) for n in "abcd"])
    for n in frozen:
        m.get_layer(n).trainable = False
    m.compile(keras.optimizers.SGD(0.1), "mse")
    return m

def refreeze(m, frozen):                               # a unfrozen, d frozen: the same count and shapes
    for layer in m.layers:
        layer.trainable = layer.name not in frozen
    m.compile(keras.optimizers.SGD(0.1), "mse")

def fit(m, cb):
    m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[cb])

def arrays(cb):                                        # group:key -> the saved arrays, comparable across models
    state = fk._structural_state(cb)
    return {f"{g}:{k}": np.asarray(fk._to_numpy(a)) for g in GROUPS for k, a in (state.get(g) or {}).items()}

def averaged(cb):                                      # the layer/name of each variable the callback's EMA averages
    variables = cb.model.variables
    return sorted("/".join(variables[int(k.split("/")[1])].path.split("/")[-2:])
                  for k in fk._structural_state(cb)["averaged"])

# uninterrupted: the live callback keeps averaging b, c and d (d's weights held fixed in the second fit)
full, cb = abcd("a"), WeightEMA(decay=0.8)
fit(full, cb)
refreeze(full, "d")
fit(full, cb)
want = arrays(cb)
# the same, saved after the first fit and resumed by a new WeightEMA after a was unfrozen and d frozen
model, first = abcd("a"), WeightEMA(decay=0.8)
fit(model, first)
model.save(f"{d}/m.keras")
model.save_weights(f"{d}/m.weights.h5")
loaded = fk.load_model(f"{d}/m.keras")
refreeze(loaded, "d")
resumed = WeightEMA(decay=0.8)
fit(loaded, resumed)
got = arrays(resumed)
out["averaged"] = averaged(resumed)
out["same_keys"] = sorted(got) == sorted(want)
out["bit_for_bit"] = out["same_keys"] and all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
                                              for k in want)
out["updates"] = [resumed.ema.updates, cb.ema.updates]
out["weights_equal"] = all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), full.get_weights()))
# a live callback averaging other variables (nothing frozen when its fit started) refuses the file's, by path
other, mine = abcd(""), WeightEMA(decay=0.8)
fit(other, mine)
before, weights = arrays(mine), other.get_weights()
for name, load in (("load_weights", lambda: other.load_weights(f"{d}/m.weights.h5")),
                   ("load_average", lambda: fk.load_average(other, f"{d}/m.keras"))):
    try:
        load()
        out[name] = None
    except ValueError as e:
        out[name] = str(e)
after = arrays(mine)
out["refused_unchanged"] = sorted(after) == sorted(before) and all(np.array_equal(after[k], before[k])
                                                                   for k in before) \
    and all(np.array_equal(a, b) for a, b in zip(other.get_weights(), weights))
_tmp.cleanup()
print(json.dumps(out))
"""


script("FROZEN_BETWEEN_SAVE_AND_RESUME", FROZEN_BETWEEN_SAVE_AND_RESUME, ("tensorflow", "jax"))


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_an_average_resumed_after_other_layers_were_frozen_is_each_variables_own(backend, capsys):
    """A file keyed each average by its variable's place among the trainable variables when it was
    written, read back by the places of now: saved with layer a frozen, resumed with a unfrozen and d
    frozen (the same count and shapes), a's average was b's, b's c's, c's d's, silently. Each average is
    now keyed by its place in model.variables: the resumed WeightEMA averages b, c and d as the live
    callback went on doing, and after one more fit equals an uninterrupted run bit for bit. A live
    callback averaging other variables refuses the file naming them by path, nothing changed."""
    res = _ran(backend, FROZEN_BETWEEN_SAVE_AND_RESUME, "FROZEN_BETWEEN_SAVE_AND_RESUME", capsys)
    assert res["averaged"] == ["b/bias", "b/kernel", "c/bias", "c/kernel", "d/bias", "d/kernel"], res["averaged"]
    assert res["same_keys"] and res["bit_for_bit"] and res["weights_equal"]
    assert res["updates"] == [8, 8]
    for name in ("load_weights", "load_average"):
        assert re.search(r"the average saved with this model is not of the variables this callback's EMA averages"
                         r".*: this callback's EMA averages \S*a/kernel, \S*a/bias, which it does not.* Load it "
                         r"before the callback's first fit", res[name] or ""), (name, res[name])
    assert res["refused_unchanged"]
