"""The average in Keras's files: ``model.save``, ``save_weights`` and ``ModelCheckpoint`` write
every ``WeightEMA``'s state; :func:`load_model`, :func:`load_average` and ``model.load_weights``
read it back; :func:`averaged_weights` reads it without a callback.

Keras saves a model by walking its attributes: every ``KerasSaveable`` found there writes its arrays
with ``save_own_variables(store)`` and reads them back with ``load_own_variables(store)``
(keras/src/saving/saving_lib.py, ``_save_state`` / ``_load_state``). Keras's own ``use_ema`` rides
on that through optimizer variables, which a model loaded from its config re-creates because its
optimizer config says ``use_ema=True``. A WeightEMA's average is not in any config, so it is one
attribute of the model, ``_SavedAverages`` (set past Keras's and torch's attribute tracking: not a
layer, not a weight), that writes the EMAs' state_dict() when the file is written. Keras's
load_model re-creates the model from its config without that attribute and passes over the
average; load_model / load_average below read it back from the file.

In the file, under the attribute's name: ``header``, the JSON of every average (the one state codec,
:func:`fastema._state.to_parts`: each array ``{"__array__": i}``) as ``uint8``, and the arrays
``"0"``, ``"1"``, ... numbered across the averages.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import types
import warnings
import weakref

import keras
import numpy as np

from .._checkpoint_format import from_parts, load_refused, to_parts
from .._io.safe_files import open_regular, regular
from .._nonfinite import load_advice, named, refusal
from ._entries import (
    _damage,
    _Live,
    _named_state,
    _problems,
    _structural_state,
    _to_numpy,
    averaged_rows,
    other_version,
    poisoned,
)

# the model's attribute: the file's group of the average
_ATTR = "_fastema_weight_ema"
# 2: arrays keyed variables/i (model.variables); 1 (0.2's development versions): refused
_FORMAT, _VERSION = "fastema.keras.WeightEMA", 2
# a header past this is not one fastema wrote
_HEADER_BYTES = 16 << 20

# Keras 3's base of everything its files walk
try:
    from keras.src.saving.keras_saveable import KerasSaveable as _KerasSaveable
except ImportError:                                       # pragma: no cover - depends on the Keras release
    _KerasSaveable = object                               # type: ignore[assignment,misc]


class _SavedAverages(_KerasSaveable):
    """The averages of the ``WeightEMA`` callbacks of one model, as Keras's files carry them.

    ``callbacks`` are the live ones (their state is read when a file is written); ``pending`` the
    states read from a file for callbacks not made yet (by place: the ``i``-th ``WeightEMA`` of
    the next ``fit``, if it is a new one, resumes from ``pending[i]``; a callback of that ``fit``
    that already has its EMA keeps it, and a file loaded into it is in both). A state here is a
    state_dict() whose arrays are keyed by the model's structure (``variables/3``:
    ``model.variables[3]``, whatever is frozen), not by name, so a model of the same
    architecture with other layer names (a second model in one process) loads it, as Keras's own
    ``load_weights`` matches by structure.
    """

    def __init__(self) -> None:
        self.callbacks: list[_Live] = []
        self.pending: list[dict | None] = []

    # Keras walks dir(): nothing more in here to save
    def __dir__(self):
        return []

    # a copied model has no callback of its own
    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):                                  # (KerasSaveable's pickles a whole model)
        return type(self), ()

    def this_fit(self) -> list[_Live]:
        """The callbacks of the ``fit`` that is starting (those whose ``on_train_begin`` has
        run)."""
        return [cb for cb in self.callbacks if cb._fitting]

    def join(self, callback: _Live) -> None:
        """``callback`` starts a ``fit``: the file gets its average, with those of the other
        WeightEMAs of this ``fit``; the callbacks of an earlier ``fit`` that are not in this one are
        dropped (a new ``WeightEMA`` per ``fit`` call is the newest average, and the old ones are
        not kept alive)."""
        if callback not in self.callbacks or not callback._fitting:
            self.callbacks = [cb for cb in self.this_fit() if cb is not callback] + [callback]
        for i in range(min(len(self.callbacks), len(self.pending))):
            # a live callback holds that place's average now
            self.pending[i] = None

    def _obj_type(self) -> str:
        # Keras takes this to pick which attributes of a base class to skip when it walks dir(); it
        # accepts only its own kinds. Loss is the plainest of them (dir() here is empty anyway).
        return "Loss"

    def refuse_swapped(self) -> None:
        """RuntimeError while a live callback's average is swapped into the model (its weights are
        the average then, and a file would carry them as the raw weights)."""
        if any(cb.ema is not None and cb.ema.swapped for cb in self.callbacks):
            raise RuntimeError("fastema.keras.WeightEMA: the model is saved while the average is "
                               "swapped in (its weights are the average, not the raw ones); save "
                               "after the validation, or swap() back first. Nothing was written.")

    def entries(self) -> list[dict]:
        """Every average this model carries, in place order: live callbacks read now, the rest as
        loaded."""
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
        # numbered across the entries: one list for all
        arrays: list[np.ndarray] = []
        header = {"format": _FORMAT, "version": _VERSION, "backend": keras.backend.backend(),
                  "entries": [to_parts(e, arrays, host=_to_numpy, who="fastema.keras.WeightEMA")[0] for e in entries]}
        store["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        for i, a in enumerate(arrays):
            store[str(i)] = a

    def load_own_variables(self, store) -> None:
        """Keras's loading hook (``model.load_weights`` into a model with a ``WeightEMA``): the
        saved averages into the live callbacks, all or none."""
        if not len(store.keys()):
            if self.callbacks:
                warnings.warn("fastema.keras.WeightEMA: the weights file holds no average (it was "
                              "saved without a WeightEMA); the callback's average is "
                              "unchanged", RuntimeWarning, stacklevel=2)
            return
        allow = bool(self.callbacks) and all(cb.allow_nonfinite for cb in self.callbacks)
        self.load(_decode(store, allow=allow), "the file")

    def load(self, entries: list[dict], source: str) -> None:
        """``entries`` into the live callbacks (checked first; all load or none), or kept as pending
        for the callbacks to come when there are none; refused with nothing changed if they do not
        fit."""
        if self.callbacks:
            if len(entries) != len(self.callbacks):
                raise ValueError(f"{source} holds {len(entries)} WeightEMA average(s) and this "
                                 f"model has {len(self.callbacks)} WeightEMA callback(s); load it "
                                 "into a model with as many")
            states = [_named_state(cb, e) for cb, e in zip(self.callbacks, entries)]
            before = [cb.ema.state_dict() for cb in self.callbacks]
            done = 0
            try:
                for cb, state in zip(self.callbacks, states):
                    cb.ema.load_state_dict(state)
                    done += 1
            except BaseException:
                # the ones already loaded, as they were, bit for bit: an inf or NaN they held too
                # (refusing it would hide the error raised and keep the file's average)
                for cb, state in zip(self.callbacks[:done], before):
                    cb.ema.load_state_dict(state, allow_nonfinite=True)
                raise
            self.pending = list(entries)                    # and for new WeightEMAs of the next fit
            return
        model = _model_of(self)
        problems = [p for i, e in enumerate(entries) for p in _problems(model, e, i)]
        if problems:
            raise ValueError(f"{source} holds a WeightEMA average that does not fit this model: "
                             + "; ".join(problems[:6]) + "; load it into the model it was saved "
                                                         "with (same "
                             "architecture and backend)")
        self.pending = list(entries)


def _saved_averages(model, create: bool = False) -> _SavedAverages:
    holder = vars(model).get(_ATTR)
    if holder is None and create:
        holder = _SavedAverages()
        # not through Keras's or torch's attribute tracking
        object.__setattr__(model, _ATTR, holder)
        object.__setattr__(holder, "_model", weakref.ref(model))
        _guard_saves(model)
    return holder


_GUARDED = ("save", "save_weights", "load_weights")


def _guard_saves(model) -> None:
    """``model.save`` and ``model.save_weights`` refuse while an average is swapped in before Keras
    opens the file: Keras opens it for writing (truncating the file already there) before it walks
    the model, so a refusal from inside its walk (:meth:`_SavedAverages.entries`) would leave the
    user's previous file destroyed. ``model.load_weights`` into a model with live callbacks puts
    the weights back when it raises: Keras loads every layer before it raises what the average's
    hook refused. Instance attributes, bound methods (a deep copy of the model binds its own),
    that call the class's method; :func:`_detach` removes them."""
    for name in _GUARDED:
        method = getattr(type(model), name, None)
        # none, or someone else's (or ours already)
        if method is None or name in vars(model):
            continue

        @functools.wraps(method)
        def guarded(self, *args, _method=method, _load=name == "load_weights", **kwargs):
            holder = vars(self).get(_ATTR)
            if holder is not None and not _load:
                holder.refuse_swapped()
            kept = self.get_weights() if _load and holder is not None and holder.callbacks else None
            try:
                return _method(self, *args, **kwargs)
            except BaseException:
                if kept is not None:                      # refused: nothing changed
                    self.set_weights(kept)
                raise

        guarded._fastema_save_guard = True                # type: ignore[attr-defined]
        object.__setattr__(model, name, types.MethodType(guarded, model))


def _model_of(holder: _SavedAverages):
    ref = vars(holder).get("_model")
    return None if ref is None else ref()


def _detach(model) -> None:
    vars(model).pop(_ATTR, None)
    for name in _GUARDED:
        if getattr(getattr(vars(model).get(name), "__func__", None), "_fastema_save_guard", False):
            del vars(model)[name]


def _decode(store, source: str = "the file", allow: bool = False) -> list[dict]:
    """The entries of a saved header, their arrays read from ``store``; refused when it is not one,
    or when the EMA's own checks that need no model find it damaged (:func:`_damage`), or holding
    inf or NaN unless ``allow`` (``allow_nonfinite``)."""
    keys = set(store.keys())

    def bad(why: str):
        return load_refused(f"the WeightEMA average in {source} is unreadable ({why}); it is "
                            "damaged, or was not written by fastema.keras: load the model without "
                            "it (keras.saving.load_model).")

    if "header" not in keys:
        raise bad("no header")
    raw = np.asarray(store["header"])
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _HEADER_BYTES:
        raise bad(f"a header of dtype {raw.dtype} and shape {raw.shape}")
    try:
        header = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:      # (nested past the stack)
        raise bad(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise bad("the header names no fastema.keras.WeightEMA format")
    if type(header.get("version")) is not int or header.get("version") != _VERSION:      # True == 1
        raise load_refused(other_version(header.get("version"), source, _VERSION))
    entries = header.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise bad("no list of entries")

    def missing(i) -> ValueError:
        return bad(f"array {i!r} is missing")

    def fetch(i: int) -> np.ndarray:
        if str(i) not in keys:
            raise missing(i)
        return np.asarray(store[str(i)])

    out = [{**from_parts(e, fetch, missing), "backend": header.get("backend")} for e in entries]
    damage = [p for i, e in enumerate(out) for p in _damage(e, i)]
    nonfinite = [f"average {i}: {k} holds inf or NaN"
                 for i, e in enumerate(out) for k in poisoned(e)]
    if damage:
        raise bad("; ".join((damage + nonfinite)[:6]))
    if nonfinite and not allow:
        raise load_refused(f"the WeightEMA average in {source} holds inf or NaN ("
                           + "; ".join(nonfinite[:6]) + "). " + load_advice(
                               "to load_model or load_average; WeightEMA(allow_nonfinite=True) "
                               "for a model.load_weights into it"))
    return out


def _open_store(path: str, stack: contextlib.ExitStack):
    """Keras's reader of the weights of a ``.keras`` or ``.weights.h5`` file (closed with
    ``stack``), a regular file: a FIFO, device or folder named like one is refused by name, never
    opened (the ``.keras`` archive is read from :func:`~fastema._io.safe_files.open_regular`'s
    file; Keras's ``H5IOStore`` takes a path only, checked by ``regular()`` first)."""
    import zipfile

    from keras.src.saving import saving_lib

    if path.endswith(".keras"):
        archive = stack.enter_context(zipfile.ZipFile(stack.enter_context(open_regular(path)), "r"))
        store = saving_lib.H5IOStore(saving_lib._VARS_FNAME_H5, archive=archive, mode="r")
    elif path.endswith(".weights.h5"):
        regular(path)
        store = saving_lib.H5IOStore(path, mode="r")
    else:
        raise ValueError(f"{path!r} is neither a .keras file nor a .weights.h5 file; pass what "
                         "model.save() or model.save_weights() wrote")
    stack.callback(store.close)
    return store


def _read_averages(filepath, allow: bool = False) -> list[dict] | None:
    """The averages saved in ``filepath``, or None when it holds none; ValueError naming the file
    when Keras cannot read it (truncated, empty, another format: as Keras's load_model) or its
    average is damaged, or holds inf or NaN unless ``allow`` (then read with a warning)."""
    import zipfile

    path = os.fspath(filepath)
    if not isinstance(allow, bool):
        raise TypeError(f"allow_nonfinite must be True or False, got {allow!r}")
    try:
        with contextlib.ExitStack() as stack:
            entry = _open_store(path, stack).get(_ATTR)
            entries = _decode(entry, repr(path), allow) if len(entry.keys()) else None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as err:
        kind = ".keras" if path.endswith(".keras") else ".weights.h5"
        raise load_refused(f"{path!r} is not a {kind} file Keras can read ({type(err).__name__}: "
                           f"{err}): it is truncated, empty or of another format; pass a file "
                           "model.save() or model.save_weights() wrote.") from err
    bad = [k for e in entries or () for k in poisoned(e)]
    if bad:
        warnings.warn(f"fastema.keras: the WeightEMA average in {path!r} holds inf or NaN in "
                      f"{named(bad)} (allow_nonfinite): read as it is; a WeightEMA made "
                      f"with allow_nonfinite=True resumes it, then its repair_nonfinite() resets "
                      f"those tensors from the model's weights", RuntimeWarning, stacklevel=3)
    return entries


def load_average(model, filepath: str | os.PathLike, *, allow_nonfinite: bool = False) -> None:
    """Put the ``WeightEMA`` average(s) saved in ``filepath`` on ``model``.

    ``filepath`` is a ``.keras`` file (``model.save``, ``ModelCheckpoint``) or a ``.weights.h5``
    file (``model.save_weights``, ``ModelCheckpoint(save_weights_only=True)``). On a model whose
    ``WeightEMA`` has started, the average goes into it; otherwise it waits on the model for the
    next ``WeightEMA`` made on it, which resumes from it when ``fit`` starts, and
    :func:`averaged_weights` reads it. Only the average is read: the model's weights and optimizer
    are left as they are (``keras.saving.load_model`` / ``model.load_weights`` load those).

    An average holding inf or NaN is refused, naming its arrays, unless ``allow_nonfinite=True``
    (then read with a warning: a ``WeightEMA(allow_nonfinite=True)`` resumes it, and its
    ``repair_nonfinite()`` resets those tensors from the model's weights).

    Raises:
        ValueError: the file is not one Keras can read (truncated, empty, another format), or holds
            no average, a damaged one (an unreadable schedule state), one holding inf or NaN (unless
            allowed), or one that does not fit the model (another architecture, another backend,
            another number of ``WeightEMA`` callbacks): nothing is changed then.
    """
    entries = _read_averages(filepath, allow_nonfinite)
    if entries is None:
        raise ValueError(f"{os.fspath(filepath)!r} holds no WeightEMA average (it was saved from a "
                         "model that had none); nothing to load")
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
               *, allow_nonfinite: bool = False, **kwargs):
    """``keras.saving.load_model`` that also restores the ``WeightEMA`` average saved with the
    model.

    The returned model carries the saved average (if the file holds one): a ``WeightEMA`` made for
    the next ``fit`` resumes from it, bit for bit (give it the same options), and
    :func:`averaged_weights` reads it for evaluation or export. The average needs no
    ``custom_objects`` and survives ``compile=False`` (Keras's ``use_ema`` average, an optimizer
    variable, does not). The arguments are Keras's, but ``allow_nonfinite``: read an average holding
    inf or NaN (with a warning; see :func:`load_average`).

    Raises:
        ValueError: the file is not one Keras can read, or its average is unreadable or damaged
            (an unreadable schedule state), or holds inf or NaN (unless allowed): Keras's model is
            not built then.
    """
    entries = _read_averages(filepath, allow_nonfinite)   # refused before Keras builds anything
    model = keras.saving.load_model(filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode,
                                    **kwargs)
    if entries is not None:
        _saved_averages(model, create=True).load(entries, repr(os.fspath(filepath)))
    return model


def averaged_weights(model, index: int = 0, *, allow_nonfinite: bool = False) -> list[np.ndarray]:
    """The average of ``model``'s ``index``-th ``WeightEMA``, one NumPy array per variable of
    ``model.trainable_variables`` (in their dtypes): from the live callback, or as loaded by
    :func:`load_model` / :func:`load_average`. A variable the EMA does not average (torch's
    ``exclude=``) has its current value. Put it into the model for evaluation or export with
    ``for v, a in zip(model.trainable_variables, averaged_weights(model)): v.assign(a)``. An
    average holding inf or NaN is refused, naming its arrays, unless ``allow_nonfinite=True``.

    Raises:
        ValueError: the model carries no such average, or it holds inf or NaN (unless allowed).
    """
    holder = vars(model).get(_ATTR)
    entries = holder.entries() if holder is not None else []
    if not 0 <= index < len(entries):
        raise ValueError(f"this model carries {len(entries)} WeightEMA average(s), so none at "
                         f"index {index}; run fit with a WeightEMA callback, or load one with "
                         "fastema.keras.load_model / load_average")
    bad = [] if allow_nonfinite else poisoned(entries[index], row=0)
    if bad:
        raise ValueError(refusal("fastema.keras.averaged_weights()", f"average {index}", bad))
    return averaged_rows(model, entries[index]["averaged"])
