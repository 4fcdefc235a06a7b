"""The one dispatch point between fastema's Python layer and the kernels.

``launch(op, group, **args)`` runs kernel family ``op`` over a group of sources on the
group's device: :mod:`.cpu` or :mod:`.cuda` (imported when a CUDA buffer first arrives)
has one function per op with the same keyword-only signature. A group is anything with
the fields of :class:`Group` (``flat._Group`` is one). Tunables live in :mod:`.config`.

======================  ==================================================================
op                      keyword arguments
======================  ==================================================================
``"lerp"``              ``weights`` (tuple or float32[K] device array), ``flag=None``,
                        ``key=0``, ``stochastic=False``
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

from ..kernels.kinds import wide
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

    def args(self):
        return self.n, self.shadow_addr, self.seg_addr, self.seg_offset, self.chunk_seg, self.chunk_begin


class Group(NamedTuple):
    """What one launch needs to know about its sources besides the op's own arguments."""
    device: str                  # "cpu" or "cuda:N"
    shadow_kind: int | None      # storage kind of the shadow (None for metric streams)
    src_kind: int                # storage kind of the sources (the values, for metric streams)
    tables: Tables | None        # None for metric streams
    stream: Any = 0              # the CUDA stream to launch on (0: the default stream)


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def launch(op: str, group, **args) -> None:
    """Run kernel family ``op`` (see the table above) over ``group`` on its device."""
    t = group.tables
    if t is not None and t.chunks == 0:
        return
    if op == "lerp" and isinstance(args["weights"], tuple):    # host values: the kernel's arithmetic type
        cast = np.float64 if wide(group.shadow_kind, group.src_kind) else np.float32
        args["weights"] = tuple(map(cast, args["weights"]))
    target = _cuda() if is_cuda(group.device) else _cpu_target
    getattr(target, op)(group, **args)


def tables(src_addresses, counts, shadow_addresses, device: str, stream=0) -> Tables:
    """Tables for sources at ``src_addresses`` with element ``counts`` on ``device``, averaged
    into shadows at ``shadow_addresses`` (one per source; ``flat_shadow`` for one flat buffer)."""
    seg_offset = segment_offsets(counts)
    chunk = config.CUDA_CHUNK if is_cuda(device) else config.CPU_CHUNK
    chunk_seg, chunk_begin = chunk_table(seg_offset, chunk)
    as_i64 = lambda a: np.asarray(a, np.int64).reshape(-1)  # noqa: E731
    host = Tables(as_i64(shadow_addresses), as_i64(src_addresses), seg_offset, chunk_seg, chunk_begin,
                  int(seg_offset[-1]), len(chunk_seg))
    if not is_cuda(device):
        return host
    return _cuda().upload(host, device, stream)


def flat_shadow(base: int, counts, itemsize: int) -> np.ndarray:
    """Per-segment shadow addresses of one flat buffer at ``base``."""
    return base + segment_offsets(counts)[:-1] * itemsize


def retire(device: str, stream, previous):
    """An event recorded on ``stream`` now; waits for ``previous`` (an earlier one) first if it
    has not passed yet, so what was kept alive with it can go."""
    return _cuda().retire(device, stream, previous)


def update_addresses(t: Tables, addresses, device: str, stream=0) -> Tables:
    """Same layout, new source addresses (a source was re-allocated in place)."""
    seg_addr = np.asarray(addresses, np.int64).reshape(-1)
    if is_cuda(device):
        return t._replace(seg_addr=_cuda().to_device(seg_addr, device, stream))
    return t._replace(seg_addr=seg_addr)


def device_view(address: int, size: int, dtype, owner):
    """A Numba device array over ``size`` elements of ``dtype`` at CUDA ``address`` (no copy)."""
    return _cuda().raw_view(address, size, dtype, owner)


def current_stream(framework: str, device) -> Any:
    """The framework's current CUDA stream on ``device``, as a Numba stream (0: the default)."""
    if framework == "torch":
        import torch

        return external_stream(torch.cuda.current_stream(device).cuda_stream)
    return 0


def external_stream(pointer: int) -> Any:
    """A Numba stream object for a framework's CUDA stream handle."""
    return _cuda().external_stream(pointer)


@functools.cache
def _cuda():
    from . import cuda

    return cuda
