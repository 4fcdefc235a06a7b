"""What a fastema checkpoint must contain, checked in one place: the header every state dict
starts with (:func:`check_header`), the words of every refused load (:func:`load_refused`,
:func:`refuse_load`), and the one codec that lays an EMA ``state_dict()`` out in a file: a
JSON header and its arrays (:func:`to_parts` / :func:`from_parts`, arrays numbered from the
header; :func:`to_named` / :func:`from_named`, arrays named ``group/name`` beside it). The
Keras files, the transformers callback's safetensors file and TensorFlow checkpoints write
and read through it; model averages, framework EMAs, smoothers and trackers check their
headers here."""
from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable

import numpy as np

__all__ = ["GROUPS", "check_header", "from_named", "from_parts", "load_refused", "refuse_load", "to_named",
           "to_parts"]

#: The dicts of arrays an EMA ``state_dict()`` holds, keyed by name (torch: all three; JAX and
#: TensorFlow: ``averaged``). Everything else in a state dict is JSON.
GROUPS = ("averaged", "copied", "int_buffers")
_ARRAY = "__array__"                      # {"__array__": i}: the header's reference to the i-th array


def check_header(state, fmt: str, version: int | tuple, hint: str) -> None:
    """The one checkpoint header rule: ``state`` is a dict whose ``format`` is ``fmt`` and whose
    ``version`` is ``version`` (or one of them); else ValueError saying what it is and, with ``hint``,
    what to do.
    Every fastema checkpoint (model averages, framework EMAs, smoothers) starts with it."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a {fmt} state dict (format={found!r}); {hint}")
    versions = version if isinstance(version, tuple) else (version,)
    found = state.get("version")
    if isinstance(found, bool) or not isinstance(found, numbers.Integral) or found not in versions:
        raise ValueError(f"{fmt} checkpoint version {state.get('version')!r} is not supported "
                         f"(expected {' or '.join(map(str, versions))})")


def load_refused(message: str) -> ValueError:
    """The ValueError of a refused load: ``message`` (whole sentences, the last one's full stop
    included) and the words every loader ends with; the caller has written nothing yet."""
    return ValueError(f"{message} Nothing was loaded.")


def refuse_load(what: str, problems: list[str], against: str = "") -> None:
    """ValueError listing ``problems`` (when there are any) of a ``what`` checkpoint (``against``: what
    it was held against, e.g. ``" this model"``); the caller has written nothing yet, and the
    message says so."""
    if problems:
        raise load_refused(f"{what} checkpoint does not match{against}: " + "; ".join(problems) + ".")


def _is_array(value) -> bool:
    """An array of any framework (a shape and a dtype), not a NumPy scalar."""
    return isinstance(value, np.ndarray) or (hasattr(value, "shape") and hasattr(value, "dtype")
                                             and not isinstance(value, np.generic))


def _same(a):
    return a


def to_parts(state: Any, arrays: list | None = None, *, host: Callable = _same, who: str = "fastema",
             where: str = "state") -> tuple[Any, list]:
    """An EMA ``state_dict()`` as ``(header, arrays)``: the header is JSON (dicts with string keys,
    lists, numbers, strings, None) in which every array is ``{"__array__": i}``, ``i`` its place
    in ``arrays`` (where ``host(array)`` is appended). NumPy scalars become Python numbers and
    tuples lists. Pass ``arrays`` to number several states' arrays in one list (a Keras file holds
    every average of a model). TypeError naming the place (``who cannot save where[...]``) of a
    key that is not a string or of anything else.

    >>> to_parts({"calls": 2, "averaged": {"w": np.zeros(2)}})
    ({'calls': 2, 'averaged': {'w': {'__array__': 0}}}, [array([0., 0.])])
    """
    arrays = [] if arrays is None else arrays

    def encode(value, where: str):
        if isinstance(value, dict):
            for k in value:
                if not isinstance(k, str):
                    raise TypeError(f"{who} cannot save {where}: key {k!r} is not a string")
            return {k: encode(v, f"{where}[{k!r}]") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.generic):
            return value.item()
        if _is_array(value):
            arrays.append(host(value))
            return {_ARRAY: len(arrays) - 1}
        raise TypeError(f"{who} cannot save {where}: a {type(value).__name__}, not an array, number, string or "
                        f"container")

    return encode(state, where), arrays


def from_parts(header: Any, fetch: Callable[[int], Any], missing: Callable[[Any], Exception]) -> Any:
    """The state :func:`to_parts` made ``header`` of: each ``{"__array__": i}`` replaced by
    ``fetch(i)``; the exception ``missing(i)`` when ``i`` is not an array index (``fetch`` raises
    its own when it has no array ``i``)."""
    if isinstance(header, dict):
        if set(header) == {_ARRAY}:
            i = header[_ARRAY]
            if isinstance(i, bool) or not isinstance(i, int):
                raise missing(i)
            return fetch(i)
        return {k: from_parts(v, fetch, missing) for k, v in header.items()}
    if isinstance(header, list):
        return [from_parts(v, fetch, missing) for v in header]
    return header


def to_named(state: dict, *, host: Callable = _same, who: str = "fastema") -> tuple[dict, dict[str, Any]]:
    """An EMA ``state_dict()`` as a header (the state without :data:`GROUPS`, JSON as in
    :func:`to_parts`) and its arrays keyed ``"group/name"``, group by group in :data:`GROUPS`'
    order: the layout of files of named arrays (safetensors, a TensorFlow checkpoint's shadow)."""
    header, arrays = to_parts(state, host=host, who=who)
    named = {f"{g}/{name}": arrays[ref[_ARRAY]] for g in GROUPS if g in header for name, ref in header.pop(g).items()}
    return header, named


def from_named(header: dict, named: Iterable[tuple[str, Any]], where: str, groups: tuple = GROUPS) -> dict:
    """The state :func:`to_named` made ``header`` and ``named`` (``(key, array)`` pairs) of, with
    every group of ``groups`` (empty ones too); ValueError naming ``where`` for a key that is no
    ``group/name`` of them."""
    state = {**header, **{g: {} for g in groups}}
    for key, array in named:
        group, _, name = key.partition("/")
        if group not in groups or not name:
            raise ValueError(f"{where} holds an unexpected tensor {key!r}; the file is damaged")
        state[group][name] = array
    return state
