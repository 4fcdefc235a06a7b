"""The one dispatch point between fastema's Python layer and the kernels.

Callers hand over :class:`~fastema._arrays.Buf` descriptions and segment tables;
this module picks the CPU (serial or parallel) or CUDA kernel, builds the views
the kernels take, chooses the stream and launches. Tunables are host-side values
passed to the kernels as arguments (numba freezes globals at compile time).
The CUDA backend is imported only when a CUDA buffer arrives.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import numpy as np

from .kernels import cpu as cpu_kernels
from .kernels.layout import chunk_table, segment_offsets

# Tunables (host side)
CPU_CHUNK = 1 << 14          # elements per CPU work item (64 KiB of float32: the source stays in L2 across rows)
CPU_SERIAL_BELOW = 1 << 15   # total elements below which the serial kernel runs (thread start-up costs more)
CUDA_CHUNK = 1 << 12         # elements per CUDA block iteration
CUDA_THREADS = 256
CUDA_MAX_BLOCKS = 1 << 15    # grid-stride over chunks beyond this

_NO_FLAG = np.zeros(1, np.int32)     # never written: passed when no guard is asked for


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


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def tables(src_addresses, counts, shadow_addresses, device: str, stream=0) -> Tables:
    """Tables for sources at ``src_addresses`` with element ``counts`` on ``device``, averaged
    into shadows at ``shadow_addresses`` (one per source; ``flat_shadow`` for one flat buffer)."""
    seg_offset = segment_offsets(counts)
    chunk = CUDA_CHUNK if is_cuda(device) else CPU_CHUNK
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


# ---------------------------------------------------------------- CPU launches

def _cpu_parallel(t: Tables, rows: int) -> bool:
    return t.n * rows >= CPU_SERIAL_BELOW and t.chunks > 1


def lerp(device, shadow_kind, src_kind, t: Tables, weights, flag=None, key=0, stochastic=False, stream=0):
    """shadow[k] <- lerp(shadow[k], src, weights[k]) for each row k (see cpu_kernels.lerp_kernel)."""
    if t.chunks == 0:
        return
    if isinstance(weights, tuple):               # host values: the kernel's arithmetic type
        weights = tuple(map(np.float64 if cpu_kernels.wide(shadow_kind, src_kind) else np.float32, weights))
    if is_cuda(device):
        return _cuda().lerp(device, shadow_kind, src_kind, t, weights, flag, key, stochastic, stream)
    k = cpu_kernels.lerp_kernel(shadow_kind, src_kind, stochastic, _cpu_parallel(t, len(weights)))
    k(*t.args(), weights, _NO_FLAG if flag is None else flag, np.uint32(key))


def copy(device, shadow_kind, src_kind, t: Tables, to_shadow, row_lo, row_hi, stream=0, flag=None):
    """Sources -> shadow rows [row_lo, row_hi) (``to_shadow``), or shadow row ``row_lo`` -> sources;
    nothing is copied when ``flag[0] != 0`` (the non-finite guard)."""
    if t.chunks == 0:
        return
    if is_cuda(device):
        return _cuda().copy(device, shadow_kind, src_kind, t, to_shadow, row_lo, row_hi, stream, flag)
    k = cpu_kernels.copy_kernel(shadow_kind, src_kind, to_shadow, _cpu_parallel(t, row_hi - row_lo))
    k(*t.args(), row_lo, row_hi, _NO_FLAG if flag is None else flag)


def swap(device, shadow_kind, src_kind, t: Tables, mode, row, stream=0):
    """Exchange shadow row ``row`` with the sources (mode: kinds.EXCHANGE / PACK / UNPACK)."""
    if t.chunks == 0:
        return
    if is_cuda(device):
        return _cuda().swap(device, shadow_kind, src_kind, t, mode, row, stream)
    cpu_kernels.swap_kernel(shadow_kind, src_kind, mode, _cpu_parallel(t, 1))(*t.args(), row)


def window(device, ring_kind, src_kind, t: Tables, ring_addr, slot, full, count, recompute, stream=0):
    """Push the sources into ring row ``slot`` and refresh the window mean (cpu_kernels.window_kernel)."""
    if t.chunks == 0:
        return
    if is_cuda(device):
        return _cuda().window(device, ring_kind, src_kind, t, ring_addr, slot, full, count, recompute, stream)
    cpu_kernels.window_kernel(ring_kind, src_kind, _cpu_parallel(t, 3))(*t.args(), ring_addr, slot, full, count,
                                                                    recompute)


def nonfinite(device, src_kind, t: Tables, flag, stream=0):
    """flag[0] <- 1 if any source element is inf or NaN."""
    if t.chunks == 0:
        return
    if is_cuda(device):
        return _cuda().nonfinite(device, src_kind, t, flag, stream)
    cpu_kernels.nonfinite_kernel(src_kind, _cpu_parallel(t, 1))(*t.args()[2:], flag)


# ---------------------------------------------------------------- views


def aux_view(x, what: str, dtype, size: int, device: str, writable: bool):
    """A small control array (weights, flag) checked and viewed for the kernels.

    ``x`` must hold exactly ``size`` elements of ``dtype`` on ``device``.
    """
    from ._arrays import _is_cudasim, _is_torch

    dtype = np.dtype(dtype)
    if isinstance(x, np.ndarray):
        dev, dt, n, view = "cpu", x.dtype, x.size, x
        if writable and not x.flags.writeable:
            raise ValueError(f"{what} is read-only; pass a writable array")
    elif _is_torch(x):
        dev = "cpu" if x.device.type == "cpu" else f"{x.device.type}:{x.device.index}"
        name = str(x.dtype).replace("torch.", "")
        dt, n = (np.dtype(name) if name in ("float32", "float64", "int32", "int64") else name), x.numel()
        view = x.detach().numpy() if dev == "cpu" and dt == dtype and x.is_contiguous() else None
    elif _is_cudasim(x):
        dev, dt, n, view = "cuda:0", x._ary.dtype, x._ary.size, x._ary
    elif hasattr(x, "__cuda_array_interface__"):
        cai = x.__cuda_array_interface__
        dev, dt, n, view = f"cuda:{getattr(getattr(x, 'device', None), 'id', 0)}", np.dtype(cai["typestr"]), \
            int(np.prod(cai["shape"])), None
    else:
        raise TypeError(f"{what} must be a NumPy array or a tensor of {dtype} on {device}, "
                        f"got {type(x).__name__}")
    if dt != dtype or n != size:
        raise ValueError(f"{what} must hold {size} element(s) of {dtype}, got {n} of {dt}")
    if dev != device:
        raise ValueError(f"{what} is on {dev} but the buffers are on {device}; create it on {device}")
    if is_cuda(device) and view is None:
        addr = x.data_ptr() if _is_torch(x) else x.__cuda_array_interface__["data"][0]
        view = _cuda().raw_view(addr, size, dtype, x)
    return view.reshape(-1) if isinstance(view, np.ndarray) else view


def stream_for(buf) -> Any:
    """The stream to launch on: the framework's current stream for the buffer's device."""
    if not is_cuda(buf.device) or buf.framework == "cudasim":
        return 0
    if buf.framework == "torch":
        import torch

        return _cuda().external_stream(torch.cuda.current_stream(buf.obj.device).cuda_stream)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(buf.obj, cupy.ndarray):
        return _cuda().external_stream(cupy.cuda.get_current_stream().ptr)
    return 0


def new_flag(like):
    """A zeroed int32[1] flag on ``like``'s device, in ``like``'s framework."""
    if like.framework == "torch":
        import torch

        return torch.zeros(1, dtype=torch.int32, device=like.obj.device)
    if is_cuda(like.device):
        from numba import cuda

        return cuda.to_device(np.zeros(1, np.int32))
    return np.zeros(1, np.int32)


@functools.cache
def _cuda():
    from . import _launch_cuda

    return _launch_cuda
