"""The one dispatch point between fastema's Python layer and the kernels.

``launch(op, group, **args)`` runs kernel family ``op`` over a group of sources on the
group's device: :mod:`.cpu` or :mod:`.cuda` (imported when a CUDA buffer first arrives)
has one function per op with the same keyword-only signature. A group is anything with
the fields of :class:`Group` (``flat._Group`` is one). Tunables live in :mod:`.config`.

======================  ==================================================================
op                      keyword arguments
======================  ==================================================================
``"lerp"``              ``weights`` (tuple or float32[K] device array), ``flag=None``,
                        ``key=0`` (an int, or an int64[1] device array), ``stochastic=False``
``"bema"``              ``alpha`` (a host number), ``flag=None`` (3-row shadows: BEMA's
                        output ``row0 <- row1 + alpha * (row0 - row2)``)
``"plan"``              ``state``, ``params``, ``decays``, ``given``, ``w32``, ``w64``, ``flag``,
                        ``keys`` (one call of a model EMA's plan: ``kernels._stats.plan_step``)
``"copy"``              ``to_shadow``, ``row_lo``, ``row_hi``, ``flag=None``
``"swap"``              ``mode`` (``kinds.EXCHANGE/PACK/UNPACK``), ``row``
``"nonfinite"``         ``flag``
``"window"``            ``ring_kind``, ``ring_addr``, ``slot``, ``full``, ``count``, ``recompute``
``"ema_streams"``       ``values``, ``w0``, ``c``, ``per_stream``, ``a``, ``b``, ``d``, ``mode``, ``skip``
``"sma_streams"``       ``values``, ``w0``, ``c``, ``per_stream``, ``ring_v``, ``ring_w``, ``s``,
                        ``comp``, ``ws``, ``wcomp``, ``n``, ``bad``, ``slot``, ``skip``
======================  ==================================================================

The kernels' math and their arguments are documented in :mod:`fastema.kernels.cpu`.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from ..kernels.kinds import F64, wide
from ..kernels.layout import chunk_table, segment_offsets
from . import config
from . import cpu as _cpu_target


class Tables(NamedTuple):
    """Segment and chunk tables of one group, on the group's device."""
    shadow_addr: Any    # int64[S] where each segment's shadow (row 0) lives
    seg_addr: Any       # int64[S] where each source lives
    seg_offset: Any     # int64[S + 1]
    chunk_seg: Any      # int32[C]
    chunk_begin: Any    # int64[C + 1]
    n: int              # elements per shadow row (the row stride)
    chunks: int         # C
    staging: Any = None         # CUDA: the address tables and their pinned staging (cuda.AddressTables)

    def args(self):
        return self.n, self.shadow_addr, self.seg_addr, self.seg_offset, self.chunk_seg, self.chunk_begin


class Group(NamedTuple):
    """What one launch needs to know about its sources besides the op's own arguments."""
    device: str                  # "cpu" or "cuda:N"
    shadow_kind: int | None      # storage kind of the shadow (None for metric streams)
    src_kind: int                # storage kind of the sources (the values, for metric streams)
    tables: Tables | None        # None for metric streams
    framework: str = "numpy"     # whose current CUDA stream each launch goes on (see current_stream)


HANDED_OVER = ("jax", "tensorflow", "keras", "dlpack")   # new source arrays every step, freed on their own streams


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def launch(op: str, group, **args) -> None:
    """Run kernel family ``op`` (see the table above) over ``group`` on its device.

    On CUDA the launch goes on the stream that is current for the group's framework *now*
    (:func:`current_stream`), never one remembered from an earlier call: an update inside
    ``with torch.cuda.stream(side)`` or a ``torch.cuda.graph`` capture is ordered (or
    captured) with the caller's other work."""
    t = group.tables
    if t is not None and t.chunks == 0:
        return
    if op == "lerp" and isinstance(args["weights"], tuple):    # host values: the kernel's arithmetic type
        cast = np.float64 if wide(group.shadow_kind, group.src_kind) else np.float32
        args["weights"] = tuple(map(cast, args["weights"]))
    elif op == "bema":                                         # the shadow's arithmetic type
        args["alpha"] = (np.float64 if group.shadow_kind == F64 else np.float32)(args["alpha"])
    if is_cuda(group.device):
        getattr(_cuda(), op)(group, current_stream(group.framework, group.device), **args)
    else:
        getattr(_cpu_target, op)(group, 0, **args)


def tables(src_addresses, counts, shadow_addresses, device: str, framework: str = "numpy",
           follow: bool = True, row_stride: int | None = None) -> Tables:
    """Tables for sources at ``src_addresses`` with element ``counts`` on ``device``, averaged
    into shadows at ``shadow_addresses`` (one per source; ``flat_shadow`` for one flat buffer).
    ``follow``: the sources' addresses may change later (:func:`update_addresses`); on CUDA,
    frameworks that hand over new arrays every step (:data:`HANDED_OVER`) get two address
    tables to alternate between, the others one, rewritten in place.
    ``row_stride``: elements between a shadow's rows (default: the sum of ``counts``)."""
    seg_offset = segment_offsets(counts)
    chunk = config.CUDA_CHUNK if is_cuda(device) else config.CPU_CHUNK
    chunk_seg, chunk_begin = chunk_table(seg_offset, chunk)
    as_i64 = lambda a: np.asarray(a, np.int64).reshape(-1)  # noqa: E731
    n = int(seg_offset[-1]) if row_stride is None else int(row_stride)
    host = Tables(as_i64(shadow_addresses), as_i64(src_addresses), seg_offset, chunk_seg, chunk_begin, n,
                  len(chunk_seg))
    if not is_cuda(device):
        return host
    slots = (2 if framework in HANDED_OVER else 1) if follow else 0
    return _cuda().upload(host, device, current_stream(framework, device), slots)


def flat_shadow(base: int, counts, itemsize: int) -> np.ndarray:
    """Per-segment shadow addresses of one flat buffer at ``base``."""
    return base + segment_offsets(counts)[:-1] * itemsize


def retired():
    """A holder of replaced CUDA sources: ``.release(kept, device, stream)`` keeps ``kept`` alive
    until the launches issued so far on ``stream`` (see :func:`current_stream`) have run, without
    a sync."""
    return _cuda().Retired()


def update_addresses(t: Tables, addresses, device: str, framework: str = "numpy") -> Tables:
    """Same layout, new source addresses (a source was re-allocated in place). On CUDA the
    device table is rewritten in place on the framework's current stream (no allocation)."""
    seg_addr = np.asarray(addresses, np.int64).reshape(-1)
    if is_cuda(device):
        return _cuda().update_addresses(t, seg_addr, device, current_stream(framework, device))
    return t._replace(seg_addr=seg_addr)


def zero_(a, device: str, framework: str) -> None:
    """Zero a small CUDA array of fastema's (a flag) by a kernel on the framework's stream."""
    _cuda().zero_(a, device, current_stream(framework, device))


def device_view(address: int, size: int, dtype, owner):
    """A Numba device array over ``size`` elements of ``dtype`` at CUDA ``address`` (no copy)."""
    return _cuda().raw_view(address, size, dtype, owner)


def current_stream(framework: str, device) -> Any:
    """The framework's current CUDA stream on ``device`` ("cuda:N"), as a Numba stream (0: the
    legacy default stream). Read at every launch (about 0.3 us for torch).

    torch and CuPy have a current stream; JAX, TensorFlow and other DLPack producers order
    their writes before the legacy default stream at export, and Numba device arrays have no
    current stream, so fastema launches on the default stream for them."""
    if framework == "torch":
        import torch

        handle = torch._C._cuda_getCurrentRawStream(_index(device))
    elif framework == "cupy":
        import cupy

        with cupy.cuda.Device(_index(device)):
            handle = cupy.cuda.get_current_stream().ptr
    else:
        return 0
    return external_stream(handle) if handle else 0


def _index(device) -> int:
    device = str(device)
    return int(device.split(":")[1]) if ":" in device else 0


def external_stream(pointer: int) -> Any:
    """A Numba stream object for a framework's CUDA stream handle."""
    return _cuda().external_stream(pointer)


@functools.cache
def _cuda():
    from . import cuda

    return cuda
