"""A model average whose shadow lives in host memory (``EMA(model, offload="cpu")``).

The shadow (every row, in the shadow dtype) is in host memory. Every update (on the training
thread):

1. wait until this update may write what it stages into (per (device, dtype) group, see
   :func:`_two_slots`): a GPU group's copies land in two pinned host slots in turn (double
   buffering), so it waits for the fold that last read this update's slot, two updates back; a
   CPU group's staging is its host slot, so it waits until the previous fold has read it (each
   fold reads its CPU groups first, then lets the next update go on while it folds its GPU
   groups);
2. one pack launch copies every parameter, in its own dtype, into a staging buffer on the
   parameters' device (:class:`~fastema.FlatShadow` with ``dtype="same"``), on a side stream
   that first waits for the caller's stream; the caller's stream then waits only for the
   pack, not for the copy;
3. one device-to-host copy of the staging buffer into a pinned host slot, on the side stream,
   and an event;
4. a fold is queued on a one-thread worker: wait for the event, then one host kernel folds the
   slot into the host shadow (numba kernels run without the GIL).

``update()`` returns without waiting for its own fold. Everything that reads or writes the shadow
(state dicts, views, swaps, copies, saves) first waits for the pending folds
(:meth:`OffloadedShadow.join`) and re-raises a fold's error; the engine's plan then goes back to
the last fold that finished (see :class:`fastema.average.Average`), so the counters match the
shadow.

Memory, for P parameters of b bytes each and a shadow of K rows of s bytes:

- parameters on a GPU: the GPU keeps the staging, one copy of the parameters in their own dtype
  (P * b; the synchronous EMA keeps K * P * s there); the host keeps two pinned slots
  (2 * P * b, double buffering: a fold reads one while the next copy lands in the other) and
  the shadow. So offload saves GPU memory only when the shadow is larger than one copy of the
  weights: bfloat16 weights with a float32 shadow (half), or several averages (K > 1); for
  float32 weights and one average it saves none.
- parameters on the CPU: the staging is the host slot (the pack writes straight into it; one
  slot, so an update waits until the fold before it has read it) and the shadow,
  P * b + K * P * s; a swap adds a backup of the raw weights (P * b) until the next update.
- a model with groups on both: each group as above (its GPU groups keep their two slots).

The tests run the GPU groups' pipeline on the CPU as well (they replace :func:`_two_slots`): a
CPU group then gets a staging of its own and two host slots, copied into in turn, as on a GPU
without the streams.

The class presents what the model averages use of a :class:`~fastema.FlatShadow`; the sources
side (names, addresses, rebinds, checks) is the device staging's, the shadow side (rows, views,
weights' devices) the host shadow's.

After ``os.fork()``: the parent first waits for every queued fold (so the child copies a whole
shadow; a fold's error stays for the next read), and the child gives each offloaded shadow a new
worker thread (the parent's is not in the child). CUDA itself does not survive a fork: a child of
a process that used a GPU must be started with ``spawn`` (see docs/guides/processes.md).
"""
from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Callable

import torch

from ..flat import FlatShadow

__all__ = ["OffloadedShadow"]


def _two_slots(group) -> bool:
    """Whether ``group``'s staged copies land in two host slots in turn (double buffering: the
    next update copies into one slot while the worker folds the other), as a GPU group's do. A
    CPU group's staging is its host slot instead (no copy and half the memory; the next update
    waits until the fold has read it). The tests replace this function to run the two-slot
    pipeline, or a mix of both, on the CPU."""
    return group.device != "cpu"


class _Staged(threading.Event):
    """Set once a fold has read the groups staged straight into their one slot (or has ended);
    ``failed``: it ended with an error (set before the event)."""

    failed = False


class OffloadedShadow:
    """The host shadow of ``sources`` (``rows`` rows of ``dtype``), fed through staging on the
    sources' device."""

    offloaded = True
    folds_later = True            # update_checked() queues the fold: the engine hands it each one's undo (queued)

    def __init__(self, sources: dict, *, rows: int, dtype: str):
        self.pack = FlatShadow(sources, dtype="same")             # staging on the params' device, in their dtypes
        self.names, self.rows = self.pack.names, rows
        self.skipped: dict = {}                  # as FlatShadow's: device -> int32[1] flag (none: no guard here)
        groups = self.pack.layout.groups
        self._cuda = [g.device != "cpu" for g in groups]
        self._double = [c or bool(_two_slots(g)) for g, c in zip(groups, self._cuda)]    # two host slots in turn
        flats = [g.buffer.reshape(-1) for g in groups]
        # a double-buffered group's copies land in two host slots (pinned for a GPU group); any
        # other group's staging is its one slot (the pack writes straight into it)
        self._slots = [[torch.zeros(f.numel(), dtype=f.dtype, pin_memory=c) if d else f
                        for f, c, d in zip(flats, self._cuda, self._double)] for _ in range(2)]
        self._stream = {g.device: torch.cuda.Stream(torch.device(g.device)) for g, c in zip(groups, self._cuda) if c}
        for f, s in zip(flats, self._slots[0]):
            if s is not f:
                s.copy_(f)
        # one host shadow per staging group: its one source is the whole slot, so a slot's layout
        # (padding included) is the staging's, and a parameter's view is the staging group's geometry
        self._hosts = [FlatShadow([s], rows=rows, dtype=dtype) for s in self._slots[0]]
        self.layout = SimpleNamespace(groups=[h.layout.groups[0] for h in self._hosts],
                                      nbytes=sum(h.nbytes for h in self._hosts))
        self._spare: list | None = None                           # a swap's backup of CPU groups (see backup())
        self._broken: str | None = None                           # set in a child forked mid-fold (see _forked)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastema-offload")
        self._jobs: list[Future | None] = [None, None]            # the last fold that read each slot
        self._pending: Future | None = None                       # the last fold queued
        self._staged: _Staged | None = None                       # ... set once it has read the one-slot groups
        self._inflight: list[list] = []                           # [fold, undo] of the folds not known to have landed
        self._next = 0                                            # counts the updates (the slot of the next one)
        _LIVE.add(self)

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
        self._spare = None                                        # no swap is on (updates are refused then)
        slot = self._next % 2                                     # a two-slot group's slot for this update
        job = self._jobs[slot] if any(self._double) else None
        if job is not None and job.exception() is not None:      # waits: that slot's last reader is done
            self.join()                                           # raises its error (and rolls the plan back)
        staged = None if all(self._double) else self._staged
        if staged is not None:
            staged.wait()                                         # the last fold has read the one-slot groups
            if staged.failed:
                self.join()
        self._inflight = [e for e in self._inflight if not e[0].done() or e[0].exception() is not None]
        events = self._stage(slot)
        staged = _Staged()
        self._pending = self._jobs[slot] = self._pool.submit(self._work, staged, self._pending, slot, events,
                                                             dict(weights_by_device), rounding, seed, step)
        self._staged = staged
        self._inflight.append([self._pending, None])
        self._next += 1

    def queued(self, undo: Callable[[], None]) -> None:
        """``undo`` puts the plan back as it was before the fold just queued (see
        :class:`fastema.average.Average`); it is called if that fold is the first one lost."""
        self._inflight[-1][1] = undo

    def _stage(self, slot: int) -> list:
        """Pack the sources into the staging and copy it into host ``slot``; returns the events
        the fold waits for (none on the CPU)."""
        events = []
        for gi, g in enumerate(self.pack.layout.groups):
            if not self._double[gi]:                              # the staging is the slot
                self._pack(gi)
                continue
            flat, host = g.buffer.reshape(-1), self._slots[slot][gi]
            if not self._cuda[gi]:                                # two slots on the CPU (the tests' pipeline)
                self._pack(gi)
                host.copy_(flat)
                continue
            side, current = self._stream[g.device], torch.cuda.current_stream(torch.device(g.device))
            side.wait_stream(current)                             # the optimizer's writes come first
            with torch.cuda.stream(side):
                self._pack(gi)
                packed = torch.cuda.Event()
                packed.record(side)
                host.copy_(flat, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            current.wait_event(packed)                            # the next step may write the params
            events.append(copied)
        return events

    def _pack(self, gi: int) -> None:
        self.pack.copy_group_in(gi)                               # the sources into staging group gi

    def _work(self, staged: _Staged, *args) -> None:
        """The worker's task: the fold, then ``staged`` set whatever happened."""
        try:
            self._fold(staged, *args)
        except BaseException:
            staged.failed = True
            raise
        finally:
            staged.set()

    def _fold(self, staged: _Staged, prev: Future | None, slot: int, events: list, weights: dict, rounding: str,
              seed: int, step: int) -> None:
        if prev is not None:
            prev.result()                                         # in order; an earlier error stops this one
        one = [gi for gi, d in enumerate(self._double) if not d]
        two = [gi for gi, d in enumerate(self._double) if d]
        for gi in one:                                            # the staging itself: read it first
            self._fold_group(gi, slot, weights, rounding, seed, step)
        staged.set()                                              # the next update may pack into it again
        for e in events:
            e.synchronize()                                       # the copies into the slots have landed
        for gi in two:
            self._fold_group(gi, slot, weights, rounding, seed, step)

    def _fold_group(self, gi: int, slot: int, weights: dict, rounding: str, seed: int, step: int) -> None:
        host, src = self._hosts[gi], self._slots[slot][gi]
        host.adopt([src], [src.data_ptr()])
        host.update_checked(weights, rounding, seed + (gi << 32), step, None)

    def join(self) -> None:
        """Wait for every queued fold; re-raise the first error of one. The average is then as it
        was after the last fold that finished, and the plan (``updates``, ``calls``) too: the
        update that failed, and every call made after it, are not counted. (The buffers copied
        from the model, not averaged, keep the latest call's values until the next update.)"""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        pending = self._pending                                  # the training thread's: no lock needed
        if pending is None:
            return
        try:
            pending.result()
        except BaseException:
            if not pending.done():                                # interrupted while waiting: the folds go on
                raise
            self._lost()
            raise
        self._inflight = []

    def _lost(self) -> None:
        """After a fold failed (so has every one queued after it: they run in turn, each after the
        one before): forget them, and put the plan back as it was before the first one lost."""
        undo = next((u for f, u in self._inflight if f.exception() is not None), None)
        self._pending, self._staged, self._jobs, self._inflight = None, None, [None, None], []
        if undo is not None:
            undo()

    def _raise_failed(self) -> None:
        if self._broken is not None:
            raise RuntimeError(self._broken)
        pending = self._pending
        if pending is not None and pending.done() and pending.exception() is not None:
            self.join()

    # ------------------------------------------------------------ fork

    def _settle_for_fork(self) -> None:
        """Before ``fork()``: wait for the queued folds, raising nothing (an error stays in its fold
        for the next read). ``exception()`` returns once the worker has let go of the fold's lock."""
        pending = self._pending
        if pending is not None:
            pending.exception()

    def _forked(self) -> None:
        """In the child of a ``fork()``: the parent's worker thread is not here, so a new one. The
        folds the parent waited for stay as they ended (an error is raised at the next read); a fold
        still running (another thread of the parent queued it during the fork) makes this copy of
        the average unusable."""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastema-offload")
        if any(not f.done() for f, _ in self._inflight):          # every fold not known to have landed is listed
            self._jobs, self._pending, self._staged, self._inflight = [None, None], None, None, []
            self._broken = ("this process was forked while an offloaded EMA was folding an update on its worker "
                            "thread (another thread called update() during the fork), so its copy here may be "
                            "half-updated; make a new EMA in this process (load_state_dict() of a checkpoint "
                            "does not help), or fork only between updates")

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
            if self._double[gi]:                                  # (a one-slot group's slot is its staging)
                g.buffer.reshape(-1).copy_(src, non_blocking=False)
        self.pack.copy_to_sources()

    def backup(self) -> "_HostBackup":
        """A backup of the sources for a swap, kept in host memory (the device keeps no copy)."""
        return _HostBackup(self)


class _HostBackup:
    """The raw weights while the average is swapped in, in host memory: a two-slot (GPU) group's
    in host slot 1, which no update uses until the swap back (updates are refused while
    swapped); a one-slot (CPU) group's (whose slot is its staging) in a buffer of the shadow's,
    released at the next update."""

    def __init__(self, shadow: OffloadedShadow):
        self.shadow = shadow
        self.copy_from_sources()

    def rebind(self, sources) -> None:
        pass                                                      # the staging follows the shadow's sources

    def _buffers(self) -> list:
        s = self.shadow
        if s._spare is None:
            s._spare = [None if d else torch.empty_like(f) for d, f in zip(s._double, s._slots[1])]
        return [s._slots[1][gi] if d else s._spare[gi] for gi, d in enumerate(s._double)]

    def copy_from_sources(self) -> None:
        s = self.shadow
        s.join()
        for e in s._stage(1):
            e.synchronize()
        for d, g, buf in zip(s._double, s.pack.layout.groups, self._buffers()):
            if not d:
                buf.copy_(g.buffer.reshape(-1))

    def copy_to_sources(self) -> None:
        s = self.shadow
        if s._spare is None and not all(s._double):
            raise RuntimeError("the offloaded EMA's backup of the raw weights is gone (an update ran while the "
                               "average was swapped in); the model keeps the average")
        s.check_sources()
        for g, src in zip(s.pack.layout.groups, self._buffers()):
            g.buffer.reshape(-1).copy_(src)
        s.pack.copy_to_sources()


# ---------------------------------------------------------------- fork: every live offloaded shadow

_LIVE: "weakref.WeakSet[OffloadedShadow]" = weakref.WeakSet()


def _before_fork() -> None:
    for shadow in list(_LIVE):
        try:
            shadow._settle_for_fork()
        except BaseException:                                     # never raise out of a fork hook
            pass


def _after_fork_in_child() -> None:
    for shadow in list(_LIVE):
        shadow._forked()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
