"""``offload="cpu"`` of an average whose sources are in host memory already: DeepSpeed's float32
masters under ZeRO-Offload (``offload_optimizer: {device: cpu}``), or any engine whose optimizer
keeps them on the host.

The shadow is a :class:`~fastema.FlatShadow` of the masters, in host memory beside them, and an
update folds straight from them on the worker thread (:class:`~fastema.torch._placement.folds.FoldQueue`): no
pack, no staging chunk, no device copy. ``update()`` returns at once; the masters must not change
while the fold reads them, so the optimizer's next step waits for it first (a step pre-hook on the
engine's torch optimizer; an optimizer without hooks makes ``update()`` wait instead). Every read
waits for the folds, as an offloaded shadow's does; a swap exchanges the shadow and the masters in
place (exact), as for a plain average of the masters.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

from ...flat import FlatShadow
from .folds import FoldQueue, Record, stage
from .offload import PLACEMENT

__all__ = ["HostMastersShadow", "hook_of"]


def hook_of(engine) -> Any:
    """The torch optimizer whose step writes ``engine``'s masters (the one a step pre-hook goes on),
    or None when there is none with hooks."""
    inner = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    return inner if callable(getattr(inner, "register_step_pre_hook", None)) else None


class HostMastersShadow(FlatShadow):
    """A :class:`~fastema.FlatShadow` of host-resident sources, folded on a worker thread (see the module).

    ``optimizer``: the torch optimizer whose step writes the sources (its steps wait for the folds),
    or None (then every update waits for its own fold)."""

    folds_later = True
    host_plan_only = True         # folded on a host thread: no device plan, skip flags, capture
    holds_interrupts = True       # queued whole, then counted (a Ctrl-C waits for the update's end)
    placement = PLACEMENT
    in_place = True               # read where the masters are: ema.source says so

    def __init__(self, sources: dict, *, rows: int, dtype: str, optimizer=None):
        self._queue = FoldQueue()
        super().__init__(sources, rows=rows, dtype=dtype)
        self._hook = None
        if optimizer is not None:
            ref = weakref.ref(self)

            def wait(opt, args, kwargs) -> None:             # before the step writes the masters
                me = ref()
                if me is not None:
                    me._queue.settle()

            self._hook = optimizer.register_step_pre_hook(wait)
            weakref.finalize(self, self._hook.remove)

    def __repr__(self) -> str:
        return "HostMasters" + super().__repr__()

    def update_checked(self, weights_by_device, rounding: str, seed: int, step: int, skip_if, plan=None,
                       given=None) -> None:
        if skip_if is not None or plan is not None:
            raise ValueError("an offloaded average takes no skip flags and no device plan")
        q = self._queue
        q.raise_failed()
        record = q.open()
        q.submit(record, stage, "fold", self._fold, record, weights_by_device, rounding, seed, step)
        if self._hook is None:
            q.settle()                                      # nothing else keeps the masters still

    def _fold(self, record: Record, weights_by_device, rounding: str, seed: int, step: int) -> None:
        record.written = True                               # any failure from here on may leave half an update
        FlatShadow.update_checked(self, weights_by_device, rounding, seed, step, None)

    def queued(self, undo: Callable[[], None]) -> None:
        self._queue.queued(undo)

    def bias_correct(self, alpha: float, *, skip_if=None) -> None:
        record = self._queue.records[-1]
        self._queue.submit(record, FlatShadow.bias_correct, self, alpha)

    def join(self) -> None:
        """Wait for every queued fold; re-raise the first error of one (see :class:`FoldQueue`)."""
        self._queue.join()

    # every read and write of the shadow waits for the folds first

    def view(self, source, row: int | None = 0):
        self.join()
        return super().view(source, row)

    def swap(self, row: int = 0, *, lossy: bool = False) -> None:
        self.join()
        super().swap(row, lossy=lossy)

    def copy_to_sources(self, row: int = 0) -> None:
        self.join()
        super().copy_to_sources(row)

    def copy_from_sources(self, *, skip_if=None) -> None:
        self.join()
        super().copy_from_sources(skip_if=skip_if)

    def copy_from_sources_checked(self, skip_if=None) -> None:
        self.join()
        super().copy_from_sources_checked(skip_if)

    def pieces(self):
        self.join()
        return super().pieces()
