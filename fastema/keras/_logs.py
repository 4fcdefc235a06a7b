"""MovingAverageLogs: the per-batch value of Keras's running-mean metrics, and its EMA and SMA, in
the logs.

Keras logs ``loss`` as the running mean since the start of the epoch, a float32 sum and count.
``loss_raw`` is the loss of each batch alone, as Keras computed it: the running mean keeps the
share (sum) and count of its last updates where Keras adds them (:mod:`._shares`), read with its
sum and count, so an uneven last batch, ``steps_per_execution > 1`` and the reset at each epoch
are all accounted for, and a small loss after large ones is not lost in the float32 sum. The EMA
and SMA of ``loss_raw`` continue across epochs: no staircase at epoch boundaries.
"""
from __future__ import annotations

from typing import Sequence

import keras
import numpy as np

from ..track import Tracker
from ._jax import metric_values
from ._shares import SHARES, install, last_shares


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
    """Reads (total, count) of several Keras running means, and the ring of their last updates
    (:mod:`._shares`) where they keep one, in one device-to-host transfer."""

    def __init__(self, model, metrics: Sequence):
        self.model = model
        self.variables: list = []
        self.rings: list = []                     # per metric: the ring's size, or 0
        for m in metrics:
            shares = getattr(m, SHARES, None)
            self.variables += [m.total, m.count]
            self.rings.append(0 if shares is None else shares.size)
            if shares is not None:
                self.variables += [shares.pos, shares.sums, shares.counts]
        if keras.backend.backend() == "jax":
            # JAX keeps the training state outside the Variables between syncs; read it there
            # (a full sync every batch would be slow and is what Keras avoids).
            # by identity: two metrics may share a path (each output's mean_absolute_error)
            index = {id(v): i for i, v in enumerate(model.metrics_variables)}
            self._jax_index = [index[id(v)] for v in self.variables]

    def read(self) -> tuple[np.ndarray, list]:
        """The (total, count) rows, and each metric's ring (``[pos, sums..., counts...]``) or
        None."""
        values = list(self.variables)
        if keras.backend.backend() == "jax":
            values = metric_values(self.model, self._jax_index) or values
        wide = any(str(v.dtype) == "float64" for v in self.variables)
        dtype = "float64" if wide else "float32"                  # as Keras keeps them
        flat = keras.ops.concatenate([keras.ops.reshape(keras.ops.cast(v, dtype), (-1,))
                                      for v in values])
        flat = np.asarray(keras.ops.convert_to_numpy(flat), np.float64)
        rows, rings, at = [], [], 0
        for size in self.rings:
            rows.append(flat[at:at + 2])
            rings.append(flat[at + 2:at + 3 + 2 * size] if size else None)
            at += 2 + (1 + 2 * size if size else 0)
        return np.array(rows), rings


def _per_batch(now: np.ndarray, prev: np.ndarray, rings: list, steps: int) -> np.ndarray:
    """Each metric's value over the updates since the last report: from its ring where it keeps one
    (exact), else the difference of its float32 sum and count since the last report, exact at the
    first report of an epoch (from zero) and off by up to half a float32 step of the sum per update
    later: NaN where that could be more than 1e-3 of the difference."""
    d_total, d_count = (now - prev).T
    with np.errstate(invalid="ignore", divide="ignore"):
        raw = np.where(d_count > 0, d_total / np.where(d_count > 0, d_count, 1.0), np.nan)
    step = np.spacing(np.maximum(np.abs(now), np.abs(prev)).astype(np.float32)).astype(np.float64)
    unsure = (prev[:, 1] != 0) & (steps * step[:, 0] / 2 > 1e-3 * np.abs(d_total))
    raw[unsure] = np.nan
    for j, ring in enumerate(rings):
        if ring is not None and d_count[j] > 0:
            kept = last_shares(ring, (len(ring) - 1) // 2, steps, d_count[j], steps * step[j, 1])
            raw[j] = raw[j] if kept is None else kept
    return raw


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

    Each running mean (Keras's ``Mean``: the loss, and ``MeanMetricWrapper`` metrics such as mae
    or accuracy) is made to keep its last ``steps_per_execution`` batches' shares (a sub-metric of
    three variables; Keras does not save metric variables); a step traced before that is traced
    again (on TensorFlow, once, at the second batch where the compiled metrics are asked for). A
    running mean of another kind gives the difference of its float32 sum instead: exact at an
    epoch's first report, and NaN where the sum's rounding could be more than 1e-3 of it.
    """

    def __init__(self, ema=0.9, sma: int | None = 50, raw: bool = True, metrics: Sequence[str] = ("loss",)):
        super().__init__()
        if isinstance(metrics, str):
            metrics = (metrics,)
        self.metrics = tuple(metrics)
        self.ema, self.sma, self.raw = ema, sma, raw
        self.tracker = Tracker(self.metrics, ema=ema, sma=sma)    # checks the arguments now
        self._reader: _MeanState | None = None
        self._prev, self._batch = None, -1
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
        means = [found[m] for m in self.metrics]
        # Each batch's own share, kept where Keras adds it (._shares). Not into a JAX fit under way:
        # its state holds the metric variables there were when it started.
        if not (first_batch and keras.backend.backend() == "jax"):
            size = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
            added = [install(m, size) for m in means]
            if any(added) and getattr(self.model, "train_function", None) is not None:
                self.model.make_train_function(force=True)   # a step traced before keeps none
        self._reader = _MeanState(self.model, means)

    def on_epoch_begin(self, epoch, logs=None):
        # Keras resets its metrics at each epoch
        self._prev, self._batch = np.zeros((len(self.metrics), 2)), -1

    def on_train_batch_end(self, batch, logs=None):
        if self._reader is None:
            self._resolve(first_batch=True)
        if self._prev is None:
            self._prev, self._batch = np.zeros((len(self.metrics), 2)), -1
        now, rings = self._reader.read()
        raw = _per_batch(now, self._prev, rings, max(1, batch - self._batch))
        self._prev, self._batch = now, batch
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
