"""A shadow split over data-parallel replicas, by composition: :class:`Split` wraps a *storage*
(device rows, :class:`~fastema.FlatShadow` or :class:`~fastema.WindowShadow`; staged host rows,
:class:`~fastema.torch._placement.offload.OffloadedShadow`) made with ``split=(rank, ranks)``, which
keeps and updates this rank's slice of every group's row, and adds what a split needs: its views
are this rank's pieces, 1-D (``view``: ``(count,)``, ``state_view``: ``(rows, count)``; empty where
it holds none of a source); :meth:`Split.specs` describes them to the checkpoint side; ``swap`` and
``copy_to_sources`` are collectives over ``group`` that write the gathered average row, bucket by
bucket (:mod:`.gather`). Everything else is the storage's, forwarded: its updates (a fold queued on
a worker thread for an offloaded one, which every read here waits for first), its capabilities.

No class combines two placements: ``Split(OffloadedShadow(..., split=...), ...)`` is an offloaded
average split over replicas, ``SplitWindow(WindowShadow(..., split=...), ...)`` a window's. The
group, the one collective that checks the replicas agree and the split's run id are
:mod:`.replicas`'.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Generic, TypeVar, overload

import torch.distributed as dist

from ..._interrupts import ctrl_c_held
from ..._sources import FollowsSources, SourceFollower
from ...flat import FlatShadow
from .._sharding import params as _sharded
from . import gather

__all__ = ["Split", "SplitWindow", "Stored", "split_of"]

T = TypeVar("T")


def split_of(group) -> tuple[int, int]:
    """``(rank, ranks)`` of this process in ``group``: the slice its storage keeps."""
    return dist.get_rank(group), dist.get_world_size(group)


class Stored(Generic[T]):
    """A member of a wrapper that is its ``storage``'s own, read (and set) there: the one
    delegation of :class:`Split`'s forwarded members, typed (``Stored[int]``), so mypy holds the
    wrapper to the shadow protocols as it does the storage; no ``__getattr__``."""

    name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> Stored[T]: ...

    @overload
    def __get__(self, obj: object, owner: type) -> T: ...

    def __get__(self, obj: Any, owner: type) -> Any:
        return self if obj is None else getattr(obj.storage, self.name)

    def __set__(self, obj: Any, value: T) -> None:
        setattr(obj.storage, self.name, value)


class Split(FollowsSources):
    """``storage`` (made with ``split=split_of(group)``) split over the ranks of ``group``: see the
    module. ``bucket``: the bytes of one gather, all ranks' parts together; ``split_id``: the
    split's run id (the same on every rank:
    :func:`fastema.torch._placement.replicas.check_replicas`)."""

    exact_swap = True           # the raw weights' window kept, gathered back: exact for every dtype

    def __init__(self, storage, group, bucket: int, split_id: int):
        self.storage = storage
        self.group = group
        self.gather_bucket: int | None = bucket        # declared: the bytes one gather carries
        self.split_id: int | None = split_id           # a load takes the checkpoint's
        self.rank, self.ranks = split_of(group)
        if storage.layout.split != (self.rank, self.ranks):
            raise ValueError(f"the storage holds the slice {storage.layout.split} of its sources, "
                             f"this rank is {(self.rank, self.ranks)} of the group: make it with "
                             f"split=split_of(group)")
        self.names, self.rows, self.layout = storage.names, storage.rows, storage.layout
        self.folds_later, self.host_plan_only = storage.folds_later, storage.host_plan_only
        self.holds_interrupts, self.placement = storage.holds_interrupts, storage.placement
        self.in_place = storage.in_place
        self._raw: FlatShadow | None = None      # the raw weights' window while swapped in (only)
        self._swapped_row: int | None = None
        self._reserved: tuple[FlatShadow | None, gather.Buckets] | None = None   # reserve()

    def __repr__(self) -> str:
        return f"Split({self.storage!r}, rank={self.rank} of {self.ranks})"

    def __len__(self) -> int:
        return len(self.storage)

    def parts(self, what: str = "shadow") -> list:
        """The storage's parts, and during a swap the raw weights' window (``"swap backup"``)."""
        raw = self._raw.parts("swap backup") if self._raw is not None else []
        return self.storage.parts(what) + raw

    def specs(self, group_mesh, sharded: dict | None = None,
              dim: int | None = None) -> dict[str, _sharded.Spec]:
        """``name -> Spec`` of every source: its shape and every rank's ``(first, count)`` piece
        (``_sharded``'s ``pieces`` layout: exports gather the full tensor, a load cuts this rank's).
        HSDP (``sharded``: the parameters' DTensor specs, split over mesh dimension ``dim``): the
        pieces are of the local shard, and the spec keeps the DTensor's layout around them."""
        from torch.distributed.tensor import Replicate

        out = {}
        for i, (name, t) in enumerate(zip(self.names, self.sources)):
            g, slot = self.layout.where[i]
            counts = int(g.counts[slot])
            where = []
            for r in range(self.ranks):
                lo, hi = gather.window(g, r, self.ranks)
                first = min(max(lo - int(g.starts[slot]), 0), counts)
                last = min(max(hi - int(g.starts[slot]), 0), counts)
                where.append((first, max(last - first, 0)))
            pieces = (tuple(t.shape), tuple(where))
            slices = t.is_contiguous() and t.numel() > 0
            if sharded is not None and name in sharded:
                out[name] = sharded[name]._replace(pieces=pieces, slices=slices, replica_dim=dim)
            else:
                out[name] = _sharded.Spec(group_mesh, (Replicate(),), t.shape, tuple(t.stride()),
                                          pieces=pieces, slices=slices)
        return out

    # ------------------------------------------------------------ this rank's pieces

    def view(self, source: int | str, row: int | None = 0):
        """This rank's piece of the average of ``source`` (``row=None``: every row, ``(rows,
        count)``), after the storage's pending folds."""
        if row is not None:
            self.check_row(row)
        self.storage.join()
        g, _, count, col = self.layout.piece(self.storage.source_table.position(source))
        return g.buffer[:, col:col + count] if row is None else g.buffer[row, col:col + count]

    def state_view(self, source: int | str):
        """Everything a checkpoint keeps of ``source`` here: every row of its piece (a window's
        mean and sums: the ring is :meth:`SplitWindow.ring_view`'s)."""
        self.storage.join()
        g, _, count, col = self.layout.piece(self.storage.source_table.position(source))
        return g.buffer[:, col:col + count]

    # ------------------------------------------------------------ reading the average: collectives

    @property
    def swapped(self) -> bool:
        return self._swapped_row is not None

    def swap_modes(self, lossy: bool = False) -> list:
        return []                                # no swap kernel: a gather, exact for every dtype

    def reserve(self, row: int, swap: bool) -> None:
        """Allocate what the next :meth:`swap` (``swap``) or :meth:`copy_to_sources` of ``row``
        needs, after the checks it makes: its gather buckets, and for a swap in the raw weights'
        window (this rank's window of the sources, copied now). Called inside the ranks' agreement,
        so a failure here (out of memory on one rank) is a refusal every rank raises, never a rank
        leaving the read after the others entered its gathers."""
        self.release()
        self.storage.join()
        self.storage.source_table.refresh()
        if swap and self._swapped_row is not None:
            if row != self._swapped_row:
                raise RuntimeError(f"row {self._swapped_row} is swapped in; swap it back before "
                                   f"swapping row {row}")
            assert self._raw is not None
            self._reserved = (None, gather.reserve(self._raw.layout, self))
            return
        self.check_row(row)
        mine = dict(zip(self.names, self.sources))
        raw = FlatShadow(mine, dtype="same", split=(self.rank, self.ranks)) if swap else None
        self._reserved = (raw, gather.reserve(self.layout, self))

    def release(self) -> None:
        """Free what :meth:`reserve` allocated for a read that was then refused."""
        self._reserved = None

    def _take(self, row: int, swap: bool) -> tuple[FlatShadow | None, gather.Buckets]:
        if self._reserved is None:                   # not reserved by a face: now (a direct call)
            self.reserve(row, swap)
        reserved, self._reserved = self._reserved, None
        assert reserved is not None
        return reserved

    def swap(self, row: int = 0, *, lossy: bool = False) -> None:
        """Put average ``row`` into the sources (gathered), keeping this rank's window of the raw
        weights; called again, gather the raw windows back. Every rank of the group must call it."""
        raw, buckets = self._take(row, True)
        self.storage.source_table.refresh()
        if self._swapped_row is None:
            self._raw, self._swapped_row = raw, row  # from here the raw window is the way back
            written: list = []
            try:
                with ctrl_c_held():
                    gather.gather_into_sources(self.layout, row, self, buckets, written)
            except BaseException:
                if not written:                      # nothing of it went in: not swapped (H7)
                    self._swapped_row, self._raw = None, None
                raise
        else:
            assert self._raw is not None
            with ctrl_c_held():
                gather.gather_into_sources(self._raw.layout, 0, self, buckets)
            self._swapped_row, self._raw = None, None        # its memory back until the next swap

    def copy_to_sources(self, row: int = 0) -> None:
        """Write average ``row`` into the sources (gathered): a collective over the group."""
        _, buckets = self._take(row, False)
        self.storage.source_table.refresh()
        with ctrl_c_held():                          # the whole model written, or none of it (L3)
            gather.gather_into_sources(self.layout, row, self, buckets)

    # ------------------------------------------------------------ the storage's, forwarded

    sources: Stored[list] = Stored()
    groups: Stored[list[dict]] = Stored()
    nbytes: Stored[int] = Stored()
    skipped: Stored[dict] = Stored()
    written: Stored[Callable[[], list]] = Stored()
    check_row: Stored[Callable[[int], None]] = Stored()
    join: Stored[Callable[[], None]] = Stored()
    backup: Stored[Callable[[], Any]] = Stored()
    update: Stored[Callable[..., None]] = Stored()        # (decay, *, weight, rounding, seed, step)
    scan_groups: Stored[Callable[..., dict]] = Stored()
    scan_rows: Stored[Callable[[dict], bool]] = Stored()
    bias_correct: Stored[Callable[..., None]] = Stored()  # (alpha, *, skip_if)
    copy_from_sources: Stored[Callable[..., None]] = Stored()
    copy_from_sources_checked: Stored[Callable[..., None]] = Stored()
    queued: Stored[Callable[[Callable[[], None]], None]] = Stored()

    @property
    def follows(self) -> SourceFollower:
        """What follows the sources (:class:`~fastema._sources.FollowsSources`): the storage."""
        return self.storage

    def sources_checked(self) -> ContextManager[None]:
        """A split's swap gathers the other ranks' pieces: its sources are checked as always
        (:meth:`fastema._shadow.Capabilities.sources_checked`'s default)."""
        return contextlib.nullcontext()

    def update_checked(self, weights_by_device: dict | None, rounding: str, seed: int, step: int,
                       skip_if, plan=None, given=None) -> None:
        storage = self.storage
        if given is None:                        # the host plan's call (offloaded storages: all)
            storage.update_checked(weights_by_device, rounding, seed, step, skip_if, plan)
        else:
            storage.update_checked(weights_by_device, rounding, seed, step, skip_if, plan,
                                   given=given)



class SplitWindow(Split):
    """A window average's shadow (:class:`~fastema.WindowShadow`, made with ``split=``) split over
    replicas: the mean, the compensated sums and the ring each a slice a rank
    (``WindowAverage(model, W, shard_replicas=...)``)."""

    pushes: Stored[int] = Stored()
    push: Stored[Callable[[], None]] = Stored()
    restart: Stored[Callable[[], None]] = Stored()
    ring_view: Stored[Callable[[int | str], Any]] = Stored()   # this rank's piece of the ring
