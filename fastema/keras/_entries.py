"""A WeightEMA's average as Keras files hold it (an "entry"): its ``state_dict()`` with the arrays
keyed by the model's structure (``variables/3``: ``model.variables[3]``, a place no layer frozen or
unfrozen moves) instead of by name, the way back to the names of a live callback's EMA, and the
checks of an entry read from a file (damage that needs no model; fit to a model) before anything is
kept.
"""
from __future__ import annotations

from typing import Any, Protocol

import keras
import numpy as np

from .._checkpoint_format import GROUPS, load_refused
from .._checks import MAX_DECAYS, shadow_problems
from .._nonfinite import finite_as, load_advice, named
from ..average import Plan


class _Live(Protocol):
    """What the file side reads of a live ``WeightEMA`` (:mod:`fastema.keras._weight_ema`): the model it
    follows, its EMA (None before ``fit`` starts), whether a ``fit`` of it has started and whether
    it takes an average holding inf or NaN."""

    model: Any
    ema: Any
    _fitting: bool
    allow_nonfinite: bool
    averaged_variables: list      # TensorFlow and JAX: the variables the EMA averages, in its order


_KEY = "variables/"             # an array's key in a file: its variable's place in model.variables


def variable_keys(model) -> dict[int, str]:
    """id of each of ``model.variables`` (on torch: of its torch parameter too) -> its key in a
    file, ``variables/i``: ``model.variables`` lists every variable whatever is frozen, in the
    model's structure (layers frozen or unfrozen since a file was written keep their places)."""
    keys: dict[int, str] = {}
    for i, v in enumerate(model.variables):
        keys.setdefault(id(v), f"{_KEY}{i}")
        keys.setdefault(id(getattr(v, "value", v)), f"{_KEY}{i}")
    return keys


def saved_variables(model, entry: dict, group: str = "averaged") -> list:
    """The variables of ``model`` that a saved ``entry`` holds ``group``'s arrays of, in its order
    (a WeightEMA resuming it averages those, as the live callback went on averaging them)."""
    variables = model.variables
    return [variables[int(k[len(_KEY):])] for k in (entry.get(group) or {}) if k.startswith(_KEY)]


def _structural_keys(callback: _Live, state: dict) -> dict[str, str]:
    """The state_dict()'s array names -> their keys in a file (``variables/i``; ``name:`` + the
    name of one that is no variable of the model)."""
    model = callback.model
    index = variable_keys(model)
    if keras.backend.backend() == "torch":                 # names of torch parameters: by identity
        named = {n for g in GROUPS for n in (state.get(g) or {})}      # (torch lists a parameter under aliases)
        return {n: index[id(p)] for n, p in model.named_parameters(remove_duplicate=False)
                if id(p) in index and n in named}
    # TensorFlow and JAX: the EMA's names, in the order of the variables it averages
    pairs = zip(state.get("averaged", {}), callback.averaged_variables)
    return {n: index.get(id(v), "name:" + n) for n, v in pairs}


def _structural_state(callback: _Live) -> dict:
    """``callback``'s state_dict() with its arrays keyed by the model's structure."""
    state = callback.ema.state_dict()
    keys = _structural_keys(callback, state)
    out = dict(state)
    for g in GROUPS:
        if isinstance(state.get(g), dict):
            out[g] = {keys.get(n, "name:" + n): v for n, v in state[g].items()}
    return out


def _named_state(callback: _Live, entry: dict) -> dict:
    """A saved ``entry`` as ``callback.ema.load_state_dict`` takes it: arrays under this model's names
    (torch tensors on the torch backend)."""
    if entry.get("backend", keras.backend.backend()) != keras.backend.backend():
        raise ValueError(f"the WeightEMA average was saved on the {entry['backend']} backend and this Keras runs on "
                         f"{keras.backend.backend()!r}; the EMAs' checkpoints differ by backend: load it with "
                         f"KERAS_BACKEND={entry['backend']}")
    live = callback.ema.state_dict()
    keys = _structural_keys(callback, live)
    mine = {g: {keys.get(n, n) for n in live.get(g) or {}} for g in GROUPS}
    _refuse_other_variables(callback.model, entry, mine)
    names = {s: n for n, s in keys.items()}
    out = {k: v for k, v in entry.items() if k != "backend"}
    for g in GROUPS:
        if isinstance(entry.get(g), dict):
            out[g] = {names.get(s, s[5:] if s.startswith("name:") else s): _to_backend(a)
                      for s, a in entry[g].items()}
    _refuse_other_options(callback.ema._core, out)      # a live load_weights too (it took the file's decay)
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


def _damage(entry: dict, place: int) -> list[str]:
    """What the EMA's own checkpoint checks find in a saved average before any EMA is made: its plan
    state (``Plan.check_state``, with as many decays as it saved), rounding and seed
    (``shadow_problems``). Averages holding inf or NaN are :func:`poisoned`'s."""
    problems: list[str] = []
    n = len(entry["schedules"]) if isinstance(entry.get("schedules"), list) else 0
    if 1 <= n <= MAX_DECAYS:
        Plan([0.5] * n).check_state(entry, problems)
    else:
        problems.append(f"{n} schedules, for 1 to {MAX_DECAYS} averages")
    problems += shadow_problems(str(entry.get("shadow_dtype")), entry.get("rounding"), entry.get("seed"))
    return [f"average {place}: {p}" for p in problems]


def poisoned(entry: dict, row: int | None = None) -> list[str]:
    """The keys of a saved average's arrays holding inf or NaN as they land in its shadow's dtype
    (``row``: that row only; None: every row), in the model's order."""
    averaged = entry.get("averaged")
    dtype = _shadow_dtype(entry.get("shadow_dtype"))
    out = []
    for key, a in sorted(averaged.items() if isinstance(averaged, dict) else (), key=lambda kv: _natural(kv[0])):
        a = np.asarray(_to_numpy(a))
        if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
            if not finite_as(a if row is None or not a.ndim else a[row], dtype or a.dtype):
                out.append(key)
    return out


def _shadow_dtype(name: Any) -> Any:
    """The NumPy dtype of a saved ``shadow_dtype`` (None: ``"same"``, the arrays' own)."""
    if name in ("float32", "float16", "float64"):
        return np.dtype(name)
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return None


def refuse_poisoned(entry: dict, allow: bool,
                    what: str = "the average saved with this model") -> None:
    """ValueError naming the arrays of ``entry`` holding inf or NaN, unless ``allow``; with the way
    to load it all the same (``WeightEMA(allow_nonfinite=True)``) and repair it."""
    bad = [] if allow else poisoned(entry)
    if bad:
        raise load_refused(f"fastema.keras.WeightEMA: {what} holds inf or NaN in {named(bad)}. "
                           + load_advice("to WeightEMA, which resumes it when fit starts"))


def _problems(model, entry: dict, place: int) -> list[str]:
    """What keeps a saved ``entry`` from fitting ``model`` (checked before anything is kept)."""
    out = []
    backend = keras.backend.backend()
    if entry.get("backend") != backend:
        out.append(f"it was saved on the {entry.get('backend')} backend and this Keras runs on {backend!r} (the "
                   f"EMAs' checkpoints differ by backend: load it with KERAS_BACKEND={entry.get('backend')})")
        return out
    variables = model.variables
    averaged = entry.get("averaged")
    if not isinstance(averaged, dict) or not averaged:
        return [f"average {place} has no arrays"]
    for g in GROUPS:
        for key, a in sorted((entry.get(g) or {}).items(), key=lambda kv: _natural(kv[0])):
            if not key.startswith(_KEY):
                continue                                    # by name (a torch buffer): the EMA checks it
            i = key[len(_KEY):]
            if not i.isdecimal() or int(i) >= len(variables):
                out.append(f"{key} is saved but the model has {len(variables)} variables")
                continue
            shape = tuple(variables[int(i)].shape)
            got = tuple(np.shape(a))[1:] if g == "averaged" else tuple(np.shape(a))
            if got != shape:
                path = variables[int(i)].path
                out.append(f"{key} ({path}) has shape {shape}, the saved one {got}")
    return out


def _refuse_other_variables(model, entry: dict, live: dict[str, set]) -> None:
    """ValueError naming (by path) the variables a saved ``entry`` holds an average (or copy) of
    that a live callback does not, and those it does that the entry has none of (``live``: each
    group's keys of the callback's EMA); e.g. a file written with other layers frozen when the
    callback's first fit started."""
    variables = model.variables

    def path(key: str) -> str:
        i = key[len(_KEY):]
        return variables[int(i)].path if i.isdecimal() and int(i) < len(variables) else key

    def paths(keys) -> str:
        return ", ".join(path(k) for k in sorted(keys, key=_natural))

    problems = []
    for g, verb in (("averaged", "averages"), ("copied", "copies")):
        saved = {k for k in entry.get(g) or {} if k.startswith(_KEY)}
        mine = {k for k in live.get(g, ()) if k.startswith(_KEY)}
        if saved - mine:
            problems.append(f"it {verb} {paths(saved - mine)}, which this callback's EMA does not")
        if mine - saved:
            problems.append(f"this callback's EMA {verb} {paths(mine - saved)}, which it does not")
    if problems:
        raise ValueError(
            "fastema.keras.WeightEMA: the average saved with this model is not of the variables "
            "this callback's EMA averages (the layers frozen when its first fit started differ): "
            + "; ".join(problems) + ". Load it before the callback's first fit (load_model or "
            "load_average, then a new WeightEMA resumes it over the saved variables); nothing "
            "was loaded.")


def other_version(version, source: str, current: int) -> str:
    """What a file's average of another format ``version`` than ``current`` is refused with."""
    if version != 1 or type(version) is not int:                       # (True == 1)
        return (f"the WeightEMA average in {source} has version {version!r}; this fastema reads "
                f"version {current}: upgrade fastema.")
    return (f"the WeightEMA average in {source} has version 1; this fastema reads version "
            f"{current}: version 1 (development versions of fastema 0.2) keyed each average by its "
            "place among the trainable variables, which a layer frozen or unfrozen since moves; "
            "load the model with keras.saving.load_model (its weights; not the average) and start "
            "a new WeightEMA.")


def averaged_rows(model, averaged: dict) -> list[np.ndarray]:
    """Row 0 of the saved average ``averaged`` of each of ``model.trainable_variables`` (found by
    its key), in the variable's dtype; a variable without one: its current value."""
    keys, out = variable_keys(model), []
    for v in model.trainable_variables:
        a = averaged.get(keys[id(v)])
        dtype = keras.backend.standardize_dtype(v.dtype)
        if a is None:
            out.append(np.asarray(keras.ops.convert_to_numpy(v)))
        elif dtype == "bfloat16":
            import ml_dtypes

            out.append(_to_numpy(a)[0].astype(ml_dtypes.bfloat16))
        else:
            out.append(_to_numpy(a)[0].astype(dtype))
    return out


def _natural(key: str) -> tuple:
    kind, _, i = key.partition("/")
    return (kind, int(i)) if i.isdecimal() else (kind, -1, i)


def _refuse_other_options(core, state: dict) -> None:
    """ValueError naming what a saved average was made with that this callback's EMA was not: its
    decays (schedules), cadence and shadow dtype, which the EMA's own ``load_state_dict`` takes from
    the state (a resume from a file must continue the average it holds, with the callback's options)."""
    dtype = state.get("shadow_dtype")
    other = dtype is not None and str(dtype) != str(core.shadow_dtype)
    core.plan.refuse_other_options(state, "WeightEMA",
                                   (f"a {dtype} shadow where this callback's is {core.shadow_dtype}",) if other else ())
