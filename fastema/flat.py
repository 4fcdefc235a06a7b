"""FlatShadow: shadow copies of many tensors, one flat buffer per (device, dtype) group.

Built from a :class:`~fastema._layout.FlatLayout` (groups, buffers, tables, views), a
:class:`~fastema._sources.SourceTable` (where the sources are, kept current) and a
:class:`~fastema._layout.SwapState`. :class:`~fastema.flat_window.WindowShadow` is built from
the same pieces.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from . import _launch
from ._backends import describe, overlaps, zero_
from ._checks import MAX_DECAYS, resolve_weights, sr_key, stochastic_rounding
from ._layout import DTYPES, FlatLayout, ShadowBase, SwapState, parse_sources, valid_counts
from ._sources import SourceTable
from ._steps import StepLaunches
from .kernels.kinds import F64, KIND_NAMES

__all__ = ["FlatShadow"]


_BEMA = _launch.spec("bema")


class FlatShadow(ShadowBase, StepLaunches):
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
        split: ``(rank, ranks)``: keep only this rank's slice of every group's row (contiguous,
            16-byte aligned, balanced: :func:`fastema._layout.window`), for an average split over
            replicas that hold the same sources (``fastema.torch.EMA(shard_replicas=...)``).
            Updates fold the slice alone and give its elements the bits the whole shadow would
            hold; there are no per-source views (:meth:`pieces` gives the slice).
        valid: ``name -> count`` for padded sources: only a source's first ``count`` elements
            hold values (a DeepSpeed ZeRO-3 partition's, before its padding, which DeepSpeed
            never writes). The padding is averaged like the rest, but :meth:`scan_groups` (the
            per-step inf/NaN check) never reads it.
    """

    layout: FlatLayout

    def __init__(self, sources: Sequence | Mapping, *, rows: int = 1, dtype: str = "float32",
                 init: str = "copy", split: tuple[int, int] | None = None,
                 valid: Mapping[str, int] | None = None):
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= MAX_DECAYS:
            raise ValueError(f"rows must be an int from 1 to {MAX_DECAYS}, got {rows!r}")
        if dtype != "same" and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'same', got {dtype!r}")
        if init not in ("copy", "zeros"):
            raise ValueError(f"init must be 'copy' or 'zeros', got {init!r}")
        self.check_split(split)
        names, tensors, bufs = parse_sources(sources)
        self.names = names
        self.rows = rows
        self.layout = FlatLayout(bufs, lambda b: b.kind if dtype == "same" or b.kind == F64 else DTYPES[dtype], rows,
                                 split, valid_counts(names, bufs, valid))
        self.source_table = SourceTable(names, tensors, self.layout, bufs)
        self._views: dict = {}          # the made-here flags' kernel views (StepLaunches)
        self._swap = SwapState()
        self.skipped: dict[str, Any] = {}               # device -> int32[1] flag of the last guarded update
        self._spans = [describe(g.buffer, "shadow") for g in self.layout.groups]   # (made once: _holds)
        if init == "copy":
            self.copy_from_sources()
        else:
            for g in self.layout.groups:
                zero_(g.buffer)

    # ------------------------------------------------------------ introspection

    def __repr__(self) -> str:
        parts = ", ".join(f"{g.device}:{KIND_NAMES[g.src_kind]}->{KIND_NAMES[g.shadow_kind]}"
                          f"x{len(g.members)}" for g in self.layout.groups)
        return f"FlatShadow({len(self)} sources, rows={self.rows}, groups=[{parts}])"

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def view(self, source: int | str, row: int | None = 0):
        """Shadow of one source (by position or name): a view shaped like it, in the shadow dtype.

        ``row=None`` gives every row at once, shape ``(rows, *source.shape)`` (still a view).
        The view has the source's layout (channels_last stays channels_last).
        """
        if row is not None:
            self.check_row(row)
        return self.layout.view(self.source_table.position(source), row)

    def state_view(self, source: int | str):
        """Everything a checkpoint keeps of one source: every row, ``(rows, *shape)`` (a view)."""
        return self.view(source, None)

    def pieces(self) -> list[tuple[Any, list[tuple[int, int, int, int]]]]:
        """Per group: its ``(rows, n)`` buffer and the pieces it holds, ``(source position, first
        element, elements, column in the buffer)``, elements counted in the source's storage order
        (every source whole, from column ``starts``, unless the shadow is ``split``)."""
        return self.layout.pieces()

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
        self._swap.refuse("update()")
        decays = [decay] if decay is not None and not isinstance(decay, (list, tuple)) else decay
        weights_by_device = {}
        for g in self.layout.groups:                    # every check before any write
            if g.device not in weights_by_device:
                weights_by_device[g.device] = resolve_weights(decays, weight, self.rows, g.device, self._holds)
            stochastic_rounding(rounding, g.shadow_kind)
        if rounding == "stochastic":
            sr_key(seed, step)                          # validates seed and step
        if sources is not None:
            self.rebind(sources)
        self.refresh()
        if skip_nonfinite and skip_if is None:
            skip_if = self.scan_nonfinite()
        self.update_checked(weights_by_device, rounding, seed, step, skip_if)

    def _holds(self, buf) -> bool:
        """Whether ``buf`` shares a byte with a shadow buffer (a weight there: read while written)."""
        return any(overlaps(buf, b) for b in self._spans)

    def bias_correct(self, alpha: float, *, skip_if: Mapping | None = None) -> None:
        """BEMA's output in place: ``shadow[0] <- shadow[1] + alpha * (shadow[0] - shadow[2])``.

        Row 0 holds ``theta_t`` (an update with weight 1), row 1 the EMA, row 2 ``theta_0``;
        afterwards row 0 holds ``EMA + alpha (theta_t - theta_0)``. One launch per group, in
        the shadow's arithmetic (float32 with one rounding of the product-sum for narrower
        shadows, then to nearest even; float64 for float64 shadows); the sources are not read.

        Args:
            alpha: the correction's weight, a finite host number (no sync).
            skip_if: flags from :meth:`scan_nonfinite` (``device -> int32[1]``); nothing is
                written on a device whose flag is set, so a skipped update leaves the output.
        """
        self._swap.refuse("bias_correct()")
        if self.rows < 3:
            raise ValueError(f"bias_correct() needs a shadow of at least 3 rows (output, EMA, theta_0), "
                             f"this one has rows={self.rows}; make it with FlatShadow(..., rows=3)")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) \
                or not np.isfinite(alpha):
            raise ValueError(f"alpha must be a finite float, got {alpha!r}")
        for g in self.layout.groups:
            if skip_if is not None:                      # a flag: viewed afresh at every call
                _launch.launch("bema", g, alpha=alpha, flag=self._flag_view(skip_if, g))
            else:                                        # else the group's launch, kept by the group
                g.launch_of(_BEMA)(alpha)

    def scan_nonfinite(self, flags: dict | None = None) -> dict:
        """Scan every source for inf/NaN on its device, with no host sync.

        Returns ``device -> int32[1]`` flags (1 where one was found), also kept in
        ``self.skipped``. Without ``flags`` they start at zero; pass the flags of an
        earlier scan (another shadow's) to add this shadow's sources to them.
        """
        self.refresh()
        return self.scan_groups(flags)

    def scan_rows(self, flags: dict) -> bool:
        """Set ``flags[device]`` (an int32[1] flag fastema made, zeroed by the caller) where a row
        of this shadow holds inf or NaN (every row, BEMA's state rows too), on the device, no host
        read: one launch a group over its whole buffer (its padding is zero), kept. True."""
        for g in self.layout.groups:
            if g.n:
                g.own_rows.launch_of(self._flagged(flags[g.device], g).scan)()
        return True

    def copy_from_sources(self, *, skip_if: Mapping | None = None) -> None:
        """Every shadow row <- the sources (rounded to the shadow dtype); nothing is copied on a
        device whose ``skip_if`` flag (see :meth:`scan_nonfinite`) is set."""
        self._swap.refuse("copy_from_sources()")
        self.refresh()
        self.copy_from_sources_checked(skip_if)

    def copy_to_sources(self, row: int = 0) -> None:
        """The sources <- shadow row ``row`` (rounded to each source's dtype), e.g. for the final model."""
        self._swap.refuse("copy_to_sources()")
        self._refuse_split("copy_to_sources()")
        self.check_row(row)
        self.source_table.check_writable("copy_to_sources()")
        self.check_sources()
        self.layout.copy_out(row)

    def swap(self, row: int = 0, *, lossy: bool = False) -> None:
        """Exchange shadow row ``row`` and the sources in place; call again to swap back.

        Exact when the dtypes match, and for a float32 shadow with bfloat16 sources (the
        sources get the shadow rounded to nearest, the shadow keeps both values bit for
        bit). Other dtype pairs round one side and need ``lossy=True``. No temporary the
        size of the model is allocated. The sources keep their layout.
        """
        self._refuse_split("swap()")
        self.check_row(row)
        self.source_table.check_writable("swap()")
        self._swap.swap(self.layout, self.source_table, row, lossy)

    def backup(self) -> "FlatShadow":
        """A copy of the sources in their own dtypes, for a face's swap that would round (see
        :attr:`exact_swap`): ``copy_to_sources()`` puts them back bit for bit."""
        return FlatShadow(dict(zip(self.names, self.sources)), dtype="same")

    # ------------------------------------------------------------ source tracking

    def adopt(self, sources: list, addresses: list) -> None:
        """Follow new sources that the caller has checked already (same dtypes, shapes and devices
        as at construction, C-contiguous, kept alive by the caller) at ``addresses``: for bridges
        with a cheaper way to an address than a DLPack export. CPU groups only."""
        self.source_table.adopt(sources, addresses)

    def check_row(self, row: int) -> None:
        """IndexError unless ``row`` is an int in ``[0, rows)``."""
        if not isinstance(row, int) or not 0 <= row < self.rows:
            raise IndexError(f"row must be an int in [0, {self.rows}), got {row!r}")
