"""CPU kernels (numba, parallel over chunks, serial twins for small work).

Every kernel walks a group of source tensors through the tables of
:mod:`fastema.kernels.layout`; a flat source is a group of one segment.

Shared arguments (all 1-D, C-contiguous):
    shadow:      uint32[K * n] (float32 bits) or uint16[K * n] (bfloat16/float16 bits),
                 K rows of ``n`` elements; written in place.
    n:           elements per shadow row.
    seg_addr:    int64[S] address of each source tensor's first element.
    seg_offset:  int64[S + 1] where each source starts in a shadow row.
    chunk_seg:   int32[C] segment of each chunk.
    chunk_begin: int64[C + 1] chunk boundaries within a shadow row.

Kernels are built per (storage kinds, mode, parallel) by the ``*_kernel``
factories below; the kinds are closure constants, so the branches fold away.
Inner loops index raw pointers from 0: LLVM vectorises those (array stores
mixed with offset pointer loads it does not).
"""
import functools

import numpy as np
from numba import njit, prange

from . import _bits
from ._bits import F32
from ._cpu_hw import as_bits, as_float, u16_pointer, u32_pointer

EXCHANGE, PACK, UNPACK = 0, 1, 2      # swap modes, see _bits.pack_bf16

_scalar = functools.partial(njit, inline="always", cache=True)
decode = _scalar(_bits.decode)
encode = _scalar(_bits.encode)
encode_bf16_sr = _scalar(_bits.encode_bf16_sr)
sr_noise = _scalar(_bits.sr_noise)
pack_bf16 = _scalar(_bits.pack_bf16)
unpack_bf16 = _scalar(_bits.unpack_bf16)
is_nonfinite = _scalar(_bits.is_nonfinite)


def _pointer(kind):
    """(pointer intrinsic, bytes per element) for a storage kind."""
    return (u32_pointer, 4) if kind == F32 else (u16_pointer, 2)


def _compile(fn, parallel):
    return njit(parallel=parallel, fastmath={"contract"}, cache=True)(fn)


@functools.cache
def lerp_kernel(shadow_kind, src_kind, stochastic, parallel):
    """``shadow[k] <- shadow[k] + w[k] * (src - shadow[k])`` for every row k, in float32.

    The same two-sided formula as ``torch.lerp`` (``|w| < 0.5``: from the shadow,
    else from the source) with one FMA, so float32 results equal ``torch.lerp_``.

    Extra arguments:
        weights: float32[K] array or tuple, ``w = 1 - decay`` per row.
        flag:    int32[>=1]; when ``flag[0] != 0`` nothing is written (non-finite guard).
        key:     uint32 stochastic-rounding key (ignored unless ``stochastic``).
    """
    sptr, SB = _pointer(shadow_kind)
    xptr, XB = _pointer(src_kind)
    SK, XK, SR = shadow_kind, src_kind, stochastic

    def kernel(shadow, n, seg_addr, seg_offset, chunk_seg, chunk_begin, weights, flag, key):
        if flag[0] != 0:
            return
        base_addr = shadow.ctypes.data
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            m = chunk_begin[c + 1] - begin
            p = xptr(seg_addr[s] + (begin - seg_offset[s]) * XB, m)
            for k in range(len(weights)):
                w = np.float32(weights[k])
                small = abs(w) < np.float32(0.5)
                coeff = w if small else w - np.float32(1.0)
                first = k * n + begin
                q = sptr(base_addr + first * SB, m)
                for j in range(m):
                    e = as_float(decode(q[j], SK))
                    x = as_float(decode(p[j], XK))
                    y = as_bits((e if small else x) + coeff * (x - e))
                    if SR:
                        q[j] = encode_bf16_sr(y, sr_noise(key, first + j))
                    else:
                        q[j] = encode(y, SK)

    return _compile(kernel, parallel)


@functools.cache
def copy_kernel(shadow_kind, src_kind, to_shadow, parallel):
    """Copy with conversion (round to nearest even) between the sources and shadow rows.

    ``to_shadow``: every row in ``[row_lo, row_hi)`` receives the sources; else the
    sources receive row ``row_lo`` (``row_hi`` unused). Same kinds copy bits exactly.
    """
    sptr, SB = _pointer(shadow_kind)
    xptr, XB = _pointer(src_kind)
    SK, XK, TO = shadow_kind, src_kind, to_shadow
    SAME = shadow_kind == src_kind

    def kernel(shadow, n, seg_addr, seg_offset, chunk_seg, chunk_begin, row_lo, row_hi):
        base_addr = shadow.ctypes.data
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            m = chunk_begin[c + 1] - begin
            p = xptr(seg_addr[s] + (begin - seg_offset[s]) * XB, m)
            if TO:
                for k in range(row_lo, row_hi):
                    q = sptr(base_addr + (k * n + begin) * SB, m)
                    for j in range(m):
                        q[j] = p[j] if SAME else encode(decode(p[j], XK), SK)
            else:
                q = sptr(base_addr + (row_lo * n + begin) * SB, m)
                for j in range(m):
                    p[j] = q[j] if SAME else encode(decode(q[j], SK), XK)

    return _compile(kernel, parallel)


@functools.cache
def swap_kernel(shadow_kind, src_kind, mode, parallel):
    """Exchange shadow row ``row`` and the sources in place, element by element.

    ``EXCHANGE`` converts both ways (exact when the kinds match); ``PACK``/``UNPACK``
    (float32 shadow, bfloat16 source) put the rounded shadow into the source and
    keep both exactly, see ``_bits.pack_bf16``.
    """
    sptr, SB = _pointer(shadow_kind)
    xptr, XB = _pointer(src_kind)
    SK, XK, MODE = shadow_kind, src_kind, mode

    def kernel(shadow, n, seg_addr, seg_offset, chunk_seg, chunk_begin, row):
        base_addr = shadow.ctypes.data
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            m = chunk_begin[c + 1] - begin
            p = xptr(seg_addr[s] + (begin - seg_offset[s]) * XB, m)
            q = sptr(base_addr + (row * n + begin) * SB, m)
            for j in range(m):
                a = q[j]
                b = p[j]
                if MODE == PACK:
                    q[j], p[j] = pack_bf16(a, b)
                elif MODE == UNPACK:
                    q[j], p[j] = unpack_bf16(a, b)
                else:
                    q[j] = encode(decode(b, XK), SK)
                    p[j] = encode(decode(a, SK), XK)

    return _compile(kernel, parallel)


@functools.cache
def nonfinite_kernel(src_kind, parallel):
    """Set ``flag[0] = 1`` if any source element is inf or NaN; never clears it."""
    xptr, XB = _pointer(src_kind)
    XK = src_kind

    def kernel(seg_addr, seg_offset, chunk_seg, chunk_begin, flag):
        for c in prange(chunk_seg.size):
            s = chunk_seg[c]
            begin = chunk_begin[c]
            m = chunk_begin[c + 1] - begin
            p = xptr(seg_addr[s] + (begin - seg_offset[s]) * XB, m)
            bad = False
            for j in range(m):
                bad |= is_nonfinite(p[j], XK)
            if bad:
                flag[0] = 1

    return _compile(kernel, parallel)
