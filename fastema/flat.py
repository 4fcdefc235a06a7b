"""FlatShadow: shadow copies of many tensors, one flat buffer per (device, dtype) group."""
from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from . import _backends, _launch
from ._backends import Buf, describe, disjoint, empty, zero_
from .kernels import kinds
from .kernels.kinds import BF16, F16, F32, F64, ITEMSIZE, KIND_NAMES
from .ops import MAX_DECAYS, resolve_weights, sr_key, stochastic_rounding

__all__ = ["FlatShadow", "WindowShadow"]

_DTYPES = {"float32": F32, "bfloat16": BF16, "float16": F16, "float64": F64}


_strided = _backends.strided


def _data_ptr():
    import torch

    return torch.Tensor.data_ptr


_DTYPE_SHAPE = operator.attrgetter("dtype", "shape")


def _signatures(tensors) -> list:
    """What each torch source must keep between two full checks: dtype, shape and strides
    (C-level maps: ~0.3 us a tensor)."""
    import torch

    return list(zip(map(_DTYPE_SHAPE, tensors), map(torch.Tensor.stride, tensors)))


class _Group:
    """Sources of one (device, source dtype, shadow dtype) and their flat shadow."""

    def __init__(self, members: list[int], bufs: list[Buf], shadow_kind: int, rows: int):
        first = bufs[0]
        self.members = members                       # positions in FlatShadow's source list
        self.device = first.device
        self.src_kind = first.kind
        self.shadow_kind = shadow_kind
        self.framework = first.framework
        self.shapes = [b.shape for b in bufs]
        self.orders = [b.strides for b in bufs]          # () for C order, else the source's dense layout
        self.counts = [b.numel for b in bufs]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.n = int(self.offsets[-1])
        self.buffer = empty(first, shadow_kind, (rows, self.n))   # owned by fastema
        base = describe(self.buffer, "shadow").address
        self.stream = _backends.stream_for(first)
        self.addresses = [b.address for b in bufs]
        self.tensors = [b.obj for b in bufs]              # the sources, for the per-step address check
        self.tables = _launch.tables(self.addresses, self.counts,
                                     _launch.flat_shadow(base, self.counts, ITEMSIZE[shadow_kind]),
                                     self.device, self.stream)
        self.track = first.framework == "torch"        # torch storage can be swapped under a Parameter
        # JAX/TensorFlow GPU arrays are freed on their framework's own stream, which knows
        # nothing of fastema's launches: replaced sources are released only once an event
        # recorded after those launches has passed (checked without blocking, one rebind later).
        self.deferred = _launch.is_cuda(self.device) and self.framework in ("jax", "tensorflow", "dlpack")
        self.retired: tuple = (None, [])
        # Keep the sources' storages alive: a freed block could otherwise come back at a
        # recorded address under another tensor (another dtype) and pass the address check.
        self.keep: list[Any] = [b.obj.untyped_storage() for b in bufs] if self.track else []
        self.signatures = _signatures(self.tensors) if self.track else None


class FlatShadow:
    """K shadow copies of a list of tensors in one flat buffer per (device, dtype) group.

    The shadow is owned by fastema; the sources stay where their framework keeps them.
    Each operation makes one launch per group, walking every source through a segment
    table (address, element count, offset), so thousands of tensors cost one launch.

    Before every operation the sources' addresses are compared with the table (one
    ``data_ptr()`` per torch tensor). A source re-allocated in place with the same
    dtype, shape, layout and device (``param.data = new_tensor``) gets its new address;
    any other change (``model.to(other device)``, a dtype cast, a reshape, a freed
    storage) raises before anything is written. A change that keeps the address (an
    in-place ``.data = p.data.view(...)``) cannot reach memory outside the source's storage
    (kept alive) and is named by the full check of :meth:`copy_to_sources` and
    :meth:`check_sources`. To follow sources
    replaced by new objects (``load_state_dict(assign=True)``), pass them again:
    ``update(..., sources=...)``.

    Sources may have any dense layout (C order, channels_last, ...): the shadow of a
    source walks its memory in storage order and :meth:`view` gives it the source's
    strides. Sources must not share memory with each other.

    Args:
        sources: a non-empty sequence of arrays/tensors, or a mapping ``name -> array``.
        rows: number of shadows K (one per decay), 1 to 8.
        dtype: shadow dtype, ``"float32"`` (default, safe for bfloat16/float16 sources),
            ``"bfloat16"``, ``"float16"``, ``"float64"``, or ``"same"`` (each source's own
            dtype). float64 sources always get a float64 shadow.
        init: ``"copy"`` (every row starts as the sources) or ``"zeros"``.
    """

    def __init__(self, sources: Sequence | Mapping, *, rows: int = 1, dtype: str = "float32",
                 init: str = "copy"):
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
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= MAX_DECAYS:
            raise ValueError(f"rows must be an int from 1 to {MAX_DECAYS}, got {rows!r}")
        if dtype != "same" and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'same', got {dtype!r}")
        if init not in ("copy", "zeros"):
            raise ValueError(f"init must be 'copy' or 'zeros', got {init!r}")
        bufs = [describe(t, f"source {n!r}") for n, t in zip(names, tensors)]
        disjoint(bufs, [f"source {n!r}" for n in names])
        self.names = names
        self.rows = rows
        self._sources = tensors
        self._index = {n: i for i, n in enumerate(names)}
        keys: dict[tuple, list[int]] = {}
        for i, b in enumerate(bufs):
            sk = b.kind if dtype == "same" or b.kind == F64 else _DTYPES[dtype]
            keys.setdefault((b.device, b.kind, sk), []).append(i)
        self._groups = [_Group(m, [bufs[i] for i in m], sk, rows) for (_, _, sk), m in keys.items()]
        self._where = {}                                # source position -> (group, slot)
        for g in self._groups:
            for slot, i in enumerate(g.members):
                self._where[i] = (g, slot)
        self._swapped_row: int | None = None
        self.skipped: dict[str, Any] = {}               # device -> int32[1] flag of the last guarded update
        if init == "copy":
            self.copy_from_sources()
        else:
            for g in self._groups:
                zero_(g.buffer)

    # ------------------------------------------------------------ introspection

    def __len__(self) -> int:
        return len(self._sources)

    def __repr__(self) -> str:
        parts = ", ".join(f"{g.device}:{KIND_NAMES[g.src_kind]}->{KIND_NAMES[g.shadow_kind]}"
                          f"x{len(g.members)}" for g in self._groups)
        return f"FlatShadow({len(self)} sources, rows={self.rows}, groups=[{parts}])"

    @property
    def groups(self) -> list[dict]:
        """One dict per group: device, dtypes, number of sources, elements per row, buffer."""
        return [dict(device=g.device, src_dtype=KIND_NAMES[g.src_kind],
                     shadow_dtype=KIND_NAMES[g.shadow_kind], sources=len(g.members), numel=g.n,
                     buffer=g.buffer) for g in self._groups]

    @property
    def nbytes(self) -> int:
        return sum(g.n * self.rows * ITEMSIZE[g.shadow_kind] for g in self._groups)

    @property
    def swapped(self) -> bool:
        """True while a shadow row sits in the sources (between two :meth:`swap` calls)."""
        return self._swapped_row is not None

    def view(self, source: int | str, row: int | None = 0):
        """Shadow of one source (by position or name): a view shaped like it, in the shadow dtype.

        ``row=None`` gives every row at once, shape ``(rows, *source.shape)`` (still a view).
        The view has the source's layout (channels_last stays channels_last).
        """
        i = self._index[source] if isinstance(source, str) else int(source)
        g, slot = self._where[i]
        lo, hi = int(g.offsets[slot]), int(g.offsets[slot + 1])
        shape, order = tuple(g.shapes[slot]), g.orders[slot]
        if row is None:
            return _strided(g.buffer[:, lo:hi], (self.rows,) + shape, (g.n,) + order if order else ())
        self._check_row(row)
        return _strided(g.buffer[row, lo:hi], shape, order)

    def views(self, row: int = 0) -> dict:
        """``name -> view(name, row)`` for every source, in source order."""
        return {n: self.view(i, row) for i, n in enumerate(self.names)}

    # ------------------------------------------------------------ operations

    def update(self, decay: float | Sequence[float] | None = None, *, weight: Any = None,
               rounding: str = "nearest", seed: int = 0, step: int = 0,
               skip_nonfinite: bool = False, skip_if: Mapping | None = None,
               sources: Sequence | Mapping | None = None) -> None:
        """``shadow[k] <- decay[k] * shadow[k] + (1 - decay[k]) * source`` for every row, in place.

        Args:
            decay: a float (one row) or K floats in ``[0, 1]``.
            weight: instead of ``decay``: ``1 - decay`` as floats, or a K-element float32
                array on the (single) device, read by the kernel without a host sync.
            rounding: ``"nearest"`` or ``"stochastic"`` (bfloat16 shadows).
            seed, step: stochastic-rounding key; pass the training step.
            skip_nonfinite: first scan the sources for inf/NaN on the device and skip the
                update of that device if any is found; the flag stays in ``self.skipped``.
            skip_if: flags from :meth:`scan_nonfinite` (``device -> int32[1]``), e.g. shared
                with another shadow, so one diverged step skips both; instead of ``skip_nonfinite``.
            sources: the current sources (same order or names), when they may have been
                replaced by new objects since the last call.
        """
        self._not_swapped("update()")
        if not isinstance(decay, (list, tuple)) and decay is not None:
            decay = [decay]
        weights_by_device = {}
        for g in self._groups:                          # every check before any write
            if g.device not in weights_by_device:
                weights_by_device[g.device] = resolve_weights(decay, weight, self.rows, g.device)
            stochastic_rounding(rounding, g.shadow_kind)
        if rounding == "stochastic":
            sr_key(seed, step)                          # validates seed and step
        if sources is not None:
            self.rebind(sources)
        self._refresh()
        if skip_nonfinite and skip_if is None:
            skip_if = self.scan_nonfinite()
        self._lerp(weights_by_device, rounding, seed, step, skip_if)

    def _lerp(self, weights_by_device: dict, rounding: str, seed: int, step: int, skip_if) -> None:
        """The launches of :meth:`update`, once its arguments are checked and its addresses are
        current (the model averages check the addresses themselves, in one pass with the model's
        own tensors)."""
        stochastic = rounding == "stochastic"
        for gi, g in enumerate(self._groups):
            key = sr_key(seed + (gi << 32), step) if stochastic else 0
            _launch.launch("lerp", g, weights=weights_by_device[g.device], flag=self._flag_view(skip_if, g),
                           key=key, stochastic=stochastic)

    def scan_nonfinite(self, flags: dict | None = None) -> dict:
        """Scan every source for inf/NaN on its device, with no host sync.

        Returns ``device -> int32[1]`` flags (1 where one was found), also kept in
        ``self.skipped``. Without ``flags`` they start at zero; pass the flags of an
        earlier scan (another shadow's) to add this shadow's sources to them.
        """
        self._refresh()
        flags = dict(flags or {})
        for g in self._groups:
            if g.device not in flags:
                flags[g.device] = self._zeroed_flag(g)
            _launch.launch("nonfinite", g, flag=self._flag_view(flags, g))
        self.skipped = {d: f for d, f in flags.items() if any(g.device == d for g in self._groups)}
        return flags

    def copy_from_sources(self, *, skip_if: Mapping | None = None) -> None:
        """Every shadow row <- the sources (rounded to the shadow dtype); nothing is copied on a
        device whose ``skip_if`` flag (see :meth:`scan_nonfinite`) is set."""
        self._not_swapped("copy_from_sources()")
        self._refresh()
        self._copy_in(skip_if)

    def _copy_in(self, skip_if: Mapping | None = None) -> None:
        """The launches of :meth:`copy_from_sources`, once the addresses are current."""
        for g in self._groups:
            _launch.launch("copy", g, to_shadow=True, row_lo=0, row_hi=self.rows, flag=self._flag_view(skip_if, g))

    def copy_to_sources(self, row: int = 0) -> None:
        """The sources <- shadow row ``row`` (rounded to each source's dtype), e.g. for the final model."""
        self._not_swapped("copy_to_sources()")
        self._check_row(row)
        self.check_sources()
        for g in self._groups:
            _launch.launch("copy", g, to_shadow=False, row_lo=row, row_hi=row + 1)

    def swap_modes(self, lossy: bool = False) -> list:
        """The swap kernel mode of each group, or ValueError if a swap would round without ``lossy``."""
        modes = []
        for g in self._groups:
            if g.shadow_kind == g.src_kind:
                modes.append(kinds.EXCHANGE)
            elif g.shadow_kind == F32 and g.src_kind == BF16:
                modes.append(kinds.UNPACK if self.swapped else kinds.PACK)
            elif lossy:
                modes.append(kinds.EXCHANGE)
            else:
                raise ValueError(
                    f"swapping a {KIND_NAMES[g.shadow_kind]} shadow with {KIND_NAMES[g.src_kind]} sources "
                    f"rounds one side and cannot be undone exactly; pass lossy=True to accept it, or "
                    f"use copy_to_sources() on a copy of the model")
        return modes

    def swap(self, row: int = 0, *, lossy: bool = False) -> None:
        """Exchange shadow row ``row`` and the sources in place; call again to swap back.

        Exact when the dtypes match, and for a float32 shadow with bfloat16 sources (the
        sources get the shadow rounded to nearest, the shadow keeps both values bit for
        bit). Other dtype pairs round one side and need ``lossy=True``. No temporary the
        size of the model is allocated. The sources keep their layout.
        """
        if self._swapped_row is not None and row != self._swapped_row:
            raise RuntimeError(f"row {self._swapped_row} is swapped in; swap it back before swapping row {row}")
        self._check_row(row)
        modes = self.swap_modes(lossy)
        self._refresh()                  # addresses; a same-address reshape stays inside the kept storage
        for g, mode in zip(self._groups, modes):
            _launch.launch("swap", g, mode=mode, row=row)
        self._swapped_row = None if self.swapped else row

    # ------------------------------------------------------------ source tracking

    def check_sources(self) -> None:
        """Follow moved sources and check that every source still has the dtype, shape, layout and
        device it had when the shadow was made (also a change that kept the address); raises
        naming the first that does not. Called before every copy into the sources and export."""
        self._refresh()
        for g in self._groups:
            # torch sources: (dtype, shape, strides) against the last full check (~0.4 us each);
            # anything else, or a difference, takes the full description (which names the source)
            if g.signatures is None or _signatures(g.tensors) != g.signatures:
                self._checked(g)
                if g.track:
                    g.signatures = _signatures(g.tensors)

    def _refresh(self) -> None:
        # One data_ptr() per torch source: the per-step price of never reading a stale address.
        for g in self._groups:
            if g.track and list(map(_data_ptr(), g.tensors)) != g.addresses:
                self._rebind(g)

    def _checked(self, g: _Group) -> list[Buf]:
        """The group's sources described now; ValueError if any differs from construction."""
        bufs = []
        for slot, i in enumerate(g.members):
            b = describe(self._sources[i], f"source {self.names[i]!r}")
            if (b.device, b.kind, b.shape, b.strides) != (g.device, g.src_kind, g.shapes[slot], g.orders[slot]):
                now = "" if b.strides == g.orders[slot] else f" with strides {b.strides or 'C order'}"
                raise ValueError(
                    f"source {self.names[i]!r} was {KIND_NAMES[g.src_kind]} {g.shapes[slot]} on {g.device} "
                    f"when the shadow was made and is now {b.dtype_name} {b.shape} on {b.device}{now} "
                    f"(model.to(), a dtype cast, a reshape or another memory format?); make a new shadow after "
                    f"changing the model, or change it back. Nothing was updated.")
            bufs.append(b)
        disjoint(bufs, [f"source {self.names[i]!r}" for i in g.members])
        return bufs

    def _rebind(self, g: _Group, bufs: list[Buf] | None = None) -> None:
        bufs = self._checked(g) if bufs is None else bufs
        if g.deferred:
            g.retired = (_launch.retire(g.device, g.stream, g.retired[0]), g.tensors)
        g.addresses = [b.address for b in bufs]
        g.tensors = [b.obj for b in bufs]
        # keep the storages alive: a freed block could be handed to an unrelated tensor at the same address
        g.keep = [b.obj.untyped_storage() for b in bufs] if g.track else []
        g.signatures = _signatures(g.tensors) if g.track else None
        g.tables = _launch.update_addresses(g.tables, g.addresses, g.device, g.stream)

    def rebind(self, sources: Sequence | Mapping) -> None:
        """Track new source objects (same names/order, dtypes, shapes, layouts, devices); refuses
        and keeps the old ones if any differs."""
        new = [sources[n] for n in self.names] if isinstance(sources, Mapping) else list(sources)
        if len(new) != len(self._sources):
            raise ValueError(f"sources has {len(new)} entries but the shadow was made for {len(self._sources)}")
        if all(a is b for a, b in zip(new, self._sources)):
            return
        old = self._sources
        self._sources = new
        try:
            checked = [self._checked(g) for g in self._groups]      # every group checked before any change
            disjoint([b for bufs in checked for b in bufs], [f"source {n!r}" for n in self.names])
        except Exception:
            self._sources = old
            raise
        for g, bufs in zip(self._groups, checked):
            self._rebind(g, bufs)

    def _adopt(self, sources: list, addresses: list) -> None:
        """Follow new sources that the caller has checked already (same dtypes, shapes and
        devices as at construction, C-contiguous, kept alive by the caller) at ``addresses``:
        for bridges with a cheaper way to an address than a DLPack export. CPU groups only."""
        self._sources = sources
        for g in self._groups:
            g.addresses = [addresses[i] for i in g.members]
            g.tensors = [sources[i] for i in g.members]
            g.tables = _launch.update_addresses(g.tables, g.addresses, g.device, g.stream)

    # ------------------------------------------------------------ helpers

    def _zeroed_flag(self, g: _Group):
        flag = self.skipped.get(g.device)
        if flag is None:
            flag = _backends.new_flag(describe(g.buffer, "shadow"))
        zero_(flag)                               # on the device, stream-ordered: no sync
        return flag

    @staticmethod
    def _flag_view(flags: Mapping | None, g: _Group):
        if flags is None or g.device not in flags:
            return None
        return _backends.control_view(flags[g.device], "skip_if flag", np.int32, 1, g.device, writable=True)

    def _check_row(self, row: int) -> None:
        if not isinstance(row, int) or not 0 <= row < self.rows:
            raise IndexError(f"row must be an int in [0, {self.rows}), got {row!r}")

    def _not_swapped(self, what: str) -> None:
        if self._swapped_row is not None:
            raise RuntimeError(f"{what} while shadow row {self._swapped_row} is swapped into the sources; "
                               f"call swap() again first")


class WindowShadow(FlatShadow):
    """The mean of the last ``window`` snapshots of the sources, kept with one launch per push.

    A ring of ``window`` flat snapshots (float32, or bfloat16 to halve its memory; float64
    for float64 sources, whose sums are float64 too) and a compensated float32 running sum per element: each :meth:`push` adds the new snapshot
    (as stored), subtracts the one it evicts (every W pushes the sum is rebuilt from the
    ring in float64, so the mean stays within 2 ulp) and writes the mean into row 0, which is what
    :meth:`view`, :meth:`swap` and :meth:`copy_to_sources` use. Rows 1 and 2 hold the sum.
    The construction pushes the sources once.
    """

    def __init__(self, sources: Sequence | Mapping, window: int, *, ring_dtype: str = "float32"):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if ring_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ring_dtype must be 'float32' or 'bfloat16', got {ring_dtype!r}")
        super().__init__(sources, rows=3, dtype="float32", init="zeros")
        self.window, self.ring_dtype, self.pushes = window, ring_dtype, 0
        for g in self._groups:
            g.ring_kind = F64 if g.src_kind == F64 else _DTYPES[ring_dtype]    # float64 stays float64
            g.ring = empty(describe(g.buffer, "shadow"), g.ring_kind, (window, g.n))
            base = describe(g.ring, "ring").address
            g.ring_addr = _launch.tables([0] * len(g.counts), g.counts,
                                         _launch.flat_shadow(base, g.counts, ITEMSIZE[g.ring_kind]),
                                         g.device, g.stream).shadow_addr
        self.push()

    def restart(self) -> None:
        """Empty the window and push the sources as its first snapshot."""
        self._not_swapped("restart()")
        for g in self._groups:
            zero_(g.buffer)
        self.pushes = 0
        self.push()

    @property
    def count(self) -> int:
        """Snapshots in the window now (at most ``window``)."""
        return min(self.pushes, self.window)

    def push(self) -> None:
        """Add the sources' current values as the newest snapshot, evicting the oldest when full."""
        self._not_swapped("push()")
        self._refresh()
        slot, full = self.pushes % self.window, self.pushes >= self.window
        count = min(self.pushes + 1, self.window)
        recompute = slot == self.window - 1          # every W pushes: rebuild the sum from the ring
        for g in self._groups:
            _launch.launch("window", g, ring_kind=g.ring_kind, ring_addr=g.ring_addr, slot=slot, full=full,
                           count=count, recompute=recompute)
        self.pushes += 1

    def update(self, *args, **kwargs) -> None:
        raise TypeError("a WindowShadow is advanced with push(), not update()")

    def ring_view(self, source: int | str):
        """The stored snapshots of one source, shape ``(window, *shape)`` (slot order, not time order)."""
        i = self._index[source] if isinstance(source, str) else int(source)
        g, slot = self._where[i]
        lo, hi = int(g.offsets[slot]), int(g.offsets[slot + 1])
        order = g.orders[slot]
        return _strided(g.ring[:, lo:hi], (self.window,) + tuple(g.shapes[slot]), (g.n,) + order if order else ())
