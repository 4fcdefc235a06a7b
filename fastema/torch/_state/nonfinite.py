"""An average that inf or NaN reached: found on the device, named at save, refused where it is
shipped or evaluated, repaired from the live weights.

``skip_nonfinite=True`` keeps a bad step out of the average on the device; an average that holds
inf or NaN all the same (loaded from a checkpoint, or updated with the guard off) stays so for good
(``lerp`` keeps a NaN). :class:`NonFinite` is one model average's watch over it:

- :meth:`NonFinite.local` finds the tensors (and rows) holding inf or NaN on this rank with the
  non-finite scan: one launch per group over its whole buffer (the shadow's own, kept:
  ``scan_rows``; else :func:`fastema.flag_nonfinite_`), then, only where a group's flag is set, one
  per tensor and row; one host read per device for each pass. A scan runs at a save, an export, a
  swap in, a copy-out or a repair, never in ``update()``;
- :meth:`NonFinite.refuse` raises, naming them, where the average would be shipped or evaluated,
  unless allowed (:attr:`NonFinite.allowed`: ``ema.allow_nonfinite``, or a call's
  ``allow_nonfinite=``, :meth:`NonFinite.allowing`). Called inside the read's agreement: on a
  split or sharded average one rank's refusal is every rank's (:mod:`.agree`);
- :meth:`NonFinite.saved` names them at a save (a warning; the checkpoint records them);
- :meth:`NonFinite.repair` resets each (tensor, row) found from the live weights, in place on the
  average's device; a split or sharded average's ranks agree on the tensors first
  (:func:`~.decisions.mesh_findings`), so every rank resets its part of the same tensors.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, ContextManager, Iterator, Sequence

import numpy as np
import torch

from ... import _backends
from ...ops import flag_nonfinite_
from .._placement.gather import flat
from .decisions import mesh_findings, refuse_together

__all__ = ["NonFinite", "RECORD", "named", "reset", "scan"]

RECORD = "nonfinite"      # the checkpoint's field: the averaged tensors holding inf or NaN
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


class NonFinite:
    """The non-finite watch of one model average (see the module).

    Args:
        side: the model side (its shadow ``avg``, the live weights, following the model).
        agreement: the average's agreement (the groups a sharded or split average spans).
    """

    def __init__(self, side: Any, agreement: Any):
        self.side, self.agreement = side, agreement
        self.kind = agreement.kind
        self.allowed = False                 # ema.allow_nonfinite: every check passes
        self._allow: bool | None = None      # a call's allow_nonfinite= (allowing())
        self._flags: dict = {}               # device -> the first pass's int32[1] flag, made once

    def allow(self, value: bool) -> None:
        """``ema.allow_nonfinite = value``."""
        if not isinstance(value, bool):
            raise TypeError(f"allow_nonfinite must be True or False, got {value!r}")
        self.allowed = value

    @contextlib.contextmanager
    def allowing(self, allow: bool | None) -> Iterator[None]:
        """The block's checks pass (``allow`` True) or check (False); None: :attr:`allowed` says."""
        if allow is not None and not isinstance(allow, bool):
            raise TypeError(f"allow_nonfinite must be True, False or None, got {allow!r}")
        before, self._allow = self._allow, allow
        try:
            yield
        finally:
            self._allow = before

    @contextlib.contextmanager
    def entering(self, block: ContextManager, allow: bool | None) -> Iterator[Any]:
        """``block`` (an evaluation block, :meth:`fastema.average.ModelSwap.block`) entered as
        :meth:`allowing` ``allow`` says (its swap in checks), left as it leaves."""
        with contextlib.ExitStack() as stack:
            with self.allowing(allow):
                value = stack.enter_context(block)
            yield value

    @property
    def checking(self) -> bool:
        """Whether a read checks the average now (not allowed by the call or the face)."""
        return not (self.allowed if self._allow is None else self._allow)

    # ------------------------------------------------------------ finding them

    def local(self, rows: Sequence[int] | None = None) -> dict[str, list[int]]:
        """``name -> shadow rows`` holding inf or NaN in this rank's part of the average (``rows``:
        the rows looked at; None: every shadow row, the state rows of BEMA too): :func:`scan`."""
        return scan(self.side.avg, self._flags, rows)

    # ------------------------------------------------------------ where it is shipped or evaluated

    def refuse(self, what: str, row: int) -> None:
        """ValueError naming the tensors of average ``row`` that hold inf or NaN on this rank, where
        ``what`` (``"swap()"``, ``"save()"``...) would ship or evaluate it; nothing unless
        :attr:`checking`. Called inside the read's agreement (every rank raises with it)."""
        if not self.checking:
            return
        found = self.local([row])
        if found:
            which = "the average" if self.side.avg.rows == 1 else f"average {row}"
            raise ValueError(
                f"{self.kind}.{what}: {which} holds inf or NaN in {named(list(found))}: it "
                f"would hand out a model that computes NaN. Call repair_nonfinite() to reset those "
                f"tensors from the live weights, or pass allow_nonfinite=True (or set "
                f"ema.allow_nonfinite = True) to use it as it is. Nothing was written.")

    def saved(self, gathered: bool = False) -> list[str]:
        """The averaged tensors holding inf or NaN in any row, named in a warning: what a checkpoint
        records (:data:`RECORD`). This rank's part of a sharded or split average (a save may run on
        one rank only: no collective), unless ``gathered`` (a gathered save, a collective already:
        every rank's, agreed)."""
        found = self.local()
        if gathered and self.agreement.groups():
            every = mesh_findings(found, self.agreement.groups())
            found = _union(every.values(), self.side.avg.names)
        if found:
            warnings.warn(
                f"{self.kind}.state_dict(): the average holds inf or NaN in "
                f"{named(list(found), found if self.side.avg.rows > 1 else None)}. The "
                f"checkpoint keeps it as it is (its '{RECORD}' entry names them); exports, swaps "
                f"and copy_to() refuse it until repair_nonfinite() resets those tensors from the "
                f"live weights (skip_nonfinite=True keeps a bad step out of the average)",
                RuntimeWarning, stacklevel=4)
        return list(found)

    # ------------------------------------------------------------ the repair

    def repair(self, swap: Any) -> list[str]:
        """Reset every (tensor, row) holding inf or NaN from the live weights (rounded to the
        shadow's dtype), in place on the average's device; return the tensors reset. Refused while
        ``swap`` (the swap state) has the average in the model. A sharded or split average's ranks
        agree first (a collective): every rank resets its part of the same tensors and returns the
        same names."""
        side, groups = self.side, self.agreement.groups()
        try:
            swap.refuse("repair_nonfinite()")
            side.settle()
            side.follow()                             # the live weights where they are now
            mine: dict[str, list[int]] = self.local()
        except Exception as err:
            if not groups:
                raise
            mesh_findings(({}, f"{type(err).__name__}: {err}"), groups)
            raise
        if groups:
            every = mesh_findings((mine, None), groups, waiting="every rank of the average calls "
                                                                "repair_nonfinite() together")
            refused = {r: e for r, (_, e) in every.items()}
            refuse_together(f"{self.kind}.repair_nonfinite()", refused)
            mine = _union([found for found, _ in every.values()], side.avg.names)
        reset(side.avg, mine)
        return list(mine)



def _union(founds, names: list) -> dict[str, list[int]]:
    """Every rank's ``name -> rows`` in one, in the average's order (``names``)."""
    union: dict[str, set] = {}
    for found in founds:
        for n, rows in found.items():
            union.setdefault(n, set()).update(rows)
    return {n: sorted(union[n]) for n in names if n in union}


def scan(avg: Any, kept: dict, rows: Sequence[int] | None = None) -> dict[str, list[int]]:
    """``name -> rows`` of the shadow ``avg`` (this rank's part of it) holding inf or NaN, in its
    order (``rows``: the rows looked at; None: every row). One launch a group over its whole
    buffer (:meth:`~fastema.FlatShadow.scan_rows`, else :func:`fastema.flag_nonfinite_`), one host
    read a device; where a group's flag is set, one launch a tensor and row and one more read.
    ``kept``: ``device -> flag``, the first pass's flags, made here once. Nothing is written but
    the flags."""
    avg.join()                                     # an offloaded average's folds first
    rows = list(range(avg.rows)) if rows is None else list(rows)
    flags: dict = {}
    for g in avg.layout.groups:
        if g.device not in flags:
            flag = kept.get(g.device)
            if flag is None:                       # kept: never an inference tensor
                with torch.inference_mode(False):
                    flag = kept[g.device] = _backends.new_flag(g)
            flag.zero_()                               # (a torch tensor: the torch face's)
            flags[g.device] = flag
    if not avg.scan_rows(flags):                   # its own kept launches, else ops
        for g in avg.layout.groups:
            if g.buffer is not None and g.buffer.numel():
                flag_nonfinite_(flags[g.device], g.buffer)     # the whole buffer, every row
    hit = {d for d, f in flags.items() if f.item()}   # one host read a device
    suspects = []
    for g in avg.layout.groups:
        if g.device in hit:
            suspects += [(g, pos) for pos in g.members]
    if not suspects:
        return {}
    where: dict = {}                               # group -> [(position, row, view)]
    for g, pos in suspects:
        for r in rows:
            view = avg.view(pos, r)
            if view.numel():
                where.setdefault(g, []).append((pos, r, view))
    found: dict[int, list[int]] = {}
    for g, items in where.items():
        marks = _backends.zeros((g.framework, g.device), len(items), np.int32)
        for k, (_, _, view) in enumerate(items):
            flag_nonfinite_(marks[k:k + 1], view)      # one launch a tensor and row
        for hit_at in np.flatnonzero(_backends.to_host(marks)).tolist():
            pos, r, _ = items[hit_at]
            found.setdefault(pos, []).append(r)
    return {avg.names[p]: sorted(found[p]) for p in sorted(found)}


def reset(avg: Any, found: dict[str, list[int]]) -> None:
    """Rows ``found`` (``name -> rows``) of the shadow ``avg`` <- their sources (the live
    weights, this rank's piece of them where ``avg`` is split), rounded to the shadow's dtype, on
    its device."""
    split = avg.group is not None                 # this rank keeps a piece of each tensor
    with torch.no_grad():
        for name, rows in found.items():
            pos = avg.names.index(name)
            live = avg.sources[pos]
            if split:
                _, first, count, _ = avg.layout.piece(pos)
                if not count:
                    continue
                live = flat(live)[first:first + count]
            for r in rows:
                avg.view(pos, r).copy_(live)
