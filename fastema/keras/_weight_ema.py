"""WeightEMA: an EMA of a Keras model's weights during ``fit``, on the backend's face
(fastema.torch, .tensorflow or .jax), swapped in for validation; the guard that puts the raw
weights back when an exception escapes the validation; what each backend's EMA refuses.

Its average goes into the model's files through :mod:`fastema.keras._saving`.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any

import keras

from ..average import EMAOptions
from ._entries import _named_state, refuse_poisoned, saved_variables
from ._jax import _JaxModelEMA
from ._saving import _detach, _saved_averages

_DEFAULT = object()        # WeightEMA's decay not given (the default changed in 0.2: a warning says so for one release)


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
    ``use_ema(ema_momentum=d)`` does, give ``decay=PowerWarmup(d, min_decay=d)``: the first update
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
            first is swapped in); or a schedule
            of :mod:`fastema.schedules` (``decay=`` of :class:`fastema.average.EMAOptions`).
        validate_with_ema: swap the EMA in for the validation inside ``fit`` (and back after).
        write_at_end: write the EMA into the model when ``fit`` ends (Keras's ``use_ema``
            default); otherwise the model keeps its raw weights and :attr:`ema` has the average.
        allow_nonfinite: resume, swap in and write into the model an average holding inf or NaN
            (False: refused, naming its tensors; see :meth:`repair_nonfinite`); a
            ``model.load_weights`` into this callback loads one too.
        **ema_kwargs: the options of the backend's EMA (:class:`fastema.average.EMAOptions`:
            ``debias=``, ``update_every=``, ``shadow_dtype=``...), the
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

    **An average that inf or NaN reached** (``skip_nonfinite`` off, an older file) is named in a
    warning whenever it is saved. The validation swap, ``write_at_end``, a resume and the readers of
    the model's files refuse it, naming its tensors, until :meth:`repair_nonfinite` resets them from
    the model's weights (``allow_nonfinite=True`` here, and to :func:`load_model` /
    :func:`load_average`, loads it first), on every backend.
    """

    def __init__(self, decay=_DEFAULT, *, validate_with_ema: bool = True,
                 write_at_end: bool = False, allow_nonfinite: bool = False, **ema_kwargs):
        super().__init__()
        if not isinstance(allow_nonfinite, bool):
            raise TypeError(f"allow_nonfinite must be True or False, got {allow_nonfinite!r}")
        options, selection = EMAOptions.split(ema_kwargs)
        if decay is _DEFAULT:
            decay = None
            warnings.warn("fastema.keras.WeightEMA's default decay is now 0.9999, as every fastema EMA's (it was "
                          "0.999 before 0.2); pass decay=0.999 to keep the old average", FutureWarning, stacklevel=2)
        _check_for_backend(EMAOptions.of(decay, **options), selection)   # refused now, not when fit starts
        self.decay, self.validate_with_ema, self.write_at_end = decay, validate_with_ema, write_at_end
        self.allow_nonfinite = allow_nonfinite
        self.ema_kwargs = ema_kwargs
        self.ema: Any = None                                 # made when fit starts
        self._owner = None
        self._pending: dict | None = None
        self._fitting = False
        self.averaged_variables: list = []       # what the EMA averages (TensorFlow, JAX): _entries

    def _make(self):
        backend = keras.backend.backend()
        # The average this callback resumes from: a state_dict() given to load_state_dict(), else
        # the one saved with the model (load_model / load_average / load_weights) for this
        # callback's place. A saved one is resumed over the variables it holds averages of (as the
        # live callback went on averaging them, whatever was frozen or unfrozen since), the others
        # over the trainable variables of now.
        saved = _saved_averages(self.model, create=True)
        slot = len(saved.this_fit())
        pending = saved.pending[slot] if slot < len(saved.pending) else None
        from_file = pending if self._pending is None else None
        self.averaged_variables = (list(self.model.trainable_variables) if from_file is None
                                   else saved_variables(self.model, from_file))
        if backend == "torch":
            ema = self._torch_ema(from_file)
        elif backend == "tensorflow":
            from ..tensorflow import EMA

            ema = EMA(self.averaged_variables, self.decay, **self.ema_kwargs)
        elif backend == "jax":
            ema = _JaxModelEMA(self.model, self.averaged_variables, self.decay, **self.ema_kwargs)
        else:
            raise RuntimeError(f"fastema.keras.WeightEMA runs on the torch, tensorflow and jax backends; "
                               f"this Keras runs on {backend!r}")
        ema.allow_nonfinite = self.allow_nonfinite     # its resume, its swaps, write_at_end
        self.ema = ema
        try:
            if self._pending is not None:
                ema.load_state_dict(self._pending)
            elif from_file is not None:
                refuse_poisoned(from_file, self.allow_nonfinite)
                state = _named_state(self, from_file)     # its options checked there, saying what to do
                try:
                    ema.load_state_dict(state)
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

    def _torch_ema(self, entry: dict | None):
        # Keras layers are torch modules here: average the trainable variables, copy the others
        # along; resuming a saved ``entry``: average and copy what it does (its layers frozen then).
        from ..torch import EMA

        model = self.model
        named = dict(model.named_parameters())
        by_id = {id(p): n for n, p in named.items()}
        frozen_ids = {id(v.value) for v in model.non_trainable_variables}
        if entry is not None:
            frozen_ids -= {id(v.value) for v in saved_variables(model, entry)}
            frozen_ids |= {id(v.value) for v in saved_variables(model, entry, "copied")}
        frozen = [by_id[id(v.value)] for v in model.variables
                  if id(v.value) in by_id and id(v.value) in frozen_ids]
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
        if hasattr(self.ema, "new_fit"):     # JAX: its variables' places in this fit's state
            self.ema.new_fit()
        self._fitting = True
        _guard_evaluate(self)

    def on_train_batch_end(self, batch, logs=None):
        self.ema.update()

    def on_test_begin(self, logs=None):
        if self._fitting and self.validate_with_ema and not self.ema.swapped:
            self.ema.swap()

    def on_test_end(self, logs=None):
        if self._fitting:
            _swap_back(self)

    def on_train_end(self, logs=None):
        self._fitting = False
        _unguard_evaluate(self.model)
        _swap_back(self)                                     # validation was cut short
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

    def repair_nonfinite(self) -> list[str]:
        """Reset each averaged tensor (and row) holding inf or NaN from the model's weights, on
        every backend, every other one left bit for bit, and return their names (the torch backend:
        :meth:`fastema.torch.EMA.repair_nonfinite`; TensorFlow and JAX: the trainable variables,
        ``fit``'s newest ones on JAX); e.g. after a resume with ``allow_nonfinite=True``."""
        if self.ema is None:
            raise RuntimeError("WeightEMA has no EMA yet: it is made when fit() starts")
        return self.ema.repair_nonfinite()

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


def _swap_back(callback: WeightEMA) -> None:
    """Every WeightEMA of ``callback``'s ``fit`` whose average is in the model swapped back, the
    last one swapped in first. Keras calls ``on_test_begin`` and ``on_test_end`` both in the
    callbacks' order: a second WeightEMA swapped in over the first one's average holds that
    average as its raw weights, and swapping the first one back first left it in the model (and
    each one's shadow with the other's weights)."""
    holder = _saved_averages(callback.model)
    fitting = holder.this_fit() if holder is not None else []
    for cb in reversed(fitting if callback in fitting else fitting + [callback]):
        if cb.ema is not None and cb.ema.swapped:
            cb.ema.swap()


def _unguard_evaluate(model) -> None:
    """Remove the guard of :func:`_guard_evaluate` (and nothing else)."""
    if hasattr(vars(model).get("evaluate"), "_fastema_callbacks"):
        del vars(model)["evaluate"]


def _check_for_backend(options: EMAOptions, selection: dict) -> None:
    """Refuse, by name, what the EMA of this Keras backend cannot run."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from ..tensorflow import REFUSED
    elif backend == "jax":
        from ..jax import REFUSED
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
