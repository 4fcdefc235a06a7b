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

import torch

from ... import _backends, _nonfinite
from ..._nonfinite import RECORD, named, refusal
from ..._shadow import WindowingShadow
from .._placement.gather import flat
from .decisions import found_together, joined, mesh_findings

__all__ = ["NonFinite", "RECORD", "named", "reset", "scan"]


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
        self._call: str | None = None        # the call a refusal names, not its own (entering())
        self._flags: dict = {}               # device -> the first pass's int32[1] flag, made once

    def allow(self, value: bool) -> None:
        """``ema.allow_nonfinite = value``."""
        if not isinstance(value, bool):
            raise TypeError(f"allow_nonfinite must be True or False, got {value!r}")
        self.allowed = value

    @contextlib.contextmanager
    def allowing(self, allow: bool | None) -> Iterator[None]:
        """The block's checks pass (``allow`` True) or check (False); None: :attr:`allowed` says. Any
        other ``allow`` is refused inside the block's read's agreement (on a split or sharded average
        every rank raises at once: :meth:`~.agree.Agreement.refusing`)."""
        bad = allow is not None and not isinstance(allow, bool)
        with self.agreement.refusing(TypeError(f"allow_nonfinite must be True, False or None, got "
                                               f"{allow!r}")) if bad else contextlib.nullcontext():
            before, self._allow = self._allow, False if bad else allow   # (bad: checked, so the read agrees
                                                                        # where the others' checked reads do)
            try:
                yield
            finally:
                self._allow = before

    @contextlib.contextmanager
    def entering(self, block: ContextManager, allow: bool | None,
                 call: str = "average_parameters()") -> Iterator[Any]:
        """``block`` (an evaluation block, :meth:`fastema.average.ModelSwap.block`) entered as
        :meth:`allowing` ``allow`` says (its swap in checks; a refusal names ``call``, the one the
        user made), left as it leaves."""
        with contextlib.ExitStack() as stack:
            before, self._call = self._call, call
            try:
                with self.allowing(allow):
                    value = stack.enter_context(block)
            finally:
                self._call = before
            yield value

    @property
    def checking(self) -> bool:
        """Whether a read checks the average now (not allowed by the call or the face)."""
        return not (self.allowed if self._allow is None else self._allow)

    # ------------------------------------------------------------ finding them

    def local(self, rows: Sequence[int] | None = None) -> dict[str, list[int]]:
        """``name -> shadow rows`` holding inf or NaN in this rank's part of the average (``rows``:
        the rows looked at; None: every shadow row, the state rows of BEMA too): :func:`scan`, a
        ZeRO-3 partition's padding left out."""
        return scan(self.side.avg, self._flags, rows, self.side.padded())

    # ------------------------------------------------------------ where it is shipped or evaluated

    def refuse(self, what: str, row: int) -> None:
        """ValueError naming the tensors of average ``row`` that hold inf or NaN on this rank, where
        ``what`` (``"swap()"``, ``"save()"``...) would ship or evaluate it; nothing unless
        :attr:`checking`. Called inside the read's agreement (every rank raises with it)."""
        if not self.checking:
            return
        for g in self.side.avg.layout.groups:       # the scan's host read would end a capture
            if _backends.capturing(g.framework, g.device):
                raise RuntimeError(
                    f"fastema: {self.kind}.{self._call or what} checks the average for inf or NaN "
                    f"(a scan and a host read), which the CUDA graph capture on {g.device}'s current "
                    f"stream forbids: call it outside the capture (a warm-up step first), or pass "
                    f"allow_nonfinite=True to skip the check. Nothing was changed.")
        found = self.local([row])
        if found:
            which = "the average" if self.side.avg.rows == 1 else f"average {row}"
            raise ValueError(refusal(f"{self.kind}.{self._call or what}", which, list(found)))

    def saved(self, gathered: bool = False) -> list[str]:
        """The averaged tensors holding inf or NaN in any row, named in a warning: what a checkpoint
        records (:data:`RECORD`). This rank's part of a sharded or split average (a save may run on
        one rank only: no collective), unless ``gathered`` (a gathered save, a collective already:
        every rank's, agreed)."""
        found = self.local()
        if gathered and self.agreement.groups():
            every = mesh_findings(found, self.agreement.groups())
            found = joined(every.values(), self.side.avg.names)
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
        side = self.side

        def find() -> dict[str, list[int]]:
            swap.refuse("repair_nonfinite()")
            side.settle()
            side.follow()                             # the live weights where they are now
            return self.local()

        mine = found_together(find, self.agreement.groups(), f"{self.kind}.repair_nonfinite()",
                              "every rank of the average calls repair_nonfinite() together",
                              side.avg.names)
        reset(side.avg, mine)
        return list(mine)



def scan(avg: Any, kept: dict, rows: Sequence[int] | None = None,
         valid: dict[str, int] | None = None) -> dict[str, list[int]]:
    """:func:`fastema._nonfinite.scan` of a torch face's shadow (its flags never inference
    tensors: made outside inference mode)."""
    return _nonfinite.scan(avg, kept, rows, _new_flag, valid)


def _new_flag(group: Any) -> Any:
    with torch.inference_mode(False):
        return _backends.new_flag(group)


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
            if isinstance(avg, WindowingShadow):        # a window's, or one split over replicas
                _refill(avg, pos, live)


def _refill(avg: WindowingShadow, pos: int, live: torch.Tensor) -> None:
    """A window's tensor ``pos`` started over from ``live``: its mean alone is not enough, its
    running sum and the snapshots in its ring keep the inf or NaN, and the next pushes brought it
    back. Every slot of the ring holds ``live`` as stored, the sum the snapshots in the window
    times that (no compensation), the mean that: the window as if ``live`` had been pushed each
    time."""
    ring, state = avg.ring_view(pos), avg.state_view(pos)
    count = min(avg.pushes, ring.shape[0])          # the slots pushed, 0.. (ring: (window, ...))
    pushed = ring[:count]
    pushed.copy_(live.reshape(ring.shape[1:]).unsqueeze(0).expand_as(pushed))
    stored = ring[0].to(state.dtype)
    state[0].copy_(stored)
    state[1].copy_(stored * count)
    state[2].zero_()
