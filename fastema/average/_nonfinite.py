"""The engine's average that inf or NaN reached (the JAX and TensorFlow faces, Keras's averages on
those backends): the torch face's rules (``docs/guides/nonfinite.md``) over an
:class:`~fastema.average.Average`'s shadow, in the same words (:mod:`fastema._nonfinite`).

- :func:`found` finds the tensors (and rows) holding inf or NaN with the non-finite scan on the
  shadow's devices (one launch a group, one host read a device; more only where one is found): at
  a save, a swap in, a copy-out, a repair, never in ``update()``;
- :func:`refuse` raises, naming them, where the average would be handed out as a model (a swap in,
  ``copy_to()``, the face's read of the average) unless allowed (``allow_nonfinite=`` of the call,
  else the face's setting ``ema.allow_nonfinite``);
- :func:`repair` resets each (tensor, row) found from the live weights, rounded to the shadow's
  dtype; every other tensor and row is left bit for bit;
- :func:`saved` names them at a save (a warning; the checkpoint records them), :func:`checked_load`
  at a load (refused unless allowed, with the way to load it all the same and repair it).
"""
from __future__ import annotations

import warnings
from typing import Any, Protocol, Sequence

import numpy as np

from .. import _backends
from .._checkpoint_format import load_refused
from .._nonfinite import RECORD, finite_as, held, load_advice, named, refusal, scan

__all__ = ["allowed", "checked_load", "found", "refuse", "repair", "saved", "warn_loaded"]


class Core(Protocol):
    """What these rules read of an :class:`fastema.average.Average` (its module imports this one)."""

    format: str
    shadow: Any
    plan: Any
    allow_nonfinite: bool
    nonfinite_flags: dict

    @property
    def names(self) -> list: ...

    def check_row(self, row: int) -> None: ...


def allowed(core: Core, allow: bool | None) -> bool:
    """Whether a call given ``allow_nonfinite=allow`` (None: the face's setting) lets it through."""
    if allow is not None and not isinstance(allow, bool):
        raise TypeError(f"allow_nonfinite must be True, False or None, got {allow!r}")
    return core.allow_nonfinite if allow is None else allow


def found(core: Core, rows: Sequence[int] | None = None) -> dict[str, list[int]]:
    """``name -> shadow rows`` holding inf or NaN (``rows``: those looked at; None: every row)."""
    return scan(core.shadow, core.nonfinite_flags, rows)


def refuse(core: Core, what: str, row: int, allow: bool | None) -> None:
    """ValueError naming the tensors of average ``row`` that hold inf or NaN, where ``what``
    (``"swap()"``...) would hand it out as a model; nothing where allowed."""
    if allowed(core, allow):
        return
    core.check_row(row)
    bad = found(core, [row])
    if bad:
        which = "the average" if core.plan.rows == 1 else f"average {row}"
        raise ValueError(refusal(f"{core.format}.{what}", which, list(bad)))


def repair(core: Core, live: Sequence) -> list[str]:
    """Every (tensor, row) holding inf or NaN <- its live weights (``live``: the model's arrays in
    the shadow's source order, anything ``np.asarray`` reads), rounded to the shadow's dtype; the
    names reset."""
    bad = found(core)
    for name, rows in bad.items():
        slot = core.names.index(name)
        value = np.asarray(live[slot])
        for r in rows:
            _backends.copy_from_host(core.shadow.view(slot, r), value)
    return list(bad)


def saved(core: Core, averaged: dict) -> list[str]:
    """The tensors of a state's ``averaged`` host arrays holding inf or NaN, named in a warning."""
    bad = [n for n, a in averaged.items() if not np.all(np.isfinite(a))]
    if bad:
        warnings.warn(f"{core.format}.state_dict(): the average holds inf or NaN in "
                      f"{named(bad)}. The checkpoint keeps it as it is (its '{RECORD}' entry "
                      f"names them); swaps and copy_to() refuse it until repair_nonfinite() "
                      f"resets those tensors from the live weights (skip_nonfinite=True keeps a "
                      f"bad step out of the average)",
                      RuntimeWarning, stacklevel=3)
    return bad


def checked_load(core: Core, arrays: dict, problems: list[str],
                 allow: bool | None) -> list[str]:
    """The loaded ``arrays`` (``slot -> host array``) that are not finite as they land in the
    shadow's dtype: appended to ``problems``, or, where inf or NaN is all that is wrong, refused
    with the way to load it all the same; allowed, returned (loaded with :func:`warn_loaded`)."""
    bad, beyond = [], {}
    for s, a in arrays.items():
        dtype = core.shadow.view(s, 0).dtype
        if not finite_as(a, dtype):
            bad.append(core.names[s])
            if finite_as(a, a.dtype):       # finite in its own dtype, not in the average's
                beyond[core.names[s]] = np.dtype(dtype).name
    if not bad or allowed(core, allow):
        return bad
    if problems:
        problems.append(held(bad, beyond))
        return []
    raise load_refused(f"this {core.format} checkpoint's {held(bad, beyond)}. " + load_advice(
        "or set ema.allow_nonfinite = True before a load another library makes: a framework's "
        "checkpoint restore, a callback's resume"))


def warn_loaded(core: Core, bad: list[str]) -> None:
    """The warning of a load that let ``bad`` (holding inf or NaN) in."""
    warnings.warn(f"{core.format}.load_state_dict(): the average loaded holds inf or NaN in "
                  f"{named(bad)} (allow_nonfinite): swaps and copy_to() refuse it until "
                  f"repair_nonfinite() resets those tensors from the live weights",
                  RuntimeWarning, stacklevel=4)
