"""FlatLayout: where a shadow's values live: one flat buffer per (device, source dtype,
shadow dtype) group, ``rows`` deep, with the segment tables one launch needs and views
shaped like the sources.

A layout knows its groups' shapes, layouts and addresses but not the source objects: those
are the :class:`~fastema._sources.SourceTable`'s. The shadows (:class:`fastema.FlatShadow`,
:class:`fastema.WindowShadow`) are built from one of each.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _backends, _launch
from ._backends import Buf, describe, disjoint, empty
from ._shadow import Capabilities
from .kernels import kinds
from .kernels.kinds import BF16, F16, F32, F64, ITEMSIZE, KIND_NAMES

if TYPE_CHECKING:
    from ._sources import SourceTable

DTYPES = {"float32": F32, "bfloat16": BF16, "float16": F16, "float64": F64}


def parse_sources(sources) -> tuple[list[str], list, list]:
    """``(names, tensors, descriptions)`` of a shadow's sources, every check made (types, dtypes,
    layouts, no shared memory), nothing kept."""
    if isinstance(sources, Mapping):
        names, tensors = [str(k) for k in sources.keys()], list(sources.values())
    elif isinstance(sources, (str, bytes)) or not hasattr(sources, "__iter__") or hasattr(sources, "shape"):
        one = " (one array: pass [x])" if hasattr(sources, "shape") else ""
        raise TypeError(f"sources must be a sequence of arrays/tensors or a mapping name -> array, "
                        f"got {type(sources).__name__}{one}")
    else:
        tensors = list(sources)
        names = [str(i) for i in range(len(tensors))]
    if not tensors:
        raise ValueError("sources is empty: give the arrays/tensors to average")
    for n, t in zip(names, tensors):
        _backends.dlpack.refuse_moving(t, f"source {n!r}")
    bufs = [describe(t, f"source {n!r}") for n, t in zip(names, tensors)]
    disjoint(bufs, [f"source {n!r}" for n in names])
    return names, tensors, bufs


def valid_counts(names: list[str], bufs: list[Buf], valid: Mapping[str, int] | None) -> list[int] | None:
    """Each source's elements that hold values, from ``valid`` (``name -> count``; a source not
    named: all of them): a padded source's first ``count`` elements (a ZeRO-3 partition's, before
    the padding DeepSpeed never writes), the rest averaged but never scanned for inf/NaN."""
    if valid is None:
        return None
    if not isinstance(valid, Mapping):
        raise TypeError(f"valid must be a mapping name -> count of a padded source's values, got "
                        f"{type(valid).__name__}")
    valid = {str(k): v for k, v in valid.items()}             # names as the sources' (a list's: "0", "1"...)
    if not valid:
        return None
    unknown = sorted(set(valid) - set(names))
    if unknown:
        raise ValueError(f"valid names {unknown}, which are not sources: give counts of the sources' names")
    counts = [b.numel for b in bufs]
    out = []
    for name, numel in zip(names, counts):
        v = valid.get(name, numel)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= numel:
            raise ValueError(f"valid[{name!r}] must be an int from 0 to its {numel} elements, got {v!r}")
        out.append(int(v))
    return out


def window(n: int, unit: int, split: tuple[int, int] | None) -> tuple[int, int]:
    """The slice ``[lo, hi)`` of a row of ``n`` elements that rank ``r`` of ``w`` holds (``split = (r,
    w)``; None: all of it): contiguous, its bounds multiples of ``unit`` (16 bytes of the shadow) but
    the last rank's end, each slice at most ``ceil(n / w) + unit`` elements."""
    if split is None:
        return 0, n
    r, w = split
    cut = lambda i: n if i >= w else unit * ((i * n) // (w * unit))   # noqa: E731
    return cut(r), cut(r + 1)


class _WholeSources(_launch.Launches):
    """A group's sources as the non-finite scan walks them: its fields but ``tables``, which walk
    every source's values entire (the scan reads the sources only), and its own launches. Under
    ``shard_replicas`` every rank scans its whole replica, so every rank skips an update alike with
    no collective; a source with padding (``valid``: a ZeRO-3 partition's tail, memory DeepSpeed
    never writes) is walked up to its padding only."""

    def __init__(self, group: "LayoutGroup", tables):
        self._group, self.tables = group, tables
        self._kept: dict = {}

    def __getattr__(self, name: str):
        return getattr(self._group, name)


class _OwnRows(_WholeSources):
    """A group's own buffer seen as the sources, for the scan of the averages
    (:meth:`fastema.FlatShadow.scan_rows`): its tables walk the buffer, of the shadow's kind."""

    def __init__(self, group: "LayoutGroup", tables):
        super().__init__(group, tables)
        self.src_kind = group.shadow_kind


class LayoutGroup(_launch.Launches):
    """Sources of one (device, source dtype, shadow dtype) and their flat shadow buffer.

    It is a launch group (:class:`fastema._launch.Launches`: the fields a launch reads, device,
    shadow_kind, src_kind, tables, current_stream, and the launches it keeps, which follow its
    tables when the sources move); ``backend`` is its sources' adapter.

    With ``split = (rank, ranks)`` the buffer holds only this rank's slice of the group's row
    (:func:`window`), the same elements at the same places as the whole group's buffer has them
    from ``lo`` on: the pieces of the sources that fall in it are the launches' segments, keyed
    by their place in the whole group (stochastic rounding draws the whole shadow's bits)."""

    def __init__(self, members: list[int], bufs: list[Buf], shadow_kind: int, rows: int,
                 split: tuple[int, int] | None = None, valid: list[int] | None = None):
        first = bufs[0]
        self._kept: dict = {}                        # its launches (Launches)
        self.members = members                       # positions in the shadow's source list
        self.device = first.device
        self.src_kind = first.kind
        self.shadow_kind = shadow_kind
        self.framework = first.framework
        self.backend = _backends.backend_named(first.framework)
        self.current_stream = _backends.stream_getter(first.framework, first.device)
        self.shapes = [b.shape for b in bufs]
        self.orders = [b.strides for b in bufs]      # () for C order, else the source's dense layout
        self.counts = [b.numel for b in bufs]
        # On a GPU every source's shadow starts 16-byte aligned (and so does every row), so the
        # kernels' 16-byte vector path serves every source whose own address allows it; the
        # padding is at most 15 bytes a source. On the CPU the shadow is packed.
        pad = 16 // ITEMSIZE[shadow_kind] if _launch.is_cuda(self.device) else 1
        spans = -(-np.asarray(self.counts, np.int64) // pad) * pad
        self.starts = np.concatenate([[0], np.cumsum(spans, dtype=np.int64)[:-1]])   # each source's shadow
        self.whole = int(spans.sum())                              # the whole group's row, padded
        self.lo, hi = window(self.whole, 16 // ITEMSIZE[shadow_kind], split)
        self.n = hi - self.lo                                      # the row length (stride) held here
        self.split = split is not None
        counts = np.asarray(self.counts, np.int64)
        first_el = np.clip(self.lo - self.starts, 0, counts)       # each source's elements held: [first, last)
        last_el = np.clip(hi - self.starts, 0, counts)
        held = last_el > first_el if self.split else np.ones(len(counts), bool)   # a whole group: every source
        self.pieces = np.flatnonzero(held)                         # slots with elements held here
        self.piece_first = first_el[held]                          # the first element held of each
        self.piece_count = (last_el - first_el)[held]
        packed = np.concatenate([[0], np.cumsum(counts)[:-1]])
        base = int(packed[self.pieces[0]] + self.piece_first[0]) if len(self.pieces) else 0
        self.buffer = empty(first, shadow_kind, (rows, self.n))   # owned by fastema
        if pad > 1:                      # the padding zeroed once (nothing writes it later): a
            _backends.zero_(self.buffer)  # scan of the whole buffer finds the averages' inf/NaN
        self.tables = _launch.tables(self.piece_addresses([b.address for b in bufs]), self.piece_count,
                                     self.segments(self.buffer), self.device, self.current_stream,
                                     row_stride=self.n, handed_over=self.backend.HANDS_OVER, base=base)
        self.scan: LayoutGroup | _WholeSources = self                # what the non-finite scan walks
        self._own: _OwnRows | None = None                          # own_rows, made at a first scan
        self.valid = self.counts if valid is None else valid       # each source's elements that hold values
        if self.split or self.valid != self.counts:                # sources whole, padding left out
            self.scan = _WholeSources(self, _launch.tables([b.address for b in bufs], self.valid,
                                                           np.zeros(len(bufs), np.int64), self.device,
                                                           self.current_stream, row_stride=1,
                                                           handed_over=self.backend.HANDS_OVER))

    @property
    def own_rows(self) -> "_OwnRows":
        """What a scan of this group's averages walks: its buffer, every row, as one segment (the
        padding is zero), with launches of its own; made at the first such scan."""
        if self._own is None:
            b = describe(self.buffer, "buffer")
            tables = _launch.tables([b.address], [b.numel], np.zeros(1, np.int64), self.device,
                                    self.current_stream, follow=False)
            self._own = _OwnRows(self, tables)
        return self._own

    def piece_addresses(self, addresses: list) -> list:
        """The addresses of the pieces held here, from the sources' (each source's own in a whole group)."""
        if not self.split:
            return addresses
        size = ITEMSIZE[self.src_kind]
        return [addresses[s] + int(f) * size for s, f in zip(self.pieces, self.piece_first)]

    def segments(self, buffer) -> np.ndarray:
        """Per-piece addresses of row 0 of a ``(rows, n)`` buffer laid out like this group's shadow
        (per source in a whole group)."""
        b = describe(buffer, "buffer")
        return b.address + (self.starts[self.pieces] + self.piece_first - self.lo) * ITEMSIZE[b.kind]

    def strided(self, buffer_rows, slot: int, lead: tuple = ()):
        """The slice of ``buffer_rows`` (one row, or ``(R, n)`` rows with ``lead = (R,)``) that holds
        source ``slot``, shaped and laid out like the source (a whole group's only)."""
        if self.split:
            raise RuntimeError("this shadow holds a slice of the sources (shard_replicas): no source has a "
                               "whole view here; read the average through its face, which gathers it")
        lo = int(self.starts[slot])
        hi = lo + self.counts[slot]
        order = self.orders[slot]
        if lead:
            return _backends.strided(buffer_rows[:, lo:hi], lead + tuple(self.shapes[slot]),
                                     (self.n,) + order if order else ())
        return _backends.strided(buffer_rows[lo:hi], tuple(self.shapes[slot]), order)


class FlatLayout:
    """The groups of a list of described sources, each with a ``(rows, n)`` shadow buffer."""

    def __init__(self, bufs: list[Buf], shadow_kind_of, rows: int, split: tuple[int, int] | None = None,
                 valid: list[int] | None = None):
        keys: dict[tuple, list[int]] = {}
        for i, b in enumerate(bufs):
            keys.setdefault((b.device, b.kind, shadow_kind_of(b)), []).append(i)
        self.rows = rows
        self.split = split
        self.groups = [LayoutGroup(m, [bufs[i] for i in m], sk, rows, split,
                                   None if valid is None else [valid[i] for i in m]) for (_, _, sk), m in keys.items()]
        self.where = {}                                # source position -> (group, slot)
        for g in self.groups:
            for slot, i in enumerate(g.members):
                self.where[i] = (g, slot)

    def set_addresses(self, g: LayoutGroup, addresses: list) -> None:
        """The group's sources are now at ``addresses`` (same layout)."""
        g.tables = _launch.update_addresses(g.tables, g.piece_addresses(addresses), g.device, g.current_stream)
        if g.scan is not g:
            g.scan.tables = _launch.update_addresses(g.scan.tables, addresses, g.device, g.current_stream)

    def view(self, i: int, row: int | None):
        """Shadow row ``row`` of source ``i`` shaped like it (``None``: every row, ``(rows, *shape)``)."""
        g, slot = self.where[i]
        if row is None:
            return g.strided(g.buffer, slot, (self.rows,))
        return g.strided(g.buffer[row], slot)

    def piece(self, i: int) -> tuple[LayoutGroup, int, int, int]:
        """``(group, first element, elements, column in its buffer)`` of the piece of source ``i`` held
        here (all of it in a whole group; ``(group, 0, 0, 0)`` where a split one holds none of it)."""
        g, slot = self.where[i]
        at = int(np.searchsorted(g.pieces, slot))
        if at < len(g.pieces) and g.pieces[at] == slot:
            first = int(g.piece_first[at])
            return g, first, int(g.piece_count[at]), int(g.starts[slot]) + first - g.lo
        return g, 0, 0, 0

    def pieces(self) -> list:
        """Per group: ``(buffer, [(source position, first element, elements, column), ...])``."""
        return [(g.buffer, [(g.members[int(s)], int(f), int(c), int(g.starts[s] + f - g.lo))
                            for s, f, c in zip(g.pieces, g.piece_first, g.piece_count)]) for g in self.groups]

    def describe_groups(self) -> list[dict]:
        return [dict(device=g.device, src_dtype=KIND_NAMES[g.src_kind], shadow_dtype=KIND_NAMES[g.shadow_kind],
                     sources=len(g.members), numel=g.n, buffer=g.buffer) for g in self.groups]

    @property
    def nbytes(self) -> int:
        return sum(g.n * self.rows * ITEMSIZE[g.shadow_kind] for g in self.groups)

    def swap_exact(self) -> bool:
        """True when a swap rounds neither side in any group (equal kinds, or a float32 shadow of
        bfloat16 sources, which a swap packs and unpacks exactly)."""
        return all(g.shadow_kind == g.src_kind or (g.shadow_kind == F32 and g.src_kind == BF16)
                   for g in self.groups)

    def swap_modes(self, swapped: bool, lossy: bool) -> list:
        """The swap kernel mode of each group, or ValueError if a swap would round without ``lossy``."""
        modes = []
        for g in self.groups:
            if g.shadow_kind == g.src_kind:
                modes.append(kinds.EXCHANGE)
            elif g.shadow_kind == F32 and g.src_kind == BF16:
                modes.append(kinds.UNPACK if swapped else kinds.PACK)
            elif lossy:
                modes.append(kinds.EXCHANGE)
            else:
                raise ValueError(
                    f"swapping a {KIND_NAMES[g.shadow_kind]} shadow with {KIND_NAMES[g.src_kind]} sources "
                    f"rounds one side and cannot be undone exactly; pass lossy=True to accept it, or "
                    f"use copy_to_sources() on a copy of the model")
        return modes

    def swap(self, row: int, modes: list) -> None:
        for g, mode in zip(self.groups, modes):
            g.launch("swap", mode=mode, row=row)()

    def copy_out(self, row: int) -> None:
        """The sources <- shadow row ``row``."""
        for g in self.groups:
            g.launch("copy", to_shadow=False, row_lo=row, row_hi=row + 1)()


class SwapState:
    """Which shadow row sits in the sources (between two swaps), and the swap itself."""

    def __init__(self):
        self.row: int | None = None

    def swap(self, layout: FlatLayout, sources, row: int, lossy: bool) -> None:
        """Exchange shadow row ``row`` of ``layout`` and the sources in place, or swap back."""
        if self.row is not None and row != self.row:
            raise RuntimeError(f"row {self.row} is swapped in; swap it back before swapping row {row}")
        modes = layout.swap_modes(self.row is not None, lossy)
        sources.refresh()                  # addresses; a same-address reshape stays inside the kept storage
        layout.swap(row, modes)
        self.row = None if self.row is not None else row

    def refuse(self, what: str) -> None:
        """RuntimeError while a row is swapped in: ``what`` would read or write the wrong values."""
        if self.row is not None:
            raise RuntimeError(f"{what} while shadow row {self.row} is swapped into the sources; "
                               f"call swap() again first")


class ShadowBase(Capabilities):
    """What :class:`fastema.FlatShadow` and :class:`fastema.WindowShadow` share, read through their
    ``layout`` (:class:`FlatLayout`), ``source_table`` (:class:`~fastema._sources.SourceTable`),
    ``_swap`` (:class:`SwapState`) and ``names``: a shadow is built from these, and this class
    only forwards to them."""

    layout: FlatLayout
    source_table: SourceTable
    _swap: SwapState
    names: list

    def view(self, source: int | str, row: int | None = 0) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.source_table)

    @staticmethod
    def check_split(split) -> None:
        """ValueError unless ``split`` is None or ``(rank, ranks)`` with ``0 <= rank < ranks``."""
        if split is not None and not (isinstance(split, tuple) and len(split) == 2
                                      and all(isinstance(v, int) and not isinstance(v, bool) for v in split)
                                      and 0 <= split[0] < split[1]):
            raise ValueError(f"split must be (rank, ranks) with 0 <= rank < ranks, got {split!r}")

    def _refuse_split(self, what: str) -> None:
        if self.layout.split is not None:
            raise RuntimeError(f"{what} of a split shadow would write this rank's slice alone, leaving the sources "
                               f"half raw, half averaged: gather the average first (fastema.torch.EMA's "
                               f"shard_replicas does)")

    @property
    def groups(self) -> list[dict]:
        """One dict per group: device, dtypes, number of sources, elements per row (on a GPU, padded
        so that every source's shadow starts 16-byte aligned), buffer."""
        return self.layout.describe_groups()

    @property
    def swapped(self) -> bool:
        """True while a shadow row sits in the sources (between two :meth:`swap` calls)."""
        return self._swap.row is not None

    @property
    def sources(self) -> list:
        """The source objects, in order."""
        return self.source_table.sources

    def views(self, row: int = 0) -> dict:
        """``name -> view(name, row)`` for every source, in source order."""
        return {n: self.view(i, row) for i, n in enumerate(self.names)}

    def swap_modes(self, lossy: bool = False) -> list:
        """The swap kernel mode of each group, or ValueError if a swap would round without ``lossy``."""
        return self.layout.swap_modes(self.swapped, lossy)

    def check_sources(self) -> None:
        """Follow moved sources and check that every source still has the dtype, shape, layout and
        device it had when the shadow was made (also a change that kept the address); raises
        naming the first that does not. Called before every copy into the sources and export."""
        self.source_table.check_sources()

    def refresh(self) -> None:
        """Follow sources whose storage moved (``param.data = new``; one ``data_ptr()`` per torch
        source); raises, writing nothing, if one changed dtype, shape, layout or device."""
        self.source_table.refresh()

    def sources_checked(self):
        """See :meth:`fastema._shadow.Capabilities.sources_checked` (the source table's
        :meth:`~fastema._sources.SourceTable.checked_now`)."""
        return self.source_table.checked_now()

    def rebind(self, sources) -> None:
        """Track new source objects (same names/order, dtypes, shapes, layouts, devices); refuses
        and keeps the old ones if any differs."""
        self.source_table.rebind(sources)

    def retarget(self, sources) -> None:
        """:meth:`rebind` for torch sources that match the current ones in dtype, shape, strides
        and device (a compiled graph's buffers standing for them): addresses only. Falls back to
        :meth:`rebind`'s full check when they do not match."""
        self.source_table.retarget(sources)
