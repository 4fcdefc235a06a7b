"""The one EMA-state codec (``fastema/_checkpoint_format.py``) and the three file formats written through it.

``data/`` holds files written by ``data/make_format_fixtures.py`` at 929b907, before the formats shared
the codec: a Keras ``.keras`` / ``.weights.h5`` file with a ``WeightEMA`` average, an ``EMACallback``
``fastema_ema.safetensors`` and a TensorFlow checkpoint of ``fastema.tensorflow.EMA``. Each still
loads, and writing the loaded state again gives the same bytes; but two version-1 files, written by
development versions of 0.2 only, which are refused naming what to do: the ``EMACallback`` file (no
checksums) and the Keras files (each average keyed by its place among the trainable variables, which
a layer frozen or unfrozen since moves; a Keras file written now round-trips instead).
"""
import importlib.util
import io
import json
import pathlib
import re
import zipfile

import numpy as np
import pytest

from fastema._checkpoint_format import GROUPS, from_named, from_parts, load_refused, refuse_load, to_named, to_parts
from fastema.schedules import PowerWarmup

DATA = pathlib.Path(__file__).parent / "data"


def _fixtures():
    spec = importlib.util.spec_from_file_location("make_format_fixtures", DATA / "make_format_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_codec_splits_a_state_into_json_and_arrays_and_back():
    w, b, n = np.arange(6.0).reshape(2, 3), np.ones(2, np.float32), np.array(3, np.int64)
    state = {"format": "f", "version": 2, "norms": (np.float64(0.5), 1.0), "averaged": {"w": w, "b": b},
             "copied": {}, "int_buffers": {"n": n}}
    header, arrays = to_parts(state)
    assert header == {"format": "f", "version": 2, "norms": [0.5, 1.0], "averaged": {"w": {"__array__": 0},
                      "b": {"__array__": 1}}, "copied": {}, "int_buffers": {"n": {"__array__": 2}}}
    assert json.loads(json.dumps(header)) == header and arrays[0] is w
    back = from_parts(header, arrays.__getitem__, KeyError)
    assert back["averaged"]["w"] is w and back["int_buffers"]["n"] is n and back["norms"] == [0.5, 1.0]
    more, shared = to_parts({"averaged": {"x": w}}, arrays)             # numbered after the first state's
    assert more == {"averaged": {"x": {"__array__": 3}}} and shared is arrays and len(arrays) == 4
    with pytest.raises(KeyError):
        from_parts({"averaged": {"w": {"__array__": True}}}, arrays.__getitem__, KeyError)

    rest, named = to_named(state, host=lambda a: a * 2)
    assert rest == {"format": "f", "version": 2, "norms": [0.5, 1.0]}
    assert list(named) == ["averaged/w", "averaged/b", "int_buffers/n"]       # GROUPS' order, then the state's
    assert np.array_equal(named["averaged/w"], 2 * w)
    again = from_named(rest, named.items(), "'f.safetensors'")
    assert set(again) == set(rest) | set(GROUPS) and again["copied"] == {} and again["int_buffers"]["n"] == 6
    only = from_named(rest, [("averaged/w", w)], "x", groups=("averaged",))
    assert list(only) == [*rest, "averaged"]
    for key in ("weights/w", "averaged", "averaged/"):
        with pytest.raises(ValueError, match=f"'f.safetensors' holds an unexpected tensor '{key}'; the file is dam"):
            from_named(rest, [(key, w)], "'f.safetensors'")

    with pytest.raises(TypeError, match=r"EMACallback cannot save state\['averaged'\]: key 3 is not a string"):
        to_parts({"averaged": {3: w}}, who="EMACallback")
    with pytest.raises(TypeError, match=r"fastema cannot save state\['f'\]: a set, not an array"):
        to_parts({"f": {1}})
    assert str(load_refused("It is damaged.")) == "It is damaged. Nothing was loaded."
    refuse_load("X", [])                                                    # no problems: nothing raised
    with pytest.raises(ValueError, match=r"^X checkpoint does not match this model: a; b\. Nothing was loaded\.$"):
        refuse_load("X", ["a", "b"], " this model")


def _average_group(weights_h5: bytes | pathlib.Path) -> dict:
    """The WeightEMA average's datasets of a Keras weights file: name -> (dtype, shape, bytes)."""
    import h5py

    source = io.BytesIO(weights_h5) if isinstance(weights_h5, bytes) else weights_h5
    with h5py.File(source, "r") as f:
        group = f["_fastema_weight_ema/vars"]
        return {k: (group[k].dtype.str, group[k].shape, np.asarray(group[k]).tobytes()) for k in group}


def _keras_weights(path: pathlib.Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read("model.weights.h5")


def test_a_keras_file_of_version_1_is_refused_and_one_written_now_loads_resumes_and_saves_the_same(tmp_path):
    """The Keras files' average is keyed by each variable's place in ``model.variables`` since version 2:
    version 1 (development versions of 0.2, the fixture) keyed it by the place among the trainable
    variables when the file was written, which put each average on another variable once a layer was
    frozen or unfrozen since. Its file is refused by every reader, naming the version and what to do,
    nothing loaded; Keras alone still loads its weights. A file written now (the same model and fit as
    the fixture's) loads, resumes and writes the same average again, byte for byte."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("h5py")
    if keras.backend.backend() != "torch":                                   # pragma: no cover
        pytest.skip("the file was written on Keras's torch backend")
    from models import keras_data, keras_model

    import fastema.keras as fk

    old_keras, old_h5 = DATA / "keras_torch.keras", DATA / "keras_torch.weights.h5"
    old = json.loads(_average_group(old_h5)["header"][2])
    assert old["version"] == 1 and set(old["entries"][0]["copied"]) == {"non_trainable/0", "non_trainable/1"}
    refusal = (r"has version 1; this fastema reads version 2: version 1 \(development versions of fastema 0\.2\) "
               r"keyed each average by its place among the trainable variables.*load the model with "
               r"keras\.saving\.load_model \(its weights; not the average\) and start a new WeightEMA\. Nothing was "
               r"loaded\.")
    with pytest.raises(ValueError, match=re.escape(repr(str(old_keras))) + ".*" + refusal):
        fk.load_model(old_keras)
    fresh = keras_model(batchnorm=True)
    with pytest.raises(ValueError, match=re.escape(repr(str(old_h5))) + ".*" + refusal):
        fk.load_average(fresh, old_h5)
    assert "_fastema_weight_ema" not in vars(fresh)
    x, y = keras_data(32)
    live, cb = keras_model(batchnorm=True), fk.WeightEMA([PowerWarmup(0.9), PowerWarmup(0.5)])
    live.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    before, weights = cb.ema.state_dict(), live.get_weights()
    with pytest.raises(ValueError, match=refusal):
        live.load_weights(old_h5)
    assert cb.ema.updates == before["updates"] and all(np.array_equal(a, b) for a, b in zip(live.get_weights(),
                                                                                          weights))
    plain = keras.saving.load_model(old_keras)
    assert len(plain.get_weights()) == len(weights)

    _fixtures().keras_files(tmp_path)                                        # the fixture's model and fit, now
    new_keras, new_h5 = tmp_path / "keras_torch.keras", tmp_path / "keras_torch.weights.h5"
    saved = _average_group(new_h5)
    header = json.loads(saved["header"][2])
    entry = header["entries"][0]
    assert header["version"] == 2 and header["backend"] == "torch"
    assert set(entry["copied"]) == {"variables/4", "variables/5"}           # BatchNorm's moving mean and variance
    assert _average_group(_keras_weights(new_keras)) == saved

    def resumed(model):
        """A WeightEMA of the next fit, made on ``model`` (it takes the loaded average)."""
        cb = fk.WeightEMA([PowerWarmup(0.9), PowerWarmup(0.5)])
        cb.set_model(model)
        cb.on_train_begin()
        return cb

    for model, load, save, name in ((None, fk.load_model, "save", "again.keras"),
                                    (keras_model(batchnorm=True), fk.load_average, "save_weights", "again.weights.h5")):
        if model is None:
            model = load(new_keras)  # type: ignore[call-arg]
        else:
            load(model, new_h5)
        places = {id(v): i for i, v in enumerate(model.variables)}
        row0 = [np.frombuffer(saved[str(entry["averaged"][f"variables/{places[id(v)]}"]["__array__"])][2], np.float32)
                .reshape(2, *v.shape)[0] for v in model.trainable_variables]
        assert all(np.array_equal(a, b) for a, b in zip(fk.averaged_weights(model), row0))
        cb = resumed(model)
        assert cb.ema.updates == entry["updates"] == 2
        getattr(model, save)(tmp_path / name)
        written = _keras_weights(tmp_path / name) if name.endswith(".keras") else tmp_path / name
        assert _average_group(written) == saved, name                       # the same header and arrays, byte for byte
        cb.on_train_end()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])   # and it trains on from there
    assert cb.ema.updates == 4


def test_an_emacallback_file_without_checksums_is_refused_and_one_written_now_reads_back_and_writes_the_same(
        tmp_path):
    """The callback's file carries every tensor's CRC-32 since version 2 (a flipped bit loaded silently);
    a version-1 file (written before, by development versions of 0.2 only) is refused naming the file,
    its version and what to do, nothing loaded. One written now loads bit for bit and writes the same
    bytes again."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    import types

    from fastema.torch import EMA
    from fastema.transformers import STATE_FILE, EMACallback

    old = DATA / "transformers" / "checkpoint-5"
    fixtures = _fixtures()
    model = fixtures.ema_module()
    ema = EMA(model, [PowerWarmup(0.9), PowerWarmup(0.99)])
    before = ema.state_dict()
    with pytest.raises(ValueError, match=r"fastema_ema\.safetensors' has version 1, written by a development "
                                         r"version .* before the state file carried checksums.*Resume from another "
                                         r"checkpoint folder, or delete the file and pass .*missing_state='restart'"
                                         r".*Nothing was loaded"):
        EMACallback._load(ema, str(old))
    assert ema.calls == 0 and all(v.equal(before["averaged"][k]) for k, v in ema.state_dict()["averaged"].items())
    ema.update()
    cb = EMACallback([PowerWarmup(0.9), PowerWarmup(0.99)])
    cb.ema = ema
    for out in ("a", "b"):
        (tmp_path / out / "checkpoint-1").mkdir(parents=True)
        cb.on_save(types.SimpleNamespace(output_dir=str(tmp_path / out), should_save=True),
                   types.SimpleNamespace(global_step=1), None)
    back = EMA(fixtures.ema_module(), [PowerWarmup(0.9), PowerWarmup(0.99)])
    EMACallback._load(back, str(tmp_path / "a" / "checkpoint-1"))
    assert back.calls == 1 and all(v.equal(ema.state_dict()["averaged"][k])
                                   for k, v in back.state_dict()["averaged"].items())
    cb.ema = back
    (tmp_path / "c" / "checkpoint-1").mkdir(parents=True)
    cb.on_save(types.SimpleNamespace(output_dir=str(tmp_path / "c"), should_save=True),
               types.SimpleNamespace(global_step=1), None)
    assert (tmp_path / "c" / "checkpoint-1" / STATE_FILE).read_bytes() == \
        (tmp_path / "a" / "checkpoint-1" / STATE_FILE).read_bytes()


def test_a_tensorflow_checkpoint_written_before_the_codec_restores_and_saves_the_same():
    tf = pytest.importorskip("tensorflow")
    from fastema.tensorflow import EMA, _checkpoint

    path = str(DATA / "tensorflow" / "ema")
    fixtures = _fixtures()
    ema = EMA(fixtures.tf_variables(), [0.5, 0.6], shadow_dtype="same")     # the rest comes from the checkpoint
    tf.train.Checkpoint(ema=ema).read(path).assert_consumed()
    assert ema.updates == 3 and ema.state_dict()["update_every"] == 2
    reader = tf.train.load_checkpoint(path)
    state, blob = _checkpoint.pack(ema._core)
    assert state == reader.get_tensor("ema/.ATTRIBUTES/state")
    assert blob.tobytes() == reader.get_tensor("ema/.ATTRIBUTES/shadow").tobytes()
    assert ema.state_dict()["averaged"]["b:0"].dtype.name == "bfloat16"
