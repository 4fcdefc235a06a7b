"""Writes the EMA-state files that tests/bridges/test_state_formats.py loads: one per file format that
carries a fastema EMA state (a Keras ``.keras`` / ``.weights.h5`` file with a WeightEMA average, an
EMACallback ``fastema_ema.safetensors``, a TensorFlow checkpoint of fastema.tensorflow.EMA).

The committed files were written by this script at 929b907, before the three formats shared one codec
(fastema/_checkpoint_format.py): the tests check that they still load and that writing the loaded state again gives
the same bytes. Run from the repository root, one format per process::

    KERAS_BACKEND=torch .venv/bin/python tests/bridges/data/make_format_fixtures.py keras
    .venv/bin/python tests/bridges/data/make_format_fixtures.py transformers
    .venv/bin/python tests/bridges/data/make_format_fixtures.py tensorflow
"""
import os
import pathlib
import sys
import types

import numpy as np

HERE = pathlib.Path(__file__).parent


def keras_files(out=HERE):
    """A torch-backend model with BatchNorm (the average, the copied statistics), two decays, one epoch."""
    sys.path.insert(0, str(HERE.parent.parent))
    from models import keras_data, keras_model

    from fastema.keras import WeightEMA
    from fastema.schedules import PowerWarmup

    x, y = keras_data(32)
    model, cb = keras_model(batchnorm=True), WeightEMA([PowerWarmup(0.9), PowerWarmup(0.5)])
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    model.save(out / "keras_torch.keras")
    model.save_weights(out / "keras_torch.weights.h5")


def ema_module():
    """The torch module of the EMACallback file: averaged weights, copied float buffers, an int buffer."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    return model


def ema_steps(model, ema, steps):
    import torch

    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        model(torch.randn(5, 3, generator=g))                  # BatchNorm's statistics move (train mode)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
        ema.update(step=step)


def transformers_file(out=HERE):
    from fastema.schedules import PowerWarmup
    from fastema.torch import EMA
    from fastema.transformers import EMACallback

    model = ema_module()
    cb = EMACallback([PowerWarmup(0.9), PowerWarmup(0.99)])
    cb.ema = EMA(model, [PowerWarmup(0.9), PowerWarmup(0.99)])
    ema_steps(model, cb.ema, 5)
    args = types.SimpleNamespace(output_dir=str(out / "transformers"), should_save=True)
    os.makedirs(out / "transformers" / "checkpoint-5", exist_ok=True)
    cb.on_save(args, types.SimpleNamespace(global_step=5), None)


def tf_variables():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    return [tf.Variable(rng.normal(size=(3, 4)).astype("float32"), name="w"),
            tf.Variable(tf.constant(rng.normal(size=(4,)), tf.bfloat16), name="b"),
            tf.Variable(np.float32(0.5), name="s")]


def tf_steps(variables, ema, steps):
    rng = np.random.default_rng(1)
    for _ in range(steps):
        for v in variables:
            v.assign_add(np.asarray(rng.normal(size=v.shape), v.dtype.as_numpy_dtype) * 0.1)
        ema.update()


def tensorflow_checkpoint(out=HERE):
    import tensorflow as tf

    from fastema.tensorflow import EMA

    variables = tf_variables()
    ema = EMA(variables, [0.9, 0.99], update_every=2, shadow_dtype="same")   # a bfloat16 shadow among them
    tf_steps(variables, ema, 5)
    tf.train.Checkpoint(ema=ema).write(str(out / "tensorflow" / "ema"))


if __name__ == "__main__":
    {"keras": keras_files, "transformers": transformers_file, "tensorflow": tensorflow_checkpoint}[sys.argv[1]]()
