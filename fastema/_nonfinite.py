"""An average that inf or NaN reached, in every face's words (``docs/guides/nonfinite.md``): found
in a shadow on its device (:func:`scan`), named (:func:`named`), refused where it would be handed
out as a model (:func:`refusal`), and, where a load is refused for it, the way to load it all the
same and repair it (:func:`held`, :func:`load_advice`). One wording for each of these rules,
whatever the face (the torch faces, torchtitan's, the JAX and TensorFlow faces, Keras's files):
each face decides when; the words and the scan are here. Framework-free: the shadow's own
arrays, through the boundary.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import _backends
from .ops import flag_nonfinite_

__all__ = ["RECORD", "finite_as", "held", "load_advice", "named", "refusal", "scan"]

RECORD = "nonfinite"      # a checkpoint's entry: the averaged tensors holding inf or NaN (info)
_SHOWN = 8                # tensors a message names (then how many more)


def named(names: Sequence[str], found: dict | None = None) -> str:
    """``names`` for a message: the first few (with their rows from ``found``, ``name -> rows``),
    then how many more."""
    def one(n: str) -> str:
        rows = None if found is None else found[n]
        if not rows:
            return repr(n)
        return f"{n!r} (row{'s' * (len(rows) > 1)} {', '.join(map(str, rows))})"

    shown = ", ".join(one(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def refusal(call: str, which: str, names: Sequence[str]) -> str:
    """The refusal of ``call`` (``"fastema.torch.EMA.swap()"``), which would hand out ``which``
    (``"the average"``, ``"copy 'decay_0p9'"``) as a model while it holds inf or NaN in
    ``names``."""
    return (f"{call}: {which} holds inf or NaN in {named(names)}: it would hand out a model that "
            f"computes NaN. Call repair_nonfinite() to reset those tensors from the live weights, "
            f"or pass allow_nonfinite=True (or set ema.allow_nonfinite = True) to use it as it is. "
            f"Nothing was written.")


def held(names: Sequence[str], beyond: dict[str, str], part: str = "averaged") -> str:
    """What a checkpoint's ``part`` (averaged or copied) ``names`` hold, for a refused load: inf or
    NaN, and, for those of ``beyond`` (``name -> the average's dtype``), finite in the checkpoint
    but not once converted."""
    out = f"{part} {named(names)} hold{'s' * (len(names) == 1)} inf or NaN"
    if beyond:
        out += (f" as it lands ({named(list(beyond))} finite in the checkpoint but past the range "
                f"of the average's {', '.join(sorted(set(beyond.values())))}: inf once converted)")
    return out


def load_advice(setting: str) -> str:
    """What a load refused for an average holding inf or NaN says to do: load it all the same, then
    repair it. ``setting``: where else the permission is given (the setting a load another library
    makes reads)."""
    return (f"To load it all the same and repair it, pass allow_nonfinite=True ({setting}), then "
            f"call repair_nonfinite(), which resets those tensors from the live weights.")


def finite_as(a: np.ndarray, dtype: Any) -> bool:
    """Whether host array ``a`` is finite as it lands in ``dtype`` (the average's: a float64 1e300
    lands in a float32 average as inf, a float32 1e5 in a float16 one)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.all(np.isfinite(np.asarray(a).astype(dtype, copy=False))))


def scan(avg: Any, kept: dict, rows: Sequence[int] | None = None,
         new_flag: Callable[[Any], Any] = _backends.new_flag,
         valid: Mapping[str, int] | None = None) -> dict[str, list[int]]:
    """``name -> rows`` of the shadow ``avg`` (this rank's part of it) holding inf or NaN, in its
    order (``rows``: the rows looked at; None: every row, BEMA's state rows too). One launch a group
    over its whole buffer (its own, kept: ``avg.scan_rows``; else :func:`fastema.flag_nonfinite_`),
    one host read a device; where a group's flag is set, one launch a tensor and row and one more
    read. ``kept``: ``device -> flag``, the first pass's flags, made here once
    (``new_flag(group)``). ``valid``: ``name -> the elements of its last dimension that hold
    values`` (a ZeRO-3 partition's, before its padding: memory DeepSpeed never writes, which may
    hold a NaN no one computes with): the rest is never named.
    Nothing is written but the flags. At a save, an export, a swap in, a repair: never per step."""
    avg.join()                                     # an offloaded average's folds first
    rows = list(range(avg.rows)) if rows is None else list(rows)
    flags: dict = {}
    for g in avg.layout.groups:
        if g.device not in flags:
            flag = kept.get(g.device)
            if flag is None:
                flag = kept[g.device] = new_flag(g)
            _backends.zero_(flag)
            flags[g.device] = flag
    if not avg.scan_rows(flags):                   # its own kept launches, else ops
        for g in avg.layout.groups:
            if g.buffer is not None and _size(g.buffer):
                flag_nonfinite_(flags[g.device], g.buffer)     # the whole buffer, every row
    hit = {d for d, f in flags.items() if _backends.to_host(f)[0]}    # one host read a device
    where: dict = {}                               # group -> [(position, row, view)]
    for g in avg.layout.groups:
        if g.device not in hit:
            continue
        for pos in g.members:
            for r in rows:
                view = avg.view(pos, r)
                if valid is not None and avg.names[pos] in valid:
                    view = view[..., :valid[avg.names[pos]]]
                if _size(view):
                    where.setdefault(g, []).append((pos, r, view))
    found: dict[int, list[int]] = {}
    for g, items in where.items():
        marks = _backends.zeros((g.framework, g.device), len(items), np.int32)
        for k, (_, _, view) in enumerate(items):
            flag_nonfinite_(marks[k:k + 1], view)      # one launch a tensor and row
        for at in np.flatnonzero(_backends.to_host(marks)).tolist():
            pos, r, _ = items[at]
            found.setdefault(pos, []).append(r)
    return {avg.names[p]: sorted(found[p]) for p in sorted(found)}


def _size(a: Any) -> int:
    """Elements of a shadow's view (a torch tensor, a NumPy or Numba array)."""
    return int(np.prod(a.shape))
