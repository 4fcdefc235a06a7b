"""Keras 3 callbacks: smoothed per-batch metrics and an EMA of the weights.

``MovingAverageLogs`` adds ``loss_raw``, ``loss_ema`` and ``loss_sma`` to the logs::

    model.fit(x, y, callbacks=[fastema.keras.MovingAverageLogs(ema=0.9, sma=50)])

Keras logs ``loss`` as the running mean since the start of the epoch. ``loss_raw`` is the
loss of each batch alone, recovered from the running mean's state (its float32 sum and
cumulative sample count: a batch small beside the epoch's sum carries the sum's rounding),
so an uneven last batch, ``steps_per_execution > 1`` and the reset at each epoch are all
accounted for. The EMA and SMA of ``loss_raw`` continue across epochs: no staircase at epoch
boundaries.

``WeightEMA`` keeps an EMA of the weights (fastema.torch, .tensorflow or .jax by backend), swaps it in
for validation and back after it, and can write it into the model when ``fit`` ends. Its average goes
into the model's ``.keras`` and ``.weights.h5`` files (``model.save``, ``save_weights``,
``ModelCheckpoint``); :func:`load_model` / :func:`load_average` bring it back and the next
``WeightEMA`` resumes from it; :func:`averaged_weights` reads it.
"""
try:
    import keras  # noqa: F401
except ImportError as e:                                    # pragma: no cover - depends on the environment
    raise ImportError("fastema.keras needs Keras 3 (pip install 'fastema[keras]')") from e

from . import _floor  # noqa: F401, I001  (first: refuses a Keras older than its floor)
from ._logs import MovingAverageLogs
from ._saving import averaged_weights, load_average, load_model
from ._weight_ema import WeightEMA

__all__ = ["MovingAverageLogs", "WeightEMA", "averaged_weights", "load_average", "load_model"]
