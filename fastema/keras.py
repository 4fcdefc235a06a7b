"""Keras 3 callbacks: smoothed per-batch metrics and an EMA of the weights.

``MovingAverageLogs`` adds ``loss_raw``, ``loss_ema`` and ``loss_sma`` to the logs::

    model.fit(x, y, callbacks=[fastema.keras.MovingAverageLogs(ema=0.9, sma=50)])

Keras logs ``loss`` as the running mean since the start of the epoch. ``loss_raw`` is the
loss of each batch alone, recovered exactly from the running mean's state (its sum and
cumulative sample count), so an uneven last batch, ``steps_per_execution > 1`` and the
reset at each epoch are all accounted for. The EMA and SMA of ``loss_raw`` continue across
epochs: no staircase at epoch boundaries.

``WeightEMA`` keeps an EMA of the weights (fastema.torch, .tensorflow or .jax by backend), swaps it in
for validation and back after it, and can write it into the model when ``fit`` ends.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

try:
    import keras
except ImportError as e:                                    # pragma: no cover - depends on the environment
    raise ImportError("fastema.keras needs Keras 3 (pip install 'fastema[keras]')") from e

from . import _keras_jax_state
from .average import EMAOptions, Face, ModelSwap
from .track import Tracker

__all__ = ["MovingAverageLogs", "WeightEMA"]

_DEFAULT = object()        # WeightEMA's decay not given (the default changed in 0.2: a warning says so for one release)


def _running_means(model) -> dict:
    """Every metric of ``model`` that is a running mean (Keras ``Mean``-type: total and count), by name."""
    found: dict = {}
    todo = list(model.metrics)
    while todo:
        m = todo.pop(0)
        if hasattr(m, "total") and hasattr(m, "count") and isinstance(m.count, keras.Variable):
            found.setdefault(m.name, m)
        inner = getattr(m, "metrics", None)                 # CompileMetrics / CompileLoss containers
        if isinstance(inner, (list, tuple)):
            todo.extend(inner)
    return found


class _MeanState:
    """Reads (total, count) of several Keras running means in one device-to-host transfer."""

    def __init__(self, model, metrics: Sequence):
        self.model = model
        self.variables = [v for m in metrics for v in (m.total, m.count)]
        if keras.backend.backend() == "jax":
            # JAX keeps the training state outside the Variables between syncs; read it there
            # (a full sync every batch would be slow and is what Keras avoids).
            paths = [v.path for v in model.metrics_variables]
            self._jax_index = [paths.index(v.path) for v in self.variables]

    def read(self) -> np.ndarray:
        values = list(self.variables)
        if keras.backend.backend() == "jax":
            values = _keras_jax_state.metric_values(self.model, self._jax_index) or values
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
            :class:`fastema.Smoother` parameters (``{"span": 50}``), or None.
        sma: window (batches) of the simple moving average, or None.
        raw: also log ``m_raw``.
        metrics: names of metrics the model reports as running means (``"loss"``, and
            compiled metrics such as ``"mae"`` or ``"accuracy"``).

    The averages run over the reported batches (with ``steps_per_execution=k``, Keras
    reports every k-th batch and ``m_raw`` is the sample-weighted mean of those k), keep
    going across epochs and restart at each ``fit``. Non-finite values are skipped.
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
        means = _running_means(self.model)
        missing = [m for m in self.metrics if m not in means]
        if missing:
            raise ValueError(f"MovingAverageLogs: the model reports no running-mean metric {missing}; "
                             f"it has {sorted(means)}. Only metrics Keras averages over the epoch "
                             f"(loss and mean-type metrics such as mae or accuracy) have a per-batch value.")
        self._reader = _MeanState(self.model, [means[m] for m in self.metrics])
        self.tracker = Tracker(self.metrics, ema=self.ema, sma=self.sma)
        self._row = {}

    def on_epoch_begin(self, epoch, logs=None):
        self._prev = np.zeros((len(self.metrics), 2))          # Keras resets its metrics at each epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._reader is None:
            return
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


class WeightEMA(keras.callbacks.Callback):
    """Keep an EMA of a Keras model's weights during ``fit`` and validate with it.

    The EMA covers the trainable variables; non-trainable ones (BatchNorm statistics) are
    copied along, so the swapped-in model is consistent. Keras's optimizer ``use_ema`` does
    the same averaging; this callback adds the swap for validation, debiasing/warm-ups, a
    float32 shadow for low-precision weights, and checkpoints.

    Args:
        decay: the EMA decay (default 0.9999, as every fastema EMA), or a list of decays (the
            first is swapped in); or leave it out and give ``sigma_rel=``, ``half_life=`` or ``bema=``.
        validate_with_ema: swap the EMA in for the validation inside ``fit`` (and back after).
        write_at_end: write the EMA into the model when ``fit`` ends (Keras's ``use_ema``
            default); otherwise the model keeps its raw weights and :attr:`ema` has the average.
        **ema_kwargs: the options of the backend's EMA (:class:`fastema.average.EMAOptions`:
            ``sigma_rel=``, ``warmup=``, ``debias=``, ``update_every=``, ``shadow_dtype=``...), the
            same on every backend; the torch backend also takes the model selection
            (``buffers=``, ``exclude=``, ``copy=``). An option the backend's EMA cannot run is
            refused here, by name.

    Works on the three Keras backends: torch (:class:`fastema.torch.EMA`; Keras layers are
    torch modules there), TensorFlow (:class:`fastema.tensorflow.EMA` over the variables)
    and JAX (:class:`fastema.jax.EMA` over the trainable state that ``fit`` carries from
    step to step, read without a sync of the model). The EMA lives on across ``fit``
    calls; :meth:`state_dict` / :meth:`load_state_dict` save and restore it.
    """

    def __init__(self, decay=_DEFAULT, *, validate_with_ema: bool = True, write_at_end: bool = False, **ema_kwargs):
        super().__init__()
        options, selection = EMAOptions.split(ema_kwargs)
        if decay is _DEFAULT:
            decay = None
            if all(options.get(k) in (None, False) for k in ("sigma_rel", "half_life", "bema")):
                warnings.warn("fastema.keras.WeightEMA's default decay is now 0.9999, as every fastema EMA's (it was "
                              "0.999 before 0.2); pass decay=0.999 to keep the old average", FutureWarning,
                              stacklevel=2)
        _check_for_backend(EMAOptions.of(decay, **options), selection)   # refused now, not when fit starts
        self.decay, self.validate_with_ema, self.write_at_end = decay, validate_with_ema, write_at_end
        self.ema_kwargs = ema_kwargs
        self.ema = None
        self._owner = None
        self._pending: dict | None = None
        self._fitting = False

    def _make(self):
        backend = keras.backend.backend()
        if backend == "torch":
            self.ema = self._torch_ema()
        elif backend == "tensorflow":
            from .tensorflow import EMA

            self.ema = EMA(self.model.trainable_variables, self.decay, **self.ema_kwargs)
        elif backend == "jax":
            self.ema = _JaxModelEMA(self.model, self.decay, **self.ema_kwargs)
        else:
            raise RuntimeError(f"fastema.keras.WeightEMA runs on the torch, tensorflow and jax backends; "
                               f"this Keras runs on {backend!r}")
        self._owner = self.model
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.ema.load_state_dict(state)

    def _torch_ema(self):
        # Keras layers are torch modules here: average the trainable variables, copy the others along.
        from .torch import EMA

        model = self.model
        named = dict(model.named_parameters())
        by_id = {id(p): n for n, p in named.items()}
        frozen = [by_id[id(v.value)] for v in model.non_trainable_variables if id(v.value) in by_id]
        kwargs = dict(self.ema_kwargs)
        kwargs["copy"] = tuple(kwargs.get("copy", ())) + tuple(_escape(n) for n in frozen)
        return EMA(model, self.decay, **kwargs)

    def on_train_begin(self, logs=None):
        if self.ema is None:
            self._make()
        elif self._owner is not self.model:
            raise RuntimeError("this WeightEMA follows another model; make one callback per model")
        self._fitting = True

    def on_train_batch_end(self, batch, logs=None):
        self.ema.update()

    def on_test_begin(self, logs=None):
        if self._fitting and self.validate_with_ema and not self.ema.swapped:
            self.ema.swap()

    def on_test_end(self, logs=None):
        if self._fitting and self.ema.swapped:
            self.ema.swap()

    def on_train_end(self, logs=None):
        self._fitting = False
        if self.ema.swapped:                                 # validation was cut short
            self.ema.swap()
        if self.write_at_end:
            self.ema.copy_to()

    def state_dict(self) -> dict:
        if self.ema is None:
            raise RuntimeError("WeightEMA has no EMA yet: it is made when fit() starts")
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; before the first ``fit`` it is applied when the EMA is made."""
        if self.ema is None:
            self._pending = state
        else:
            self.ema.load_state_dict(state)


def _check_for_backend(options: EMAOptions, selection: dict) -> None:
    """Refuse, by name, what the EMA of this Keras backend cannot run."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from .tensorflow import REFUSED
    elif backend == "jax":
        from .jax import REFUSED
    else:
        return
    face = f"fastema.keras.WeightEMA on the {backend} backend"
    if selection:
        name = next(iter(selection))
        raise ValueError(f"{face} does not take {name}=: it averages the trainable variables and leaves the "
                         f"others as they are (the model selection buffers=/exclude=/copy= is the torch backend's)")
    options.refuse(face, REFUSED)


def _escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class _JaxModelEMA(Face):
    """fastema.jax.EMA over a Keras model's trainable variables on the JAX backend, with the
    swap the callback needs. During ``fit`` the newest weights live in the trainer's state
    (``model._jax_state``), not in the variables, and are read from there."""

    def __init__(self, model, decay, **kwargs):
        from .jax import EMA

        self.model = model
        self.variables = list(model.trainable_variables)
        self.inner = EMA([v.value for v in self.variables], decay, **kwargs)
        self._core = self.inner._core
        self._raw = None
        self._swap = ModelSwap(self._exchange, "the average is swapped into the model; swap() back first")

    @property
    def swapped(self) -> bool:
        return self._swap.swapped

    def _current(self) -> list:
        newest = _keras_jax_state.trainable_values(self.model)
        return [v.value for v in self.variables] if newest is None else newest

    def update(self) -> None:
        self._swap.refuse("update()")
        self.inner.update(self._current())

    def swap(self) -> None:
        self._swap.swap(0)

    def _exchange(self, row: int, into_model: bool) -> None:
        if into_model:
            _keras_jax_state.sync(self.model)          # the newest weights into the variables first
            self._raw = [v.value for v in self.variables]      # JAX arrays are immutable: an exact stash
            values = self.inner.shadow()
        else:
            values, self._raw = self._raw, None
        for v, a in zip(self.variables, values):
            v.assign(a)

    def copy_to(self) -> None:
        for v, a in zip(self.variables, self.inner.shadow()):
            v.assign(a)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
