"""A model average whose shadow lives in host memory (``EMA(model, offload="cpu")``).

The device keeps none of the shadow. Every update (on the training thread):

1. wait for the fold that last read this update's host slot (two slots: double buffering);
2. one pack launch copies every parameter, in its own dtype, into a device staging buffer
   (:class:`~fastema.FlatShadow` with ``dtype="same"``), on a side stream that first waits for
   the caller's stream; the caller's stream then waits only for the pack, not for the copy;
3. one device-to-host copy of the staging buffer into the pinned host slot, on the side stream,
   and an event;
4. a fold is queued on a one-thread worker: wait for the event, then one host kernel folds the
   slot into the host shadow (numba kernels run without the GIL).

``update()`` returns without waiting. Everything that reads or writes the shadow (state dicts,
views, swaps, copies, saves) first waits for the pending folds (:meth:`OffloadedShadow.join`) and
re-raises a fold's error. On a CPU-only machine the same pipeline runs with host copies in place
of the device ones, which is how it is tested.

The class presents what the model averages use of a :class:`~fastema.FlatShadow`; the sources
side (names, addresses, rebinds, checks) is the device staging's, the shadow side (rows, views,
weights' devices) the host shadow's.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import torch

from ..flat import FlatShadow

__all__ = ["OffloadedShadow"]


class OffloadedShadow:
    """The host shadow of ``sources`` (``rows`` rows of ``dtype``), fed through device staging."""

    offloaded = True

    def __init__(self, sources: dict, *, rows: int, dtype: str):
        self.pack = FlatShadow(sources, dtype="same")             # device staging, the params' dtypes
        self.names, self.rows, self.skipped = self.pack.names, rows, {}
        groups = self.pack.layout.groups
        self._cuda = [g.device != "cpu" for g in groups]
        pin = any(self._cuda) and torch.cuda.is_available()
        flats = [g.buffer.reshape(-1) for g in groups]
        self._slots = [[torch.zeros(f.numel(), dtype=f.dtype, pin_memory=pin) for f in flats] for _ in range(2)]
        self._stream = {g.device: torch.cuda.Stream(torch.device(g.device)) for g, c in zip(groups, self._cuda) if c}
        for f, s in zip(flats, self._slots[0]):
            s.copy_(f)
        # one host shadow per staging group: its one source is the whole slot, so a slot's layout
        # (padding included) is the staging's, and a parameter's view is the staging group's geometry
        self._hosts = [FlatShadow([s], rows=rows, dtype=dtype) for s in self._slots[0]]
        self.layout = SimpleNamespace(groups=[h.layout.groups[0] for h in self._hosts],
                                      nbytes=sum(h.nbytes for h in self._hosts))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastema-offload")
        self._jobs: list[Future | None] = [None, None]            # the last fold that read each slot
        self._pending: Future | None = None                       # the last fold queued
        self._next = 0                                            # the slot of the next update

    # ------------------------------------------------------------ what the averages read

    @property
    def sources(self) -> list:
        return self.pack.sources

    @property
    def groups(self) -> list[dict]:
        """The host shadow's groups (their sources are the slots, in the parameters' dtypes)."""
        return [g for h in self._hosts for g in h.groups]

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def __len__(self) -> int:
        return len(self.pack)

    def __repr__(self) -> str:
        return f"OffloadedShadow({len(self)} sources, rows={self.rows}, host={self.nbytes} bytes)"

    def refresh(self) -> None:
        self.pack.refresh()

    def rebind(self, sources) -> None:
        self.pack.rebind(sources)

    def retarget(self, sources) -> None:
        self.pack.retarget(sources)

    def check_sources(self) -> None:
        self.pack.check_sources()

    def check_row(self, row: int) -> None:
        self._hosts[0].check_row(row)

    def view(self, source, row: int | None = 0):
        """The host shadow of one source, shaped and laid out like it (after the pending folds)."""
        if row is not None:
            self.check_row(row)
        self.join()
        g, slot = self.pack.layout.where[self.pack.source_table.position(source)]
        buffer = self._hosts[self.pack.layout.groups.index(g)].layout.groups[0].buffer    # (rows, n)
        return g.strided(buffer, slot, (self.rows,)) if row is None else g.strided(buffer[row], slot)

    def state_view(self, source):
        return self.view(source, None)

    # ------------------------------------------------------------ the pipeline

    def update_checked(self, weights_by_device, rounding: str, seed: int, step: int, skip_if, plan=None) -> None:
        """Stage the sources and queue the fold (the addresses were checked by the caller)."""
        if skip_if is not None or plan is not None:
            raise ValueError("an offloaded average takes no skip flags and no device plan")
        self._raise_failed()
        slot = self._next % 2
        job = self._jobs[slot]
        if job is not None:
            job.result()                                          # that slot's reader is done
        events = self._stage(slot)
        self._pending = self._jobs[slot] = self._pool.submit(self._fold, self._pending, slot, events,
                                                             dict(weights_by_device), rounding, seed, step)
        self._next += 1

    def _stage(self, slot: int) -> list:
        """Pack the sources into the device staging and copy it into host ``slot``; returns the
        events the fold waits for (none on the CPU, where the copies are done on return)."""
        events = []
        for gi, g in enumerate(self.pack.layout.groups):
            flat, host = g.buffer.reshape(-1), self._slots[slot][gi]
            if not self._cuda[gi]:
                self._pack(g)
                host.copy_(flat)
                continue
            side, current = self._stream[g.device], torch.cuda.current_stream(torch.device(g.device))
            side.wait_stream(current)                             # the optimizer's writes come first
            with torch.cuda.stream(side):
                self._pack(g)
                packed = torch.cuda.Event()
                packed.record(side)
                host.copy_(flat, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            current.wait_event(packed)                            # the next step may write the params
            events.append(copied)
        return events

    def _pack(self, g) -> None:
        from .. import _launch

        _launch.launch("copy", g, to_shadow=True, row_lo=0, row_hi=1, flag=None)

    def _fold(self, prev: Future | None, slot: int, events: list, weights: dict, rounding: str, seed: int,
              step: int) -> None:
        if prev is not None:
            prev.result()                                         # in order; an earlier error stops this one
        for e in events:
            e.synchronize()                                       # the copy into the slot has landed
        for gi, (host, src) in enumerate(zip(self._hosts, self._slots[slot])):
            host.adopt([src], [src.data_ptr()])
            host.update_checked(weights, rounding, seed + (gi << 32), step, None)

    def join(self) -> None:
        """Wait for every queued fold; re-raise the first error of one (the average is then as it
        was after the last fold that finished)."""
        pending = self._pending                                  # the training thread's: no lock needed
        if pending is not None:
            try:
                pending.result()
            except BaseException:
                self._pending, self._jobs = None, [None, None]
                raise

    def _raise_failed(self) -> None:
        pending = self._pending
        if pending is not None and pending.done() and pending.exception() is not None:
            self.join()

    # ------------------------------------------------------------ copies in and out

    def copy_from_sources(self, *, skip_if=None) -> None:
        """Every row <- the sources (through the staging, synchronously)."""
        self.join()
        self.refresh()
        self.copy_from_sources_checked(skip_if)

    def copy_from_sources_checked(self, skip_if=None) -> None:
        self.join()
        for e in self._stage(0):
            e.synchronize()
        for host, src in zip(self._hosts, self._slots[0]):
            host.adopt([src], [src.data_ptr()])
            host.copy_from_sources()

    def copy_to_sources(self, row: int = 0) -> None:
        """The sources <- row ``row`` (rounded to their dtypes): host shadow -> slot -> staging -> sources."""
        self.check_row(row)
        self.join()
        self.check_sources()
        for gi, (g, host, src) in enumerate(zip(self.pack.layout.groups, self._hosts, self._slots[0])):
            host.adopt([src], [src.data_ptr()])
            host.copy_to_sources(row)                             # the slot gets the row in the params' dtype
            g.buffer.reshape(-1).copy_(src, non_blocking=False)
        self.pack.copy_to_sources()

    def backup(self) -> "_HostBackup":
        """A backup of the sources for a swap, kept in host memory (the device keeps no copy)."""
        return _HostBackup(self)


class _HostBackup:
    """The raw weights while the average is swapped in: staged into host slot 1, which no update
    uses until the swap back (updates are refused while swapped)."""

    def __init__(self, shadow: OffloadedShadow):
        self.shadow = shadow
        self.copy_from_sources()

    def rebind(self, sources) -> None:
        pass                                                      # the staging follows the shadow's sources

    def copy_from_sources(self) -> None:
        self.shadow.join()
        for e in self.shadow._stage(1):
            e.synchronize()

    def copy_to_sources(self) -> None:
        s = self.shadow
        s.check_sources()
        for g, src in zip(s.pack.layout.groups, s._slots[1]):
            g.buffer.reshape(-1).copy_(src)
        s.pack.copy_to_sources()
