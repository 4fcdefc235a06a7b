"""TensorFlow bridge: an EMA of ``tf.Variable`` objects (a Keras model's weights) in fastema's flat shadow.

TensorFlow tensors cannot be written in place, so the average lives in buffers fastema
owns. ``update()`` reads every variable's current value (on the CPU the tensor a variable
read returns is the variable's own buffer: no copy) and makes one kernel launch per
(device, dtype) group, eagerly or as an op inside a ``tf.function``. The variables are
written only by ``assign``: when the average is swapped in for evaluation, and back.
:class:`EMA` is a ``tf.Module``: ``tf.train.Checkpoint(ema=ema)``, ``CheckpointManager``
and SavedModel carry its shadow::

    ema = fastema.tensorflow.EMA(model.trainable_variables, decay=0.999)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, ema=ema)
    for x, y in data:
        train_step(x, y)                # a tf.function with optimizer.apply_gradients
        ema.update()                    # or inside train_step
    with ema.average_parameters():
        model.evaluate(val_data)        # the average in, the raw weights back after

A drop-in for ``tf.train.ExponentialMovingAverage`` lives in :mod:`fastema.tensorflow.compat`.

One concern per module: ``ema`` (the :class:`EMA`), ``_checkpoint`` (its tensors in TensorFlow
checkpoints), ``compat`` (``ExponentialMovingAverage``), ``_floor`` (the oldest TensorFlow it runs on).
"""
from . import _floor  # noqa: F401, I001  (first: refuses a TensorFlow older than its floor)
from .ema import EMA, REFUSED

__all__ = ["EMA", "REFUSED"]
