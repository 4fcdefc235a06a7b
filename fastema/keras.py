"""Keras 3 callbacks: smoothed per-batch metrics and an EMA of the weights.

``MovingAverageLogs`` adds ``loss_raw``, ``loss_ema`` and ``loss_sma`` to the logs::

    model.fit(x, y, callbacks=[fastema.keras.MovingAverageLogs(ema=0.9, sma=50)])

Keras logs ``loss`` as the running mean since the start of the epoch. ``loss_raw`` is the
loss of each batch alone, recovered exactly from the running mean's state (its sum and
cumulative sample count), so an uneven last batch, ``steps_per_execution > 1`` and the
reset at each epoch are all accounted for. The EMA and SMA of ``loss_raw`` continue across
epochs: no staircase at epoch boundaries.

``WeightEMA`` keeps an EMA of the weights (fastema.torch, .tensorflow or .jax by backend), swaps it in
for validation and back after it, and can write it into the model when ``fit`` ends. Its average goes
into the model's ``.keras`` and ``.weights.h5`` files (``model.save``, ``save_weights``,
``ModelCheckpoint``); :func:`load_model` / :func:`load_average` bring it back and the next
``WeightEMA`` resumes from it; :func:`averaged_weights` reads it.
"""
from __future__ import annotations

import functools
import json
import os
import types
import warnings
import weakref
from typing import Any, Sequence

import numpy as np

try:
    import keras
except ImportError as e:                                    # pragma: no cover - depends on the environment
    raise ImportError("fastema.keras needs Keras 3 (pip install 'fastema[keras]')") from e

from . import _keras_jax_state
from ._checks import MAX_DECAYS, shadow_problems
from .average import EMAOptions, Face, ModelSwap, Plan
from .track import Tracker

__all__ = ["MovingAverageLogs", "WeightEMA", "averaged_weights", "load_average", "load_model"]

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
            (``buffers=``, ``exclude=``, ``copy=``, ``trainable_only=``). An option the backend's EMA cannot run is
            refused here, by name.

    Works on the three Keras backends: torch (:class:`fastema.torch.EMA`; Keras layers are
    torch modules there), TensorFlow (:class:`fastema.tensorflow.EMA` over the variables)
    and JAX (:class:`fastema.jax.EMA` over the trainable state that ``fit`` carries from
    step to step, read without a sync of the model). The EMA lives on across ``fit``
    calls; :meth:`state_dict` / :meth:`load_state_dict` save and restore it.

    **Saving.** Once ``fit`` has started, the average is part of the model's saved state:
    ``model.save("m.keras")``, ``model.save_weights("m.weights.h5")`` and ``ModelCheckpoint``
    (either ``save_weights_only``) write every shadow row, the update count and the schedule's
    state next to the weights (read from the shadow when the file is written: nothing is copied
    per step; a model without a ``WeightEMA`` saves exactly what it did). :func:`load_model`
    (Keras's ``load_model`` plus the average; no ``custom_objects``, and ``compile=False``
    keeps the average) or :func:`load_average` put it back on a model, and the next
    ``WeightEMA`` made on that model resumes from it when ``fit`` starts, bit for bit
    (its options must match the saved ones; a :meth:`load_state_dict` of one's own takes
    precedence). ``model.load_weights`` into a model whose ``WeightEMA`` has started loads
    the average into it too. :func:`averaged_weights` reads the average without a callback.
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
        self.ema: Any = None                                 # made when fit starts
        self._owner = None
        self._pending: dict | None = None
        self._fitting = False

    def _make(self):
        backend = keras.backend.backend()
        if backend == "torch":
            ema = self._torch_ema()
        elif backend == "tensorflow":
            from .tensorflow import EMA

            ema = EMA(self.model.trainable_variables, self.decay, **self.ema_kwargs)
        elif backend == "jax":
            ema = _JaxModelEMA(self.model, self.decay, **self.ema_kwargs)
        else:
            raise RuntimeError(f"fastema.keras.WeightEMA runs on the torch, tensorflow and jax backends; "
                               f"this Keras runs on {backend!r}")
        # The average this callback resumes from: a state_dict() given to load_state_dict(), else the one
        # saved with the model (load_model / load_average / load_weights) for this callback's place.
        saved = _saved_averages(self.model, create=True)
        slot = len(saved.this_fit())
        from_file = saved.pending[slot] if slot < len(saved.pending) else None
        self.ema = ema
        try:
            if self._pending is not None:
                ema.load_state_dict(self._pending)
            elif from_file is not None:
                try:
                    ema.load_state_dict(_named_state(self, from_file))
                except ValueError as e:
                    raise ValueError(f"fastema.keras.WeightEMA: the average saved with this model does not fit this "
                                     f"callback ({e}); give WeightEMA the options the average was saved with (or "
                                     f"load_state_dict() a state of its own)") from e
        except BaseException:
            self.ema = None                                 # refused: nothing made, nothing consumed
            if not saved.callbacks and not any(p is not None for p in saved.pending):
                _detach(self.model)
            raise
        self._pending = None
        if from_file is not None:
            saved.pending[slot] = None
        self._owner = self.model
        saved.join(self)                                    # model.save() writes this callback's average

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
        _saved_averages(self.model, create=True).join(self)
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
                         f"others as they are (the model selection buffers=/exclude=/copy=/trainable_only= is the "
                         f"torch backend's)")
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


# ---------------------------------------------------------------- the average in Keras's files
#
# Keras saves a model (model.save, save_weights, ModelCheckpoint) by walking its attributes: every
# ``KerasSaveable`` found there writes its arrays with ``save_own_variables(store)`` and reads them back
# with ``load_own_variables(store)`` (keras/src/saving/saving_lib.py, ``_save_state`` / ``_load_state``).
# Keras's own ``use_ema`` rides on that through optimizer variables, which a model loaded from its
# config re-creates because its optimizer config says ``use_ema=True``. A WeightEMA's average is not in
# any config, so it is one attribute of the model, ``_SavedAverages`` (set past Keras's and torch's
# attribute tracking: not a layer, not a weight), that writes the EMAs' state_dict() when the file is
# written. Keras's load_model re-creates the model from its config without that attribute and passes
# over the average; load_model / load_average below read it back from the file.

_ATTR = "_fastema_weight_ema"
_FORMAT, _VERSION = "fastema.keras.WeightEMA", 1
_GROUPS = ("averaged", "copied", "int_buffers")           # the state_dict()s' dicts of arrays, keyed by name
_HEADER_BYTES = 16 << 20                                  # a header past this is not one fastema wrote

try:                                                      # Keras 3's base of everything its files walk
    from keras.src.saving.keras_saveable import KerasSaveable as _KerasSaveable
except ImportError:                                       # pragma: no cover - depends on the Keras release
    _KerasSaveable = object                               # type: ignore[assignment,misc]


class _SavedAverages(_KerasSaveable):
    """The averages of the ``WeightEMA`` callbacks of one model, as Keras's files carry them.

    ``callbacks`` are the live ones (their state is read when a file is written); ``pending`` the
    states read from a file for callbacks not made yet (by place: the ``i``-th ``WeightEMA`` of
    the next ``fit``, if it is a new one, resumes from ``pending[i]``; a callback of that ``fit``
    that already has its EMA keeps it, and a file loaded into it is in both). A state here is a
    state_dict() whose arrays are keyed by the model's structure (``trainable/3``: the model's 4th
    trainable variable), not by name, so a model of the same architecture with other layer names (a
    second model in one process) loads it, as Keras's own ``load_weights`` matches by structure.
    """

    def __init__(self) -> None:
        self.callbacks: list[WeightEMA] = []
        self.pending: list[dict | None] = []

    def __dir__(self):                                     # Keras walks dir(): nothing more in here to save
        return []

    def __deepcopy__(self, memo):                          # a copied model has no callback of its own
        return type(self)()

    def __reduce__(self):                                  # (KerasSaveable's pickles a whole model)
        return type(self), ()

    def this_fit(self) -> list[WeightEMA]:
        """The callbacks of the ``fit`` that is starting (those whose ``on_train_begin`` has run)."""
        return [cb for cb in self.callbacks if cb._fitting]

    def join(self, callback: WeightEMA) -> None:
        """``callback`` starts a ``fit``: the file gets its average, with those of the other WeightEMAs
        of this ``fit``; the callbacks of an earlier ``fit`` that are not in this one are dropped (a
        new ``WeightEMA`` per ``fit`` call is the newest average, and the old ones are not kept alive)."""
        if callback not in self.callbacks or not callback._fitting:
            self.callbacks = [cb for cb in self.this_fit() if cb is not callback] + [callback]
        for i in range(min(len(self.callbacks), len(self.pending))):
            self.pending[i] = None                          # a live callback holds that place's average now

    def _obj_type(self) -> str:
        # Keras takes this to pick which attributes of a base class to skip when it walks dir(); it
        # accepts only its own kinds. Loss is the plainest of them (dir() here is empty anyway).
        return "Loss"

    def refuse_swapped(self) -> None:
        """RuntimeError while a live callback's average is swapped into the model (its weights are the
        average then, and a file would carry them as the raw weights)."""
        if any(cb.ema is not None and cb.ema.swapped for cb in self.callbacks):
            raise RuntimeError("fastema.keras.WeightEMA: the model is saved while the average is swapped in (its "
                               "weights are the average, not the raw ones); save after the validation, or swap() "
                               "back first. Nothing was written.")

    def entries(self) -> list[dict]:
        """Every average this model carries, in place order: live callbacks read now, the rest as loaded."""
        self.refuse_swapped()
        out = []
        for i in range(max(len(self.callbacks), len(self.pending))):
            if i < len(self.callbacks):
                cb = self.callbacks[i]
                out.append(_structural_state(cb))
            elif self.pending[i] is not None:
                out.append(self.pending[i])                 # type: ignore[arg-type]
        return out

    def save_own_variables(self, store) -> None:
        """Keras's saving hook: the header (JSON, as uint8) and every array, numbered."""
        entries = self.entries()
        if not entries:
            return
        arrays: list[np.ndarray] = []
        header = {"format": _FORMAT, "version": _VERSION, "backend": keras.backend.backend(),
                  "entries": [_encode(e, arrays, "state") for e in entries]}
        store["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        for i, a in enumerate(arrays):
            store[str(i)] = a

    def load_own_variables(self, store) -> None:
        """Keras's loading hook (``model.load_weights`` into a model with a ``WeightEMA``): the saved
        averages into the live callbacks, all or none."""
        if not len(store.keys()):
            if self.callbacks:
                warnings.warn("fastema.keras.WeightEMA: the weights file holds no average (it was saved without a "
                              "WeightEMA); the callback's average is unchanged", RuntimeWarning, stacklevel=2)
            return
        self.load(_decode(store), "the file")

    def load(self, entries: list[dict], source: str) -> None:
        """``entries`` into the live callbacks (checked first; all load or none), or kept as pending for
        the callbacks to come when there are none; refused with nothing changed if they do not fit."""
        if self.callbacks:
            if len(entries) != len(self.callbacks):
                raise ValueError(f"{source} holds {len(entries)} WeightEMA average(s) and this model has "
                                 f"{len(self.callbacks)} WeightEMA callback(s); load it into a model with as many")
            states = [_named_state(cb, e) for cb, e in zip(self.callbacks, entries)]
            before = [cb.ema.state_dict() for cb in self.callbacks]
            done = 0
            try:
                for cb, state in zip(self.callbacks, states):
                    cb.ema.load_state_dict(state)
                    done += 1
            except BaseException:
                for cb, state in zip(self.callbacks[:done], before):   # the ones already loaded, as they were
                    cb.ema.load_state_dict(state)
                raise
            self.pending = list(entries)                    # and for new WeightEMAs of the next fit
            return
        model = _model_of(self)
        problems = [p for i, e in enumerate(entries) for p in _problems(model, e, i)]
        if problems:
            raise ValueError(f"{source} holds a WeightEMA average that does not fit this model: "
                             + "; ".join(problems[:6]) + "; load it into the model it was saved with (same "
                             "architecture and backend)")
        self.pending = list(entries)


def _saved_averages(model, create: bool = False) -> _SavedAverages:
    holder = vars(model).get(_ATTR)
    if holder is None and create:
        holder = _SavedAverages()
        object.__setattr__(model, _ATTR, holder)           # not through Keras's or torch's attribute tracking
        object.__setattr__(holder, "_model", weakref.ref(model))
        _guard_saves(model)
    return holder


_SAVES = ("save", "save_weights")


def _guard_saves(model) -> None:
    """``model.save`` and ``model.save_weights`` refuse while an average is swapped in before Keras
    opens the file: Keras opens it for writing (truncating the file already there) before it walks
    the model, so a refusal from inside its walk (:meth:`_SavedAverages.entries`) would leave the
    user's previous file destroyed. Instance attributes, bound methods (a deep copy of the model
    binds its own), that call the class's method; :func:`_detach` removes them."""
    for name in _SAVES:
        method = getattr(type(model), name, None)
        if method is None or name in vars(model):         # none, or someone else's (or ours already)
            continue

        @functools.wraps(method)
        def save(self, *args, _method=method, **kwargs):
            holder = vars(self).get(_ATTR)
            if holder is not None:
                holder.refuse_swapped()
            return _method(self, *args, **kwargs)

        save._fastema_save_guard = True                   # type: ignore[attr-defined]
        object.__setattr__(model, name, types.MethodType(save, model))


def _model_of(holder: _SavedAverages):
    ref = vars(holder).get("_model")
    return None if ref is None else ref()


def _detach(model) -> None:
    vars(model).pop(_ATTR, None)
    for name in _SAVES:
        if getattr(getattr(vars(model).get(name), "__func__", None), "_fastema_save_guard", False):
            del vars(model)[name]


def _structural_keys(callback: WeightEMA, state: dict) -> dict[str, str]:
    """The state_dict()'s array names -> the model's structure (``trainable/i``, ``non_trainable/i``)."""
    model = callback.model
    if keras.backend.backend() == "torch":                 # names of torch parameters: by identity
        index: dict[int, str] = {}
        for kind in ("trainable", "non_trainable"):
            for i, v in enumerate(getattr(model, f"{kind}_variables")):
                index.setdefault(id(v.value), f"{kind}/{i}")
        named = {n for g in _GROUPS for n in (state.get(g) or {})}      # (torch lists a parameter under aliases)
        return {n: index[id(p)] for n, p in model.named_parameters(remove_duplicate=False)
                if id(p) in index and n in named}
    # TensorFlow and JAX: the EMA runs over model.trainable_variables, in that order
    return {n: f"trainable/{i}" for i, n in enumerate(state.get("averaged", {}))}


def _structural_state(callback: WeightEMA) -> dict:
    """``callback``'s state_dict() with its arrays keyed by the model's structure."""
    state = callback.ema.state_dict()
    keys = _structural_keys(callback, state)
    out = dict(state)
    for g in _GROUPS:
        if isinstance(state.get(g), dict):
            out[g] = {keys.get(n, "name:" + n): v for n, v in state[g].items()}
    return out


def _named_state(callback: WeightEMA, entry: dict) -> dict:
    """A saved ``entry`` as ``callback.ema.load_state_dict`` takes it: arrays under this model's names
    (torch tensors on the torch backend)."""
    if entry.get("backend", keras.backend.backend()) != keras.backend.backend():
        raise ValueError(f"the WeightEMA average was saved on the {entry['backend']} backend and this Keras runs on "
                         f"{keras.backend.backend()!r}; the EMAs' checkpoints differ by backend: load it with "
                         f"KERAS_BACKEND={entry['backend']}")
    names = {s: n for n, s in _structural_keys(callback, callback.ema.state_dict()).items()}
    out = {k: v for k, v in entry.items() if k != "backend"}
    for g in _GROUPS:
        if isinstance(entry.get(g), dict):
            out[g] = {names.get(s, s[5:] if s.startswith("name:") else s): _to_backend(a)
                      for s, a in entry[g].items()}
    return out


def _to_backend(a):
    if keras.backend.backend() != "torch" or not isinstance(a, np.ndarray):
        return a
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _to_numpy(value) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes

            return t.contiguous().view(dtype=_torch_int16()).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(value)


def _torch_int16():
    import torch

    return torch.int16


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "shape") and hasattr(value, "dtype")
                                             and not isinstance(value, np.generic))


def _encode(value, arrays: list, where: str):
    """``value`` as JSON, its arrays appended to ``arrays`` and replaced by ``{"__array__": index}``."""
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"fastema.keras.WeightEMA cannot save {where}: key {k!r} is not a string")
        return {k: _encode(v, arrays, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if _is_array(value):
        arrays.append(_to_numpy(value))
        return {"__array__": len(arrays) - 1}
    raise TypeError(f"fastema.keras.WeightEMA cannot save {where}: a {type(value).__name__}, not an array, "
                    f"number, string or container")


def _decode(store, source: str = "the file") -> list[dict]:
    """The entries of a saved header, their arrays read from ``store``; refused when it is not one, or
    when the EMA's own checks that need no model find it damaged (:func:`_damage`)."""
    keys = set(store.keys())

    def bad(why: str):
        return ValueError(f"the WeightEMA average in {source} is unreadable ({why}); it is damaged, or was not "
                          f"written by fastema.keras: load the model without it (keras.saving.load_model). Nothing "
                          f"was loaded.")

    if "header" not in keys:
        raise bad("no header")
    raw = np.asarray(store["header"])
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _HEADER_BYTES:
        raise bad(f"a header of dtype {raw.dtype} and shape {raw.shape}")
    try:
        header = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise bad("the header names no fastema.keras.WeightEMA format")
    if header.get("version") != _VERSION:
        raise ValueError(f"the file's WeightEMA average has version {header.get('version')!r}; this fastema reads "
                         f"version {_VERSION}: upgrade fastema")
    entries = header.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise bad("no list of entries")

    def arrays(value):
        if isinstance(value, dict):
            if set(value) == {"__array__"}:
                i = value["__array__"]
                if isinstance(i, bool) or not isinstance(i, int) or str(i) not in keys:
                    raise bad(f"array {i!r} is missing")
                return np.asarray(store[str(i)])
            return {k: arrays(v) for k, v in value.items()}
        if isinstance(value, list):
            return [arrays(v) for v in value]
        return value

    out = [{**arrays(e), "backend": header.get("backend")} for e in entries]
    damage = [p for i, e in enumerate(out) for p in _damage(e, i)]
    if damage:
        raise bad("; ".join(damage[:6]))
    return out


def _damage(entry: dict, place: int) -> list[str]:
    """What the EMA's own checkpoint checks find in a saved average before any EMA is made: its plan
    state (``Plan.check_state``, with as many decays as it saved), rounding and seed
    (``shadow_problems``), non-finite averages (refused by ``load_state_dict`` with the same words)."""
    problems: list[str] = []
    n = len(entry["schedules"]) if isinstance(entry.get("schedules"), list) else 0
    if 1 <= n <= MAX_DECAYS:
        Plan([0.5] * n).check_state(entry, problems)
    else:
        problems.append(f"{n} schedules, for 1 to {MAX_DECAYS} averages")
    problems += shadow_problems(str(entry.get("shadow_dtype")), entry.get("rounding"), entry.get("seed"))
    averaged = entry.get("averaged")
    for key, a in sorted(averaged.items() if isinstance(averaged, dict) else (), key=lambda kv: _natural(kv[0])):
        a = np.asarray(a)
        if (a.dtype.kind == "f" or a.dtype.name == "bfloat16") and not np.all(np.isfinite(a.astype(np.float32))):
            problems.append(f"{key} holds inf or NaN")
    return [f"average {place}: {p}" for p in problems]


def _problems(model, entry: dict, place: int) -> list[str]:
    """What keeps a saved ``entry`` from fitting ``model`` (checked before anything is kept)."""
    out = []
    backend = keras.backend.backend()
    if entry.get("backend") != backend:
        out.append(f"it was saved on the {entry.get('backend')} backend and this Keras runs on {backend!r} (the "
                   f"EMAs' checkpoints differ by backend: load it with KERAS_BACKEND={entry.get('backend')})")
        return out
    variables = {"trainable": list(model.trainable_variables), "non_trainable": list(model.non_trainable_variables)}
    averaged = entry.get("averaged")
    if not isinstance(averaged, dict) or not averaged:
        return [f"average {place} has no arrays"]
    for g in _GROUPS:
        for key, a in sorted((entry.get(g) or {}).items(), key=lambda kv: _natural(kv[0])):
            kind, _, i = key.partition("/")
            if kind not in variables:
                continue                                    # by name (a torch buffer): the EMA checks it
            if not i.isdigit() or int(i) >= len(variables[kind]):
                out.append(f"{key} is saved but the model has {len(variables[kind])} {kind} variables")
                continue
            shape = tuple(variables[kind][int(i)].shape)
            got = tuple(np.shape(a))[1:] if g == "averaged" else tuple(np.shape(a))
            if got != shape:
                out.append(f"{key} ({variables[kind][int(i)].path}) has shape {shape}, the saved one {got}")
    n = len(variables["trainable"])
    saved = sum(1 for k in averaged if k.startswith("trainable/"))
    if saved and saved != n and backend != "torch":
        out.append(f"{saved} trainable variables are saved and the model has {n}")
    return out


def _natural(key: str) -> tuple:
    kind, _, i = key.partition("/")
    return (kind, int(i)) if i.isdigit() else (kind, -1, i)


def _open_store(filepath):
    """Keras's reader of the weights of a ``.keras`` or ``.weights.h5`` file (closed by the caller)."""
    import zipfile

    from keras.src.saving import saving_lib

    path = os.fspath(filepath)
    if path.endswith(".keras"):
        archive = zipfile.ZipFile(path, "r")
        try:
            return saving_lib.H5IOStore(saving_lib._VARS_FNAME_H5, archive=archive, mode="r"), archive
        except BaseException:
            archive.close()
            raise
    if path.endswith(".weights.h5"):
        return saving_lib.H5IOStore(path, mode="r"), None
    raise ValueError(f"{path!r} is neither a .keras file nor a .weights.h5 file; pass what model.save() or "
                     f"model.save_weights() wrote")


def _read_averages(filepath) -> list[dict] | None:
    """The averages saved in ``filepath``, or None when it holds none; ValueError naming the file when
    Keras cannot read it (truncated, empty, another format: as Keras's load_model) or its average is damaged."""
    import zipfile

    path = os.fspath(filepath)
    try:
        store, archive = _open_store(path)
        try:
            entry = store.get(_ATTR)
            return _decode(entry, repr(path)) if len(entry.keys()) else None
        finally:
            store.close()
            if archive is not None:
                archive.close()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as err:
        kind = ".keras" if path.endswith(".keras") else ".weights.h5"
        raise ValueError(f"{path!r} is not a {kind} file Keras can read ({type(err).__name__}: {err}): it is "
                         f"truncated, empty or of another format; pass a file model.save() or model.save_weights() "
                         f"wrote. Nothing was loaded.") from err


def load_average(model, filepath: str | os.PathLike) -> None:
    """Put the ``WeightEMA`` average(s) saved in ``filepath`` on ``model``.

    ``filepath`` is a ``.keras`` file (``model.save``, ``ModelCheckpoint``) or a ``.weights.h5`` file
    (``model.save_weights``, ``ModelCheckpoint(save_weights_only=True)``). On a model whose
    ``WeightEMA`` has started, the average goes into it; otherwise it waits on the model for the
    next ``WeightEMA`` made on it, which resumes from it when ``fit`` starts, and
    :func:`averaged_weights` reads it. Only the average is read: the model's weights and optimizer
    are left as they are (``keras.saving.load_model`` / ``model.load_weights`` load those).

    Raises:
        ValueError: the file is not one Keras can read (truncated, empty, another format), or holds
            no average, a damaged one (non-finite arrays, an unreadable schedule state), or one that
            does not fit the model (another architecture, another backend, another number of
            ``WeightEMA`` callbacks): nothing is changed then.
    """
    entries = _read_averages(filepath)
    if entries is None:
        raise ValueError(f"{os.fspath(filepath)!r} holds no WeightEMA average (it was saved from a model that "
                         f"had none); nothing to load")
    holder = vars(model).get(_ATTR)
    made = holder is None
    holder = _saved_averages(model, create=True)
    try:
        holder.load(entries, repr(os.fspath(filepath)))
    except BaseException:
        if made:
            _detach(model)
        raise


def load_model(filepath: str | os.PathLike, custom_objects=None, compile: bool = True, safe_mode: bool = True,
               **kwargs):
    """``keras.saving.load_model`` that also restores the ``WeightEMA`` average saved with the model.

    The returned model carries the saved average (if the file holds one): a ``WeightEMA`` made for
    the next ``fit`` resumes from it, bit for bit (give it the same options), and
    :func:`averaged_weights` reads it for evaluation or export. The average needs no
    ``custom_objects`` and survives ``compile=False`` (Keras's ``use_ema`` average, an optimizer
    variable, does not). The arguments are Keras's.

    Raises:
        ValueError: the file is not one Keras can read, or its average is unreadable or damaged
            (non-finite arrays, an unreadable schedule state): Keras's model is not built then.
    """
    entries = _read_averages(filepath)                    # refused before Keras builds anything
    model = keras.saving.load_model(filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode,
                                    **kwargs)
    if entries is not None:
        _saved_averages(model, create=True).load(entries, repr(os.fspath(filepath)))
    return model


def averaged_weights(model, index: int = 0) -> list[np.ndarray]:
    """The average of ``model``'s ``index``-th ``WeightEMA``, one NumPy array per variable of
    ``model.trainable_variables`` (in their dtypes): from the live callback, or as loaded by
    :func:`load_model` / :func:`load_average`. A variable the EMA does not average (torch's
    ``exclude=``) has its current value. Put it into the model for evaluation or export with
    ``for v, a in zip(model.trainable_variables, averaged_weights(model)): v.assign(a)``.

    Raises:
        ValueError: the model carries no such average.
    """
    holder = vars(model).get(_ATTR)
    entries = holder.entries() if holder is not None else []
    if not 0 <= index < len(entries):
        raise ValueError(f"this model carries {len(entries)} WeightEMA average(s), so none at index {index}; run fit "
                         f"with a WeightEMA callback, or load one with fastema.keras.load_model / load_average")
    averaged = entries[index]["averaged"]
    out = []
    for i, v in enumerate(model.trainable_variables):
        a = averaged.get(f"trainable/{i}")
        dtype = keras.backend.standardize_dtype(v.dtype)
        if a is None:
            out.append(np.asarray(keras.ops.convert_to_numpy(v)))
            continue
        row = _to_numpy(a)[0]
        if dtype == "bfloat16":
            import ml_dtypes

            out.append(row.astype(ml_dtypes.bfloat16))
        else:
            out.append(row.astype(dtype))
    return out
