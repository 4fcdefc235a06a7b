"""MovingAverageLogs: the per-batch value of Keras's running-mean metrics, and its EMA and SMA, in
the logs.

Keras logs ``loss`` as the running mean since the start of the epoch. ``loss_raw`` is the
loss of each batch alone, recovered from the running mean's state (its float32 sum and
cumulative sample count: a batch small beside the epoch's sum carries the sum's rounding),
so an uneven last batch, ``steps_per_execution > 1`` and the reset at each epoch are all
accounted for. The EMA and SMA of ``loss_raw`` continue across epochs: no staircase at epoch
boundaries.
"""
from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

from ..track import Tracker
from ._jax import metric_values


def _is_mean(m) -> bool:
    return hasattr(m, "total") and hasattr(m, "count") and isinstance(m.count, keras.Variable)


def _running_means(model) -> tuple[dict, dict, bool]:
    """The running means of ``model`` (Keras ``Mean``-type metrics: total and count) by the name
    Keras logs them under (a multi-output model's ``a_mae``, ``b_mae``: the names of
    ``model.get_metrics_result()``), and by their own name (every one of that name, ``mae`` twice);
    and whether some metric container is not built yet (on the TensorFlow backend Keras builds
    the compiled metrics at the first training step, so they are not there before)."""
    logged: dict = {}
    own: dict = {}
    unbuilt = False
    todo = [(m, m.name) for m in model.metrics]              # a top-level metric is logged under its name
    while todo:
        m, name = todo.pop(0)
        unbuilt = unbuilt or getattr(m, "built", True) is False
        if _is_mean(m):
            own.setdefault(m.name, []).append(m)
            if name is not None:
                logged[name] = m                              # a later one wins, as in Keras's logs
        inner = getattr(m, "metrics", None)                   # CompileMetrics / CompileLoss containers
        if isinstance(inner, (list, tuple)) and inner:
            names = _result_names(m, len(inner)) if name is not None else None
            todo.extend(zip(inner, names or [None] * len(inner)))
    return logged, own, unbuilt


def _result_names(container, n: int) -> list | None:
    """The names a container metric's ``result()`` dict gives its ``n`` metrics, in its order
    (Keras's CompileMetrics: ``{output}_{name}``, numbered when repeated), or None."""
    if getattr(container, "built", True) is False:
        return None
    try:
        result = container.result()
    except (NotImplementedError, TypeError, ValueError):      # another container (a user's): no names
        return None
    return list(result) if isinstance(result, dict) and len(result) == n else None


class _MeanState:
    """Reads (total, count) of several Keras running means in one device-to-host transfer."""

    def __init__(self, model, metrics: Sequence):
        self.model = model
        self.variables = [v for m in metrics for v in (m.total, m.count)]
        if keras.backend.backend() == "jax":
            # JAX keeps the training state outside the Variables between syncs; read it there
            # (a full sync every batch would be slow and is what Keras avoids).
            # by identity: two metrics may share a path (each output's mean_absolute_error)
            index = {id(v): i for i, v in enumerate(model.metrics_variables)}
            self._jax_index = [index[id(v)] for v in self.variables]

    def read(self) -> np.ndarray:
        values = list(self.variables)
        if keras.backend.backend() == "jax":
            values = metric_values(self.model, self._jax_index) or values
        stacked = keras.ops.stack([keras.ops.cast(v, "float32") for v in values])   # Keras keeps them in float32
        return np.asarray(keras.ops.convert_to_numpy(stacked), np.float64).reshape(-1, 2)


class MovingAverageLogs(keras.callbacks.Callback):
    """Add the per-batch value and its EMA and SMA of chosen metrics to Keras's logs.

    For each metric ``m`` in ``metrics``, the batch logs and the epoch logs get ``m_raw``
    (the value of the last batch alone, with ``raw=True``), ``m_ema`` and ``m_sma``: History,
    TensorBoard, CSVLogger and the progress bar of later callbacks see them. The epoch logs
    carry the values after the epoch's last batch.

    Args:
        ema: EMA decay per batch (``0.9``; TensorBoard's smoothing weight), a dict of
            :class:`fastema.Smoother` parameters (``{"span": 50}``; ``{"span": 50, "mode":
            "seeded"}`` or ``{"span": 50, "adjust": False}`` for pandas' ``adjust=False``, the
            EMA seeded by the first value), or None.
        sma: window (batches) of the simple moving average, or None.
        raw: also log ``m_raw``.
        metrics: names of metrics the model reports as running means (``"loss"``, and
            compiled metrics such as ``"mae"`` or ``"accuracy"``), as Keras logs them (a model
            with several outputs: ``"a_mae"``, ``"b_loss"``; a name that several outputs' metrics
            share, ``"mae"`` there, is refused, naming those).

    The averages run over the reported batches (with ``steps_per_execution=k``, Keras
    reports every k-th batch and ``m_raw`` is the sample-weighted mean of those k), keep
    going across epochs and restart at each ``fit``. Non-finite values are skipped.

    The metrics are looked up when ``fit`` starts, or, where Keras builds the compiled
    metrics in the first training step (the TensorFlow backend), at the end of that step; a
    name the model does not report as a running mean is refused then, with the names it has.
    """

    def __init__(self, ema=0.9, sma: int | None = 50, raw: bool = True, metrics: Sequence[str] = ("loss",)):
        super().__init__()
        if isinstance(metrics, str):
            metrics = (metrics,)
        self.metrics = tuple(metrics)
        self.ema, self.sma, self.raw = ema, sma, raw
        self.tracker = Tracker(self.metrics, ema=ema, sma=sma)    # checks the arguments now
        self._reader: _MeanState | None = None
        self._prev = None
        self._row: dict[str, float] = {}

    def on_train_begin(self, logs=None):
        self._reader, self._prev, self._row = None, None, {}
        self.tracker = Tracker(self.metrics, ema=self.ema, sma=self.sma)
        self._resolve(first_batch=False)

    def _resolve(self, first_batch: bool) -> None:
        """Find the metrics' running means: when ``fit`` starts, or at the end of the first batch
        when Keras builds its compiled metrics in the first step (the TensorFlow backend)."""
        logged, own, unbuilt = _running_means(self.model)
        found: dict = {m: logged[m] for m in self.metrics if m in logged}
        found.update({m: own[m][0] for m in self.metrics if m not in found and len(own.get(m, ())) == 1})
        missing = [m for m in self.metrics if m not in found]
        if missing and unbuilt and not first_batch:
            return                                           # Keras builds them in the first step
        ambiguous = [m for m in missing if len(own.get(m, ())) > 1]
        if ambiguous:
            m = ambiguous[0]
            as_logged = [n for n, v in logged.items() if any(v is w for w in own[m])]
            raise ValueError(f"MovingAverageLogs: {len(own[m])} metrics of this model are named {m!r} (a model "
                             f"with several outputs has one per output); Keras logs them as {as_logged}: give "
                             f"those names in metrics=")
        if missing:
            raise ValueError(f"MovingAverageLogs: the model reports no running-mean metric {missing}; "
                             f"it has {sorted(logged)}. Only metrics Keras averages over the epoch "
                             f"(loss and mean-type metrics such as mae or accuracy) have a per-batch value.")
        self._reader = _MeanState(self.model, [found[m] for m in self.metrics])

    def on_epoch_begin(self, epoch, logs=None):
        self._prev = np.zeros((len(self.metrics), 2))          # Keras resets its metrics at each epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._reader is None:
            self._resolve(first_batch=True)
        if self._prev is None:
            self._prev = np.zeros((len(self.metrics), 2))
        now = self._reader.read()
        d_total, d_count = (now - self._prev).T
        self._prev = now
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = np.where(d_count > 0, d_total / np.where(d_count > 0, d_count, 1.0), np.nan)
        self.tracker.update(raw)
        row = self.tracker.read()
        if self.raw:
            row = {**{f"{m}_raw": float(v) for m, v in zip(self.metrics, raw)}, **row}
        self._row = row
        if logs is not None:
            logs.update(row)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._row)
