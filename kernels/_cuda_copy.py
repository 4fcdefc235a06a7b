"""The CUDA copy and swap kernels (:func:`copy_kernel`, :func:`swap_kernel`), re-exported by :mod:`.cuda`:
grid-stride over chunks, threads over elements, 16-byte vectors where a chunk's rows are aligned.

Both move their elements in vector units of 16 bytes of the narrower side (4 float32 elements; 8 where a
side is 16-bit: a float32 side then takes two 16-byte accesses), two units a thread, every load of both
issued before any is used (:func:`_vector_chunks`), as the lerp does (``cuda._lerp_chunks``). Alignment is
checked per chunk from the addresses themselves; an unaligned chunk, and each chunk's tail after its last
whole unit, go element by element. The bits are the element bodies' (``_elementwise.copy_at``,
``swap_bits``) either way. float64 kernels go element by element.
"""
import functools

import numpy as np
from numba import cuda

from ._cuda_hw import VECTORS
from ._cuda_hw import types as numba_types
from ._cuda_jit import M16 as _M16
from ._cuda_jit import S16 as _S16
from ._cuda_jit import E
from ._cuda_jit import jit as _jit
from ._cuda_jit import pointer as _pointer
from ._store.identity import variant as _variant
from ._target import bodies
from .kinds import EXCHANGE, F64, ITEMSIZE, wide

COPY_TO, COPY_FROM, SWAP = 0, 1, 2            # what a chunk's vectors do (_vector_chunks)


@_variant
def copy_kernel(shadow_kind, src_kind, to_shadow):
    """See :func:`fastema.kernels.cpu.copy_kernel`."""
    xptr, sptr = _pointer(src_kind), _pointer(shadow_kind)
    SK, XK, TO = shadow_kind, src_kind, to_shadow
    copy_at, = bodies(E, wide(SK, XK) and SK != XK, "copy_at")
    vectors = _vector_chunks(SK, XK, COPY_TO if TO else COPY_FROM, 0)

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, row_lo, row_hi, flag):
        if flag[0] != 0:
            return
        last = row_hi if TO else row_lo + 1
        for c in range(np.int32(cuda.blockIdx.x), np.int32(chunk_seg.size), np.int32(cuda.gridDim.x)):
            s = chunk_seg[c]
            off = seg_offset[s]
            start = vectors(n, shadow_addr[s], seg_addr[s], chunk_begin[c] - off, chunk_begin[c + 1] - off,
                            row_lo, last)
            p = xptr(seg_addr[s], seg_offset[s + 1] - off)
            q = sptr(shadow_addr[s], (last - 1) * n + seg_offset[s + 1] - off)
            for j in range(start + cuda.threadIdx.x, chunk_begin[c + 1] - off, cuda.blockDim.x):
                if TO:
                    for k in range(row_lo, row_hi):
                        copy_at(q, k * n + j, p, j, XK, SK)
                else:
                    copy_at(p, j, q, row_lo * n + j, SK, XK)

    return _jit(kernel)


@_variant
def swap_kernel(shadow_kind, src_kind, mode):
    """See :func:`fastema.kernels.cpu.swap_kernel`."""
    xptr, sptr = _pointer(src_kind), _pointer(shadow_kind)
    SK, XK, MODE = shadow_kind, src_kind, mode
    swap_at, = bodies(E, wide(SK, XK), "swap_at")
    vectors = _vector_chunks(SK, XK, SWAP, MODE)

    def kernel(n, shadow_addr, seg_addr, seg_offset, chunk_seg, chunk_begin, row):
        for c in range(np.int32(cuda.blockIdx.x), np.int32(chunk_seg.size), np.int32(cuda.gridDim.x)):
            s = chunk_seg[c]
            off = seg_offset[s]
            start = vectors(n, shadow_addr[s], seg_addr[s], chunk_begin[c] - off, chunk_begin[c + 1] - off,
                            row, row + 1)
            p = xptr(seg_addr[s], seg_offset[s + 1] - off)
            q = sptr(shadow_addr[s], row * n + seg_offset[s + 1] - off)
            for j in range(start + cuda.threadIdx.x, chunk_begin[c + 1] - off, cuda.blockDim.x):
                swap_at(q, row * n + j, p, j, SK, XK, MODE)

    return _jit(kernel)


@functools.cache
def _vector_chunks(shadow_kind, src_kind, what, mode):
    """``vectors(n, qa, pa, lo, hi, row_lo, row_hi) -> start``: the block's vector units of positions
    ``[lo, hi)`` of one source (at ``pa``) and of shadow rows ``[row_lo, row_hi)`` (row 0 at ``qa``,
    rows ``n`` apart), for ``what``: ``COPY_TO`` (the source into every row), ``COPY_FROM`` (row
    ``row_lo`` into the source) or ``SWAP`` (row ``row_lo`` and the source exchanged, ``mode``); returns
    where the element-by-element loop starts (``lo`` when the chunk is not aligned). An inlined device
    function."""
    SK, XK, WHAT, MODE = shadow_kind, src_kind, what, mode
    SB, XB = ITEMSIZE[SK], ITEMSIZE[XK]
    VEC = SK != F64 and XK != F64
    U = 4 if SB == XB == 4 else 8                        # elements per unit: 16 bytes of the narrower side
    QW, XW = U * SB // 4 if VEC else 4, U * XB // 4 if VEC else 4   # 32-bit words per unit, each side
    SAME = SK == XK and (WHAT != SWAP or MODE == EXCHANGE)           # the bits move as they are
    load4, store4 = VECTORS["load4_u32"], VECTORS["store4_u32"]
    convert, swap_bits = E.convert, E.swap_bits
    u32 = numba_types.uint32

    @cuda.jit(device=True, inline="always")
    def load_unit(w, o, address, words):
        """``words`` (4 or 8) 32-bit words at ``address`` into ``w[o:]``."""
        w[o], w[o + 1], w[o + 2], w[o + 3] = load4(address)
        if words == 8:
            w[o + 4], w[o + 5], w[o + 6], w[o + 7] = load4(address + 16)

    @cuda.jit(device=True, inline="always")
    def store_unit(w, o, address, words):
        store4(address, w[o], w[o + 1], w[o + 2], w[o + 3])
        if words == 8:
            store4(address + 16, w[o + 4], w[o + 5], w[o + 6], w[o + 7])

    @cuda.jit(device=True, inline="always")
    def lane(w, o, i, size):
        """Element ``i`` of the unit at ``w[o:]`` (elements of ``size`` bytes; 16-bit ones two a word,
        the first in the low half)."""
        if size == 4:
            return w[o + i]
        return (w[o + (i >> 1)] >> (_S16 * np.uint32(i & 1))) & _M16

    @cuda.jit(device=True, inline="always")
    def put(w, o, i, bits, size):
        """Element ``i`` of the unit at ``w[o:]`` set to ``bits`` (a 16-bit one's word cleared by its first)."""
        if size == 4:
            w[o + i] = bits
        elif i & 1 == 0:
            w[o + (i >> 1)] = np.uint32(bits) & _M16
        else:
            w[o + (i >> 1)] |= (np.uint32(bits) & _M16) << _S16

    @cuda.jit(device=True, inline="always")
    def unit(qv, qo, xv, xo, o, ox):
        """One unit's elements: ``qv``/``xv`` (the shadow's and the source's words as loaded, from
        ``o``/``ox``) into ``qo``/``xo`` (what is stored)."""
        for i in range(U):                                 # one body, unrolled by the compiler
            if WHAT == COPY_TO:
                put(qo, o, i, convert(lane(xv, ox, i, XB), XK, SK), SB)
            elif WHAT == COPY_FROM:
                put(xo, ox, i, convert(lane(qv, o, i, SB), SK, XK), XB)
            else:
                a, b = swap_bits(lane(qv, o, i, SB), lane(xv, ox, i, XB), SK, XK, MODE)
                put(qo, o, i, a, SB)
                put(xo, ox, i, b, XB)

    def vectors(n, qa, pa, lo, hi, row_lo, row_hi):
        if not VEC:
            return lo
        q_lo = qa + (row_lo * n + lo) * SB
        if ((pa + lo * XB) & 15) != 0 or (q_lo & 15) != 0 or (row_hi - row_lo > 1 and ((n * SB) & 15) != 0):
            return lo
        step = cuda.blockDim.x
        units = np.int32((hi - lo) // U)
        qv = cuda.local.array(16, u32)                   # two units of each side, as loaded and as stored
        xv = cuda.local.array(16, u32)                   # (registers once unrolled)
        qo = cuda.local.array(16, u32)
        xo = cuda.local.array(16, u32)
        for v in range(np.int32(cuda.threadIdx.x), units, np.int32(2 * step)):
            j0 = lo + U * v
            two = v + step < units
            j1 = j0 + U * step if two else j0             # no second unit: the first, loaded again, never stored
            if WHAT != COPY_TO:                           # every load of both units before any is used
                load_unit(qv, 0, qa + (row_lo * n + j0) * SB, QW)
                load_unit(qv, QW, qa + (row_lo * n + j1) * SB, QW)
            if WHAT != COPY_FROM:
                load_unit(xv, 0, pa + j0 * XB, XW)
                load_unit(xv, XW, pa + j1 * XB, XW)
            if WHAT == SWAP:
                if SAME:
                    store_unit(xv, 0, qa + (row_lo * n + j0) * SB, QW)
                    store_unit(qv, 0, pa + j0 * XB, XW)
                    if two:
                        store_unit(xv, XW, qa + (row_lo * n + j1) * SB, QW)
                        store_unit(qv, QW, pa + j1 * XB, XW)
                    continue
                unit(qv, qo, xv, xo, 0, 0)
                unit(qv, qo, xv, xo, QW, XW)
                store_unit(qo, 0, qa + (row_lo * n + j0) * SB, QW)
                store_unit(xo, 0, pa + j0 * XB, XW)
                if two:
                    store_unit(qo, QW, qa + (row_lo * n + j1) * SB, QW)
                    store_unit(xo, XW, pa + j1 * XB, XW)
            elif WHAT == COPY_FROM:
                if not SAME:
                    unit(qv, qo, xv, xo, 0, 0)
                    unit(qv, qo, xv, xo, QW, XW)
                store_unit(qv if SAME else xo, 0, pa + j0 * XB, XW)
                if two:
                    store_unit(qv if SAME else xo, XW, pa + j1 * XB, XW)
            else:
                if not SAME:
                    unit(qv, qo, xv, xo, 0, 0)
                    unit(qv, qo, xv, xo, QW, XW)
                for k in range(row_lo, row_hi):
                    store_unit(xv if SAME else qo, 0, qa + (k * n + j0) * SB, QW)
                    if two:
                        store_unit(xv if SAME else qo, QW, qa + (k * n + j1) * SB, QW)
        return lo + U * units

    return cuda.jit(device=True, inline="always")(vectors)
