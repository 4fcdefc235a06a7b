"""A copy that inf or NaN reached (a firing read a NaN weight, or a load allowed it): named at every
save, refused where a copy is handed out (:func:`~fastema.torchtitan.export_hf`,
``averaged_state_dict()``), repaired from the live weights (``ema.repair_nonfinite()``): the torch
face's rules (``docs/guides/nonfinite.md``) over this face's one shadow. Where the tracked tensors
are sharded, a refusal and a repair are agreed over their mesh (one small exchange: every rank the
same tensors, the same error); a save makes no collective (each rank names its own part)."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

from .._nonfinite import RECORD, named, refusal
from ..torch import dcp_loading, found_together, mesh_findings, reset_nonfinite, scan_nonfinite
from ._state import mesh_groups

EMA = Any                 # a fastema.torchtitan.EMA (its module imports this one)

__all__ = ["RECORD", "found", "named", "record", "refuse", "repair"]


def found(ema: EMA, rows: Sequence[int] | None = None, agree: bool = True) -> dict[str, list[int]]:
    """``fqn -> copies`` (rows) holding inf or NaN: this rank's, or (``agree``, sharded tensors)
    every rank's of the mesh, agreed (a collective)."""
    mine = scan_nonfinite(ema.shadow, ema.nonfinite_flags, rows)
    groups = mesh_groups(ema.tracked) if agree else []
    if not groups:
        return mine
    union: dict[str, set] = {}
    for theirs in mesh_findings(mine, groups).values():
        for n, r in theirs.items():
            union.setdefault(n, set()).update(r)
    return {t.fqn: sorted(union[t.fqn]) for t in ema.tracked if t.fqn in union}


def refuse(ema: EMA, what: str, row: int, allow: bool | None) -> None:
    """ValueError naming the tensors whose copy ``row`` holds inf or NaN (on any rank of the
    mesh), where ``what`` would hand it out; nothing where allowed (``allow``; None:
    ``ema.allow_nonfinite``)."""
    if allow is not None and not isinstance(allow, bool):
        raise TypeError(f"allow_nonfinite must be True, False or None, got {allow!r}")
    if ema.allow_nonfinite if allow is None else allow:
        return
    bad = found(ema, [row])
    if bad:
        raise ValueError(refusal(f"fastema.torchtitan.{what}", f"copy {ema.keys[row]!r}",
                                 list(bad)))


def record(ema: EMA) -> list[str]:
    """The tracked names whose copies hold inf or NaN on this rank, named in a warning (a save:
    no collective); an empty list for a finite EMA, and for the template ``dcp.load`` fills (whose
    every key the checkpoint must hold)."""
    bad = found(ema, agree=False)
    if not bad:
        return []
    copies = sorted({ema.keys[r] for rows in bad.values() for r in rows})
    warnings.warn(f"fastema.torchtitan.EMA.state_dict(): the copies {copies} hold inf or NaN in "
                  f"{named(list(bad))}. The checkpoint keeps them as they are (its '{RECORD}' "
                  f"entry names them); export_hf() refuses them until ema.repair_nonfinite() "
                  f"resets those tensors from the live weights", RuntimeWarning, stacklevel=3)
    return [] if dcp_loading() else list(bad)


def repair(ema: EMA, follow: Callable[[], None]) -> list[str]:
    """See :meth:`fastema.torchtitan.EMA.repair_nonfinite` (``follow``: its check of the model)."""
    def find() -> dict:
        follow()
        return found(ema, agree=False)

    mine = found_together(find, mesh_groups(ema.tracked),
                          "fastema.torchtitan.EMA.repair_nonfinite()",
                          "every rank of the EMA's mesh calls repair_nonfinite() together",
                          [t.fqn for t in ema.tracked])
    reset_nonfinite(ema.shadow, mine)
    return list(mine)
