"""Faults in the bridges: an exception or a Ctrl-C (KeyboardInterrupt) during the evaluation that the
callbacks swap the average in for, in Keras (torch, TensorFlow and JAX backends) and in Lightning.

Each asserts that the model holds its raw weights afterwards, that the average is not left swapped in,
that nothing else changed (the EMA, the other weights, the optimizer's state) and that the next fit works.
The Keras fits on TensorFlow and JAX run in the one subprocess per backend of ``bridges/backend_runs.py``.
"""
import contextlib
import io
import json
import os
import pathlib
import signal
import sys
import warnings

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "bridges"))      # backend_runs

from backend_runs import run_on, script  # noqa: E402

# One script for the three Keras backends (in-process on torch). Three fits of one model and one callback:
# validation raises RuntimeError in the first, KeyboardInterrupt in the second, the third runs clean. A
# reference run does the same without validation in the first two: the weights, the optimizer and the EMA
# must end equal, bit for bit.
KERAS_FAULTS = r"""
import json, warnings
import keras, numpy as np
from fastema.keras import WeightEMA
from models import keras_data, keras_model

x, y = keras_data(64)
val = keras_data(32, 1)

def state(model, cb):
    return dict(weights=[w.tolist() for w in model.get_weights()],             # trainable and BatchNorm's
                optimizer=[np.asarray(v.numpy()).tolist() for v in model.optimizer.variables],
                ema=[np.asarray(v).tolist() for v in cb.ema.state_dict()["averaged"].values()],   # names differ
                updates=cb.ema.updates)

class Fault(keras.callbacks.Callback):
    # Listed before the WeightEMA: records everything before it swaps, raises at the 2nd validation batch.
    def __init__(self, exc, cb):
        super().__init__()
        self.exc, self.cb, self.before = exc, cb, None
    def on_test_begin(self, logs=None):
        self.before = state(self.model, self.cb)
    def on_test_batch_end(self, batch, logs=None):
        if batch == 1:
            raise self.exc

out = {"faults": []}
model, cb = keras_model(batchnorm=True), WeightEMA(decay=0.9)
for exc in (RuntimeError("validation failed"), KeyboardInterrupt()):
    fault = Fault(exc, cb)
    try:
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, validation_data=val, callbacks=[fault, cb])
        raised = None
    except BaseException as err:
        raised = type(err).__name__
    out["faults"].append(dict(raised=raised, swapped=cb.ema.swapped, guard_left="evaluate" in vars(model),
                              same=state(model, cb) == fault.before))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, validation_data=val, callbacks=[cb])
out["warned"] = [str(w.message) for w in caught if "fastema" in str(w.message)]
out["swapped"] = cb.ema.swapped

ref_model, ref = keras_model(batchnorm=True), WeightEMA(decay=0.9)
for validate in (False, False, True):
    ref_model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, validation_data=val if validate else None,
                  callbacks=[ref])
out["equal_to_reference"] = state(model, cb) == state(ref_model, ref)
out["updates"] = cb.ema.updates
print(json.dumps(out))
"""

script("KERAS_FAULTS", KERAS_FAULTS, ("tensorflow", "jax"))


def keras_faults_here() -> dict:
    """KERAS_FAULTS in this process (Keras on the torch backend)."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":                  # pragma: no cover
        pytest.skip("the in-process Keras tests run on the torch backend")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(KERAS_FAULTS, "KERAS_FAULTS", "exec"), {"__name__": "__main__"})
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_keras_validation_interrupted_puts_the_raw_weights_back(backend):
    """M7: Keras calls neither on_test_end nor on_train_end when an exception escapes the validation in fit;
    the average stayed in the model (a model.save() would write it as the raw weights) and the next fit
    failed at its first batch ("update() while the average is swapped ...")."""
    if backend != "torch":
        pytest.importorskip(backend)
    res = keras_faults_here() if backend == "torch" else run_on(backend, "KERAS_FAULTS")
    assert [f["raised"] for f in res["faults"]] == ["RuntimeError", "KeyboardInterrupt"]
    for fault in res["faults"]:
        assert not fault["swapped"] and not fault["guard_left"]
        assert fault["same"]                   # raw weights, BatchNorm statistics, optimizer, EMA: as before
    assert res["warned"] == [] and not res["swapped"] and res["updates"] == 12
    assert res["equal_to_reference"]


def test_keras_two_callbacks_on_one_model_are_both_guarded():
    """Two WeightEMAs on one model (one validates with its average, one only keeps another decay): an
    exception in validation puts the raw weights back whichever callback made the guard."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":                  # pragma: no cover
        pytest.skip("the in-process Keras tests run on the torch backend")
    from models import keras_data, keras_model

    from fastema.keras import WeightEMA

    x, y = keras_data(64)
    model = keras_model()
    validating, other = WeightEMA(decay=0.9), WeightEMA(decay=0.99, validate_with_ema=False)
    raw = []

    class Fault(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            raw[:] = self.model.get_weights()

        def on_test_batch_end(self, batch, logs=None):
            raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError, match="validation failed"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, validation_data=(x, y),
                  callbacks=[Fault(), validating, other])
    assert not validating.ema.swapped and not other.ema.swapped and "evaluate" not in vars(model)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), raw))


def test_keras_average_left_swapped_is_put_back_when_fit_starts():
    """The safety net: an average still swapped in when fit starts (here by the user's own ema.swap()) is
    swapped back, with a warning, and training goes on from the raw weights."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":                  # pragma: no cover
        pytest.skip("the in-process Keras tests run on the torch backend")
    from models import keras_data, keras_model

    from fastema.keras import WeightEMA

    x, y = keras_data(64)
    model, cb = keras_model(), WeightEMA(decay=0.9)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    raw = model.get_weights()
    cb.ema.swap()
    assert not all(np.array_equal(a, b) for a, b in zip(model.get_weights(), raw))
    seen = []

    class Start(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.extend(self.model.get_weights())

    with pytest.warns(RuntimeWarning, match="still swapped into the model when fit\\(\\) started"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb, Start()])
    assert all(np.array_equal(a, b) for a, b in zip(seen, raw))
    assert cb.ema.updates == 8 and not cb.ema.swapped


# ------------------------------------------------------------------------------------------ Lightning


def lightning_run(tmp_path, exc):
    """A fit whose validation_step raises ``exc`` at its second batch (None: no fault); returns the
    callback's state and the module's weights before the validation, and after the fit."""
    import torch
    from torch import nn

    pl = pytest.importorskip("pytorch_lightning")
    from fastema.lightning import WeightEMA

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.BatchNorm1d(16), nn.Linear(16, 1))
            self.fault = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            if batch_idx == 1 and self.fault is not None:
                raise self.fault
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def loader(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 4, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.sin(x).sum(1, keepdim=True)),
                                           batch_size=8)

    def snapshot(module, cb):
        return ({k: v.clone() for k, v in module.state_dict().items()},            # BatchNorm's buffers too
                {k: v.clone() for k, v in cb.ema.averaged_state_dict().items()}, cb.ema.updates)

    class Before(pl.Callback):                               # listed before the WeightEMA: sees the raw weights
        seen = None

        def on_validation_start(self, trainer, module):
            Before.seen = snapshot(module, cb)

    def fit(module, fault):
        module.fault = fault
        pl.Trainer(callbacks=[Before(), cb], max_epochs=1, accelerator="cpu", logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, default_root_dir=tmp_path).fit(module, loader(32, 0), loader(24, 1))

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    module, cb = Regressor(), WeightEMA(decay=0.8)
    raised = None
    handler = signal.getsignal(signal.SIGINT)
    try:
        fit(module, exc)
    except BaseException as err:                             # Lightning turns Ctrl-C into sys.exit(1)
        raised = type(err).__name__
    finally:
        signal.signal(signal.SIGINT, handler)                # ... after setting SIGINT to be ignored
    before, after, swapped = Before.seen, snapshot(module, cb), cb.ema.swapped
    fit(module, None)                                        # the next fit works, from the raw weights
    return dict(raised=raised, swapped=swapped, before=before, after=after, next_updates=cb.ema.updates,
                next_swapped=cb.ema.swapped)


def same(a, b) -> bool:
    """Two snapshots (module state, EMA average, EMA updates) are equal, bit for bit."""
    (module_a, ema_a, n_a), (module_b, ema_b, n_b) = a, b
    return n_a == n_b and all(x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)
                              for x, y in ((module_a, module_b), (ema_a, ema_b)))


@pytest.mark.parametrize("exc, raised", [(RuntimeError("validation failed"), "RuntimeError"),
                                         (KeyboardInterrupt(), "SystemExit")])
def test_lightning_validation_interrupted_puts_the_raw_weights_back(tmp_path, exc, raised):
    """Lightning calls on_exception (Ctrl-C included: it then exits with SystemExit): the callback swaps
    back there, so the raw weights, the BatchNorm buffers and the EMA are as before the validation."""
    res = lightning_run(tmp_path, exc)
    assert res["raised"] == raised
    assert not res["swapped"] and same(res["after"], res["before"])
    assert res["after"][2] == 4 and res["next_updates"] == 8 and not res["next_swapped"]
