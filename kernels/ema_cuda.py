"""CUDA kernels (numba-cuda): the twins of :mod:`fastema.kernels.ema_cpu`.

Same arguments and semantics as the CPU kernels. Each block takes whole chunks
(grid-stride over chunks) and its threads stride through the chunk, so any grid
and block size is correct. Launch on the caller's stream:
``kernel[grid, block, stream](...)``. Every address in ``seg_addr`` must be device
memory of the launching context. Imported only when a CUDA buffer arrives.
"""
import functools

import numpy as np
from numba import cuda

from . import _bits, _smooth
from ._bits import F32
from ._cuda_hw import as_bits, as_float, fma, u16_pointer, u32_pointer
from .ema_cpu import EXCHANGE, PACK, UNPACK  # noqa: F401  (one definition of the modes)

_device = functools.partial(cuda.jit, device=True, inline="always")
decode = _device(_bits.decode)
encode = _device(_bits.encode)
encode_bf16_sr = _device(_bits.encode_bf16_sr)
sr_noise = _device(_bits.sr_noise)
pack_bf16 = _device(_bits.pack_bf16)
unpack_bf16 = _device(_bits.unpack_bf16)
is_nonfinite = _device(_bits.is_nonfinite)
neumaier = _device(_smooth.neumaier)


def _pointer(kind):
    return u32_pointer if kind == F32 else u16_pointer


@functools.cache
def lerp_kernel(shadow_kind, src_kind, stochastic):
    """See :func:`fastema.kernels.ema_cpu.lerp_kernel`; each thread reads a source element once."""
    xptr, sptr = _pointer(src_kind), _pointer(shadow_kind)
    SK, XK, SR = shadow_kind, src_kind, stochastic

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, weights, flag, key):
        if flag[0] != 0:
            return
        rows = len(weights)
        for c in range(cuda.blockIdx.x, chunk_seg.size, cuda.gridDim.x):
            s = chunk_seg[c]
            off = seg_offset[s]
            p = xptr(seg_addr[s], seg_offset[s + 1] - off)
            q = sptr(shadow_addr[s], (rows - 1) * n + seg_offset[s + 1] - off)
            for i in range(chunk_begin[c] + cuda.threadIdx.x, chunk_begin[c + 1], cuda.blockDim.x):
                x = as_float(decode(p[i - off], XK))
                for k in range(rows):
                    w = np.float32(weights[k])
                    small = abs(w) < np.float32(0.5)
                    j = k * n + i - off
                    e = as_float(decode(q[j], SK))
                    y = as_bits(fma(w if small else w - np.float32(1.0), x - e, e if small else x))
                    if SR:
                        q[j] = encode_bf16_sr(y, sr_noise(key, k * n + i))
                    else:
                        q[j] = encode(y, SK)

    return cuda.jit(kernel)


@functools.cache
def copy_kernel(shadow_kind, src_kind, to_shadow):
    """See :func:`fastema.kernels.ema_cpu.copy_kernel`."""
    xptr, sptr = _pointer(src_kind), _pointer(shadow_kind)
    SK, XK, TO = shadow_kind, src_kind, to_shadow
    SAME = shadow_kind == src_kind

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, row_lo, row_hi, flag):
        if flag[0] != 0:
            return
        last = row_hi if TO else row_lo + 1
        for c in range(cuda.blockIdx.x, chunk_seg.size, cuda.gridDim.x):
            s = chunk_seg[c]
            off = seg_offset[s]
            p = xptr(seg_addr[s], seg_offset[s + 1] - off)
            q = sptr(shadow_addr[s], (last - 1) * n + seg_offset[s + 1] - off)
            for i in range(chunk_begin[c] + cuda.threadIdx.x, chunk_begin[c + 1], cuda.blockDim.x):
                if TO:
                    v = p[i - off]
                    for k in range(row_lo, row_hi):
                        q[k * n + i - off] = v if SAME else encode(decode(v, XK), SK)
                else:
                    v = q[row_lo * n + i - off]
                    p[i - off] = v if SAME else encode(decode(v, SK), XK)

    return cuda.jit(kernel)


@functools.cache
def swap_kernel(shadow_kind, src_kind, mode):
    """See :func:`fastema.kernels.ema_cpu.swap_kernel`."""
    xptr, sptr = _pointer(src_kind), _pointer(shadow_kind)
    SK, XK, MODE = shadow_kind, src_kind, mode

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, row):
        for c in range(cuda.blockIdx.x, chunk_seg.size, cuda.gridDim.x):
            s = chunk_seg[c]
            off = seg_offset[s]
            p = xptr(seg_addr[s], seg_offset[s + 1] - off)
            q = sptr(shadow_addr[s], row * n + seg_offset[s + 1] - off)
            for i in range(chunk_begin[c] + cuda.threadIdx.x, chunk_begin[c + 1], cuda.blockDim.x):
                j = row * n + i - off
                a = q[j]
                b = p[i - off]
                if MODE == PACK:
                    q[j], p[i - off] = pack_bf16(a, b)
                elif MODE == UNPACK:
                    q[j], p[i - off] = unpack_bf16(a, b)
                else:
                    q[j] = encode(decode(b, XK), SK)
                    p[i - off] = encode(decode(a, SK), XK)

    return cuda.jit(kernel)


@functools.cache
def nonfinite_kernel(src_kind):
    """See :func:`fastema.kernels.ema_cpu.nonfinite_kernel`."""
    xptr = _pointer(src_kind)
    XK = src_kind

    def kernel(seg_addr, seg_offset, chunk_seg, chunk_begin, flag):
        for c in range(cuda.blockIdx.x, chunk_seg.size, cuda.gridDim.x):
            s = chunk_seg[c]
            off = seg_offset[s]
            p = xptr(seg_addr[s], seg_offset[s + 1] - off)
            for i in range(chunk_begin[c] + cuda.threadIdx.x, chunk_begin[c + 1], cuda.blockDim.x):
                if is_nonfinite(p[i - off], XK):
                    flag[0] = 1

    return cuda.jit(kernel)


@functools.cache
def window_kernel(ring_kind, src_kind):
    """See :func:`fastema.kernels.ema_cpu.window_kernel`."""
    rptr, xptr = _pointer(ring_kind), _pointer(src_kind)
    RK, XK = ring_kind, src_kind

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, ring_addr, slot, full, count,
               recompute):
        cnt = np.float32(count)
        for c in range(cuda.blockIdx.x, chunk_seg.size, cuda.gridDim.x):
            s = chunk_seg[c]
            off = seg_offset[s]
            length = seg_offset[s + 1] - off
            p = xptr(seg_addr[s], length)
            q = u32_pointer(shadow_addr[s], 2 * n + length)
            r = rptr(ring_addr[s], (count if count > slot + 1 else slot + 1) * n)
            for i in range(chunk_begin[c] + cuda.threadIdx.x, chunk_begin[c + 1], cuda.blockDim.x):
                j = i - off
                stored = encode(decode(p[j], XK), RK)
                old = r[slot * n + j]
                r[slot * n + j] = stored
                if recompute:
                    s64, c64 = 0.0, 0.0
                    for row in range(count):
                        s64, c64 = neumaier(s64, c64, np.float64(as_float(decode(r[row * n + j], RK))))
                    total = s64 + c64
                    sm = np.float32(total)
                    cm = np.float32(total - np.float64(sm))
                    q[j] = as_bits(np.float32(total / count))
                else:
                    sm, cm = neumaier(as_float(q[n + j]), as_float(q[2 * n + j]), as_float(decode(stored, RK)))
                    if full:
                        sm, cm = neumaier(sm, cm, -as_float(decode(old, RK)))
                    q[j] = as_bits((sm + cm) / cnt)
                q[n + j] = as_bits(sm)
                q[2 * n + j] = as_bits(cm)

    return cuda.jit(kernel)
