"""CUDA half of :mod:`fastema._launch`: views, stream objects, table upload, launches.

Imported only when a CUDA buffer arrives (or under the Numba CUDA simulator).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from .kernels import cuda as cuda_kernels
from .kernels._cuda_hw import SIMULATOR
from . import _launch as L

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


def _grid(t):
    return min(t.chunks, L.CUDA_MAX_BLOCKS), L.CUDA_THREADS


def _launch(kernel, device, t, stream, *args):
    grid, block = _grid(t)
    with cuda.gpus[_index(device)]:
        if SIMULATOR or not stream:
            kernel[grid, block](*args)
        else:
            kernel[grid, block, stream](*args)


def lerp(device, shadow_kind, src_kind, t, weights, flag, key, stochastic, stream):
    k = cuda_kernels.lerp_kernel(shadow_kind, src_kind, stochastic)
    _launch(k, device, t, stream, *t.args(), weights, _zero_flag(device) if flag is None else flag,
            np.uint32(key))


def copy(device, shadow_kind, src_kind, t, to_shadow, row_lo, row_hi, stream, flag=None):
    _launch(cuda_kernels.copy_kernel(shadow_kind, src_kind, to_shadow), device, t, stream, *t.args(), row_lo, row_hi,
            _zero_flag(device) if flag is None else flag)


def swap(device, shadow_kind, src_kind, t, mode, row, stream):
    _launch(cuda_kernels.swap_kernel(shadow_kind, src_kind, mode), device, t, stream, *t.args(), row)


def nonfinite(device, src_kind, t, flag, stream):
    _launch(cuda_kernels.nonfinite_kernel(src_kind), device, t, stream, *t.args()[2:], flag)


def window(device, ring_kind, src_kind, t, ring_addr, slot, full, count, recompute, stream):
    _launch(cuda_kernels.window_kernel(ring_kind, src_kind), device, t, stream, *t.args(), ring_addr, slot, full,
            count, recompute)


def retire(device, stream, previous):
    if SIMULATOR:                     # the simulator runs every launch to completion
        return None
    if previous is not None and not previous.query():
        previous.synchronize()        # rare: the launch before the last one is still running
    with cuda.gpus[_index(device)]:
        event = cuda.event(timing=False)
        event.record(stream or 0)
    return event
