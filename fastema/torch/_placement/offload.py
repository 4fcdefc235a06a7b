"""A model average whose shadow lives in host memory (``EMA(model, offload="cpu")``), fed through
two fixed-size staging chunks: never a copy of the whole model.

The shadow (every row, in the shadow dtype) is in host memory, laid out like a plain shadow of the
same weights. Each (device, dtype) group's row is cut into windows of at most ``offload_chunk``
bytes of the weights' dtype (:class:`fastema._chunks.ChunkedSources`: several small tensors in one
window, a large one over several). Each device has a *ring*: two chunks on the device and, for a
GPU, two chunk-sized pinned host slots and a side stream. Every update, on the training thread:

1. one fold job is queued on the worker thread (:class:`~fastema.torch._placement.folds.FoldQueue`), which
   folds the windows as they are staged;
2. for window ``k`` (of every group in turn) it waits until slot ``k % 2`` is free (the fold that
   last read it has finished), then packs the window into chunk ``k % 2`` (one launch) and, on a
   GPU, copies the chunk into pinned slot ``k % 2`` on the side stream, which first waited for the
   caller's stream (the optimizer's writes come first), and records an event;
3. the worker waits for that event, folds the window from the slot into its columns of the host
   shadow (one host launch; numba kernels run without the GIL) and frees the slot; the next pack
   overlaps that fold;
4. on a GPU the caller's stream then waits for the last pack (not for the copies): the weights may
   change only once every window is staged.

So with W windows ``update()`` returns once the last window is staged: it waits for the folds of
all but the last two windows (two chunks cannot hold more), and returns while those two are folded.
A model of one or two windows is staged at once and its update waits for nothing but the fold two
windows back. Everything that reads or writes the shadow (state dicts, views, swaps, copies, saves)
first waits for the queued folds (:meth:`OffloadedShadow.join`) and re-raises a fold's error: a
fold lost before it wrote is not counted (the engine's plan goes back to the last fold that
finished); one that failed halfway through an update breaks the average (see ``_folds``). A Ctrl-C
during ``update()`` is held until every window is staged (``EMA`` holds it around the whole
update), so the worker never folds half an update; one during :meth:`OffloadedShadow.copy_to_sources`
(``copy_to()``, a lossy swap) until every window is written into the model.

Memory, for P parameters of b bytes each, a shadow of K rows of s bytes and chunks of C bytes:
the weights' device keeps two chunks (2 C) and the tables; the host keeps the shadow (K P s), two
pinned slots (2 C) for a GPU ring, and the fold tables. On a CPU the chunks are host memory and
there are no slots: the shadow and 2 C. A swap adds a host backup of the raw weights (P b) until
the next update. :meth:`OffloadedShadow.parts` lists them for ``ema.memory(parts=True)``.

The rings and the host groups are :mod:`fastema.torch._placement.offload_ring`'s.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..._backends.torch import dtype_of
from ..._checks import sr_key
from ..._chunks import ChunkedSources
from ..._interrupts import ctrl_c_held
from ..._shadow import Capabilities, table_parts
from ..._sources import FollowsSources
from .folds import Aborted, FoldQueue, Record, stage
from .offload_ring import DEFAULT_CHUNK, PIPELINE, HostGroup, HostLayout, Ring, after_side_stream, check_chunk

__all__ = ["DEFAULT_CHUNK", "PLACEMENT", "HostBackup", "OffloadedShadow", "check_chunk"]

PLACEMENT = "offload='cpu'"       # how a refusal names this placement (Capabilities.placement)


class OffloadedShadow(FollowsSources, Capabilities):
    """The host shadow of ``sources`` (``rows`` rows of ``dtype``), fed through chunks of ``chunk``
    bytes on the sources' devices (see the module). ``split=(rank, ranks)``: this rank's slice only."""

    exact_swap = False            # in host memory: a swap copies the average out, the raw weights backed up
    folds_later = True            # update_checked() queues the fold: the engine hands it each one's undo (queued)
    host_plan_only = True         # folded on a host thread: no device plan, skip flags, capture
    holds_interrupts = True       # every window staged, then counted, or none (a Ctrl-C waits)
    placement = PLACEMENT

    layout: HostLayout

    def __init__(self, sources: dict, *, rows: int, dtype: str, chunk: int = DEFAULT_CHUNK,
                 split: tuple[int, int] | None = None):
        self.src = ChunkedSources(sources, dtype=dtype, chunk_bytes=chunk, split=split)
        self.names, self.rows, self.chunk = self.src.names, rows, chunk
        self.skipped: dict = {}                  # as FlatShadow's: device -> int32[1] flag (none: no guard here)
        self.source_table = self.src.source_table
        groups = self.src.layout.groups
        self._hosts = [HostGroup(g, torch.zeros((rows, g.n), dtype=dtype_of(g.shadow_kind))) for g in groups]
        self._rows_at = [h.buffer.data_ptr() for h in self._hosts]
        self.layout = HostLayout(self.src.layout, self._hosts)
        devices = dict.fromkeys(self.src.device_of(i) for i in range(len(self.src.windows)))
        self._ring_of = {d: Ring(d, self.src.chunk_bytes(d), PIPELINE["host_slots"]) for d in devices}
        # a CPU ring's windows but its last two are folded from the weights where they are, while update()
        # waits for them (the weights cannot change meanwhile): only the two folded after it returns need
        # the chunks' snapshot (a GPU ring, or the GPU's pipeline run on the CPU, stages every window)
        last = {d: [i for i in range(len(self.src.windows)) if self.src.device_of(i) == d][-2:] for d in devices}
        self._in_place = [PIPELINE["in_place"] and not self._ring_of[d].through_host and i not in last[d]
                          for i, d in enumerate(map(self.src.device_of, range(len(self.src.windows))))]
        self._queue = FoldQueue()
        self._spare: list | None = None          # a swap's backup of the raw weights (see HostBackup)
        self.copy_from_sources_checked()

    # ------------------------------------------------------------ what the averages read

    @property
    def sources(self) -> list:
        return self.src.sources

    @property
    def groups(self) -> list[dict]:
        return [dict(device=g.device, src_dtype=str(dtype_of(g.src_kind)).replace("torch.", ""),
                     shadow_dtype=str(h.buffer.dtype).replace("torch.", ""), sources=len(g.members), numel=g.n,
                     buffer=h.buffer) for g, h in zip(self.src.layout.groups, self._hosts)]

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def parts(self, what: str = "shadow") -> list[tuple[str, Any]]:
        """``(part, array)`` of everything this shadow made: the host shadow (``what``), the staging
        chunks, the pinned host slots, the launch tables, a swap's backup of the raw weights."""
        out: list[tuple[str, Any]] = [(what, h.buffer) for h in self._hosts]
        for ring in self._ring_of.values():
            out += [("staging chunks", c) for c in ring.chunks]
            if ring.through_host:
                out += [("pinned slots" if ring.cuda else "host slots", s) for s in ring.slots]
        out += table_parts(*self.src.tables())
        out += [("swap backup", b) for b in self._spare or ()]
        return out

    def __len__(self) -> int:
        return len(self.src)

    def __repr__(self) -> str:
        chunks = ", ".join(f"{d}: 2 x {r.chunks[0].numel()} B" for d, r in self._ring_of.items())
        return (f"OffloadedShadow({len(self)} sources, rows={self.rows}, host={self.nbytes} bytes, "
                f"{len(self.src.windows)} windows, chunks {chunks})")

    @property
    def follows(self) -> ChunkedSources:
        """What follows the sources (:class:`~fastema._sources.FollowsSources`): the chunks."""
        return self.src

    def check_row(self, row: int) -> None:
        if not isinstance(row, int) or not 0 <= row < self.rows:
            raise IndexError(f"row must be an int in [0, {self.rows}), got {row!r}")

    def view(self, source, row: int | None = 0):
        """The host shadow of one source, shaped and laid out like it (after the pending folds)."""
        if row is not None:
            self.check_row(row)
        self.join()
        h, slot = self.layout.where[self.source_table.position(source)]
        return h.strided(h.buffer, slot, (self.rows,)) if row is None else h.strided(h.buffer[row], slot)

    def state_view(self, source):
        return self.view(source, None)

    # ------------------------------------------------------------ the pipeline

    def update(self, decay=None, *, weight=None, rounding: str = "nearest", seed: int = 0, step: int = 0,
               skip_nonfinite: bool = False, sources=None) -> None:
        """Refused: an offloaded shadow is updated by its face's engine (through ``update_checked``)."""
        raise TypeError("an offloaded shadow is updated through its average (fastema.torch.EMA(offload=...))")

    def scan_groups(self, flags: dict | None = None) -> dict:
        """Refused: an offloaded average takes no skip flags (``skip_nonfinite`` is refused with it)."""
        raise ValueError("an offloaded average takes no skip flags (skip_nonfinite=True)")

    def update_checked(self, weights_by_device, rounding: str, seed: int, step: int, skip_if, plan=None,
                       given: int | None = None) -> None:
        """Queue the fold and stage every window (the addresses were checked by the caller)."""
        if skip_if is not None or plan is not None or given is not None:
            raise ValueError("an offloaded average takes no skip flags and no device plan")
        self._raise_failed()
        self._spare = None                                        # no swap is on (updates are refused then)
        record = self._queue.open()
        self._queue.submit(record, stage, "fold", self._fold, record, weights_by_device["cpu"], rounding, seed, step)
        try:
            self._stage(record)
        except BaseException:
            q = self._queue
            with q.cv:
                record.aborted = True
                q.cv.notify_all()
            q.settle()                                            # every job has ended: no slot is read now
            self._resync()
            raise

    def queued(self, undo: Callable[[], None]) -> None:
        """``undo`` puts the plan back as it was before the update just queued (see
        :class:`fastema.average.Average`); it is called if that update is the first one lost."""
        self._queue.queued(undo)

    def bias_correct(self, alpha: float, *, skip_if=None) -> None:
        """BEMA's output row, once the update just queued has folded every window (a job of its own)."""
        record = self._queue.records[-1]
        self._queue.submit(record, self._bema, record, float(alpha))

    def _stage(self, record: Record) -> None:
        """Every window into its slot, in order, each once its slot is free (see the module); a window
        folded in place is handed over as it is, and waited for at the end."""
        started = []
        cv = self._queue.cv
        for i in range(len(self.src.windows)):
            if self._in_place[i]:
                with cv:
                    record.staged.append((i, None, None))
                    cv.notify_all()
                continue
            ring = self._ring_of[self.src.device_of(i)]
            c = ring.next
            ring.next ^= 1
            with cv:
                while ring.done[c] != ring.uses[c]:
                    last = ring.last[c]
                    if last is not None and last.error is not None:
                        break
                    cv.wait()
            if ring.done[c] != ring.uses[c]:                      # the fold that read it failed: raise that
                self.join()
                raise RuntimeError("an offloaded fold failed")    # join() raises; this line is not reached
            if ring.stream is not None and ring not in started:
                current = torch.cuda.current_stream(torch.device(ring.device))
                ring.stream.wait_stream(current)                  # the optimizer's writes come first
                started.append(ring)
            event = self._stage_window(ring, i, c)
            with cv:
                ring.uses[c] += 1
                ring.last[c] = record
                record.staged.append((i, c, event))
                cv.notify_all()
        for ring in started:                                      # the next step may write the weights
            torch.cuda.current_stream(torch.device(ring.device)).wait_event(ring.packed)
        in_place = sum(self._in_place)
        if in_place:                                              # the weights stay until these are folded
            with cv:
                while record.in_place < in_place and record.error is None:
                    cv.wait()
            if record.in_place < in_place:
                self.join()
                raise RuntimeError("an offloaded fold failed")    # join() raises; this line is not reached

    def _stage_window(self, ring: Ring, i: int, c: int):
        """Window ``i`` packed into chunk ``c`` and, through host slots, copied into slot ``c``; the
        event the fold waits for (None on the CPU)."""
        nbytes = self.src.nbytes_of(i)
        if not ring.cuda:
            stage("pack", self._pack, i, ring.chunk_at[c])
            if ring.through_host:                                 # the GPU's pipeline, run on the CPU (tests)
                ring.slots[c][:nbytes].copy_(ring.chunks[c][:nbytes])
            return None
        with torch.cuda.stream(ring.stream):
            stage("pack", self._pack, i, ring.chunk_at[c])
            ring.packed = torch.cuda.Event()
            ring.packed.record(ring.stream)
            ring.slots[c][:nbytes].copy_(ring.chunks[c][:nbytes], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(ring.stream)
        return copied

    def _pack(self, i: int, chunk: int) -> None:
        self.src.pack(i, chunk)                                   # window i of the sources -> the chunk

    def _fold(self, record: Record, weights, rounding: str, seed: int, step: int) -> None:
        """The worker's job for one update: every window, as it is staged (see the module)."""
        stochastic = rounding == "stochastic"
        keys: dict = {}
        cv = self._queue.cv
        for n in range(len(self.src.windows)):
            with cv:
                while len(record.staged) <= n and not record.aborted:
                    cv.wait()
                if len(record.staged) <= n:
                    raise Aborted()
                i, c, event = record.staged[n]
            if event is not None:
                event.synchronize()                               # the copy into the slot has landed
            gi = self.src.windows[i].gi
            if stochastic and gi not in keys:
                keys[gi] = sr_key(seed + (gi << 32), step)
            ring = self._ring_of[self.src.device_of(i)]
            stage("fold window", self._fold_window, i, None if c is None else ring.slot_at[c], weights, stochastic,
                  keys.get(gi, 0))
            record.written = True
            with cv:
                if c is None:
                    record.in_place += 1
                else:
                    ring.done[c] += 1
                cv.notify_all()

    def _fold_window(self, i: int, slot: int | None, weights, stochastic: bool, key: int) -> None:
        self.src.fold(i, slot, self._rows_at[self.src.windows[i].gi], weights, stochastic, key)

    def _bema(self, record: Record, alpha: float) -> None:
        for i, c, _ in record.staged:
            ring = self._ring_of[self.src.device_of(i)]
            self.src.bema(i, None if c is None else ring.slot_at[c], self._rows_at[self.src.windows[i].gi], alpha)

    def join(self) -> None:
        """Wait for every queued fold; re-raise the first error of one. The average is then as it
        was after the last update that finished, and the plan (``updates``, ``calls``) too: the
        update that failed, and every call made after it, are not counted. (The buffers copied
        from the model, not averaged, keep the latest call's values until the next update.)"""
        try:
            self._queue.join()
        except BaseException:
            if self._queue.settled():
                self._resync()
            raise

    def _raise_failed(self) -> None:
        try:
            self._queue.raise_failed()
        except BaseException:
            if self._queue.settled():
                self._resync()
            raise

    def _resync(self) -> None:
        """After an update that ended with an error: no slot is waited on any more, and the caller's
        stream (what writes the weights next, and the synchronous copies through chunk 0) comes after
        whatever the side stream had been given (packs, copies into the slots)."""
        for ring in self._ring_of.values():
            ring.resync()
            after_side_stream(ring)

    # ------------------------------------------------------------ copies in and out (synchronous)

    def _each_window(self, run: Callable[[int, Ring], None]) -> None:
        """``run(i, ring)`` for every window, staged through slot 0 of its ring, waiting for each copy."""
        self.join()
        for ring in self._ring_of.values():                      # the side stream's last copies come first
            after_side_stream(ring)
        for i in range(len(self.src.windows)):
            run(i, self._ring_of[self.src.device_of(i)])

    def _to_slot(self, i: int, ring: Ring) -> None:
        """Window ``i`` of the sources into host slot 0 (packed, copied, waited for)."""
        nbytes = self.src.nbytes_of(i)
        stage("pack", self._pack, i, ring.chunk_at[0])
        if ring.through_host:
            ring.slots[0][:nbytes].copy_(ring.chunks[0][:nbytes])     # blocking: the copy has landed

    def _from_slot(self, i: int, ring: Ring) -> None:
        """Window ``i`` of the sources <- host slot 0."""
        nbytes = self.src.nbytes_of(i)
        if ring.through_host:
            ring.chunks[0][:nbytes].copy_(ring.slots[0][:nbytes])
        self.src.unpack(i, ring.chunk_at[0])
        if ring.cuda:
            torch.cuda.current_stream(torch.device(ring.device)).synchronize()   # slot 0 is reused next

    def copy_from_sources(self, *, skip_if=None) -> None:
        """Every row <- the sources (through the chunks, synchronously)."""
        self.refresh()
        self.copy_from_sources_checked()

    def copy_from_sources_checked(self, skip_if=None) -> None:
        def run(i: int, ring: Ring) -> None:
            self._to_slot(i, ring)
            self.src.copy_in(i, ring.slot_at[0], self._rows_at[self.src.windows[i].gi], self.rows)

        self._each_window(run)

    def copy_to_sources(self, row: int = 0) -> None:
        """The sources <- row ``row`` (rounded to their dtypes): host shadow -> slot -> chunk -> sources,
        window by window. A Ctrl-C is held until every window is written (raised then), so the model
        holds the whole average or, if it arrives before, its own weights: never some of each, as
        the plain average's copy (one launch) never does."""
        self.check_row(row)
        self.join()
        self.check_sources()

        def run(i: int, ring: Ring) -> None:
            self.src.copy_out(i, ring.slot_at[0], self._rows_at[self.src.windows[i].gi], row)
            stage("from slot", self._from_slot, i, ring)

        with ctrl_c_held():                       # the whole model written, or none of it (reliability L3)
            self._each_window(run)

    def backup(self) -> HostBackup:
        """A backup of the sources for a swap, kept in host memory (the device keeps no copy)."""
        return HostBackup(self)


class HostBackup:
    """The raw weights while the average is swapped in: every window's bytes in one host buffer
    per ring (``shadow._spare``), released at the next update (updates are refused while swapped)."""

    def __init__(self, shadow: OffloadedShadow):
        self.shadow = shadow
        self.copy_from_sources()

    def rebind(self, sources) -> None:
        pass                                                      # the shadow follows its sources itself

    def parts(self, what: str = "swap backup") -> list:
        return []                                                 # the shadow's parts list its buffer

    def _buffers(self) -> list:
        s = self.shadow
        if s._spare is None:
            total = sum(s.src.nbytes_of(i) for i in range(len(s.src.windows)))
            s._spare = [torch.empty(total, dtype=torch.uint8)]
        return s._spare

    def _spans(self):
        s, at = self.shadow, 0
        for i in range(len(s.src.windows)):
            n = s.src.nbytes_of(i)
            yield i, s._ring_of[s.src.device_of(i)], at, n
            at += n

    def copy_from_sources(self) -> None:
        s = self.shadow
        s.join()
        s.refresh()
        buf = self._buffers()[0]
        for i, ring, at, n in self._spans():
            s._to_slot(i, ring)
            buf[at:at + n].copy_(ring.slots[0][:n])

    def copy_to_sources(self) -> None:
        s = self.shadow
        if s._spare is None:
            raise RuntimeError("the offloaded EMA's backup of the raw weights is gone (an update ran while the "
                               "average was swapped in); the model keeps the average")
        s.check_sources()
        buf = s._spare[0]
        with ctrl_c_held():                       # every window back, or none (the swap holds it too)
            for i, ring, at, n in self._spans():
                ring.slots[0][:n].copy_(buf[at:at + n])
                s._from_slot(i, ring)

