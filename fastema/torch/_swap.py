"""Writing a model average into its model: the swap (average in, raw weights back) and the copy-out
(``copy_to()`` of the tracked model), a part of the face (:class:`~fastema.torch._face.contract.FaceParts`)
made before it, over the model side and the average's agreement.

A swap is exact in place where the shadow can be (equal dtypes, a float32 shadow of bfloat16
weights, a split shadow, which keeps the raw weights' window: the shadow declares ``exact_swap``);
otherwise the raw weights are backed up once (the shadow's own kind of backup: in host memory for an
offloaded one) and the average copied out. Every tensor is checked before the first one is written,
inside the ranks' agreement where the average is split (its swap is then a gather, every rank of the
replica group joining).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from .._interrupts import ctrl_c_held
from .._sources import SourceChanged
from ..average import ModelSwap
from ._state.agree import Agreement, Read
from ._state.nonfinite import NonFinite
from ._tensors.model import TorchModel
from ._tensors.slots import bump_versions

__all__ = ["ShadowSwap"]

_WHILE_IN = ("the EMA weights are swapped into the model (the shadow holds the raw weights then); "
             "call it outside average_parameters() or after swap()")


class ShadowSwap:
    """The swap and the copy-out of one model average (see the module).

    Args:
        side: the model side (its shadows, the model's tensors, settling and following them).
        agreement: the average's agreement (a split average's swap and copy-out are collectives).
        check_row: refuses a row the face does not show (its engine's, or a window's).
        nonfinite: the average's non-finite watch: a swap in and a copy-out refuse an average
            holding inf or NaN (:class:`~fastema.torch._state.nonfinite.NonFinite`), on every rank.

    ``state`` is the swap state (:class:`fastema.average.ModelSwap`: ``swap(row)``, the evaluation
    block, the refusals while the average is in); ``backup`` the raw weights of a swap that would
    round (None until the first such swap)."""

    def __init__(self, side: TorchModel, agreement: Agreement, check_row: Callable[[int], None],
                 nonfinite: NonFinite):
        self.side, self.agreement, self.check_row = side, agreement, check_row
        self.nonfinite = nonfinite
        self.backup: Any = None        # a lossy swap's raw weights (float16 models): backup()
        self.state = ModelSwap(self.exchange, _WHILE_IN, held=self.held, refused=self.refused)

    def held(self) -> bool:
        """Whether part of the average is in the model after a swap in that raised (a split one)."""
        return self.side.avg.swapped

    def refused(self, row: int, err: BaseException) -> None:
        """:class:`~fastema.average.ModelSwap`'s swap refused before its exchange (``swap(row)`` of
        another row than the one in): where the way back is a collective (a split average's), this
        rank joins its agreement refusing, so every rank raises at once; raises."""
        if self.agreement.groups(swap=True):
            with self.agreement.agreed(Read("swap()", "back", row), swap=True):
                raise err

    def exchange(self, row: int, swapping_in: bool) -> None:
        """:class:`~fastema.average.ModelSwap`'s exchange: average ``row`` in, or the raw weights
        back."""
        collective = bool(self.agreement.groups(swap=True))    # a split average's swap gathers
        if swapping_in or not collective:
            try:
                self._exchange_checked(row, swapping_in, [], collective)
            except SourceChanged as err:      # the model changed while the average was in it
                if swapping_in:
                    raise
                kind = self.agreement.kind
                raise ValueError(f"{kind}: the raw weights cannot go back: the model changed while "
                                 f"average {row} was in it ({err.change}). The model holds average "
                                 f"{row} and its raw weights are in the {kind}: undo the change (its "
                                 f"dtype, shape, layout or device back as it was) and call swap() to put "
                                 f"them back; a new {kind} would lose them") from err
            return
        gathering: list = []                           # a split average's way back is a collective
        try:
            self._exchange_checked(row, swapping_in, gathering, collective)
        except Exception as err:
            if not self.side.avg.swapped:
                raise
            holds = ("still holds the average on this rank: nothing of the raw weights went back"
                     if not gathering else "may hold part of the raw weights on this rank (the "
                                           "gather back stopped after the ranks agreed)")
            why = ("A split average (shard_replicas) keeps 1/N of the raw weights a rank, so its "
                   "swap back is a collective: every rank of the group must reach the end of the "
                   "evaluation block together. Call swap() again on every rank to restore them; do "
                   "not save this model as the training weights until then.")
            raise RuntimeError(f"{self.agreement.kind}: the raw weights could not be restored "
                               f"({type(err).__name__}: {err}); the model {holds}. {why}") from err

    def _exchange_checked(self, row: int, swapping_in: bool, gathering: list, collective: bool) -> None:
        side = self.side
        avg, copy = side.avg, side.copy
        # split: the ranks agree before the gather; with no group to agree with, the checks alone (the
        # agreement's block is then only its own cost: a fifth of a swap's fixed cost, issue 78
        # item 7). A swap in checks the average for inf or NaN: a sharded one's ranks agree on it
        checked = swapping_in and self.nonfinite.checking
        agrees = collective or (checked and bool(self.agreement.groups()))    # sharded: its mesh
        agreed = (self.agreement.agreed(Read("swap()", "in" if swapping_in else "back", row),
                                        swap=True, checked=checked)
                  if agrees else self.agreement.alone())
        try:
            with agreed:
                side.settle()
                if swapping_in:
                    self.check_row(row)
                    side.follow()                      # every tensor's address: the one pass of a swap in
                    self.nonfinite.refuse("swap()", row)
                lossy = not avg.exact_swap             # see fastema._shadow.Capabilities
                if not lossy:
                    avg.swap_modes()
                    avg.reserve(row, True)             # a split swap's raw window, buckets
                if copy is not None and not swapping_in:   # the averaged group checks itself
                    copy.refresh()
        except BaseException:
            avg.release()
            raise
        gathering.append(True)                         # agreed: the gathers write into the model
        # Addresses found current above (the model side's check in, the buffers' refresh back): the
        # swaps read none again (where the shadow can say so: Capabilities.sources_checked)
        with avg.sources_checked() if swapping_in else contextlib.nullcontext(), \
                copy.sources_checked() if copy is not None else contextlib.nullcontext():
            self._exchange(row, swapping_in, lossy)

    def _exchange(self, row: int, swapping_in: bool, lossy: bool) -> None:
        """The writes of :meth:`_exchange_checked`, everything checked."""
        side = self.side
        avg, copy = side.avg, side.copy
        backup = self.backup
        if lossy:
            if swapping_in:
                if backup is None:                    # the shadow's own kind (offloaded: host)
                    backup = self.backup = avg.backup()
                else:
                    backup.rebind(dict(zip(avg.names, avg.sources)))
                    backup.copy_from_sources()
                avg.copy_to_sources(row)
            else:
                assert backup is not None             # swapped in lossily: raw weights in it
                backup.copy_to_sources()
        else:
            avg.swap(row)
        if copy is not None:
            try:
                copy.swap()
            except BaseException:                      # put the averaged group back as it was
                if not lossy:
                    avg.swap(row)
                elif swapping_in:
                    assert backup is not None
                    backup.copy_to_sources()
                else:
                    avg.copy_to_sources(row)
                raise
        if side.masters is not None:                  # masters exchanged: the partitions follow
            side.masters.exchanged(swapping_in)

    def copy_to(self, row: int) -> None:
        """Write average ``row`` into the tracked model (the eager ``copy_to()``): checked first
        (inside the ranks' agreement where it gathers), then the whole model written, a Ctrl-C held
        until it is."""
        side = self.side
        avg, copy = side.avg, side.copy
        try:
            with self.agreement.agreed(Read("copy_to()", row=row), swap=True,
                                       checked=self.nonfinite.checking):
                self.check_row(row)
                self.state.refuse("copy_to()")
                side.settle()
                side.follow()
                self.nonfinite.refuse("copy_to()", row)
                if copy is not None:                   # the averaged group checks itself
                    copy.check_sources()
                avg.reserve(row, False)                # a split average's buckets
        except BaseException:
            avg.release()
            raise
        with ctrl_c_held():                            # the whole model written, then a Ctrl-C (L3)
            avg.copy_to_sources(row)
            if side.masters is not None:              # masters written: rounded into the partitions
                side.masters.push()
            if copy is not None:
                copy.copy_to_sources()
            bump_versions(avg.sources + (copy.sources if copy is not None else []))  # as copy_ does
