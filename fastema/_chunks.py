"""ChunkedSources: a shadow's sources read one window at a time, through fixed-size chunks.

An offloaded average (``fastema.torch.EMA(model, offload="cpu")``) keeps its shadow in host
memory and never copies the whole model at once: each (device, source dtype, shadow dtype) group's
row is cut into *windows* of at most one chunk (``chunk_bytes`` of the sources' dtype). A window
holds several small sources, or part of a large one; a source may span many windows. For window
``i``:

- :meth:`ChunkedSources.pack` copies its pieces of the sources, in their own dtype, into a chunk
  on the sources' device (one ``"copy"`` launch, on the framework's current stream);
- the caller moves the chunk into host memory (a device-to-host copy; on the CPU the chunk is
  already there);
- :meth:`ChunkedSources.fold` lerps that host copy into the window's columns of the host shadow
  (one ``"lerp"`` launch on the host), exactly as :class:`fastema.FlatShadow` would update them: the
  same element arithmetic, and stochastic rounding keyed by each element's place in the whole
  group (``_launch.tables``'s ``base``), so the result equals a plain shadow's bit for bit.

The columns follow the group's geometry (:class:`~fastema._layout.LayoutGroup`, built with no
buffer of its own: ``rows=0``): a source's shadow starts where a plain shadow of the same sources
would start it, and with ``split=(rank, ranks)`` only this rank's slice of every group is cut into
windows (``shard_replicas``). Within a chunk every piece starts 16-byte aligned on a GPU (the
kernels' vector path), packed on the CPU.

Framework-free: the caller owns every buffer (chunks, host slots, host shadow rows) and passes
their addresses; each (window, address) is a launch group made on first use, which keeps its
launches (:class:`fastema._launch.Launches`); when the sources move, the groups' tables follow.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Sequence

import numpy as np

from . import _launch
from ._layout import DTYPES, FlatLayout, parse_sources
from ._sources import FollowsSources, SourceTable
from ._steps import LERP
from .kernels.kinds import F64, ITEMSIZE

__all__ = ["ChunkedSources", "Window", "cut"]

# the windows' launch specs (group.launch): a chunk packed from the sources and unpacked into them,
# BEMA's output (a window folded into the host shadow: the per-step lerp's, _steps.LERP)
_PACK = _launch.spec("copy", to_shadow=True, row_lo=0, row_hi=1)
_UNPACK = _launch.spec("copy", to_shadow=False, row_lo=0, row_hi=1)
_BEMA = _launch.spec("bema")


class Window(NamedTuple):
    """One window of a group's row: its pieces, each ``count`` elements of source ``slot`` (the
    group's slot) from element ``first`` on, at element ``off`` of the chunk and column ``col`` of
    the host shadow rows; ``place`` is each piece's first element in the group's unpadded row (the
    noise index of stochastic rounding). ``extent``: elements of the chunk the window uses."""
    gi: int
    slot: np.ndarray
    first: np.ndarray
    count: np.ndarray  # type: ignore[assignment]   # (a field, not tuple.count)
    off: np.ndarray
    col: np.ndarray
    place: np.ndarray
    extent: int


def cut(group, gi: int, elems: int, unit: int) -> list[Window]:
    """The windows of ``group``'s held row (every source, or this rank's slice): pieces in row
    order, each window at most ``elems`` elements of chunk, each piece starting at a multiple of
    ``unit`` in it (a piece split at a window's end continues at element 0 of the next)."""
    if elems < unit:
        raise ValueError(f"a chunk of {elems} elements cannot hold one aligned piece of {unit}")
    counts = np.asarray(group.counts, np.int64)
    packed = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    starts = np.asarray(group.starts, np.int64)
    out: list[Window] = []
    cur: list[tuple[int, int, int, int, int, int]] = []
    off = 0

    def close() -> None:
        if cur:
            a = np.asarray(cur, np.int64).reshape(-1, 6)
            out.append(Window(gi, a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5],
                              int(a[-1, 3] + a[-1, 2])))
            cur.clear()

    for s, f, c in zip(group.pieces, group.piece_first, group.piece_count):
        s, f, c = int(s), int(f), int(c)
        while c > 0:
            at = -(-off // unit) * unit
            if at >= elems:
                close()
                at = 0
            take = min(c, elems - at)
            cur.append((s, f, take, at, int(starts[s]) + f - group.lo, int(packed[s]) + f))
            off, f, c = at + take, f + take, c - take
            if off >= elems:
                close()
                off = 0
    close()
    return out


class _SourceLayout(FlatLayout):
    """The sources' groups with no shadow buffer (``rows=0``): their geometry and the tables the
    :class:`~fastema._sources.SourceTable` keeps current. A move tells the owner which group."""

    def __init__(self, bufs, shadow_kind_of, split, moved):
        super().__init__(bufs, shadow_kind_of, 0, split)
        self._moved = moved

    def set_addresses(self, g, addresses: list) -> None:
        super().set_addresses(g, addresses)
        self._moved(self.groups.index(g), addresses)


class ChunkedSources(FollowsSources):
    """The sources of a host shadow, cut into windows of at most ``chunk_bytes`` (see the module).

    Args:
        sources: a sequence of arrays/tensors, or a mapping ``name -> array``.
        dtype: the host shadow's dtype (``"float32"``, ``"same"``...), which sets the columns' geometry.
        chunk_bytes: the most bytes of one window (of the sources' dtype), >= 16.
        split: ``(rank, ranks)``: only this rank's slice of every group (see :class:`fastema.FlatShadow`).
    """

    def __init__(self, sources: Sequence | Mapping, *, dtype: str, chunk_bytes: int,
                 split: tuple[int, int] | None = None):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, (int, np.integer)) or chunk_bytes < 16:
            raise ValueError(f"offload_chunk must be a number of bytes >= 16, got {chunk_bytes!r}")
        names, tensors, bufs = parse_sources(sources)
        self.names = names
        self.layout = _SourceLayout(bufs, lambda b: b.kind if dtype == "same" or b.kind == F64 else DTYPES[dtype],
                                    split, self._moved)
        self.source_table = SourceTable(names, tensors, self.layout, bufs)
        self._addresses = [[bufs[i].address for i in g.members] for g in self.layout.groups]
        self.windows: list[Window] = []
        for gi, g in enumerate(self.layout.groups):
            size = ITEMSIZE[g.src_kind]
            unit = 16 // size if _launch.is_cuda(g.device) else 1
            self.windows += cut(g, gi, (int(chunk_bytes) // size) // unit * unit, unit)
        self._packs: dict = {}        # (window, chunk address) -> pack group (sources <-> chunk)
        self._folds: dict = {}        # (window, slot address, rows address) -> fold group
        self._direct: dict = {}       # (window, rows address) -> fold group reading the sources in place

    # ------------------------------------------------------------ what the owner reads

    def __len__(self) -> int:
        return len(self.source_table)

    @property
    def sources(self) -> list:
        return self.source_table.sources

    def device_of(self, i: int) -> str:
        """The device of window ``i``'s sources (and of the chunk it is packed into)."""
        return self.layout.groups[self.windows[i].gi].device

    def nbytes_of(self, i: int) -> int:
        """Bytes of chunk window ``i`` uses (its extent, in the sources' dtype)."""
        w = self.windows[i]
        return w.extent * ITEMSIZE[self.layout.groups[w.gi].src_kind]

    def chunk_bytes(self, device: str) -> int:
        """The chunk size a ring on ``device`` needs: the largest window there (bytes)."""
        return max((self.nbytes_of(i) for i in range(len(self.windows)) if self.device_of(i) == device), default=0)

    def tables(self) -> list:
        """Every launch table made (the source layout's, the packs', the folds'): for ``memory()``."""
        out = []
        for g in self.layout.groups:
            out.append(g.tables)
            if g.scan is not g:
                out.append(g.scan.tables)
        out += [g.tables for g in (*self._packs.values(), *self._folds.values(), *self._direct.values())]
        return out

    @property
    def follows(self) -> SourceTable:
        """What follows the sources (:class:`~fastema._sources.FollowsSources`): the table."""
        return self.source_table

    def _moved(self, gi: int, addresses: list) -> None:
        """Group ``gi``'s sources are now at ``addresses``: the tables of its windows' pack and in-place
        fold groups follow (their launches read the new ones at their next call)."""
        self._addresses[gi] = list(addresses)
        src = self.layout.groups[gi]
        for (i, _), g in self._packs.items():
            if self.windows[i].gi == gi:
                g.tables = _launch.update_addresses(g.tables, self._piece_addresses(i), src.device, src.current_stream)
        for (i, _), g in self._direct.items():
            if self.windows[i].gi == gi:                  # host sources: the tables are host arrays
                g.tables = g.tables._replace(seg_addr=self._piece_addresses(i))

    # ------------------------------------------------------------ the launches

    def _piece_addresses(self, i: int) -> np.ndarray:
        w = self.windows[i]
        g = self.layout.groups[w.gi]
        at = np.asarray(self._addresses[w.gi], np.int64)
        return at[w.slot] + w.first * ITEMSIZE[g.src_kind]

    def _pack_group(self, i: int, chunk: int) -> _launch.Group:
        """Window ``i``'s pieces of the sources and the chunk at address ``chunk`` (its "shadow", of the
        sources' kind): a launch group, made at first use."""
        g = self._packs.get((i, chunk))
        if g is None:
            w = self.windows[i]
            src = self.layout.groups[w.gi]
            t = _launch.tables(self._piece_addresses(i), w.count, chunk + w.off * ITEMSIZE[src.src_kind], src.device,
                               src.current_stream, row_stride=w.extent, handed_over=src.backend.HANDS_OVER)
            g = self._packs[(i, chunk)] = _launch.Group(src.device, src.src_kind, src.src_kind, t, src.current_stream)
        return g

    def pack(self, i: int, chunk: int) -> None:
        """Window ``i``'s pieces of the sources -> the chunk at address ``chunk`` (on their device, in
        their dtype; on CUDA on the framework's current stream)."""
        self._pack_group(i, chunk).launch_of(_PACK)()

    def unpack(self, i: int, chunk: int) -> None:
        """The sources' pieces of window ``i`` <- the chunk at address ``chunk`` (bits as they are)."""
        self._pack_group(i, chunk).launch_of(_UNPACK)()

    def _fold_group(self, i: int, slot: int, rows: int):
        key = (i, slot, rows)
        g = self._folds.get(key)
        if g is None:
            w = self.windows[i]
            src = self.layout.groups[w.gi]
            t = _launch.tables(slot + w.off * ITEMSIZE[src.src_kind], w.count,
                               rows + w.col * ITEMSIZE[src.shadow_kind], "cpu", follow=False, row_stride=src.n,
                               base=int(w.place[0]))
            g = self._folds[key] = _launch.Group("cpu", src.shadow_kind, src.src_kind, t)
        return g

    def _direct_group(self, i: int, rows: int):
        key = (i, rows)
        g = self._direct.get(key)
        if g is None:
            w = self.windows[i]
            src = self.layout.groups[w.gi]
            if src.device != "cpu":
                raise ValueError("a window is folded in place only from sources in host memory")
            t = _launch.tables(self._piece_addresses(i), w.count, rows + w.col * ITEMSIZE[src.shadow_kind], "cpu",
                               row_stride=src.n, base=int(w.place[0]))
            g = self._direct[key] = _launch.Group("cpu", src.shadow_kind, src.src_kind, t)
        return g

    def fold(self, i: int, slot: int | None, rows: int, weights, stochastic: bool, key: int) -> None:
        """Host shadow rows at address ``rows`` (the group's ``(rows, n)`` buffer) <- the lerp of window
        ``i``'s columns with its host copy at address ``slot`` (``weights``: one per row, host floats;
        ``key``: the group's stochastic-rounding key of this update). ``slot=None``: with the sources
        themselves, where they are (host memory; the caller keeps them still meanwhile)."""
        g = self._direct_group(i, rows) if slot is None else self._fold_group(i, slot, rows)
        g.launch_of(LERP[stochastic])(weights, key)                     # kept by the window's group

    def copy_in(self, i: int, slot: int, rows: int, count: int) -> None:
        """Host shadow rows ``[0, count)`` of window ``i``'s columns <- its host copy at ``slot``."""
        self._fold_group(i, slot, rows).launch("copy", to_shadow=True, row_lo=0, row_hi=count)()

    def copy_out(self, i: int, slot: int, rows: int, row: int) -> None:
        """The host copy at ``slot`` <- row ``row`` of window ``i``'s columns, rounded to the sources' dtype."""
        self._fold_group(i, slot, rows).launch("copy", to_shadow=False, row_lo=row, row_hi=row + 1)()

    def bema(self, i: int, slot: int | None, rows: int, alpha: float) -> None:
        """BEMA's output row of window ``i``'s columns (``row0 <- row1 + alpha * (row0 - row2)``; the
        host copy at ``slot`` is not read, it only names the tables a fold of the window made)."""
        g = self._direct_group(i, rows) if slot is None else self._fold_group(i, slot, rows)
        g.launch_of(_BEMA)(alpha)
