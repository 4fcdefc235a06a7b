"""WindowShadow: the mean of the last W snapshots of many tensors, one launch per push.

Built from the same pieces as :class:`fastema.FlatShadow` (a layout, a source table, a swap
state), not derived from it: its layout keeps three private rows (the mean, and a
compensated running sum in two rows) of which only the mean is public, and a ring of W
snapshots beside it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

from . import _launch
from ._backends import describe, empty, zero_
from ._layout import DTYPES, FlatLayout, ShadowBase, SwapState, parse_sources
from ._shadow import table_parts
from ._sources import SourceTable
from .flat import FlatShadow
from .kernels.kinds import F32, F64, ITEMSIZE, KIND_NAMES

__all__ = ["WindowShadow"]

_STATE_ROWS = 3            # the mean, then the compensated sum (value, compensation)
_PUSH = {kind: _launch.spec("window", ring_kind=kind) for kind in DTYPES.values()}   # by ring kind


class WindowShadow(ShadowBase):
    """The mean of the last ``window`` snapshots of the sources, kept with one launch per push.

    A ring of ``window`` flat snapshots (float32, or bfloat16 to halve its memory; float64
    for float64 sources, whose sums are float64 too) and a compensated float32 running sum
    per element: each :meth:`push` adds the new snapshot (as stored), subtracts the one it
    evicts (every W pushes the sum is rebuilt from the ring in float64, so the mean stays
    within 2 ulp) and writes the mean, which is what :meth:`view`, :meth:`swap` and
    :meth:`copy_to_sources` use. The construction pushes the sources once.

    ``split=(rank, ranks)`` keeps only this rank's slice of every group's row, of the ring and of
    the sums alike (as :class:`fastema.FlatShadow`'s ``split``): the views are then this rank's
    pieces, 1-D, and the sources are written only through a face that gathers the mean
    (``fastema.torch.WindowAverage(shard_replicas=...)``).
    """

    rows = 1               # one average: the window mean

    def __init__(self, sources: Sequence | Mapping, window: int, *, ring_dtype: str = "float32",
                 split: tuple[int, int] | None = None):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if ring_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ring_dtype must be 'float32' or 'bfloat16', got {ring_dtype!r}")
        self.check_split(split)
        names, tensors, bufs = parse_sources(sources)
        self.names = names
        self.window, self.ring_dtype, self.pushes = window, ring_dtype, 0
        self.layout = FlatLayout(bufs, lambda b: F64 if b.kind == F64 else F32, _STATE_ROWS, split)
        self.source_table = SourceTable(names, tensors, self.layout, bufs)
        self._swap = SwapState()
        self._rings = []                                # per group: (kind, (W, n) buffer, device segment table)
        for g in self.layout.groups:
            zero_(g.buffer)
            kind = F64 if g.src_kind == F64 else DTYPES[ring_dtype]     # float64 stays float64
            ring = empty(describe(g.buffer, "shadow"), kind, (window, g.n))
            zero_(ring)                                 # slots not pushed yet: zeros, saved
            addr = _launch.tables([0] * len(g.counts), g.counts, g.segments(ring), g.device, g.current_stream,
                                   follow=False).shadow_addr
            self._rings.append((kind, ring, addr))
        self.push()

    def __repr__(self) -> str:
        parts = ", ".join(f"{g.device}:{KIND_NAMES[g.src_kind]}x{len(g.members)}" for g in self.layout.groups)
        return f"WindowShadow({len(self)} sources, window={self.window}, groups=[{parts}])"

    @property
    def count(self) -> int:
        """Snapshots in the window now (at most ``window``)."""
        return min(self.pushes, self.window)

    @property
    def nbytes(self) -> int:
        """Bytes fastema holds: the mean, the running sum and the ring."""
        return self.layout.nbytes + sum(g.n * self.window * ITEMSIZE[kind]
                                        for g, (kind, _, _) in zip(self.layout.groups, self._rings))

    def parts(self, what: str = "shadow") -> list:
        """``(part, array)`` of everything this shadow holds: the mean and the running sums
        (``what``), the ring of snapshots (``"ring"``) and the launch tables (``"tables"``), for
        a face's ``memory()``."""
        out: list = []
        for g, (_, ring, addr) in zip(self.layout.groups, self._rings):
            out += [(what, g.buffer), ("ring", ring), ("tables", addr)]
            out += table_parts(g.tables, *([g.scan.tables] if g.scan is not g else []))
        return out

    def written(self) -> list:
        """The buffers a push writes: the mean and sums of every group, and the rings."""
        return [g.buffer for g in self.layout.groups] + [ring for _, ring, _ in self._rings]

    def backup(self) -> FlatShadow:
        """A copy of the sources in their own dtypes, for a face's swap that would round."""
        return FlatShadow(dict(zip(self.names, self.sources)), dtype="same")

    def view(self, source: int | str, row: int | None = 0):
        """The window mean of one source (by position or name), shaped and laid out like it (split:
        this rank's piece, 1-D); ``row=None``: ``(1, *shape)``, as every row of a one-row shadow."""
        if row is None:
            return self.state_view(source)[:1]
        self.check_row(row)
        return self.state_view(source)[0]

    def state_view(self, source: int | str):
        """Everything a checkpoint keeps of one source besides the ring: the mean and the
        compensated running sum, ``(3, *shape)`` (a view; split: ``(3, count)``, this rank's piece)."""
        i = self.source_table.position(source)
        if self.layout.split is None:
            return self.layout.view(i, None)
        g, _, count, col = self.layout.piece(i)
        return g.buffer[:, col:col + count]

    def ring_view(self, source: int | str):
        """The stored snapshots of one source, shape ``(window, *shape)`` (slot order, not time order;
        split: ``(window, count)``, this rank's piece)."""
        i = self.source_table.position(source)
        g, slot = self.layout.where[i]
        _, ring, _ = self._rings[self.layout.groups.index(g)]
        if self.layout.split is None:
            return g.strided(ring, slot, (self.window,))
        _, _, count, col = self.layout.piece(i)
        return ring[:, col:col + count]

    # ------------------------------------------------------------ operations

    def push(self) -> None:
        """Add the sources' current values as the newest snapshot, evicting the oldest when full."""
        self._swap.refuse("push()")
        self.source_table.refresh()
        slot, full = self.pushes % self.window, self.pushes >= self.window
        count = min(self.pushes + 1, self.window)
        recompute = slot == self.window - 1          # every W pushes: rebuild the sum from the ring
        for g, (kind, _, addr) in zip(self.layout.groups, self._rings):
            g.launch_of(_PUSH[kind])(addr, slot, full, count, recompute)     # kept by the group
        self.pushes += 1

    def restart(self) -> None:
        """Empty the window and push the sources as its first snapshot."""
        self._swap.refuse("restart()")
        for g in self.layout.groups:
            zero_(g.buffer)
        for _, ring, _ in self._rings:                  # the slots not pushed again: zeros, saved
            zero_(ring)
        self.pushes = 0
        self.push()

    def copy_to_sources(self, row: int = 0) -> None:
        """The sources <- the window mean (rounded to each source's dtype)."""
        self._swap.refuse("copy_to_sources()")
        self._refuse_split("copy_to_sources()")
        self.check_row(row)
        self.source_table.check_writable("copy_to_sources()")
        self.check_sources()
        self.layout.copy_out(0)

    def swap(self, row: int = 0, *, lossy: bool = False) -> None:
        """Exchange the window mean and the sources in place; call again to swap back (see
        :meth:`fastema.FlatShadow.swap`)."""
        self._refuse_split("swap()")
        self.check_row(row)
        self.source_table.check_writable("swap()")
        self._swap.swap(self.layout, self.source_table, 0, lossy)

    def check_row(self, row: int) -> None:
        if row != 0 or isinstance(row, bool):
            raise IndexError(f"a WindowShadow keeps one average (row 0), got row {row!r}")
