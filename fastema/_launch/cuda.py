"""CUDA launchers (same signatures as :mod:`.cpu`), and the CUDA pieces of dispatch: raw
device views, stream objects, table upload and retirement events.

Imported only when a CUDA buffer arrives (or under the Numba CUDA simulator). Imports
nothing back from the package: its tunables come from :mod:`.config`.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from ..kernels import cuda as K
from ..kernels._cuda_hw import SIMULATOR
from . import config

_TYPESTR = {np.dtype(np.uint32): "<u4", np.dtype(np.uint16): "<u2", np.dtype(np.float32): "<f4",
            np.dtype(np.float64): "<f8", np.dtype(np.int32): "<i4", np.dtype(np.int64): "<i8"}


def _index(device: str) -> int:
    return int(device.split(":")[1])


def raw_view(address: int, size: int, dtype, owner):
    """A Numba device array over ``size`` elements at ``address`` (no copy, no sync)."""
    dtype = np.dtype(dtype)
    desc = {"shape": (size,), "typestr": _TYPESTR[dtype], "data": (int(address), False),
            "version": 3, "strides": None}
    return cuda.from_cuda_array_interface(desc, owner=owner, sync=False)


@functools.lru_cache(maxsize=64)
def external_stream(ptr: int):
    return cuda.external_stream(ptr)


def to_device(a: np.ndarray, device: str, stream=0):
    with cuda.gpus[_index(device)]:
        return cuda.to_device(a, stream=stream) if stream else cuda.to_device(a)


def upload(t, device: str, stream=0):
    d = functools.partial(to_device, device=device, stream=stream)
    return t._replace(shadow_addr=d(t.shadow_addr), seg_addr=d(t.seg_addr), seg_offset=d(t.seg_offset),
                      chunk_seg=d(t.chunk_seg), chunk_begin=d(t.chunk_begin))


@functools.lru_cache(maxsize=16)
def _zero_flag(device: str):
    return to_device(np.zeros(1, np.int32), device)


def _run(kernel, group, stream, blocks, *args):
    with cuda.gpus[_index(group.device)]:
        if SIMULATOR or not stream:
            kernel[blocks, config.CUDA_THREADS](*args)
        else:
            kernel[blocks, config.CUDA_THREADS, stream](*args)


def _chunks(group, stream, kernel, *args):
    _run(kernel, group, stream, min(group.tables.chunks, config.CUDA_MAX_BLOCKS), *args)


def lerp(group, stream, *, weights, flag=None, key=0, stochastic=False):
    _chunks(group, stream, K.lerp_kernel(group.shadow_kind, group.src_kind, stochastic), *group.tables.args(), weights,
            _zero_flag(group.device) if flag is None else flag, np.uint32(key))


def copy(group, stream, *, to_shadow, row_lo, row_hi, flag=None):
    _chunks(group, stream, K.copy_kernel(group.shadow_kind, group.src_kind, to_shadow), *group.tables.args(), row_lo,
            row_hi, _zero_flag(group.device) if flag is None else flag)


def swap(group, stream, *, mode, row):
    _chunks(group, stream, K.swap_kernel(group.shadow_kind, group.src_kind, mode), *group.tables.args(), row)


def nonfinite(group, stream, *, flag):
    t = group.tables
    _chunks(group, stream, K.nonfinite_kernel(group.src_kind), t.seg_addr, t.seg_offset, t.chunk_seg, t.chunk_begin, flag)


def window(group, stream, *, ring_kind, ring_addr, slot, full, count, recompute):
    _chunks(group, stream, K.window_kernel(ring_kind, group.src_kind), *group.tables.args(), ring_addr, slot, full, count,
            recompute)


def _streams(group, stream, kernel, size, *args):
    blocks = max(1, min((size + config.CUDA_THREADS - 1) // config.CUDA_THREADS, config.CUDA_STREAM_MAX_BLOCKS))
    _run(kernel, group, stream, blocks, *args)


def ema_streams(group, stream, *, values, w0, c, per_stream, a, b, d, mode, skip):
    _streams(group, stream, K.ema_kernel(group.src_kind, mode, skip), values.size, values, w0, c, per_stream, a, b, d)


def sma_streams(group, stream, *, values, w0, c, per_stream, ring_v, ring_w, s, comp, ws, wcomp, n, bad, slot, skip):
    _streams(group, stream, K.sma_kernel(group.src_kind, skip), values.size, values, w0, c, per_stream, ring_v, ring_w,
             s, comp, ws, wcomp, n, bad, slot)


def retire(device, stream, previous):
    if SIMULATOR:                     # the simulator runs every launch to completion
        return None
    if previous is not None and not previous.query():
        previous.synchronize()        # rare: the launch before the last one is still running
    with cuda.gpus[_index(device)]:
        event = cuda.event(timing=False)
        event.record(stream or 0)
    return event
