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

import functools
import warnings
import weakref
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


def _running_means(model) -> tuple[dict, bool]:
    """Every metric of ``model`` that is a running mean (Keras ``Mean``-type: total and count), by
    name; and whether some metric container is not built yet (on the TensorFlow backend Keras
    builds the compiled metrics at the first training step, so they are not there before)."""
    found: dict = {}
    unbuilt = False
    todo = list(model.metrics)
    while todo:
        m = todo.pop(0)
        unbuilt = unbuilt or getattr(m, "built", True) is False
        if hasattr(m, "total") and hasattr(m, "count") and isinstance(m.count, keras.Variable):
            found.setdefault(m.name, m)
        inner = getattr(m, "metrics", None)                 # CompileMetrics / CompileLoss containers
        if isinstance(inner, (list, tuple)):
            todo.extend(inner)
    return found, unbuilt


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
            :class:`fastema.Smoother` parameters (``{"span": 50}``; ``{"span": 50, "mode":
            "seeded"}`` or ``{"span": 50, "adjust": False}`` for pandas' ``adjust=False``, the
            EMA seeded by the first value), or None.
        sma: window (batches) of the simple moving average, or None.
        raw: also log ``m_raw``.
        metrics: names of metrics the model reports as running means (``"loss"``, and
            compiled metrics such as ``"mae"`` or ``"accuracy"``).

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
        means, unbuilt = _running_means(self.model)
        missing = [m for m in self.metrics if m not in means]
        if missing and unbuilt and not first_batch:
            return                                           # Keras builds them in the first step
        if missing:
            raise ValueError(f"MovingAverageLogs: the model reports no running-mean metric {missing}; "
                             f"it has {sorted(means)}. Only metrics Keras averages over the epoch "
                             f"(loss and mean-type metrics such as mae or accuracy) have a per-batch value.")
        self._reader = _MeanState(self.model, [means[m] for m in self.metrics])

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


class WeightEMA(keras.callbacks.Callback):
    """Keep an EMA of a Keras model's weights during ``fit`` and validate with it.

    The EMA covers the trainable variables; non-trainable ones (BatchNorm statistics) are
    copied along, so the swapped-in model is consistent. It updates at the end of every
    batch Keras reports (every ``k``-th step with ``steps_per_execution=k``).

    Keras's optimizer ``use_ema`` averages too, but starts elsewhere. With decay ``d`` and
    ``w_k`` the weights after the ``k``-th step, this EMA starts from the weights when the
    first ``fit`` starts, ``w_0``: after ``n`` updates it is
    ``d**n w_0 + sum_k (1 - d) d**(n - k) w_k``. ``use_ema`` copies the weights after the
    optimizer's first step and averages from there: ``d**(n-1) w_1 + sum_{k>=2} (1 - d)
    d**(n - k) w_k``. The two differ by ``d**n (w_0 - w_1)``, which halves every
    ``0.69 / (1 - d)`` updates (the first step's move, fading). To start as
    ``use_ema(ema_momentum=d)`` does, give ``warmup="power", min_decay=d``: the first update
    copies the weights, every later one uses ``d`` (tested side by side with ``use_ema``).
    This callback adds the swap for validation, debiasing/warm-ups, a float32 shadow for
    low-precision weights, and checkpoints.

    If an exception or Ctrl-C escapes the validation inside ``fit`` (Keras then calls
    neither ``on_test_end`` nor ``on_train_end``), the raw weights are put back into the
    model before it propagates: for the length of ``fit`` the model's ``evaluate`` is
    wrapped for that. An average still swapped in when ``fit`` starts (e.g. by a
    ``callback.ema.swap()`` of one's own) is swapped back then, with a ``RuntimeWarning``.

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
        elif self.ema.swapped:
            # Left swapped in by something the guard below does not see (an ema.swap() of the
            # user's, a Keras that no longer validates through model.evaluate): training must
            # start from the raw weights, which the EMA holds.
            self.ema.swap()
            warnings.warn("fastema.keras.WeightEMA: the average was still swapped into the model when fit() "
                          "started; the raw weights are back in the model and training goes on from them",
                          RuntimeWarning, stacklevel=2)
        self._fitting = True
        _guard_evaluate(self)

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
        _unguard_evaluate(self.model)
        if self.ema.swapped:                                 # validation was cut short
            self.ema.swap()
        if self.write_at_end:
            self.ema.copy_to()

    def _restore(self) -> None:
        """The raw weights back into the model: an exception or Ctrl-C escapes the validation
        inside ``fit``, and Keras calls neither ``on_test_end`` nor ``on_train_end`` then."""
        if self.ema is not None and self.ema.swapped:
            self.ema.swap()

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


def _guard_evaluate(callback: WeightEMA) -> None:
    """Make ``model.evaluate`` put the raw weights back when an exception (or Ctrl-C) escapes it.

    Keras 3 has no callback hook for an exception: one that escapes the validation inside
    ``fit`` skips ``on_test_end`` and ``on_train_end`` and would leave the average in the model
    (a ``model.save()`` would then write it as the raw weights). ``fit`` validates through
    ``self.evaluate``, so for the length of ``fit`` the model gets an instance attribute
    ``evaluate`` that calls the class's method and, when that raises, swaps every guarded
    callback's average back (the last swapped in first) and re-raises. ``on_train_end`` (or
    the exception) removes it; ``on_train_begin`` is the safety net for the rest (it swaps
    back, with a warning).
    """
    model = callback.model
    guard = vars(model).get("evaluate")
    owners = getattr(guard, "_fastema_callbacks", None)
    if owners is not None:                                  # another WeightEMA of this fit, or an earlier fit's
        if not any(ref() is callback for ref in owners):
            owners.append(weakref.ref(callback))
        return
    if guard is not None:                                   # someone else's: leave it alone
        return
    method = type(model).evaluate
    owners = [weakref.ref(callback)]

    @functools.wraps(method)
    def evaluate(*args, **kwargs):
        try:
            return method(model, *args, **kwargs)
        except BaseException:
            _unguard_evaluate(model)
            for ref in reversed(owners):
                cb = ref()
                if cb is not None:
                    cb._restore()
            raise

    evaluate._fastema_callbacks = owners                    # type: ignore[attr-defined]
    object.__setattr__(model, "evaluate", evaluate)         # not through Keras's or torch's attribute tracking


def _unguard_evaluate(model) -> None:
    """Remove the guard of :func:`_guard_evaluate` (and nothing else)."""
    if hasattr(vars(model).get("evaluate"), "_fastema_callbacks"):
        del vars(model)["evaluate"]


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
        # The newest weights into the variables first. Out of the model too: after an exception in
        # the validation inside fit, fit's own clean-up would otherwise sync the validation's state
        # (the average) over the raw weights put back here.
        _keras_jax_state.sync(self.model)
        if into_model:
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
